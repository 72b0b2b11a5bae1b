"""Warnings that point at the user's line, not at this package's or ASE's internals."""

from __future__ import annotations

import os
import warnings

import ase

_INTERNAL = (
  os.path.dirname(os.path.abspath(__file__)) + os.sep,
  os.path.dirname(os.path.abspath(ase.__file__)) + os.sep,
)


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
  """``warnings.warn`` attributed to the first calling frame outside e2former_jax and ASE (the script's line that
  asked for an energy, also through ``atoms.get_potential_energy()`` or an ASE integrator)."""
  warnings.warn(message, category, skip_file_prefixes=_INTERNAL)
