"""The two normalisations of E2Former-V2: LayerNorm over channels (inside the MLPs) and the equivariant
RMS norm of spherical features (before attention, before the FFN, and at the end of the network)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from e2former_jax import so3
from pallas_kernels.radial_jnp import layer_norm


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis (eps 1e-5, PyTorch's default), weight 1, bias 0."""

  def __init__(self, features: int, *, dtype):
    self.scale = nnx.Param(jnp.ones((features,), dtype))
    self.bias = nnx.Param(jnp.zeros((features,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(x, self.scale[...], self.bias[...])


class RMSNormSH(nnx.Module):
  """Equivariant RMS norm of spherical features (docs/model.md §5).

  The l=0 row is centred over channels; one sigma per atom averages, with equal weight per degree, the
  mean square over m of every channel; rows are scaled per (degree, channel); a bias is added to l=0.
  """

  def __init__(self, lmax: int, channels: int, *, dtype):
    self.scale = nnx.Param(jnp.ones((lmax + 1, channels), dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), dtype))
    self.degrees = so3.degree_of_rows(lmax)
    self.lmax = lmax

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.at[..., 0, :].add(-jnp.mean(x[..., 0, :], axis=-1, keepdims=True))
    row_weight = 1.0 / ((self.lmax + 1) * (2 * self.degrees + 1.0))  # 1/(L+1) * mean over m
    sigma2 = jnp.mean(jnp.sum(x**2 * jnp.asarray(row_weight, x.dtype)[:, None], axis=-2), axis=-1)
    y = x * jax.lax.rsqrt(sigma2 + 1e-5)[..., None, None] * self.scale[...][self.degrees]
    return y.at[..., 0, :].add(self.bias[...])
