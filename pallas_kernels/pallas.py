"""Fused node-centric attention as a Pallas kernel with the Triton lowering (``attention_impl="pallas"``).

Computes exactly what ``jnp_node_attention`` computes (see its docstring for the math), without any per-edge
tensor in device memory: one program per tile of ``block_n`` target atoms and ``block_h`` heads gathers, slot by
slot, the neighbour's key and value rows with masked vector-index loads, keeps the softmax over the K slots in
registers and writes only the per-node aggregate (and, for periodic inputs, the shift-weighted aggregate).

Layouts. Channel c of ``rows`` [M, R, C] belongs to head c mod H, so ``rows`` is read through the free view
[M, R*G, H] (G = C/H; flat row f = r*G + g holds channels g*H .. g*H+H-1), with heads contiguous. Every value a
kernel loads or computes has power-of-two sizes: the flat row axis F = R*G is padded to the next power of two
(58 -> 64 for the paper's R=29, C=256, H=128: 6/64 = 9.4% of the registers and FMAs), the head axis to a
power-of-two block and d to a power of two (8 already is). The padding exists only in registers: loads and
stores are masked, so no padding byte crosses device memory and no input is copied into a padded layout.

Gradients (``jax.custom_vjp``). The backward is the reverse-mode derivative of a composition of three gather
kernels, each a bilinear form over the set of active slots E, with the edge weights beta (the softmax times
edge_scale, ``softmax_pallas``: a kernel and a VJP kernel) in between:

  gather_dot(A, B)[n,k,h] = sum_{f} A[n,f,h] B[j,f,h]            (n,k) in E, j = neighbors[n,k]
  gather_sum(w, B)[n,f,h] = sum_{k: (n,k) in E} w[n,k,h] B[j,f,h]
  source_sum(w, A)[j,f,h] = sum_{(n,k) in E, neighbors[n,k]=j} w[n,k,h] A[n,f,h]

Each one's derivative in either argument is one of the other two, so each carries a ``custom_vjp`` written with
the others and reverse mode works to any order (forces, and force matching by reverse over reverse) with these
three kernels and the edge weights' (whose second order is XLA's). ``source_sum`` gathers over a by-source list
(CSR of capacity N*K, built from the neighbour list with a stable sort, on device): deterministic, no atomics. Its
flat slot ids are int32, so the backward takes at most ``max_backward_atoms(K)`` = (2**31 - 1) // K atoms; element
offsets are 64-bit wherever an array needs it (docs/kernel.md §5). The per-edge weights and their cotangents are
[N, K, H] arrays, the same size as the gate and edge-scale gradients that the backward must return anyway.
The edge set of the values is the valid slots; that of the logits too, except with softmax_max="all_slots",
where every slot's logit enters the max: then the source that fills the empty slots (the model's padding atom)
owns a by-source list as long as the number of empty slots, and its program's loop is that long.

Forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) is not supported: use ``attention_impl="jnp_node"``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.jnp_node import EPSILON
from pallas_kernels.softmax_pallas import pallas_edge_weights
from pallas_kernels.triton_launch import Launch, accumulator_type, arange, pow2, reject_forward_mode

INT32_MAX = 2**31 - 1  # kernel index values (atoms, slots, flat slot ids) are int32; offsets are not (§5)


# ----------------------------------------------------------------------------------------------------------
# Fused forward kernel
# ----------------------------------------------------------------------------------------------------------


def _forward_kernel(
  q_ref,
  k_ref,
  gate_ref,
  scale_ref,
  env_ref,
  valid_ref,
  nbr_ref,
  rows_ref,
  *rest,
  block_n: int,
  block_h: int,
  all_slots: bool,
  has_floor: bool,
  shift_rows: tuple[int, int] | None,
):
  """One program: ``block_n`` targets x ``block_h`` heads, online softmax over the K slots.

  Refs: q [N, H, d], k [M, H, d], gate and scale [N, K, H], env [N, K], valid [N, K] int32, nbr [N, K] int32,
  rows [M, F, H]; with ``has_floor`` also floor [N, H] (the running max starts there); with ``shift_rows`` =
  (first flat row, count) also shifts [N, K, 3] (input) and the outputs agg [N, F, H] and agg_shift
  [N, 3, count, H]; else only agg.
  """
  rest = list(rest)
  floor_ref = rest.pop(0) if has_floor else None
  if shift_rows is None:
    (agg_ref,) = rest
  else:
    shifts_ref, agg_ref, agg_shift_ref = rest
  num_n, num_h, dim = q_ref.shape
  num_slots = nbr_ref.shape[1]
  num_f = rows_ref.shape[1]
  acc_t = accumulator_type(agg_ref.dtype)
  n, n_ok = arange(pl.program_id(0) * block_n, block_n, num_n)
  h, h_ok = arange(pl.program_id(1) * block_h, block_h, num_h)
  t, t_ok = arange(0, pow2(dim), dim)
  f, f_ok = arange(0, pow2(num_f), num_f)
  nh_ok = n_ok[:, None] & h_ok[None, :]
  n2, h2 = n[:, None], h[None, :]
  h3, t3, f3 = h[None, :, None], t[None, None, :], f[None, :, None]
  q = pltriton.load(q_ref.at[n[:, None, None], h3, t3], mask=nh_ok[:, :, None] & t_ok, other=0.0)
  q = q.astype(acc_t) * dim**-0.5
  if shift_rows is not None:
    first, count = shift_rows
    s, s_ok = arange(0, pow2(count), count)

  def body(slot, carry):
    m, l, acc, *acc_shift = carry
    j = pltriton.load(nbr_ref.at[n, slot], mask=n_ok, other=0)
    ok = (pltriton.load(valid_ref.at[n, slot], mask=n_ok, other=0) != 0) & n_ok
    live = n_ok if all_slots else ok  # slots whose logit takes part in the max
    kj = pltriton.load(k_ref.at[j[:, None, None], h3, t3], mask=(live[:, None] & h_ok)[:, :, None] & t_ok, other=0.0)
    gate = pltriton.load(gate_ref.at[n2, slot, h2], mask=nh_ok, other=0.0)
    logit = gate.astype(acc_t) * jnp.sum(q * kj.astype(acc_t), axis=2)
    m_new = jnp.maximum(m, jnp.where(live[:, None], logit, -jnp.inf))
    # Rescale what was accumulated against the old max; 0 while nothing was (m = -inf).
    corr = jnp.where(m > -jnp.inf, jnp.exp(m - m_new), 0.0)
    env = pltriton.load(env_ref.at[n, slot], mask=ok, other=0.0).astype(acc_t)
    w = jnp.where(ok[:, None], jnp.exp(jnp.where(ok[:, None], logit - m_new, 0.0)) * env[:, None], 0.0)
    scale = pltriton.load(scale_ref.at[n2, slot, h2], mask=nh_ok & ok[:, None], other=0.0)
    ws = w * scale.astype(acc_t)
    row_ok = (ok[:, None] & h_ok)[:, None, :]
    x = pltriton.load(rows_ref.at[j[:, None, None], f3, h[None, None, :]], mask=row_ok & f_ok[None, :, None], other=0.0)
    acc = acc * corr[:, None, :] + ws[:, None, :] * x.astype(acc_t)
    if shift_rows is not None:
      tail = pltriton.load(
        rows_ref.at[j[:, None, None], first + s[None, :, None], h[None, None, :]],
        mask=row_ok & s_ok[None, :, None],
        other=0.0,
      ).astype(acc_t)
      acc_shift = [
        a * corr[:, None, :]
        + (ws * pltriton.load(shifts_ref.at[n, slot, axis], mask=ok, other=0.0).astype(acc_t)[:, None])[:, None, :]
        * tail
        for axis, a in enumerate(acc_shift)
      ]
    return (m_new, l * corr + w, acc, *acc_shift)

  zeros = jnp.zeros((block_n, block_h), acc_t)
  m0 = jnp.full((block_n, block_h), -jnp.inf, acc_t)
  if has_floor:
    m0 = pltriton.load(floor_ref.at[n2, h2], mask=nh_ok, other=-jnp.inf).astype(acc_t)
  init = [m0, zeros, jnp.zeros((block_n, pow2(num_f), block_h), acc_t)]
  if shift_rows is not None:
    init += [jnp.zeros((block_n, pow2(count), block_h), acc_t)] * 3
  _, l, acc, *acc_shift = lax.fori_loop(0, num_slots, body, tuple(init))
  inv = (1.0 / (l + EPSILON))[:, None, :]
  out_ok = nh_ok[:, None, :]
  pltriton.store(
    agg_ref.at[n[:, None, None], f3, h[None, None, :]],
    (acc * inv).astype(agg_ref.dtype),
    mask=out_ok & f_ok[None, :, None],
  )
  if shift_rows is not None:
    for axis, a in enumerate(acc_shift):
      pltriton.store(
        agg_shift_ref.at[n[:, None, None], axis, s[None, :, None], h[None, None, :]],
        (a * inv).astype(agg_shift_ref.dtype),
        mask=out_ok & s_ok[None, :, None],
      )


def _fused_forward(
  launch: Launch,
  block_n: int,
  block_h: int,
  softmax_max: str,
  num_shift_rows: int,
  q,
  k,
  gate,
  edge_scale,
  envelope,
  valid,
  neighbors,
  rows,
  shifts,
  max_floor,
):
  """Runs the fused kernel. Returns agg [N, R, C] (and agg_shift [N, 3, S, C] with ``shifts``)."""
  num_n, num_h, _ = q.shape
  num_m, num_r, num_c = rows.shape
  groups = num_c // num_h
  flat_rows = rows.reshape(num_m, num_r * groups, num_h)
  block_h = min(block_h, pow2(num_h))
  dtype = jnp.result_type(q, k, gate, edge_scale, envelope, rows)
  out_shape = [jax.ShapeDtypeStruct((num_n, num_r * groups, num_h), dtype)]
  args = [q, k, gate, edge_scale, envelope, valid.astype(jnp.int32), neighbors.astype(jnp.int32), flat_rows]
  if max_floor is not None:
    args.append(max_floor)
  shift_rows = None
  if shifts is not None:
    shift_rows = ((num_r - num_shift_rows) * groups, num_shift_rows * groups)
    out_shape.append(jax.ShapeDtypeStruct((num_n, 3, num_shift_rows * groups, num_h), dtype))
    args.append(shifts)
  kernel = functools.partial(
    _forward_kernel,
    block_n=block_n,
    block_h=block_h,
    all_slots=softmax_max == "all_slots",
    has_floor=max_floor is not None,
    shift_rows=shift_rows,
  )
  grid = (pl.cdiv(num_n, block_n), pl.cdiv(num_h, block_h))
  outs = launch.call(kernel, out_shape, grid)(*args)
  agg = outs[0].reshape(num_n, num_r, num_c)
  if shifts is None:
    return agg
  return agg, outs[1].reshape(num_n, 3, num_shift_rows, num_c)


# ----------------------------------------------------------------------------------------------------------
# The three bilinear gather kernels of the backward (layout [*, F, H], heads last)
# ----------------------------------------------------------------------------------------------------------


# Software-pipelining stages of the backward's gather kernels: 2 was faster than 1 for four of the five calls of a
# first-order backward on Morton-ordered neighbours (H200, 2026-12-07, ``benchmarks/attention.py --neighbors
# spatial --sweep-backward``; benchmarks/RESULTS.md).
BACKWARD_STAGES = 2


def _gather_dot_kernel(a_ref, b_ref, nbr_ref, mask_ref, out_ref, *, block_n: int, block_h: int):
  """out[n, k, h] = sum_f a[n, f, h] * b[nbr[n, k], f, h] on active slots, 0 elsewhere."""
  num_n, num_f, num_h = a_ref.shape
  n, n_ok = arange(pl.program_id(0) * block_n, block_n, num_n)
  h, h_ok = arange(pl.program_id(1) * block_h, block_h, num_h)
  f, f_ok = arange(0, pow2(num_f), num_f)
  tile_ok = (n_ok[:, None] & h_ok[None, :])[:, None, :] & f_ok[None, :, None]
  acc_t = accumulator_type(out_ref.dtype)
  a = pltriton.load(a_ref.at[n[:, None, None], f[None, :, None], h[None, None, :]], mask=tile_ok, other=0.0).astype(
    acc_t
  )

  def body(slot, carry):
    j = pltriton.load(nbr_ref.at[n, slot], mask=n_ok, other=0)
    ok = (pltriton.load(mask_ref.at[n, slot], mask=n_ok, other=0) != 0) & n_ok
    b = pltriton.load(
      b_ref.at[j[:, None, None], f[None, :, None], h[None, None, :]], mask=tile_ok & ok[:, None, None], other=0.0
    )
    dot = jnp.sum(a * b.astype(acc_t), axis=1)
    pltriton.store(
      out_ref.at[n[:, None], slot, h[None, :]], dot.astype(out_ref.dtype), mask=n_ok[:, None] & h_ok[None, :]
    )
    return carry

  lax.fori_loop(0, nbr_ref.shape[1], body, 0)


def _gather_sum_kernel(w_ref, b_ref, nbr_ref, mask_ref, out_ref, *, block_n: int, block_h: int):
  """out[n, f, h] = sum_k w[n, k, h] * b[nbr[n, k], f, h] over active slots."""
  num_n, num_slots, num_h = w_ref.shape
  num_f = b_ref.shape[1]
  n, n_ok = arange(pl.program_id(0) * block_n, block_n, num_n)
  h, h_ok = arange(pl.program_id(1) * block_h, block_h, num_h)
  f, f_ok = arange(0, pow2(num_f), num_f)
  nh_ok = n_ok[:, None] & h_ok[None, :]
  tile_ok = nh_ok[:, None, :] & f_ok[None, :, None]
  acc_t = accumulator_type(out_ref.dtype)

  def body(slot, acc):
    j = pltriton.load(nbr_ref.at[n, slot], mask=n_ok, other=0)
    ok = (pltriton.load(mask_ref.at[n, slot], mask=n_ok, other=0) != 0) & n_ok
    w = pltriton.load(w_ref.at[n[:, None], slot, h[None, :]], mask=nh_ok & ok[:, None], other=0.0)
    b = pltriton.load(
      b_ref.at[j[:, None, None], f[None, :, None], h[None, None, :]], mask=tile_ok & ok[:, None, None], other=0.0
    )
    return acc + w.astype(acc_t)[:, None, :] * b.astype(acc_t)

  acc = lax.fori_loop(0, num_slots, body, jnp.zeros((block_n, pow2(num_f), block_h), acc_t))
  pltriton.store(
    out_ref.at[n[:, None, None], f[None, :, None], h[None, None, :]], acc.astype(out_ref.dtype), mask=tile_ok
  )


def _source_sum_kernel(w_ref, a_ref, order_ref, ptr_ref, out_ref, *, block_n: int, block_h: int, num_slots: int):
  """out[j, f, h] = sum over the by-source list of j of w[e, h] * a[e // K, f, h] (e = flat slot n*K + k).

  Refs: w [N*K, H], a [N, F, H], order [N*K] int32 (active flat slots sorted by source, stable),
  ptr [M+1] int32 (source j owns order[ptr[j]:ptr[j+1]]), out [M, F, H]. Each source sums its own list in
  list order: deterministic, no atomics.
  """
  num_m, num_f, num_h = out_ref.shape
  src, src_ok = arange(pl.program_id(0) * block_n, block_n, num_m)
  h, h_ok = arange(pl.program_id(1) * block_h, block_h, num_h)
  f, f_ok = arange(0, pow2(num_f), num_f)
  start = pltriton.load(ptr_ref.at[src], mask=src_ok, other=0)
  count = pltriton.load(ptr_ref.at[src + 1], mask=src_ok, other=0) - start
  acc_t = accumulator_type(out_ref.dtype)

  def body(i, acc):
    live = i < count
    e = pltriton.load(order_ref.at[start + i], mask=live, other=0)
    w = pltriton.load(w_ref.at[e[:, None], h[None, :]], mask=live[:, None] & h_ok[None, :], other=0.0)
    a = pltriton.load(
      a_ref.at[(e // num_slots)[:, None, None], f[None, :, None], h[None, None, :]],
      mask=(live[:, None] & h_ok[None, :])[:, None, :] & f_ok[None, :, None],
      other=0.0,
    )
    return acc + w.astype(acc_t)[:, None, :] * a.astype(acc_t)

  acc = lax.fori_loop(0, jnp.max(count), body, jnp.zeros((block_n, pow2(num_f), block_h), acc_t))
  pltriton.store(
    out_ref.at[src[:, None, None], f[None, :, None], h[None, None, :]],
    acc.astype(out_ref.dtype),
    mask=(src_ok[:, None] & h_ok[None, :])[:, None, :] & f_ok[None, :, None],
  )


def max_backward_atoms(num_slots: int) -> int:
  """The most target atoms N whose by-source list fits int32 with K = ``num_slots`` slots: its flat slot ids
  n*K + k and pointers (up to N*K) are int32 (docs/kernel.md §5, "Index range")."""
  return INT32_MAX // num_slots


def source_csr(neighbors: jax.Array, active: jax.Array, num_sources: int) -> tuple[jax.Array, jax.Array]:
  """By-source list of the active slots (jnp; runs on device, for on-device neighbour lists too).

  Args:
    neighbors: [N, K] int source of each slot.
    active: [N, K] bool, slot belongs to the edge set.
    num_sources: M.
  Returns:
    order [N*K] int32, the flat slots n*K + k sorted by source (stable, so by target within a source; inactive
    slots last) and ptr [M+1] int32 with source j owning order[ptr[j]:ptr[j+1]].
  Raises:
    ValueError: when N*K or M exceeds int32 (N above ``max_backward_atoms(K)``), at trace time.
  """
  num_n, num_slots = neighbors.shape
  if num_n * num_slots > INT32_MAX:
    raise ValueError(
      f"node_attention (attention_impl='pallas') cannot differentiate {num_n:,} atoms x {num_slots} neighbour "
      f"slots: the backward's by-source list (order [N*K] = [{num_n * num_slots:,}] int32 flat slot ids n*K + k, "
      f"ptr [M+1] int32) indexes {num_n * num_slots:,} slots, beyond int32 ({INT32_MAX:,}); with K = {num_slots} "
      f"it supports at most {max_backward_atoms(num_slots):,} atoms. Split the system, use fewer neighbour slots, "
      "or attention_impl='jnp_node' (XLA indexes in 64 bits) where memory allows; the forward alone (direct "
      "forces) has no such limit."
    )
  if num_sources > INT32_MAX:
    raise ValueError(
      f"node_attention (attention_impl='pallas'): {num_sources:,} source atoms (k and rows [M, ...]) exceed the "
      f"int32 atom indices of the kernels and of the by-source pointers ptr [M+1] (at most {INT32_MAX:,})."
    )
  key = jnp.where(active, neighbors, num_sources).reshape(-1).astype(jnp.int32)
  sorted_key, order = lax.sort((key, jnp.arange(key.shape[0], dtype=jnp.int32)), num_keys=1, is_stable=True)
  ptr = jnp.searchsorted(sorted_key, jnp.arange(num_sources + 1, dtype=jnp.int32), side="left")
  return order, ptr.astype(jnp.int32)


def _gather_dot_call(launch, graph, a, b):
  neighbors, mask, _, _ = graph
  block_n, block_h = launch.tiles(a.shape[1], a.shape[2])
  kernel = functools.partial(_gather_dot_kernel, block_n=block_n, block_h=block_h)
  grid = (pl.cdiv(a.shape[0], block_n), pl.cdiv(a.shape[2], block_h))
  out_shape = jax.ShapeDtypeStruct((*neighbors.shape, a.shape[2]), jnp.result_type(a, b))
  return launch.call(kernel, out_shape, grid)(a, b, neighbors, mask)


def _gather_sum_call(launch, graph, w, b):
  neighbors, mask, _, _ = graph
  block_n, block_h = launch.tiles(b.shape[1], b.shape[2])
  kernel = functools.partial(_gather_sum_kernel, block_n=block_n, block_h=block_h)
  grid = (pl.cdiv(w.shape[0], block_n), pl.cdiv(w.shape[2], block_h))
  out_shape = jax.ShapeDtypeStruct((w.shape[0], *b.shape[1:]), jnp.result_type(w, b))
  return launch.call(kernel, out_shape, grid)(w, b, neighbors, mask)


def _source_sum_call(launch, graph, w, a):
  _, _, order, ptr = graph
  num_n, num_slots, num_h = w.shape
  num_m = ptr.shape[0] - 1
  block_n, block_h = launch.tiles(a.shape[1], num_h)
  kernel = functools.partial(_source_sum_kernel, block_n=block_n, block_h=block_h, num_slots=num_slots)
  grid = (pl.cdiv(num_m, block_n), pl.cdiv(num_h, block_h))
  out_shape = jax.ShapeDtypeStruct((num_m, *a.shape[1:]), jnp.result_type(w, a))
  return launch.call(kernel, out_shape, grid)(w.reshape(num_n * num_slots, num_h), a, order, ptr)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gather_dot(launch: Launch, graph, a: jax.Array, b: jax.Array) -> jax.Array:
  """[N, K, H] per-head dot of target rows a [N, F, H] with gathered source rows b [M, F, H]."""
  return _gather_dot_call(launch, graph, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gather_sum(launch: Launch, graph, w: jax.Array, b: jax.Array) -> jax.Array:
  """[N, F, H] sum over active slots of weights w [N, K, H] times gathered source rows b [M, F, H]."""
  return _gather_sum_call(launch, graph, w, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def source_sum(launch: Launch, graph, w: jax.Array, a: jax.Array) -> jax.Array:
  """[M, F, H] sum over each source's active slots of weights w [N, K, H] times target rows a [N, F, H]."""
  return _source_sum_call(launch, graph, w, a)


def _gather_dot_fwd(launch, graph, a, b):
  reject_forward_mode(a, b)
  return gather_dot(launch, graph, a, b), (graph, a, b)


def _gather_dot_bwd(launch, res, ct):
  graph, a, b = res
  return None, gather_sum(launch, graph, ct, b), source_sum(launch, graph, ct, a)


def _gather_sum_fwd(launch, graph, w, b):
  reject_forward_mode(w, b)
  return gather_sum(launch, graph, w, b), (graph, w, b)


def _gather_sum_bwd(launch, res, ct):
  graph, w, b = res
  return None, gather_dot(launch, graph, ct, b), source_sum(launch, graph, w, ct)


def _source_sum_fwd(launch, graph, w, a):
  reject_forward_mode(w, a)
  return source_sum(launch, graph, w, a), (graph, w, a)


def _source_sum_bwd(launch, res, ct):
  graph, w, a = res
  return None, gather_dot(launch, graph, a, ct), gather_sum(launch, graph, w, ct)


gather_dot.defvjp(_gather_dot_fwd, _gather_dot_bwd)
gather_sum.defvjp(_gather_sum_fwd, _gather_sum_bwd)
source_sum.defvjp(_source_sum_fwd, _source_sum_bwd)


def _graph(neighbors, active, num_sources):
  """(neighbors, active as int32, order, ptr): everything the three kernels need about one edge set."""
  order, ptr = source_csr(neighbors, active, num_sources)
  return neighbors.astype(jnp.int32), active.astype(jnp.int32), order, ptr


def _composed(
  launch: Launch,
  softmax_max: str,
  num_shift_rows: int,
  graphs,
  valid,
  q,
  k,
  gate,
  edge_scale,
  envelope,
  rows,
  shifts,
  max_floor,
):
  """The attention as gather kernels around the edge-weight kernels: differentiable to any order in reverse mode."""
  logit_graph, value_graph = graphs
  num_n, num_h, dim = q.shape
  num_m, num_r, num_c = rows.shape
  dot = gather_dot(launch, logit_graph, jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2))
  beta = pallas_edge_weights(launch, softmax_max, dim**-0.5, gate, dot, edge_scale, envelope, valid, max_floor)
  flat_rows = rows.reshape(num_m, -1, num_h)
  agg = gather_sum(launch, value_graph, beta, flat_rows).reshape(num_n, num_r, num_c)
  if shifts is None:
    return agg
  tail = flat_rows[:, (num_r - num_shift_rows) * (num_c // num_h) :]
  agg_shift = jnp.stack(
    [gather_sum(launch, value_graph, beta * shifts[..., axis, None], tail) for axis in range(3)], axis=1
  )
  return agg, agg_shift.reshape(num_n, 3, num_shift_rows, num_c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5))
def _node_attention(
  launch,
  backward_launch,
  block_n,
  block_h,
  softmax_max,
  num_shift_rows,
  q,
  k,
  gate,
  edge_scale,
  envelope,
  valid,
  neighbors,
  rows,
  shifts,
  max_floor,
):
  return _fused_forward(
    launch,
    block_n,
    block_h,
    softmax_max,
    num_shift_rows,
    q,
    k,
    gate,
    edge_scale,
    envelope,
    valid,
    neighbors,
    rows,
    shifts,
    max_floor,
  )


def _node_attention_fwd(
  launch,
  backward_launch,
  block_n,
  block_h,
  softmax_max,
  num_shift_rows,
  q,
  k,
  gate,
  edge_scale,
  envelope,
  valid,
  neighbors,
  rows,
  shifts,
  max_floor,
):
  reject_forward_mode(q, k, gate, edge_scale, envelope, rows, shifts, max_floor)  # jax.hessian reaches this
  # Calling the custom_vjp function (not the kernel) keeps an outer reverse pass on these rules.
  out = _node_attention(
    launch,
    backward_launch,
    block_n,
    block_h,
    softmax_max,
    num_shift_rows,
    q,
    k,
    gate,
    edge_scale,
    envelope,
    valid,
    neighbors,
    rows,
    shifts,
    max_floor,
  )
  return out, (q, k, gate, edge_scale, envelope, valid, neighbors, rows, shifts, max_floor)


def _node_attention_bwd(launch, backward_launch, block_n, block_h, softmax_max, num_shift_rows, res, ct):
  q, k, gate, edge_scale, envelope, valid, neighbors, rows, shifts, max_floor = res
  num_m = rows.shape[0]
  value_graph = _graph(neighbors, valid, num_m)
  logit_graph = value_graph if softmax_max == "valid" else _graph(neighbors, jnp.ones_like(valid), num_m)
  fn = functools.partial(_composed, backward_launch, softmax_max, num_shift_rows, (logit_graph, value_graph), valid)
  _, pullback = jax.vjp(fn, q, k, gate, edge_scale, envelope, rows, shifts, max_floor)
  dq, dk, dgate, dscale, denv, drows, dshifts, dfloor = pullback(ct)
  return dq, dk, dgate, dscale, denv, None, None, drows, dshifts, dfloor


_node_attention.defvjp(_node_attention_fwd, _node_attention_bwd)


def pallas_node_attention(
  q,
  k,
  gate,
  edge_scale,
  envelope,
  valid,
  neighbors,
  rows,
  shifts=None,
  *,
  num_shift_rows: int = 0,
  softmax_max: str = "valid",
  max_floor=None,
  interpret: bool | None = None,
  block_n: int = 1,
  block_h: int = 64,
  num_warps: int = 4,
  num_stages: int = 1,
):
  """Fused node-centric attention aggregate; same math, arguments and returns as ``jnp_node_attention``.

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
    max_floor: optional [N, H] lower bound of the softmax shift (the running max starts there).
    interpret: run the kernels in Pallas interpret mode; None = when the default backend is not a GPU.
    block_n, block_h: targets and heads per program of the forward kernel (block_h a power of two); the
      default 1 x 64 was the fastest of 12 tilings at the paper's sizes on an H100 (benchmarks/RESULTS.md).
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
    raise ValueError(
      f"gate and edge_scale must be [N, K, H] = {(num_n, num_slots, num_h)}, got {gate.shape} and {edge_scale.shape}"
    )
  if k.shape[0] != rows.shape[0]:
    raise ValueError(f"k and rows must have the same number of source atoms, got {k.shape[0]} and {rows.shape[0]}")
  if block_h & (block_h - 1) or block_n < 1:
    raise ValueError(f"block_h must be a power of two and block_n >= 1, got {block_h}, {block_n}")
  if shifts is not None and not 0 < num_shift_rows <= rows.shape[1]:
    raise ValueError(f"num_shift_rows must be in [1, R={rows.shape[1]}] with shifts, got {num_shift_rows}")
  if max_floor is not None and max_floor.shape != (num_n, num_h):
    raise ValueError(f"max_floor must be [N, H] = {(num_n, num_h)}, got {max_floor.shape}")
  reject_forward_mode(q, k, gate, edge_scale, envelope, rows, shifts, max_floor)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  launch = Launch(bool(interpret), num_warps, num_stages)
  return _node_attention(
    launch,
    Launch(bool(interpret), num_stages=BACKWARD_STAGES),
    block_n,
    block_h,
    softmax_max,
    num_shift_rows,
    q,
    k,
    gate,
    edge_scale,
    envelope,
    valid,
    neighbors,
    rows,
    shifts,
    max_floor,
  )
