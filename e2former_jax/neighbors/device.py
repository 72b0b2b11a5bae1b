"""Neighbour slots built on the device: an O(N) cell list with the host builder's K-nearest rule.

``neighbor_slots`` takes positions, a cell and static periodicity (free, periodic or mixed, e.g. slabs
``(True, True, False)``), optionally a batch of structures (a structure index per atom), and returns the K
nearest neighbours within the cutoff of every atom as ``DeviceSlots``: the arrays ``neighbors``, ``mask`` and
``shift`` of ``AtomGraph`` (``neighbors``, ``neighbor_mask``, ``neighbor_shift``), with the host builder's
kept set, slot order, padding and dropped-pair count (``e2former_jax.graph.graph_from_atoms``).

The search, per structure:

1. A grid of bins over a frame made of the periodic lattice vectors and, along free directions, unit vectors
   across them (``host.lattice_basis``). Along a periodic direction the bins split the cell; along a free one
   the bounding box of the structure's atoms. Every bin is at least ``cutoff`` thick, so an atom's neighbours
   lie in the bins next to its own. The number of bins is capped (``SearchCapacity.max_cells``, shared by the
   structures in proportion to their atoms) by coarsening the grid, so a sparse system costs no more memory
   than a dense one.
2. Atoms sorted by bin (``argsort``), bin start offsets from the counts. The search runs over atoms in bin
   order, so neighbouring rows read the same candidate bins.
3. A ``lax.scan`` over the stencil of bins around each atom's own: every stencil bin gives ``cell_capacity``
   candidates, and those within the cutoff are appended to the atom's buffer of ``candidate_capacity``
   (a Verlet list: every in-cutoff pair, not only K). A periodic direction thinner than the cutoff gets one
   bin and a stencil that reaches several lattice images (``SearchCapacity.reach``); every stencil step is a
   distinct (bin, image) pair, so no pair is found twice.
4. The K kept are the first K of the buffer in the host builder's order (``host.selection_order``: distance,
   then displacement, on the ``TIE_RESOLUTION`` grid; independent of the order of atoms in memory and of
   rounding far below the grid), put in slots by distance, equal distances by source atom and lattice image
   (``keep_nearest``, which the MD list ``neighbors.skin`` shares).

Capacities are static (they fix the shapes), so a build that needs more than it was given does not drop pairs
silently: it sets ``overflow`` and reports what it needed (``max_cell_count``, ``max_candidates``,
``reach_needed``). ``fit_neighbor_slots`` (host side) retries with the next capacity bucket, so a caller
compiles a few programs, not one per size. A second, longer-range list is another call with its own cutoff
and K.

Indices are int32. The largest supported system has ``MAX_ATOMS`` atom slots; every index the search forms
(atom, bin, bin start plus slot, stencil step times cell capacity) stays below 2**31, and the total
dropped-pair count saturates at 2**31 - 1.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from e2former_jax.neighbors.host import MIN_DISTANCE, TIE_RESOLUTION

MAX_ATOMS = 2**30
MAX_CELLS = 2**30
INT32_MAX = 2**31 - 1
_THICKNESS_MARGIN = 1e-5  # bins are at least cutoff * (1 + margin) thick, so rounding never needs a wider stencil
_CAP_MARGIN = 1e-4  # the grid-cap coarsening aims this much below the cap, so rounding never exceeds it


def capacity_bucket(needed: int, smallest: int = 8) -> int:
  """Smallest bucket >= ``needed`` in 8, 12, 16, 24, 32, 48, ... (powers of two and 1.5 times them)."""
  bucket = smallest
  while bucket < needed:
    bucket = bucket * 3 // 2 if bucket & (bucket - 1) == 0 else bucket * 4 // 3
  return bucket


@dataclasses.dataclass(frozen=True)
class SearchCapacity:
  """Static sizes of the search (hashable: a static argument of the jitted build).

  Attributes:
    cell_capacity: atom slots per bin (candidates read per stencil bin).
    candidate_capacity: in-cutoff neighbours held per atom before the K nearest are chosen (all of them
      must fit, not only K).
    reach: stencil half-width in bins along each lattice vector (periodic directions; free ones use 1). More
      than 1 only for periodic directions thinner than the cutoff (several lattice images).
    max_cells: cap on the number of bins of the whole batch; None: the number of atom slots N.
  """

  cell_capacity: int = 32
  candidate_capacity: int = 64
  reach: tuple[int, int, int] = (1, 1, 1)
  max_cells: int | None = None

  def __post_init__(self):
    if self.cell_capacity < 1 or self.candidate_capacity < 1:
      raise ValueError(
        f"cell_capacity and candidate_capacity must be >= 1, got {self.cell_capacity}, {self.candidate_capacity}"
      )
    if len(self.reach) != 3 or min(self.reach) < 1:
      raise ValueError(f"reach must be three integers >= 1, got {self.reach}")
    if self.max_cells is not None and not 1 <= self.max_cells <= MAX_CELLS:
      raise ValueError(f"max_cells must be between 1 and {MAX_CELLS}, got {self.max_cells}")

  def grown(self, slots: DeviceSlots, headroom: float = 1.0) -> SearchCapacity:
    """The capacity that fits ``headroom`` times what a build reported, in buckets, never smaller than this
    one (host side; reads device scalars). ``slots``: a ``DeviceSlots`` or anything with its
    ``max_cell_count``, ``max_candidates`` and ``reach_needed`` (the MD list's state)."""
    cells, candidates = int(slots.max_cell_count), int(slots.max_candidates)
    reach = tuple(max(r, int(x)) for r, x in zip(self.reach, np.asarray(slots.reach_needed), strict=True))
    return dataclasses.replace(
      self,
      cell_capacity=max(self.cell_capacity, capacity_bucket(math.ceil(headroom * cells))),
      candidate_capacity=max(self.candidate_capacity, capacity_bucket(math.ceil(headroom * candidates))),
      reach=reach,
    )


@flax.struct.dataclass
class DeviceSlots:
  """Neighbour slots of N atom slots and what the build needed.

  Attributes:
    neighbors: [N, K] int32 source atom of each slot (``N - 1``, the padding atom of an ``AtomGraph``, in
      empty slots).
    mask: [N, K] bool, slot holds a neighbour within the cutoff.
    shift: [N, K, 3] Angstrom, Cartesian image offset: the source sits at positions[neighbors] + shift
      (zero in empty slots).
    num_dropped: int32, in-cutoff pairs beyond K over all atoms (saturates at 2**31 - 1).
    min_distance: distance of the closest in-cutoff pair (Angstrom; inf when there is none).
    closest_pair: [2] int32 (target, source) of that pair.
    num_close: int32, ordered pairs closer than ``MIN_DISTANCE`` (overlapping atoms; the host builder raises).
    nonfinite: bool, some real atom has a NaN or inf coordinate (such atoms get no neighbours).
    degenerate_cell: bool, the periodic lattice vectors of some structure span no length, area or volume.
    max_cell_count: int32, atoms in the fullest bin.
    max_candidates: int32, the most candidates of one atom (those within the cutoff plus a bound on float
      rounding, about 1e-4 A for coordinates of 50 A in float32; the buffer is then filtered exactly).
    reach_needed: [3] int32, stencil half-width needed along each direction.
    overflow: bool, some capacity was too small: the slots may be incomplete; rebuild with ``capacity.grown``.
  """

  neighbors: jax.Array
  mask: jax.Array
  shift: jax.Array
  num_dropped: jax.Array
  min_distance: jax.Array
  closest_pair: jax.Array
  num_close: jax.Array
  nonfinite: jax.Array
  degenerate_cell: jax.Array
  max_cell_count: jax.Array
  max_candidates: jax.Array
  reach_needed: jax.Array
  overflow: jax.Array

  REPORT = (  # the report fields (every field but the slots) and their sizes, in the order ``report`` packs them
    ("num_dropped", 1),
    ("min_distance", 1),
    ("closest_pair", 2),
    ("num_close", 1),
    ("nonfinite", 1),
    ("degenerate_cell", 1),
    ("max_cell_count", 1),
    ("max_candidates", 1),
    ("reach_needed", 3),
    ("overflow", 1),
  )

  def report(self) -> jax.Array:
    """The ``REPORT`` fields as one int32 vector [13], so a caller fetches them in one transfer instead of ten;
    ``min_distance`` travels as the bits of its float32 value."""
    parts = []
    for name, _ in self.REPORT:
      x = getattr(self, name)
      if name == "min_distance":
        x = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
      parts.append(jnp.ravel(x).astype(jnp.int32))
    return jnp.concatenate(parts)

  @classmethod
  def from_report(cls, report) -> DeviceSlots:
    """The ``REPORT`` fields of ``report()``'s vector as host numpy values (flags as 0 or 1; the slots None)."""
    report, fields, start = np.asarray(report, np.int32), {}, 0
    for name, size in cls.REPORT:
      part = report[start : start + size]
      part = part.view(np.float32) if name == "min_distance" else part
      fields[name] = part if size > 1 else part[0]
      start += size
    return cls(neighbors=None, mask=None, shift=None, **fields)


def _lattice_basis(cell: jax.Array, pbc: tuple[bool, bool, bool]) -> tuple[jax.Array, jax.Array]:
  """[G, 3, 3] frames (periodic lattice vectors; unit vectors across them along free directions, as in
  ``host.lattice_basis``) and [G] the length, area or volume the periodic vectors span (1 if none)."""
  periodic = [d for d in range(3) if pbc[d]]
  rows = [cell[:, d] for d in periodic]
  unit = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)
  if len(rows) == 0:
    free, measure = [jnp.broadcast_to(jnp.eye(3, dtype=cell.dtype)[d], cell[:, 0].shape) for d in range(3)], 1.0
  elif len(rows) == 1:
    a = unit(rows[0])
    u = unit(jnp.cross(a, jnp.eye(3, dtype=cell.dtype)[jnp.argmin(jnp.abs(a), axis=-1)]))
    free, measure = [u, jnp.cross(a, u)], jnp.linalg.norm(rows[0], axis=-1)
  elif len(rows) == 2:
    normal = jnp.cross(rows[0], rows[1])
    free, measure = [unit(normal)], jnp.linalg.norm(normal, axis=-1)
  else:
    free, measure = [], jnp.abs(jnp.linalg.det(cell))
  ordered, p, f = [], iter(rows), iter(free)
  for d in range(3):
    ordered.append(next(p) if pbc[d] else next(f))
  return jnp.stack(ordered, axis=1), jnp.broadcast_to(measure, cell.shape[:1])


