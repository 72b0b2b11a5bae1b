"""The MD blow-up guard's limits and messages (no dynamics: ``Guard.check`` on given per-step values)."""

import math

import numpy as np
import pytest

from e2former_jax.md import BlowUpLimits, MDBlowUpError
from e2former_jax.md.guard import Guard


def nve_guard(start_temperature=300.0, limits=None):
  limits = BlowUpLimits() if limits is None else limits
  return Guard(limits, "nve", num_atoms=10, start_temperature=start_temperature, start_total=-100.0)


def test_default_temperature_limit_is_ten_times_the_reference_and_at_least_5000_K():
  assert nve_guard(300.0).temperature_limit == 5000.0
  assert nve_guard(1200.0).temperature_limit == 12000.0
  nvt = Guard(BlowUpLimits(), "nvt", 10, start_temperature=0.0, start_total=0.0, bath_temperature=800.0)
  assert nvt.temperature_limit == 8000.0 and nvt.drift_limit == math.inf  # NVT: no energy-drift limit
  assert nve_guard(limits=BlowUpLimits(max_temperature_K=700.0)).temperature_limit == 700.0


def test_the_first_crossing_is_named_with_its_limit_and_remedy():
  guard = nve_guard()
  steps = np.arange(5)
  calm = dict(temperature=np.full(5, 310.0), max_force=np.full(5, 3.0), total=np.full(5, -100.0))
  guard.check(steps, steps * 0.5, calm["temperature"], calm["max_force"], calm["total"])  # nothing crossed
  hot = calm["temperature"].copy()
  hot[3:] = 6000.0
  with pytest.raises(MDBlowUpError, match=r"step 3 \(1.5 fs\): temperature 6000 K exceeds the limit 5000 K") as err:
    guard.check(steps, steps * 0.5, hot, calm["max_force"], calm["total"])
  assert (err.value.step, err.value.quantity, err.value.limit) == (3, "temperature", 5000.0)
  assert "BlowUpLimits.max_temperature_K, e2former-md --max-temperature" in str(err.value)
  with pytest.raises(MDBlowUpError, match=r"largest force 250 eV/A exceeds the limit 100 eV/A.*--max-force"):
    guard.check(7, 3.5, 310.0, 250.0, -100.0)
  with pytest.raises(MDBlowUpError, match=r"drifted by 0.2 eV/atom.*limit 0.1 eV/atom \(NVE\).*--max-energy-drift"):
    guard.check(7, 3.5, 310.0, 3.0, -98.0)  # +2 eV over 10 atoms
  with pytest.raises(MDBlowUpError, match="temperature is not finite"):
    guard.check(8, 4.0, np.nan, 3.0, np.nan)


def test_limits_can_be_turned_off_but_not_set_to_nonsense():
  off = BlowUpLimits(max_temperature_K=math.inf, max_force=math.inf, max_energy_drift=math.inf)
  nve_guard(limits=off).check(1, 0.5, 1e6, 1e4, 1e6)
  with pytest.raises(MDBlowUpError, match="not finite"):
    nve_guard(limits=off).check(1, 0.5, np.inf, 1.0, -100.0)
  with pytest.raises(ValueError, match=r"BlowUpLimits.max_force must be > 0"):
    BlowUpLimits(max_force=0.0)
