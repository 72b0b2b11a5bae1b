"""Shared structures for the MD tests: a periodic water box."""

import ase
import ase.build
import numpy as np
from scipy.spatial.transform import Rotation


def water_box(n: int = 3, density: float = 1.0, seed: int = 0, rattle: float = 0.02) -> ase.Atoms:
  """n^3 randomly oriented water molecules on a jittered cubic grid at ``density`` g/cm^3 (periodic cube).

  The atoms are rattled so that no two neighbour distances tie (the slot order is then unique).
  """
  rng = np.random.default_rng(seed)
  side = (n**3 * 18.015 / density / 0.602214) ** (1 / 3)
  water = ase.build.molecule("H2O")
  box = ase.Atoms(cell=[side] * 3, pbc=True)
  for idx in np.ndindex(n, n, n):
    w = water.copy()
    w.positions = w.positions @ Rotation.random(random_state=int(rng.integers(1 << 31))).as_matrix().T
    w.positions += (np.asarray(idx) + 0.5) * side / n + rng.normal(scale=0.2, size=3)
    box += w
  box.rattle(rattle, seed=seed)
  return box
