"""Output heads: the atomic-energy MLP, the direct force heads (linear and PaiNN) and per-head element energies.

A model has one or more named heads (``ModelConfig.heads``, the first the default); every head reads the same
backbone features x [N, (L+1)^2, C]: the energy MLP the l = 0 row, a direct force head the l = 1 rows (x, y, z).
The default head's parameters keep the names of a single-head model (``energy_head``, ``force_head``,
``element_energy``); each further head is an ``OutputHead`` under ``extra_heads/<name>/`` with the same names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from e2former_jax.config import ModelConfig
from e2former_jax.layers import Dense


class ElementEnergy(nnx.Variable):
  """Per-element reference energies (eV) added to the atomic energies; fitted or given, never trained."""


def energy_mlp(cfg: ModelConfig, *, dtype, rngs: nnx.Rngs) -> nnx.List:
  """E_i = W3 SiLU(W2 SiLU(W1 x_i + b1) + b2) + b3 on the l = 0 features (C -> C -> C -> 1)."""
  c, kw = cfg.channels, dict(precision=cfg.matmul_precision, dtype=dtype, rngs=rngs)
  return nnx.List([Dense(c, c, **kw), Dense(c, c, **kw), Dense(c, 1, **kw)])


def atomic_energy(mlp: nnx.List, scalars: jax.Array) -> jax.Array:
  """[N] energy MLP output of the l = 0 features [N, C] (eV, before element energies)."""
  h = scalars
  for layer in mlp[:-1]:
    h = jax.nn.silu(layer(h))
  return mlp[-1](h)[:, 0]


def vector_norm(v: jax.Array) -> jax.Array:
  """|v| over the Cartesian axis -2 of [..., 3, C], with a finite derivative (0) at v = 0."""
  squared = jnp.sum(v**2, axis=-2)
  nonzero = squared > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squared, 1.0)), 0.0)


class GatedEquivariantBlock(nnx.Module):
  """PaiNN's gated equivariant block (Schuett et al. 2021) on scalars s [N, C_in] and vectors v [N, 3, C_in].

  [s'; g] = W_u2 SiLU(W_u1 [s; |v W_n|] + b_u1) + b_u2 (each C_out wide), v' = g * (v W_v), s' = SiLU(s') when
  ``scalar_activation``. Parameters: ``vector_norm_proj`` W_n [C_in, C_in], ``vector_proj`` W_v [C_in, C_out]
  (no biases), ``update`` the two Dense layers (C_in hidden).
  """

  def __init__(self, in_features: int, out_features: int, *, scalar_activation: bool, precision, dtype, rngs):
    kw = dict(precision=precision, dtype=dtype, rngs=rngs)
    self.vector_norm_proj = Dense(in_features, in_features, use_bias=False, **kw)
    self.vector_proj = Dense(in_features, out_features, use_bias=False, **kw)
    self.update = nnx.List([Dense(2 * in_features, in_features, **kw), Dense(in_features, 2 * out_features, **kw)])
    self.out_features, self.scalar_activation = out_features, scalar_activation

  def __call__(self, s: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = jnp.concatenate([s, vector_norm(self.vector_norm_proj(v))], axis=-1)
    h = self.update[1](jax.nn.silu(self.update[0](h)))
    s, gate = h[..., : self.out_features], h[..., self.out_features :]
    v = gate[..., None, :] * self.vector_proj(v)
    return (jax.nn.silu(s) if self.scalar_activation else s), v


class PaiNNForceHead(nnx.Module):
  """Direct forces from two gated equivariant blocks, C -> C/2 -> 1 (the authors' ``PAINNLinearForce``)."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    c, kw = cfg.channels, dict(precision=cfg.matmul_precision, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List(
      [
        GatedEquivariantBlock(c, c // 2, scalar_activation=True, **kw),
        GatedEquivariantBlock(c // 2, 1, scalar_activation=False, **kw),
      ]
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    """Forces [N, 3] (eV/A) from features [N, (L+1)^2, C]."""
    s, v = x[:, 0, :], x[:, 1:4, :]
    for block in self.blocks:
      s, v = block(s, v)
    return v[..., 0]


class LinearForceHead(Dense):
  """Direct forces F_i = x_i^(l=1) w, one linear map of the l = 1 features (the authors' ``PureLinearForce``)."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    super().__init__(cfg.channels, 1, use_bias=False, precision=cfg.matmul_precision, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Forces [N, 3] (eV/A) from features [N, (L+1)^2, C]."""
    return super().__call__(x[:, 1:4, :])[..., 0]


FORCE_HEADS = {"linear": LinearForceHead, "painn": PaiNNForceHead}


def make_force_head(cfg: ModelConfig, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
  """The direct force head ``cfg.force_head`` names."""
  return FORCE_HEADS[cfg.force_head](cfg, dtype=dtype, rngs=rngs)


class OutputHead(nnx.Module):
  """One named head beyond the default: ``energy_head``, ``force_head`` (direct forces) and ``element_energy``."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    self.energy_head = energy_mlp(cfg, dtype=dtype, rngs=rngs)
    if cfg.forces == "direct":
      self.force_head = make_force_head(cfg, dtype=dtype, rngs=rngs)
    self.element_energy = ElementEnergy(jnp.zeros((cfg.num_species,), dtype))
