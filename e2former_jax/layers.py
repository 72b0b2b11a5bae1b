"""Building blocks of E2Former-V2 in Flax NNX: linear maps on spherical features, norms, radial MLPs.

Spherical features have shape [..., (L+1)^2, C] (rows l^2 + m + l, channels last).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from e2former_jax import so3

# e3nn's normalize2mom constants (MODEL.md section 3.10).
SILU_2MOM = 1.6791767923989418
SIGMOID_2MOM = 1.8467055342154763

kaiming_uniform = nnx.initializers.variance_scaling(2.0, "fan_in", "uniform")


def matmul(x: jax.Array, w: jax.Array, precision: str, spec: str = "...i,io->...o") -> jax.Array:
  """Dense contraction at the configured matmul precision ("highest", "tensorfloat32", "bfloat16")."""
  if precision == "bfloat16":
    return jnp.einsum(spec, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32).astype(
      x.dtype
    )
  lax_precision = jax.lax.Precision.HIGHEST if precision == "highest" else jax.lax.Precision.DEFAULT
  return jnp.einsum(spec, x, w, precision=lax_precision)


class Dense(nnx.Module):
  """y = x W + b, Kaiming-uniform W (U(+-sqrt(6/fan_in)), the authors' ``simple_init_fn``), zero b."""

  def __init__(
    self, in_features: int, out_features: int, *, use_bias: bool = True, precision: str, dtype, rngs: nnx.Rngs
  ):
    self.kernel = nnx.Param(kaiming_uniform(rngs.params(), (in_features, out_features), dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None
    self.precision = precision

  def __call__(self, x: jax.Array) -> jax.Array:
    y = matmul(x, self.kernel[...], self.precision)
    return y if self.bias is None else y + self.bias[...]


class Embedding(nnx.Module):
  """Lookup table initialised U(+-1e-3) (the authors' init for every ``nn.Embedding``)."""

  def __init__(self, num: int, features: int, *, dtype, rngs: nnx.Rngs):
    init = nnx.initializers.uniform(scale=2e-3)
    self.embedding = nnx.Param(init(rngs.params(), (num, features), dtype) - 1e-3)

  def __call__(self, index: jax.Array) -> jax.Array:
    return self.embedding[...][index]


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis (eps 1e-5, PyTorch's default), weight 1, bias 0."""

  def __init__(self, features: int, *, dtype):
    self.scale = nnx.Param(jnp.ones((features,), dtype))
    self.bias = nnx.Param(jnp.zeros((features,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * self.scale[...] + self.bias[...]


class RadialProfile(nnx.Module):
  """MLP Linear -> LayerNorm -> SiLU -> ... -> Linear (no norm or activation after the last layer)."""

  def __init__(self, sizes: tuple[int, ...], *, precision: str, dtype, rngs: nnx.Rngs):
    self.linears = nnx.List(
      [Dense(a, b, precision=precision, dtype=dtype, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])]
    )
    self.norms = nnx.List([LayerNorm(b, dtype=dtype) for b in sizes[1:-1]])

  def __call__(self, x: jax.Array) -> jax.Array:
    for linear, norm in zip(self.linears[:-1], self.norms):
      x = jax.nn.silu(norm(linear(x)))
    return self.linears[-1](x)


class SO3Linear(nnx.Module):
  """Degree-wise linear map y_{(l,m),o} = sum_c W_l[c, o] x_{(l,m),c} + delta_{l0} b_o.

  W is U(+-1/sqrt(C_in)) per degree; b (l=0 only) is zero-initialised.
  """

  def __init__(
    self,
    lmax: int,
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    precision: str,
    dtype,
    rngs: nnx.Rngs,
  ):
    bound = 1.0 / np.sqrt(in_features)
    init = nnx.initializers.uniform(scale=2 * bound)
    self.kernel = nnx.Param(init(rngs.params(), (lmax + 1, in_features, out_features), dtype) - bound)
    self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None
    self.degrees = so3.degree_of_rows(lmax)
    self.precision = precision

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.kernel[...][self.degrees]  # [(L+1)^2, C_in, C_out]
    y = matmul(x, w, self.precision, "...ri,rio->...ro")
    if self.bias is not None:
      y = y.at[..., 0, :].add(self.bias[...])
    return y


class RMSNormSH(nnx.Module):
  """Equivariant RMS norm of spherical features (MODEL.md section 3.11).

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


class GatedFeedForward(nnx.Module):
  """The "s3" FFN: SO3Linear, scalar-gated activation (SiLU for l=0, sigmoid gates for l>0), SO3Linear."""

  def __init__(self, lmax: int, channels: int, *, precision: str, dtype, rngs: nnx.Rngs):
    self.linear_in = SO3Linear(lmax, channels, channels, precision=precision, dtype=dtype, rngs=rngs)
    self.gates = Dense(channels, (lmax + 1) * channels, precision=precision, dtype=dtype, rngs=rngs)
    self.linear_out = SO3Linear(lmax, channels, channels, precision=precision, dtype=dtype, rngs=rngs)
    self.degrees = so3.degree_of_rows(lmax)
    self.lmax = lmax

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.linear_in(x)
    g = self.gates(h[..., 0, :]).reshape(h.shape[:-2] + (self.lmax + 1, h.shape[-1]))
    scalar = SILU_2MOM * jax.nn.silu(g[..., :1, :])
    gate = SIGMOID_2MOM * jax.nn.sigmoid(g[..., 1:, :])[..., self.degrees[1:] - 1, :]
    return self.linear_out(jnp.concatenate([scalar, gate * h[..., 1:, :]], axis=-2))


def gaussian_basis(distance: jax.Array, cutoff: float, num_basis: int, width: float) -> jax.Array:
  """rbf_k(d) = exp(-(d - mu_k)^2 / (2 (width * delta)^2)), mu_k = linspace(0, cutoff, num_basis)."""
  mu = jnp.linspace(0.0, cutoff, num_basis, dtype=distance.dtype)
  sigma = width * cutoff / (num_basis - 1)
  return jnp.exp(-((distance[..., None] - mu) ** 2) / (2 * sigma**2))


def polynomial_envelope(distance: jax.Array, cutoff: float) -> jax.Array:
  """phi(d) = max(1 - 6 t^5 + 15 t^4 - 10 t^3, 0), t = d / cutoff."""
  t = distance / cutoff
  return jnp.maximum(1 - 6 * t**5 + 15 * t**4 - 10 * t**3, 0.0)
