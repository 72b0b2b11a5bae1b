"""Readers for SPICE (HDF5), extxyz (MACE-OFF layout by default) and OMol25 (aselmdb).

Every reader returns ``ase.Atoms`` with a ``SinglePointCalculator`` holding the energy (eV) and forces (eV/A),
and ``atoms.info`` with ``charge`` (total charge, e), ``spin`` (multiplicity 2S+1, 1 when absent),
``config_type`` and a stable ``source`` id. Charge and multiplicity are read by ``e2former_jax.system_keys`` (every
common spelling, or the one key named), and only ``charge`` and ``spin`` are written back.

Errors name the file, the record and the problem (``DataFormatError``). With ``on_error="skip"`` a bad record
is left out instead, and every skipped record is counted in ``dataset.skipped`` (record id and reason) and
reported with a warning: nothing is dropped silently.
"""

from __future__ import annotations

import inspect
import io
import os
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ase
import ase.units
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator

from e2former_jax.elements import MAX_ATOMIC_NUMBER
from e2former_jax.system_keys import charge_and_multiplicity, without_system_keys

# ASE's CODATA 2018 units (docs/data.md §1): ase.units derives them from the fundamental constants, so they equal
# the recommended 0.529177210903 A and 27.211386245988 eV to 1e-11 relative. (ASE's default set is CODATA 2014,
# 1e-9 and 8e-9 relative away.)
_CODATA_2018 = ase.units.create_units("2018")
BOHR_TO_ANGSTROM = _CODATA_2018["Bohr"]
HARTREE_TO_EV = _CODATA_2018["Hartree"]
HARTREE_PER_BOHR_TO_EV_PER_ANGSTROM = HARTREE_TO_EV / BOHR_TO_ANGSTROM

FORMATS = ("spice", "extxyz", "aselmdb")
_EXTENSIONS = {
  ".h5": "spice",
  ".hdf5": "spice",
  ".xyz": "extxyz",
  ".extxyz": "extxyz",
  ".aselmdb": "aselmdb",
  ".lmdb": "aselmdb",
}


class DataFormatError(ValueError):
  """A data file, or one record of it, cannot be read; the message names the file, record and problem."""

  def __init__(self, path, record, problem: str):
    self.path = str(path)
    self.record = record
    self.problem = problem
    where = f"{self.path}" if record is None else f"{self.path}, record {record}"
    super().__init__(f"{where}: {problem}")


def detect_format(path: str | os.PathLike, format: str | None = None) -> str:
  """``format`` if given, else from the file extension (.h5/.hdf5, .xyz/.extxyz, .aselmdb/.lmdb)."""
  if format is not None:
    fmt = format.lower()
    if fmt in ("h5", "hdf5"):
      fmt = "spice"
    if fmt in ("xyz",):
      fmt = "extxyz"
    if fmt in ("lmdb",):
      fmt = "aselmdb"
    if fmt not in FORMATS:
      raise ValueError(f"unknown data format {format!r}; known: {', '.join(FORMATS)}")
    return fmt
  ext = Path(path).suffix.lower()
  if ext not in _EXTENSIONS:
    raise ValueError(f"{path}: cannot tell the format from the extension {ext!r}; pass format= one of {FORMATS}")
  return _EXTENSIONS[ext]


# --------------------------------------------------------------------------------------------------------------
# shared checks


def _check_numbers(path, record, numbers) -> np.ndarray:
  numbers = np.asarray(numbers)
  if numbers.ndim != 1 or numbers.shape[0] == 0:
    raise DataFormatError(path, record, f"atomic numbers have shape {numbers.shape}, expected (n_atoms,) with n >= 1")
  if not np.issubdtype(numbers.dtype, np.integer):
    if not np.all(np.isfinite(numbers)) or not np.all(numbers == np.round(numbers)):
      raise DataFormatError(path, record, "atomic numbers are not integers")
  numbers = numbers.astype(np.int64)
  bad = (numbers < 1) | (numbers > MAX_ATOMIC_NUMBER)
  if bad.any():
    raise DataFormatError(
      path, record, f"unknown element: atomic number(s) {sorted(set(numbers[bad].tolist()))} outside 1..118"
    )
  return numbers


