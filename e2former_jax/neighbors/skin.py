"""On-device neighbour lists for MD: a Verlet candidate buffer, and the K nearest slots of every step.

Two levels, as in most MD codes:

1. A *candidate buffer* ``[N, capacity]`` of (source atom, integer lattice image) pairs within
   ``cutoff + skin``, rebuilt on the device whenever an atom has moved more than ``skin / 2`` since the last
   build. It comes from an all-pairs search (molecules and small periodic cells, any number of images) or a
   cell list (periodic cells at least three cells of ``cutoff + skin`` wide along every lattice vector). Both
   buffers have a fixed capacity (candidates per atom; atoms per cell); a build that would need more sets the
   ``overflow`` flag instead of dropping pairs, and the driver reallocates a larger buffer and recompiles.
2. The *slots* of each step: the K nearest candidates within ``cutoff``, the same slots that the host builder
   ``e2former_jax.graph.graph_from_atoms`` gives (K-truncation is part of the model's definition); the number
   of in-cutoff pairs beyond K is counted.

Positions are never wrapped: a pair's image offset is an integer lattice vector ``S`` with the source at
``positions[j] + S @ cell``, like the host builder's ``neighbor_shift``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import vesin

from e2former_jax.neighbors.host import MIN_DISTANCE

METHODS = ("auto", "all_pairs", "cell_list")
GROWTH = 1.25  # reallocation factor over the largest count seen


@dataclasses.dataclass(frozen=True)
class NeighborListSpec:
  """Static description of a neighbour list (hashable: it is a static argument of the jitted MD chunk).

  Attributes:
    cutoff: model cutoff (Angstrom).
    max_neighbors: K slots per atom.
    skin: Verlet skin (Angstrom); candidates are searched within ``cutoff + skin``.
    capacity: candidate slots per atom.
    method: "all_pairs" or "cell_list".
    images: integer image offsets added to the minimum image in the all-pairs search ([[0, 0, 0]] for
      molecules).
    grid: cells along each lattice vector (cell list only).
    cell_capacity: atom slots per cell (cell list only).
  """

  cutoff: float
  max_neighbors: int
  skin: float
  capacity: int
  method: str
  images: tuple[tuple[int, int, int], ...] = ((0, 0, 0),)
  grid: tuple[int, int, int] = (1, 1, 1)
  cell_capacity: int = 0

  @property
  def search_radius(self) -> float:
    return self.cutoff + self.skin


@flax.struct.dataclass
class NeighborState:
  """Candidate buffer and bookkeeping (a pytree carried through the MD scan).

  Attributes:
    candidates: [N, capacity] int32 source atom of each candidate (the padding atom N - 1 for empty ones).
    candidate_image: [N, capacity, 3] int32 lattice image of each candidate.
    candidate_mask: [N, capacity] bool.
    reference: [N, 3] positions at the last build.
    overflow: bool, some build needed more candidate or cell slots than allocated (results since are invalid).
    max_candidates: int32, the largest candidate count of one atom seen at any build.
    max_cell_count: int32, the largest atom count of one cell seen at any build (cell list).
    builds: int32, number of builds.
    too_close: bool, two atoms came closer than ``MIN_DISTANCE`` at some step.
  """

  candidates: jax.Array
  candidate_image: jax.Array
  candidate_mask: jax.Array
  reference: jax.Array
  overflow: jax.Array
  max_candidates: jax.Array
  max_cell_count: jax.Array
  builds: jax.Array
  too_close: jax.Array


def _perpendicular_widths(cell: np.ndarray) -> np.ndarray:
  """Distance between opposite faces of the cell, along each lattice vector's reciprocal direction."""
  return 1.0 / np.linalg.norm(np.linalg.inv(cell).T, axis=1)


def _image_offsets(cell: np.ndarray, radius: float) -> tuple[tuple[int, int, int], ...]:
  """Integer offsets n with |f + n| <= radius / width possible for a minimum-image fraction |f| <= 1/2."""
  reach = [int(math.floor(radius / w + 0.5)) for w in _perpendicular_widths(cell)]
  ranges = [range(-m, m + 1) for m in reach]
  return tuple(itertools.product(*ranges))


