"""The per-edge logit gate g_ijh and post-softmax factor rho_ijh of E2Former-V2's attention (docs/model.md).

Every variant reads the invariant edge features e_ij = [rbf(|r_ij|); T(Z_i); S(Z_j)] (radial basis, target and
source type embeddings, which the attention layer holds) and returns (g, rho), both [N, K, H]:

  * ``QK_alpha``:     [g; rho] = MLP(e_ij).
  * ``QKdot_alpha``:  t_ij = [sum_m Y_lm(r_ij) (W_l y_i)_lm]_l (degree contractions with the target's features),
                      g = Linear(t_ij * MLP(e_ij)), rho = MLP'(e_ij). Where the attention runs the Pallas kernel
                      with TF32 or bfloat16 products, g after the MLP's last hidden layer is one fused op
                      (``pallas_kernels.direction_gate``).
  * ``QKdotS_alpha``: [rho; s] = MLP(e_ij), t_ij as above with unnormalised harmonics and a narrow projection,
                      g = MLP''(t_ij[:H] * s).
"""

from __future__ import annotations

from flax import nnx

from e2former_jax import so3
from e2former_jax.config import ModelConfig
from e2former_jax.layers import Dense, RadialProfile, SO3Linear, kernel_implementation
from pallas_kernels.api import direction_gate
from pallas_kernels.gate_jnp import degree_contractions


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
    last = self.edge_mlp.linears[-1]
    gate = direction_gate(
      self.edge_mlp.hidden(edge_features),
      sh,
      self.direction_proj(y),
      last.kernel[...],
      last.bias[...],
      self.direction_gate.kernel[...],
      self.direction_gate.bias[...],
      precision=cfg.matmul_precision,
      implementation=self.implementation(y.shape[0]),
    )
    return gate, self.rho_mlp(edge_features)

  def implementation(self, num_atoms: int) -> str:
    """The direction gate's implementation (``layers.kernel_implementation``)."""
    return kernel_implementation(self.cfg.attention_impl, self.cfg.matmul_precision, num_atoms)


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