def _grid_shape(extent: jax.Array, cutoff: float, cap: jax.Array) -> jax.Array:
  """[G, 3] bins per direction: as many bins of at least ``cutoff`` as fit in ``extent`` [G, 3] (Angstrom),
  coarsened so that a structure has at most ``cap`` [G] bins."""
  x = jnp.maximum(extent / (cutoff * (1 + _THICKNESS_MARGIN)), 1.0)
  # The smallest coarsening f with prod(max(1, x / f)) <= cap: f = (product of the k largest x / cap)^(1/k) for
  # the k directions that stay split; the largest of the three candidates is enough.
  largest = jnp.cumprod(-jnp.sort(-x, axis=-1), axis=-1)
  k = jnp.arange(1, 4, dtype=x.dtype)
  f = jnp.max((largest / (cap[:, None] * (1 - _CAP_MARGIN))) ** (1 / k), axis=-1)
  f = jnp.maximum(f, 1.0)
  return jnp.maximum(jnp.floor(x / f[:, None]), 1).astype(jnp.int32)


def _times(vectors: jax.Array, basis: jax.Array) -> jax.Array:
  """vectors @ basis for [..., 3] rows and broadcastable [..., 3, 3] frames (elementwise: fuses on every backend)."""
  return (
    vectors[..., 0:1] * basis[..., 0, :] + vectors[..., 1:2] * basis[..., 1, :] + vectors[..., 2:3] * basis[..., 2, :]
  )


