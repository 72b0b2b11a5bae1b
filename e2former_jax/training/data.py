"""Data sets of a training run: reading the configured paths, the validation split, element references."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import ase
import numpy as np

from e2former_jax.data import ELEMENT_REFERENCE_TABLES, demo_data_path, fit_element_references, open_dataset

DEMO_PREFIX = "demo:"
DATA_EXTENSIONS = (".h5", ".hdf5", ".xyz", ".extxyz", ".aselmdb", ".lmdb")  # what the readers recognise


class ConcatDataset(Sequence):
  """Several data sets as one indexable sequence (``num_atoms`` without reading labels)."""

  def __init__(self, parts: Sequence):
    self.parts = list(parts)
    self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64)

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def _locate(self, i: int):
    if i < 0:
      i += len(self)
    if not 0 <= i < len(self):
      raise IndexError(f"index {i} out of range for {len(self)} structures")
    k = int(np.searchsorted(self.offsets, i, side="right") - 1)
    return self.parts[k], i - int(self.offsets[k])

  def __getitem__(self, i):
    part, j = self._locate(int(i))
    return part[j]

  def num_atoms(self, i: int) -> int:
    part, j = self._locate(int(i))
    f = getattr(part, "num_atoms", None)
    return int(f(j)) if callable(f) else len(part[j])


class Subset(Sequence):
  """``dataset[indices]`` without reading anything up front."""

  def __init__(self, dataset: Sequence, indices: Sequence[int]):
    self.dataset = dataset
    self.indices = np.asarray(indices, dtype=np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i):
    return self.dataset[int(self.indices[int(i)])]

  def num_atoms(self, i: int) -> int:
    f = getattr(self.dataset, "num_atoms", None)
    j = int(self.indices[int(i)])
    return int(f(j)) if callable(f) else len(self.dataset[j])


def _expand(spec) -> list[Path]:
  specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
  paths: list[Path] = []
  for s in specs:
    s = str(s)
    if s.startswith(DEMO_PREFIX):
      paths.append(demo_data_path(s[len(DEMO_PREFIX) :]))
      continue
    p = Path(s).expanduser()
    if p.is_dir():
      found = sorted(q for q in p.iterdir() if q.suffix.lower() in DATA_EXTENSIONS)
      if not found:
        raise FileNotFoundError(f"{p}: directory holds no data files ({', '.join(DATA_EXTENSIONS)})")
      paths.extend(found)
    elif p.exists():
      paths.append(p)
    else:
      raise FileNotFoundError(
        f"{p}: no such data file or directory (set the data paths in the config, e.g. --set data.train=PATH)"
      )
  if not paths:
    raise ValueError(f"no data files in {spec!r}")
  return paths


def read_structures(
  spec, fmt: str | None = None, reader: dict | None = None, in_memory: bool = False, limit: int | None = None
) -> Sequence[ase.Atoms]:
  """The structures of a path, a list of paths, a directory of data files, or ``demo:<split>``.

  ``in_memory`` reads everything now (a list); otherwise the files stay open and records are read when
  indexed. ``limit`` keeps the first so many structures.
  """
  parts = [open_dataset(p, fmt, **(reader or {})) for p in _expand(spec)]
  data = parts[0] if len(parts) == 1 else ConcatDataset(parts)
  if limit is not None:
    data = Subset(data, np.arange(min(int(limit), len(data))))
  if in_memory:
    data = [data[i] for i in range(len(data))]
    for p in parts:
      p.close()
  return data


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
    results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
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
