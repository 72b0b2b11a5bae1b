"""The device neighbour search against the host builder: same kept neighbours, images, padding and dropped
counts for molecules, clusters, periodic, small, slab and wire cells and batches; the tie rule is independent
of atom order and translation; overflow is flagged and refitted; bad input is reported.

Each configuration (N, G, pbc, cutoff, K, capacity) is compiled once and shared by the tests that use it."""

import ase
import ase.build
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from md_helpers import water_box

from e2former_jax.graph import graph_from_atoms
from e2former_jax.neighbors import device, host

CUTOFF = 5.0
FREE = dict(num_atoms=64, num_graphs=3, max_neighbors=12, pbc=(False,) * 3, capacity=device.SearchCapacity(64, 64))
PERIODIC = dict(num_atoms=208, num_graphs=3, max_neighbors=24, pbc=(True,) * 3, capacity=device.SearchCapacity(96, 64))
SLAB = dict(PERIODIC, pbc=(True, True, False))
WIRE = dict(PERIODIC, pbc=(True, False, False))


def with_pbc(atoms: ase.Atoms, pbc) -> ase.Atoms:
  atoms = atoms.copy()
  atoms.pbc = pbc
  return atoms


def random_cluster(n: int, side: float, seed: int, closest: float = 1.0) -> ase.Atoms:
  """``n`` carbon atoms uniformly in a cube of ``side`` A, no two closer than ``closest`` A (free)."""
  rng = np.random.default_rng(seed)
  points = []
  while len(points) < n:
    p = rng.uniform(0, side, 3)
    if all(np.linalg.norm(p - q) >= closest for q in points):
      points.append(p)
  return ase.Atoms(f"C{n}", positions=points)


def cubic_lattice(a: float = 2.1, repeat: int = 5) -> ase.Atoms:
  """Simple cubic crystal: shells of 6, 12, 8, 6, 24 neighbours at a, a sqrt 2, a sqrt 3, 2a, a sqrt 5 (all
  within 5 A for a = 2.1); K = 24 cuts the third shell, so 6 of 8 equidistant neighbours are kept."""
  return ase.Atoms(
    f"Cu{repeat**3}", positions=a * np.indices((repeat,) * 3).reshape(3, -1).T, cell=[a * repeat] * 3, pbc=True
  )


def build(structures, config, positions=None, capacity=None, translation=0.0):
  """Host graph (``graph_from_atoms``), its dropped count, and the device slots of the same graph's arrays
  (``positions`` instead of the graph's, moved by ``translation``)."""
  graph, beyond = graph_from_atoms(
    structures, CUTOFF, config["max_neighbors"], num_atoms=config["num_atoms"], num_graphs=config["num_graphs"]
  )
  slots, fitted = device.fit_neighbor_slots(
    (graph.positions if positions is None else positions) + translation,
    graph.cell,
    graph.atom_mask,
    graph.graph_index,
    pbc=config["pbc"],
    cutoff=CUTOFF,
    max_neighbors=config["max_neighbors"],
    num_graphs=config["num_graphs"],
    capacity=capacity or config["capacity"],
  )
  return graph, beyond, slots, fitted


def neighbour_sets(neighbors, shift, mask, graph, pbc):
  """Per atom, the sorted (source, integer lattice image) pairs of its filled slots."""
  neighbors, shift, mask = np.asarray(neighbors), np.asarray(shift, np.float64), np.asarray(mask)
  cells, graph_index = np.asarray(graph.cell, np.float64), np.asarray(graph.graph_index)
  out = []
  for i in range(len(neighbors)):
    g = graph_index[i]
    basis = host.lattice_basis(cells[g], pbc) if np.asarray(graph.atom_mask)[i] else np.eye(3)
    image = np.rint(shift[i] @ np.linalg.inv(basis)).astype(int)
    np.testing.assert_allclose(shift[i], image @ basis, atol=1e-4)  # shifts are lattice vectors (float32)
    out.append(sorted((int(j), *s) for j, s, m in zip(neighbors[i], image.tolist(), mask[i], strict=True) if m))
  return out


def assert_same_as_host(graph, beyond, slots, pbc):
  """Same mask, the same neighbour set with the same images for every atom, host padding, same dropped count;
  slots by increasing distance."""
  mask = np.asarray(slots.mask)
  np.testing.assert_array_equal(mask, np.asarray(graph.neighbor_mask))
  assert neighbour_sets(slots.neighbors, slots.shift, mask, graph, pbc) == neighbour_sets(
    graph.neighbors, graph.neighbor_shift, mask, graph, pbc
  )
  np.testing.assert_array_equal(np.asarray(slots.neighbors)[~mask], graph.num_atoms - 1)
  assert not np.asarray(slots.shift)[~mask].any()
  assert int(slots.num_dropped) == beyond
  positions = np.asarray(graph.positions, np.float64)
  vectors = positions[np.asarray(slots.neighbors)] + np.asarray(slots.shift) - positions[:, None]
  distance = np.where(mask, np.linalg.norm(vectors, axis=-1), np.inf)
  filled = mask[:, 1:]
  assert np.all(distance[:, 1:][filled] - distance[:, :-1][filled] >= -1e-5)  # float32 positions
  assert not bool(slots.overflow) and int(slots.num_close) == 0


