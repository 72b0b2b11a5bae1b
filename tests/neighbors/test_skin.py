"""The MD neighbour list (a Verlet buffer from the device search) against the host builder: after random
displacements smaller than skin / 2, with no rebuild, the K nearest slots picked from the buffer equal
``graph_from_atoms``'s slot for slot (molecule, periodic water box with several images, slab); overflow is
flagged and the grown capacity fits; moving atoms far (whole-cell jumps) triggers a rebuild with correct images."""

import dataclasses
import functools
from types import SimpleNamespace

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
from e2former_jax.neighbors.device import SearchCapacity

CUTOFF, K, SKIN = 5.0, 24, 0.6


@functools.cache
def _slots_fn(spec):
  return jax.jit(lambda state, pos, cell: nl.nearest_slots(spec, state, pos, cell))


def slot_count(atoms):
  return (len(atoms) // 32 + 1) * 32


def padded(atoms):
  """(positions, cell, mask) of ``atoms`` padded to ``slot_count`` slots, float32."""
  n, num_atoms = len(atoms), slot_count(atoms)
  pos = np.zeros((num_atoms, 3))
  pos[:n] = atoms.positions
  return jnp.asarray(pos, jnp.float32), jnp.asarray(atoms.cell.array, jnp.float32), jnp.arange(num_atoms) < n


def updated(spec, state, atoms):
  """``state`` rebuilt at ``atoms``' positions when they moved too far (outside jit: the search is a jitted call of
  its own, compiled once per capacity)."""
  pos, cell, mask = padded(atoms)
  if bool(nl.needs_rebuild(spec, state, pos, mask)):
    state = nl.build(spec, state, pos, cell, mask)
  return state


def listed(atoms, k=K, capacity=None):
  """(spec, state) of a list built at ``atoms``' positions (capacity fitted when None)."""
  pos, cell, mask = padded(atoms)
  spec = nl.plan(pos, cell, atoms.pbc, CUTOFF, k, skin=SKIN, atom_mask=mask, capacity=capacity)
  return spec, updated(spec, nl.empty_state(spec, len(pos), jnp.float32), atoms)


def assert_host_slots(atoms, spec, state, builds=1):
  """``state`` updated to ``atoms``' positions does ``builds`` builds in all and gives the host builder's slots."""
  state = updated(spec, state, atoms)
  assert int(state.builds) == builds and not bool(state.overflow)
  pos, cell, _ = padded(atoms)
  idx, slot_mask, shift, beyond, state = _slots_fn(spec)(state, pos, cell)
  host, host_beyond = graph_from_atoms([atoms], CUTOFF, spec.max_neighbors, num_atoms=len(pos), num_graphs=2)
  np.testing.assert_array_equal(np.asarray(slot_mask), np.asarray(host.neighbor_mask))
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(host.neighbors))
  np.testing.assert_allclose(np.asarray(shift), np.asarray(host.neighbor_shift), atol=1e-4)  # float32 S @ cell
  assert int(beyond) == host_beyond and not bool(state.too_close)
  return int(beyond), state


def displaced(atoms, seed=0, most=0.5 * SKIN):
  """``atoms`` with every atom moved by a random vector shorter than ``most`` (A)."""
  rng = np.random.default_rng(seed)
  step = rng.normal(size=(len(atoms), 3))
  step *= rng.uniform(0, 0.999 * most, (len(atoms), 1)) / np.linalg.norm(step, axis=1, keepdims=True)
  moved = atoms.copy()
  moved.positions += step
  return moved


def aspirin():
  return next(a for a in load_demo("test") if a.info["config_type"] == "aspirin")