def _norm2(vectors: jax.Array) -> jax.Array:
  return vectors[..., 0] ** 2 + vectors[..., 1] ** 2 + vectors[..., 2] ** 2


def _stencil(pbc, reach) -> np.ndarray:
  """[S, 3] integer bin offsets: -reach..reach along periodic directions, -1..1 along free ones."""
  spans = [range(-r, r + 1) if p else range(-1, 2) for p, r in zip(pbc, reach, strict=True)]
  return np.asarray(list(itertools.product(*spans)), np.int32)


def _check_static(n: int, pbc, cutoff: float, max_neighbors: int, capacity: SearchCapacity, num_graphs: int):
  if n > MAX_ATOMS:
    raise ValueError(f"{n} atom slots exceed the device neighbour search's int32 limit of {MAX_ATOMS} (MAX_ATOMS)")
  if n < 1:
    raise ValueError("the device neighbour search needs at least one atom slot")
  if len(pbc) != 3:
    raise ValueError(f"pbc must be three booleans, got {pbc!r}")
  if not cutoff > 0 or not math.isfinite(cutoff):
    raise ValueError(f"cutoff must be a positive number of Angstrom, got {cutoff!r}")
  if max_neighbors < 1:
    raise ValueError(f"max_neighbors must be >= 1, got {max_neighbors}")
  if num_graphs < 1:
    raise ValueError(f"num_graphs must be >= 1, got {num_graphs}")
  if (capacity.max_cells or n) + num_graphs > MAX_CELLS:
    raise ValueError(f"max_cells + num_graphs must not exceed {MAX_CELLS}")
  if len(_stencil(pbc, capacity.reach)) * capacity.cell_capacity > INT32_MAX:
    raise ValueError(f"stencil bins x cell_capacity exceed int32 ({capacity})")


