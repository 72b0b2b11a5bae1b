"""Host-side neighbour lists: the K nearest neighbours within the cutoff (vesin, periodic cells)."""

from __future__ import annotations

import dataclasses

import numpy as np
import vesin

MIN_DISTANCE = 0.1  # Angstrom; two atoms closer than this are reported as overlapping.


@dataclasses.dataclass(frozen=True)
class NeighborSlots:
  """Neighbour slots of one structure.

  Attributes:
    neighbors: [n, K] int, source atom of each slot (index inside the structure; -1 for empty slots).
    shifts: [n, K, 3] float64, Cartesian offset of the source image in Angstrom; the source sits at
      positions[neighbors] + shifts.
    mask: [n, K] bool, slot holds a neighbour within the cutoff.
    num_beyond_k: number of in-cutoff pairs dropped because an atom had more than K of them.
  """

  neighbors: np.ndarray
  shifts: np.ndarray
  mask: np.ndarray
  num_beyond_k: int


def k_nearest_neighbors(
  positions: np.ndarray, cutoff: float, max_neighbors: int, cell: np.ndarray | None = None, pbc=(False, False, False)
) -> NeighborSlots:
  """K nearest neighbours within ``cutoff`` of every atom.

  Args:
    positions: [n, 3] Cartesian positions in Angstrom.
    cutoff: cutoff radius in Angstrom.
    max_neighbors: K, slots per atom.
    cell: [3, 3] lattice vectors as rows (Angstrom); needed when any ``pbc`` is set.
    pbc: three booleans, periodicity along each lattice vector.

  Raises:
    ValueError: for non-finite positions or two atoms closer than ``MIN_DISTANCE``.
  """
  positions = np.asarray(positions, dtype=np.float64)
  n = len(positions)
  if not np.all(np.isfinite(positions)):
    bad = np.flatnonzero(~np.all(np.isfinite(positions), axis=1))
    raise ValueError(f"positions of atoms {bad.tolist()} are not finite (NaN or inf)")
  pbc = np.asarray(pbc, dtype=bool).reshape(3)
  box = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64).reshape(3, 3)
  if pbc.any() and abs(np.linalg.det(box)) < 1e-8:
    raise ValueError("a periodic structure needs a cell with non-zero volume")
  if pbc.any() and not pbc.all():
    raise ValueError("mixed periodicity is not supported: pbc must be all True or all False")
  calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
  i, j, s, d = calculator.compute(points=positions, box=box, periodic=bool(pbc.all()), quantities="ijSd")
  i = np.asarray(i, dtype=np.int64)
  j = np.asarray(j, dtype=np.int64)
  d = np.asarray(d, dtype=np.float64)
  close = d < MIN_DISTANCE
  if close.any():
    a, b = int(i[close][0]), int(j[close][0])
    raise ValueError(f"atoms {a} and {b} overlap (distance {d[close][0]:.3g} A < {MIN_DISTANCE} A)")
  order = np.lexsort((d, i))
  i, j, s, d = i[order], j[order], np.asarray(s, dtype=np.float64)[order], d[order]
  starts = np.searchsorted(i, np.arange(n))
  rank = np.arange(len(i)) - starts[i]
  keep = rank < max_neighbors
  neighbors = np.full((n, max_neighbors), -1, dtype=np.int64)
  shifts = np.zeros((n, max_neighbors, 3))
  neighbors[i[keep], rank[keep]] = j[keep]
  shifts[i[keep], rank[keep]] = s[keep] @ box
  return NeighborSlots(neighbors=neighbors, shifts=shifts, mask=neighbors >= 0, num_beyond_k=int((~keep).sum()))
