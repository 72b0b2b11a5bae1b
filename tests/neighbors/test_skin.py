"""The on-device MD neighbour list against the host builder: same K-nearest slots, overflow detection, skin."""

import functools

import ase
import ase.build
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from md_helpers import water_box

from e2former_jax.data import load_demo
from e2former_jax.graph import graph_from_atoms
from e2former_jax.neighbors import skin as nl

CUTOFF, K = 5.0, 24


@functools.cache
def _build_fn(spec, periodic):
  return jax.jit(lambda state, pos, cell, mask: nl.build(spec, state, pos, cell, mask, periodic))


@functools.cache
def _slots_fn(spec):
  return jax.jit(lambda state, pos, cell: nl.nearest_slots(spec, state, pos, cell))


def device_slots(atoms, spec, num_atoms):
  """(state, neighbors, mask, shift, beyond) of ``atoms`` padded to ``num_atoms`` slots, float32."""
  n = len(atoms)
  periodic = bool(atoms.pbc.all())
  pos = np.zeros((num_atoms, 3))
  pos[:n] = atoms.positions
  pos = jnp.asarray(pos, jnp.float32)
  cell = jnp.asarray(atoms.cell.array if periodic else np.zeros((3, 3)), jnp.float32)
  mask = jnp.arange(num_atoms) < n
  state = _build_fn(spec, periodic)(nl.empty_state(spec, num_atoms, jnp.float32), pos, cell, mask)
  idx, slot_mask, shift, beyond, state = _slots_fn(spec)(state, pos, cell)
  return state, np.asarray(idx), np.asarray(slot_mask), np.asarray(shift), int(beyond)