class _Bins(NamedTuple):
  """Atoms sorted by bin. Per atom in bin order (the rows of the search): ``position`` [N, 3], ``wrap`` [N, 3]
  lattice vectors back to the home cell (integers as floats), ``wrapped`` [N, 3] = position - wrap @ basis,
  ``home`` [N, 3] bin coordinates, ``graph``, ``real``, ``atom`` (index in the input) [N]. Per bin (one more,
  holding the padding atoms): ``starts``, ``counts``. Per structure: ``shape`` [G, 3] bins per direction,
  ``offset`` [G] first bin, ``basis`` [G, 3, 3] frame. ``rounding`` bounds the float error of ``wrapped``
  differences (Angstrom)."""

  position: jax.Array
  wrap: jax.Array
  wrapped: jax.Array
  home: jax.Array
  graph: jax.Array
  real: jax.Array
  atom: jax.Array
  starts: jax.Array
  counts: jax.Array
  shape: jax.Array
  offset: jax.Array
  basis: jax.Array
  reach_needed: jax.Array
  degenerate: jax.Array
  rounding: jax.Array


def _flat_bin(shape, offset, idx):
  return offset + (idx[..., 0] * shape[..., 1] + idx[..., 1]) * shape[..., 2] + idx[..., 2]


def _bin_atoms(pos, real, g, cell, *, pbc, cutoff, num_graphs, max_cells) -> _Bins:
  """Grids every structure (periodic directions: the cell; free ones: the atoms' bounding box; at most
  ``max_cells`` bins in all, shared in proportion to atoms) and sorts the atoms by bin."""
  n, dtype = pos.shape[0], pos.dtype
  pbc_v = jnp.asarray(pbc)
  basis, measure = _lattice_basis(cell.astype(dtype), pbc)  # [G, 3, 3], [G]
  atoms_per_graph = jax.ops.segment_sum(real.astype(jnp.int32), g, num_graphs)
  has_atoms = (atoms_per_graph > 0)[:, None]
  usable = measure >= 1e-8
  basis = jnp.where(usable[:, None, None], basis, jnp.eye(3, dtype=dtype))  # degenerate: flagged, then ignored
  inverse = jnp.linalg.inv(basis)
  frac = _times(pos, inverse[g])  # periodic: lattice fractions; free: Angstrom
  wrap = jnp.where(pbc_v, jnp.floor(frac), 0.0)  # lattice vectors back to the home cell
  local = frac - wrap

  # Extent along each direction: the cell's thickness (periodic) or the atoms' bounding box (free).
  thickness = 1.0 / jnp.linalg.norm(inverse, axis=1)  # [G, 3] distance between opposite faces
  low = jax.ops.segment_min(jnp.where(real[:, None], local, jnp.inf), g, num_graphs)
  high = jax.ops.segment_max(jnp.where(real[:, None], local, -jnp.inf), g, num_graphs)
  low = jnp.where(has_atoms, low, 0.0)
  extent = jnp.where(pbc_v, thickness, jnp.where(has_atoms, high - low, 0.0))
  share = atoms_per_graph.astype(jnp.float32) / jnp.maximum(jnp.sum(atoms_per_graph), 1).astype(jnp.float32)
  cap = jnp.maximum(jnp.floor(max_cells * share * (1 - 1e-6)), 1.0)
  shape = _grid_shape(extent, cutoff, cap)  # [G, 3]
  sizes = jnp.prod(shape, axis=-1)
  offset = jnp.cumsum(sizes) - sizes
  num_bins = max_cells + num_graphs  # static bound on sum(sizes); bin num_bins holds the padding atoms

  width = jnp.where(pbc_v, 1.0 / shape, jnp.maximum(extent / shape, cutoff))  # bin size in frame units
  home = jnp.floor((local - jnp.where(pbc_v, 0.0, low[g])) / width[g]).astype(jnp.int32)
  home = jnp.clip(home, 0, shape[g] - 1)
  reach_needed = jnp.where(pbc_v, jnp.ceil(cutoff * shape / extent), 1).astype(jnp.int32)
  bin_id = jnp.where(real, _flat_bin(shape[g], offset[g], home), num_bins)
  order = jnp.argsort(bin_id, stable=True).astype(jnp.int32)
  counts = jax.ops.segment_sum(jnp.ones(n, jnp.int32), bin_id, num_bins + 1)
  offset_home = _times(wrap, basis[g])
  wrapped = pos - offset_home
  # Each of pos, wrap @ basis and their difference is rounded to half an ulp of the largest magnitude; a
  # difference of two wrapped positions plus an image offset adds a few more (generous factor 16).
  magnitude = jnp.max(jnp.where(real[:, None], jnp.abs(pos) + jnp.abs(offset_home), 0.0))
  rounding = 16 * jnp.finfo(dtype).eps * (magnitude + jnp.max(jnp.abs(basis)) * (jnp.max(jnp.abs(wrap)) + 4))
  return _Bins(
    position=pos[order],
    wrap=wrap[order],
    wrapped=wrapped[order],
    home=home[order],
    graph=g[order],
    real=real[order],
    atom=order,
    starts=jnp.cumsum(counts) - counts,
    counts=counts,
    shape=shape,
    offset=offset,
    basis=basis,
    reach_needed=jnp.max(jnp.where(has_atoms, reach_needed, 1), axis=0),
    degenerate=jnp.any(has_atoms[:, 0] & ~usable),
    rounding=rounding,
  )


