"""Building blocks of E2Former-V2 in Flax NNX: linear maps on spherical features, radial MLPs, the gated FFN.

Spherical features have shape [..., (L+1)^2, C] (rows l^2 + m + l, channels last).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from e2former_jax import so3
from e2former_jax.norms import LayerNorm
from pallas_kernels.api import radial_profile, resolve_implementation
from pallas_kernels.gate_jnp import matmul

# e3nn's normalize2mom constants (docs/model.md §5).
SILU_2MOM = 1.6791767923989418
SIGMOID_2MOM = 1.8467055342154763

kaiming_uniform = nnx.initializers.variance_scaling(2.0, "fan_in", "uniform")


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

  def bias_or_zeros(self) -> jax.Array:
    """b, or zeros [out] for a layer without a bias."""
    return jnp.zeros(self.kernel.shape[-1:], self.kernel.dtype) if self.bias is None else self.bias[...]


class Embedding(nnx.Module):
  """Lookup table initialised U(+-1e-3) (the authors' init for every ``nn.Embedding``)."""

  def __init__(self, num: int, features: int, *, dtype, rngs: nnx.Rngs):
    init = nnx.initializers.uniform(scale=2e-3)
    self.embedding = nnx.Param(init(rngs.params(), (num, features), dtype) - 1e-3)

  def __call__(self, index: jax.Array) -> jax.Array:
    return self.embedding[...][index]


def kernel_implementation(attention_impl: str, precision: str, num_atoms: int) -> str:
  """The implementation of the per-edge ops with fused Pallas kernels (the direction gate, the radial profiles):
  "pallas" where the attention op runs its Pallas kernel (``ModelConfig.attention_impl`` "auto" on a GPU, or
  "pallas") and the products are TF32 or bfloat16, else "jnp". In true float32 Triton's products run below
  cuBLAS's, so "highest" keeps the XLA form (docs/kernel.md §7, §8)."""
  fused = attention_impl in ("auto", "pallas") and resolve_implementation(attention_impl, num_atoms) == "pallas"
  return "pallas" if fused and precision != "highest" else "jnp"


@dataclasses.dataclass(frozen=True)
class EdgeFeatures:
  """The invariant edge features e_ij = [rbf(|r_ij|); T(Z_i); S(Z_j)], held as their parts and never concatenated.

  A linear map of e_ij splits by rows of its kernel W = [W_rbf; W_T; W_S]:
  e_ij W + b = rbf_ij W_rbf + (T W_T + b)[Z_i] + (S W_S)[Z_j], so the type tables are projected (one row per
  element) and only the radial basis is multiplied per edge (docs/performance.md, per-edge work). Nothing is
  computed per source atom: inside a chunk of targets that reads the sources' atomic numbers, no work grows with
  the number of atoms outside the chunk. A ``RadialProfile`` of these features is one op
  (``pallas_kernels.radial_profile``), which forms the basis from the distances itself.

  Attributes:
    distance: [N, K] slot distances (Angstrom).
    basis: (cutoff, num_basis, width) of the Gaussian radial basis (static).
    target_table: [S, T] target-type embedding table (row Z for atomic number Z).
    source_table: [S, T] source-type embedding table.
    target_numbers: [N] atomic number of each target atom.
    source_numbers: [N, K] atomic number of each slot's source atom.
    implementation: of the radial profiles, "jnp" or "pallas" (``kernel_implementation``).
  """

  distance: jax.Array
  basis: tuple[float, int, float]
  target_table: jax.Array
  source_table: jax.Array
  target_numbers: jax.Array
  source_numbers: jax.Array
  implementation: str = "jnp"

  @classmethod
  def of_slots(cls, geometry, target_type: Embedding, source_type: Embedding, target_numbers, numbers, neighbors, cfg):
    """The features of slots ``neighbors`` [N, K] (indices into ``numbers`` [M]) of targets of atomic numbers
    ``target_numbers`` [N], with the distances of ``geometry`` (an ``EdgeGeometry``), the type tables of two
    ``Embedding`` modules and the implementation that ``cfg`` (a ``ModelConfig``) selects."""
    source_numbers = jnp.asarray(numbers)[neighbors]
    implementation = kernel_implementation(cfg.attention_impl, cfg.matmul_precision, target_numbers.shape[0])
    return cls(
      geometry.distance,
      geometry.basis,
      target_type.embedding[...],
      source_type.embedding[...],
      target_numbers,
      source_numbers,
      implementation,
    )

  @property
  def size(self) -> int:
    """Width of e_ij, B + 2T."""
    return self.basis[1] + self.target_table.shape[-1] + self.source_table.shape[-1]

  def profile(self, radial: RadialProfile, last: bool) -> jax.Array:
    """``radial(e_ij)`` (``last``) or ``radial.hidden(e_ij)``, [N, K, out], without forming e_ij."""
    first = radial.linears[0]
    w = first.kernel[...]
    b, t = self.basis[1], self.target_table.shape[-1]
    if w.shape[0] != self.size:
      raise ValueError(f"a layer of input width {w.shape[0]} cannot read edge features of width {self.size}")
    target = matmul(self.target_table, w[b : b + t], first.precision)
    if first.bias is not None:
      target = target + first.bias[...]
    source = matmul(self.source_table, w[b + t :], first.precision)
    linears = radial.linears[1:] if last else radial.linears[1:-1]
    return radial_profile(
      self.distance,
      target[self.target_numbers],
      source,
      self.source_numbers,
      w[:b],
      tuple((norm.scale[...], norm.bias[...]) for norm in radial.norms),
      tuple((layer.kernel[...], layer.bias_or_zeros()) for layer in linears),
      basis=self.basis,
      precision=first.precision,
      implementation=self.implementation,
    )


class RadialProfile(nnx.Module):
  """MLP Linear -> LayerNorm -> SiLU -> ... -> Linear (no norm or activation after the last layer).

  The input is an array [..., in] or ``EdgeFeatures`` (then the whole MLP is one op whose first layer is applied
  by parts).
  """

  def __init__(self, sizes: tuple[int, ...], *, precision: str, dtype, rngs: nnx.Rngs):
    if len(sizes) < 3:
      raise ValueError(f"a radial profile needs at least one hidden layer, got sizes {sizes}")
    self.linears = nnx.List(
      [Dense(a, b, precision=precision, dtype=dtype, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])]
    )
    self.norms = nnx.List([LayerNorm(b, dtype=dtype) for b in sizes[1:-1]])

  def hidden(self, x: jax.Array | EdgeFeatures) -> jax.Array:
    """The last hidden layer: the input of the last Linear (after its LayerNorm and SiLU)."""
    if isinstance(x, EdgeFeatures):
      return x.profile(self, last=False)
    first, *rest = self.linears[:-1]
    x = first(x)
    for linear, norm in zip(rest, self.norms):
      x = linear(jax.nn.silu(norm(x)))
    return jax.nn.silu(self.norms[-1](x))

  def __call__(self, x: jax.Array | EdgeFeatures) -> jax.Array:
    if isinstance(x, EdgeFeatures):
      return x.profile(self, last=True)
    return self.linears[-1](self.hidden(x))

  def weighted_sum(self, x: jax.Array | EdgeFeatures, weights: jax.Array) -> jax.Array:
    """sum_k weights[..., k, m] self(x)[..., k, :] -> [..., M, out], for input slots k [..., K, in] and weights
    [..., K, M]. The last layer is linear, so it runs after the sum: (sum_k w h_k) W + (sum_k w) b with h the
    last hidden layer; the products of the last layer then take one row per (atom, m) instead of one per slot.
    The sum over slots is elementwise in the input dtype (true float32)."""
    last = self.linears[-1]
    h = jnp.sum(weights[..., None] * self.hidden(x)[..., None, :], axis=-3)
    out = matmul(h, last.kernel[...], last.precision)
    return out if last.bias is None else out + jnp.sum(weights, axis=-2)[..., None] * last.bias[...]


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
    self.precision = precision

  def __call__(self, x: jax.Array) -> jax.Array:
    (y,) = side_by_side((self,), x)
    return y


