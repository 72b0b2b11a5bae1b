"""The fused direction-gate kernels against their jnp twin (interpret mode on the CPU), and their CUDA lowering.

One jitted function per configuration returns, for the kernels and for the twin, the forward output, the VJP
with respect to every input and the VJP of that VJP (``_results`` is cached: one compilation per configuration).
Inputs are drawn fresh for every session (the seed is in the failure message).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_helpers import cuda_lowering, kernel_products, relative_errors

from pallas_kernels.api import TRITON_CALL, direction_gate
from pallas_kernels.gate_jnp import jnp_direction_gate
from pallas_kernels.gate_pallas import pallas_direction_gate

SEED = int(np.random.SeedSequence().entropy % 2**31)

# float32 tolerances on max|kernel - twin| / max|twin| per output array. Both sum the same products in another
# order (chunks of block_f columns accumulated in the kernel, one product per array in the twin); each entry of g
# sums (L+1) F = 72 products of order 1 and each cotangent about as many, so a few ulps (6e-8) times sqrt(72) is
# about 1e-6; the limits leave 10x. The second derivative chains three such sums, hence the larger bound.
TOLERANCE = {"forward": 1e-5, "vjp": 1e-5, "vjp_of_vjp": 5e-5}
# With bfloat16 operands the forward rounds the same values in both, but JAX's derivative of a bfloat16 product
# returns its cotangents in bfloat16 (rounded to 2^-9 relative) where the kernel keeps them in float32: the
# derivatives differ by a few bfloat16 roundings (2.4e-3 seen), hence 1e-2 for them.
BFLOAT16_DERIVATIVE_TOLERANCE = 1e-2
# The forward rounds to bfloat16 the operand of its second product, (t * m) [N, K, (L+1) F], and m comes from the
# first product, summed in another order by the kernel and the twin: where the two float32 values of an entry
# straddle a bfloat16 rounding boundary they round to neighbours, one bfloat16 step (at most 2^-7 of the entry)
# apart. Each such entry moves one of the (L+1) F = 72 terms of an entry of g by at most 2^-7 of itself, a term
# being at most a few times max|g| / sqrt(72): about 1e-3 of max|g| per flip. Most draws have none (errors of 1e-7
# in twelve seeds); seed 811772085 had one, 4.5e-5.
BFLOAT16_FORWARD_TOLERANCE = 2e-3

# name: (N targets, K slots, A hidden, L, F channels per degree, H heads, block_t, block_f, matmul precision)
CONFIGS = {
  # K = 6 -> 8 padded slots, N = 7 not a multiple of block_t, F = 24 not a multiple of block_f, A and H < 16.
  "ragged": (7, 6, 12, 2, 24, 8, 2, 16, "highest"),
  "one_target_per_program": (5, 8, 20, 1, 16, 4, 1, 16, "highest"),
  # bfloat16 operands: both round the same values to bfloat16 and accumulate their exact products in float32.
  "bfloat16": (7, 6, 12, 2, 24, 8, 4, 16, "bfloat16"),
}


def _inputs(rng, n, k, a, lmax, f, h):
  """u, Y, P, the weights, a cotangent of g and a cotangent of the VJP's outputs. Empty slots (the model's) carry
  Y = 0 and a constant hidden layer; two slots of a target are duplicates."""
  s, cols = (lmax + 1) ** 2, (lmax + 1) * f
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
  u, sh = f32(n, k, a), f32(n, k, s)
  sh[:, -1] = 0.0
  u[:, -1] = u[0, -1]
  sh[::2, 1], u[::2, 1] = sh[::2, 0], u[::2, 0]
  args = (u, sh, f32(n, s, f), f32(a, cols) / a**0.5, f32(cols), f32(cols, h) / cols**0.5, f32(h))
  second_ct = tuple(f32(*x.shape) for x in args)
  return tuple(map(jnp.asarray, args)), jnp.asarray(f32(n, k, h)), tuple(map(jnp.asarray, second_ct))


@functools.cache
def _results(name: str) -> dict:
  n, k, a, lmax, f, h, block_t, block_f, precision = CONFIGS[name]
  rng = np.random.default_rng(SEED + len(name))
  args, ct, ct2 = _inputs(rng, n, k, a, lmax, f, h)
  kernel = functools.partial(
    pallas_direction_gate,
    precision=precision,
    interpret=True,
    block_t=block_t,
    block_f=block_f,
    backward_block_f=block_f,
  )
  twin = functools.partial(jnp_direction_gate, precision=precision)

  def orders(gate, args, ct, ct2):
    out, pullback = jax.vjp(gate, *args)
    second = jax.vjp(lambda *x: jax.vjp(gate, *x)[1](ct), *args)[1](ct2)
    return {"forward": out, "vjp": pullback(ct), "vjp_of_vjp": second}

  both = jax.jit(lambda *x: (orders(kernel, *x), orders(twin, *x)))
  return dict(zip(("kernel", "twin"), both(args, ct, ct2)))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("order", TOLERANCE)
def test_kernel_matches_twin(name, order):
  results = _results(name)
  for shape, error in relative_errors(results["kernel"][order], results["twin"][order]):
    if CONFIGS[name][-1] == "bfloat16":
      tolerance = BFLOAT16_FORWARD_TOLERANCE if order == "forward" else BFLOAT16_DERIVATIVE_TOLERANCE
    else:
      tolerance = TOLERANCE[order]
    assert error <= tolerance, f"{name} {order} {shape}: {error:.2e} (seed {SEED})"


def test_entry_point_dispatch_and_errors():
  rng = np.random.default_rng(SEED)
  args, _, _ = _inputs(rng, 3, 4, 8, 1, 16, 4)
  twin = direction_gate(*args, precision="highest", implementation="jnp")
  fused = direction_gate(*args, precision="highest", implementation="pallas", interpret=True)
  np.testing.assert_allclose(fused, twin, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(twin))))
  with jax.enable_x64(True):  # float64 (the model's float64 mode) takes the twin
    wide = tuple(jnp.asarray(x, jnp.float64) for x in args)
    assert direction_gate(*wide, precision="highest", implementation="pallas").dtype == jnp.float64
  with pytest.raises(ValueError, match="unknown gate implementation"):
    direction_gate(*args, precision="highest", implementation="triton")
  with pytest.raises(TypeError, match="no kernel options"):
    direction_gate(*args, precision="highest", implementation="jnp", block_t=2)
  with pytest.raises(ValueError, match="w_mix must be"):
    pallas_direction_gate(*args[:3], args[3][:, :-1], *args[4:], interpret=True)
  for option in ("block_f", "backward_block_f"):
    with pytest.raises(ValueError, match="backward_block_f powers of two >= 16"):
      pallas_direction_gate(*args, interpret=True, **{option: 8})
  with pytest.raises(TypeError, match="reverse mode only"):
    jax.jvp(lambda u: pallas_direction_gate(u, *args[1:], interpret=True), (args[0],), (args[0],))


def test_kernels_lower_for_cuda_at_paper_sizes():
  """Forward and backward kernels at the paper's sizes (A = 128, L = 2, F = 256, H = 128, K = 32), every precision,
  lowered to Triton for an abstract H100; the forces' program holds no [N, K, (L+1) F] array outside them."""
  n, k = 256, 32
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  args = (f32(n, k, 128), f32(n, k, 9), f32(n, 9, 256), f32(128, 768), f32(768), f32(768, 128), f32(128))
  for precision in ("highest", "tensorfloat32", "bfloat16"):

    def forces(u, sh, proj, *weights, precision=precision):
      gate = lambda u, sh, proj: pallas_direction_gate(u, sh, proj, *weights, precision=precision, interpret=False)
      return jax.grad(lambda *x: jnp.sum(gate(*x) ** 2), argnums=(0, 1, 2))(u, sh, proj)

    text = cuda_lowering(forces, *args).as_text()
    kernels = [line for line in text.splitlines() if TRITON_CALL in line]
    assert any("_gate_forward_kernel" in l for l in kernels) and any("_gate_backward_kernel" in l for l in kernels)
    assert not _per_edge_lines(text, n, k), precision
  # The check bites: the twin's forces form the [N, K, 768] arrays.
  twin = lambda u, sh, proj, *w: jax.grad(lambda *x: jnp.sum(jnp_direction_gate(*x, *w) ** 2), argnums=(0, 1, 2))(
    u, sh, proj
  )
  assert _per_edge_lines(cuda_lowering(twin, *args).as_text(), n, k)


def _per_edge_lines(text: str, n: int, k: int) -> list[str]:
  """Lines of a lowered module, other than the kernels' calls, that form an [N, K, 768] float32 array."""
  return [line for line in text.splitlines() if f"tensor<{n}x{k}x768xf32>" in line and TRITON_CALL not in line]


def test_forward_products_contract_their_weights_along_the_contiguous_axis():
  """Both products of the forward kernel read their weight chunk transposed (W_mix^T, W_gate^T passed in) and
  contract it along its second, contiguous axis: the layout in which Triton's TF32 products run fastest
  (docs/kernel.md §9)."""
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  args = (f32(64, 32, 128), f32(64, 32, 9), f32(64, 9, 256), f32(128, 768), f32(768), f32(768, 128), f32(128))
  gate = functools.partial(pallas_direction_gate, precision="tensorfloat32", interpret=False)
  assert kernel_products(gate, *args) == [((1,), (1,))] * 6  # two per degree's walk over its columns, L = 2