def keep_nearest(d2, vector, within, atom, lattice, k: int):
  """The K kept of every row's candidates by the host builder's rule, in slots (jittable; shared with the MD
  list, ``neighbors.skin``).

  The K kept are the first K in ``host.selection_order`` (distance, then displacement, on the
  ``TIE_RESOLUTION`` grid); the slots hold them by distance, then source atom, then lattice image.

  Args:
    d2: [N, M] squared distances (Angstrom^2), inf where not ``within``.
    vector: [N, M, 3] displacement from the target to the candidate's image (Angstrom).
    within: [N, M] bool, candidate within the cutoff.
    atom: [N, M] int32 source atom of each candidate.
    lattice: [N, M, 3] int32 lattice image of each candidate.
    k: K slots.

  Returns:
    d2 [N, K] (inf in empty slots), atom [N, K] and lattice [N, K, 3] of the slots.
  """
  n, m = d2.shape
  qd = jnp.where(within, jnp.round(jnp.sqrt(d2) / TIE_RESOLUTION), INT32_MAX).astype(jnp.int32)
  qv = jnp.round(vector / TIE_RESOLUTION).astype(jnp.int32)
  entry = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (n, m))
  *_, chosen = jax.lax.sort((qd, qv[..., 0], qv[..., 1], qv[..., 2], entry), dimension=1, num_keys=4)
  chosen = chosen[:, : min(k, m)]
  d2_k = jnp.take_along_axis(d2, chosen, axis=1)
  atom_k = jnp.take_along_axis(atom, chosen, axis=1)
  lattice_k = jnp.take_along_axis(lattice, chosen[..., None], axis=1)
  keys = (d2_k, atom_k, lattice_k[..., 0], lattice_k[..., 1], lattice_k[..., 2])
  d2_k, atom_k, *lattice_k = jax.lax.sort(keys, dimension=1, num_keys=5)
  if m < k:  # fewer candidates than slots: the rest stay empty
    pad = lambda x, v: jnp.pad(x, ((0, 0), (0, k - m)), constant_values=v)
    d2_k, atom_k, lattice_k = pad(d2_k, jnp.inf), pad(atom_k, 0), [pad(x, 0) for x in lattice_k]
  return d2_k, atom_k, jnp.stack(lattice_k, axis=-1)