def test_capacity_buckets_grow_geometrically():
  assert [device.capacity_bucket(x) for x in (1, 8, 9, 13, 17, 25, 33, 49, 65, 100)] == [
    8,
    8,
    12,
    16,
    24,
    32,
    48,
    64,
    96,
    128,
  ]


def test_molecules_clusters_and_a_batch_match_host():
  for structures in (
    [ase.build.molecule("CH3CH2OH")],
    [ase.build.molecule("C60")],  # equidistant neighbours; K = 12 cuts through shells
    [random_cluster(40, 7.0, seed=0)],  # dense: most atoms have more than K in-cutoff neighbours
    [random_cluster(30, 80.0, seed=1, closest=3.0)],  # sparse: the bounding box grid hits the cap of 64 bins
    [ase.build.molecule("CH3CH2OH"), random_cluster(40, 7.0, seed=0)],  # batch: never neighbours across
  ):
    graph, beyond, slots, fitted = build(structures, FREE)
    assert fitted == FREE["capacity"]
    assert_same_as_host(graph, beyond, slots, FREE["pbc"])
  assert beyond > 0


def test_padding_atoms_are_nobodys_neighbours():
  """Padding atoms anywhere (here inside the molecule) neither get nor give neighbours."""
  molecule = ase.build.molecule("CH3CH2OH")
  graph, beyond, slots, _ = build([molecule], FREE)
  rng = np.random.default_rng(0)
  positions = np.asarray(graph.positions).copy()
  positions[len(molecule) :] = rng.uniform(-1.5, 1.5, (FREE["num_atoms"] - len(molecule), 3))
  _, _, moved, _ = build([molecule], FREE, positions=jnp.asarray(positions))
  assert_same_as_host(graph, beyond, moved, FREE["pbc"])
  assert not np.asarray(moved.mask)[len(molecule) :].any()


def test_periodic_water_boxes_and_a_triclinic_batch_match_host():
  triclinic = water_box(3, seed=2)
  triclinic.set_cell(triclinic.cell.array + np.array([[0, 0, 0], [2.0, 0, 0], [1.0, 1.5, 0]]), scale_atoms=False)
  for structures in ([water_box(4, seed=0)], [water_box(3, seed=0), triclinic]):
    graph, beyond, slots, fitted = build(structures, PERIODIC)
    assert fitted == PERIODIC["capacity"]
    assert_same_as_host(graph, beyond, slots, PERIODIC["pbc"])
    assert beyond > 0


def test_cell_thinner_than_cutoff_reaches_several_images():
  atoms = ase.Atoms(
    "CO", positions=[[0, 0, 0], [1.1, 0.3, 0.2]], cell=[[3.0, 0, 0], [0.5, 3.2, 0], [0, 0.4, 3.4]], pbc=True
  )
  graph, beyond, slots, fitted = build([atoms], PERIODIC)
  assert fitted == device.SearchCapacity(96, 64, reach=(2, 2, 2))  # grown from (1, 1, 1): two images each way
  assert_same_as_host(graph, beyond, slots, PERIODIC["pbc"])
  own = np.asarray(slots.mask)[0] & (np.asarray(slots.neighbors)[0] == 0)
  assert own.sum() >= 6 and beyond > 0  # the atom's own images; more than K = 24 images within the cutoff


def test_slab_and_wire_match_host_and_a_periodic_cell_with_vacuum():
  box = water_box(4, seed=3)
  for config in (SLAB, WIRE):
    mixed = with_pbc(box, config["pbc"])
    graph, beyond, slots, _ = build([mixed], config)
    assert_same_as_host(graph, beyond, slots, config["pbc"])
    # The same atoms in a fully periodic cell with more vacuum than the cutoff along the free directions.
    vacuum = box.copy()
    cell = box.cell.array.copy()
    free = ~np.asarray(config["pbc"])
    cell[free] *= 1 + 2 * CUTOFF / np.linalg.norm(cell[free], axis=1, keepdims=True)
    vacuum.set_cell(cell, scale_atoms=False)
    periodic_graph, periodic_beyond, periodic_slots, _ = build([vacuum], PERIODIC)
    assert periodic_beyond == beyond
    assert neighbour_sets(slots.neighbors, slots.shift, slots.mask, graph, config["pbc"]) == neighbour_sets(
      periodic_slots.neighbors, periodic_slots.shift, periodic_slots.mask, periodic_graph, PERIODIC["pbc"]
    )


