"""The blow-up guard of both MD drivers: a run stops with ``MDBlowUpError`` when the temperature, the largest
force on an atom or (NVE) the drift of the total energy crosses a stated limit, or when one of them is not
finite, instead of integrating an exploded structure to the end.

The limits (``BlowUpLimits``) are fixed at the start of a run (``Guard``): the temperature limit defaults to
max(10 x the reference temperature, 5000 K), the reference being the higher of the starting temperature and
the bath's (NVT); the force limit to 100 eV/A; the drift limit to 0.1 eV/atom (about the kinetic energy per
atom at 770 K: a run that gained or lost that much is no longer the system it started as). Any limit can be
``math.inf`` (off).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

TEMPERATURE_FACTOR = 10.0
MIN_TEMPERATURE_LIMIT = 5000.0  # K
DEFAULT_MAX_FORCE = 100.0  # eV/A
DEFAULT_MAX_DRIFT = 0.1  # eV/atom


class MDBlowUpError(RuntimeError):
  """MD stopped because a guarded quantity crossed its limit.

  Attributes:
    step: the MD step at which it was seen.
    quantity: "temperature", "force" or "energy drift".
    value: its value (K, eV/A or eV/atom; nan when not finite).
    limit: the limit it crossed (same unit).
  """

  def __init__(self, message: str, step: int, quantity: str, value: float, limit: float):
    super().__init__(message)
    self.step, self.quantity, self.value, self.limit = step, quantity, value, limit


@dataclasses.dataclass(frozen=True)
class BlowUpLimits:
  """Limits of the blow-up guard (``math.inf`` turns one off).

  Attributes:
    max_temperature_K: None: max(10 x the reference temperature, 5000 K), reference = max(starting
      temperature, bath temperature).
    max_force: eV/A, the largest force on one atom.
    max_energy_drift: eV/atom, |E_total(t) - E_total(0)| / atoms; NVE runs only.
  """

  max_temperature_K: float | None = None
  max_force: float = DEFAULT_MAX_FORCE
  max_energy_drift: float = DEFAULT_MAX_DRIFT

  def __post_init__(self):
    for name in ("max_temperature_K", "max_force", "max_energy_drift"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ValueError(f"BlowUpLimits.{name} must be > 0 (math.inf turns it off), got {value!r}")


def exceeded(temperature, max_force, drift_per_atom, temperature_limit, force_limit, drift_limit):
  """(hot, strong, drifted): each quantity beyond its limit or not finite, also with the limit off (numpy or
  jax arrays alike)."""
  beyond = lambda x, limit: ~((x <= limit) & (x < math.inf))
  return (
    beyond(temperature, temperature_limit),
    beyond(max_force, force_limit),
    beyond(abs(drift_per_atom), drift_limit),
  )


class Guard:
  """The limits of one run, fixed at its start.

  Args:
    limits: ``BlowUpLimits``.
    ensemble: "nve" or "nvt" (the drift is guarded in NVE only).
    num_atoms: real atoms (the drift is per atom).
    start_temperature: K, at step 0.
    start_total: eV, total energy at step 0.
    bath_temperature: K (NVT), or None.
  """

  def __init__(
    self,
    limits: BlowUpLimits,
    ensemble: str,
    num_atoms: int,
    start_temperature: float,
    start_total: float,
    bath_temperature: float | None = None,
  ):
    reference = max(float(start_temperature), float(bath_temperature or 0.0))
    if limits.max_temperature_K is None:
      self.temperature_limit = max(TEMPERATURE_FACTOR * reference, MIN_TEMPERATURE_LIMIT)
      source = "bath" if bath_temperature is not None and bath_temperature >= start_temperature else "starting"
      self.temperature_reason = (
        f"max({TEMPERATURE_FACTOR:g} x the {source} {reference:.0f} K, {MIN_TEMPERATURE_LIMIT:.0f} K)"
      )
    else:
      self.temperature_limit, self.temperature_reason = float(limits.max_temperature_K), "set"
    self.force_limit = float(limits.max_force)
    self.drift_limit = float(limits.max_energy_drift) if ensemble == "nve" else math.inf
    self.num_atoms = int(num_atoms)
    self.start_total = float(start_total)

  def check(self, step, time_fs, temperature, max_force, total) -> None:
    """Raises ``MDBlowUpError`` for the first of these steps (arrays, or one step's scalars) where a quantity
    crosses its limit."""
    step, time_fs = np.atleast_1d(step), np.atleast_1d(time_fs)
    temperature, max_force = np.atleast_1d(temperature), np.atleast_1d(max_force)
    drift = (np.atleast_1d(total) - self.start_total) / self.num_atoms
    hot, strong, drifted = exceeded(
      temperature, max_force, drift, self.temperature_limit, self.force_limit, self.drift_limit
    )
    bad = np.flatnonzero(hot | strong | drifted)
    if len(bad) == 0:
      return
    i = bad[0]
    where = f"MD stopped at step {int(step[i])} ({float(time_fs[i]):g} fs): "
    if hot[i]:
      quantity, value, limit, field = "temperature", temperature[i], self.temperature_limit, "temperature"
      text = f"temperature {value:.4g} K exceeds the limit {limit:.4g} K ({self.temperature_reason})"
    elif strong[i]:
      quantity, value, limit, field = "force", max_force[i], self.force_limit, "force"
      text = f"largest force {value:.4g} eV/A exceeds the limit {limit:.4g} eV/A"
    else:
      quantity, value, limit, field = "energy drift", drift[i], self.drift_limit, "energy-drift"
      text = f"total energy drifted by {value:.4g} eV/atom since step 0, beyond the limit {limit:.4g} eV/atom (NVE)"
    if not np.isfinite(value):
      text = f"{quantity} is not finite"
    name = "max_temperature_K" if field == "temperature" else "max_" + field.replace("-", "_")
    raise MDBlowUpError(
      f"{where}{text}; use a smaller time step, or change the limit (BlowUpLimits.{name}, e2former-md --max-{field})",
      int(step[i]),
      quantity,
      float(value),
      limit,
    )
