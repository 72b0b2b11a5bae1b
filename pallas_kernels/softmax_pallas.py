"""The attention's edge weights and their VJP as two Pallas kernels (Triton lowering), for the backward pass of the
fused attention (``pallas._composed``, docs/kernel.md §4).

  beta[n, k, h] = alpha[n, k, h] * edge_scale[n, k, h],  alpha = softmax over the K slots of gate * dot / sqrt(d)

with the envelope inside and 1e-3 added to the denominator (``jnp_node.attention_weights``). The twin is
``attention_softmax.edge_weights``, and the VJP kernel computes that file's closed form (the shift's cotangent
split between the slots at the max, and with ``max_floor`` at a tie, as JAX splits it). In XLA the weights and
their derivative took several fusions per layer (multiply-reduces over the slots, a divide-reduce, products) that
read and wrote the [N, K, H] arrays more than once; each kernel here reads its inputs once and writes its outputs
once. The forward reads gate, dot and edge_scale and writes beta; the VJP reads those and the cotangent of beta and
writes the cotangents of gate, dot and edge_scale [N, K, H], of the envelope [N, K] and of max_floor [N, H].

A program owns ``block_n`` targets with all K slots (the softmax reduces over them) and all H heads (the
envelope's cotangent sums over them), padded to powers of two and masked. The logits are formed as the twin forms
them, (gate * dot) * logit_scale, so the slots found at the max are the same. Second order (force matching: reverse
over reverse) differentiates the VJP kernel by its own ``custom_vjp``, whose rule is JAX's derivative of the twin's
VJP, in XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.attention_softmax import balanced, edge_weights
from pallas_kernels.jnp_node import EPSILON
from pallas_kernels.triton_launch import REGISTER_BUDGET, Launch, accumulator_type, arange, pow2, reject_forward_mode

NUM_WARPS = 8  # a [1, 32, 128] tile per array at the paper's sizes: 16 values per thread and array


def _tile_softmax(gate_ref, dot_ref, env_ref, valid_ref, floor_ref, *, block_n: int, all_slots: bool, logit_scale):
  """The softmax of one program's tile, recomputed from its inputs: a dict of its indices, masks and [block_n,
  K_pad, H_pad] arrays (gate, dot, logits, exponentials e, weights w = e * envelope) and [block_n, H_pad] arrays (the
  max m0 over the slots, m1 = max(m0, floor), the denominator)."""
  num_n, num_k, num_h = gate_ref.shape
  n, n_ok = arange(pl.program_id(0) * block_n, block_n, num_n)
  k, k_ok = arange(0, pow2(num_k), num_k)
  h, h_ok = arange(0, pow2(num_h), num_h)
  nk_ok = n_ok[:, None] & k_ok[None, :]
  tile_ok = nk_ok[:, :, None] & h_ok[None, None, :]
  nk = (n[:, None], k[None, :])
  nkh = (n[:, None, None], k[None, :, None], h[None, None, :])
  acc_t = accumulator_type(gate_ref.dtype)
  gate = pltriton.load(gate_ref.at[nkh], mask=tile_ok, other=0.0).astype(acc_t)
  dot = pltriton.load(dot_ref.at[nkh], mask=tile_ok, other=0.0).astype(acc_t)
  valid = (pltriton.load(valid_ref.at[nk], mask=nk_ok, other=0) != 0) & nk_ok
  envelope = pltriton.load(env_ref.at[nk], mask=nk_ok, other=0.0).astype(acc_t)
  logits = gate * dot * logit_scale
  live = (nk_ok if all_slots else valid)[:, :, None]  # slots whose logit takes part in the max
  m0 = jnp.max(jnp.where(live, logits, -jnp.inf), axis=1)
  m1, floor = m0, None
  if floor_ref is not None:
    floor = pltriton.load(floor_ref.at[n[:, None], h[None, :]], mask=n_ok[:, None] & h_ok[None, :], other=-jnp.inf)
    floor = floor.astype(acc_t)
    m1 = jnp.maximum(m0, floor)
  shift = jnp.where(m1 > -jnp.inf, m1, 0.0)
  valid3 = valid[:, :, None]
  e = jnp.where(valid3, jnp.exp(jnp.where(valid3, logits - shift[:, None, :], 0.0)), 0.0)
  w = e * envelope[:, :, None]
  return dict(
    n=n,
    n_ok=n_ok,
    h=h,
    h_ok=h_ok,
    nk=nk,
    nk_ok=nk_ok,
    nkh=nkh,
    tile_ok=tile_ok,
    live=live,
    gate=gate,
    dot=dot,
    logits=logits,
    e=e,
    w=w,
    m0=m0,
    m1=m1,
    floor=floor,
    denominator=jnp.sum(w, axis=1) + EPSILON,
  )


def _edge_weights_kernel(gate_ref, dot_ref, scale_ref, env_ref, valid_ref, *rest, has_floor: bool, **tile):
  """beta = w / denominator * edge_scale for ``block_n`` targets. Refs: gate, dot, scale [N, K, H], env [N, K],
  valid [N, K] int32, optional floor [N, H], then the output beta [N, K, H]."""
  floor_ref, beta_ref = rest if has_floor else (None, *rest)
  s = _tile_softmax(gate_ref, dot_ref, env_ref, valid_ref, floor_ref, **tile)
  scale = pltriton.load(scale_ref.at[s["nkh"]], mask=s["tile_ok"], other=0.0).astype(s["w"].dtype)
  beta = s["w"] / s["denominator"][:, None, :] * scale
  pltriton.store(beta_ref.at[s["nkh"]], beta.astype(beta_ref.dtype), mask=s["tile_ok"])


def _edge_weights_vjp_kernel(gate_ref, dot_ref, scale_ref, env_ref, valid_ref, *rest, has_floor: bool, **tile):
  """The cotangents of gate, dot, edge_scale, envelope (and max_floor) from that of beta, for ``block_n`` targets.

  Refs: gate, dot, scale [N, K, H], env [N, K], valid [N, K] int32, optional floor [N, H], ct [N, K, H]; outputs
  d gate, d dot, d scale [N, K, H], d env [N, K] and, with the floor, d floor [N, H]."""
  floor_ref, ct_ref, dgate_ref, ddot_ref, dscale_ref, denv_ref, dfloor_ref = rest if has_floor else (None, *rest, None)
  s = _tile_softmax(gate_ref, dot_ref, env_ref, valid_ref, floor_ref, **tile)
  nkh, tile_ok, acc_t = s["nkh"], s["tile_ok"], s["w"].dtype
  ct = pltriton.load(ct_ref.at[nkh], mask=tile_ok, other=0.0).astype(acc_t)
  scale = pltriton.load(scale_ref.at[nkh], mask=tile_ok, other=0.0).astype(acc_t)
  denominator = s["denominator"]
  alpha = s["w"] / denominator[:, None, :]
  g = ct * scale  # the cotangent of alpha
  c = jnp.sum(g * alpha, axis=1)
  d_logits = alpha * (g - c[:, None, :])
  d_envelope = jnp.sum((g - c[:, None, :]) * s["e"] / denominator[:, None, :], axis=2)
  m0, m1 = s["m0"], s["m1"]
  d_m0 = jnp.where(m1 > -jnp.inf, -c * EPSILON / denominator, 0.0)  # the shift's cotangent, d m1
  if has_floor:
    floor = s["floor"]
    d_floor = d_m0 * balanced(floor, m1, m0)
    d_m0 = d_m0 * balanced(m0, m1, floor)
    pltriton.store(
      dfloor_ref.at[s["n"][:, None], s["h"][None, :]],
      d_floor.astype(dfloor_ref.dtype),
      mask=s["n_ok"][:, None] & s["h_ok"][None, :],
    )
  reached = (s["logits"] == m0[:, None, :]) & s["live"]
  count = jnp.sum(jnp.where(reached, 1.0, 0.0), axis=1)
  d_logits = d_logits + jnp.where(reached, (d_m0 / jnp.maximum(count, 1.0))[:, None, :], 0.0)
  t = d_logits * tile["logit_scale"]
  pltriton.store(dgate_ref.at[nkh], (t * s["dot"]).astype(dgate_ref.dtype), mask=tile_ok)
  pltriton.store(ddot_ref.at[nkh], (s["gate"] * t).astype(ddot_ref.dtype), mask=tile_ok)
  pltriton.store(dscale_ref.at[nkh], (ct * alpha).astype(dscale_ref.dtype), mask=tile_ok)
  pltriton.store(denv_ref.at[s["nk"]], d_envelope.astype(denv_ref.dtype), mask=s["nk_ok"])


def _call(kernel, launch: Launch, softmax_max: str, logit_scale: float, out_shape, *args):
  """Runs ``kernel`` over programs of ``block_n`` targets; args (gate, dot, edge_scale, envelope, valid, max_floor,
  *more), max_floor dropped when None."""
  gate, dot, edge_scale, envelope, valid, max_floor, *more = args
  num_n, num_k, num_h = gate.shape
  block_n = max(1, min(8, REGISTER_BUDGET // (pow2(num_k) * pow2(num_h))))
  inputs = [gate, dot, edge_scale, envelope, valid.astype(jnp.int32)]
  inputs += ([] if max_floor is None else [max_floor]) + more
  kernel = functools.partial(
    kernel,
    block_n=block_n,
    all_slots=softmax_max == "all_slots",
    has_floor=max_floor is not None,
    logit_scale=float(logit_scale),
  )
  grid = (pl.cdiv(num_n, block_n),)
  return Launch(launch.interpret, num_warps=NUM_WARPS).call(kernel, out_shape, grid)(*inputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def pallas_edge_weights(
  launch: Launch, softmax_max: str, logit_scale: float, gate, dot, edge_scale, envelope, valid, max_floor
):
  """beta [N, K, H], the same as ``attention_softmax.edge_weights`` (see there for the arguments); ``launch`` gives
  interpret mode (the kernels launch with ``NUM_WARPS`` warps). Differentiable in reverse mode to any order."""
  dtype = jnp.result_type(gate, dot, edge_scale, envelope)
  out_shape = jax.ShapeDtypeStruct(gate.shape, dtype)
  return _call(
    _edge_weights_kernel, launch, softmax_max, logit_scale, out_shape, gate, dot, edge_scale, envelope, valid, max_floor
  )


def _weights_fwd(launch, softmax_max, logit_scale, gate, dot, edge_scale, envelope, valid, max_floor):
  reject_forward_mode(gate, dot, edge_scale, envelope, max_floor)
  args = (gate, dot, edge_scale, envelope, valid, max_floor)
  return pallas_edge_weights(launch, softmax_max, logit_scale, *args), args


def _weights_bwd(launch, softmax_max, logit_scale, args, ct):
  d_gate, d_dot, d_scale, d_envelope, d_floor = edge_weights_vjp(launch, softmax_max, logit_scale, *args, ct)
  return d_gate, d_dot, d_scale, d_envelope, None, d_floor


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def edge_weights_vjp(
  launch: Launch, softmax_max: str, logit_scale: float, gate, dot, edge_scale, envelope, valid, max_floor, ct
):
  """The cotangents (gate, dot, edge_scale, envelope, max_floor) of ``pallas_edge_weights`` from that of beta
  [N, K, H] (max_floor's is None without a floor); its own VJP is JAX's derivative of the twin's, in XLA."""
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (gate, dot, edge_scale, envelope)]
  if max_floor is not None:
    out_shape.append(jax.ShapeDtypeStruct(max_floor.shape, max_floor.dtype))
  outs = _call(
    _edge_weights_vjp_kernel,
    launch,
    softmax_max,
    logit_scale,
    out_shape,
    gate,
    dot,
    edge_scale,
    envelope,
    valid,
    max_floor,
    ct,
  )
  return (*outs[:4], outs[4] if max_floor is not None else None)