@functools.partial(jax.jit, static_argnames=("pbc", "cutoff", "max_neighbors", "num_graphs", "capacity"))
def _neighbor_slots(positions, cell, atom_mask, graph_index, *, pbc, cutoff, max_neighbors, num_graphs, capacity):
  n, dtype = positions.shape[0], positions.dtype
  k, c, m = max_neighbors, capacity.cell_capacity, capacity.candidate_capacity
  pbc_v = jnp.asarray(pbc)
  finite = jnp.all(jnp.isfinite(positions), axis=-1)
  real = atom_mask & finite
  pos = jnp.where(real[:, None], positions, 0.0)
  g = jnp.clip(graph_index, 0, num_graphs - 1)
  bins = _bin_atoms(
    pos, real, g, cell, pbc=pbc, cutoff=cutoff, num_graphs=num_graphs, max_cells=capacity.max_cells or n
  )
  # Rows are atoms in bin order: the targets of neighbouring rows read the same candidate bins.
  shape, offset, basis = bins.shape[bins.graph], bins.offset[bins.graph], bins.basis[bins.graph]
  row = jnp.arange(n, dtype=jnp.int32)
  stencil = jnp.asarray(_stencil(pbc, capacity.reach))  # [S, 3]
  periodic = [d for d in range(3) if pbc[d]]

  def stencil_bin(step):
    """The bins ``step`` [N, ..., 3] away from every row's own: whether each exists, its index and the
    integer lattice image [N, ..., 3] it lies in (periodic directions wrap around)."""
    lead = (n,) + (1,) * (step.ndim - 2)
    per_row = lambda x: x.reshape(lead + x.shape[1:])
    around = per_row(bins.home) + step
    image = jnp.where(pbc_v, jnp.floor_divide(around, per_row(shape)), 0)
    around = around - image * per_row(shape)
    inside = per_row(bins.real) & jnp.all((around >= 0) & (around < per_row(shape)), axis=-1)
    b = jnp.where(inside, _flat_bin(per_row(shape), per_row(offset), around), bins.counts.size - 1)
    return inside, b, image

  # The scan compares wrapped positions: candidate minus target wrapped position plus the bin's image offset,
  # a few ulps of the coordinates off the exact vector, so it keeps pairs within cutoff + rounding; the buffer
  # is then filtered with the exact vectors.
  slot = jnp.arange(c, dtype=jnp.int32)
  reach2 = (cutoff * (1 + _THICKNESS_MARGIN) + bins.rounding) ** 2
  wrapped = jnp.concatenate([bins.wrapped, jnp.zeros((c, 3), dtype)])  # a bin's slots: rows start .. start + c
  read_bin = jax.vmap(lambda start: jax.lax.dynamic_slice_in_dim(wrapped, start, c))  # [N] -> [N, c, 3]

  def visit(carry, s):
    code, count = carry
    inside, b, image = stencil_bin(jnp.broadcast_to(stencil[s], (n, 1, 3)))
    start, filled = bins.starts[b[:, 0]], jnp.where(inside[:, 0], bins.counts[b[:, 0]], 0)
    # The atom itself, unless the bin is a periodic image (free directions never are: no constant to fold).
    own_image = jnp.all(image[:, 0, periodic] == 0, axis=-1) if periodic else jnp.ones(n, bool)
    self_slot = jnp.where(own_image, row - start, -1)
    offset_vector = _times(image[:, 0].astype(dtype), basis) - bins.wrapped
    # Per-row values are computed once, not again for every candidate inside the fused candidate loop.
    start, filled, self_slot, offset_vector = jax.lax.optimization_barrier((start, filled, self_slot, offset_vector))
    vector = read_bin(start) + offset_vector[:, None, :]
    within = (slot < filled[:, None]) & (slot != self_slot[:, None]) & (_norm2(vector) < reach2)
    place = jnp.where(within, count[:, None] + jnp.cumsum(within, axis=1, dtype=jnp.int32) - 1, m)
    code = code.at[row[:, None], place].set(s * c + slot, mode="drop")
    return (code, count + jnp.sum(within, axis=1, dtype=jnp.int32)), None

  init = (jnp.zeros((n, m), jnp.int32), jnp.zeros(n, jnp.int32))
  (code, count), _ = jax.lax.scan(visit, init, jnp.arange(stencil.shape[0], dtype=jnp.int32))

  # Every candidate of a row is in its buffer (unless count > m: overflow); exact vectors from the input
  # positions: (r_j - r_i) (nearby floats, subtracted exactly) + (image - wrap_j + wrap_i) @ basis.
  _, b, image = stencil_bin(stencil[code // c])
  source = bins.starts[b] + code % c
  lattice = image - bins.wrap[source].astype(jnp.int32) + bins.wrap[:, None].astype(jnp.int32)
  vector = bins.position[source] - bins.position[:, None] + _times(lattice.astype(dtype), basis[:, None])
  d2 = _norm2(vector)
  within = (jnp.arange(m) < count[:, None]) & (d2 < cutoff**2)
  d2 = jnp.where(within, d2, jnp.inf)
  d2_k, atom_k, lattice_k = keep_nearest(d2, vector, within, bins.atom[source], lattice, k)
  mask = jnp.isfinite(d2_k)
  shift = _times(lattice_k.astype(dtype), basis[:, None])

  # Back to the input order of atoms.
  rank = jnp.zeros(n, jnp.int32).at[bins.atom].set(row)
  mask = mask[rank]
  num_within = jnp.sum(within, axis=1, dtype=jnp.int32)
  dropped = jnp.maximum(num_within - k, 0)
  saturated = jnp.sum(dropped.astype(jnp.float32)) >= 2.0**31 - 2.0**24
  nearest = jnp.argmin(jnp.min(d2, axis=1))
  max_cell_count = jnp.max(bins.counts[:-1])
  reach_short = jnp.any(bins.reach_needed > jnp.asarray(capacity.reach))
  return DeviceSlots(
    neighbors=jnp.where(mask, atom_k[rank], n - 1),
    mask=mask,
    shift=jnp.where(mask[..., None], shift[rank], 0.0),
    num_dropped=jnp.where(saturated, INT32_MAX, jnp.sum(dropped)),
    min_distance=jnp.sqrt(jnp.min(d2)),
    closest_pair=jnp.stack([bins.atom[nearest], bins.atom[source[nearest, jnp.argmin(d2[nearest])]]]),
    num_close=jnp.sum(d2 < MIN_DISTANCE**2, dtype=jnp.int32),
    nonfinite=jnp.any(atom_mask & ~finite),
    degenerate_cell=bins.degenerate,
    max_cell_count=max_cell_count,
    max_candidates=jnp.max(count),
    reach_needed=bins.reach_needed,
    overflow=(max_cell_count > c) | (jnp.max(count) > m) | reach_short,
  )


def neighbor_slots(
  positions: jax.Array,
  cell: jax.Array | None = None,
  atom_mask: jax.Array | None = None,
  graph_index: jax.Array | None = None,
  *,
  pbc=(False, False, False),
  cutoff: float,
  max_neighbors: int,
  num_graphs: int = 1,
  capacity: SearchCapacity | None = None,
) -> DeviceSlots:
  """The K nearest neighbours within ``cutoff`` of every atom, built on the device (jittable).

  Args:
    positions: [N, 3] Angstrom (float32, or float64 under ``jax_enable_x64``); never wrapped.
    cell: [3, 3] or [G, 3, 3] lattice vectors as rows (Angstrom), one per structure; rows of free directions
      are not used. None for molecules.
    atom_mask: [N] bool, real atom (default all); padding atoms get no neighbours and are no one's.
    graph_index: [N] int32 structure of each atom in [0, G) (default 0); atoms of different structures are
      never neighbours.
    pbc: static, three booleans shared by the structures: periodicity along each lattice vector.
    cutoff: static, Angstrom (pairs closer than it).
    max_neighbors: static K.
    num_graphs: static G.
    capacity: static ``SearchCapacity`` (default ``SearchCapacity()``).

  Returns:
    ``DeviceSlots``; check ``overflow`` (grow the capacity and rebuild) and ``nonfinite``, ``degenerate_cell``
    and ``num_close`` (bad input), or use ``fit_neighbor_slots``, which does both on the host.

  Raises:
    ValueError: for static arguments out of range, more than ``MAX_ATOMS`` atom slots, or a missing cell.
  """
  pbc = tuple(bool(p) for p in np.broadcast_to(np.asarray(pbc, bool), (3,)))
  capacity = SearchCapacity() if capacity is None else capacity
  positions = jnp.asarray(positions)
  n = positions.shape[0]
  _check_static(n, pbc, float(cutoff), int(max_neighbors), capacity, int(num_graphs))
  if positions.shape != (n, 3):
    raise ValueError(f"positions must have shape [N, 3], got {positions.shape}")
  if cell is None:
    if any(pbc):
      raise ValueError(f"a structure periodic along {pbc} needs a cell")
    cell = jnp.zeros((3, 3), positions.dtype)
  cell = jnp.asarray(cell, positions.dtype)
  if cell.shape not in ((3, 3), (num_graphs, 3, 3)):
    raise ValueError(f"cell must have shape [3, 3] or [G={num_graphs}, 3, 3], got {cell.shape}")
  cell = jnp.broadcast_to(cell, (num_graphs, 3, 3))
  atom_mask = jnp.ones(n, bool) if atom_mask is None else jnp.asarray(atom_mask, bool)
  graph_index = jnp.zeros(n, jnp.int32) if graph_index is None else jnp.asarray(graph_index, jnp.int32)
  if atom_mask.shape != (n,) or graph_index.shape != (n,):
    raise ValueError(f"atom_mask and graph_index must have shape [N={n}], got {atom_mask.shape}, {graph_index.shape}")
  return _neighbor_slots(
    positions,
    cell,
    atom_mask,
    graph_index,
    pbc=pbc,
    cutoff=float(cutoff),
    max_neighbors=int(max_neighbors),
    num_graphs=int(num_graphs),
    capacity=capacity,
  )


def raise_for_bad_input(slots: DeviceSlots) -> None:
  """Raises ``ValueError`` for what the host builder refuses: non-finite positions, a degenerate periodic
  cell, overlapping atoms (host side; reads device scalars)."""
  if bool(slots.nonfinite):
    raise ValueError("positions of some atoms are not finite (NaN or inf)")
  if bool(slots.degenerate_cell):
    raise ValueError("the periodic lattice vectors of a structure span a zero length, area or volume")
  if int(slots.num_close) > 0:
    a, b = (int(x) for x in np.asarray(slots.closest_pair))
    raise ValueError(f"atoms {a} and {b} overlap (distance {float(slots.min_distance):.3g} A < {MIN_DISTANCE} A)")


def fit_neighbor_slots(
  positions: jax.Array,
  cell: jax.Array | None = None,
  atom_mask: jax.Array | None = None,
  graph_index: jax.Array | None = None,
  *,
  pbc=(False, False, False),
  cutoff: float,
  max_neighbors: int,
  num_graphs: int = 1,
  capacity: SearchCapacity | None = None,
  max_attempts: int = 6,
) -> tuple[DeviceSlots, SearchCapacity]:
  """``neighbor_slots`` with reallocation: rebuilds with ``capacity.grown`` until nothing overflows (host side).

  Capacities grow through fixed buckets (``capacity_bucket``; the reach to what the cell needs), so the
  programs compiled over a run are few. Pass the returned capacity to the next call to start from it.

  Returns:
    The complete slots and the capacity that built them.

  Raises:
    ValueError: for bad input (``raise_for_bad_input``).
    RuntimeError: when ``max_attempts`` builds all overflow.
  """
  capacity = SearchCapacity() if capacity is None else capacity
  for _ in range(max_attempts):
    slots = neighbor_slots(
      positions,
      cell,
      atom_mask,
      graph_index,
      pbc=pbc,
      cutoff=cutoff,
      max_neighbors=max_neighbors,
      num_graphs=num_graphs,
      capacity=capacity,
    )
    raise_for_bad_input(slots)
    if not bool(slots.overflow):
      return slots, capacity
    capacity = capacity.grown(slots)
  raise RuntimeError(f"the device neighbour search still overflows after {max_attempts} builds (last {capacity})")
