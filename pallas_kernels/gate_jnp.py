"""The reference twin of the direction gate of ``QKdot_alpha``, in plain jnp (``implementation="jnp"``).

For every target atom n, slot k and head h, with u_nk the last hidden layer of the gate's edge MLP (after its
LayerNorm and SiLU), Y_nk the real spherical harmonics of the slot's direction and P_n the target's projected
features (one row per (l, m), F channels per degree):

  m_nk,(l,f) = sum_a u_nk,a W_mix[a, (l,f)] + b_mix[(l,f)]        (the edge MLP's last layer)
  t_nk,(l,f) = sum_m Y_nk,(l,m) P_n,(l,m),f                        (the degree contractions)
  g_nkh      = sum_(l,f) t_nk,(l,f) m_nk,(l,f) W_gate[(l,f), h] + b_gate[h]

The columns (l, f) are degree-major, l * F + f. Every per-edge array in between is [N, K, (L+1) F]; the Pallas
twin (``gate_pallas``) forms none of them in device memory.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MATMUL_PRECISIONS = ("highest", "tensorfloat32", "bfloat16")


def lax_precision(precision: str) -> jax.lax.Precision:
  """The ``lax`` precision of a float32 product in a matmul precision mode (bfloat16 operands are cast before)."""
  return jax.lax.Precision.HIGHEST if precision == "highest" else jax.lax.Precision.DEFAULT


def matmul(x: jax.Array, w: jax.Array, precision: str, spec: str = "...i,io->...o") -> jax.Array:
  """Dense contraction at a matmul precision: "highest" (true float32), "tensorfloat32" (the backend's default
  float32 product: TF32 tensor cores on GPUs) or "bfloat16" (bfloat16 operands, float32 accumulation)."""
  if precision == "bfloat16":
    return jnp.einsum(spec, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32).astype(
      x.dtype
    )
  return jnp.einsum(spec, x, w, precision=lax_precision(precision))


def degree_contractions(sh: jax.Array, projected: jax.Array, lmax: int) -> jax.Array:
  """t_nk = [sum_m Y_nk,(l,m) P_n,(l,m)] for l = 0..lmax, concatenated.

  Each entry sums at most 2 lmax + 1 products, so it is computed elementwise in true float32 (as a matrix product
  it would be a batch of [K, 2l+1] x [2l+1, F] products, which a GPU runs far below its rate). On the CPU's buffer
  assignment this form holds about 38 KB per atom more for conservative forces with remat and chunks
  (docs/performance.md).

  Shapes: sh [N, K, (L+1)^2], projected [N, (L+1)^2, F] -> [N, K, (L+1) F].
  """
  return jnp.concatenate(
    [
      jnp.sum(sh[..., l * l : (l + 1) ** 2, None] * projected[:, None, l * l : (l + 1) ** 2], axis=-2)
      for l in range(lmax + 1)
    ],
    axis=-1,
  )


def jnp_direction_gate(hidden, sh, projected, w_mix, b_mix, w_gate, b_gate, *, precision: str = "highest"):
  """g [N, K, H] of the module docstring.

  Args:
    hidden: [N, K, A] u, the edge MLP's last hidden layer.
    sh: [N, K, (L+1)^2] spherical harmonics of the slots' directions.
    projected: [N, (L+1)^2, F] projected target features P.
    w_mix, b_mix: [A, (L+1) F], [(L+1) F], the edge MLP's last layer.
    w_gate, b_gate: [(L+1) F, H], [H], the gate's output layer.
    precision: one of ``MATMUL_PRECISIONS``, for the two matrix products (the contractions are float32).
  """
  mixed = matmul(hidden, w_mix, precision) + b_mix
  contractions = degree_contractions(sh, projected, math.isqrt(sh.shape[-1]) - 1)
  return matmul(contractions * mixed, w_gate, precision) + b_gate
