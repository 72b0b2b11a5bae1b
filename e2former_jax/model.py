"""The E2Former-V2 network (docs/model.md): edge-degree embedding, transformer blocks, optional long-range
blocks, and the energy and force heads (``heads.py``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from e2former_jax import so3
from e2former_jax.attention import E2Attention, ShiftSlots
from e2former_jax.chunking import over_atom_chunks_of
from e2former_jax.config import ModelConfig
from e2former_jax.geometry import EdgeGeometry, edge_geometry
from e2former_jax.graph import AtomGraph
from e2former_jax.heads import ElementEnergy, OutputHead, atomic_energy, energy_mlp, make_force_head
from e2former_jax.layers import Dense, EdgeFeatures, Embedding, GatedFeedForward, RadialProfile, SO3Linear
from e2former_jax.norms import RMSNormSH
from e2former_jax.slot_sets import e2formerv2_shift_slots, long_range_slots

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

    def per_target(layer, target_numbers, neighbors, geometry):
      features = EdgeFeatures.of_slots(
        geometry, layer.target_type, layer.source_type, target_numbers, graph.numbers, neighbors, cfg
      )
      sh = so3.spherical_harmonics(geometry.vectors, cfg.lmax, "component") * geometry.envelope[..., None]
      # per degree, the sum over the K slots of [2l+1] x [h_r] outer products with each profile's last Linear
      # after it, per atom (RadialProfile.weighted_sum; elementwise in true float32: as matrix products, a batch
      # of [2l+1, K] x [K, h_r] products per atom, which a GPU runs far below its rate)
      out = [radial.weighted_sum(features, sh[..., l * l : (l + 1) ** 2]) for l, radial in enumerate(layer.radial)]
      return jnp.concatenate(out, axis=-2)

    x = over_atom_chunks_of(self, per_target, cfg.edge_chunk, graph.numbers, graph.neighbors, geometry)
    return x / cfg.avg_degree


def _residual_feed_forward(block: TransformerBlock, x: jax.Array, attention: jax.Array) -> jax.Array:
  """x' = x + attention; x' + FFN(RMSNorm(x')), per atom."""
  x = x + attention
  return x + block.ffn(block.norm_ffn(x))


class TransformerBlock(nnx.Module):
  """x + Attention(RMSNorm(x) + s_b on l=0); then x + FFN(RMSNorm(x)). ``order``: the attention's message.

  The FFN and both residual sums run over chunks of ``node_chunk`` atoms (``chunking.py``).
  """

  def __init__(self, cfg: ModelConfig, *, order: str = "first", dtype, rngs: nnx.Rngs):
    self.norm_attention = RMSNormSH(cfg.lmax, cfg.channels, dtype=dtype)
    self.attention = E2Attention(cfg, order=order, dtype=dtype, rngs=rngs)
    self.norm_ffn = RMSNormSH(cfg.lmax, cfg.channels, dtype=dtype)
    self.ffn = GatedFeedForward(cfg.lmax, cfg.channels, precision=cfg.matmul_precision, dtype=dtype, rngs=rngs)

  def __call__(
    self,
    x,
    system_embedding,
    graph: AtomGraph,
    geometry: EdgeGeometry,
    periodic: bool,
    return_attention: bool = False,
    shift_slots: ShiftSlots | None = None,
  ):
    y = self.norm_attention(x)
    if system_embedding is not None:
      y = y.at[:, 0, :].add(system_embedding)
    attention = self.attention(
      y,
      graph.positions,
      graph.numbers,
      graph.neighbors,
      graph.neighbor_shift,
      geometry,
      periodic,
      return_attention,
      shift_slots,
    )
    attention, alpha = attention if return_attention else (attention, None)
    return over_atom_chunks_of(self, _residual_feed_forward, self.attention.cfg.node_chunk, x, attention), alpha


def _block(block: TransformerBlock, x, system, graph: AtomGraph, geometry, return_attention, shift_slots):
  return block(x, system, graph, geometry, graph.periodic, return_attention, shift_slots)


def _rematerialised_block(
  block: TransformerBlock, x, system, graph: AtomGraph, geometry, return_attention, shift_slots
):
  """``_block`` under ``jax.checkpoint``: the backward pass recomputes the block from its parameters and its input
  ``x`` (the geometry, shared by all blocks, is closed over and kept). The block is split into a pure function of
  its state, so nothing is written back to the module from inside the checkpoint."""
  graphdef, state = nnx.split(block)

  def run(state, x):
    return _block(nnx.merge(graphdef, state), x, system, graph, geometry, False, shift_slots)[0]

  return jax.checkpoint(run)(state, x), None


class LongRangeBlocks(nnx.Module):
  """The authors' long-range blocks (``with_cluster='node'``), after the short-range blocks:

  y = RMSNorm_pre(x); y = zero-order TransformerBlocks on the long-range list (``slot_sets.long_range_slots``);
  out = SO3Linear_(2C -> C)([x; RMSNorm(y)]) (channels concatenated, short first). The output replaces the
  final norm.
  """

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    c = cfg.channels
    self.pre_norm = RMSNormSH(cfg.lmax, c, dtype=dtype)
    self.blocks = nnx.List(
      [TransformerBlock(cfg, order="zero", dtype=dtype, rngs=rngs) for _ in range(cfg.long_range_layers)]
    )
    self.norm = RMSNormSH(cfg.lmax, c, dtype=dtype)
    self.mix = SO3Linear(cfg.lmax, 2 * c, c, precision=cfg.matmul_precision, dtype=dtype, rngs=rngs)
    self.cfg = cfg

  def __call__(self, x, system_embedding, graph: AtomGraph, stages: dict | None = None) -> jax.Array:
    neighbors, geometry = long_range_slots(graph, self.cfg)
    long_graph = graph.replace(
      neighbors=neighbors,
      neighbor_mask=geometry.valid,
      neighbor_shift=jnp.zeros((*neighbors.shape, 3), graph.positions.dtype),
    )
    y = self.pre_norm(x)
    for i, block in enumerate(self.blocks):
      y, _ = block(y, system_embedding, long_graph, geometry, False)
      if stages is not None:
        stages[f"long_block_{i}"] = y
    return self.mix(jnp.concatenate([x, self.norm(y)], axis=-1))


class E2Former(nnx.Module):
  """E2Former-V2: edge-degree embedding, transformer blocks, final norm (or long-range blocks), output heads.

  Call ``model(graph)`` for per-atom energies [N] and node features [N, (L+1)^2, C]; ``predict`` gives
  energies, forces and stress. Each head (``config.heads``; the first is the default) has an energy MLP, a direct
  force head when ``config.forces == "direct"``, and a table of per-element reference energies (eV, zero until
  set with ``set_element_energies``), so predictions are total energies.
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
    orders = [cfg.attention_orders[0 if i < cfg.num_layers // 2 else 1] for i in range(cfg.num_layers)]
    self.blocks = nnx.List([TransformerBlock(cfg, order=order, dtype=dtype, rngs=rngs) for order in orders])
    if cfg.long_range_layers:
      self.long_range = LongRangeBlocks(cfg, dtype=dtype, rngs=rngs)
    else:
      self.final_norm = RMSNormSH(cfg.lmax, c, dtype=dtype)
    self.energy_head = energy_mlp(cfg, dtype=dtype, rngs=rngs)
    if cfg.forces == "direct":
      self.force_head = make_force_head(cfg, dtype=dtype, rngs=rngs)
    self.element_energy = ElementEnergy(jnp.zeros((cfg.num_species,), dtype))
    if len(cfg.heads) > 1:
      self.extra_heads = nnx.Dict({name: OutputHead(cfg, dtype=dtype, rngs=rngs) for name in cfg.heads[1:]})
    self.config = cfg

  def head(self, name: str | None = None) -> nnx.Module:
    """The module holding head ``name``'s ``energy_head``, ``force_head`` and ``element_energy`` (None: the
    default head, ``config.heads[0]``)."""
    heads = self.config.heads
    if name is None or name == heads[0]:
      return self
    if name not in heads:
      raise ValueError(f"unknown head {name!r}; this model's heads: {list(heads)} (the first is the default)")
    return self.extra_heads[name]

  def with_default_head(self, name: str) -> E2Former:
    """The same model with head ``name`` first in ``config.heads`` (the default of ``predict``, the calculator,
    MD and training); parameters and element energies move with their heads. ``self`` when it already is."""
    heads = self.config.heads
    self.head(name)
    if name == heads[0]:
      return self
    order = (name, *[h for h in heads if h != name])
    model = E2Former(self.config.replace(heads=order), rngs=nnx.Rngs(0))
    source, state = nnx.to_pure_dict(nnx.state(self, nnx.Param)), nnx.state(model, nnx.Param)
    target = nnx.to_pure_dict(state)
    parts = ("energy_head", "force_head")
    for key in target:
      if key not in (*parts, "extra_heads"):
        target[key] = source[key]
    for head in heads:
      old = source if head == heads[0] else source["extra_heads"][head]
      new = target if head == order[0] else target["extra_heads"][head]
      for part in parts:
        if part in old:
          new[part] = old[part]
      model.head(head).element_energy[...] = self.head(head).element_energy[...]
    nnx.replace_by_pure_dict(state, target)
    nnx.update(model, state)
    if hasattr(self, "head_elements"):
      model.head_elements = dict(self.head_elements)
    return model

  def set_element_energies(self, energies: dict[int, float], head: str | None = None) -> None:
    """Sets head ``head``'s reference energy (eV) of each atomic number in ``energies``; others stay unchanged."""
    variable = self.head(head).element_energy
    table = variable[...]
    for z, e in energies.items():
      if not 0 < int(z) < self.config.num_species:
        raise ValueError(f"atomic number {z} outside 1..{self.config.num_species - 1}")
      table = table.at[int(z)].set(float(e))
    variable[...] = table

  def system_embedding(self, graph: AtomGraph) -> jax.Array | None:
    """s_b = SiLU(W [E_q(clip(q) + 10); E_S(clip(S))]) per structure, [G, C]."""
    if not self.config.use_charge_spin:
      return None
    spin = graph.spin if self.config.spin_input == "multiplicity" else jnp.zeros_like(graph.spin)
    charge = self.charge_embedding(jnp.clip(graph.charge, -MAX_ABS_CHARGE, MAX_ABS_CHARGE) + MAX_ABS_CHARGE)
    spin = self.spin_embedding(jnp.clip(spin, 0, MAX_SPIN_INDEX))
    return jax.nn.silu(self.system_mix(jnp.concatenate([charge, spin], axis=-1)))

  def __call__(
    self, graph: AtomGraph, return_attention: bool = False, head: str | None = None, return_stages: bool = False
  ) -> dict:
    """Per-atom outputs of head ``head`` (None: the default head).

    Returns a dict with "atom_energy" [N] (eV, 0 for padding), "atom_energy_above_reference" [N] (the same
    without the head's element reference energy, eV), "features" [N, (L+1)^2, C] (the backbone
    output: after the final norm, or the long-range blocks' output), "direct_forces" [N, 3] (eV/A, direct
    heads only), "attention" (list of [N, K, H] per short-range layer, with ``return_attention``) and "stages"
    (with ``return_stages``: node features after the edge-degree embedding, each block and at the end, keys
    "edge_degree", "block_<i>", "long_block_<i>", "final").
    """
    cfg = self.config
    graph.check_shapes()
    parts = self.head(head)
    geometry = edge_geometry(graph, cfg)
    shift_slots = e2formerv2_shift_slots(graph, geometry, cfg) if cfg.softmax_max == "e2formerv2" else None
    system = self.system_embedding(graph)
    system = None if system is None else system[graph.graph_index]
    x = self.edge_degree(graph, geometry)
    stages = {"edge_degree": x} if return_stages else None
    attention = []
    run_block = _rematerialised_block if cfg.remat and not return_attention else _block
    for i, block in enumerate(self.blocks):
      x, alpha = run_block(block, x, system, graph, geometry, return_attention, shift_slots)
      attention.append(alpha)
      if return_stages:
        stages[f"block_{i}"] = x
    if cfg.long_range_layers:
      x = self.long_range(x, system, graph, stages)
    else:
      x = self.final_norm(x)
    above_reference = atomic_energy(parts.energy_head, x[:, 0, :])
    atom_energy = above_reference + parts.element_energy[...][graph.numbers]
    out = {
      "atom_energy": jnp.where(graph.atom_mask, atom_energy, 0.0),
      "atom_energy_above_reference": jnp.where(graph.atom_mask, above_reference, 0.0),
      "features": x,
    }
    if cfg.forces == "direct":
      out["direct_forces"] = jnp.where(graph.atom_mask[:, None], parts.force_head(x), 0.0)
    if return_attention:
      out["attention"] = attention
    if return_stages:
      stages["final"] = x
      out["stages"] = stages
    return out
