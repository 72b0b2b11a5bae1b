"""The fused radial-profile kernel against its jnp twin (interpret mode on the CPU), and its CUDA lowering.

One jitted function per configuration returns, for the kernel and for the twin, the forward output, the VJP
with respect to every float input and the VJP of the distances' cotangent (the force-matching order), so
``_results`` compiles once per configuration. The distances' cotangent comes from the tangent kernel, the other
cotangents and the second order from the twin (``radial_pallas``). Inputs are drawn fresh for every session (the
seed is in the failure message).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_helpers import cuda_lowering, kernel_products, relative_errors

from pallas_kernels.api import TRITON_CALL, radial_profile
from pallas_kernels.radial_jnp import jnp_radial_profile
from pallas_kernels.radial_pallas import pallas_radial_profile

SEED = int(np.random.SeedSequence().entropy % 2**31)

# float32 tolerances on max|kernel - twin| / max|twin| per output array. The kernels sum the basis products in
# chunks of block_b and the norms' moments as plain sums where the twin uses one product and jnp.mean; each entry
# sums at most B + A = 40 terms of order 1 per layer through three layers, so a few ulps (6e-8) times sqrt(40)
# per layer is about 1e-6; the limits leave 10x. The second order chains the backward's sums once more.
TOLERANCE = {"forward": 1e-5, "vjp": 1e-5, "vjp_of_vjp": 5e-5}
# bfloat16 operands: JAX rounds a bfloat16 product's cotangents to bfloat16 where the kernel keeps float32.
BFLOAT16_DERIVATIVE_TOLERANCE = 2e-2

# name: (N targets, K slots, B basis functions, widths after the first layer's, last Linear?, elements,
#        block_r, block_b, precision)
CONFIGS = {
  # N K = 42 slots not a multiple of block_r, B = 20 not a multiple of block_b, widths below 16.
  "ragged_hidden": (7, 6, 20, (12, 12), False, 3, 16, 16, "highest"),
  "ragged_last": (7, 6, 20, (12, 20, 5), True, 3, 32, 16, "highest"),
  "one_norm": (5, 4, 32, (16,), False, 2, 16, 32, "highest"),
  "bfloat16": (7, 6, 20, (12, 12, 8), True, 3, 16, 16, "bfloat16"),
}


def _inputs(rng, n, k, b, widths, last, elements):
  """The op's arguments, a cotangent of its output and one of the distances' cotangent. Empty slots carry the
  model's distance 1 and element 0; two slots of every target are duplicates."""
  f32 = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
  distance = rng.uniform(0.5, 5.0, size=(n, k)).astype(np.float32)
  numbers = rng.integers(0, elements, size=(n, k)).astype(np.int32)
  distance[:, -1], numbers[:, -1] = 1.0, 0
  distance[:, 1], numbers[:, 1] = distance[:, 0], numbers[:, 0]
  a = widths[0]
  norms = tuple((1.0 + f32(w, scale=0.1), f32(w, scale=0.1)) for w in (widths if not last else widths[:-1]))
  pairs = list(zip(widths[:-1], widths[1:]))
  linears = tuple((f32(i, o, scale=i**-0.5), f32(o, scale=0.1)) for i, o in pairs)
  args = (jnp.asarray(distance), f32(n, a), f32(elements, a), jnp.asarray(numbers), f32(b, a, scale=b**-0.5))
  return args + (norms, linears), f32(n, k, widths[-1]), f32(n, k)


@functools.cache
def _results(name: str) -> dict:
  n, k, b, widths, last, elements, block_r, block_b, precision = CONFIGS[name]
  rng = np.random.default_rng(SEED + len(name))
  args, ct, ct2 = _inputs(rng, n, k, b, widths, last, elements)
  basis = (5.0, b, 2.0)
  kernel = functools.partial(
    pallas_radial_profile,
    basis=basis,
    precision=precision,
    interpret=True,
    block_r=block_r,
    block_b=block_b,
    tangent_block_r=block_r,
  )
  twin = functools.partial(jnp_radial_profile, basis=basis, precision=precision)
  numbers = args[3]

  def orders(profile, args, ct, ct2):
    distance, target, source, _, w_rbf, norms, linears = args
    fn = lambda d, t, s, w, nm, ln: profile(d, t, s, numbers, w, nm, ln)
    floats = (distance, target, source, w_rbf, norms, linears)
    out, pullback = jax.vjp(fn, *floats)
    second = jax.vjp(lambda *x: jax.vjp(fn, *x)[1](ct)[0], *floats)[1](ct2)
    return {"forward": out, "vjp": pullback(ct), "vjp_of_vjp": second}

  both = jax.jit(lambda *x: (orders(kernel, *x), orders(twin, *x)))
  return dict(zip(("kernel", "twin"), both(args, ct, ct2)))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("order", TOLERANCE)
def test_kernel_matches_twin(name, order):
  results = _results(name)
  for shape, error in relative_errors(results["kernel"][order], results["twin"][order]):
    tolerance = BFLOAT16_DERIVATIVE_TOLERANCE if CONFIGS[name][-1] == "bfloat16" and order != "forward" else None
    assert error <= (tolerance or TOLERANCE[order]), f"{name} {order} {shape}: {error:.2e} (seed {SEED})"


