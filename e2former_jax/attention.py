"""E2Former-V2 attention with the first-order equivariant message (docs/model.md §9, §10).

Implementations of the same message with the same parameters (``ModelConfig.attention_impl``):
  * "jnp_node", "jnp_dense", "pallas" (and "auto"): the node-centric split
    M_i = (sum_j beta_ij v_j) (x) p_i - sum_j beta_ij (v_j (x) p_j), both products per node with EAAS, the
    aggregation by the attention op of ``pallas_kernels`` (one entry point, ``pallas_kernels.node_attention``);
  * "jnp_edge": per-edge SO(2) alignment, sum_j beta_ij (v_j (x) r_ij) with EAAS in each edge's frame
    (the "standard implementation", ``edge_aligned_message``).

The zero-order attention of the authors' ``main`` branch (``attn_type: zero-order``, and every long-range block)
sends M_i = sum_j alpha_ij rho_ij v_j (no vector product, no 1/|r_ij|) through the same op.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from e2former_jax import eaas, so3
from e2former_jax.chunking import over_atom_chunks_of, over_atom_chunks_of_sources
from e2former_jax.config import ModelConfig
from e2former_jax.gate import make_gate
from e2former_jax.geometry import EdgeGeometry
from e2former_jax.layers import Dense, EdgeFeatures, Embedding, SO3Linear, kaiming_uniform, matmul, side_by_side
from e2former_jax.norms import LayerNorm
from pallas_kernels.api import node_attention, resolve_implementation
from pallas_kernels.jnp_node import attention_logits, attention_weights, per_channel


def node_centric_message(
  agg: jax.Array, positions: jax.Array, lmax: int, agg_shift: jax.Array | None = None
) -> jax.Array:
  """M_i = (sum_j beta_ij v_j) (x) p_i - sum_j beta_ij (v_j (x) p_j) - sum_j beta_ij (v_j (x) s_ij).

  Args:
    agg: [N, R + rows, C] aggregate of the rows [v (x) p; v] (R = EAAS output rows).
    positions: [N, 3] target positions p_i.
    lmax: maximum degree.
    agg_shift: optional [N, 3, rows, C] aggregate of v weighted by the image offsets s_ij (periodic cells).
  Returns:
    [N, R, C] = sum_j beta_ij (v_j (x) r_ij) with r_ij = p_i - p_j - s_ij.
  """
  num_products = eaas.eaas_table(lmax).num_output_rows
  message = eaas.vector_product(agg[:, num_products:], positions, lmax) - agg[:, :num_products]
  if agg_shift is not None:
    message = message - eaas.axis_weighted_product(agg_shift, lmax)
  return message


def edge_aligned_message(
  v: jax.Array, beta: jax.Array, neighbors: jax.Array, vectors: jax.Array, lmax: int
) -> jax.Array:
  """sum_j beta_ij (v_j (x) r_ij) with EAAS in each edge's own frame (the "standard implementation").

  Shapes: v [N, rows, C], beta [N, K, C], neighbors [N, K], vectors [N, K, 3] -> [N, R, C].
  """
  per_edge = eaas.vector_product(v[neighbors], vectors, lmax)  # [N, K, R, C]
  return jnp.einsum("nkc,nkrc->nrc", beta, per_edge, precision=jax.lax.Precision.HIGHEST)


class QueryKey(nnx.Module):
  """Rotation-invariant queries or keys from bilinear invariants (``SO3_Linear2Scalar_e2former``).

  s_l = sum_m A_(l,m) * B_(l,m) for A, B two SO3 linear maps of y; q = MLP([s_0; ...; s_L]) -> [H, d].
  ``E2Attention.node_inputs`` applies A and B together with the other maps of y (``layers.side_by_side``) and
  hands them to ``from_projections``.
  """

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    kw = dict(precision=cfg.matmul_precision, dtype=dtype, rngs=rngs)
    self.left = SO3Linear(cfg.lmax, cfg.channels, cfg.qk_hidden, **kw)
    self.right = SO3Linear(cfg.lmax, cfg.channels, cfg.qk_hidden, use_bias=False, **kw)
    self.mix = Dense((cfg.lmax + 1) * cfg.qk_hidden, cfg.qk_hidden, **kw)
    self.norm = LayerNorm(cfg.qk_hidden, dtype=dtype)
    self.out = Dense(cfg.qk_hidden, cfg.num_heads * cfg.head_dim, **kw)
    self.lmax, self.num_heads, self.head_dim = cfg.lmax, cfg.num_heads, cfg.head_dim

  def from_projections(self, left: jax.Array, right: jax.Array) -> jax.Array:
    """The query (or key) from A = ``left(y)`` and B = ``right(y)``, both [N, rows, qk_hidden] -> [N, H, d]."""
    prod = left * right
    invariants = [jnp.sum(prod[..., l * l : (l + 1) ** 2, :], axis=-2) for l in range(self.lmax + 1)]
    h = jax.nn.silu(self.norm(self.mix(jnp.concatenate(invariants, axis=-1))))
    return self.out(h).reshape(left.shape[:-2] + (self.num_heads, self.head_dim))


class PathLinear(nnx.Module):
  """Mixes the EAAS paths ending in the same degree l3: Linear(cnt*C -> C_out) / sqrt(cnt), path-major."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    self.table = eaas.eaas_table(cfg.lmax)
    self.kernels = nnx.List(
      [
        nnx.Param(
          kaiming_uniform(rngs.params(), (len(self.table.rows_of_degree(l3)) * cfg.channels, cfg.channels), dtype)
        )
        for l3 in range(cfg.lmax + 1)
      ]
    )
    self.lmax, self.precision = cfg.lmax, cfg.matmul_precision

  def __call__(self, message: jax.Array) -> jax.Array:
    out = []
    for l3 in range(self.lmax + 1):
      paths = self.table.rows_of_degree(l3)
      stacked = jnp.concatenate([so3.rows_at(message, rows) for rows in paths], axis=-1)  # [..., 2l3+1, cnt*C]
      out.append(matmul(stacked, self.kernels[l3][...], self.precision) / jnp.sqrt(len(paths)))
    return jnp.concatenate(out, axis=-2)


