"""The attention's softmax weights with a closed-form derivative, for the backward pass of the Pallas path.

The backward pass of the fused attention (``pallas._composed``) recomputes the softmax weights of
``jnp_node.attention_weights`` in XLA and differentiates them. JAX's derivative of that reference takes seven XLA
fusions per layer in a conservative-force program, writing six float32 and two boolean [N, K, H] arrays besides
their reductions (docs/kernel.md §4). ``softmax_weights`` computes the same weights and carries its VJP in closed
form. With w_k = e_k phi_k, e_k = exp(logit_k - m) on valid slots (0 elsewhere), D = sum_k w_k + eps,
alpha_k = w_k / D and the cotangent g of alpha (per target and head, k over the slots):

  c            = sum_k g_k alpha_k
  d logit_k    = alpha_k (g_k - c)  +  d m0 [logit_k = m0] / #{k : logit_k = m0}
  d phi_k      = sum_h (g_kh - c_h) e_kh / D_h
  d m          = -c eps / D                    (the shift m enters only through eps)

where m0 is the max over the slots and m = max(m0, max_floor) (0 where that is -inf). Where the shift is not
smooth the rule is JAX's own: the max's cotangent is split evenly between the slots that reach it, and at a tie of
m0 and max_floor each gets half. The result therefore equals JAX's derivative of the reference to round-off, and
the rule, written in jnp, is differentiated by JAX for the next order (force matching).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.jnp_node import EPSILON, masked_exponentials, softmax_shift


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def softmax_weights(logits, envelope, valid, softmax_max: str, max_floor):
  """alpha [N, K, H], the same as ``jnp_node.attention_weights(logits, envelope, valid, softmax_max,
  max_floor=max_floor)`` (activation "softmax").

  Args:
    logits: [N, K, H].
    envelope: [N, K] phi(|r_ij|).
    valid: [N, K] bool.
    softmax_max: "valid" or "all_slots" (static).
    max_floor: [N, H] or None.
  """
  return _softmax_weights_fwd(logits, envelope, valid, softmax_max, max_floor)[0]


def _softmax_weights_fwd(logits, envelope, valid, softmax_max, max_floor):
  valid = valid[..., None]
  m0, m1, shift = softmax_shift(logits, valid, softmax_max, max_floor)
  w = masked_exponentials(logits, valid, shift) * envelope[..., None]
  denominator = jnp.sum(w, axis=1, keepdims=True) + EPSILON
  return w / denominator, (logits, envelope, valid, max_floor, m0, m1, shift, denominator)


def balanced(x, result, other):
  """JAX's derivative of maximum(x, other) = result with respect to x: 1 where x alone is the result, 1/2 at a
  tie, 0 elsewhere (jnp; the edge-weight VJP kernel calls it on its Triton values too)."""
  return jnp.where(x == result, jnp.where(other == result, 0.5, 1.0), 0.0)


def _softmax_weights_bwd(softmax_max, residuals, g):
  logits, envelope, valid, max_floor, m0, m1, shift, denominator = residuals
  e = masked_exponentials(logits, valid, shift)
  alpha = e * envelope[..., None] / denominator
  c = jnp.sum(g * alpha, axis=1, keepdims=True)
  d_logits = alpha * (g - c)
  d_envelope = jnp.sum((g - c) * e / denominator, axis=2)
  d_m1 = jnp.where(m1 > -jnp.inf, -c * EPSILON / denominator, 0.0)
  d_floor = None
  d_m0 = d_m1
  if max_floor is not None:
    floor = max_floor[:, None, :]
    d_m0 = d_m1 * balanced(m0, m1, floor)
    d_floor = (d_m1 * balanced(floor, m1, m0))[:, 0, :]
  reached = logits == m0
  if softmax_max == "valid":
    reached = reached & valid
  count = jnp.sum(reached, axis=1, keepdims=True)
  d_logits = d_logits + jnp.where(reached, d_m0 / jnp.maximum(count, 1), 0.0)
  return d_logits, d_envelope, None, d_floor


softmax_weights.defvjp(_softmax_weights_fwd, _softmax_weights_bwd)


def edge_weights(gate, dot, edge_scale, envelope, valid, softmax_max: str, max_floor, logit_scale: float):
  """beta [N, K, H] = softmax_weights(gate * dot * logit_scale, ...) * edge_scale: the attention's weights of the
  value rows, the twin of ``softmax_pallas.pallas_edge_weights``.

  Args:
    gate, dot, edge_scale: [N, K, H] the logit gate, q . k of each slot and rho / |r_ij| (1/Angstrom).
    envelope: [N, K]; valid: [N, K] bool; softmax_max: "valid" or "all_slots"; max_floor: [N, H] or None.
    logit_scale: 1 / sqrt(d), the logits' factor.
  """
  return softmax_weights(gate * dot * logit_scale, envelope, valid, softmax_max, max_floor) * edge_scale
