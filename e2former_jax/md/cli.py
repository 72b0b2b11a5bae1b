"""``e2former-md``: molecular dynamics of one structure from an xyz/extxyz file with a trained model.

    e2former-md molecule.xyz --checkpoint RUN_DIR --steps 2000 --timestep 0.5 --temperature 300 \\
        --ensemble nvt --trajectory md.extxyz --log md.log [--driver jax]

Writes an extxyz trajectory (positions, momenta, energy, forces every ``--interval`` steps) and a log (one
row every ``--interval`` steps: potential, kinetic and total energy, temperature, in-cutoff neighbour pairs
beyond the model's K slots, ns/day), shows a progress bar with ns/day, and prints a summary: for NVE the
total-energy spread and drift per atom, for NVT the temperature's mean and standard deviation. ``--driver jax``
runs the jitted loop (``e2former_jax.md.JaxMD``; molecules, periodic cells and slabs), the fastest way; its
chunks are ``--interval`` steps long.

A run that blows up stops: when the temperature exceeds ``--max-temperature`` (default max(10 x the starting or
bath temperature, 5000 K)), a force exceeds ``--max-force`` (100 eV/A) or, in NVE, the total energy drifts more
than ``--max-energy-drift`` (0.1 eV/atom) from step 0, it prints one line naming the limit, writes the structure
where it stopped as the last trajectory frame, and exits with status 3 (``EXIT_BLOW_UP``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import ase
import ase.io
import numpy as np

from e2former_jax.cli_errors import UsageError, add_debug_flag, one_line, run_command
from e2former_jax.md.ase_driver import simulated_ns_per_day

EXIT_BLOW_UP = 3  # the run stopped at a guard limit (e2former_jax.md.guard)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="e2former-md", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("structure", help="xyz/extxyz (or any ASE-readable) file with the starting structure")
  p.add_argument("--index", default="0", help="frame of the file to start from (ASE index, default 0)")
  model = p.add_mutually_exclusive_group(required=True)
  model.add_argument("--checkpoint", help="training run directory or checkpoint step directory")
  model.add_argument(
    "--random-model",
    metavar="PRESET",
    help="a randomly initialised model of this preset (for testing the machinery only)",
  )
  p.add_argument(
    "--driver",
    choices=("ase", "jax"),
    default="ase",
    help="ase: ASE integrators with E2FormerCalculator; jax: the jitted loop, neighbour list, model and integrator "
    "compiled together, the fastest (molecules, periodic cells, slabs; default ase)",
  )
  p.add_argument(
    "--ensemble",
    choices=("nve", "nvt"),
    default="nve",
    help="nve: velocity Verlet; nvt: Langevin (ASE Langevin / JAX BAOAB)",
  )
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--timestep", type=float, default=0.5, help="fs (default 0.5)")
  p.add_argument("--temperature", type=float, default=None, help="bath temperature in K (nvt)")
  p.add_argument(
    "--init-temperature",
    type=float,
    default=None,
    help="draw Maxwell-Boltzmann velocities at this temperature (K); default: --temperature "
    "for nvt, else the file's momenta (zero when it has none)",
  )
  p.add_argument("--friction", type=float, default=0.01, help="Langevin friction in 1/fs (default 0.01)")
  p.add_argument("--seed", type=int, default=0, help="seed of the velocities and the Langevin noise")
  p.add_argument("--interval", type=int, default=10, help="steps between trajectory frames and log rows")
  p.add_argument("--trajectory", default="md.extxyz", help="extxyz output (overwritten)")
  p.add_argument("--log", default="md.log", help="log output (overwritten)")
  p.add_argument("--charge", type=int, default=None, help="total charge (default: the file's, else 0)")
  p.add_argument("--spin", type=int, default=None, help="spin multiplicity 2S+1 (default: the file's, else 1)")
  p.add_argument(
    "--charge-key", help="info key of the file's total charge (default: any of charge, total_charge, which must agree)"
  )
  p.add_argument(
    "--spin-key",
    help="info key of the file's multiplicity 2S+1 (default: any of spin, total_spin, multiplicity, which must agree)",
  )
  p.add_argument(
    "--allow-untrained-elements",
    action="store_true",
    help="run with elements the checkpoint was not trained on (a warning instead of an error)",
  )
  p.add_argument(
    "--max-temperature",
    type=float,
    default=None,
    metavar="K",
    help="stop when the temperature exceeds this (default: max(10 x the starting or bath temperature, 5000 K); "
    "inf: off)",
  )
  p.add_argument(
    "--max-force", type=float, default=100.0, metavar="EV_PER_A", help="stop when a force exceeds this (default 100)"
  )
  p.add_argument(
    "--max-energy-drift",
    type=float,
    default=0.1,
    metavar="EV_PER_ATOM",
    help="nve: stop when the total energy moved this far per atom from step 0 (default 0.1)",
  )
  p.add_argument(
    "--progress",
    choices=("auto", "on", "off"),
    default="auto",
    help="progress bar with ns/day on stderr (auto: when stderr is a terminal)",
  )
  p.add_argument(
    "--skin",
    type=float,
    default=0.5,
    help="jax driver: Verlet skin in A (the list holds pairs within cutoff + skin and is rebuilt when an atom has "
    "moved skin/2; default 0.5)",
  )
  p.add_argument("--x64", action="store_true", help="jax driver: float64 integrator state (the model keeps its dtype)")
  p.add_argument("--head", help="output head of a multi-head checkpoint (default: its first)")
  p.add_argument(
    "--precision",
    choices=("highest", "tensorfloat32", "bfloat16"),
    default=None,
    help="matrix-product precision of the model (default: the checkpoint's; tensorfloat32 is the authors' MD "
    "setting: the paper model's call 1.5-1.7x faster on an H200 at forces within 2.4e-3 of the largest force, "
    "benchmarks/RESULTS.md)",
  )
  p.add_argument(
    "--remat",
    action="store_true",
    help="recompute each block in the backward pass (conservative forces: about half the memory; large systems)",
  )
  p.add_argument(
    "--edge-chunk",
    type=int,
    default=None,
    metavar="ATOMS",
    help="run the per-edge MLPs and the attention op over chunks of this many target atoms (less memory for large "
    "systems; e.g. 4096)",
  )
  p.add_argument(
    "--node-chunk",
    type=int,
    default=None,
    metavar="ATOMS",
    help="run each block's node-level maps over chunks of this many atoms (with --remat and --edge-chunk: the "
    "least memory for conservative forces of large systems, about 0.17 MiB per atom for the paper model on a GPU; "
    "e.g. 4096)",
  )
  add_debug_flag(p)
  return p


def _runtime_overrides(opts) -> dict:
  """``--precision``, ``--remat``, ``--edge-chunk`` and ``--node-chunk`` as config fields
  (``checkpoint.RUNTIME_OVERRIDES``)."""
  out = {}
  if opts.precision is not None:
    out["matmul_precision"] = opts.precision
  if opts.remat:
    out["remat"] = True
  for name in ("edge_chunk", "node_chunk"):
    size = getattr(opts, name)
    if size is not None:
      if size < 1:
        raise UsageError(f"--{name.replace('_', '-')} must be a positive number of atoms, got {size}")
      out[name] = size
  return out


def _load_model(opts):
  """(model with ``--head`` as its default head, description)."""
  overrides = _runtime_overrides(opts)
  if opts.checkpoint:
    from e2former_jax.checkpoint import load_model

    model, name = load_model(opts.checkpoint, **overrides), str(Path(opts.checkpoint).resolve())
  else:
    from flax import nnx

    from e2former_jax.config import get_config
    from e2former_jax.model import E2Former

    model = E2Former(get_config(opts.random_model, **overrides), rngs=nnx.Rngs(opts.seed))
    name = f"random {opts.random_model}"
  if opts.head:
    return model.with_default_head(opts.head), f"{name} (head {opts.head})"
  return model, name


def _trained_domain(opts):
  from e2former_jax.checkpoint import trained_domain
  from e2former_jax.trained_domain import TrainedDomain

  return trained_domain(opts.checkpoint, opts.head) if opts.checkpoint else TrainedDomain()


def _prepare(atoms: ase.Atoms, opts) -> ase.Atoms:
  from e2former_jax.md.ase_driver import initial_velocities
  from e2former_jax.system_keys import charge_and_multiplicity

  source = atoms
  # A clean copy: the input's labels (reference energies, forces) must not travel into the trajectory.
  atoms = ase.Atoms(
    source.numbers,
    positions=source.positions,
    cell=source.cell,
    pbc=source.pbc,
    momenta=source.get_momenta(),
    info={k: source.info[k] for k in ("config_type",) if k in source.info},
  )
  where = f"{opts.structure}[{opts.index}]"
  charge, spin = charge_and_multiplicity(source.info, opts.charge_key, opts.spin_key, where=where)
  given = {"charge": charge if opts.charge is None else opts.charge, "spin": spin if opts.spin is None else opts.spin}
  atoms.info["charge"], atoms.info["spin"] = charge_and_multiplicity(given, where="--charge/--spin")
  init_t = opts.init_temperature
  if init_t is None and opts.ensemble == "nvt":
    init_t = opts.temperature
  if init_t is not None:
    initial_velocities(atoms, init_t, opts.seed)
  return atoms


GPU_MEMORY_FRACTION = "0.95"  # of the device's memory for JAX's allocator, unless the user set it (JAX: 0.75)


def main(argv: Sequence[str] | None = None) -> int:
  opts = _parser().parse_args(argv)
  # MD is this process's only work on the device: let the allocator take almost all of it (large systems). Set
  # before JAX starts its backend; a value the user exported is kept.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION)
  return run_command("e2former-md", lambda: _run(opts, argv), debug=opts.debug)


def _limits(opts):
  from e2former_jax.md.guard import BlowUpLimits

  return BlowUpLimits(
    max_temperature_K=opts.max_temperature, max_force=opts.max_force, max_energy_drift=opts.max_energy_drift
  )


class _Progress:
  """A tqdm bar over the MD steps with the simulated ns/day (over the last second or more of wall time, so
  compilation before the first step is left out) and the temperature."""

  def __init__(self, steps: int, timestep_fs: float, mode: str):
    from tqdm import tqdm

    disable = {"auto": None, "on": False, "off": True}[mode]  # auto: only on a terminal
    self.bar = tqdm(total=steps, unit="step", desc="e2former-md", disable=disable, dynamic_ncols=True, file=sys.stderr)
    self.timestep_fs = timestep_fs
    self._window: tuple[float, int] | None = None  # (wall seconds, step) where the current window began

  def update(self, step: int, temperature: float) -> None:
    now = time.perf_counter()
    if self._window is None:
      self._window = (now, step)
    elif now - self._window[0] >= 1.0 and step > self._window[1]:
      rate = simulated_ns_per_day((step - self._window[1]) * self.timestep_fs, now - self._window[0])
      self.bar.set_postfix_str(f"{rate:.4g} ns/day, T {temperature:.0f} K", refresh=False)
      self._window = (now, step)
    self.bar.update(step - self.bar.n)

  def close(self) -> None:
    self.bar.close()


def _run(opts, argv) -> int:
  if opts.ensemble == "nvt" and opts.temperature is None:
    raise UsageError("--ensemble nvt needs --temperature")
  if opts.steps < 0 or opts.interval < 1 or opts.timestep <= 0:
    raise UsageError(
      f"--steps must be >= 0, --interval >= 1 and --timestep > 0, got {opts.steps!r}, {opts.interval!r}, "
      f"{opts.timestep!r}"
    )
  limits = _limits(opts)
  if opts.x64:
    import jax

    jax.config.update("jax_enable_x64", True)
  import jax

  from e2former_jax.md.ase_driver import MDLog, ns_per_day, run_ase_md, run_statistics, write_frame
  from e2former_jax.md.guard import MDBlowUpError

  index = int(opts.index) if opts.index.lstrip("-").isdigit() else opts.index
  try:
    atoms = ase.io.read(opts.structure, index=index)
  except (OSError, ValueError, StopIteration, IndexError) as err:
    raise ValueError(f"cannot read frame {opts.index!r} of {opts.structure}: {err}") from err
  if not isinstance(atoms, ase.Atoms):
    raise UsageError(f"--index {opts.index!r} selects {len(atoms)} frames; MD starts from one")
  atoms = _prepare(atoms, opts)
  model, model_name = _load_model(opts)
  cfg = model.config
  _trained_domain(opts).check([atoms], cfg, opts.allow_untrained_elements, allow_hint="pass --allow-untrained-elements")
  for path in (opts.trajectory, opts.log):
    if path and os.path.exists(path):
      os.remove(path)
  device = jax.devices()[0]
  header = {
    "e2former-md": " ".join(sys.argv[1:]) if argv is None else " ".join(argv),
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "host": f"{platform.node()} ({platform.machine()}), jax {jax.__version__} on {device.platform} "
    f"{device.device_kind}",
    "structure": f"{opts.structure}[{opts.index}] {atoms.get_chemical_formula()} ({len(atoms)} atoms), "
    f"pbc {atoms.pbc.tolist()}",
    "model": f"{model_name}: cutoff {cfg.cutoff} A, K {cfg.max_neighbors}, forces {cfg.forces}, dtype {cfg.dtype}, "
    f"precision {cfg.matmul_precision}, remat {cfg.remat}, edge_chunk {cfg.edge_chunk}, "
    f"node_chunk {cfg.node_chunk}",
    "dynamics": f"{opts.driver} driver, {opts.ensemble}, dt {opts.timestep} fs, {opts.steps} steps"
    + (f", T {opts.temperature} K, friction {opts.friction} 1/fs" if opts.ensemble == "nvt" else ""),
    "units": "energies eV, temperature K, time ps; ns_per_day over the wall time since the previous row",
  }
  log = MDLog(opts.log, header)
  progress = _Progress(opts.steps, opts.timestep, opts.progress)
  tic = time.perf_counter()
  sim = None
  try:
    if opts.driver == "ase":
      from e2former_jax.calculator import E2FormerCalculator

      atoms.calc = E2FormerCalculator(model=model)
      rows = run_ase_md(
        atoms,
        opts.steps,
        timestep_fs=opts.timestep,
        ensemble=opts.ensemble,
        temperature_K=opts.temperature,
        friction_per_fs=opts.friction,
        seed=opts.seed,
        interval=opts.interval,
        trajectory=opts.trajectory,
        log=log,
        limits=limits,
        callback=lambda step, row: progress.update(step, row["temperature"]),
      )
      per_step = rows["seconds"][2:] if len(rows["seconds"]) > 2 else rows["seconds"][1:]
      rate = ns_per_day(per_step, opts.timestep) if len(per_step) else float("nan")
      extra = ""
    else:
      from e2former_jax.md.jax_driver import JaxMD

      sim = JaxMD(
        model,
        atoms,
        timestep_fs=opts.timestep,
        ensemble=opts.ensemble,
        temperature_K=opts.temperature,
        friction_per_fs=opts.friction,
        seed=opts.seed,
        skin=opts.skin,
        steps_per_call=opts.interval,
        limits=limits,
      )

      def on_chunk(sim, chunk):
        now = time.perf_counter()
        for i, step in enumerate(chunk["step"]):
          if step % opts.interval == 0:
            log.row(
              int(step),
              float(chunk["time_fs"][i]),
              float(chunk["potential"][i]),
              float(chunk["kinetic"][i]),
              float(chunk["temperature"][i]),
              int(chunk["beyond_k"][i]),
              wall=now,
            )
        if sim.step_count % opts.interval == 0 and opts.trajectory:
          write_frame(opts.trajectory, sim.atoms)
        progress.update(sim.step_count, float(chunk["temperature"][-1]))

      rows = sim.run(opts.steps, callback=on_chunk)
      rate = sim.ns_per_day()
      capacity = sim.spec.capacity
      extra = (
        f"; neighbour list: {sim.builds} builds (skin {opts.skin} A), {capacity.candidate_capacity} candidates "
        f"and {capacity.cell_capacity} atoms per bin, {sim.reallocations} reallocations"
      )
  except MDBlowUpError as err:
    progress.close()
    log.comment(f"stopped: {err}")
    log.close()
    if opts.trajectory:
      write_frame(opts.trajectory, sim.atoms if sim is not None else atoms)  # the structure where it stopped
    if opts.debug:
      raise
    print(f"e2former-md: error: {one_line(err)}", file=sys.stderr)
    return EXIT_BLOW_UP
  progress.close()
  wall = time.perf_counter() - tic
  if "beyond_k" in rows:
    extra = f"; at most {int(np.max(rows['beyond_k']))} in-cutoff pairs beyond K" + extra
  summary = (
    f"{opts.steps} steps ({opts.steps * opts.timestep / 1000:.3f} ps) in {wall:.1f} s; {rate:.4g} ns/day "
    f"after compilation; {run_statistics(rows, opts.ensemble, len(atoms))}{extra}"
  )
  log.comment(summary)
  log.close()
  print(summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