def _check_array(path, record, name, value, shape) -> np.ndarray:
  arr = np.asarray(value, dtype=np.float64)
  if arr.shape != tuple(shape):
    raise DataFormatError(path, record, f"{name} has shape {arr.shape}, expected {tuple(shape)}")
  if not np.all(np.isfinite(arr)):
    raise DataFormatError(path, record, f"{name} contains NaN or inf")
  return arr


def _make_atoms(
  path,
  record,
  numbers,
  positions,
  energy,
  forces,
  *,
  charge=0,
  spin=1,
  config_type=None,
  source=None,
  cell=None,
  pbc=None,
  stress=None,
  extra_info=None,
) -> ase.Atoms:
  numbers = _check_numbers(path, record, numbers)
  n = numbers.shape[0]
  positions = _check_array(path, record, "positions", positions, (n, 3))
  if spin < 1:
    raise DataFormatError(path, record, f"spin multiplicity must be >= 1, got {spin}")
  atoms = ase.Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc if pbc is not None else False)
  results = {}
  if energy is not None:
    results["energy"] = float(_check_array(path, record, "energy", energy, ()))
  if forces is not None:
    results["forces"] = _check_array(path, record, "forces", forces, (n, 3))
  if stress is not None:
    s = np.asarray(stress, dtype=np.float64)
    if s.shape == (9,):
      s = s.reshape(3, 3)
    if s.shape == (3, 3):
      s = s[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    results["stress"] = _check_array(path, record, "stress", s, (6,))
  if results:
    atoms.calc = SinglePointCalculator(atoms, **results)
  info = without_system_keys(extra_info or {})
  info.update(charge=int(charge), spin=int(spin), config_type=config_type, source=source)
  if config_type is None:
    info.pop("config_type")
  atoms.info.update(info)
  return atoms


def _as_str(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    if value.size != 1:
      raise ValueError(f"expected one string, got an array of shape {value.shape}")
    return _as_str(value.reshape(-1)[0])
  return str(value)


# --------------------------------------------------------------------------------------------------------------
# SMILES formal charge

_BRACKET = re.compile(r"\[([^\[\]]*)\]")
_CHARGE_TAIL = re.compile(r"(?:([+-])(\d+)|(\++|-+))$")


def smiles_formal_charge(smiles: str) -> int:
  """Total charge = sum of the formal charges written in the SMILES bracket atoms.

  Handles ``[N+]``, ``[O-]``, ``[NH3+:7]`` (atom maps), ``[Fe+2]``, ``[Fe++]``, ``[O--]``, ``[2H]``, ``[C@@H]``.
  Atoms outside brackets are neutral by the SMILES rules.
  """
  if smiles.count("[") != smiles.count("]"):
    raise ValueError(f"unbalanced brackets in SMILES {smiles!r}")
  total = 0
  for body in _BRACKET.findall(smiles):
    body = re.sub(r":\d+$", "", body)  # atom map
    m = _CHARGE_TAIL.search(body)
    if m is None:
      continue
    if m.group(1):
      mag = int(m.group(2))
      total += mag if m.group(1) == "+" else -mag
    else:
      signs = m.group(3)
      total += len(signs) if signs[0] == "+" else -len(signs)
  return total


# --------------------------------------------------------------------------------------------------------------
# datasets


class Dataset(Sequence):
  """Indexable, sized view of a data file; ``dataset[i]`` reads record ``i`` as an ``ase.Atoms``.

  Attributes:
    path: the file.
    format: ``"spice"``, ``"extxyz"`` or ``"aselmdb"``.
    skipped: list of ``(record id, reason)`` left out with ``on_error="skip"``; empty otherwise.
  """

  format = ""

  def __init__(self, path, on_error: str = "raise"):
    if on_error not in ("raise", "skip"):
      raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    self.path = Path(path)
    self.on_error = on_error
    self.skipped: list[tuple[Any, str]] = []
    self._index = []
    if not self.path.exists():
      raise FileNotFoundError(f"{self.path}: no such file")

  # subclasses fill self._index (a list of record handles) and implement _read(handle)
  _index: list

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[k] for k in range(*i.indices(len(self)))]
    if isinstance(i, (list, tuple, np.ndarray)):
      return [self[int(k)] for k in i]
    n = len(self)
    i = int(i)
    if i < -n or i >= n:
      raise IndexError(f"record {i} out of range for {n} records in {self.path}")
    return self._read(self._index[i % n])

  def _read(self, handle) -> ase.Atoms:  # pragma: no cover - abstract
    raise NotImplementedError

  def num_atoms(self, i: int) -> int:
    """Atom count of record ``i`` (from the index where the format allows, without reading labels)."""
    return len(self[i])

  def _skip_or_raise(self, err: DataFormatError) -> None:
    if self.on_error == "raise":
      raise err
    self.skipped.append((err.record, err.problem))

  def _report_skipped(self) -> None:
    if self.skipped:
      first = "; ".join(f"record {r}: {p}" for r, p in self.skipped[:3])
      warnings.warn(
        f"{self.path}: skipped {len(self.skipped)} bad record(s) ({first}{'; ...' if len(self.skipped) > 3 else ''})",
        stacklevel=3,
      )

  def _validate_all(self) -> None:
    """Reads every record once, leaving out (and counting) those that fail."""
    good = []
    for h in self._index:
      try:
        self._read(h)
      except DataFormatError as err:
        self._skip_or_raise(err)
        continue
      good.append(h)
    self._index = good

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __repr__(self) -> str:
    return f"{type(self).__name__}({str(self.path)!r}, {len(self)} records, {len(self.skipped)} skipped)"


class SpiceDataset(Dataset):
  """SPICE HDF5 (one group per molecule; bohr, hartree; ``dft_total_gradient`` = -forces).

  One record per conformation, in file order: id ``"<group>/<conformation>"``; ``source`` is
  ``"spice:<group>/<conformation>"``. ``energy`` selects ``"dft_total_energy"`` (default) or
  ``"formation_energy"``. Group structure (datasets, shapes, elements, units) is checked when the file is
  opened; values (NaN) when a record is read, or at open time with ``validate=True`` (implied by
  ``on_error="skip"``).
  """

  format = "spice"

  def __init__(
    self,
    path,
    energy: str = "dft_total_energy",
    gradient: str = "dft_total_gradient",
    require_labels: bool = True,
    on_error: str = "raise",
    validate: bool = False,
  ):
    super().__init__(path, on_error)
    import h5py

    self.energy_key = energy
    self.gradient_key = gradient
    self.require_labels = require_labels
    try:
      self._file = h5py.File(self.path, "r")
    except OSError as err:
      raise DataFormatError(self.path, None, f"cannot open as HDF5 (truncated or corrupt file?): {err}") from None
    self._groups: dict[str, dict] = {}
    self._index = []
    try:
      names = list(self._file.keys())
    except (OSError, RuntimeError, KeyError) as err:
      raise DataFormatError(self.path, None, f"cannot list groups (truncated or corrupt file?): {err}") from None
    for name in names:
      try:
        meta = self._scan_group(name)
      except DataFormatError as err:
        self._skip_or_raise(err)
        continue
      except (OSError, RuntimeError, KeyError) as err:
        self._skip_or_raise(DataFormatError(self.path, name, f"unreadable group (corrupt file?): {err}"))
        continue
      self._groups[name] = meta
      self._index.extend((name, k) for k in range(meta["n_conf"]))
    if validate or on_error == "skip":
      self._validate_all()
    self._report_skipped()

  def _scan_group(self, name: str) -> dict:
    import h5py

    g = self._file[name]
    if not isinstance(g, h5py.Group):
      raise DataFormatError(self.path, name, "top-level entry is not a group (not a SPICE file?)")
    required = ["atomic_numbers", "conformations", "smiles"]
    if self.require_labels:
      required += [self.energy_key, self.gradient_key]
    for key in required:
      if key not in g:
        raise DataFormatError(self.path, name, f"missing key {key!r} (has {sorted(g.keys())})")
    numbers = _check_numbers(self.path, name, g["atomic_numbers"][()])
    n = numbers.shape[0]
    conf = g["conformations"]
    if conf.ndim != 3 or conf.shape[1:] != (n, 3):
      raise DataFormatError(self.path, name, f"conformations have shape {conf.shape}, expected (M, {n}, 3)")
    m = conf.shape[0]
    units = conf.attrs.get("units")
    if units is not None and _as_str(units).lower() not in ("bohr", "bohrs"):
      raise DataFormatError(
        self.path,
        name,
        f"conformations are in {_as_str(units)!r}, expected 'bohr' (a SPICE generation input "
        "file rather than the released data set?)",
      )
    if self.require_labels:
      e = g[self.energy_key]
      if e.shape != (m,):
        raise DataFormatError(self.path, name, f"{self.energy_key} has shape {e.shape}, expected ({m},)")
      eu = e.attrs.get("units")
      if eu is not None and _as_str(eu).lower() != "hartree":
        raise DataFormatError(self.path, name, f"{self.energy_key} is in {_as_str(eu)!r}, expected 'hartree'")
      gr = g[self.gradient_key]
      if gr.shape != (m, n, 3):
        raise DataFormatError(self.path, name, f"{self.gradient_key} has shape {gr.shape}, expected ({m}, {n}, 3)")
      gu = gr.attrs.get("units")
      if gu is not None and _as_str(gu).lower().replace(" ", "") != "hartree/bohr":
        raise DataFormatError(self.path, name, f"{self.gradient_key} is in {_as_str(gu)!r}, expected 'hartree/bohr'")
    try:
      smiles = _as_str(g["smiles"][()])
      charge = smiles_formal_charge(smiles)
    except ValueError as err:
      raise DataFormatError(self.path, name, f"bad smiles: {err}") from None
    subset = _as_str(g["subset"][()]) if "subset" in g else None
    return {"numbers": numbers, "n_conf": m, "smiles": smiles, "charge": charge, "subset": subset}

  def num_atoms(self, i: int) -> int:
    return int(self._groups[self._index[i][0]]["numbers"].shape[0])

  def _read(self, handle) -> ase.Atoms:
    name, k = handle
    meta = self._groups[name]
    g = self._file[name]
    record = f"{name}/{k}"
    try:
      pos = np.asarray(g["conformations"][k], dtype=np.float64) * BOHR_TO_ANGSTROM
      energy = forces = None
      if self.require_labels:
        energy = float(g[self.energy_key][k]) * HARTREE_TO_EV
        forces = -np.asarray(g[self.gradient_key][k], dtype=np.float64) * HARTREE_PER_BOHR_TO_EV_PER_ANGSTROM
    except (OSError, RuntimeError) as err:
      raise DataFormatError(self.path, record, f"unreadable data (truncated or corrupt file?): {err}") from None
    return _make_atoms(
      self.path,
      record,
      meta["numbers"],
      pos,
      energy,
      forces,
      charge=meta["charge"],
      spin=1,
      config_type=meta["subset"],
      source=f"spice:{record}",
      extra_info={"smiles": meta["smiles"]},
    )

  def close(self) -> None:
    f = getattr(self, "_file", None)
    if f is not None:
      f.close()


class ExtxyzDataset(Dataset):
  """Extended XYZ, keys defaulting to MACE's (``REF_energy``, ``REF_forces``, ``config_type``); the charge and
  the multiplicity from any of their spellings (``charge``/``total_charge``, ``spin``/``total_spin``/
  ``multiplicity``, which must agree) unless ``charge_key`` / ``spin_key`` name the one key to read.

  The file is indexed by frame (byte offsets) when opened and each frame is parsed when read; records are
  frame numbers (0-based). ``source`` is the frame's ``source_key`` entry when present, else
  ``"<file name>:<frame>"``. Missing charge means 0, missing spin means 1. ``energy_key="energy"`` /
  ``forces_key="forces"`` read the values that ASE puts on its own calculator.
  """

  format = "extxyz"

  def __init__(
    self,
    path,
    energy_key: str = "REF_energy",
    forces_key: str = "REF_forces",
    config_type_key: str = "config_type",
    charge_key: str | None = None,
    spin_key: str | None = None,
    source_key: str = "source",
    stress_key: str | None = "REF_stress",
    require_labels: bool = True,
    on_error: str = "raise",
    validate: bool = False,
  ):
    super().__init__(path, on_error)
    self.keys = dict(
      energy=energy_key,
      forces=forces_key,
      config_type=config_type_key,
      charge=charge_key,
      spin=spin_key,
      source=source_key,
      stress=stress_key,
    )
    self.require_labels = require_labels
    self._index = []
    self._lock = threading.Lock()
    self._fh = open(self.path, "rb")
    self._scan()
    if validate or on_error == "skip":
      self._validate_all()
    self._report_skipped()

  def _scan(self) -> None:
    fh = self._fh
    fh.seek(0)
    frame = 0
    while True:
      start = fh.tell()
      line = fh.readline()
      if not line:
        break
      if not line.strip():  # blank lines between frames or at the end
        continue
      try:
        n = int(line.split()[0])
        if n < 1:
          raise ValueError
      except ValueError:
        # frame boundaries are lost from here on: this cannot be skipped
        raise DataFormatError(
          self.path, frame, f"expected an atom count line, got {line.strip()[:60]!r} (corrupt file?)"
        ) from None
      lines = 0
      while lines < n + 1:
        if not fh.readline():
          break
        lines += 1
      if lines < n + 1:
        self._skip_or_raise(
          DataFormatError(
            self.path, frame, f"truncated: {n} atoms announced, file ends after {max(lines - 1, 0)} atom lines"
          )
        )
        break
      self._index.append((frame, start, fh.tell(), n))
      frame += 1

  def num_atoms(self, i: int) -> int:
    return int(self._index[i][3])

  def close(self) -> None:
    fh = getattr(self, "_fh", None)
    if fh is not None:
      fh.close()

  def _value(self, atoms, record, kind, required):
    key = self.keys[kind]
    if key is None:
      return None
    if kind in ("forces",) and key in atoms.arrays:
      return atoms.arrays[key]
    if key in atoms.info:
      return atoms.info[key]
    if atoms.calc is not None and key in getattr(atoms.calc, "results", {}):
      return atoms.calc.results[key]
    if required:
      have = sorted(set(atoms.info) | set(atoms.arrays) | set(getattr(atoms.calc, "results", {}) or {}))
      raise DataFormatError(self.path, record, f"missing key {key!r} (frame has {have})")
    return None

  def _read(self, handle) -> ase.Atoms:
    from ase.io.extxyz import read_xyz

    frame, start, stop, _ = handle
    with self._lock:
      self._fh.seek(start)
      text = self._fh.read(stop - start).decode("utf-8", errors="replace")
    try:
      atoms = next(read_xyz(io.StringIO(text), 0))
    except Exception as err:  # ASE raises several exception types for malformed frames
      raise DataFormatError(self.path, frame, f"cannot parse frame: {type(err).__name__}: {err}") from None
    req = self.require_labels
    energy = self._value(atoms, frame, "energy", req)
    forces = self._value(atoms, frame, "forces", req)
    stress = self._value(atoms, frame, "stress", False)
    config_type = self._value(atoms, frame, "config_type", False)
    source = self._value(atoms, frame, "source", False)
    try:
      charge, spin = charge_and_multiplicity(atoms.info, self.keys["charge"], self.keys["spin"])
    except ValueError as err:
      raise DataFormatError(self.path, frame, str(err)) from None
    used = {v for v in self.keys.values() if v}
    extra = {k: v for k, v in atoms.info.items() if k not in used}
    return _make_atoms(
      self.path,
      frame,
      atoms.numbers,
      atoms.positions,
      energy,
      forces,
      charge=charge,
      spin=spin,
      config_type=None if config_type is None else str(config_type),
      source=str(source) if source is not None else f"{self.path.name}:{frame}",
      cell=atoms.cell.array if atoms.pbc.any() or atoms.cell.rank else None,
      pbc=atoms.pbc,
      stress=stress,
      extra_info=extra,
    )


class AselmdbDataset(Dataset):
  """OMol25-style ASE LMDB (``*.aselmdb``, read with ase-db-backends: the ``omol25`` extra).

  Records are row positions 0..len-1 (row ids in ``self.row_ids``). Energy and forces come from the row's
  calculator results; the charge, the multiplicity (any of their spellings unless ``charge_key`` / ``spin_key``
  name one) and ``source`` from the row's ``data`` (as fairchem does), with ``key_value_pairs`` as a fallback;
  ``config_type`` from ``data['data_id']`` or ``data['config_type']`` if
  present. A row without ``source`` gets ``"<file name>:<row id>"``.
  """

  format = "aselmdb"

  def __init__(
    self,
    path,
    charge_key: str | None = None,
    spin_key: str | None = None,
    source_key: str = "source",
    config_type_keys: Sequence[str] = ("config_type", "data_id"),
    require_labels: bool = True,
    on_error: str = "raise",
    validate: bool = False,
  ):
    super().__init__(path, on_error)
    try:
      import ase_db_backends.aselmdb  # noqa: F401  (registers nothing; checks the package is there)
    except ImportError:
      raise ImportError(
        f"{self.path}: reading OMol25 .aselmdb files needs the optional 'ase-db-backends' package: "
        "pip install 'e2former-jax[omol25]' (or pip install -e '.[omol25]' in a checkout)"
      ) from None
    from ase.db import connect

    self.keys = dict(charge=charge_key, spin=spin_key, source=source_key)
    self.config_type_keys = tuple(config_type_keys)
    self.require_labels = require_labels
    try:
      self._db = connect(str(self.path), type="aselmdb", readonly=True, use_lock_file=False)
      self.row_ids = list(self._db.ids)
    except Exception as err:
      if "already open" in str(err):
        raise DataFormatError(
          self.path,
          None,
          "already open in this process (LMDB allows one environment per "
          "file and process): close the other dataset or reuse it",
        ) from None
      raise DataFormatError(
        self.path, None, f"cannot open as aselmdb (truncated or corrupt file?): {type(err).__name__}: {err}"
      ) from None
    self._index = list(self.row_ids)
    if validate or on_error == "skip":
      self._validate_all()
    self._report_skipped()

  def _read(self, row_id) -> ase.Atoms:
    try:
      row = self._db.get(id=row_id)
    except Exception as err:
      raise DataFormatError(self.path, row_id, f"unreadable row (corrupt file?): {type(err).__name__}: {err}") from None
    data = dict(row.get("data") or {})
    kvp = dict(row.get("key_value_pairs") or {})

    def pick(key):
      if key in data:
        return data[key]
      return kvp.get(key)

    energy = row.get("energy")
    forces = row.get("forces")
    if self.require_labels:
      if energy is None:
        raise DataFormatError(self.path, row_id, "missing key 'energy' (row has no calculator energy)")
      if forces is None:
        raise DataFormatError(self.path, row_id, "missing key 'forces' (row has no calculator forces)")
    source = pick(self.keys["source"])
    config_type = next((pick(k) for k in self.config_type_keys if pick(k) is not None), None)
    try:
      charge, spin = charge_and_multiplicity({**kvp, **data}, self.keys["charge"], self.keys["spin"])
    except ValueError as err:
      raise DataFormatError(self.path, row_id, str(err)) from None
    used = {v for v in self.keys.values() if v} | set(self.config_type_keys)
    extra = {k: v for k, v in data.items() if k not in used and np.ndim(v) == 0}
    numbers = np.asarray(row.get("numbers"))
    pbc = np.asarray(row.get("pbc", [False] * 3), dtype=bool)
    cell = np.asarray(row.get("cell")) if row.get("cell") is not None else None
    return _make_atoms(
      self.path,
      row_id,
      numbers,
      row.get("positions"),
      energy,
      forces,
      charge=charge,
      spin=spin,
      config_type=None if config_type is None else str(config_type),
      source=str(source) if source is not None else f"{self.path.name}:{row_id}",
      cell=cell,
      pbc=pbc,
      stress=row.get("stress"),
      extra_info=extra,
    )

  def close(self) -> None:
    db = getattr(self, "_db", None)
    if db is not None:
      try:
        db.close()
      except Exception:
        pass
      self._db = None


_DATASETS: dict[str, Callable[..., Dataset]] = {
  "spice": SpiceDataset,
  "extxyz": ExtxyzDataset,
  "aselmdb": AselmdbDataset,
}


def open_dataset(path: str | os.PathLike, format: str | None = None, **keys) -> Dataset:
  """Opens a data file as a lazy, indexable ``Dataset`` of ``ase.Atoms`` (length known up front).

  Args:
    path: the file.
    format: ``"spice"`` (HDF5), ``"extxyz"`` or ``"aselmdb"``; default from the extension.
    **keys: reader options, e.g. ``energy="formation_energy"`` (SPICE), ``energy_key=...`` (extxyz),
      ``on_error="skip"`` (leave out bad records, counted in ``.skipped``), ``require_labels=False``.
  """
  fmt = detect_format(path, format)
  cls = _DATASETS[fmt]
  options = [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "path")]
  unknown = sorted(set(keys) - set(options))
  if unknown:
    raise ValueError(f"{path}: the {fmt} reader has no option {', '.join(map(repr, unknown))} (its options: {options})")
  return cls(path, **keys)


def load(path: str | os.PathLike, format: str | None = None, **keys) -> list[ase.Atoms]:
  """Reads a whole data file into a list of ``ase.Atoms`` (see ``open_dataset`` for the options)."""
  ds = open_dataset(path, format, **keys)
  try:
    return [ds[i] for i in range(len(ds))]
  finally:
    ds.close()
