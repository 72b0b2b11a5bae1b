"""E2Former-V2 attention with the first-order equivariant message (MODEL.md sections 3.9 and 4).

Three implementations of the same message with the same parameters (``ModelConfig.attention_impl``):
  * "jnp_node": node-centric split M_i = (sum_j beta_ij v_j) (x) p_i - sum_j beta_ij (v_j (x) p_j), both
    products per node with EAAS, the aggregation in plain jnp (``pallas_kernels.node_attention_ref``);
  * "pallas": the same split with the aggregation in the fused Pallas kernel;
  * "jnp_dense": the same split with the sum over slots as dense per-head [N, N] matrix products
    (``dense_node_attention``): quadratic in N, the fastest path on CPU for batches of small molecules;
  * "jnp_edge": per-edge SO(2) alignment, sum_j beta_ij (v_j (x) r_ij) with EAAS in each edge's frame
    (the "standard implementation").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from e2former_jax import eaas, so3
from e2former_jax.config import ModelConfig
from e2former_jax.layers import Dense, Embedding, LayerNorm, RadialProfile, SO3Linear, kaiming_uniform, matmul
from pallas_kernels.node_attention_ref import attention_logits, attention_weights, node_attention_ref, per_channel


@dataclasses.dataclass(frozen=True)
class EdgeGeometry:
  """Per-slot geometry shared by all layers.

  Attributes:
    vectors: [N, K, 3] r_ij = p_i - (p_j + shift), target minus source (Angstrom).
    distance: [N, K] |r_ij| (1 where not valid, so divisions stay finite).
    valid: [N, K] slot holds a neighbour within the cutoff.
    envelope: [N, K] phi(|r_ij|), 0 where not valid.
    rbf: [N, K, num_basis] Gaussian basis of |r_ij|.
  """

  vectors: jax.Array
  distance: jax.Array
  valid: jax.Array
  envelope: jax.Array
  rbf: jax.Array


def degree_contractions(sh: jax.Array, projected: jax.Array, lmax: int) -> jax.Array:
  """t_ij = [sum_m Y_(l,m)(r_ij) P_i,(l,m)] for l = 0..lmax, concatenated.

  Shapes: sh [N, K, rows], projected [N, rows, F] -> [N, K, (lmax+1) F].
  """
  return jnp.concatenate(
    [
      jnp.einsum("nkm,nmc->nkc", sh[..., l * l : (l + 1) ** 2], projected[:, l * l : (l + 1) ** 2])
      for l in range(lmax + 1)
    ],
    axis=-1,
  )


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


DENSE_MAX_ATOMS = 256  # "auto" on CPU uses "jnp_dense" up to this many atom slots, "jnp_node" above


def resolve_attention_impl(impl: str, num_atoms: int) -> str:
  """The attention path ``impl`` names; "auto" is "pallas" on GPU, else "jnp_dense" for at most
  ``DENSE_MAX_ATOMS`` atom slots and "jnp_node" for more."""
  if impl == "auto":
    if jax.default_backend() == "gpu":
      return "pallas"
    return "jnp_dense" if num_atoms <= DENSE_MAX_ATOMS else "jnp_node"
  return impl


def dense_node_attention(
  q,
  k,
  gate,
  edge_scale,
  envelope,
  valid,
  neighbors,
  rows,
  shifts=None,
  *,
  num_shift_rows: int = 0,
  softmax_max: str = "valid",
  return_weights: bool = False,
):
  """``node_attention_ref`` (same arguments and results) with the sum over slots done densely.

  The weights beta_ikh are first summed into per-head matrices B_h[i, j] = sum_k beta_ikh [neighbors_ik = j]
  (a contraction with the one-hot neighbour table, so duplicate sources add up), then
  agg_i,rc = sum_j B_(c mod H)[i, j] rows_jrc is H matrix products [N, N] x [N, R C / H]. No [N, K, R, C]
  gather is formed: on CPU a training step of the ``small`` model is 2.0x faster than with
  ``node_attention_ref`` at 64 atoms and 1.4x at 256 (benchmarks/RESULTS.md), but time and memory grow as
  N^2 H, so it is for small batches only (``DENSE_MAX_ATOMS``).
  """
  alpha = attention_weights(attention_logits(q, k, gate, neighbors), envelope, valid, softmax_max)
  num_atoms, _, num_heads = alpha.shape
  onehot = jax.nn.one_hot(neighbors, num_atoms, dtype=rows.dtype)  # [N, K, N]
  hp = jax.lax.Precision.HIGHEST

  def neighbor_sum(weights, x):  # weights [N, K, H], x [N, R, C] -> [N, R, C]
    per_head = jnp.einsum("ikh,ikj->hij", weights, onehot, precision=hp)
    split = x.reshape(*x.shape[:-1], -1, num_heads)  # channel c = t H + h: head c mod H, as in per_channel
    return jnp.einsum("hij,jrth->irth", per_head, split, precision=hp).reshape(x.shape)

  beta = alpha * edge_scale
  outputs = [neighbor_sum(beta, rows)]
  if shifts is not None:
    tail = rows[:, rows.shape[1] - num_shift_rows :]
    outputs.append(jnp.stack([neighbor_sum(beta * shifts[..., a, None], tail) for a in range(3)], axis=1))
  if return_weights:
    outputs.append(alpha)
  return outputs[0] if len(outputs) == 1 else tuple(outputs)


class QueryKey(nnx.Module):
  """Rotation-invariant queries or keys from bilinear invariants (``SO3_Linear2Scalar_e2former``).

  s_l = sum_m A_(l,m) * B_(l,m) for A, B two SO3 linear maps of y; q = MLP([s_0; ...; s_L]) -> [H, d].
  """

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    kw = dict(precision=cfg.matmul_precision, dtype=dtype, rngs=rngs)
    self.left = SO3Linear(cfg.lmax, cfg.channels, cfg.qk_hidden, **kw)
    self.right = SO3Linear(cfg.lmax, cfg.channels, cfg.qk_hidden, use_bias=False, **kw)
    self.mix = Dense((cfg.lmax + 1) * cfg.qk_hidden, cfg.qk_hidden, **kw)
    self.norm = LayerNorm(cfg.qk_hidden, dtype=dtype)
    self.out = Dense(cfg.qk_hidden, cfg.num_heads * cfg.head_dim, **kw)
    self.lmax, self.num_heads, self.head_dim = cfg.lmax, cfg.num_heads, cfg.head_dim

  def __call__(self, y: jax.Array) -> jax.Array:
    prod = self.left(y) * self.right(y)
    invariants = [jnp.sum(prod[..., l * l : (l + 1) ** 2, :], axis=-2) for l in range(self.lmax + 1)]
    h = jax.nn.silu(self.norm(self.mix(jnp.concatenate(invariants, axis=-1))))
    return self.out(h).reshape(y.shape[:-2] + (self.num_heads, self.head_dim))


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
      stacked = jnp.concatenate([message[..., rows, :] for rows in paths], axis=-1)  # [..., 2l3+1, cnt*C]
      out.append(matmul(stacked, self.kernels[l3][...], self.precision) / jnp.sqrt(len(paths)))
    return jnp.concatenate(out, axis=-2)


class E2Attention(nnx.Module):
  """One attention layer: gated invariant logits, softmax over neighbour slots, first-order message."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    kw = dict(precision=cfg.matmul_precision, dtype=dtype, rngs=rngs)
    c, h, hidden = cfg.channels, cfg.num_heads, cfg.radial_hidden
    edge_in = cfg.num_basis + 2 * cfg.type_embed_dim
    self.target_type = Embedding(cfg.num_species, cfg.type_embed_dim, dtype=dtype, rngs=rngs)
    self.source_type = Embedding(cfg.num_species, cfg.type_embed_dim, dtype=dtype, rngs=rngs)
    self.query = QueryKey(cfg, dtype=dtype, rngs=rngs)
    self.key = QueryKey(cfg, dtype=dtype, rngs=rngs)
    if cfg.gate == "QK_alpha":
      self.edge_mlp = RadialProfile((edge_in, hidden, hidden, 2 * h), **kw)
    elif cfg.gate == "QKdotS_alpha":
      self.edge_mlp = RadialProfile((edge_in, hidden, hidden, 2 * h), **kw)
      self.direction_proj = SO3Linear(cfg.lmax, c, h // (cfg.lmax + 1) + 1, **kw)
      self.direction_mlp = RadialProfile((h, h, h), **kw)
    else:  # QKdot_alpha
      self.direction_proj = SO3Linear(cfg.lmax, c, c, **kw)
      self.edge_mlp = RadialProfile((edge_in, hidden, hidden, (cfg.lmax + 1) * c), **kw)
      self.direction_gate = Dense((cfg.lmax + 1) * c, h, **kw)
      self.rho_mlp = RadialProfile((edge_in, hidden, hidden, h), **kw)
    self.value = SO3Linear(cfg.lmax, c, c, **kw)
    self.path_linear = PathLinear(cfg, dtype=dtype, rngs=rngs)
    self.output = SO3Linear(cfg.lmax, c, c, **kw)
    self.cfg = cfg

  def gate_and_rho(
    self, y: jax.Array, numbers: jax.Array, neighbors: jax.Array, geometry: EdgeGeometry
  ) -> tuple[jax.Array, jax.Array]:
    """Per-edge logit gate g and post-softmax factor rho, both [N, K, H]."""
    cfg = self.cfg
    target = jnp.broadcast_to(self.target_type(numbers)[:, None], (*neighbors.shape, cfg.type_embed_dim))
    edge_features = jnp.concatenate([geometry.rbf, target, self.source_type(numbers[neighbors])], axis=-1)
    h = cfg.num_heads
    if cfg.gate == "QK_alpha":
      out = self.edge_mlp(edge_features)
      return out[..., :h], out[..., h:]
    if cfg.gate == "QKdotS_alpha":
      out = self.edge_mlp(edge_features)
      rho, e = out[..., :h], out[..., h:]
      sh = so3.spherical_harmonics(geometry.vectors, cfg.lmax, "component", normalize=False)  # [N, K, rows]
      t = degree_contractions(sh, self.direction_proj(y), cfg.lmax)[..., :h]
      return self.direction_mlp(t * e), rho
    sh = so3.spherical_harmonics(geometry.vectors, cfg.lmax, "integral")
    t = degree_contractions(sh, self.direction_proj(y), cfg.lmax)
    return self.direction_gate(t * self.edge_mlp(edge_features)), self.rho_mlp(edge_features)

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
    """
    cfg = self.cfg
    impl = resolve_attention_impl(cfg.attention_impl, y.shape[0])
    if return_attention and impl not in ("jnp_node", "jnp_dense"):
      raise ValueError("return_attention needs attention_impl='jnp_node' or 'jnp_dense'")
    gate, rho = self.gate_and_rho(y, numbers, neighbors, geometry)
    edge_scale = rho / geometry.distance[..., None]
    q, k, v = self.query(y), self.key(y), self.value(y)
    alpha = None
    if impl == "jnp_edge":
      alpha = attention_weights(
        attention_logits(q, k, gate, neighbors), geometry.envelope, geometry.valid, cfg.softmax_max
      )
      message = edge_aligned_message(
        v, per_channel(alpha * edge_scale, v.shape[-1]), neighbors, geometry.vectors, cfg.lmax
      )
    else:
      rows = jnp.concatenate([eaas.vector_product(v, positions, cfg.lmax), v], axis=-2)  # [v (x) p; v]
      args = (q, k, gate, edge_scale, geometry.envelope, geometry.valid, neighbors, rows)
      kwargs = dict(shifts=shifts if periodic else None, num_shift_rows=v.shape[-2], softmax_max=cfg.softmax_max)
      if impl == "pallas":
        from pallas_kernels.node_attention import node_attention

        outputs = node_attention(*args, **kwargs)
      elif impl == "jnp_dense":
        outputs = dense_node_attention(*args, **kwargs, return_weights=return_attention)
      else:
        outputs = node_attention_ref(*args, **kwargs, return_weights=return_attention)
      outputs = outputs if isinstance(outputs, tuple) else (outputs,)
      message = node_centric_message(outputs[0], positions, cfg.lmax, outputs[1] if periodic else None)
      alpha = outputs[-1] if return_attention else None
    out = self.output(self.path_linear(message))
    return (out, alpha) if return_attention else out