def _grid(cell: np.ndarray, radius: float) -> tuple[int, int, int]:
  return tuple(int(w // radius) for w in _perpendicular_widths(cell))


def _cell_ids(frac: np.ndarray, grid) -> np.ndarray:
  g = np.asarray(grid)
  idx = np.clip(np.floor((frac - np.floor(frac)) * g).astype(np.int64), 0, g - 1)
  return (idx[:, 0] * g[1] + idx[:, 1]) * g[2] + idx[:, 2]


def plan(
  positions: np.ndarray,
  cell: np.ndarray | None,
  pbc,
  cutoff: float,
  max_neighbors: int,
  skin: float = 0.5,
  method: str = "auto",
  capacity: int | None = None,
  cell_capacity: int | None = None,
) -> NeighborListSpec:
  """Chooses the search method and sizes the buffers from the current positions (on the host).

  Args:
    positions: [n, 3] real atoms (Angstrom).
    cell: [3, 3] lattice vectors as rows, or None for a molecule.
    pbc: three booleans, all True or all False.
    cutoff: model cutoff; max_neighbors: K.
    skin: Verlet skin (Angstrom).
    method: "auto" (cell list when every axis holds at least three cells, else all pairs), "all_pairs" or
      "cell_list".
    capacity: candidate slots per atom; default: the largest current count times ``GROWTH`` plus 8 (at
      least K).
    cell_capacity: atom slots per cell; default likewise from the current occupancy.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  positions = np.asarray(positions, np.float64)
  pbc = np.broadcast_to(np.asarray(pbc, bool), (3,))
  if pbc.any() and not pbc.all():
    raise ValueError("mixed periodicity is not supported: pbc must be all True or all False")
  periodic = bool(pbc.all())
  radius = cutoff + skin
  box = np.asarray(cell, np.float64).reshape(3, 3) if periodic else np.zeros((3, 3))
  if periodic and abs(np.linalg.det(box)) < 1e-8:
    raise ValueError("a periodic structure needs a cell with non-zero volume")
  grid = _grid(box, radius) if periodic else (1, 1, 1)
  if method == "auto":
    method = "cell_list" if periodic and min(grid) >= 3 else "all_pairs"
  if method == "cell_list" and (not periodic or min(grid) < 3):
    raise ValueError(
      f"the cell list needs a periodic cell at least 3 x {radius} A wide along every lattice "
      f"vector (grid {grid}); use method='all_pairs'"
    )
  if capacity is None:
    i, _ = vesin.NeighborList(cutoff=radius, full_list=True).compute(
      points=positions, box=box, periodic=periodic, quantities="ij"
    )
    most = int(np.bincount(np.asarray(i, np.int64), minlength=len(positions)).max()) if len(i) else 0
    capacity = int(most * GROWTH) + 8
  capacity = max(int(capacity), max_neighbors)
  images = _image_offsets(box, radius) if periodic and method == "all_pairs" else ((0, 0, 0),)
  if method == "cell_list":
    if cell_capacity is None:
      frac = positions @ np.linalg.inv(box)
      counts = np.bincount(_cell_ids(frac, grid), minlength=int(np.prod(grid)))
      cell_capacity = int(counts.max() * GROWTH) + 4
    cell_capacity = int(cell_capacity)
  else:
    grid, cell_capacity = (1, 1, 1), 0
  return NeighborListSpec(
    cutoff=float(cutoff),
    max_neighbors=int(max_neighbors),
    skin=float(skin),
    capacity=capacity,
    method=method,
    images=images,
    grid=tuple(grid),
    cell_capacity=cell_capacity,
  )


def grown(spec: NeighborListSpec, state: NeighborState) -> NeighborListSpec:
  """A larger spec after an overflow, sized from the counts the overflowing build saw."""
  capacity = max(spec.capacity, int(int(state.max_candidates) * GROWTH) + 8)
  if capacity == spec.capacity:
    capacity = int(spec.capacity * 2)
  cell_capacity = spec.cell_capacity
  if spec.method == "cell_list" and int(state.max_cell_count) > spec.cell_capacity:
    cell_capacity = int(int(state.max_cell_count) * GROWTH) + 4
    # Candidate counts seen with a full cell table are lower bounds; let them grow with the cells.
    capacity = max(capacity, int(spec.capacity * cell_capacity / spec.cell_capacity))
  return dataclasses.replace(spec, capacity=capacity, cell_capacity=cell_capacity)


def empty_state(spec: NeighborListSpec, num_atoms: int, dtype) -> NeighborState:
  """A state that forces a build at the first update."""
  return NeighborState(
    candidates=jnp.full((num_atoms, spec.capacity), num_atoms - 1, jnp.int32),
    candidate_image=jnp.zeros((num_atoms, spec.capacity, 3), jnp.int32),
    candidate_mask=jnp.zeros((num_atoms, spec.capacity), bool),
    reference=jnp.full((num_atoms, 3), jnp.inf, dtype),
    overflow=jnp.zeros((), bool),
    max_candidates=jnp.zeros((), jnp.int32),
    max_cell_count=jnp.zeros((), jnp.int32),
    builds=jnp.zeros((), jnp.int32),
    too_close=jnp.zeros((), bool),
  )


def _compact(within: jax.Array, capacity: int, *values: jax.Array):
  """Moves the True entries of each row of ``within`` [N, M] to the front of [N, capacity] buffers.

  Returns the per-row counts and, for each of ``values`` ([N, M, ...]), the compacted buffer (zeros after the
  count; entries past ``capacity`` are dropped, and the caller flags the overflow).
  """
  n, m = within.shape
  slot = jnp.where(within, jnp.cumsum(within, axis=1) - 1, capacity)
  rows = jnp.broadcast_to(jnp.arange(n)[:, None], (n, m))
  out = []
  for v in values:
    buf = jnp.zeros((n, capacity) + v.shape[2:], v.dtype)
    out.append(buf.at[rows, slot].set(v, mode="drop"))
  return jnp.sum(within, axis=1, dtype=jnp.int32), out


def _all_pairs(spec: NeighborListSpec, positions, cell, atom_mask, periodic: bool):
  """Every (j, image) pair within the search radius: [N, N * M] candidates."""
  n = positions.shape[0]
  diff = positions[None, :, :] - positions[:, None, :]  # [N, N, 3] positions[j] - positions[i]
  if periodic:
    inverse = jnp.linalg.inv(cell)
    base = -jnp.round(diff @ inverse)  # minimum image, [N, N, 3]
    offsets = jnp.asarray(spec.images, positions.dtype)
    image = base[:, :, None, :] + offsets[None, None]  # [N, N, M, 3]
    vectors = diff[:, :, None, :] + image @ cell
  else:
    image = jnp.zeros((n, n, 1, 3), positions.dtype)
    vectors = diff[:, :, None, :]
  m = image.shape[2]
  d2 = jnp.sum(vectors**2, axis=-1)  # [N, N, M]
  source = jnp.broadcast_to(jnp.arange(n)[None, :, None], (n, n, m))
  is_self = (source == jnp.arange(n)[:, None, None]) & jnp.all(image == 0, axis=-1)
  pair_ok = atom_mask[:, None, None] & atom_mask[None, :, None] & ~is_self
  within = pair_ok & (d2 < spec.search_radius**2)
  return (
    within.reshape(n, n * m),
    source.reshape(n, n * m),
    image.reshape(n, n * m, 3).astype(jnp.int32),
    jnp.zeros((), jnp.int32),
  )


def _cell_list(spec: NeighborListSpec, positions, cell, atom_mask):
  """Candidates from the 27 cells around each atom's cell: [N, 27 * cell_capacity]."""
  n = positions.shape[0]
  grid = jnp.asarray(spec.grid, jnp.int32)
  num_cells = int(np.prod(spec.grid))
  frac = positions @ jnp.linalg.inv(cell)
  floor = jnp.floor(frac)
  index3 = jnp.clip(jnp.floor((frac - floor) * grid).astype(jnp.int32), 0, grid - 1)
  flat = lambda idx: (idx[..., 0] * grid[1] + idx[..., 1]) * grid[2] + idx[..., 2]
  cell_id = jnp.where(atom_mask, flat(index3), num_cells)  # padding atoms go to a dump cell
  order = jnp.argsort(cell_id, stable=True)
  sorted_id = cell_id[order]
  counts = jax.ops.segment_sum(jnp.ones(n, jnp.int32), cell_id, num_cells + 1)
  starts = jnp.cumsum(counts) - counts
  rank = jnp.arange(n) - starts[sorted_id]
  table = jnp.full((num_cells + 1, spec.cell_capacity), n - 1, jnp.int32)
  table = table.at[sorted_id, rank].set(order.astype(jnp.int32), mode="drop")
  filled = jnp.zeros((num_cells + 1, spec.cell_capacity), bool).at[sorted_id, rank].set(True, mode="drop")
  max_cell = jnp.max(counts[:num_cells])

  offsets = jnp.asarray(list(itertools.product((-1, 0, 1), repeat=3)), jnp.int32)  # [27, 3]
  around = index3[:, None, :] + offsets[None]  # [N, 27, 3]
  wrap = jnp.floor_divide(around, grid)  # -1, 0 or 1 lattice vectors crossed
  neighbour_cell = flat(around - wrap * grid)
  source = table[neighbour_cell].reshape(n, -1)  # [N, 27 * cap]
  present = filled[neighbour_cell].reshape(n, -1)
  cap = spec.cell_capacity
  shift = jnp.repeat(wrap, cap, axis=1)  # [N, 27 * cap, 3]
  image = shift + floor[:, None, :].astype(jnp.int32) - floor[source].astype(jnp.int32)
  vectors = positions[source] + image.astype(positions.dtype) @ cell - positions[:, None, :]
  d2 = jnp.sum(vectors**2, axis=-1)
  is_self = (source == jnp.arange(n)[:, None]) & jnp.all(image == 0, axis=-1)
  within = present & atom_mask[:, None] & ~is_self & (d2 < spec.search_radius**2)
  return within, source, image, max_cell


def build(
  spec: NeighborListSpec,
  state: NeighborState,
  positions: jax.Array,
  cell: jax.Array,
  atom_mask: jax.Array,
  periodic: bool,
) -> NeighborState:
  """Rebuilds the candidate buffer at ``positions`` (traceable; flags overflow instead of dropping pairs)."""
  if spec.method == "cell_list":
    within, source, image, max_cell = _cell_list(spec, positions, cell, atom_mask)
    cell_overflow = max_cell > spec.cell_capacity
  else:
    within, source, image, max_cell = _all_pairs(spec, positions, cell, atom_mask, periodic)
    cell_overflow = jnp.zeros((), bool)
  counts, (candidates, candidate_image, candidate_mask) = _compact(within, spec.capacity, source, image, within)
  n = positions.shape[0]
  most = jnp.max(counts)
  return NeighborState(
    candidates=jnp.where(candidate_mask, candidates, n - 1).astype(jnp.int32),
    candidate_image=candidate_image,
    candidate_mask=candidate_mask,
    reference=positions,
    overflow=state.overflow | (most > spec.capacity) | cell_overflow,
    max_candidates=jnp.maximum(state.max_candidates, most),
    max_cell_count=jnp.maximum(state.max_cell_count, max_cell),
    builds=state.builds + 1,
    too_close=state.too_close,
  )


def update(
  spec: NeighborListSpec,
  state: NeighborState,
  positions: jax.Array,
  cell: jax.Array,
  atom_mask: jax.Array,
  periodic: bool,
) -> NeighborState:
  """Rebuilds when some real atom has moved more than skin / 2 since the last build (or never built)."""
  moved = jnp.sum((positions - state.reference) ** 2, axis=-1)
  stale = jnp.any(atom_mask & ~(moved <= (0.5 * spec.skin) ** 2))
  return jax.lax.cond(stale, lambda s: build(spec, s, positions, cell, atom_mask, periodic), lambda s: s, state)


def nearest_slots(spec: NeighborListSpec, state: NeighborState, positions: jax.Array, cell: jax.Array):
  """The K nearest candidates within the cutoff.

  Returns:
    neighbors [N, K] int32 (padding atom N - 1 in empty slots), mask [N, K], shift [N, K, 3] (Cartesian,
    ``S @ cell``, zero in empty slots), the number of in-cutoff pairs beyond K (int32), and the state with
    ``too_close`` updated.
  """
  n = positions.shape[0]
  shifts = state.candidate_image.astype(positions.dtype) @ cell  # [N, C, 3]
  vectors = positions[state.candidates] + shifts - positions[:, None, :]
  d2 = jnp.sum(vectors**2, axis=-1)
  inside = state.candidate_mask & (d2 <= spec.cutoff**2)
  key = jnp.where(inside, d2, jnp.inf)
  neg, slot = jax.lax.top_k(-key, spec.max_neighbors)
  mask = jnp.isfinite(neg)
  neighbors = jnp.where(mask, jnp.take_along_axis(state.candidates, slot, axis=1), n - 1)
  shift = jnp.where(mask[..., None], jnp.take_along_axis(shifts, slot[..., None], axis=1), 0.0)
  beyond = jnp.sum(jnp.maximum(jnp.sum(inside, axis=1) - spec.max_neighbors, 0))
  close = jnp.any(inside & (d2 < MIN_DISTANCE**2))
  return (
    neighbors.astype(jnp.int32),
    mask,
    shift,
    beyond.astype(jnp.int32),
    state.replace(too_close=state.too_close | close),
  )
