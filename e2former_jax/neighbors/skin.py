"""On-device neighbour lists for MD: a Verlet buffer from the device search, and the K nearest slots of every step.

Two levels, as in most MD codes:

1. A *candidate buffer* (Verlet list) ``[N, C]`` of (source atom, integer lattice image) pairs within
   ``cutoff + skin``, built by the O(N) device search ``e2former_jax.neighbors.device.neighbor_slots`` (free,
   periodic and mixed boundaries, e.g. slabs ``(True, True, False)``) with ``max_neighbors`` = C, and rebuilt
   on the device whenever a real atom has moved more than ``skin / 2`` since the last build. Its capacities (C,
   atoms per bin, stencil reach) are a ``SearchCapacity`` in the search's fixed buckets; a build that needs
   more sets ``overflow`` (it never drops a pair silently) and ``grown`` gives the next capacity.
2. The *slots* of each step: the K nearest candidates within ``cutoff``, chosen and ordered by the host
   builder's rule with the device search's own code (``device.keep_nearest``: distance, then displacement, on
   the ``TIE_RESOLUTION`` grid; slots by distance, then source atom, then lattice image), so they equal
   ``e2former_jax.graph.graph_from_atoms``'s slots (K-truncation is part of the model's definition); the
   in-cutoff pairs beyond K are counted.

Why the buffer is complete: a pair closer than ``cutoff`` now, whose atoms each moved at most ``skin / 2``
since the build, was closer than ``cutoff + skin`` at the build.

Positions are never wrapped: a pair's image is an integer lattice vector ``S`` (zero along free directions)
with the source at ``positions[j] + S @ cell``, like the host builder's ``neighbor_shift``.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from e2former_jax.neighbors.device import (
  SearchCapacity,
  _lattice_basis,
  _norm2,
  _times,
  keep_nearest,
  neighbor_slots,
  raise_for_bad_input,
)
from e2former_jax.neighbors.host import MIN_DISTANCE

HEADROOM = 1.25  # buffers are sized for this many times the largest count seen, so a fluctuation rarely overflows


@dataclasses.dataclass(frozen=True)
class NeighborListSpec:
  """Static description of an MD neighbour list (hashable: a static argument of the jitted MD chunk).

  Attributes:
    cutoff: model cutoff (Angstrom).
    max_neighbors: K slots per atom.
    skin: Verlet skin (Angstrom); candidates are searched within ``cutoff + skin``.
    pbc: periodicity along each lattice vector (three booleans; mixed allowed).
    capacity: the search's ``SearchCapacity``; ``capacity.candidate_capacity`` is C, the candidate slots per atom.
  """

  cutoff: float
  max_neighbors: int
  skin: float
  pbc: tuple[bool, bool, bool]
  capacity: SearchCapacity

  def __post_init__(self):
    if not self.cutoff > 0 or not math.isfinite(self.cutoff):
      raise ValueError(f"cutoff must be a positive number of Angstrom, got {self.cutoff!r}")
    if not self.skin >= 0 or not math.isfinite(self.skin):
      raise ValueError(f"skin must be a non-negative number of Angstrom, got {self.skin!r}")
    if self.max_neighbors < 1:
      raise ValueError(f"max_neighbors must be >= 1, got {self.max_neighbors}")

  @property
  def search_radius(self) -> float:
    return self.cutoff + self.skin


@flax.struct.dataclass
class NeighborState:
  """Candidate buffer and bookkeeping (a pytree carried through the MD scan).

  Attributes:
    candidates: [N, C] int32 source atom of each candidate (the padding atom N - 1 for empty ones).
    candidate_image: [N, C, 3] int32 lattice image of each candidate (zero along free directions).
    candidate_mask: [N, C] bool.
    reference: [N, 3] positions at the last build (inf before the first).
    overflow: bool, some build needed more than the capacity (its buffer may be incomplete).
    max_cell_count, max_candidates: int32, reach_needed: [3] int32: the largest needs seen at any build (what
      ``SearchCapacity.grown`` reads).
    builds: int32, number of builds.
    too_close: bool, two atoms came closer than ``MIN_DISTANCE`` at some step or build.
  """

  candidates: jax.Array
  candidate_image: jax.Array
  candidate_mask: jax.Array
  reference: jax.Array
  overflow: jax.Array
  max_cell_count: jax.Array
  max_candidates: jax.Array
  reach_needed: jax.Array
  builds: jax.Array
  too_close: jax.Array


def _pbc(pbc) -> tuple[bool, bool, bool]:
  return tuple(bool(p) for p in np.broadcast_to(np.asarray(pbc, bool), (3,)))


def _search(spec: NeighborListSpec, positions, cell, atom_mask):
  return neighbor_slots(
    positions,
    cell,
    atom_mask,
    pbc=spec.pbc,
    cutoff=spec.search_radius,
    max_neighbors=spec.capacity.candidate_capacity,
    capacity=spec.capacity,
  )


def plan(
  positions,
  cell,
  pbc,
  cutoff: float,
  max_neighbors: int,
  skin: float = 0.5,
  atom_mask=None,
  capacity: SearchCapacity | None = None,
  headroom: float = HEADROOM,
  max_attempts: int = 6,
) -> NeighborListSpec:
  """The spec of a list for these atoms, its capacity fitted by device searches (no host neighbour search).

  Args:
    positions: [N, 3] Angstrom (the padded array the MD driver carries, so the search compiles once).
    cell: [3, 3] lattice vectors as rows (Angstrom; rows of free directions unused; zeros for a molecule).
    pbc: three booleans (or one), periodicity along each lattice vector.
    cutoff: model cutoff; max_neighbors: K.
    skin: Verlet skin (Angstrom).
    atom_mask: [N] bool real atoms (default all).
    capacity: use this capacity as it is (no fit); default: searched from ``SearchCapacity()`` up through the
      buckets until nothing overflows, then ``headroom`` times the needs (``SearchCapacity.grown``).

  Raises:
    ValueError: for bad input (non-finite positions, a degenerate periodic cell, overlapping atoms).
    RuntimeError: when ``max_attempts`` searches all overflow.
  """
  positions = jnp.asarray(positions)
  cell = jnp.asarray(np.zeros((3, 3)) if cell is None else cell, positions.dtype)
  spec = NeighborListSpec(float(cutoff), int(max_neighbors), float(skin), _pbc(pbc), capacity or SearchCapacity())
  if capacity is not None:
    return spec
  for _ in range(max_attempts):
    slots = _search(spec, positions, cell, atom_mask)
    raise_for_bad_input(slots)
    fitted = spec.capacity.grown(slots, headroom)
    if not bool(slots.overflow):
      return dataclasses.replace(spec, capacity=fitted)
    spec = dataclasses.replace(spec, capacity=fitted)
  raise RuntimeError(f"the device neighbour search still overflows after {max_attempts} builds (last {spec.capacity})")


def grown(spec: NeighborListSpec, state: NeighborState, headroom: float = HEADROOM) -> NeighborListSpec:
  """The spec with a capacity for ``headroom`` times what the builds in ``state`` needed (after an overflow)."""
  return dataclasses.replace(spec, capacity=spec.capacity.grown(state, headroom))


def empty_state(spec: NeighborListSpec, num_atoms: int, dtype) -> NeighborState:
  """A state that forces a build at the first update."""
  c = spec.capacity.candidate_capacity
  return NeighborState(
    candidates=jnp.full((num_atoms, c), num_atoms - 1, jnp.int32),
    candidate_image=jnp.zeros((num_atoms, c, 3), jnp.int32),
    candidate_mask=jnp.zeros((num_atoms, c), bool),
    reference=jnp.full((num_atoms, 3), jnp.inf, dtype),
    overflow=jnp.zeros((), bool),
    max_cell_count=jnp.zeros((), jnp.int32),
    max_candidates=jnp.zeros((), jnp.int32),
    reach_needed=jnp.ones(3, jnp.int32),
    builds=jnp.zeros((), jnp.int32),
    too_close=jnp.zeros((), bool),
  )


def build(spec: NeighborListSpec, state: NeighborState, positions, cell, atom_mask) -> NeighborState:
  """The candidate buffer at ``positions`` [N, 3] (traceable; flags overflow instead of dropping pairs)."""
  slots = _search(spec, positions, cell, atom_mask)
  basis, _ = _lattice_basis(jnp.asarray(cell, positions.dtype)[None], spec.pbc)
  image = jnp.round(_times(slots.shift, jnp.linalg.inv(basis[0]))).astype(jnp.int32)  # shift = image @ basis
  return NeighborState(
    candidates=slots.neighbors,
    candidate_image=image,
    candidate_mask=slots.mask,
    reference=positions,
    overflow=state.overflow | slots.overflow,
    max_cell_count=jnp.maximum(state.max_cell_count, slots.max_cell_count),
    max_candidates=jnp.maximum(state.max_candidates, slots.max_candidates),
    reach_needed=jnp.maximum(state.reach_needed, slots.reach_needed),
    builds=state.builds + 1,
    too_close=state.too_close | (slots.num_close > 0),
  )


def needs_rebuild(spec: NeighborListSpec, state: NeighborState, positions, atom_mask) -> jax.Array:
  """Some real atom moved more than skin / 2 since the last build (or is not finite, or there was none)."""
  moved = _norm2(positions - state.reference)
  return jnp.any(atom_mask & ~(moved <= (0.5 * spec.skin) ** 2))


def nearest_slots(spec: NeighborListSpec, state: NeighborState, positions, cell):
  """The K nearest candidates within the cutoff, by the host builder's rule.

  Args:
    positions: [N, 3] Angstrom, the current positions (within skin / 2 of the build's).
    cell: [3, 3] lattice vectors as rows.

  Returns:
    neighbors [N, K] int32 (padding atom N - 1 in empty slots), mask [N, K], shift [N, K, 3] (Cartesian,
    ``S @ cell``, zero in empty slots), the number of in-cutoff pairs beyond K (int32), and the state with
    ``too_close`` updated.
  """
  n, dtype = positions.shape[0], positions.dtype
  k = spec.max_neighbors
  cell = jnp.asarray(cell, dtype)
  image = state.candidate_image
  # (r_j - r_i) first (nearby floats, subtracted exactly), then the image offset, as the device search does.
  vectors = (positions[state.candidates] - positions[:, None]) + _times(image.astype(dtype), cell)
  d2 = _norm2(vectors)
  within = state.candidate_mask & (d2 < spec.cutoff**2)
  d2 = jnp.where(within, d2, jnp.inf)
  d2_k, atom_k, image_k = keep_nearest(d2, vectors, within, state.candidates, image, k)
  mask = jnp.isfinite(d2_k)
  shift = _times(image_k.astype(dtype), cell)
  beyond = jnp.sum(jnp.maximum(jnp.sum(within, axis=1, dtype=jnp.int32) - k, 0))
  close = jnp.any(within & (d2 < MIN_DISTANCE**2))
  return (
    jnp.where(mask, atom_k, n - 1).astype(jnp.int32),
    mask,
    jnp.where(mask[..., None], shift, 0.0),
    beyond.astype(jnp.int32),
    state.replace(too_close=state.too_close | close),
  )