def test_entry_point_dispatch_and_errors():
  rng = np.random.default_rng(SEED)
  args, _, _ = _inputs(rng, 3, 4, 8, (8, 8, 4), True, 2)
  basis = (5.0, 8, 2.0)
  twin = radial_profile(*args, basis=basis, precision="highest", implementation="jnp")
  fused = radial_profile(*args, basis=basis, precision="highest", implementation="pallas", interpret=True)
  np.testing.assert_allclose(fused, twin, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(twin))))
  with jax.enable_x64(True):  # float64 (the model's float64 mode) takes the twin
    wide = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64) if x.dtype == jnp.float32 else x, args)
    assert radial_profile(*wide, basis=basis, precision="highest", implementation="pallas").dtype == jnp.float64
  with pytest.raises(ValueError, match="unknown radial profile implementation"):
    radial_profile(*args, basis=basis, precision="highest", implementation="triton")
  with pytest.raises(TypeError, match="no kernel options"):
    radial_profile(*args, basis=basis, precision="highest", implementation="jnp", block_r=16)
  with pytest.raises(ValueError, match="w_rbf"):
    pallas_radial_profile(*args, basis=(5.0, 9, 2.0), interpret=True)
  with pytest.raises(ValueError, match="n - 1 or n Linears"):
    pallas_radial_profile(*args[:5], args[5][:1], args[6], basis=basis, interpret=True)
  with pytest.raises(ValueError, match="norm 1 must have"):
    pallas_radial_profile(*args[:5], (args[5][0], (args[5][1][0][:3], args[5][1][1])), args[6], basis=basis)
  with pytest.raises(ValueError, match="block_b a power of two >= 16"):
    pallas_radial_profile(*args, basis=basis, interpret=True, block_b=8)
  with pytest.raises(TypeError, match="reverse mode only"):
    jax.jvp(lambda d: pallas_radial_profile(d, *args[1:], basis=basis, interpret=True), (args[0],), (args[0],))


@pytest.mark.parametrize("last", [128, 256, None])
def test_kernel_lowers_for_cuda_at_paper_sizes(last):
  """The forward kernel at the paper's sizes (B = 256, A = 128, K = 32; the gates' hidden layer, rho's 128 heads,
  the edge-degree embedding's 256 channels), every precision, lowered to Triton for an abstract H100: the program
  holds no per-slot basis [N, K, B] or hidden [N, K, A] array outside the kernel (of the widths other than the
  output's). Nor does the forces' program (the distances' gradient), which runs the tangent kernel instead of the
  forward one."""
  n, k, b, a = 256, 32, 256, 128
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  norms = ((f32(a), f32(a)), (f32(a), f32(a)))
  linears = ((f32(a, a), f32(a)),) + (((f32(a, last), f32(last)),) if last else ())
  args = (f32(n, k), f32(n, a), f32(10, a), jax.ShapeDtypeStruct((n, k), jnp.int32), f32(b, a), norms, linears)
  widths = {b, a} - {last or a}
  for precision in ("highest", "tensorfloat32", "bfloat16"):
    profile = functools.partial(pallas_radial_profile, basis=(5.0, b, 2.0), precision=precision, interpret=False)
    forces = lambda distance, *rest: jax.grad(lambda d: jnp.sum(jnp.sin(profile(d, *rest))))(distance)
    for fn, num_results in ((profile, 1), (forces, 2)):  # the result, then the result and its distance tangent
      text = cuda_lowering(fn, *args).as_text()
      calls = [line for line in text.splitlines() if TRITON_CALL in line]
      assert len(calls) == 1 and "_forward_kernel" in calls[0], (precision, num_results)
      assert calls[0].split("->")[-1].count("tensor<") == num_results, (precision, calls[0][-200:])
      assert not _per_slot_lines(text, n, k, widths), (precision, last, num_results)
  # The check bites: the twin forms the basis and hidden arrays.
  twin = functools.partial(jnp_radial_profile, basis=(5.0, b, 2.0), precision="tensorfloat32")
  assert _per_slot_lines(cuda_lowering(twin, *args).as_text(), n, k, widths)


def _per_slot_lines(text: str, n: int, k: int, widths) -> list[str]:
  """Lines of a lowered module, other than the kernels' calls, that form an [N, K, w] or [N K, w] float32 array
  for a width w in ``widths``."""
  shapes = [f"tensor<{n}x{k}x{w}xf32>" for w in widths] + [f"tensor<{n * k}x{w}xf32>" for w in widths]
  return [line for line in text.splitlines() if any(s in line for s in shapes) and TRITON_CALL not in line]


def test_products_contract_their_weights_along_the_contiguous_axis():
  """Every product of the kernel (the basis chunks times W_rbf, each Linear) reads its weights transposed and
  contracts them along their second, contiguous axis: the layout in which Triton's TF32 products run fastest
  (docs/kernel.md §9). Edge-degree sizes: B = 256, two hidden layers of 128, 256 outputs."""
  n, k, b, a = 64, 32, 256, 128
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  norms = ((f32(a), f32(a)), (f32(a), f32(a)))
  linears = ((f32(a, a), f32(a)), (f32(a, 256), f32(256)))
  args = (f32(n, k), f32(n, a), f32(10, a), jax.ShapeDtypeStruct((n, k), jnp.int32), f32(b, a), norms, linears)
  profile = functools.partial(pallas_radial_profile, basis=(5.0, b, 2.0), precision="tensorfloat32", interpret=False)
  assert kernel_products(profile, *args) == [((1,), (1,))] * 3
