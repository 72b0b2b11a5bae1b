"""Shared by the kernel tests: the CUDA lowering of a function on the CPU host (an abstract H100: Pallas kernels
are lowered to Triton, not compiled), the equations of a traced program and the matrix products inside its
kernels, abstract inputs of the attention op (nothing allocated), and the relative errors of a kernel's results
against its twin's."""

import warnings

import jax
import jax.numpy as jnp
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

PAPER = dict(h=128, d=8, c=256, r=29)  # heads, key size, channels, rows per atom of the paper model
# The Pallas kernels of the attention op to second order: the fused forward, the backward's three gather kernels
# and its two edge-weight kernels (docs/kernel.md §3-4).
ATTENTION_KERNELS = frozenset(
  {
    "_forward_kernel",
    "_gather_dot_kernel",
    "_gather_sum_kernel",
    "_source_sum_kernel",
    "_edge_weights_kernel",
    "_edge_weights_vjp_kernel",
  }
)
H100 = AbstractMesh(
  (1,), ("x",), abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
)


def cuda_lowering(fn, *args):
  """``jax.jit(fn)`` on ``args`` lowered for CUDA against the abstract H100 (a ``jax.stages.Lowered``)."""
  with warnings.catch_warnings(), use_abstract_mesh(H100):
    warnings.simplefilter("ignore", DeprecationWarning)  # every Triton lowering warns about the backend
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def equations(jaxpr):
  """Every equation of a traced program and of the programs nested in it (scan and map bodies, custom rules,
  Pallas kernels)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from equations(inner)


def kernel_products(fn, *args) -> list[tuple]:
  """The contracting dimensions ((lhs,), (rhs,)) of every matrix product inside the Pallas kernels that ``fn``
  calls on ``args`` (traced, not run)."""
  calls = [e for e in equations(jax.make_jaxpr(fn)(*args).jaxpr) if e.primitive.name == "pallas_call"]
  assert calls, "no Pallas kernel in the traced program"
  return [
    e.params["dimension_numbers"][0]
    for call in calls
    for e in equations(call.params["jaxpr"])
    if e.primitive.name == "dot_general"
  ]


def attention_inputs(n, k, h, d, c, r, *, m=None, shifts=False) -> dict:
  """Abstract inputs of ``node_attention`` by name: N targets, M sources (default N), K slots, H heads of key
  size d, rows [M, r, c], image shifts [N, K, 3] when ``shifts`` (else None)."""
  m = n if m is None else m
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  return dict(
    q=f32(n, h, d),
    k=f32(m, h, d),
    gate=f32(n, k, h),
    edge_scale=f32(n, k, h),
    envelope=f32(n, k),
    valid=jax.ShapeDtypeStruct((n, k), jnp.bool_),
    neighbors=jax.ShapeDtypeStruct((n, k), jnp.int32),
    rows=f32(m, r, c),
    shifts=f32(n, k, 3) if shifts else None,
  )


def relative_errors(got, want):
  """(shape, max|got - want| / max|want|) per leaf of two pytrees of arrays; a leaf whose twin value is all zero
  (a cotangent that vanishes identically, such as a bias's second-order one) is compared absolutely."""
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    scale = float(jnp.max(jnp.abs(b)))
    yield a.shape, float(jnp.max(jnp.abs(a - b))) / (scale or 1.0)


def errors_against_largest(got, want):
  """(shape, max|got - want| / the largest |want| over all leaves) per leaf of two pytrees: for outputs of very
  different sizes computed together, such as a softmax shift's cotangent beside the logits' (an error relative to
  each leaf's own largest entry would measure the larger outputs' round-off against the small one)."""
  want_leaves = jax.tree.leaves(want)
  scale = max(float(jnp.max(jnp.abs(x))) for x in want_leaves)
  for a, b in zip(jax.tree.leaves(got), want_leaves, strict=True):
    yield a.shape, float(jnp.max(jnp.abs(a - b))) / scale
