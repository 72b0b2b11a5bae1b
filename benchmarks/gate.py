"""The direction gate of ``QKdot_alpha`` alone at the paper's sizes: fused Pallas kernels against the XLA twin.

g = ((u W_mix + b_mix) * t) W_gate + b_gate with t the degree contractions of the target's projected features
(``pallas_kernels.gate_jnp``). Paper sizes: A = 128 hidden, L = 2, F = 256 channels per degree, H = 128 heads,
K = 32 slots; random float32 inputs, the same for both implementations.

Cases: "forward"; "forces" (value and gradient of sum(g * ct) with respect to u, Y and P: what energy and
conservative forces need, the weights held fixed); "training" (the same with respect to every input, weights
included). Each case is checked against the twin on the same inputs (largest difference relative to the largest
entry) and timed: median of ``--repeats`` calls after two warm-ups, each ending in ``block_until_ready``.

Cost model per edge slot (docs/performance.md, per-edge work): 2 A (L+1) F + 2 (L+1) F H = 393,216 FLOP in the two
products, plus 2 F (L+1)^2 + (L+1) F = 5,376 in the contractions and the product; fewest bytes 4 (A + H + (L+1)^2)
= 1,060 per slot plus the target's P, 4 (L+1)^2 F = 9,216 per atom (288 per slot at K = 32). The twin writes and
reads its [N, K, (L+1) F] arrays (3,072 bytes per slot each) in device memory.

Usage: PYTHONPATH=$PWD python benchmarks/gate.py --atoms 4096 --precision tensorfloat32 highest --sweep \
           --json $OUT/gate.jsonl  (``--tiles 4/32/8/1 ...``: other tilings, block_t/block_f/warps/stages of the
           forward kernel, the backward's default; ``4/64/8/2/16/1`` also sets the backward's block_f/stages)
"""

from __future__ import annotations

import argparse
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.report import emit, max_relative, median_ms, stamp
from pallas_kernels.gate_jnp import jnp_direction_gate
from pallas_kernels.gate_pallas import pallas_direction_gate

A, L, F, H, K = 128, 2, 256, 128, 32
S = (L + 1) ** 2
FLOP_PER_SLOT = 2 * A * (L + 1) * F + 2 * (L + 1) * F * H + 2 * F * S + (L + 1) * F
CASES = ("forward", "forces", "training")
TILES = [
  dict(block_t=t, block_f=f, num_warps=w, num_stages=s, backward_block_f=f, backward_num_stages=s)
  for t, f, w, s in itertools.product((2, 4), (32, 64), (4, 8), (1, 2))
]
TILE_OPTIONS = ("block_t", "block_f", "num_warps", "num_stages", "backward_block_f", "backward_num_stages")


def parse_tiles(text: str) -> dict:
  """The kernel options written as "4/64/8/2" (block_t, block_f, num_warps, num_stages) or "4/64/8/2/32/1" (and
  backward_block_f, backward_num_stages)."""
  values = list(map(int, text.split("/")))
  if len(values) not in (4, 6):
    raise ValueError(f"tiles are T/F/W/S or T/F/W/S/BF/BS, got {text!r}")
  return dict(zip(TILE_OPTIONS, values))


def inputs(num_atoms: int, seed: int = 0):
  """u, Y, P, W_mix, b_mix, W_gate, b_gate and a cotangent of g, with the scales of a trained layer's."""
  rng = np.random.default_rng(seed)
  shapes = [(num_atoms, K, A), (num_atoms, K, S), (num_atoms, S, F), (A, (L + 1) * F), ((L + 1) * F,)]
  shapes += [((L + 1) * F, H), (H,), (num_atoms, K, H)]
  scales = [1.0, 1.0, 1.0, A**-0.5, 0.1, ((L + 1) * F) ** -0.5, 0.1, 1.0]
  return [jnp.asarray(rng.normal(size=s) * c, jnp.float32) for s, c in zip(shapes, scales)]


def case_fn(gate, case: str):
  """A jitted function of (args, ct) for one case."""
  if case == "forward":
    return jax.jit(lambda args, ct: gate(*args))
  argnums = (0, 1, 2) if case == "forces" else tuple(range(7))

  def loss(*args_and_ct):
    *args, ct = args_and_ct
    return jnp.sum(gate(*args) * ct)

  grad = jax.grad(loss, argnums=argnums)
  return jax.jit(lambda args, ct: grad(*args, ct))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--atoms", type=int, nargs="+", default=[4096])
  parser.add_argument("--precision", nargs="+", default=["tensorfloat32", "highest"])
  parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
  parser.add_argument("--sweep", action="store_true", help=f"also time the {len(TILES)} tilings (not training)")
  parser.add_argument(
    "--tiles",
    nargs="+",
    default=[],
    metavar="T/F/W/S[/BF/BS]",
    help="also time these tilings: block_t/block_f/warps/stages[/backward block_f/backward stages]",
  )
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--json")
  args = parser.parse_args()
  rows = []
  for num_atoms, precision in itertools.product(args.atoms, args.precision):
    *gate_args, ct = inputs(num_atoms)
    twin = functools.partial(jnp_direction_gate, precision=precision)
    tilings = [dict()] + (TILES if args.sweep else []) + [parse_tiles(t) for t in args.tiles]
    for case in args.cases:
      ref_fn = case_fn(twin, case)
      ref = ref_fn(gate_args, ct)
      twin_ms = median_ms(ref_fn, (gate_args, ct), args.repeats)
      for tiles in tilings if case != "training" else [dict()]:
        fn = case_fn(functools.partial(pallas_direction_gate, precision=precision, **tiles), case)
        try:
          error = max_relative(fn(gate_args, ct), ref)
          kernel_ms = median_ms(fn, (gate_args, ct), args.repeats)
        except jax.errors.JaxRuntimeError as err:  # a tiling that does not launch (shared memory)
          print(f"{precision} {case} {tiles}: {str(err).splitlines()[0][:160]}")
          continue
        flop = FLOP_PER_SLOT * num_atoms * K * (1 if case == "forward" else 3)
        row = stamp(
          dict(
            atoms=num_atoms,
            precision=precision,
            case=case,
            tiles=tiles or "default",
            kernel_ms=round(kernel_ms, 4),
            twin_ms=round(twin_ms, 4),
            speedup=round(twin_ms / kernel_ms, 2),
            kernel_tflops=round(flop / kernel_ms / 1e9, 1),
            max_relative_difference=error,
          )
        )
        emit(row, args.json)
        rows.append(row)
  print(
    "\n| atoms | precision | case | tiles | kernel (ms) | XLA twin (ms) | speed-up | kernel TFLOP/s | max rel. diff |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['atoms']} | {r['precision']} | {r['case']} | {r['tiles']} | {r['kernel_ms']} | {r['twin_ms']} | "
      f"{r['speedup']} | {r['kernel_tflops']} | {r['max_relative_difference']:.1e} |"
    )


if __name__ == "__main__":
  main()
