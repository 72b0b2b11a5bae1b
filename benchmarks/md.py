"""MD throughput of the jitted loop (``e2former_jax.md.JaxMD``): atom-steps per second and ns/day.

Every configuration (size, preset, forces, matmul precision) runs the real driver: one compiled chunk of
``--steps-per-call`` steps holding the neighbour list (device search, Morton sort, K nearest per step), the
model and the integrator, its state donated.

* Structure: a periodic water box at 1 g/cm^3, m^3 randomly oriented molecules on a cubic grid (3.1 A apart;
  atoms of different molecules at least 1.5 A apart): 1,029 / 10,125 / 98,304 atoms for ``--atoms 1000 10000
  100000``.
* Model: random weights of the preset (``small``, K = 24; ``paper_spice``, the paper's QKdot_alpha gate, K =
  32), cutoff 5 A, direct or conservative forces, ``matmul_precision`` highest or tensorfloat32, attention
  path "auto" (the Pallas kernel on a GPU).
* Dynamics: NVE velocity Verlet, 0.5 fs, skin 0.5 A. Random weights give forces no trained model gives (atoms
  collide within a few fs), while a step costs the same whatever the weights, so every atom gets a mass of 1e6
  amu (forces barely move it) and a common drift velocity that carries it skin / 2 in ``--rebuild-every``
  steps: the list is rebuilt exactly that often, inside the compiled chunk, as in a production run. The
  default, 8, is what the demo checkpoint needs on a 192-atom water box at 300-400 K with these settings (NVT,
  49 builds in 400 steps, measured on the CPU).
* Memory settings: ``--remat``, ``--edge-chunk`` and ``--node-chunk`` set the model's fields of those names for
  every configuration (a 100k-atom box with the paper preset and conservative forces needs them on an H100).
* Timing: the first chunk compiles (``compile_s``, with the first evaluation), one warm-up chunk, then the
  median over ``--chunks`` chunks of the wall time of one chunk call, which ends when the host has read the
  chunk's observables (they depend on all of its work); atom-steps/s = atoms x steps per chunk / median;
  ns/day = 0.5 fs x steps per second x 86400 / 1e6. A configuration that runs out of device memory is reported
  as such; ``--budget-s`` starts no new configuration after that many seconds, so a command fits a time limit.

Configurations run in the order given (sizes, then presets, forces, precisions); each appends one JSON line
to ``--json`` as soon as it is measured, and a table is printed at the end:

  PYTHONPATH=$PWD python benchmarks/md.py --atoms 10000 1000 --presets paper_spice small \\
      --forces conservative direct --precision tensorfloat32 highest --budget-s 480 --json $OUT/md.jsonl
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import statistics
import time
import warnings

import ase
import ase.build
import ase.units
import jax
import numpy as np
from flax import nnx
from scipy.spatial.transform import Rotation

from benchmarks.report import emit, stamp
from e2former_jax.config import get_config
from e2former_jax.md import BlowUpLimits, JaxMD
from e2former_jax.md.ase_driver import simulated_ns_per_day
from e2former_jax.model import E2Former

TIMESTEP_FS = 0.5
HEAVY_AMU = 1e6


def water_box(num_atoms: int, density: float = 1.0, seed: int = 0) -> ase.Atoms:
  """m^3 water molecules (m = round((num_atoms / 3)^(1/3))) with random orientations on a cubic grid in a
  periodic cube at ``density`` g/cm^3."""
  m = max(1, round((num_atoms / 3) ** (1 / 3)))
  side = (m**3 * 18.015 / density / 0.602214) ** (1 / 3)
  water = ase.build.molecule("H2O")
  rotations = Rotation.random(m**3, random_state=seed).as_matrix()  # [M, 3, 3]
  centres = (np.stack(np.meshgrid(*[np.arange(m)] * 3, indexing="ij"), -1).reshape(-1, 3) + 0.5) * side / m
  local = water.positions - water.positions.mean(axis=0)
  positions = centres[:, None, :] + np.einsum("mij,aj->mai", rotations, local)
  numbers = np.tile(water.numbers, m**3)
  return ase.Atoms(numbers=numbers, positions=positions.reshape(-1, 3), cell=[side] * 3, pbc=True)


def drifting(structure: ase.Atoms, skin: float, rebuild_every: int) -> ase.Atoms:
  """``structure`` with heavy atoms and a common velocity that moves them skin / 2 in ``rebuild_every`` - 1/2
  steps (so the list is rebuilt at every ``rebuild_every``-th step)."""
  atoms = structure.copy()
  atoms.set_masses(np.full(len(atoms), HEAVY_AMU))
  speed = 0.5 * skin / ((rebuild_every - 0.5) * TIMESTEP_FS * ase.units.fs)  # A per ASE time unit
  direction = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
  atoms.set_velocities(np.tile(speed * direction, (len(atoms), 1)))
  return atoms


def measure(structure, preset, forces, precision, args) -> dict:
  cfg = get_config(
    preset,
    forces=forces,
    matmul_precision=precision,
    attention_impl=args.impl,
    remat=args.remat,
    edge_chunk=args.edge_chunk,
    node_chunk=args.node_chunk,
  )
  model = E2Former(cfg, rngs=nnx.Rngs(0))
  off = BlowUpLimits(max_temperature_K=math.inf, max_force=math.inf, max_energy_drift=math.inf)
  start = time.perf_counter()
  sim = JaxMD(
    model,
    drifting(structure, args.skin, args.rebuild_every),
    timestep_fs=TIMESTEP_FS,
    skin=args.skin,
    steps_per_call=args.steps_per_call,
    limits=off,  # the heavy, drifting atoms have no meaningful temperature; non-finite values still stop it
  )
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # K-truncation in liquid water is part of the model
    sim.initialise()
    compile_s = time.perf_counter() - start
    sim.run(args.steps_per_call * (args.chunks + 1))
  jax.block_until_ready(sim.state)
  chunks = [seconds for steps, seconds in sim.chunk_seconds if steps == args.steps_per_call][1:]  # warm-up out
  median = statistics.median(chunks)
  n = len(structure)
  capacity = sim.spec.capacity
  row = dict(
    atoms=n,
    preset=preset,
    gate=cfg.gate,
    forces=forces,
    precision=precision,
    K=cfg.max_neighbors,
    remat=cfg.remat,
    edge_chunk=cfg.edge_chunk,
    node_chunk=cfg.node_chunk,
    atom_steps_per_s=round(n * args.steps_per_call / median, 1),
    ns_per_day=round(simulated_ns_per_day(TIMESTEP_FS * args.steps_per_call, median), 4),
    ms_per_step=round(1e3 * median / args.steps_per_call, 3),
    compile_s=round(compile_s, 1),
    steps_per_call=args.steps_per_call,
    rebuild_every=args.rebuild_every,
    builds=sim.builds,
    steps=sim.step_count,
    skin=args.skin,
    candidate_capacity=capacity.candidate_capacity,
    cell_capacity=capacity.cell_capacity,
    reallocations=sim.reallocations,
    chunk_s=[round(s, 4) for s in chunks],
  )
  del sim, model
  gc.collect()
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--atoms", type=int, nargs="+", default=[1000, 10000], help="sizes (100000: also possible)")
  p.add_argument("--presets", nargs="+", default=["small", "paper_spice"])
  p.add_argument("--forces", nargs="+", default=["conservative", "direct"])
  p.add_argument("--precision", nargs="+", default=["highest", "tensorfloat32"])
  p.add_argument("--impl", default="auto", help="attention path (default auto)")
  p.add_argument("--remat", action="store_true", help="ModelConfig.remat (for conservative forces of large boxes)")
  p.add_argument("--edge-chunk", type=int, default=0, help="ModelConfig.edge_chunk (0: none)")
  p.add_argument("--node-chunk", type=int, default=0, help="ModelConfig.node_chunk (0: none)")
  p.add_argument("--steps-per-call", type=int, default=10)
  p.add_argument("--chunks", type=int, default=5, help="timed chunks after one warm-up chunk")
  p.add_argument("--rebuild-every", type=int, default=8, help="steps between neighbour-list builds")
  p.add_argument("--skin", type=float, default=0.5)
  p.add_argument("--budget-s", type=float, default=None, help="start no configuration after this many seconds")
  p.add_argument("--json", help="append one JSON line per configuration")
  args = p.parse_args()
  device = jax.devices()[0]
  begin = time.perf_counter()
  rows = []
  for size in args.atoms:
    structure = water_box(size)
    for preset in args.presets:
      for forces in args.forces:
        for precision in args.precision:
          row = dict(atoms=len(structure), preset=preset, forces=forces, precision=precision)
          if args.budget_s is not None and time.perf_counter() - begin > args.budget_s:
            row["skipped"] = f"time budget of {args.budget_s:g} s spent"
          else:
            try:
              row = measure(structure, preset, forces, precision, args)
            except (jax.errors.JaxRuntimeError, MemoryError) as err:  # out of device memory (DeviceMemoryError)
              row["failed"] = " ".join(str(err).split())[:300]
              gc.collect()  # the failed configuration's buffers
          stamp(row)
          rows.append(row)
          emit(row, args.json)
  print(f"\nMD throughput, {device.device_kind}, jax {jax.__version__}, python {platform.python_version()}, ", end="")
  print(f"{TIMESTEP_FS} fs, skin {args.skin} A, a list build every {args.rebuild_every} steps")
  head = ["atoms", "preset", "forces", "precision", "atom_steps_per_s", "ns_per_day", "ms_per_step", "compile_s"]
  print("| " + " | ".join(head) + " |")
  print("|" + "---|" * len(head))
  for r in rows:
    cells = [str(r.get(h, "")) for h in head]
    if "atom_steps_per_s" not in r:
      cells[4] = r.get("skipped") or "failed: " + r.get("failed", "")[:60]
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
