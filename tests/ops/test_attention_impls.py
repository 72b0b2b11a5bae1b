"""The fused Pallas attention kernel against its jnp twin (interpret mode on the CPU), and its CUDA lowering.

Each configuration is traced and compiled once (``_results`` is cached): one jitted function returns the
forward output, the VJP and the VJP of the VJP for the kernel, for ``node_attention_ref`` and for the dense
form ``dense_node_attention`` (the CPU path of small batches), on inputs drawn fresh for every session (the
seed is in the failure message).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_helpers import ATTENTION_KERNELS, PAPER, attention_inputs, cuda_lowering

from pallas_kernels.api import TRITON_CALL
from pallas_kernels.jnp_dense import jnp_dense_attention as dense_node_attention
from pallas_kernels.jnp_node import jnp_node_attention as node_attention_ref
from pallas_kernels.pallas import pallas_node_attention as node_attention
from pallas_kernels.triton_launch import Launch

SEED = int(np.random.SeedSequence().entropy % 2**31)

# float32 tolerances on max|kernel - ref| / max|ref| per output array. The kernel and the twin sum the same
# terms in a different order (online softmax with rescaling against a two-pass softmax, a division at the
# end instead of per weight, slot loops against einsums; the dense form sums weights of duplicate sources
# first, then over atoms instead of slots), each result a sum of at most K = 8 products of a
# few factors of order 1: a few ulps (6e-8) per term, so about 1e-6 at worst; measured below 1e-6 forward and
# for the first and second derivatives. The limits leave 10-50x for unlucky draws. The second derivative
# multiplies more terms and sums over two slot loops, hence the larger bound. A near tie between the two
# largest logits of an (atom, head) could move the max's (small, +1e-3-weighted) gradient between slots in
# one implementation and not the other; with continuous random inputs that has probability ~1e-4 per run.
TOLERANCE = {"forward": 1e-5, "vjp": 2e-5, "vjp_of_vjp": 5e-5}

# name: (N targets, M sources, K, H, d, C, R, num_shift_rows or 0 for no shifts, softmax_max, forward block_n)
CONFIGS = {
  "valid": (21, 21, 6, 4, 4, 8, 5, 0, "valid", 4),
  "all_slots_shifts": (21, 21, 6, 4, 4, 8, 5, 3, "all_slots", 4),
  "paper_rows_shifts": (19, 19, 8, 8, 8, 16, 29, 9, "valid", 2),  # R=29 -> 58 flat rows padded to 64
  "chunk_of_targets": (7, 23, 6, 4, 4, 8, 5, 3, "valid", 4),  # the model with edge_chunk: N targets, M sources
}


def _inputs(rng, n, m, k, h, d, c, r, s):
  """Ragged counts, masked slots in the middle, duplicate sources, atoms with no neighbour, and empty slots
  pointing at the last source (the model's padding atom)."""
  count = rng.integers(0, k + 1, size=n)
  count[[0, n // 2]] = 0
  valid = (np.arange(k)[None] < count[:, None]) & (rng.uniform(size=(n, k)) > 0.15)
  neighbors = rng.integers(0, m, size=(n, k))
  neighbors[::3, 1] = neighbors[::3, 0]
  neighbors = np.where(valid, neighbors, m - 1)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
  arrays = dict(
    q=f32(n, h, d),
    k=f32(m, h, d),
    gate=f32(n, k, h),
    edge_scale=f32(n, k, h),
    envelope=rng.uniform(0.05, 1.0, size=(n, k)).astype(np.float32),
    rows=f32(m, r, c),
    shifts=f32(n, k, 3) if s else None,
  )
  return {key: None if v is None else jnp.asarray(v) for key, v in arrays.items()}, (
    jnp.asarray(valid),
    jnp.asarray(neighbors, jnp.int32),
  )


def _derivatives(fn, diff, cotangent_rng):
  """(output, VJP, VJP of the VJP) of fn at diff, cotangents from cotangent_rng."""
  draw = lambda tree: jax.tree.map(lambda x: jnp.asarray(cotangent_rng.normal(size=x.shape), x.dtype), tree)
  out = jax.eval_shape(fn, *diff)
  ct = draw(out)
  first = lambda *x: jax.vjp(fn, *x)[1](ct)
  ct2 = draw(jax.eval_shape(first, *diff))
  primal, pullback = jax.vjp(fn, *diff)
  grads, pullback2 = jax.vjp(first, *diff)
  return primal, grads, pullback2(ct2)


@functools.cache
def _results(name):
  n, m, k, h, d, c, r, s, softmax_max, block_n = CONFIGS[name]
  rng = np.random.default_rng([SEED, len(name)])
  arrays, (valid, neighbors) = _inputs(rng, n, m, k, h, d, c, r, s)
  diff = tuple(arrays[key] for key in ("q", "k", "gate", "edge_scale", "envelope", "rows", "shifts"))
  kw = dict(num_shift_rows=s, softmax_max=softmax_max)

  def bind(impl, **extra):
    return lambda q, kk, g, e, env, rows, sh: impl(q, kk, g, e, env, valid, neighbors, rows, sh, **kw, **extra)

  @jax.jit
  def both(*diff):
    kernel = _derivatives(bind(node_attention, interpret=True, block_n=block_n), diff, np.random.default_rng(1))
    ref = _derivatives(bind(node_attention_ref), diff, np.random.default_rng(1))
    dense = _derivatives(bind(dense_node_attention), diff, np.random.default_rng(1))
    return kernel, ref, dense

  kernel, ref, dense = both(*diff)
  return {"pallas": dict(zip(ORDERS, zip(kernel, ref))), "jnp_dense": dict(zip(ORDERS, zip(dense, ref)))}


ORDERS = ("forward", "vjp", "vjp_of_vjp")


@pytest.mark.parametrize("impl", ["pallas", "jnp_dense"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_jnp_twin(name, order, impl):
  got, want = _results(name)[impl][order]
  names = ("q", "k", "gate", "edge_scale", "envelope", "rows", "shifts") if order != "forward" else None
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves)
  for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
    assert np.all(np.isfinite(g)), (name, order, i)
    err = float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
    label = names[i] if names else i
    assert err < TOLERANCE[order], f"{impl} {name} {order} output {label}: rel error {err:.2e} (seed {SEED})"


def test_float64_inputs_accumulate_in_float64():
  """A float64 model through the kernel keeps float64 (the kernels accumulate in the wider type)."""
  n, m, k, h, d, c, r, s, softmax_max, block_n = CONFIGS["all_slots_shifts"]
  jax.config.update("jax_enable_x64", True)
  try:
    arrays, (valid, neighbors) = _inputs(np.random.default_rng([SEED, 64]), n, m, k, h, d, c, r, s)
    diff = tuple(
      arrays[key].astype(jnp.float64) for key in ("q", "k", "gate", "edge_scale", "envelope", "rows", "shifts")
    )

    def loss(impl, *x, **extra):
      out = impl(*x[:5], valid, neighbors, *x[5:], num_shift_rows=s, softmax_max=softmax_max, **extra)
      return sum(jnp.sum(jnp.sin(o)) for o in out)

    got = jax.jit(
      jax.value_and_grad(lambda *x: loss(node_attention, *x, interpret=True, block_n=block_n), argnums=tuple(range(7)))
    )(*diff)
    want = jax.value_and_grad(lambda *x: loss(node_attention_ref, *x), argnums=tuple(range(7)))(*diff)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert g.dtype == jnp.float64
      assert float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) < 1e-12, f"seed {SEED}"
  finally:
    jax.config.update("jax_enable_x64", False)


def test_forward_mode_fails_with_clear_message():
  n, m, k, h, d, c, r, s, softmax_max, _ = CONFIGS["valid"]
  arrays, (valid, neighbors) = _inputs(np.random.default_rng(SEED), n, m, k, h, d, c, r, s)

  def energy(q):
    out = node_attention(
      q,
      arrays["k"],
      arrays["gate"],
      arrays["edge_scale"],
      arrays["envelope"],
      valid,
      neighbors,
      arrays["rows"],
      interpret=True,
    )
    return jnp.sum(out**2)

  with pytest.raises(TypeError, match="attention_impl='jnp_node'"):
    jax.jvp(energy, (arrays["q"],), (arrays["q"],))
  with pytest.raises(TypeError, match="attention_impl='jnp_node'"):
    jax.hessian(energy)(arrays["q"])


def test_backward_kernels_give_the_same_sums_with_any_tiles():
  """The backward's three gather kernels with tiles set in their launch parameters (targets or sources per
  program not dividing N or M, fewer heads per program than H) against the register-budget default: each output
  is the same sum in the same order (slots, list entries or rows), so equal to the last bit."""
  from pallas_kernels import pallas as kernels

  n, m, k, h, f = 21, 19, 6, 8, 5
  rng = np.random.default_rng(SEED)
  valid = jnp.asarray(rng.uniform(size=(n, k)) > 0.2)
  neighbors = jnp.asarray(rng.integers(0, m, size=(n, k)), jnp.int32)
  graph = kernels._graph(neighbors, valid, m)
  f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  a, b, w = f32(n, f, h), f32(m, f, h), f32(n, k, h)
  calls = (
    (kernels.gather_dot, (a, b)),
    (kernels.gather_sum, (w, b)),
    (kernels.source_sum, (w, a)),
  )
  for kernel, args in calls:
    default = kernel(Launch(interpret=True), graph, *args)
    for block_n, block_h in ((2, 4), (5, 2), (1, 16)):
      tiled = kernel(Launch(interpret=True, block_n=block_n, block_h=block_h), graph, *args)
      np.testing.assert_array_equal(tiled, default, err_msg=f"{kernel.__name__} {block_n}x{block_h}")


# ---------------------------------------------------------------------------------------------------------
# CUDA lowering on the CPU host (an abstract H100): Pallas-to-Triton errors fail here, not on the GPU.
# ---------------------------------------------------------------------------------------------------------

PAPER_SLOTS = 32
ORDER = ("q", "k", "gate", "edge_scale", "envelope", "valid", "neighbors", "rows", "shifts")  # node_attention's


def _lower_for_cuda(fn, *args) -> str:
  return cuda_lowering(fn, *args).as_text()


def _abstract_inputs(n, s):
  """The paper's sizes for N atoms (K = 32); image shifts when there are ``s`` shift rows."""
  inputs = attention_inputs(n, PAPER_SLOTS, **PAPER, shifts=bool(s))
  return tuple(inputs[name] for name in ORDER)


def _kernel_names(text: str) -> set[str]:
  """Names of the Triton kernels in a lowered module (the custom calls carry their kernel's name)."""
  return set(re.findall(r'name = "([^"]+)"', "\n".join(l for l in text.splitlines() if TRITON_CALL in l)))


@pytest.mark.parametrize("softmax_max,s", [("valid", 0), ("all_slots", 9)])
def test_every_kernel_lowers_for_cuda(softmax_max, s):
  """Forward kernel, the three backward gather kernels, the edge weights' two kernels and their second-order uses,
  at the paper's sizes."""
  args = _abstract_inputs(64, s)

  def loss(q, k, gate, scale, env, rows, shifts, valid, neighbors):
    out = node_attention(
      q, k, gate, scale, env, valid, neighbors, rows, shifts, num_shift_rows=s, softmax_max=softmax_max, interpret=False
    )
    return sum(jnp.sum(o**2) for o in jax.tree.leaves(out))

  def everything(q, k, gate, scale, env, valid, neighbors, rows, shifts):
    diff = (q, k, gate, scale, env, rows, shifts)
    grad = lambda *x: jax.grad(loss, argnums=tuple(range(7)))(*x, valid, neighbors)
    second = jax.grad(lambda *x: sum(jnp.sum(g) for g in jax.tree.leaves(grad(*x))), argnums=(0, 1, 5))(*diff)
    return loss(*diff, valid, neighbors), grad(*diff), second

  names = _kernel_names(_lower_for_cuda(everything, *args))
  assert names == ATTENTION_KERNELS, names


def _large_buffers(text: str, threshold: int, skip_ops=("custom_call", "reshape")) -> list[str]:
  """Lines of a StableHLO module defining a tensor of at least ``threshold`` elements, except the kernel's
  custom call and reshapes (bitcasts of inputs and outputs)."""
  found = []
  for line in text.splitlines():
    match = re.search(r"= (?:stablehlo|mhlo|chlo)\.(\w+)", line)
    if not match or match.group(1) in skip_ops:
      continue
    result_type = line.rsplit("->", 1)[-1] if "->" in line else line.rsplit(":", 1)[-1]
    for dims in re.findall(r"tensor<((?:\d+x)+)\w+>", result_type):
      if np.prod([int(x) for x in dims.rstrip("x").split("x")]) >= threshold:
        found.append(line.strip()[:200])
  return found


def test_forward_holds_no_per_edge_buffer():
  """At N=4096 and the paper's sizes nothing of N*K*H/2 elements or more exists outside the kernel."""
  n = 4096
  args = _abstract_inputs(n, 0)
  threshold = n * PAPER_SLOTS * PAPER["h"] // 2
  kernel = lambda *a: node_attention(*a, interpret=False)
  kernel_text = _lower_for_cuda(kernel, *args)
  assert _kernel_names(kernel_text) == {"_forward_kernel"}
  assert _large_buffers(kernel_text, threshold) == []
  # The check bites: the jnp twin gathers [N, K, R, C] rows and builds [N, K, C] weights.
  assert _large_buffers(_lower_for_cuda(node_attention_ref, *args), threshold)


def test_a_kernel_called_at_several_places_is_traced_once():
  """``Launch.call`` gives every call of the same kernel, static arguments, shapes and launch one jitted
  ``pallas_call`` (traced and lowered once per program); another static argument or shape, another launch, or an
  argument that cannot be hashed gets its own."""

  def add(x_ref, o_ref, *, scale):
    o_ref[...] = x_ref[...] * (scale[0] if isinstance(scale, list) else scale)

  shape = jax.ShapeDtypeStruct((8,), jnp.float32)
  launch = Launch(interpret=True)
  first = launch.call(functools.partial(add, scale=2.0), shape, (1,))
  assert launch.call(functools.partial(add, scale=2.0), shape, (1,)) is first
  assert launch.call(functools.partial(add, scale=3.0), shape, (1,)) is not first
  assert launch.call(functools.partial(add, scale=2.0), jax.ShapeDtypeStruct((4,), jnp.float32), (1,)) is not first
  assert Launch(interpret=True, num_warps=8).call(functools.partial(add, scale=2.0), shape, (1,)) is not first
  unhashable = functools.partial(add, scale=[2.0])
  assert launch.call(unhashable, shape, (1,)) is not launch.call(unhashable, shape, (1,))
  x = jnp.arange(8.0, dtype=jnp.float32)
  jaxpr = jax.make_jaxpr(lambda x: first(x) + launch.call(functools.partial(add, scale=2.0), shape, (1,))(x))(x)
  calls = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "jit"]
  assert len(calls) == 2 and calls[0].params["jaxpr"] is calls[1].params["jaxpr"]
  np.testing.assert_array_equal(first(x), 2.0 * x)
  np.testing.assert_array_equal(launch.call(unhashable, [shape], (1,))(x)[0], 2.0 * x)
