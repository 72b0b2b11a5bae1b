"""Per-element reference energies (eV): least-squares fits and the published tables.

A model predicts ``E - sum_i ref[Z_i]`` and adds the references back, so its outputs are total energies.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence

import ase
import numpy as np

# Element reference energies (eV) that the E2Former-V2 authors subtract for SPICE (MACE-OFF split).
SPICE_ELEMENT_REFERENCES: dict[int, float] = {
  1: -16.3841057,
  6: -1037.58911,
  7: -1490.72485,
  8: -2048.14404,
  9: -2718.46191,
  15: -9291.55469,
  16: -10836.9053,
  17: -12524.3545,
  35: -70046.375,
  53: -8102.90869,
}

# Element reference energies (eV) the E2Former-V2 authors subtract for OMol25 (their per-Z array, Z = 1..83;
# the heavy elements are small because def2 basis sets use effective core potentials there).
_OMOL25_VALUES = (
  -1.59710732e01,
  -8.23230805e01,
  -2.01737238e02,
  -3.92599446e02,
  -6.78603072e02,
  -1.03714414e03,
  -1.49040870e03,
  -2.04770253e03,
  -2.71729943e03,
  -3.51206238e03,
  -4.41215278e03,
  -5.44178483e03,
  -6.58885106e03,
  -7.88068321e03,
  -9.28993589e03,
  -1.08346781e04,
  -1.25220734e04,
  -1.43574302e04,
  -1.63227189e04,
  -1.84345461e04,
  -2.06955674e04,
  -2.31107705e04,
  -2.56816305e04,
  -2.84157680e04,
  -3.13133553e04,
  -3.43803391e04,
  -3.76206573e04,
  -4.10377251e04,
  -4.46327620e04,
  -4.84127465e04,
  -5.23697295e04,
  -5.65178250e04,
  -6.08395472e04,
  -6.53469124e04,
  -7.00410038e04,
  -7.49314429e04,
  -6.53015792e02,
  -8.31176566e02,
  -1.03802332e03,
  -1.26979180e03,
  -1.54544741e03,
  -1.84301628e03,
  -2.18445053e03,
  -2.57126321e03,
  -2.99798897e03,
  -3.47114530e03,
  -3.99310028e03,
  -4.56009202e03,
  -5.16283683e03,
  -5.82163614e03,
  -6.53983793e03,
  -7.29633351e03,
  -8.09906677e03,
  -8.96454006e03,
  -5.45848146e02,
  -6.89112953e02,
  -8.50333684e02,
  -1.29164123e04,
  -1.40587874e04,
  -1.52667509e04,
  -1.65440578e04,
  -1.78937155e04,
  -1.93208781e04,
  -2.08217976e04,
  -2.24225472e04,
  -2.40726115e04,
  -2.57868209e04,
  -2.76077036e04,
  -2.95170879e04,
  -3.15182665e04,
  -3.36093871e04,
  -1.29322141e03,
  -1.54072489e03,
  -1.81212795e03,
  -2.11489232e03,
  -2.45078086e03,
  -2.82608194e03,
  -3.23647748e03,
  -3.68230943e03,
  -4.16819550e03,
  -4.68286110e03,
  -5.23798293e03,
  -5.83126053e03,
)
OMOL25_ELEMENT_REFERENCES: dict[int, float] = {z: float(v) for z, v in enumerate(_OMOL25_VALUES, start=1)}

ELEMENT_REFERENCE_TABLES: dict[str, dict[int, float]] = {
  "spice": SPICE_ELEMENT_REFERENCES,
  "omol25": OMOL25_ELEMENT_REFERENCES,
}


def _numbers_and_energies(structures: Iterable[ase.Atoms], energies) -> tuple[list[np.ndarray], np.ndarray]:
  numbers, es = [], []
  for i, atoms in enumerate(structures):
    numbers.append(np.asarray(atoms.get_atomic_numbers()))
    if energies is None:
      if atoms.calc is None:
        raise ValueError(f"structure {i} has no energy (no calculator attached)")
      es.append(float(atoms.get_potential_energy()))
  if energies is not None:
    es = np.asarray(energies, dtype=np.float64)
    if es.shape != (len(numbers),):
      raise ValueError(f"energies has shape {es.shape}, expected ({len(numbers)},)")
  return numbers, np.asarray(es, dtype=np.float64)


def fit_element_references(
  structures: Sequence[ase.Atoms], energies: Sequence[float] | None = None, elements: Sequence[int] | None = None
) -> dict[int, float]:
  """Least-squares per-element energies: ``E_s ~ sum_Z n_{s,Z} e_Z`` over the given (training) structures.

  Args:
    structures: structures with a calculator carrying the energy (eV), or see ``energies``.
    energies: optional energies (eV) in the order of ``structures``, used instead of the calculators.
    elements: atomic numbers to fit (default: those present). Elements listed but absent get 0.

  Returns:
    ``{Z: e_Z}`` in eV. When the compositions do not determine every element separately (for example a
    single molecule type), the minimum-norm solution is returned and a warning says so; it still
    reproduces the mean energy of every composition seen.
  """
  numbers, es = _numbers_and_energies(structures, energies)
  if len(numbers) == 0:
    raise ValueError("no structures to fit element references on")
  if not np.all(np.isfinite(es)):
    raise ValueError("non-finite energy among the structures")
  present = sorted({int(z) for n in numbers for z in n})
  zs = sorted(set(present) | set(int(z) for z in elements)) if elements is not None else present
  col = {z: k for k, z in enumerate(zs)}
  counts = np.zeros((len(numbers), len(zs)))
  for s, n in enumerate(numbers):
    for z in n:
      counts[s, col[int(z)]] += 1.0
  fit_cols = [col[z] for z in present]
  sol, _, rank, _ = np.linalg.lstsq(counts[:, fit_cols], es, rcond=None)
  if rank < len(present):
    warnings.warn(
      f"element references are underdetermined (rank {rank} < {len(present)} elements); "
      "using the minimum-norm least-squares solution",
      stacklevel=2,
    )
  out = {z: 0.0 for z in zs}
  for z, v in zip(present, sol):
    out[z] = float(v)
  return out


def reference_energy(structure: ase.Atoms | Sequence[int] | np.ndarray, references: Mapping[int, float]) -> float:
  """``sum_i references[Z_i]`` (eV); raises ``KeyError`` naming elements missing from the table."""
  numbers = structure.get_atomic_numbers() if isinstance(structure, ase.Atoms) else np.asarray(structure)
  missing = sorted({int(z) for z in numbers} - {int(z) for z in references})
  if missing:
    raise KeyError(f"no reference energy for element(s) {missing}")
  return float(sum(references[int(z)] for z in numbers))


def reference_array(references: Mapping[int, float], max_z: int = 118) -> np.ndarray:
  """Dense ``[max_z + 1]`` float64 array indexed by Z (0 for elements not in the table)."""
  out = np.zeros(max_z + 1)
  for z, v in references.items():
    if not 1 <= int(z) <= max_z:
      raise ValueError(f"reference table has atomic number {z} outside 1..{max_z}")
    out[int(z)] = float(v)
  return out
