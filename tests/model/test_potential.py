"""The positions-to-forces device path (``DevicePotential``): the same results as the host path, atom order and
bucket padding that change nothing, geometric buckets, and bad input refused by name."""

import ase
import ase.build
import numpy as np
import pytest
from model_helpers import predictor, relative

from e2former_jax.graph import graph_from_atoms
from e2former_jax.potential import DevicePotential, atom_bucket, morton_order

# float32: the two paths sum the same terms in another order (Morton-sorted atoms, other padding), so they agree
# to round-off of sums over K slots and L layers. Energies: 1e-5 relative, as the other cross-path model tests.
# Forces: each float32 path is up to 1.7e-5 of max|F| away from the same model in float64 on ethanol (measured,
# host and device path alike), so two of them agree to twice that; 4e-5. A change of the last bit of the
# spherical harmonics moved the ethanol case from below 1e-5 to 2.8e-5.
TOL = 1e-5
FORCE_TOL = 4e-5


# Host graphs padded as the calculator's host path pads them (atoms to a multiple of 32, one padding structure):
# the calculator test below then runs the programs compiled here, as its device path runs those of the potential.
HOST_ATOMS, HOST_GRAPHS = 32, 2


@pytest.fixture(scope="module")
def setup():
  cfg, model, fn = predictor(impl="jnp_node", stress=True)
  return cfg, fn, DevicePotential(model, compute_stress=True)


def fresh(potential):
  """A potential of the same model at the initial search capacity: molecules then run the program compiled for
  ethanol (``setup``'s potential keeps the capacity the copper cell grew it to, another static setting)."""
  return DevicePotential(potential.model, compute_stress=potential.compute_stress)


def _host(cfg, fn, atoms):
  graph, _ = graph_from_atoms([atoms], cfg.cutoff, cfg.max_neighbors, HOST_ATOMS, HOST_GRAPHS)
  out = fn(graph)
  return float(out["energy"][0]), np.asarray(out["forces"])[: len(atoms)], np.asarray(out["stress"][0])


def _structures():
  cell = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
  cell.rattle(0.05, seed=3)
  slab = ase.build.fcc111("Al", size=(2, 2, 3), vacuum=None, periodic=True)
  slab.pbc = (True, True, False)
  slab.rattle(0.05, seed=4)
  return {"ethanol": ase.build.molecule("CH3CH2OH"), "copper": cell, "slab": slab}


@pytest.mark.parametrize("name", ["ethanol", "copper", "slab"])
def test_device_path_equals_host_path(setup, name):
  cfg, fn, potential = setup
  atoms = _structures()[name]
  e, f, s = _host(cfg, fn, atoms)
  out = potential.from_atoms(atoms)
  assert abs(out["energy"] - e) <= TOL * abs(e)
  assert relative(out["forces"], f) <= FORCE_TOL
  if all(atoms.pbc):
    assert relative(out["stress"], s) <= 1e-4  # a difference of larger terms (see test_model.py)


def test_atom_order_and_spatial_sort_change_nothing(setup):
  cfg, fn, potential = setup
  potential = fresh(potential)
  atoms = ase.build.molecule("C6H6")
  perm = np.random.default_rng(0).permutation(len(atoms))
  out, moved = potential.from_atoms(atoms), potential.from_atoms(atoms[perm])
  assert abs(moved["energy"] - out["energy"]) <= TOL * abs(out["energy"])
  assert relative(moved["forces"], out["forces"][perm]) <= FORCE_TOL
  unsorted = DevicePotential(potential.model, spatial_order=False).from_atoms(atoms)
  assert relative(unsorted["forces"], out["forces"]) <= FORCE_TOL