def assert_same_slots(atoms, k=K, **plan_kw):
  """The device list gives the host builder's slots, slot by slot, and the same count beyond K."""
  num_atoms = (len(atoms) // 32 + 1) * 32
  host, host_beyond = graph_from_atoms([atoms], CUTOFF, k, num_atoms=num_atoms, num_graphs=2)
  spec = nl.plan(atoms.positions, atoms.cell.array, atoms.pbc, CUTOFF, k, **plan_kw)
  state, idx, mask, shift, beyond = device_slots(atoms, spec, num_atoms)
  assert not bool(state.overflow)
  np.testing.assert_array_equal(mask, np.asarray(host.neighbor_mask))
  np.testing.assert_array_equal(idx, np.asarray(host.neighbors))
  np.testing.assert_allclose(shift, np.asarray(host.neighbor_shift), atol=1e-5)
  assert beyond == host_beyond
  return spec, beyond


def aspirin():
  return next(a for a in load_demo("test") if a.info["config_type"] == "aspirin")


def test_molecule_matches_host_builder():
  spec, beyond = assert_same_slots(aspirin())
  assert spec.method == "all_pairs" and spec.images == ((0, 0, 0),) and beyond == 0
  assert_same_slots(aspirin(), k=8)  # K-truncation: the 8 nearest, as on the host
  assert_same_slots(ase.build.molecule("CH3CH2OH"))


def test_small_water_box_with_images_matches_host_builder():
  box = water_box(3, seed=0)  # 81 atoms, 9.3 A: the 5.5 A search reaches past the minimum image
  spec, beyond = assert_same_slots(box)
  assert spec.method == "all_pairs" and len(spec.images) == 27
  print(f"water box 81 atoms, K={K}: {beyond} in-cutoff pairs beyond K")
  assert beyond > 0  # liquid water has ~30-50 neighbours within 5 A
  _, beyond = assert_same_slots(box, k=80)
  assert beyond == 0


def test_triclinic_cell_matches_host_builder():
  box = water_box(3, seed=2)
  box.set_cell(box.cell.array + np.array([[0, 0, 0], [2.0, 0, 0], [1.0, 1.5, 0]]), scale_atoms=False)
  assert_same_slots(box)
  assert_same_slots(box, k=80)


def test_cell_smaller_than_cutoff_has_self_images():
  atoms = ase.Atoms(
    "CO", positions=[[0, 0, 0], [1.1, 0.3, 0.2]], cell=[[3.0, 0, 0], [0.5, 3.2, 0], [0, 0.4, 3.4]], pbc=True
  )
  spec, beyond = assert_same_slots(atoms, k=64)
  assert len(spec.images) == 125 and beyond == 0  # two images each way along every axis
  _, idx, mask, shift, _ = device_slots(atoms, spec, 32)
  own_images = mask[0] & (idx[0] == 0)
  assert own_images.sum() >= 6 and np.all(np.linalg.norm(shift[0][own_images], axis=-1) > 2.9)


def test_cell_list_matches_all_pairs_and_host_builder():
  box = water_box(6, seed=1)  # 648 atoms, 18.6 A: three cells of 5.5 A along each axis
  spec, beyond = assert_same_slots(box)
  assert spec.method == "cell_list" and spec.grid == (3, 3, 3)
  spec_pairs, beyond_pairs = assert_same_slots(box, method="all_pairs")
  assert spec_pairs.method == "all_pairs" and beyond_pairs == beyond
  with pytest.raises(ValueError, match="cell list needs"):
    nl.plan(water_box(3).positions, water_box(3).cell.array, True, CUTOFF, K, method="cell_list")


def test_overflow_is_flagged_and_growth_fits():
  box = water_box(3, seed=0)
  spec = nl.plan(box.positions, box.cell.array, box.pbc, CUTOFF, K, capacity=K)
  state, *_ = device_slots(box, spec, 96)
  assert bool(state.overflow) and int(state.max_candidates) > K
  bigger = nl.grown(spec, state)
  assert bigger.capacity >= int(state.max_candidates)
  state, *_ = device_slots(box, bigger, 96)
  assert not bool(state.overflow)

  big = water_box(6, seed=1)
  spec = nl.plan(big.positions, big.cell.array, big.pbc, CUTOFF, K, cell_capacity=4)
  state, *_ = device_slots(big, spec, 672)
  assert bool(state.overflow) and int(state.max_cell_count) > 4
  bigger = nl.grown(spec, state)
  assert bigger.cell_capacity >= int(state.max_cell_count)
  assert_same_slots(big, capacity=bigger.capacity, cell_capacity=bigger.cell_capacity)


def test_skin_rebuild_and_wrapped_coordinates():
  """No rebuild while atoms move less than skin/2; after a rebuild the slots follow; shifts stay consistent
  for atoms far outside the cell (positions are never wrapped)."""
  box = water_box(3, seed=3)
  n, num_atoms = len(box), 96
  spec = nl.plan(box.positions, box.cell.array, box.pbc, CUTOFF, K, skin=0.6)
  mask = jnp.arange(num_atoms) < n
  cell = jnp.asarray(box.cell.array, jnp.float32)
  update = jax.jit(lambda s, p: nl.update(spec, s, p, cell, mask, True))

  def padded(positions):
    out = np.zeros((num_atoms, 3))
    out[:n] = positions
    return jnp.asarray(out, jnp.float32)

  state = update(nl.empty_state(spec, num_atoms, jnp.float32), padded(box.positions))
  assert int(state.builds) == 1
  rng = np.random.default_rng(0)
  small = box.copy()
  small.positions += rng.uniform(-0.17, 0.17, size=(n, 3))  # |displacement| < 0.3 = skin / 2
  state = update(state, padded(small.positions))
  assert int(state.builds) == 1
  idx, slot_mask, _, _, _ = _slots_fn(spec)(state, padded(small.positions), cell)
  host, _ = graph_from_atoms([small], CUTOFF, K, num_atoms=num_atoms, num_graphs=2)
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(host.neighbors))
  np.testing.assert_array_equal(np.asarray(slot_mask), np.asarray(host.neighbor_mask))

  moved = small.copy()
  moved.positions[5] += [0.4, 0.0, 0.0]
  moved.positions += rng.integers(-3, 4, size=(n, 3)) @ box.cell.array  # whole-cell jumps
  state = update(state, padded(moved.positions))
  assert int(state.builds) == 2
  idx, slot_mask, shift, _, _ = _slots_fn(spec)(state, padded(moved.positions), cell)
  host, _ = graph_from_atoms([moved], CUTOFF, K, num_atoms=num_atoms, num_graphs=2)
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(host.neighbors))
  np.testing.assert_array_equal(np.asarray(slot_mask), np.asarray(host.neighbor_mask))
  np.testing.assert_allclose(np.asarray(shift), np.asarray(host.neighbor_shift), atol=1e-4)


def test_plan_rejects_mixed_periodicity():
  atoms = water_box(3)
  with pytest.raises(ValueError, match="mixed periodicity"):
    nl.plan(atoms.positions, atoms.cell.array, [True, True, False], CUTOFF, K)
