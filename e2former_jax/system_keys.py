"""Total charge and spin multiplicity of a structure: the ``atoms.info`` keys that hold them and what they mean.

One definition for the readers, graph building, the ASE calculator, evaluation and MD (docs/data.md §5):

* **total charge** in e: ``charge`` or ``total_charge``; 0 when absent;
* **spin multiplicity** 2S+1 (1 singlet, 2 doublet, 3 triplet; never S, never the number of unpaired
  electrons): ``spin``, ``total_spin`` (MACE's and the MACE-OFF files' spelling, a multiplicity there too) or
  ``multiplicity``; 1 when absent.

Several spellings may be present at once; they must then agree, otherwise the structure is refused with an
error that shows every value. A key named explicitly (``charge_key=``, ``--charge-key``) is the only one read.

Values must be whole numbers: Python or numpy integers, or floats with an integral value (extxyz files often
write ``total_charge=0.0``). Text such as ``"1"`` and booleans are refused: they are a mistake in the file or
the script, and guessing would hide it.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import numpy as np

CHARGE_KEYS = ("charge", "total_charge")
SPIN_KEYS = ("spin", "total_spin", "multiplicity")
DEFAULT_CHARGE = 0
DEFAULT_MULTIPLICITY = 1
SYSTEM_KEYS = CHARGE_KEYS + SPIN_KEYS
"""Every spelling of the charge and the multiplicity (what a calculator watches for changes)."""


def _plain(value):
  """numpy scalars and one-element arrays as Python scalars (so messages show ``1``, not ``np.int64(1)``)."""
  if isinstance(value, np.ndarray) and value.size == 1:
    return value.reshape(()).item()
  if isinstance(value, np.generic):
    return value.item()
  return value


def integer_value(value, key: str) -> int:
  """``value`` of ``info[key]`` as an int; ``ValueError`` showing its repr when it is not a whole number."""
  value = _plain(value)
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{key} must be an integer, got {value!r} (a {type(value).__name__})")
  if not np.isfinite(value) or value != round(value):
    raise ValueError(f"{key} must be an integer, got {value!r}")
  return int(round(value))


def _read(info: Mapping, keys: tuple[str, ...], default: int, what: str) -> int:
  found = {k: info[k] for k in keys if k in info and info[k] is not None}
  if not found:
    return default
  values = {k: integer_value(v, k) for k, v in found.items()}
  if len(set(values.values())) > 1:
    given = ", ".join(f"{k}={_plain(v)!r}" for k, v in found.items())
    raise ValueError(
      f"the {what} is given more than once with different values ({given}): keep one, or name the key to read"
    )
  return next(iter(values.values()))


def _keys(key: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
  if key is None:
    return default
  if not isinstance(key, str) or not key:
    raise ValueError(f"a key name must be a non-empty string, got {key!r}")
  return (key,)


def total_charge(info: Mapping, key: str | None = None) -> int:
  """Total charge (e) in ``info``: ``key`` alone when given, else any of ``CHARGE_KEYS``; 0 when absent."""
  return _read(info, _keys(key, CHARGE_KEYS), DEFAULT_CHARGE, "total charge")


def multiplicity(info: Mapping, key: str | None = None) -> int:
  """Spin multiplicity 2S+1 in ``info``: ``key`` alone when given, else any of ``SPIN_KEYS``; 1 when absent."""
  keys = _keys(key, SPIN_KEYS)
  value = _read(info, keys, DEFAULT_MULTIPLICITY, "spin multiplicity")
  if value < 1:
    used = next(k for k in keys if k in info and info[k] is not None)
    raise ValueError(
      f"spin multiplicity must be >= 1 (2S+1: 1 singlet, 2 doublet), got {_plain(info[used])!r} ({used})"
    )
  return value


def charge_and_multiplicity(
  info: Mapping, charge_key: str | None = None, spin_key: str | None = None, where: str | None = None
) -> tuple[int, int]:
  """(total charge, multiplicity) of ``info``; errors start with ``where`` (e.g. the structure) when given."""
  try:
    return total_charge(info, charge_key), multiplicity(info, spin_key)
  except ValueError as err:
    raise ValueError(f"{where}: {err}" if where else str(err)) from None


def without_system_keys(info: Mapping, *named: str | None) -> dict:
  """``info`` without any spelling of the charge or multiplicity (nor the ``named`` keys)."""
  drop = set(SYSTEM_KEYS) | {k for k in named if k}
  return {k: v for k, v in info.items() if k not in drop}


__all__ = [
  "CHARGE_KEYS",
  "SPIN_KEYS",
  "SYSTEM_KEYS",
  "DEFAULT_CHARGE",
  "DEFAULT_MULTIPLICITY",
  "integer_value",
  "total_charge",
  "multiplicity",
  "charge_and_multiplicity",
  "without_system_keys",
]