def kept_steps(atoms, sets, order):
  """For each atom of the unpermuted crystal (``order`` maps rows to it), its kept neighbours as (source,
  displacement in lattice steps of 2.1 A): the same points of space whatever the atom order."""
  kept = [None] * len(atoms)
  for i, pairs in enumerate(sets[: len(atoms)]):
    vectors = [atoms.positions[j] + np.asarray(image) @ atoms.cell.array - atoms.positions[i] for j, *image in pairs]
    steps = np.rint(np.asarray(vectors) / 2.1).astype(int)
    kept[order[i]] = {(order[j], *step) for (j, *_), step in zip(pairs, steps.tolist(), strict=True)}
  return kept


def test_ties_at_the_kth_distance_do_not_depend_on_atom_order_or_translation():
  lattice = cubic_lattice()
  graph, beyond, slots, _ = build([lattice], PERIODIC)
  assert_same_as_host(graph, beyond, slots, PERIODIC["pbc"])
  assert np.asarray(slots.mask).sum(axis=1)[: len(lattice)].tolist() == [24] * len(lattice)
  sets = neighbour_sets(slots.neighbors, slots.shift, slots.mask, graph, PERIODIC["pbc"])
  reference = kept_steps(lattice, sets, np.arange(len(lattice)))
  rng = np.random.default_rng(0)
  for trial in range(2):
    order = rng.permutation(len(lattice))
    moved = lattice[order]
    moved.positions += rng.integers(-2, 3, (len(lattice), 1)) * lattice.cell.array[trial]  # atoms outside the cell
    offset = jnp.asarray(rng.uniform(-3, 3, 3), jnp.float32)  # a translation on no float grid (device only)
    graph, beyond, slots, _ = build([moved], PERIODIC, translation=offset)
    assert_same_as_host(graph, beyond, slots, PERIODIC["pbc"])
    sets = neighbour_sets(slots.neighbors, slots.shift, slots.mask, graph, PERIODIC["pbc"])
    assert kept_steps(moved, sets, order) == reference


def test_crystal_with_inexact_coordinates_keeps_the_hosts_shell_members():
  """fcc copper: K = 24 keeps 6 of the 24 equidistant third-shell neighbours; float32 rounding of the
  coordinates (1.805 A, ...) is far below the tie grid, so the same 6 as on the host (float64)."""
  copper = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
  graph, beyond, slots, _ = build([copper], PERIODIC)
  assert_same_as_host(graph, beyond, slots, PERIODIC["pbc"])
  assert beyond == len(copper) * 18  # 42 neighbours within 5 A, 24 kept


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def test_float64_positions_give_the_host_arrays(x64):
  """In float64 the distances agree with the host's to rounding, so even the slot order matches."""
  graph, beyond = graph_from_atoms([water_box(4, seed=1)], CUTOFF, 24, num_atoms=208, num_graphs=3, dtype=np.float64)
  slots = device.neighbor_slots(
    graph.positions,
    graph.cell,
    graph.atom_mask,
    graph.graph_index,
    pbc=PERIODIC["pbc"],
    cutoff=CUTOFF,
    max_neighbors=24,
    num_graphs=3,
    capacity=PERIODIC["capacity"],
  )
  assert slots.shift.dtype == jnp.float64 and not bool(slots.overflow)
  np.testing.assert_array_equal(np.asarray(slots.neighbors), np.asarray(graph.neighbors))
  np.testing.assert_allclose(np.asarray(slots.shift), np.asarray(graph.neighbor_shift), atol=1e-12)
  assert int(slots.num_dropped) == beyond


def test_overflow_is_flagged_and_the_fit_reallocates():
  structures = [water_box(3, seed=0)]  # 81 atoms in one bin
  graph, beyond = graph_from_atoms(structures, CUTOFF, PERIODIC["max_neighbors"], num_atoms=208, num_graphs=3)
  args = (graph.positions, graph.cell, graph.atom_mask, graph.graph_index)
  kw = dict(pbc=PERIODIC["pbc"], cutoff=CUTOFF, max_neighbors=PERIODIC["max_neighbors"], num_graphs=3)
  few_candidates = device.SearchCapacity(cell_capacity=96, candidate_capacity=16)
  slots = device.neighbor_slots(*args, **kw, capacity=few_candidates)
  assert bool(slots.overflow) and int(slots.max_cell_count) == 81 and 48 < int(slots.max_candidates) <= 64
  few_cells = device.SearchCapacity(cell_capacity=8, candidate_capacity=16)
  slots = device.neighbor_slots(*args, **kw, capacity=few_cells)
  assert bool(slots.overflow) and int(slots.max_cell_count) == 81
  assert few_cells.grown(slots) == few_candidates  # candidates seen through 8-atom bins are a lower bound
  slots, fitted = device.fit_neighbor_slots(*args, **kw, capacity=few_cells)  # two reallocations
  assert fitted == PERIODIC["capacity"]
  assert_same_as_host(graph, beyond, slots, PERIODIC["pbc"])


