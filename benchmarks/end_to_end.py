"""End-to-end time of one structure: numpy positions, numbers and cell in, numpy energy and forces out.

Two paths on the same structures, in one process (same card, same run):

* ``host``: what a calculator did before the device neighbour list: ``graph_from_atoms`` (vesin on the host,
  K nearest per atom) for every new structure, then the jitted model on the padded graph.
* ``device``: ``e2former_jax.potential.DevicePotential``: neighbour slots, Morton order and the model in one
  compiled call.

Protocol (issue 17 of the project): the structure of ``benchmarks/model.py`` (jittered cubic grid at 0.1 atoms/A^3,
Z in {1, 6, 7, 8}, the paper backbone, K = 32, cutoff 5 A) with its atoms in a random order (the grid is
generated in spatial order); positions jittered by up to 0.05 A between timed calls so no list is reused; 2 warm-up
calls, then the median of ``--repeats`` calls, each ended by the numpy result. Correctness on the same inputs:
max|dE|/|E| and max|dF|/max|F| between the two paths (float32: round-off of a different summation order).
Also timed: the device neighbour search alone (``--slots``), as a share of the device call.

  PYTHONPATH=$PWD python benchmarks/end_to_end.py --atoms 1024 4096 16384 --forces direct conservative \
      --precision highest tensorfloat32 --json $OUT/e2e.jsonl
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import numpy as np
from flax import nnx

from benchmarks.model import random_structure
from benchmarks.report import emit, stamp
from e2former_jax.config import get_config
from e2former_jax.graph import graph_from_atoms
from e2former_jax.model import E2Former
from e2former_jax.neighbors.device import neighbor_slots
from e2former_jax.potential import DevicePotential, atom_bucket
from e2former_jax.predict import make_predict_fn


def jittered(structure, rng, amplitude=0.05):
  moved = structure.copy()
  moved.positions += rng.uniform(-amplitude, amplitude, size=moved.positions.shape)
  return moved


def host_path(model):
  cfg, fn = model.config, make_predict_fn(model)

  def call(atoms):
    n = len(atoms)
    graph, _ = graph_from_atoms([atoms], cfg.cutoff, cfg.max_neighbors, num_atoms=atom_bucket(n), num_graphs=2)
    out = jax.device_get(fn(graph))
    return float(out["energy"][0]), out["forces"][:n]

  return call


def device_path(model):
  potential = DevicePotential(model)

  def call(atoms):
    out = potential(atoms.get_positions(), atoms.get_atomic_numbers())
    return out["energy"], out["forces"]

  return call


def median_ms(call, structure, repeats, seed):
  rng = np.random.default_rng(seed)
  for _ in range(2):
    call(jittered(structure, rng))
  times = []
  for _ in range(repeats):
    atoms = jittered(structure, rng)  # made before the clock starts
    start = time.perf_counter()
    call(atoms)
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def slots_ms(structure, cfg, repeats):
  n = len(structure)
  padded = np.zeros((atom_bucket(n), 3), np.float32)
  padded[:n] = structure.get_positions() - structure.get_positions().mean(0)
  mask = np.arange(len(padded)) < n
  fn = jax.jit(lambda x, m: neighbor_slots(x, None, m, cutoff=cfg.cutoff, max_neighbors=cfg.max_neighbors).neighbors)
  x, m = jax.device_put(padded), jax.device_put(mask)
  for _ in range(2):
    jax.block_until_ready(fn(x, m))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(x, m))
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--atoms", type=int, nargs="+", default=[1024, 4096, 16384])
  p.add_argument("--forces", nargs="+", default=["direct", "conservative"])
  p.add_argument("--precision", nargs="+", default=["highest"])
  p.add_argument("--paths", nargs="+", default=["host", "device"])
  p.add_argument("--preset", default="paper_spice")
  p.add_argument("--gate", default="QKdotS_alpha")
  p.add_argument("--impl", default="auto")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--slots", action="store_true", help="also time the device neighbour search alone")
  p.add_argument("--json", help="append one JSON line per row")
  args = p.parse_args()
  device = jax.devices()[0]
  rows = []
  for n in args.atoms:
    structure = random_structure(n)
    structure = structure[np.random.default_rng(1).permutation(n)]  # arrives in random order
    for forces in args.forces:
      for precision in args.precision:
        cfg = get_config(
          args.preset, gate=args.gate, forces=forces, attention_impl=args.impl, matmul_precision=precision
        )
        model = E2Former(cfg, rngs=nnx.Rngs(0))
        results, row = {}, dict(atoms=n, forces=forces, precision=precision, gate=args.gate, preset=args.preset)
        for path in args.paths:
          call = host_path(model) if path == "host" else device_path(model)
          start = time.perf_counter()
          results[path] = call(structure)
          row[f"{path}_first_call_s"] = round(time.perf_counter() - start, 2)
          row[f"{path}_ms"] = round(median_ms(call, structure, args.repeats, seed=n), 2)
        if len(results) == 2:
          (e0, f0), (e1, f1) = results.values()
          row["energy_rel_diff"] = float(abs(e1 - e0) / abs(e0))
          row["force_rel_diff"] = float(np.abs(f1 - f0).max() / np.abs(f0).max())
        if args.slots:
          row["slots_ms"] = round(slots_ms(structure, cfg, args.repeats), 3)
        stamp(row)
        rows.append(row)
        emit(row, args.json)
  print(f"\n{device.device_kind}, jax {jax.__version__}, python {platform.python_version()}")
  head = ["atoms", "forces", "precision", *[f"{p}_ms" for p in args.paths], "force_rel_diff"]
  head += ["slots_ms"] if args.slots else []
  print(" | ".join(head))
  for r in rows:
    print(" | ".join(str(r.get(h, "")) for h in head))


if __name__ == "__main__":
  main()
