"""The E2Former-V2 network (docs/model.md): edge-degree embedding, transformer blocks, energy and force heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from e2former_jax import so3
from e2former_jax.attention import E2Attention
from e2former_jax.config import ModelConfig
from e2former_jax.geometry import EdgeGeometry, edge_geometry
from e2former_jax.graph import AtomGraph
from e2former_jax.layers import Dense, Embedding, GatedFeedForward, RadialProfile
from e2former_jax.norms import RMSNormSH

MAX_ABS_CHARGE = 10
MAX_SPIN_INDEX = 20


def model_dtype(cfg: ModelConfig):
  if cfg.dtype == "float64":
    if jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
      raise ValueError(
        'dtype="float64" needs 64-bit JAX: call jax.config.update("jax_enable_x64", True) before building the model'
      )
    return jnp.float64
  return jnp.float32


class EdgeDegreeEmbedding(nnx.Module):
  """Initial features x_i = (1/avg_degree) sum_j phi(d_ij) Y_l(u_ij) f^l([rbf; T(Z_i); S(Z_j)]) per degree."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    c = cfg.channels
    self.target_type = Embedding(cfg.edge_degree_species, c, dtype=dtype, rngs=rngs)
    self.source_type = Embedding(cfg.edge_degree_species, c, dtype=dtype, rngs=rngs)
    self.radial = nnx.List(
      [
        RadialProfile(
          (cfg.num_basis + 2 * c, cfg.radial_hidden, cfg.radial_hidden, c),
          precision=cfg.matmul_precision,
          dtype=dtype,
          rngs=rngs,
        )
        for _ in range(cfg.lmax + 1)
      ]
    )
    self.cfg = cfg

  def __call__(self, graph: AtomGraph, geometry: EdgeGeometry) -> jax.Array:
    cfg = self.cfg
    target = jnp.broadcast_to(self.target_type(graph.numbers)[:, None], (*graph.neighbors.shape, cfg.channels))
    features = jnp.concatenate([geometry.rbf, target, self.source_type(graph.numbers[graph.neighbors])], -1)
    sh = so3.spherical_harmonics(geometry.vectors, cfg.lmax, "component") * geometry.envelope[..., None]
    out = [
      jnp.einsum("nkm,nkc->nmc", sh[..., l * l : (l + 1) ** 2], radial(features), precision=jax.lax.Precision.HIGHEST)
      for l, radial in enumerate(self.radial)
    ]
    return jnp.concatenate(out, axis=-2) / cfg.avg_degree


