"""How fast Triton's matrix products run inside a Pallas kernel shaped like the per-edge kernels, by weight layout.

The direction gate and the radial profile kernels (docs/kernel.md §7-§9) hold a tile of rows of the edges in
registers and walk the columns of a hidden layer in chunks: m = x W1[:, chunk] (a [rows, A] x [A, chunk] product),
an elementwise step (here SiLU), and acc += m W2[chunk, :]. This script runs exactly that pattern alone, with no
gathers, on x [R, A] = [131,072, 128] (4,096 atoms x 32 slots), W1 [128, 768], W2 [768, 128] (the gate's sizes),
and reports TFLOP/s for:

  * the weight layout: "rows" reads W1 [A, 768] and W2 [768, H] as stored (the contracted axis strided), "k-major"
    reads W1^T [768, A] and W2^T [H, 768] (the contracted axis contiguous, the layout of Hopper's wgmma operands);
  * the tiling: rows per program / columns per chunk / warps / pipelining stages;
  * the operand precision: TF32 or bfloat16 (float32 accumulation in both);

against the same two products in XLA (cuBLAS, the [R, 768] intermediate in device memory). Each kernel result is
checked against XLA's (largest difference relative to the largest entry; TF32 rounding gives about 2e-4).

Cost: 2 R (A 768 + 768 H) = 25.8 GFLOP per call. Time: median of ``--repeats`` calls after two warm-ups, each
ending in ``block_until_ready``.

Usage: PYTHONPATH=$PWD python benchmarks/triton_products.py --json $OUT/triton_products.jsonl
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from benchmarks.report import emit, max_relative, median_ms, stamp

ATOMS, K, A, COLS, H = 4096, 32, 128, 768, 128
ROWS = ATOMS * K
FLOP = 2 * ROWS * (A * COLS + COLS * H)
# (layout, rows per program, columns per chunk, warps, stages, operand precision)
CONFIGS = [
  ("rows", 128, 32, 8, 1, "tf32"),
  ("rows", 128, 32, 8, 3, "tf32"),
  ("rows", 128, 64, 8, 3, "tf32"),
  ("k-major", 128, 32, 8, 3, "tf32"),
  ("k-major", 128, 64, 8, 1, "tf32"),
  ("k-major", 128, 64, 8, 2, "tf32"),
  ("k-major", 128, 64, 8, 3, "tf32"),
  ("k-major", 64, 64, 4, 3, "tf32"),
  ("rows", 128, 32, 8, 3, "bf16"),
  ("k-major", 128, 64, 8, 3, "bf16"),
]


def _kernel(x_ref, w1_ref, w2_ref, out_ref, *, rows, cols, k_major, bf16):
  r = pl.program_id(0) * rows + jnp.arange(rows)
  a, h = jnp.arange(A), jnp.arange(H)
  x = pltriton.load(x_ref.at[r[:, None], a[None, :]])
  cast = (lambda v: v.astype(jnp.bfloat16)) if bf16 else (lambda v: v)
  x = cast(x)
  contract_w = 1 if k_major else 0

  def chunk(c, acc):
    f = c * cols + jnp.arange(cols)
    if k_major:  # W1^T [COLS, A] -> [cols, A]; W2^T [H, COLS] -> [H, cols]
      w1, w2 = pltriton.load(w1_ref.at[f[:, None], a[None, :]]), pltriton.load(w2_ref.at[h[:, None], f[None, :]])
    else:  # W1 [A, COLS] -> [A, cols]; W2 [COLS, H] -> [cols, H]
      w1, w2 = pltriton.load(w1_ref.at[a[:, None], f[None, :]]), pltriton.load(w2_ref.at[f[:, None], h[None, :]])
    dims = (((1,), (contract_w,)), ((), ()))
    m = lax.dot_general(x, cast(w1), dims, preferred_element_type=jnp.float32)
    m = m * jax.nn.sigmoid(m)
    return acc + lax.dot_general(cast(m), cast(w2), dims, preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, COLS // cols, chunk, jnp.zeros((rows, H), jnp.float32))
  pltriton.store(out_ref.at[r[:, None], h[None, :]], acc)


def kernel_call(layout: str, rows: int, cols: int, warps: int, stages: int, precision: str):
  """The jitted kernel for one configuration; takes x and the weights as stored for ``layout``."""
  body = functools.partial(_kernel, rows=rows, cols=cols, k_major=layout == "k-major", bf16=precision == "bf16")
  call = pl.pallas_call(
    body,
    out_shape=jax.ShapeDtypeStruct((ROWS, H), jnp.float32),
    grid=(ROWS // rows,),
    compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=stages),
  )
  return jax.jit(call)


@jax.jit
def xla_products(x, w1, w2):
  m = jnp.dot(x, w1, precision=lax.Precision.DEFAULT)
  return jnp.dot(m * jax.nn.sigmoid(m), w2, precision=lax.Precision.DEFAULT)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--json")
  args = parser.parse_args()
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (ROWS, A), jnp.float32)
  w1 = jax.random.normal(keys[1], (A, COLS), jnp.float32) / A**0.5
  w2 = jax.random.normal(keys[2], (COLS, H), jnp.float32) / COLS**0.5
  reference = xla_products(x, w1, w2)
  xla_ms = median_ms(xla_products, (x, w1, w2), args.repeats)
  tflops = round(FLOP / xla_ms / 1e9, 1)
  xla_row = dict(atoms=ATOMS, weights="xla", precision="tf32", ms=round(xla_ms, 4), tflops=tflops)
  rows_out = [stamp(xla_row)]
  emit(rows_out[0], args.json)
  for layout, rows, cols, warps, stages, precision in CONFIGS:
    row = dict(atoms=ATOMS, weights=layout, tiles=f"{rows}/{cols}/{warps}/{stages}", precision=precision)
    weights = (w1.T, w2.T) if layout == "k-major" else (w1, w2)
    try:
      fn = kernel_call(layout, rows, cols, warps, stages, precision)
      ms = median_ms(fn, (x, *weights), args.repeats)
      row.update(
        ms=round(ms, 4), tflops=round(FLOP / ms / 1e9, 1), max_rel_diff=max_relative(fn(x, *weights), reference)
      )
    except Exception as err:  # a tiling that does not fit (shared memory, registers) is reported, not fatal
      row.update(error=str(err).splitlines()[0][:160])
    rows_out.append(stamp(row))
    emit(row, args.json)
  print(f"\n{rows_out[0]['device']}, {rows_out[0]['date']}: 2 products, {FLOP / 1e9:.1f} GFLOP per call")
  print("| weights | rows/cols/warps/stages | operands | ms | TFLOP/s | max rel. diff |")
  print("|---|---|---|---|---|---|")
  for r in rows_out:
    print(
      f"| {r['weights']} | {r.get('tiles', '-')} | {r['precision']} | "
      f"{r.get('ms', r.get('error', ''))} | {r.get('tflops', '')} | {r.get('max_rel_diff', '')} |"
    )


if __name__ == "__main__":
  main()
