"""Fused node-centric attention as a Pallas kernel with the Triton lowering (``attention_impl="pallas"``).

Computes exactly what ``node_attention_ref`` computes (see its docstring for the math), without any per-edge
tensor in device memory: one program per tile of ``block_n`` target atoms and ``block_h`` heads gathers, slot by
slot, the neighbour's key and value rows with masked vector-index loads, keeps the softmax over the K slots in
registers and writes only the per-node aggregate (and, for periodic inputs, the shift-weighted aggregate).

Layouts. Channel c of ``rows`` [M, R, C] belongs to head c mod H, so ``rows`` is read through the free view
[M, R*G, H] (G = C/H; flat row f = r*G + g holds channels g*H .. g*H+H-1), with heads contiguous. Every value a
kernel loads or computes has power-of-two sizes: the flat row axis F = R*G is padded to the next power of two
(58 -> 64 for the paper's R=29, C=256, H=128: 6/64 = 9.4% of the registers and FMAs), the head axis to a
power-of-two block and d to a power of two (8 already is). The padding exists only in registers: loads and
stores are masked, so no padding byte crosses device memory and no input is copied into a padded layout.

Gradients (``jax.custom_vjp``). The backward is the reverse-mode derivative of ``node_attention_ref`` (plain
differentiable jnp, so forces and reverse-over-reverse force training work through the kernel); it builds the
twin's gathered [N, K, R, C] rows, so the backward's memory is jnp_node's.

Forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) is not supported: use ``attention_impl="jnp_node"``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax._src.interpreters import ad as _ad  # JVPTracer, to name forward mode in the error (jax pinned)
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.node_attention_ref import EPSILON, node_attention_ref

FORWARD_MODE_MESSAGE = (
    "node_attention (attention_impl='pallas') supports reverse mode only (jax.grad, jax.vjp, and reverse over "
    "reverse for force training); forward-mode transforms (jax.jvp, jax.jacfwd, jax.hessian) need "
    "attention_impl='jnp_node'.")


def _pow2(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


def _reject_forward_mode(*arrays) -> None:
  """Raises a clear error when called under a forward-mode (JVP) trace."""
  if any(isinstance(x, _ad.JVPTracer) for x in jax.tree.leaves(arrays)):
    raise TypeError(FORWARD_MODE_MESSAGE)


@dataclasses.dataclass(frozen=True)
class _Launch:
  """Static launch parameters of one kernel family (hashable: a ``nondiff_argnums`` argument)."""

  interpret: bool
  num_warps: int = 4
  num_stages: int = 1

  def call(self, kernel, out_shape, grid):
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, interpret=self.interpret,
        compiler_params=pltriton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages))


def _arange(start, size: int, limit: int):
  """Indices start..start+size-1 and their in-bounds mask (< limit)."""
  idx = start + jnp.arange(size, dtype=jnp.int32)
  return idx, idx < limit


# ----------------------------------------------------------------------------------------------------------
# Fused forward kernel
# ----------------------------------------------------------------------------------------------------------

def _forward_kernel(q_ref, k_ref, gate_ref, scale_ref, env_ref, valid_ref, nbr_ref, rows_ref, *rest,
                    block_n: int, block_h: int, all_slots: bool, shift_rows: tuple[int, int] | None):
  """One program: ``block_n`` targets x ``block_h`` heads, online softmax over the K slots.

  Refs: q [N, H, d], k [M, H, d], gate and scale [N, K, H], env [N, K], valid [N, K] int32, nbr [N, K] int32,
  rows [M, F, H]; with ``shift_rows`` = (first flat row, count) also shifts [N, K, 3] (input) and the outputs
  agg [N, F, H] and agg_shift [N, 3, count, H]; else only agg.
  """
  if shift_rows is None:
    (agg_ref,) = rest
  else:
    shifts_ref, agg_ref, agg_shift_ref = rest
  num_n, num_h, dim = q_ref.shape
  num_slots = nbr_ref.shape[1]
  num_f = rows_ref.shape[1]
  n, n_ok = _arange(pl.program_id(0) * block_n, block_n, num_n)
  h, h_ok = _arange(pl.program_id(1) * block_h, block_h, num_h)
  t, t_ok = _arange(0, _pow2(dim), dim)
  f, f_ok = _arange(0, _pow2(num_f), num_f)
  nh_ok = n_ok[:, None] & h_ok[None, :]
  n2, h2 = n[:, None], h[None, :]
  h3, t3, f3 = h[None, :, None], t[None, None, :], f[None, :, None]
  q = pltriton.load(q_ref.at[n[:, None, None], h3, t3], mask=nh_ok[:, :, None] & t_ok, other=0.0)
  q = q.astype(jnp.float32) * dim ** -0.5
  if shift_rows is not None:
    first, count = shift_rows
    s, s_ok = _arange(0, _pow2(count), count)

  def body(slot, carry):
    m, l, acc, *acc_shift = carry
    j = pltriton.load(nbr_ref.at[n, slot], mask=n_ok, other=0)
    ok = (pltriton.load(valid_ref.at[n, slot], mask=n_ok, other=0) != 0) & n_ok
    live = n_ok if all_slots else ok  # slots whose logit takes part in the max
    kj = pltriton.load(k_ref.at[j[:, None, None], h3, t3], mask=(live[:, None] & h_ok)[:, :, None] & t_ok,
                       other=0.0)
    gate = pltriton.load(gate_ref.at[n2, slot, h2], mask=nh_ok, other=0.0)
    logit = gate.astype(jnp.float32) * jnp.sum(q * kj.astype(jnp.float32), axis=2)
    m_new = jnp.maximum(m, jnp.where(live[:, None], logit, -jnp.inf))
    # Rescale what was accumulated against the old max; 0 while nothing was (m = -inf).
    corr = jnp.where(m > -jnp.inf, jnp.exp(m - m_new), 0.0)
    env = pltriton.load(env_ref.at[n, slot], mask=ok, other=0.0).astype(jnp.float32)
    w = jnp.where(ok[:, None], jnp.exp(jnp.where(ok[:, None], logit - m_new, 0.0)) * env[:, None], 0.0)
    scale = pltriton.load(scale_ref.at[n2, slot, h2], mask=nh_ok & ok[:, None], other=0.0)
    ws = w * scale.astype(jnp.float32)
    row_ok = (ok[:, None] & h_ok)[:, None, :]
    x = pltriton.load(rows_ref.at[j[:, None, None], f3, h[None, None, :]], mask=row_ok & f_ok[None, :, None],
                      other=0.0)
    acc = acc * corr[:, None, :] + ws[:, None, :] * x.astype(jnp.float32)
    if shift_rows is not None:
      tail = pltriton.load(rows_ref.at[j[:, None, None], first + s[None, :, None], h[None, None, :]],
                           mask=row_ok & s_ok[None, :, None], other=0.0).astype(jnp.float32)
      acc_shift = [
          a * corr[:, None, :]
          + (ws * pltriton.load(shifts_ref.at[n, slot, axis], mask=ok, other=0.0)[:, None])[:, None, :] * tail
          for axis, a in enumerate(acc_shift)]
    return (m_new, l * corr + w, acc, *acc_shift)

  zeros = jnp.zeros((block_n, block_h), jnp.float32)
  init = [jnp.full((block_n, block_h), -jnp.inf, jnp.float32), zeros,
          jnp.zeros((block_n, _pow2(num_f), block_h), jnp.float32)]
  if shift_rows is not None:
    init += [jnp.zeros((block_n, _pow2(count), block_h), jnp.float32)] * 3
  _, l, acc, *acc_shift = lax.fori_loop(0, num_slots, body, tuple(init))
  inv = (1.0 / (l + EPSILON))[:, None, :]
  out_ok = nh_ok[:, None, :]
  pltriton.store(agg_ref.at[n[:, None, None], f3, h[None, None, :]], (acc * inv).astype(agg_ref.dtype),
                 mask=out_ok & f_ok[None, :, None])
  if shift_rows is not None:
    for axis, a in enumerate(acc_shift):
      pltriton.store(agg_shift_ref.at[n[:, None, None], axis, s[None, :, None], h[None, None, :]],
                     (a * inv).astype(agg_shift_ref.dtype), mask=out_ok & s_ok[None, :, None])


def _fused_forward(launch: _Launch, block_n: int, block_h: int, softmax_max: str, num_shift_rows: int,
                   q, k, gate, edge_scale, envelope, valid, neighbors, rows, shifts):
  """Runs the fused kernel. Returns agg [N, R, C] (and agg_shift [N, 3, S, C] with ``shifts``)."""
  num_n, num_h, _ = q.shape
  num_m, num_r, num_c = rows.shape
  groups = num_c // num_h
  flat_rows = rows.reshape(num_m, num_r * groups, num_h)
  block_h = min(block_h, _pow2(num_h))
  dtype = jnp.result_type(q, k, gate, edge_scale, envelope, rows)
  out_shape = [jax.ShapeDtypeStruct((num_n, num_r * groups, num_h), dtype)]
  args = [q, k, gate, edge_scale, envelope, valid.astype(jnp.int32), neighbors.astype(jnp.int32), flat_rows]
  shift_rows = None
  if shifts is not None:
    shift_rows = ((num_r - num_shift_rows) * groups, num_shift_rows * groups)
    out_shape.append(jax.ShapeDtypeStruct((num_n, 3, num_shift_rows * groups, num_h), dtype))
    args.append(shifts)
  kernel = functools.partial(_forward_kernel, block_n=block_n, block_h=block_h,
                             all_slots=softmax_max == "all_slots", shift_rows=shift_rows)
  grid = (pl.cdiv(num_n, block_n), pl.cdiv(num_h, block_h))
  outs = launch.call(kernel, out_shape, grid)(*args)
  agg = outs[0].reshape(num_n, num_r, num_c)
  if shifts is None:
    return agg
  return agg, outs[1].reshape(num_n, 3, num_shift_rows, num_c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _node_attention(launch, block_n, block_h, softmax_max, num_shift_rows,
                    q, k, gate, edge_scale, envelope, valid, neighbors, rows, shifts):
  return _fused_forward(launch, block_n, block_h, softmax_max, num_shift_rows,
                        q, k, gate, edge_scale, envelope, valid, neighbors, rows, shifts)


def _node_attention_fwd(launch, block_n, block_h, softmax_max, num_shift_rows,
                        q, k, gate, edge_scale, envelope, valid, neighbors, rows, shifts):
  _reject_forward_mode(q, k, gate, edge_scale, envelope, rows, shifts)  # jax.hessian reaches this point
  # Calling the custom_vjp function (not the kernel) keeps an outer reverse pass on these rules.
  out = _node_attention(launch, block_n, block_h, softmax_max, num_shift_rows,
                        q, k, gate, edge_scale, envelope, valid, neighbors, rows, shifts)
  return out, (q, k, gate, edge_scale, envelope, valid, neighbors, rows, shifts)


def _node_attention_bwd(launch, block_n, block_h, softmax_max, num_shift_rows, res, ct):
  q, k, gate, edge_scale, envelope, valid, neighbors, rows, shifts = res
  fn = lambda q, k, gate, edge_scale, envelope, rows, shifts: node_attention_ref(
      q, k, gate, edge_scale, envelope, valid, neighbors, rows, shifts, num_shift_rows=num_shift_rows,
      softmax_max=softmax_max)
  _, pullback = jax.vjp(fn, q, k, gate, edge_scale, envelope, rows, shifts)
  dq, dk, dgate, dscale, denv, drows, dshifts = pullback(ct)
  return dq, dk, dgate, dscale, denv, None, None, drows, dshifts


_node_attention.defvjp(_node_attention_fwd, _node_attention_bwd)


def node_attention(q, k, gate, edge_scale, envelope, valid, neighbors, rows, shifts=None, *,
                   num_shift_rows: int = 0, softmax_max: str = "valid", interpret: bool | None = None,
                   block_n: int = 2, block_h: int = 64, num_warps: int = 4, num_stages: int = 1):
  """Fused node-centric attention aggregate; same math, arguments and returns as ``node_attention_ref``.

  Args:
    q: [N, H, d] queries of target atoms.
    k: [M, H, d] keys of source atoms (M = N without explicit periodic images).
    gate: [N, K, H] per-edge logit gate.
    edge_scale: [N, K, H] per-edge factor applied after the softmax (rho / |r_ij|).
    envelope: [N, K] polynomial envelope phi(|r_ij|).
    valid: [N, K] bool, slot holds a neighbour within the cutoff.
    neighbors: [N, K] int source atom of each slot (any index in [0, M) where not valid).
    rows: [M, R, C] per-node rows to aggregate; C a multiple of H, channel c belongs to head c mod H.
    shifts: optional [N, K, 3] Cartesian image offsets (periodic structures).
    num_shift_rows: how many trailing rows enter the shift-weighted aggregate.
    softmax_max: "valid" or "all_slots".
    interpret: run the kernels in Pallas interpret mode; None = when the default backend is not a GPU.
    block_n, block_h: targets and heads per program of the forward kernel (block_h a power of two).
    num_warps, num_stages: Triton launch parameters of the forward kernel.

  Returns:
    agg [N, R, C]; with ``shifts`` the tuple (agg, agg_shift [N, 3, num_shift_rows, C]).

  Differentiable in reverse mode to any order (``jax.custom_vjp``); forward mode raises a TypeError that
  points to ``attention_impl="jnp_node"``.
  """
  if softmax_max not in ("valid", "all_slots"):
    raise ValueError(f"softmax_max must be 'valid' or 'all_slots', got {softmax_max!r}")
  num_n, num_h, _ = q.shape
  num_slots = neighbors.shape[1]
  if rows.shape[-1] % num_h:
    raise ValueError(f"channels {rows.shape[-1]} must be a multiple of the {num_h} heads")
  if gate.shape != (num_n, num_slots, num_h) or edge_scale.shape != gate.shape:
    raise ValueError(f"gate and edge_scale must be [N, K, H] = {(num_n, num_slots, num_h)}, got "
                     f"{gate.shape} and {edge_scale.shape}")
  if k.shape[0] != rows.shape[0]:
    raise ValueError(f"k and rows must have the same number of source atoms, got {k.shape[0]} and {rows.shape[0]}")
  if block_h & (block_h - 1) or block_n < 1:
    raise ValueError(f"block_h must be a power of two and block_n >= 1, got {block_h}, {block_n}")
  if shifts is not None and not 0 < num_shift_rows <= rows.shape[1]:
    raise ValueError(f"num_shift_rows must be in [1, R={rows.shape[1]}] with shifts, got {num_shift_rows}")
  _reject_forward_mode(q, k, gate, edge_scale, envelope, rows, shifts)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  launch = _Launch(bool(interpret), num_warps, num_stages)
  return _node_attention(launch, block_n, block_h, softmax_max, num_shift_rows,
                         q, k, gate, edge_scale, envelope, valid, neighbors, rows, shifts)