class TransformerBlock(nnx.Module):
  """x + Attention(RMSNorm(x) + s_b on l=0); then x + FFN(RMSNorm(x))."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    self.norm_attention = RMSNormSH(cfg.lmax, cfg.channels, dtype=dtype)
    self.attention = E2Attention(cfg, dtype=dtype, rngs=rngs)
    self.norm_ffn = RMSNormSH(cfg.lmax, cfg.channels, dtype=dtype)
    self.ffn = GatedFeedForward(cfg.lmax, cfg.channels, precision=cfg.matmul_precision, dtype=dtype, rngs=rngs)

  def __call__(
    self, x, system_embedding, graph: AtomGraph, geometry: EdgeGeometry, periodic: bool, return_attention: bool = False
  ):
    y = self.norm_attention(x)
    if system_embedding is not None:
      y = y.at[:, 0, :].add(system_embedding)
    attention = self.attention(
      y, graph.positions, graph.numbers, graph.neighbors, graph.neighbor_shift, geometry, periodic, return_attention
    )
    attention, alpha = attention if return_attention else (attention, None)
    x = x + attention
    x = x + self.ffn(self.norm_ffn(x))
    return x, alpha


class ElementEnergy(nnx.Variable):
  """Per-element reference energies (eV) added to the atomic energies; fitted or given, never trained."""


class E2Former(nnx.Module):
  """E2Former-V2: edge-degree embedding, transformer blocks, final norm, energy MLP and force head.

  Call ``model(graph)`` for per-atom energies [N] and node features [N, (L+1)^2, C]; ``predict`` gives
  energies, forces and stress. ``element_energy`` [num_species] holds per-element reference energies (eV,
  zero until set with ``set_element_energies``), so predictions are total energies.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dtype = model_dtype(cfg)
    c = cfg.channels
    kw = dict(precision=cfg.matmul_precision, dtype=dtype, rngs=rngs)
    if cfg.use_charge_spin:
      self.charge_embedding = Embedding(2 * MAX_ABS_CHARGE + 10, c, dtype=dtype, rngs=rngs)
      self.spin_embedding = Embedding(MAX_SPIN_INDEX + 10, c, dtype=dtype, rngs=rngs)
      self.system_mix = Dense(2 * c, c, **kw)
    self.edge_degree = EdgeDegreeEmbedding(cfg, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([TransformerBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNormSH(cfg.lmax, c, dtype=dtype)
    self.energy_head = nnx.List([Dense(c, c, **kw), Dense(c, c, **kw), Dense(c, 1, **kw)])
    if cfg.forces == "direct":
      self.force_head = Dense(c, 1, use_bias=False, **kw)
    self.element_energy = ElementEnergy(jnp.zeros((cfg.num_species,), dtype))
    self.config = cfg

  def set_element_energies(self, energies: dict[int, float]) -> None:
    """Sets the reference energy (eV) of each atomic number in ``energies``; others stay unchanged."""
    table = self.element_energy[...]
    for z, e in energies.items():
      if not 0 < int(z) < self.config.num_species:
        raise ValueError(f"atomic number {z} outside 1..{self.config.num_species - 1}")
      table = table.at[int(z)].set(float(e))
    self.element_energy[...] = table

  def system_embedding(self, graph: AtomGraph) -> jax.Array | None:
    """s_b = SiLU(W [E_q(clip(q) + 10); E_S(clip(S))]) per structure, [G, C]."""
    if not self.config.use_charge_spin:
      return None
    spin = graph.spin if self.config.spin_input == "multiplicity" else jnp.zeros_like(graph.spin)
    charge = self.charge_embedding(jnp.clip(graph.charge, -MAX_ABS_CHARGE, MAX_ABS_CHARGE) + MAX_ABS_CHARGE)
    spin = self.spin_embedding(jnp.clip(spin, 0, MAX_SPIN_INDEX))
    return jax.nn.silu(self.system_mix(jnp.concatenate([charge, spin], axis=-1)))

  def __call__(self, graph: AtomGraph, return_attention: bool = False) -> dict:
    """Per-atom outputs.

    Returns a dict with "atom_energy" [N] (eV, 0 for padding), "features" [N, (L+1)^2, C] (after the final
    norm), "direct_forces" [N, 3] (eV/A, direct head only) and "attention" (list of [N, K, H] per layer,
    with ``return_attention``).
    """
    cfg = self.config
    graph.check_shapes()
    geometry = edge_geometry(graph, cfg)
    system = self.system_embedding(graph)
    system = None if system is None else system[graph.graph_index]
    x = self.edge_degree(graph, geometry)
    attention = []
    for block in self.blocks:
      x, alpha = block(x, system, graph, geometry, graph.periodic, return_attention)
      attention.append(alpha)
    x = self.final_norm(x)
    h = x[:, 0, :]
    for layer in self.energy_head[:-1]:
      h = jax.nn.silu(layer(h))
    atom_energy = self.energy_head[-1](h)[:, 0] + self.element_energy[...][graph.numbers]
    out = {"atom_energy": jnp.where(graph.atom_mask, atom_energy, 0.0), "features": x}
    if cfg.forces == "direct":
      out["direct_forces"] = jnp.where(graph.atom_mask[:, None], self.force_head(x[:, 1:4, :])[..., 0], 0.0)
    if return_attention:
      out["attention"] = attention
    return out
