"""The node-centric attention op with the sum over slots as dense per-head products (``implementation="jnp_dense"``).

Same arguments and results as ``jnp_node.jnp_node_attention``. The weights beta_ikh are first summed into
per-head matrices B_h[i, j] = sum_k beta_ikh [neighbors_ik = j] (a contraction with the one-hot neighbour table,
so duplicate sources add up), then agg_irc = sum_j B_(c mod H)[i, j] rows_jrc is H matrix products
[N, N] x [N, R C / H]. No [N, K, R, C] gather is formed: on a CPU a training step of the ``small`` model is 2.0x
faster than with ``jnp_node`` at 64 atoms and 1.4x at 256 (benchmarks/RESULTS.md), but time and memory grow as
N^2 H, so it is for small batches only (``api.DENSE_MAX_ATOMS``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.jnp_node import attention_logits, attention_weights


def jnp_dense_attention(
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
  """Node-centric attention aggregate; arguments and returns as ``jnp_node_attention``."""
  logits = attention_logits(q, k, gate, neighbors)
  alpha = attention_weights(logits, envelope, valid, softmax_max, activation, max_floor)
  num_atoms, _, num_heads = alpha.shape
  onehot = jax.nn.one_hot(neighbors, rows.shape[0], dtype=rows.dtype)  # [N, K, M]
  hp = jax.lax.Precision.HIGHEST

  def neighbor_sum(weights, x):  # weights [N, K, H], x [M, R, C] -> [N, R, C]
    per_head = jnp.einsum("ikh,ikj->hij", weights, onehot, precision=hp)
    split = x.reshape(*x.shape[:-1], -1, num_heads)  # channel c = t H + h: head c mod H, as in per_channel
    return jnp.einsum("hij,jrth->irth", per_head, split, precision=hp).reshape(num_atoms, *x.shape[1:])

  beta = alpha * edge_scale
  outputs = [neighbor_sum(beta, rows)]
  if shifts is not None:
    tail = rows[:, rows.shape[1] - num_shift_rows :]
    outputs.append(jnp.stack([neighbor_sum(beta * shifts[..., a, None], tail) for a in range(3)], axis=1))
  if return_weights:
    outputs.append(alpha)
  return outputs[0] if len(outputs) == 1 else tuple(outputs)