def test_molecule_slots_after_moves_within_the_skin():
  molecule = aspirin()
  spec, state = listed(molecule)  # capacity fitted by device searches
  assert spec.pbc == (False, False, False) and spec.capacity.candidate_capacity >= len(molecule) - 1
  for seed in range(2):
    beyond, _ = assert_host_slots(displaced(molecule, seed), spec, state)
    assert beyond == 0
  truncated = dataclasses.replace(spec, max_neighbors=8)  # the same buffer, the 8 nearest as on the host
  beyond, _ = assert_host_slots(displaced(molecule, 2), truncated, state)
  assert beyond > 0


def test_water_box_with_images_and_whole_cell_jumps():
  """81 atoms in a 9.3 A cube: the 5.6 A search reaches past the minimum image; liquid water has more than
  K = 24 neighbours within 5 A. Jumps by whole cells (positions are never wrapped) rebuild the list."""
  box = water_box(3, seed=0)
  spec, state = listed(box, capacity=SearchCapacity(128, 128))
  beyond, state = assert_host_slots(displaced(box, 0), spec, state)
  assert beyond > 0
  jumped = displaced(box, 1)
  jumped.positions += np.random.default_rng(1).integers(-3, 4, size=(len(box), 3)) @ box.cell.array
  assert_host_slots(jumped, spec, state, builds=2)
  assert_host_slots(displaced(jumped, 2, most=0.1), spec, state, builds=2)  # refs moved with the jump


def test_slab_slots_after_moves_within_the_skin():
  slab = water_box(4, seed=3)
  slab.pbc = (True, True, False)
  spec, state = listed(slab, capacity=SearchCapacity(64, 128))
  assert spec.pbc == (True, True, False)
  beyond, _ = assert_host_slots(displaced(slab, 0), spec, state)
  assert beyond > 0


def test_cell_thinner_than_the_search_radius_keeps_its_images():
  atoms = ase.Atoms(
    "CO", positions=[[0, 0, 0], [1.1, 0.3, 0.2]], cell=[[3.0, 0, 0], [0.5, 3.2, 0], [0, 0.4, 3.4]], pbc=True
  )
  spec, state = listed(atoms, k=64, capacity=SearchCapacity(8, 256, reach=(2, 2, 2)))  # two images each way
  assert_host_slots(displaced(atoms, 0), spec, state)


def test_overflow_is_flagged_and_the_grown_capacity_fits():
  box = water_box(3, seed=0)
  small = SearchCapacity(cell_capacity=128, candidate_capacity=16, reach=(1, 1, 1))
  spec, state = listed(box, capacity=small)
  assert spec.capacity == small and bool(state.overflow) and int(state.max_cell_count) == len(box)
  spec = nl.grown(spec, state)
  assert spec.capacity == SearchCapacity(128, 128)  # 1.25 x the 77 candidates needed, in buckets
  state = updated(spec, nl.empty_state(spec, slot_count(box), jnp.float32), box)
  assert_host_slots(displaced(box, 3), spec, state)
  assert small.grown(state) == SearchCapacity(128, 96)  # no headroom: the bucket of the 77 needed


def test_capacity_growth_with_headroom_covers_cells_candidates_and_reach():
  report = SimpleNamespace(max_cell_count=20, max_candidates=100, reach_needed=np.array([1, 3, 1]))
  fitted = SearchCapacity().grown(report, nl.HEADROOM)
  assert fitted == SearchCapacity(cell_capacity=32, candidate_capacity=128, reach=(1, 3, 1))
  assert fitted.grown(SimpleNamespace(max_cell_count=1, max_candidates=1, reach_needed=[1] * 3), 2.0) == fitted


def test_bad_input_is_refused_by_name():
  molecule = ase.build.molecule("CH3CH2OH")
  molecule.positions[3] = molecule.positions[2] + [0.05, 0, 0]
  with pytest.raises(ValueError, match="overlap"):
    nl.plan(molecule.positions, None, False, CUTOFF, K)
  with pytest.raises(ValueError, match="skin must be"):
    nl.NeighborListSpec(CUTOFF, K, -0.1, (False,) * 3, SearchCapacity())
