"""What the package's Pallas-Triton kernels share: their static launch parameters (``Launch``), the
power-of-two sizes and masked index ranges Triton values need, the accumulation type, and the refusal of forward
mode (every kernel is differentiated in reverse mode only, docs/kernel.md §5)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax._src.interpreters import ad as _ad  # JVPTracer, to name forward mode in the error (jax pinned)
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

FORWARD_MODE_MESSAGE = (
  "node_attention (attention_impl='pallas') supports reverse mode only (jax.grad, jax.vjp, and reverse over "
  "reverse for force training); forward-mode transforms (jax.jvp, jax.jacfwd, jax.hessian) need "
  "attention_impl='jnp_node'."
)
REGISTER_BUDGET = 4096  # elements of the largest [block, F, heads] tile of the attention's backward kernels


def pow2(n: int) -> int:
  """The smallest power of two >= n (1 for n <= 1)."""
  return 1 << max(0, (int(n) - 1).bit_length())


def accumulator_type(dtype):
  """Kernels accumulate in float32, or in the output's type where that is wider (float64 models)."""
  return jnp.promote_types(dtype, jnp.float32)


def reject_forward_mode(*arrays) -> None:
  """Raises a clear error when called under a forward-mode (JVP) trace."""
  if any(isinstance(x, _ad.JVPTracer) for x in jax.tree.leaves(arrays)):
    raise TypeError(FORWARD_MODE_MESSAGE)


def arange(start, size: int, limit: int):
  """Indices start..start+size-1 and their in-bounds mask (< limit)."""
  idx = start + jnp.arange(size, dtype=jnp.int32)
  return idx, idx < limit


def register_tiles(num_f: int, num_h: int) -> tuple[int, int]:
  """(block_n, block_h) keeping a [block_n, padded F, block_h] tile within ``REGISTER_BUDGET``."""
  f_pad = pow2(num_f)
  block_h = min(pow2(num_h), 128)
  while f_pad * block_h > REGISTER_BUDGET and block_h > 16:
    block_h //= 2
  block_n = max(1, min(8, REGISTER_BUDGET // (f_pad * block_h)))
  return block_n, block_h


@dataclasses.dataclass(frozen=True)
class Launch:
  """Static launch parameters of one kernel family (hashable: a ``nondiff_argnums`` argument).

  ``block_n`` and ``block_h`` (targets or sources, and heads, per program) apply to the attention backward's
  gather kernels; 0 takes them from the register budget (``register_tiles``)."""

  interpret: bool
  num_warps: int = 4
  num_stages: int = 1
  block_n: int = 0
  block_h: int = 0

  def tiles(self, num_f: int, num_h: int) -> tuple[int, int]:
    """(block_n, block_h) of a gather kernel over [*, num_f, num_h] rows."""
    block_n, block_h = register_tiles(num_f, num_h)
    return self.block_n or block_n, min(self.block_h or block_h, pow2(num_h))

  def call(self, kernel, out_shape, grid):
    """``kernel`` as a jitted ``pallas_call`` over ``grid``, shared by every call of the same kernel, static
    arguments, shapes and launch: a program that calls one kernel at several places (the backward's gather
    kernels run once per degree and again in the second order) traces and lowers it once."""
    key = _kernel_key(kernel)
    out_shape = tuple(out_shape) if isinstance(out_shape, list) else out_shape  # hashable; outputs as a tuple
    if key is None:
      return _pallas_call(self, kernel, out_shape, grid)
    return _shared_call(self, key, out_shape, tuple(grid))


def _pallas_call(launch: Launch, kernel, out_shape, grid):
  return pl.pallas_call(
    kernel,
    out_shape=out_shape,
    grid=grid,
    interpret=launch.interpret,
    compiler_params=pltriton.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages),
  )


def _kernel_key(kernel):
  """(function, positional and keyword arguments) of a kernel or a ``functools.partial`` of one; None when an
  argument is not hashable."""
  if isinstance(kernel, functools.partial):
    key = (kernel.func, kernel.args, tuple(sorted(kernel.keywords.items())))
  else:
    key = (kernel, (), ())
  try:
    hash(key)
  except TypeError:
    return None
  return key


@functools.lru_cache(maxsize=1024)
def _shared_call(launch: Launch, kernel_key, out_shape, grid):
  func, args, keywords = kernel_key
  return jax.jit(_pallas_call(launch, functools.partial(func, *args, **dict(keywords)), out_shape, grid))
