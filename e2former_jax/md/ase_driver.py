"""MD through ASE with ``E2FormerCalculator``, and the log and trajectory writers both drivers share."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import ase
import ase.io
import ase.units
import numpy as np
from ase.md.langevin import Langevin
from ase.md.verlet import VelocityVerlet

from e2former_jax.md.guard import BlowUpLimits, Guard

ENSEMBLES = ("nve", "nvt")


class MDLog:
  """A plain-text MD log: a commented header, then one row per logged step.

  Columns: step, time (ps), potential, kinetic and total energy (eV), temperature (K), in-cutoff neighbour
  pairs beyond the K slots, and ns/day over the wall time since the previous row (the first row has none).
  """

  COLUMNS = ("step", "time_ps", "epot_eV", "ekin_eV", "etot_eV", "T_K", "beyond_K", "ns_per_day")

  def __init__(self, path: str | os.PathLike | None, header: dict | None = None):
    self.path = path
    self._file = open(path, "w") if path is not None else None
    self._last: tuple[float, float] | None = None  # (wall seconds, simulated fs) of the previous row
    if self._file is not None:
      for key, value in (header or {}).items():
        self._file.write(f"# {key}: {value}\n")
      self._file.write("# " + " ".join(f"{c:>14}" for c in self.COLUMNS) + "\n")
      self._file.flush()

  def row(
    self,
    step: int,
    time_fs: float,
    epot: float,
    ekin: float,
    temperature: float,
    beyond_k: int = 0,
    wall: float | None = None,
  ) -> float:
    """Writes one row; returns the ns/day since the previous row (nan for the first)."""
    wall = time.perf_counter() if wall is None else wall
    rate = float("nan")
    if self._last is not None and wall > self._last[0] and time_fs > self._last[1]:
      rate = simulated_ns_per_day(time_fs - self._last[1], wall - self._last[0])
    self._last = (wall, time_fs)
    if self._file is not None:
      values = (step, time_fs * 1e-3, epot, ekin, epot + ekin, temperature, beyond_k, rate)
      self._file.write(
        "  " + " ".join(f"{v:>14d}" if isinstance(v, (int, np.integer)) else f"{v:>14.6f}" for v in values) + "\n"
      )
      self._file.flush()
    return rate

  def comment(self, text: str) -> None:
    if self._file is not None:
      self._file.write(f"# {text}\n")
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


def read_log(path) -> dict[str, np.ndarray]:
  """Reads an ``MDLog`` file back into column arrays."""
  data = np.loadtxt(path, comments="#", ndmin=2)
  return {c: data[:, i] for i, c in enumerate(MDLog.COLUMNS)}


def write_frame(path, atoms: ase.Atoms) -> None:
  """Appends one extxyz frame (positions, velocities via momenta, energy and forces when attached)."""
  ase.io.write(path, atoms, format="extxyz", append=True)


def beyond_k(atoms: ase.Atoms, calc) -> int:
  """In-cutoff neighbour pairs of ``atoms`` beyond the K slots of ``calc``'s model (-1 for other calculators).

  Counted with the host neighbour builder, so the ASE log reports what the JAX driver counts on the device.
  """
  config = getattr(calc, "config", None)
  if config is None:
    return -1
  from e2former_jax.neighbors.host import k_nearest_neighbors

  return k_nearest_neighbors(
    atoms.get_positions(), config.cutoff, config.max_neighbors, atoms.cell.array, atoms.pbc
  ).num_beyond_k


def initial_velocities(atoms: ase.Atoms, temperature_K: float, seed: int = 0) -> None:
  """Maxwell-Boltzmann momenta at ``temperature_K`` (seeded), centre-of-mass motion removed, and for a
  molecule (no periodic axis) the rigid rotation too; the temperature is rescaled back after each removal."""
  from ase.md import velocitydistribution as vd

  rng = np.random.default_rng(seed)
  if hasattr(vd, "thermalize_momenta"):  # ASE >= 3.29
    vd.thermalize_momenta(atoms, temperature_K=temperature_K, rng=rng)
  else:
    vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
  vd.Stationary(atoms)
  if not atoms.pbc.any():
    vd.ZeroRotation(atoms)


def make_dynamics(
  atoms: ase.Atoms,
  timestep_fs: float = 0.5,
  ensemble: str = "nve",
  temperature_K: float | None = None,
  friction_per_fs: float = 0.01,
  seed: int = 0,
):
  """ASE ``VelocityVerlet`` (NVE) or ``Langevin`` (NVT, ``fixcm=False``) for ``atoms`` (calculator attached)."""
  if ensemble not in ENSEMBLES:
    raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
  dt = timestep_fs * ase.units.fs
  if ensemble == "nve":
    return VelocityVerlet(atoms, timestep=dt)
  if temperature_K is None:
    raise ValueError("ensemble='nvt' needs temperature_K")
  return Langevin(
    atoms,
    timestep=dt,
    temperature_K=temperature_K,
    friction=friction_per_fs / ase.units.fs,
    fixcm=False,
    rng=np.random.default_rng(seed),
  )


def run_ase_md(
  atoms: ase.Atoms,
  steps: int,
  *,
  timestep_fs: float = 0.5,
  ensemble: str = "nve",
  temperature_K: float | None = None,
  friction_per_fs: float = 0.01,
  seed: int = 0,
  interval: int = 10,
  trajectory=None,
  log: MDLog | None = None,
  limits: BlowUpLimits | None = None,
  callback: Callable[[int, dict], None] | None = None,
) -> dict[str, np.ndarray]:
  """Runs ASE MD on ``atoms`` (its calculator attached, e.g. ``E2FormerCalculator``).

  Records every step; writes a trajectory frame (extxyz, appended) and a log row every ``interval`` steps
  and at step 0. The blow-up guard (``e2former_jax.md.guard``, ``limits``; default ``BlowUpLimits()``) checks
  every step; ``callback(step, row)`` is called after each step with its observables.

  Returns:
    Per-step arrays "step", "time_fs", "potential", "kinetic", "total" (eV), "temperature" (K), "max_force"
    (eV/A, largest on one atom) and "seconds" (wall time of each step, 0 for step 0; the first step includes
    the compilation).

  Raises:
    MDBlowUpError: when a step crosses a guard limit; ``atoms`` is left at that step.
  """
  dyn = make_dynamics(atoms, timestep_fs, ensemble, temperature_K, friction_per_fs, seed)
  limits = BlowUpLimits() if limits is None else limits
  rows = {k: [] for k in ("step", "potential", "kinetic", "temperature", "max_force", "seconds")}
  calc = atoms.calc
  clock = [time.perf_counter()]
  guards: list[Guard] = []

  def record():
    now = time.perf_counter()
    step = dyn.nsteps
    epot, ekin = atoms.get_potential_energy(), atoms.get_kinetic_energy()
    temperature = atoms.get_temperature()
    max_force = float(np.sqrt(np.max(np.sum(atoms.get_forces() ** 2, axis=-1))))
    row = dict(step=step, potential=epot, kinetic=ekin, temperature=temperature, max_force=max_force)
    row["seconds"] = now - clock[0] if step else 0.0
    for key, value in row.items():
      rows[key].append(value)
    clock[0] = now
    if step % interval == 0:
      if trajectory is not None:
        write_frame(trajectory, atoms)
      if log is not None:
        log.row(step, step * timestep_fs, epot, ekin, temperature, beyond_k(atoms, calc), wall=now)
    if not guards:
      bath = temperature_K if ensemble == "nvt" else None
      guards.append(Guard(limits, ensemble, len(atoms), temperature, epot + ekin, bath))
    guards[0].check(step, step * timestep_fs, temperature, max_force, epot + ekin)
    if callback is not None:
      callback(step, row)

  dyn.attach(record, interval=1)  # ASE calls observers at step 0 too
  dyn.run(steps)
  out = {k: np.asarray(v) for k, v in rows.items()}
  out["time_fs"] = out["step"] * timestep_fs
  out["total"] = out["potential"] + out["kinetic"]
  return out


def simulated_ns_per_day(simulated_fs: float, wall_seconds: float) -> float:
  """Simulated ns per wall-clock day: ``simulated_fs`` of dynamics in ``wall_seconds``."""
  return simulated_fs * 1e-6 / (wall_seconds / 86400.0)


def ns_per_day(seconds_per_step: np.ndarray, timestep_fs: float) -> float:
  """Simulated ns per wall-clock day at the median step time."""
  return simulated_ns_per_day(timestep_fs, float(np.median(seconds_per_step)))


def run_statistics(rows: dict[str, np.ndarray], ensemble: str, num_atoms: int) -> str:
  """What a run's rows say about its health: NVE, the total energy's spread (max - min) and drift (last -
  first) per atom; NVT, the temperature's mean and standard deviation over the steps after step 0 (the total
  energy is not conserved under a thermostat)."""
  if ensemble == "nvt":
    temperature = rows["temperature"][1:] if len(rows["temperature"]) > 1 else rows["temperature"]
    return f"temperature {np.mean(temperature):.1f} +- {np.std(temperature):.1f} K (mean +- std over the run)"
  total = rows["total"]
  spread = float(np.ptp(total)) if len(total) else 0.0
  drift = float(total[-1] - total[0]) if len(total) else 0.0
  return f"total-energy spread {1000 * spread / num_atoms:.3f} meV/atom, drift {1000 * drift / num_atoms:+.3f} meV/atom"
