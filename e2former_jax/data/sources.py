"""Where structures come from: a path, a list of paths, a directory of data files, or ``demo:<split>``, read lazily
or into memory, as one indexable sequence."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import ase
import numpy as np

from e2former_jax.data.demo import demo_data_path
from e2former_jax.data.readers import open_dataset

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
      raise FileNotFoundError(f"{p}: no such data file or directory")
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
