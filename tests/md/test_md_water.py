"""A small water slab (periodic along a and b, free along c: pbc (T, T, F)) under JAX Langevin (NVT) dynamics
with the demo checkpoint, float32 state. (The driver treats every periodicity alike; the slab takes the device
search's mixed-boundary path, and its images along a and b the periodic one.)

The candidate buffer starts too small on purpose: the run must detect the overflow, roll the step back,
reallocate (recompile) and continue without dropping neighbours; at the end its slots equal the host builder's
(atoms mapped back from the driver's Morton order), and it reports the in-cutoff pairs beyond the model's K
slots (liquid water has more neighbours within 5 A than K).
"""

import numpy as np
import pytest
from md_helpers import water_box

from e2former_jax.checkpoint import DEMO_CHECKPOINT, load_model
from e2former_jax.graph import graph_from_atoms
from e2former_jax.md import JaxMD, initial_velocities
from e2former_jax.neighbors.device import SearchCapacity

STEPS = 40


@pytest.fixture(scope="module")
def water_nvt():
  model = load_model(DEMO_CHECKPOINT)
  box = water_box(3, seed=0)  # 27 molecules, 81 atoms, 9.3 A cube, 1 g/cm^3
  box.pbc = (True, True, False)  # a slab with two free surfaces
  initial_velocities(box, 300.0, seed=0)
  sim = JaxMD(
    model,
    box,
    timestep_fs=0.5,
    ensemble="nvt",
    temperature_K=300.0,
    friction_per_fs=0.02,
    seed=0,
    capacity=SearchCapacity(cell_capacity=128, candidate_capacity=model.config.max_neighbors),
    steps_per_call=20,
  )
  with pytest.warns(UserWarning, match="beyond|more than K"):
    rows = sim.run(STEPS)
  return model, sim, rows


@pytest.mark.slow
def test_water_slab_nvt_runs_and_reallocates(water_nvt):
  model, sim, rows = water_nvt
  print(
    f"\nwater slab NVT: {sim.reallocations} reallocation(s), capacity {sim.spec.capacity}, "
    f"{int(rows['builds'][-1])} builds in {STEPS} steps, T {rows['temperature'][-1]:.0f} K, "
    f"beyond K={model.config.max_neighbors}: {int(rows['beyond_k'][-1])} pairs"
  )
  assert sim.reallocations >= 1 and sim.spec.capacity.candidate_capacity > model.config.max_neighbors
  assert not bool(sim.state.neighbors.overflow)
  np.testing.assert_array_equal(rows["step"], np.arange(STEPS + 1))
  assert np.all(np.isfinite(rows["total"])) and np.all(rows["temperature"] < 2000.0)
  assert int(rows["builds"][-1]) >= 1
  order = np.asarray(sim.state.order)
  assert sorted(order[: len(sim.atoms)]) == list(range(81)) and np.any(order[:81] != np.arange(81))  # Morton
  assert sim.atoms.pbc.tolist() == [True, True, False]


@pytest.mark.slow
def test_water_slab_slots_match_host_builder_at_the_end(water_nvt):
  model, sim, rows = water_nvt
  cfg = model.config
  atoms = sim.atoms
  host, beyond = graph_from_atoms([atoms], cfg.cutoff, cfg.max_neighbors, num_atoms=sim.num_atoms, num_graphs=2)
  idx, mask, shift, device_beyond = sim.neighbor_slots()
  np.testing.assert_array_equal(mask, np.asarray(host.neighbor_mask))
  np.testing.assert_array_equal(idx, np.asarray(host.neighbors))
  np.testing.assert_allclose(shift, np.asarray(host.neighbor_shift), atol=1e-4)
  assert device_beyond == beyond == int(rows["beyond_k"][-1]) > 0
