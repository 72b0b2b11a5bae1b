"""Host-side neighbour lists: the K nearest neighbours within the cutoff (vesin; free, periodic and mixed cells)."""

from __future__ import annotations

import dataclasses

import numpy as np
import vesin

MIN_DISTANCE = 0.1  # Angstrom; two atoms closer than this are reported as overlapping.
TIE_RESOLUTION = 2.0**-14  # Angstrom (6.1e-5); distances and displacements are compared on this grid for the K cut.


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


def lattice_basis(cell: np.ndarray, pbc) -> np.ndarray:
  """[3, 3] basis whose rows are the periodic lattice vectors and, along free directions, unit vectors.

  The free rows are orthonormal and orthogonal to the periodic rows (a slab's normal; two directions across a
  wire; the Cartesian axes for a molecule), so a free direction's fractional coordinate is a Cartesian length
  (Angstrom) and the cell's own free rows (often zero) are never used.

  Raises:
    ValueError: when the periodic lattice vectors span a zero length, area or volume.
  """
  pbc = np.asarray(pbc, dtype=bool).reshape(3)
  cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
  periodic = cell[pbc]
  if len(periodic) and np.sqrt(max(np.linalg.det(periodic @ periodic.T), 0.0)) < 1e-8:
    raise ValueError(
      f"the lattice vectors of the periodic directions {np.flatnonzero(pbc).tolist()} span a zero length, area "
      f"or volume (a periodic structure needs a non-degenerate cell along them)"
    )
  if len(periodic) == 0:
    free = np.eye(3)
  elif len(periodic) == 1:
    a = periodic[0] / np.linalg.norm(periodic[0])
    u = np.cross(a, np.eye(3)[np.argmin(np.abs(a))])
    u /= np.linalg.norm(u)
    free = np.stack([u, np.cross(a, u)])
  elif len(periodic) == 2:
    normal = np.cross(periodic[0], periodic[1])
    free = (normal / np.linalg.norm(normal))[None]
  else:
    free = np.zeros((0, 3))
  basis = np.empty((3, 3))
  basis[pbc] = periodic
  basis[~pbc] = free
  return basis


def selection_order(index: np.ndarray, distance: np.ndarray, vector: np.ndarray) -> np.ndarray:
  """Order of pairs for the K cut: by target atom, then distance, then displacement, on the tie grid.

  Distances and displacement components are rounded to multiples of ``TIE_RESOLUTION``; pairs are ordered
  by (rounded distance, rounded x, y, z of the displacement). The rule uses only the geometry of each pair, so
  the kept neighbours do not depend on the order of atoms in memory, and rounding noise far below the grid (a
  float32 position, a translation) does not decide which of several equidistant neighbours are kept. Two
  different neighbours never share a key: they would be closer than ``TIE_RESOLUTION`` to each other, an overlap.
  """
  q = np.rint(vector / TIE_RESOLUTION).astype(np.int64)
  return np.lexsort((q[:, 2], q[:, 1], q[:, 0], np.rint(distance / TIE_RESOLUTION).astype(np.int64), index))


def k_nearest_neighbors(
  positions: np.ndarray, cutoff: float, max_neighbors: int, cell: np.ndarray | None = None, pbc=(False, False, False)
) -> NeighborSlots:
  """K nearest neighbours within ``cutoff`` of every atom.

  The K kept are the first K in ``selection_order`` (the nearest, with ties on the ``TIE_RESOLUTION`` grid
  resolved by the displacement); the slots hold them by increasing distance, equal distances by source atom
  and then lattice image.

  Args:
    positions: [n, 3] Cartesian positions in Angstrom.
    cutoff: cutoff radius in Angstrom (pairs closer than it).
    max_neighbors: K, slots per atom.
    cell: [3, 3] lattice vectors as rows (Angstrom); needed when any ``pbc`` is set (rows of free
      directions are not used).
    pbc: three booleans, periodicity along each lattice vector (mixed, e.g. slabs, allowed).

  Raises:
    ValueError: for non-finite positions, dependent periodic lattice vectors, or two atoms closer than
      ``MIN_DISTANCE``.
  """
  positions = np.asarray(positions, dtype=np.float64)
  n = len(positions)
  if not np.all(np.isfinite(positions)):
    bad = np.flatnonzero(~np.all(np.isfinite(positions), axis=1))
    raise ValueError(f"positions of atoms {bad.tolist()} are not finite (NaN or inf)")
  pbc = np.asarray(pbc, dtype=bool).reshape(3)
  box = lattice_basis(np.zeros((3, 3)) if cell is None else cell, pbc)
  calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
  i, j, image, d, v = calculator.compute(points=positions, box=box, periodic=pbc.tolist(), quantities="ijSdD")
  i = np.asarray(i, dtype=np.int64)
  j = np.asarray(j, dtype=np.int64)
  image = np.asarray(image, dtype=np.int64)
  d = np.asarray(d, dtype=np.float64)
  v = np.asarray(v, dtype=np.float64)
  close = d < MIN_DISTANCE
  if close.any():
    a, b = int(i[close][0]), int(j[close][0])
    raise ValueError(f"atoms {a} and {b} overlap (distance {d[close][0]:.3g} A < {MIN_DISTANCE} A)")
  order = selection_order(i, d, v)
  starts = np.searchsorted(i[order], np.arange(n))
  keep = order[np.arange(len(i)) - starts[i[order]] < max_neighbors]
  keep = keep[np.lexsort((image[keep, 2], image[keep, 1], image[keep, 0], j[keep], d[keep], i[keep]))]
  rank = np.arange(len(keep)) - np.searchsorted(i[keep], np.arange(n))[i[keep]]
  neighbors = np.full((n, max_neighbors), -1, dtype=np.int64)
  shifts = np.zeros((n, max_neighbors, 3))
  neighbors[i[keep], rank] = j[keep]
  shifts[i[keep], rank] = image[keep] @ box
  return NeighborSlots(neighbors=neighbors, shifts=shifts, mask=neighbors >= 0, num_beyond_k=len(i) - len(keep))