def test_morton_order_is_spatial_and_keeps_padding_last():
  rng = np.random.default_rng(1)
  grid = np.stack(np.meshgrid(*[np.arange(4.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
  shuffled = rng.permutation(len(grid))
  positions = np.concatenate([grid[shuffled], np.zeros((3, 3))])
  mask = np.arange(len(positions)) < len(grid)
  order = np.asarray(morton_order(positions, mask))
  assert sorted(order.tolist()) == list(range(len(positions))) and order[-3:].tolist() == [64, 65, 66]
  first_octant = grid[shuffled][order[:8]]
  assert np.all(first_octant <= 1.0)  # the first 8 in Morton order fill the first 2x2x2 block


def test_buckets_grow_geometrically():
  buckets = sorted({atom_bucket(n) for n in range(1, 20_000)})
  assert buckets[0] == 32 and all(b % 32 == 0 for b in buckets)
  assert all(later / earlier <= 1.3 for earlier, later in zip(buckets, buckets[1:]) if earlier >= 256)
  assert len(buckets) <= 27  # a few programs for every size up to 20k atoms


@pytest.mark.parametrize(
  "positions, numbers, message",
  [
    ([[0, 0, 0], [np.nan, 0, 0]], [1, 1], "not finite"),
    ([[0, 0, 0], [0.01, 0, 0]], [1, 1], "overlap"),
    ([[0, 0, 0], [1, 0, 0]], [1, 300], "unknown element"),
    (np.zeros((0, 3)), [], "empty"),
  ],
)
def test_bad_input_is_named(setup, positions, numbers, message):
  with pytest.raises(ValueError, match=message):
    fresh(setup[2])(np.asarray(positions, float), np.asarray(numbers, int))


def test_calculator_device_path_equals_host_path(setup):
  """``E2FormerCalculator(neighbor_list="device")`` (the default on a GPU) against the host list: energy, forces
  and stress of a periodic cell (42 neighbours within the cutoff, K = 12 kept); the truncation warning also comes
  from the device count. The stress is asked for first: that one calculation also gives the energy and forces."""
  from e2former_jax import E2FormerCalculator

  cfg, _, potential = setup
  host, device = (E2FormerCalculator(model=potential.model, neighbor_list=n) for n in ("host", "device"))
  cell = _structures()["copper"]
  results = []
  for calc in (host, device):
    cell.calc = calc
    with pytest.warns(UserWarning, match=f"dropped because atoms have more than K={cfg.max_neighbors}"):
      stress = cell.get_stress()
    results.append((cell.get_potential_energy(), cell.get_forces(), stress))
  (e0, f0, s0), (e1, f1, s1) = results
  assert abs(e1 - e0) <= TOL * abs(e0) and relative(f1, f0) <= FORCE_TOL and relative(s1, s0) <= 1e-4
  with pytest.raises(ValueError, match="neighbor_list must be one of"):
    E2FormerCalculator("small", neighbor_list="gpu")


def test_out_of_device_memory_is_explained_and_other_errors_pass(setup, monkeypatch):
  """XLA's RESOURCE_EXHAUSTED becomes DeviceMemoryError naming the settings that are not yet on (simulated: the
  compiled call is replaced); any other runtime error passes unchanged; with every setting on, the message says
  the size needs a larger device."""
  import jax

  from e2former_jax import potential as potential_module
  from e2former_jax.device_memory import DeviceMemoryError, memory_advice

  cfg, _, potential = setup
  atoms = _structures()["ethanol"]

  def raising(message):
    def compiled(*args, **kwargs):
      raise jax.errors.JaxRuntimeError(message)

    return lambda *args, **kwargs: compiled

  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  monkeypatch.setattr(potential_module, "_compiled", raising("RESOURCE_EXHAUSTED: Out of memory allocating 9 bytes"))
  with pytest.raises(DeviceMemoryError) as caught:
    potential.from_atoms(atoms)
  text = str(caught.value)
  assert text.startswith("energy and forces for 9 atoms ran out of device memory (RESOURCE_EXHAUSTED")
  for setting in ("remat=True", "edge_chunk=4096", "node_chunk=4096", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95"):
    assert setting in text
  monkeypatch.setattr(potential_module, "_compiled", raising("INTERNAL: something else"))
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL: something else"):
    potential.from_atoms(atoms)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  saving = cfg.replace(remat=True, edge_chunk=64, node_chunk=64)
  text = memory_advice(saving, 300_000, "energy and forces", RuntimeError("RESOURCE_EXHAUSTED: Out of memory"))
  assert "needs a device with more memory" in text and "300,000 atoms" in text
