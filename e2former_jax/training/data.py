"""Data sets of a training run: the validation split, element references, the net-force check."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import ase
import numpy as np

from e2former_jax.data import ELEMENT_REFERENCE_TABLES, fit_element_references
from e2former_jax.data.labels import stored_results
from e2former_jax.data.sources import Subset


def split_validation(data: Sequence, fraction: float, seed: int) -> tuple[Sequence, Sequence]:
  """(train, valid) with ``fraction`` of the structures, chosen at random by ``seed``, held out."""
  n = len(data)
  k = max(1, int(round(fraction * n)))
  if k >= n:
    raise ValueError(f"valid_fraction {fraction} leaves no training structures out of {n}")
  perm = np.random.default_rng([int(seed), 7919]).permutation(n)
  valid, train = np.sort(perm[:k]), np.sort(perm[k:])
  if isinstance(data, list):
    return [data[i] for i in train], [data[i] for i in valid]
  return Subset(data, train), Subset(data, valid)


def element_references(
  choice: str, train: Sequence[ase.Atoms], max_fit_structures: int = 200_000, seed: int = 0
) -> dict[int, float]:
  """Per-element energies (eV): ``fit`` (least squares on up to ``max_fit_structures`` training structures),
  a published table (``spice``, ``omol25``) or ``none`` (empty)."""
  if choice == "none":
    return {}
  if choice in ELEMENT_REFERENCE_TABLES:
    return dict(ELEMENT_REFERENCE_TABLES[choice])
  if choice != "fit":
    raise ValueError(f"element references {choice!r} are not resolved here")
  n = len(train)
  idx = (
    np.arange(n)
    if n <= max_fit_structures
    else np.sort(np.random.default_rng(seed).choice(n, max_fit_structures, replace=False))
  )
  structures = [train[int(i)] for i in idx]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    refs = fit_element_references(structures)
  for w in caught:  # an underdetermined fit is expected for few molecule types; say so once
    warnings.warn(str(w.message), stacklevel=2)
  return refs


def net_force_check(
  dataset: Sequence[ase.Atoms], sample: int = 200, seed: int = 0, threshold: float = 0.1
) -> str | None:
  """A warning message when the labelled forces of (a sample of) ``dataset`` do not sum to zero.

  Forces of any translation-invariant energy sum to zero over a structure (the reference methods' own
  numerical net force is below 0.01 eV/A). A larger median |sum_i F_i| means the labels hold something else
  (for example forces adjusted by an MD constraint such as ASE's ``FixCom``), which no conservative model
  can fit. Returns None when the labels look fine.
  """
  n = len(dataset)
  if n == 0:
    return None
  idx = np.arange(n) if n <= sample else np.random.default_rng(seed).choice(n, sample, replace=False)
  nets = []
  for i in idx:
    atoms = dataset[int(i)]
    results = stored_results(atoms)
    if "forces" in results:
      f = np.asarray(results["forces"], dtype=np.float64)
      if np.all(np.isfinite(f)):
        nets.append(float(np.linalg.norm(f.sum(axis=0))))
  if not nets:
    return None
  median = float(np.median(nets))
  if median <= threshold:
    return None
  return (
    f"the labelled forces do not sum to zero: median |sum_i F_i| = {median:.3g} eV/A over {len(nets)} "
    "structures (a translation-invariant energy gives 0). Conservative models cannot fit the net part; "
    "were the labels written with an MD constraint applied (e.g. ASE FixCom; use "
    "atoms.get_forces(apply_constraint=False))?"
  )


def without_untrained_elements(data: Sequence, domain, split: str) -> Sequence:
  """``data`` without the structures holding elements outside ``domain`` (a ``TrainedDomain``), with one
  warning naming the config types and counts left out: a validation or test table must not score the model on
  elements it never saw, and a run must not fail at its end over it."""
  keep, dropped = [], {}
  for i in range(len(data)):
    atoms = data[i]
    if domain.untrained_elements(atoms.numbers):
      config_type = str(atoms.info.get("config_type", "(none)"))
      dropped[config_type] = dropped.get(config_type, 0) + 1
    else:
      keep.append(i)
  if not dropped:
    return data
  counts = ", ".join(f"{name} {count}" for name, count in sorted(dropped.items()))
  warnings.warn(
    f"{sum(dropped.values())} {split} structure(s) hold elements absent from the training set and are left out "
    f"of the {split} tables ({counts})",
    stacklevel=3,
  )
  return [data[i] for i in keep] if isinstance(data, list) else Subset(data, keep)
