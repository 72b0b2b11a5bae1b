"""The radial profile of the edges (the per-edge MLPs) alone at the paper's sizes: the fused Pallas forward kernel
against the XLA twin.

Profiles (``radial_jnp.jnp_radial_profile``; B = 256 basis functions, A = 128 hidden, K = 32 slots, 10 elements):
  "hidden"  B -> A -> A, the last hidden layer (the ``QKdot_alpha`` gate's edge MLP, whose last layer is in the gate)
  "rho"     B -> A -> A -> 128 (the gates' rho MLP, H = 128 heads)
  "degree"  B -> A -> A -> 256 (one of the edge-degree embedding's three MLPs, C = 256 channels)
Random float32 inputs with the scales of an initialised model, the same for both implementations.

Cases: "forward", the op's value (the calls that are not differentiated: energies with direct forces, MD with
direct forces); "forces", its value and the distances' cotangent for a random cotangent of the result (what a
conservative-force call asks of each profile: the tangent kernel, then one XLA reduction, against the twin's
forward and backward in XLA). Each tiling is checked against the twin on the same inputs (largest difference
relative to the largest entry, over all outputs) and timed: median of ``--repeats`` calls after two warm-ups,
each ending in ``block_until_ready``. ``--tiles`` sets the forward kernel's tiling in the "forward" case and the
tangent kernel's in the "forces" case.

Cost model per slot: 2 (B A + sum of the Linears' I O) FLOP in the products ("hidden" 98,304; "rho" 131,072;
"degree" 163,840), the basis B exponentials; fewest bytes 4 (1 + 1 + O) (distance, element, output) per slot plus
the target rows. The twin writes and reads the basis [N, K, B] and several [N, K, A] arrays in device memory.

Usage: PYTHONPATH=$PWD python benchmarks/radial.py --atoms 4096 --precision tensorfloat32 --json $OUT/radial.jsonl
(``--cases forward forces``; ``--tiles 64/32/4/1 ...``: other tilings, block_r/block_b/warps/stages)
"""

from __future__ import annotations

import argparse
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.report import emit, max_relative, median_ms, stamp
from pallas_kernels.radial_jnp import jnp_radial_profile
from pallas_kernels.radial_pallas import pallas_radial_profile

B, A, K, ELEMENTS, CUTOFF = 256, 128, 32, 10, 5.0
BASIS = (CUTOFF, B, 1.0)
PROFILES = {"hidden": (A, A), "rho": (A, A, 128), "degree": (A, A, 256)}  # widths after the first layer's


def parse_tiles(text: str, case: str) -> dict:
  """The kernel options written as "64/32/4/1" (block_r/block_b/warps/stages): the forward kernel's, or for the
  "forces" case the tangent kernel's."""
  names = ("block_r", "block_b", "num_warps", "num_stages")
  if case == "forces":
    names = ("tangent_block_r", "block_b", "tangent_num_warps", "tangent_num_stages")
  return dict(zip(names, map(int, text.split("/")), strict=True))


def case_function(profile, case: str):
  """The timed function of (op arguments, cotangent of the result): the op's value, or its value and the
  distances' cotangent."""
  if case == "forward":
    return lambda args, ct: profile(*args)

  def forces(args, ct):
    out, pullback = jax.vjp(lambda d: profile(d, *args[1:]), args[0])
    return out, pullback(ct)[0]

  return forces


def flop_per_slot(profile: str) -> int:
  widths = PROFILES[profile]
  return 2 * (B * A + sum(i * o for i, o in zip(widths[:-1], widths[1:])))


def inputs(num_atoms: int, profile: str, seed: int = 0):
  """(distance, target rows, source table, source elements, W_rbf, norms, linears)."""
  rng = np.random.default_rng(seed)
  f32 = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
  widths = PROFILES[profile]
  distance = jnp.asarray(rng.uniform(0.8, CUTOFF, size=(num_atoms, K)), jnp.float32)
  numbers = jnp.asarray(rng.integers(0, ELEMENTS, size=(num_atoms, K)), jnp.int32)
  norms = tuple((1.0 + f32(A, scale=0.1), f32(A, scale=0.1)) for _ in range(2))
  linears = tuple((f32(i, o, scale=i**-0.5), f32(o, scale=0.1)) for i, o in zip(widths[:-1], widths[1:]))
  return distance, f32(num_atoms, A), f32(ELEMENTS, A), numbers, f32(B, A, scale=B**-0.5), norms, linears


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--atoms", type=int, nargs="+", default=[4096])
  parser.add_argument("--precision", nargs="+", default=["tensorfloat32"])
  parser.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
  parser.add_argument("--cases", nargs="+", default=["forward"], choices=["forward", "forces"])
  parser.add_argument(
    "--tiles", nargs="+", default=[], metavar="R/B/W/S", help="also time these tilings: block_r/block_b/warps/stages"
  )
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--json")
  args = parser.parse_args()
  rows = []
  for num_atoms, precision, profile, case in itertools.product(args.atoms, args.precision, args.profiles, args.cases):
    profile_args = inputs(num_atoms, profile)
    ct = jax.random.normal(jax.random.key(1), (num_atoms, K, PROFILES[profile][-1]), jnp.float32)
    twin = jax.jit(case_function(functools.partial(jnp_radial_profile, basis=BASIS, precision=precision), case))
    ref = twin(profile_args, ct)
    twin_ms = median_ms(twin, (profile_args, ct), args.repeats)
    for tiles in [dict()] + [parse_tiles(t, case) for t in args.tiles]:
      kernel = functools.partial(pallas_radial_profile, basis=BASIS, precision=precision, **tiles)
      fn = jax.jit(case_function(kernel, case))
      try:
        error = max(max_relative(x, y) for x, y in zip(jax.tree.leaves(fn(profile_args, ct)), jax.tree.leaves(ref)))
        kernel_ms = median_ms(fn, (profile_args, ct), args.repeats)
      except jax.errors.JaxRuntimeError as err:  # a tiling that does not launch (shared memory)
        print(f"{precision} {profile} {case} {tiles}: {str(err).splitlines()[0][:160]}")
        continue
      flop = flop_per_slot(profile) * (2 if case == "forces" else 1) * num_atoms * K
      row = stamp(
        dict(
          atoms=num_atoms,
          precision=precision,
          profile=profile,
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
    "\n| atoms | precision | profile | case | tiles | kernel (ms) | XLA twin (ms) | speed-up | kernel TFLOP/s | "
    "max rel. diff |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['atoms']} | {r['precision']} | {r['profile']} | {r['case']} | {r['tiles']} | {r['kernel_ms']} | "
      f"{r['twin_ms']} | {r['speedup']} | {r['kernel_tflops']} | {r['max_relative_difference']:.1e} |"
    )


if __name__ == "__main__":
  main()
