"""The reference labels stored with a structure."""

from __future__ import annotations

import ase


def stored_results(atoms: ase.Atoms) -> dict:
  """The labels a structure carries (``atoms.calc.results``: "energy", "forces", "stress", ...; {} when none).

  Reads what a reader or a ``SinglePointCalculator`` stored; never runs a calculator.
  """
  return dict(getattr(atoms.calc, "results", None) or {}) if atoms.calc is not None else {}
