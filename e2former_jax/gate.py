"""The per-edge logit gate g_ijh and post-softmax factor rho_ijh of E2Former-V2's attention (docs/model.md).

Every variant reads the invariant edge features e_ij = [rbf(|r_ij|); T(Z_i); S(Z_j)] (radial basis, target and
source type embeddings, which the attention layer holds) and returns (g, rho), both [N, K, H]:

  * ``QK_alpha``:     [g; rho] = MLP(e_ij).
  * ``QKdot_alpha``:  t_ij = [sum_m Y_lm(r_ij) (W_l y_i)_lm]_l (degree contractions with the target's features),
                      g = Linear(t_ij * MLP(e_ij)), rho = MLP'(e_ij).
  * ``QKdotS_alpha``: [rho; s] = MLP(e_ij), t_ij as above with unnormalised harmonics and a narrow projection,
                      g = MLP''(t_ij[:H] * s).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from e2former_jax import so3
from e2former_jax.config import ModelConfig
from e2former_jax.layers import Dense, RadialProfile, SO3Linear


def degree_contractions(sh: jax.Array, projected: jax.Array, lmax: int) -> jax.Array:
  """t_ij = [sum_m Y_(l,m)(r_ij) P_i,(l,m)] for l = 0..lmax, concatenated.

  Each entry sums at most 2 lmax + 1 products, so it is computed elementwise in true float32 (as a matrix product
  it would be a batch of [K, 2l+1] x [2l+1, F] products, which a GPU runs far below its rate). On the CPU's buffer
  assignment this form holds about 38 KB per atom more for conservative forces with remat and chunks
  (docs/performance.md).

  Shapes: sh [N, K, rows], projected [N, rows, F] -> [N, K, (lmax+1) F].
  """
  return jnp.concatenate(
    [
      jnp.sum(sh[..., l * l : (l + 1) ** 2, None] * projected[:, None, l * l : (l + 1) ** 2], axis=-2)
      for l in range(lmax + 1)
    ],
    axis=-1,
  )


class Gate(nnx.Module):
  """Base of the gate variants. A variant's ``__call__(y, edge_features, geometry)`` takes normalised features
  y [N, rows, C], the invariant edge features e_ij (``layers.EdgeFeatures``, width num_basis + 2 type_embed_dim)
  and the ``EdgeGeometry``, and returns (g, rho), both [N, K, H]."""

  def __init__(self, cfg: ModelConfig):
    self.cfg = cfg

  @property
  def edge_in(self) -> int:
    return self.cfg.num_basis + 2 * self.cfg.type_embed_dim


class QKAlphaGate(Gate):
  """[g; rho] = MLP(e_ij)."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    super().__init__(cfg)
    kw = dict(precision=cfg.matmul_precision, dtype=dtype, rngs=rngs)
    h = cfg.num_heads
    self.edge_mlp = RadialProfile((self.edge_in, cfg.radial_hidden, cfg.radial_hidden, 2 * h), **kw)

  def __call__(self, y, edge_features, geometry):
    out = self.edge_mlp(edge_features)
    h = self.cfg.num_heads
    return out[..., :h], out[..., h:]


class QKdotAlphaGate(Gate):
  """g = Linear(t_ij * MLP(e_ij)) with t_ij the degree contractions of the projected target features."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    super().__init__(cfg)
    kw = dict(precision=cfg.matmul_precision, dtype=dtype, rngs=rngs)
    c, hidden = cfg.channels, cfg.radial_hidden
    self.direction_proj = SO3Linear(cfg.lmax, c, c, **kw)
    self.edge_mlp = RadialProfile((self.edge_in, hidden, hidden, (cfg.lmax + 1) * c), **kw)
    self.direction_gate = Dense((cfg.lmax + 1) * c, cfg.num_heads, **kw)
    self.rho_mlp = RadialProfile((self.edge_in, hidden, hidden, cfg.num_heads), **kw)

  def __call__(self, y, edge_features, geometry):
    cfg = self.cfg
    sh = so3.spherical_harmonics(geometry.vectors, cfg.lmax, "integral")
    t = degree_contractions(sh, self.direction_proj(y), cfg.lmax)
    return self.direction_gate(t * self.edge_mlp(edge_features)), self.rho_mlp(edge_features)


class QKdotSAlphaGate(Gate):
  """[rho; s] = MLP(e_ij); g = MLP(t_ij[:H] * s) with a narrow projection and unnormalised harmonics."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    super().__init__(cfg)
    kw = dict(precision=cfg.matmul_precision, dtype=dtype, rngs=rngs)
    h = cfg.num_heads
    self.edge_mlp = RadialProfile((self.edge_in, cfg.radial_hidden, cfg.radial_hidden, 2 * h), **kw)
    self.direction_proj = SO3Linear(cfg.lmax, cfg.channels, h // (cfg.lmax + 1) + 1, **kw)
    self.direction_mlp = RadialProfile((h, h, h), **kw)

  def __call__(self, y, edge_features, geometry):
    cfg = self.cfg
    h = cfg.num_heads
    out = self.edge_mlp(edge_features)
    rho, s = out[..., :h], out[..., h:]
    sh = so3.spherical_harmonics(geometry.vectors, cfg.lmax, "component", normalize=False)  # [N, K, rows]
    t = degree_contractions(sh, self.direction_proj(y), cfg.lmax)[..., :h]
    return self.direction_mlp(t * s), rho


GATES = {"QK_alpha": QKAlphaGate, "QKdot_alpha": QKdotAlphaGate, "QKdotS_alpha": QKdotSAlphaGate}


def make_gate(cfg: ModelConfig, *, dtype, rngs: nnx.Rngs) -> Gate:
  """The gate variant ``cfg.gate`` names."""
  return GATES[cfg.gate](cfg, dtype=dtype, rngs=rngs)