def side_by_side(maps: tuple[SO3Linear, ...], x: jax.Array) -> list[jax.Array]:
  """Several ``SO3Linear`` maps of the same input as one wide matrix product per degree (their kernels side by
  side, so the input is read once), then split: ``[m(x) for m in maps]``, each [..., (L+1)^2, C_out(m)].

  Degree l's 2l+1 rows of every atom are rows of one plain product [... * (2l+1), C_in] x [C_in, sum C_out]:
  no per-row copy of the kernels and no batch dimension between the atoms and the channels, which a GPU's
  batched product would need moved (transposes of the input and of the wide output). Each map's output is
  assembled from its columns of the per-degree products (its l = 0 row plus its bias) in one concatenation,
  with no [..., (L+1)^2, sum C_out] array in between; in the backward pass each degree's cotangent is likewise
  one concatenation of the maps' columns.

  The maps must share lmax, input width and precision."""
  first = maps[0]
  w = jnp.concatenate([m.kernel[...] for m in maps], axis=-1)  # [L+1, C_in, sum C_out]
  lmax = w.shape[0] - 1
  per_degree = [matmul(x[..., l * l : (l + 1) ** 2, :], w[l], first.precision) for l in range(lmax + 1)]
  out, start = [], 0
  for m in maps:
    width = m.kernel.shape[-1]
    pieces = [y[..., start : start + width] for y in per_degree]
    if m.bias is not None:
      pieces[0] = pieces[0] + m.bias[...]
    out.append(jnp.concatenate(pieces, axis=-2))
    start += width
  return out


class GatedFeedForward(nnx.Module):
  """The "s3" FFN: SO3Linear, scalar-gated activation (SiLU for l=0, sigmoid gates for l>0), SO3Linear."""

  def __init__(self, lmax: int, channels: int, *, precision: str, dtype, rngs: nnx.Rngs):
    self.linear_in = SO3Linear(lmax, channels, channels, precision=precision, dtype=dtype, rngs=rngs)
    self.gates = Dense(channels, (lmax + 1) * channels, precision=precision, dtype=dtype, rngs=rngs)
    self.linear_out = SO3Linear(lmax, channels, channels, precision=precision, dtype=dtype, rngs=rngs)
    self.lmax = lmax

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.linear_in(x)
    g = self.gates(h[..., 0, :]).reshape(h.shape[:-2] + (self.lmax + 1, h.shape[-1]))
    scalar = SILU_2MOM * jax.nn.silu(g[..., :1, :])
    gate = SIGMOID_2MOM * so3.rows_at(jax.nn.sigmoid(g[..., 1:, :]), so3.degree_of_rows(self.lmax)[1:] - 1)
    return self.linear_out(jnp.concatenate([scalar, gate * h[..., 1:, :]], axis=-2))
