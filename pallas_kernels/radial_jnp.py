"""The radial profile of the edges, the per-edge MLPs of E2Former-V2, in plain jnp: the reference twin of
``radial_pallas`` (``implementation="jnp"``).

Every per-edge MLP of the model (the attention gates and rho, the edge-degree embedding) reads the invariant edge
features e_nk = [rbf(d_nk); T(Z_n); S(Z_j)] of slot k of target n (source j): a Gaussian radial basis of the
distance and two atom-type embeddings. It is Linear -> (LayerNorm -> SiLU -> Linear)* -> LayerNorm -> SiLU, with
or without a last Linear. Its first Linear is applied by parts: with its kernel's blocks [W_rbf; W_T; W_S] and
bias b, e_nk W + b = rbf(d_nk) W_rbf + (T W_T + b)[Z_n] + (S W_S)[Z_j], so the caller projects the type tables
(one row per element) and the op receives

  target_rows[n]   = (T W_T + b)[Z_n]          [N, A]   one row per target
  source_table[z]  = (S W_S)[z]                [S, A]   one row per element, read at z = source_numbers[n, k]

and computes, per slot,

  x_0 = rbf(d) W_rbf + target_rows[n] + source_table[Z_j]
  h_i = SiLU(LayerNorm_i(x_i)),  x_(i+1) = h_i W_i + b_i   for the Linear after norm i, if any

returning the last x (a last Linear) or the last h (the last hidden layer). The radial basis is
rbf_b(d) = exp(-(d - mu_b)^2 / (2 sigma^2)) with centres mu = linspace(0, cutoff, B) and
sigma = width * cutoff / (B - 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gate_jnp import matmul

LAYER_NORM_EPSILON = 1e-5  # PyTorch's default


def basis_centers(cutoff: float, num_basis: int, dtype=jnp.float32) -> jax.Array:
  """mu [B] = linspace(0, cutoff, B), the centres of the Gaussian radial basis (Angstrom)."""
  return jnp.linspace(0.0, cutoff, num_basis, dtype=dtype)


def basis_sigma(cutoff: float, num_basis: int, width: float) -> float:
  """sigma = width * cutoff / (B - 1), the Gaussians' common width (Angstrom)."""
  return width * cutoff / (num_basis - 1)


def gaussian_basis(distance: jax.Array, cutoff: float, num_basis: int, width: float) -> jax.Array:
  """rbf [..., B] = exp(-(d - mu_b)^2 / (2 sigma^2)) of distances d [...] (Angstrom)."""
  mu = basis_centers(cutoff, num_basis, distance.dtype)
  return jnp.exp(-((distance[..., None] - mu) ** 2) / (2 * basis_sigma(cutoff, num_basis, width) ** 2))


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  """LayerNorm over the last axis (biased variance, epsilon 1e-5, as PyTorch's)."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPSILON) * scale + bias


def check_layers(w_rbf, norms, linears) -> None:
  """Raises ValueError unless the layers chain: norm i has the width of x_i, and there is one Linear after each
  norm but perhaps the last."""
  if not norms or len(linears) not in (len(norms) - 1, len(norms)):
    raise ValueError(f"a radial profile needs n >= 1 norms and n - 1 or n Linears; got {len(norms)}, {len(linears)}")
  width = w_rbf.shape[1]
  for i, (scale, bias) in enumerate(norms):
    if scale.shape != (width,) or bias.shape != (width,):
      raise ValueError(f"norm {i} must have scale and bias of shape ({width},), got {scale.shape}, {bias.shape}")
    if i < len(linears):
      w, b = linears[i]
      if w.ndim != 2 or w.shape[0] != width or b.shape != w.shape[1:]:
        raise ValueError(f"Linear {i} must be [{width}, O] with a bias [O], got {w.shape} and {b.shape}")
      width = w.shape[1]


def jnp_radial_profile(
  distance, target_rows, source_table, source_numbers, w_rbf, norms, linears, *, basis, precision: str = "highest"
):
  """The radial profile of the module docstring.

  Args:
    distance: [N, K] slot distances (Angstrom).
    target_rows: [N, A] (T W_T + b)[Z_n], the first Linear's target-type block and bias per target.
    source_table: [S, A] (S W_S), the first Linear's source-type block per element.
    source_numbers: [N, K] int, the element (row of ``source_table``) of each slot's source.
    w_rbf: [B, A] the first Linear's radial-basis block.
    norms: ((scale, bias), ...) of the LayerNorms, in order.
    linears: ((w, b), ...) of the Linears after the norms: one fewer than the norms (the op returns the last
      hidden layer) or as many (it returns the last Linear's output).
    basis: (cutoff, num_basis, width) of the radial basis (static; num_basis = B).
    precision: matmul precision of the products ("highest", "tensorfloat32", "bfloat16").

  Returns:
    [N, K, O], O the last Linear's width or A of the last norm.
  """
  rbf = gaussian_basis(distance, *basis)
  x = matmul(rbf, w_rbf, precision) + target_rows[:, None] + source_table[source_numbers]
  for i, (scale, bias) in enumerate(norms):
    x = jax.nn.silu(layer_norm(x, scale, bias))
    if i < len(linears):
      w, b = linears[i]
      x = matmul(x, w, precision) + b
  return x