def test_overlapping_and_nonfinite_atoms_are_reported():
  molecule = ase.build.molecule("CH3CH2OH")
  graph, _ = graph_from_atoms([molecule], CUTOFF, 12, num_atoms=64, num_graphs=3)
  positions = np.asarray(graph.positions).copy()
  positions[4] = positions[2] + [0.05, 0.0, 0.0]
  kw = dict(pbc=FREE["pbc"], cutoff=CUTOFF, max_neighbors=12, num_graphs=3, capacity=FREE["capacity"])
  args = (graph.cell, graph.atom_mask, graph.graph_index)
  slots = device.neighbor_slots(jnp.asarray(positions), *args, **kw)
  assert int(slots.num_close) == 2 and sorted(np.asarray(slots.closest_pair).tolist()) == [2, 4]
  assert abs(float(slots.min_distance) - 0.05) < 1e-5
  with pytest.raises(ValueError, match="atoms [24] and [24] overlap"):
    device.fit_neighbor_slots(jnp.asarray(positions), *args, **kw)
  with pytest.raises(ValueError, match="overlap"):
    host.k_nearest_neighbors(positions[: len(molecule)], CUTOFF, 12)
  positions[3] = np.nan
  slots = device.neighbor_slots(jnp.asarray(positions), *args, **kw)
  assert bool(slots.nonfinite) and not np.asarray(slots.mask)[3].any()
  with pytest.raises(ValueError, match="not finite"):
    device.fit_neighbor_slots(jnp.asarray(positions), *args, **kw)


def test_the_report_vector_carries_every_report_field():
  """``DeviceSlots.report`` packs the build's report into one int32 vector (one transfer for the device path);
  ``from_report`` gives back each field exactly, the float32 closest distance included, for an overflowing
  periodic build and a molecule with overlapping atoms."""
  water = [water_box(3, seed=0)]
  graph, _ = graph_from_atoms(water, CUTOFF, PERIODIC["max_neighbors"], num_atoms=208, num_graphs=3)
  kw = dict(pbc=PERIODIC["pbc"], cutoff=CUTOFF, max_neighbors=PERIODIC["max_neighbors"], num_graphs=3)
  args = (graph.positions, graph.cell, graph.atom_mask, graph.graph_index)
  overflowing = device.neighbor_slots(*args, **kw, capacity=device.SearchCapacity(8, 16))
  graph, _ = graph_from_atoms([ase.build.molecule("CH3CH2OH")], CUTOFF, 12, num_atoms=64, num_graphs=3)
  positions = np.asarray(graph.positions).copy()
  positions[4] = positions[2] + [0.05, 0.0, 0.0]
  kw = dict(pbc=FREE["pbc"], cutoff=CUTOFF, max_neighbors=12, num_graphs=3, capacity=FREE["capacity"])
  overlapping = device.neighbor_slots(jnp.asarray(positions), graph.cell, graph.atom_mask, graph.graph_index, **kw)
  for slots in (overflowing, overlapping):
    unpacked = device.DeviceSlots.from_report(jax.jit(device.DeviceSlots.report)(slots))
    assert unpacked.neighbors is None and unpacked.mask is None and unpacked.shift is None
    for name, _ in device.DeviceSlots.REPORT:
      np.testing.assert_array_equal(getattr(unpacked, name), np.asarray(getattr(slots, name)), err_msg=name)
  assert bool(overflowing.overflow) and int(overlapping.num_close) == 2


def test_static_limits_raise_clear_errors():
  too_many = jax.ShapeDtypeStruct((device.MAX_ATOMS + 1, 3), jnp.float32)
  with pytest.raises(ValueError, match="int32 limit"):
    jax.eval_shape(lambda p: device.neighbor_slots(p, cutoff=CUTOFF, max_neighbors=4), too_many)
  with pytest.raises(ValueError, match="needs a cell"):
    device.neighbor_slots(jnp.zeros((4, 3)), pbc=(True, True, False), cutoff=CUTOFF, max_neighbors=4)
  with pytest.raises(ValueError, match="span a zero"):
    host.lattice_basis(np.diag([3.0, 0.0, 3.0]), (True, True, False))