def _twin_vjp(softmax_max, logit_scale, valid, gate, dot, edge_scale, envelope, max_floor, ct):
  fn = lambda g, d, s, e, f: edge_weights(g, d, s, e, valid, softmax_max, f, logit_scale)
  return jax.vjp(fn, gate, dot, edge_scale, envelope, max_floor)[1](ct)


def _vjp_fwd(launch, softmax_max, logit_scale, gate, dot, edge_scale, envelope, valid, max_floor, ct):
  reject_forward_mode(gate, dot, edge_scale, envelope, max_floor, ct)
  res = (gate, dot, edge_scale, envelope, valid, max_floor, ct)
  return edge_weights_vjp(launch, softmax_max, logit_scale, *res), res


def _vjp_bwd(launch, softmax_max, logit_scale, res, ct2):
  gate, dot, edge_scale, envelope, valid, max_floor, ct = res
  twin = functools.partial(_twin_vjp, softmax_max, logit_scale, valid)
  d_gate, d_dot, d_scale, d_envelope, d_floor, d_ct = jax.vjp(twin, gate, dot, edge_scale, envelope, max_floor, ct)[1](
    ct2
  )
  return d_gate, d_dot, d_scale, d_envelope, None, d_floor, d_ct


pallas_edge_weights.defvjp(_weights_fwd, _weights_bwd)
edge_weights_vjp.defvjp(_vjp_fwd, _vjp_bwd)
