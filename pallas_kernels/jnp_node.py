"""The reference twin of the node-centric attention op, in plain jnp (``implementation="jnp_node"``).

For every target atom i, head h and slot k (source j = neighbors[i, k]):

  logit_ikh = gate_ikh * (q_ih . k_jh) / sqrt(d)
  w_ikh     = exp(logit_ikh - m_ih) * envelope_ik      (0 where the slot is not valid)
  alpha_ikh = w_ikh / (sum_k w_ikh + 1e-3)             (m = max over valid slots, or over all slots, and
                                                        at least max_floor_ih when that is given)
  beta_ikh  = alpha_ikh * edge_scale_ikh               (edge_scale = rho / |r_ij|)

With activation "softplus" or "sigmoid" (the authors' unnormalised variants) alpha_ikh = act(logit_ikh) *
envelope_ik instead of the softmax.
  agg_irc   = sum_k beta_ik,(c mod H) * rows_jrc

and, for periodic structures, the shift-weighted aggregate of the last ``num_shift_rows`` rows
  agg_shift_iarc = sum_k beta_ik,(c mod H) * shift_ika * rows_j,(R - num_shift_rows + r),c.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPSILON = 1e-3  # added to the softmax denominator after the max shift (authors' code)
ACTIVATIONS = ("softmax", "softplus", "sigmoid")
SOFTPLUS_THRESHOLD = 20.0  # torch.nn.functional.softplus returns x itself above this (the authors' function)


def softplus(x: jax.Array) -> jax.Array:
  """log(1 + e^x), and x itself for x > 20 as in PyTorch's ``softplus``."""
  return jnp.where(x > SOFTPLUS_THRESHOLD, x, jnp.log1p(jnp.exp(jnp.minimum(x, SOFTPLUS_THRESHOLD))))


def attention_logits(q: jax.Array, k: jax.Array, gate: jax.Array, neighbors: jax.Array) -> jax.Array:
  """Gated logits [N, K, H] from q [N, H, d], k [N, H, d], gate [N, K, H], neighbors [N, K]."""
  dot = jnp.einsum("nhd,nkhd->nkh", q, k[neighbors], precision=jax.lax.Precision.HIGHEST)
  return gate * dot * (q.shape[-1] ** -0.5)


def attention_weights(
  logits: jax.Array,
  envelope: jax.Array,
  valid: jax.Array,
  softmax_max: str = "valid",
  activation: str = "softmax",
  max_floor: jax.Array | None = None,
) -> jax.Array:
  """alpha [N, K, H]: softmax over the K slots with the envelope inside and +1e-3 in the denominator.

  Args:
    logits: [N, K, H].
    envelope: [N, K] phi(|r_ij|).
    valid: [N, K] bool, slot holds a neighbour within the cutoff.
    softmax_max: "valid" (the shift m is the max over valid slots) or "all_slots" (over every slot).
    activation: "softmax", or "softplus" / "sigmoid": alpha = act(logit) * phi, no shift, no normalisation.
    max_floor: optional [N, H]: m is at least this (the max of logits that enter only the shift; -inf where
      there are none).

  The exponent is masked before ``exp``, so slots that are not valid contribute exactly zero and an atom
  without valid slots gets zero weights with finite derivatives of every order.
  """
  valid = valid[..., None]
  if activation in ("softplus", "sigmoid"):
    act = softplus if activation == "softplus" else jax.nn.sigmoid
    return jnp.where(valid, act(jnp.where(valid, logits, 0.0)) * envelope[..., None], 0.0)
  if activation != "softmax":
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
  _, _, shift = softmax_shift(logits, valid, softmax_max, max_floor)
  w = masked_exponentials(logits, valid, shift) * envelope[..., None]
  return w / (jnp.sum(w, axis=1, keepdims=True) + EPSILON)


def softmax_shift(logits: jax.Array, valid: jax.Array, softmax_max: str, max_floor: jax.Array | None):
  """The softmax's shift, with the two values it is made from, each [N, 1, H]: m0 the max of the logits [N, K, H]
  over the valid slots (valid [N, K, 1] bool) or over all slots ("all_slots"), m1 = max(m0, max_floor [N, H]),
  and the shift m = m1, or 0 where m1 is -inf (no valid slot and no floor)."""
  if softmax_max == "valid":
    m0 = jnp.max(jnp.where(valid, logits, -jnp.inf), axis=1, keepdims=True)
  elif softmax_max == "all_slots":
    m0 = jnp.max(logits, axis=1, keepdims=True)
  else:
    raise ValueError(f"softmax_max must be 'valid' or 'all_slots', got {softmax_max!r}")
  m1 = m0 if max_floor is None else jnp.maximum(m0, max_floor[:, None, :])
  return m0, m1, jnp.where(m1 > -jnp.inf, m1, 0.0)


def masked_exponentials(logits: jax.Array, valid: jax.Array, shift: jax.Array) -> jax.Array:
  """e [N, K, H] = exp(logit - m) on valid slots (valid [N, K, 1]), exactly 0 elsewhere: the exponent is masked
  before ``exp``, so no slot's derivative is inf or NaN."""
  return jnp.where(valid, jnp.exp(jnp.where(valid, logits - shift, 0.0)), 0.0)


def per_channel(weights: jax.Array, channels: int) -> jax.Array:
  """Broadcasts per-head weights [..., H] to channels [..., C]: channel c belongs to head c mod H."""
  return jnp.tile(weights, (1,) * (weights.ndim - 1) + (channels // weights.shape[-1],))


def jnp_node_attention(
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
  activation: str = "softmax",
  max_floor=None,
  return_weights: bool = False,
):
  """Node-centric attention aggregate.

  Args:
    q: [N, H, d] queries of target atoms.
    k: [N, H, d] keys of source atoms.
    gate: [N, K, H] per-edge logit gate.
    edge_scale: [N, K, H] per-edge factor applied after the softmax (rho / |r_ij|).
    envelope: [N, K] polynomial envelope phi(|r_ij|).
    valid: [N, K] bool, slot holds a neighbour within the cutoff.
    neighbors: [N, K] int32 source atom of each slot.
    rows: [N, R, C] per-node rows to aggregate (C a multiple of H).
    shifts: optional [N, K, 3] Cartesian image offsets (periodic structures).
    num_shift_rows: how many trailing rows enter the shift-weighted aggregate.
    softmax_max: "valid" or "all_slots".
    activation: "softmax", "softplus" or "sigmoid" (``attention_weights``).
    max_floor: optional [N, H] lower bound of the softmax shift (``attention_weights``).
    return_weights: also return alpha [N, K, H].

  Returns:
    agg [N, R, C]; with ``shifts`` also agg_shift [N, 3, num_shift_rows, C]; with ``return_weights``
    also alpha, all in a tuple in that order (a bare array when only agg is returned).
  """
  logits = attention_logits(q, k, gate, neighbors)
  alpha = attention_weights(logits, envelope, valid, softmax_max, activation, max_floor)
  beta = per_channel(alpha * edge_scale, rows.shape[-1])
  gathered = rows[neighbors]  # [N, K, R, C]
  hp = jax.lax.Precision.HIGHEST
  outputs = [jnp.einsum("nkc,nkrc->nrc", beta, gathered, precision=hp)]
  if shifts is not None:
    tail = gathered[:, :, rows.shape[1] - num_shift_rows :]
    outputs.append(jnp.einsum("nkc,nka,nkrc->narc", beta, shifts, tail, precision=hp))
  if return_weights:
    outputs.append(alpha)
  return outputs[0] if len(outputs) == 1 else tuple(outputs)