E2FORMERV2_DISTANCE_EPSILON = 1e-8  # the e2formerv2 branch scales by 1/(|r_ij| + 1e-8)


@dataclasses.dataclass(frozen=True)
class ShiftSlots:
  """Slots whose logits enter only the softmax shift (the ``e2formerv2`` branch's beyond-cutoff slots).

  Attributes:
    neighbors: [N, S] source atoms.
    geometry: their ``EdgeGeometry``; ``valid`` [N, S] marks the slots that take part in the max.
  """

  neighbors: jax.Array
  geometry: EdgeGeometry


class E2Attention(nnx.Module):
  """One attention layer: gated invariant logits, softmax over neighbour slots, first- or zero-order message.

  ``order`` "first": M = sum_j beta_ij (v_j (x) r_ij), then ``path_linear`` and ``output``; "zero":
  M = sum_j alpha_ij rho_ij v_j, then ``output`` (the authors' ``proj_zero``).
  """

  def __init__(self, cfg: ModelConfig, *, order: str = "first", dtype, rngs: nnx.Rngs):
    kw = dict(precision=cfg.matmul_precision, dtype=dtype, rngs=rngs)
    c = cfg.channels
    self.target_type = Embedding(cfg.num_species, cfg.type_embed_dim, dtype=dtype, rngs=rngs)
    self.source_type = Embedding(cfg.num_species, cfg.type_embed_dim, dtype=dtype, rngs=rngs)
    self.query = QueryKey(cfg, dtype=dtype, rngs=rngs)
    self.key = QueryKey(cfg, dtype=dtype, rngs=rngs)
    self.gate = make_gate(cfg, dtype=dtype, rngs=rngs)
    self.value = SO3Linear(cfg.lmax, c, c, **kw)
    if order == "first":
      self.path_linear = PathLinear(cfg, dtype=dtype, rngs=rngs)
    elif order != "zero":
      raise ValueError(f"attention order must be 'first' or 'zero', got {order!r}")
    self.output = SO3Linear(cfg.lmax, c, c, **kw)
    self.cfg, self.order = cfg, order

  def gate_and_rho(
    self, y: jax.Array, numbers: jax.Array, neighbors: jax.Array, geometry: EdgeGeometry
  ) -> tuple[jax.Array, jax.Array]:
    """(g, rho), both [N, K, H], of the slots ``neighbors``, from the edge features
    e_ij = [rbf(|r_ij|); T(Z_i); S(Z_j)], in chunks of ``edge_chunk`` target atoms."""

    def per_target(layer, y, target_numbers, neighbors, geometry):
      features = EdgeFeatures.of_slots(
        geometry, layer.target_type, layer.source_type, target_numbers, numbers, neighbors, self.cfg
      )
      return layer.gate(y, features, geometry)

    return over_atom_chunks_of(self, per_target, self.cfg.edge_chunk, y, numbers, neighbors, geometry)

  @property
  def softmax_max(self) -> str:
    """The op's rule for the softmax shift: the ``e2formerv2`` branch shifts by the max over the valid slots,
    its beyond-cutoff slots entering through ``shift_floor``."""
    return "valid" if self.cfg.softmax_max == "e2formerv2" else self.cfg.softmax_max

  def edge_scale(self, rho: jax.Array, distance: jax.Array) -> jax.Array:
    """The factor applied after the softmax, [N, K, H]: rho (zero-order message) or rho / |r_ij| (first order)."""
    if self.order == "zero":
      return rho
    if self.cfg.softmax_max == "e2formerv2":
      return rho / (distance[..., None] + E2FORMERV2_DISTANCE_EPSILON)
    return rho / distance[..., None]

  def node_centric_attention(
    self, y, positions, numbers, q, k, rows, neighbors, geometry, shifts, max_floor, impl, return_attention
  ):
    """The node-centric attention op and the readout of its message, per chunk of ``edge_chunk`` target atoms:
    each chunk's per-edge MLPs, its targets' aggregate and their message's readout are computed together, so no
    [N, K, H] array (gate, rho / |r_ij|, logits, weights, nor their cotangents in the backward pass) and no
    [N, R, C] aggregate exists for all atoms at once. A chunk's op reads the keys and rows (``k``, ``rows``) of its
    distinct sources, gathered (``chunking.over_atom_chunks_of_sources``), so that its share of their cotangents is a
    scatter of those rows, not an [M, ...] array per chunk.

    Shapes: y [N, rows, C], positions [N, 3], q [N, H, d], k [M, H, d], rows [M, R', C], neighbors [N, K],
    shifts [N, K, 3] or None, max_floor [N, H] or None. Returns the attention output [N, rows, C] (and alpha
    [N, K, H] with ``return_attention``).
    """
    cfg = self.cfg

    def per_target(layer, sources, slots, y, positions, target_numbers, q, neighbors, geometry, shifts, max_floor):
      features = EdgeFeatures.of_slots(
        geometry, layer.target_type, layer.source_type, target_numbers, numbers, neighbors, cfg
      )
      gate, rho = layer.gate(y, features, geometry)
      outputs = node_attention(
        q,
        sources[0],
        gate,
        layer.edge_scale(rho, geometry.distance),
        geometry.envelope,
        geometry.valid,
        slots,
        sources[1],
        shifts,
        implementation=impl,
        num_shift_rows=(cfg.lmax + 1) ** 2,
        softmax_max=layer.softmax_max,
        activation=cfg.gate_activation,
        max_floor=max_floor,
        return_weights=return_attention,
      )
      outputs = outputs if isinstance(outputs, tuple) else (outputs,)
      out = layer.node_readout(outputs[0], None if shifts is None else outputs[1], positions)
      return (out, outputs[-1]) if return_attention else out

    per_atom = (y, positions, numbers, q, neighbors, geometry, shifts, max_floor)
    return over_atom_chunks_of_sources(self, per_target, cfg.edge_chunk, (k, rows), neighbors, *per_atom)

  def node_inputs(self, y: jax.Array, positions: jax.Array, node_rows: bool):
    """Per atom: q, k [N, H, d], v [N, rows, C] and, with ``node_rows``, the rows the node-centric op aggregates,
    [v (x) p; v] [N, R + rows, C] for the first-order message or v for the zero-order one (else None)."""
    maps = (self.query.left, self.query.right, self.key.left, self.key.right, self.value)
    query_left, query_right, key_left, key_right, v = side_by_side(maps, y)  # y read once, one wide product
    q, k = self.query.from_projections(query_left, query_right), self.key.from_projections(key_left, key_right)
    if not node_rows:
      return q, k, v, None
    rows = (
      jnp.concatenate([eaas.vector_product(v, positions, self.cfg.lmax), v], axis=-2) if self.order == "first" else v
    )
    return q, k, v, rows

  def readout(self, message: jax.Array) -> jax.Array:
    """[N, R, C] first-order message (path linears, then the output map) or [N, rows, C] zero-order message
    (output map) -> [N, rows, C]."""
    return self.output(self.path_linear(message) if self.order == "first" else message)

  def node_readout(self, agg: jax.Array, agg_shift: jax.Array | None, positions: jax.Array) -> jax.Array:
    """``readout`` of the message assembled from the node-centric op's aggregates (``node_centric_message``)."""
    if self.order == "zero":
      return self.readout(agg)
    return self.readout(node_centric_message(agg, positions, self.cfg.lmax, agg_shift))

  def __call__(
    self,
    y: jax.Array,
    positions: jax.Array,
    numbers: jax.Array,
    neighbors: jax.Array,
    shifts: jax.Array,
    geometry: EdgeGeometry,
    periodic: bool,
    return_attention: bool = False,
    shift_slots: ShiftSlots | None = None,
  ):
    """Attention output [N, rows, C] (and alpha [N, K, H] with ``return_attention``).

    Args:
      y: [N, rows, C] normalised node features.
      positions: [N, 3] centred positions (Angstrom).
      numbers: [N] atomic numbers.
      neighbors: [N, K] source atoms.
      shifts: [N, K, 3] Cartesian image offsets.
      geometry: per-slot geometry.
      periodic: whether any slot crosses a periodic boundary (static).
      return_attention: also return alpha [N, K, H] ("jnp_node" and "jnp_dense" only).
      shift_slots: with ``softmax_max="e2formerv2"``, the slots whose logits enter only the softmax shift.
    """
    cfg = self.cfg
    impl = "jnp_edge" if cfg.attention_impl == "jnp_edge" else resolve_implementation(cfg.attention_impl, y.shape[0])
    if return_attention and impl not in ("jnp_node", "jnp_dense"):
      raise ValueError("return_attention needs attention_impl='jnp_node' or 'jnp_dense'")
    chunk, node_rows = cfg.node_chunk, impl != "jnp_edge"
    q, k, v, rows = over_atom_chunks_of(
      self, lambda layer, y, p: layer.node_inputs(y, p, node_rows), chunk, y, positions
    )
    max_floor = self.shift_floor(y, q, k, numbers, shift_slots)
    first = self.order == "first"
    if impl != "jnp_edge":
      shifts = shifts if periodic and first else None
      return self.node_centric_attention(
        y, positions, numbers, q, k, rows, neighbors, geometry, shifts, max_floor, impl, return_attention
      )
    gate, rho = self.gate_and_rho(y, numbers, neighbors, geometry)
    logits = attention_logits(q, k, gate, neighbors)
    alpha = attention_weights(
      logits, geometry.envelope, geometry.valid, self.softmax_max, cfg.gate_activation, max_floor
    )
    beta = per_channel(alpha * self.edge_scale(rho, geometry.distance), v.shape[-1])
    if first:
      message = edge_aligned_message(v, beta, neighbors, geometry.vectors, cfg.lmax)
    else:
      message = jnp.einsum("nkc,nkrc->nrc", beta, v[neighbors], precision=jax.lax.Precision.HIGHEST)
    out = over_atom_chunks_of(self, E2Attention.readout, chunk, message)
    return (out, alpha) if return_attention else out

  def shift_floor(self, y, q, k, numbers, shift_slots: ShiftSlots | None) -> jax.Array | None:
    """[N, H] max of the logits over ``shift_slots`` (-inf where an atom has none), or None without them."""
    if shift_slots is None:
      return None
    geometry = shift_slots.geometry
    gate, _ = self.gate_and_rho(y, numbers, shift_slots.neighbors, geometry)
    logits = attention_logits(q, k, gate, shift_slots.neighbors)
    return jnp.max(jnp.where(geometry.valid[..., None], logits, -jnp.inf), axis=1)
