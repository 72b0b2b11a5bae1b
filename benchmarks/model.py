"""Whole-model timing on one GPU: inference (energy + conservative forces) and training steps.

Protocol of MODEL.md section 11.2 (the authors' measurement), reproduced: one random structure at
0.1 atoms/A^3 with Z in {1, 6, 7, 8} (here a jittered cubic grid, so no two atoms overlap; atoms come out
spatially ordered), cutoff 5 A, K = 32, the paper backbone with the ``QKdotS_alpha`` gate, float32 with
``matmul_precision="highest"``; a training step is forward + backward of the loss E + mean(F^2) with respect
to the parameters, no optimizer step; F from the direct head or F = -dE/dx (double backward).

Each (mode, N, attention_impl) runs in its own process so the peak-memory counter belongs to it:

  python benchmarks/model.py --mode infer --atoms 4096 --impl pallas --json out.json

Timing: 2 warm-up calls, then the median of ``--repeats`` calls, each ended by ``block_until_ready``.
Correctness on the same inputs: ``--check`` also evaluates the other attention path on the same structure
and prints the relative force difference max|dF| / max|F|.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import ase
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from e2former_jax.config import get_config
from e2former_jax.graph import graph_from_atoms
from e2former_jax.model import E2Former, predict


def random_structure(num_atoms: int, density: float = 0.1, seed: int = 0) -> ase.Atoms:
  """``num_atoms`` atoms (Z in {1, 6, 7, 8}) on a cubic grid of the given density, jittered by +-0.3 A."""
  rng = np.random.default_rng(seed)
  spacing = density ** (-1 / 3)
  side = int(np.ceil(num_atoms ** (1 / 3)))
  grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:num_atoms]
  positions = grid * spacing + rng.uniform(-0.3, 0.3, size=(num_atoms, 3))
  return ase.Atoms(numbers=rng.choice([1, 6, 7, 8], size=num_atoms), positions=positions)


def build(impl: str, forces: str):
  cfg = get_config("paper_spice", gate="QKdotS_alpha", forces=forces, attention_impl=impl,
                   matmul_precision="highest")
  return cfg, E2Former(cfg, rngs=nnx.Rngs(0))


def step_function(mode: str):
  if mode == "infer":
    def run(model, graph):
      out = predict(model, graph)
      return out["energy"], out["forces"]
    return nnx.jit(run)

  def loss(model, graph):
    out = predict(model, graph)
    return jnp.sum(out["energy"]) + jnp.mean(jnp.sum(out["forces"] ** 2, -1))
  return nnx.jit(nnx.grad(loss))


def timed(fn, *args, repeats: int) -> tuple[float, object]:
  out = None
  for _ in range(2):
    out = jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3, out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--mode", choices=["infer", "train_direct", "train_conservative"], required=True)
  parser.add_argument("--atoms", type=int, default=4096)
  parser.add_argument("--impl", choices=["pallas", "jnp_node", "jnp_edge"], default="pallas")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--check", action="store_true", help="compare forces with the other attention path")
  parser.add_argument("--json", help="append the result as one JSON line to this file")
  args = parser.parse_args()
  forces = "direct" if args.mode == "train_direct" else "conservative"
  cfg, model = build(args.impl, forces)
  start = time.perf_counter()
  graph, dropped = graph_from_atoms([random_structure(args.atoms)], cfg.cutoff, cfg.max_neighbors)
  neighbour_seconds = time.perf_counter() - start
  graph = jax.device_put(graph)
  fn = step_function(args.mode)
  compile_start = time.perf_counter()
  jax.block_until_ready(fn(model, graph))
  compile_seconds = time.perf_counter() - compile_start
  ms, out = timed(fn, model, graph, repeats=args.repeats)
  stats = jax.devices()[0].memory_stats() or {}
  result = dict(mode=args.mode, atoms=args.atoms, impl=args.impl, ms=ms,
                peak_gib=stats.get("peak_bytes_in_use", float("nan")) / 2**30,
                first_call_s=compile_seconds, neighbour_list_s=neighbour_seconds,
                atoms_per_s=args.atoms / (ms / 1e3), dropped_pairs=dropped,
                mean_neighbours=float(np.asarray(graph.neighbor_mask).sum(1).mean()),
                device=jax.devices()[0].device_kind)
  if args.check and args.mode == "infer":
    other = "jnp_node" if args.impl == "pallas" else "pallas"
    _, other_model = build(other, forces)
    _, other_forces = step_function("infer")(other_model, graph)
    result["check_vs"] = other
    result["force_rel_diff"] = float(jnp.max(jnp.abs(other_forces - out[1])) / jnp.max(jnp.abs(out[1])))
    result["energy_rel_diff"] = float(jnp.max(jnp.abs(step_function("infer")(other_model, graph)[0] - out[0]))
                                      / jnp.max(jnp.abs(out[0])))
  print(json.dumps(result))
  if args.json:
    with open(args.json, "a") as f:
      f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  main()
