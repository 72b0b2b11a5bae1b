"""Model configuration: one dataclass and the named presets.

Every field has the meaning of the authors' code (docs/authors_checkpoints.md §4); the presets are the runs of
docs/model.md §14.3 plus ``small`` for CPU training. ``ModelConfig`` is frozen and hashable, so it can be a
static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from pallas_kernels.gate_jnp import MATMUL_PRECISIONS

GATES = ("QK_alpha", "QKdot_alpha", "QKdotS_alpha")
GATE_ACTIVATIONS = ("softmax", "softplus", "sigmoid")
SOFTMAX_MAX = ("valid", "all_slots", "e2formerv2")
ENVELOPES = ("e2formerv2", "main")
ATTENTION_ORDERS = ("first", "zero")
FORCE_HEADS = ("linear", "painn")
ATTENTION_IMPLS = ("auto", "pallas", "jnp_node", "jnp_dense", "jnp_edge")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of E2Former-V2.

  Attributes:
    cutoff: neighbour cutoff radius r_c in Angstrom.
    max_neighbors: K, the number of neighbour slots per atom (the K nearest within the cutoff).
    lmax: maximum degree L of the spherical features (rows (L+1)^2).
    channels: C, channels per degree.
    num_layers: number of transformer blocks.
    num_heads: H, attention heads; head h owns channels {c : c mod H == h}.
    head_dim: d, size of the invariant query/key per head.
    qk_hidden: width of the bilinear-invariant query/key projections (512 in the paper).
    type_embed_dim: width of the per-layer target/source atom-type embeddings (128 in the paper).
    num_basis: number of Gaussian radial basis functions.
    basis_width: Gaussian width in units of the basis spacing.
    radial_hidden: hidden width of every radial MLP (RadialProfile).
    avg_degree: normaliser of the edge-degree embedding sum.
    gate: query/key logit gate, one of ``GATES``.
    gate_activation: "softmax" (normalised over the neighbour slots), or "softplus" / "sigmoid" (the authors'
      ``main`` variants: alpha = act(logit) * rho * phi, no normalisation).
    softmax_max: the shift m of the softmax (it matters through the +1e-3 of the denominator): "valid" (max
      over in-cutoff slots, the authors' ``main`` branch), "all_slots" (max over every one of this model's K
      slots, empty ones included), or "e2formerv2" (that branch exactly: max over its slot set, the
      min(N, K, largest in-cutoff count) nearest atoms of the structure, beyond-cutoff ones included, and
      beta = alpha / (d + 1e-8); molecules only). docs/authors_checkpoints.md section 3.
    envelope: cutoff envelope phi(t), t = d / cutoff: "e2formerv2" (1 - 10 t^3 + 15 t^4 - 6 t^5, clamped at 0)
      or "main" (1 - 21 t^5 + 35 t^6 - 15 t^7 for t < 1, else 0; the released checkpoints').
    attention_orders: the attention of the first num_layers // 2 blocks and of the others: "first" (the
      first-order equivariant message) or "zero" (sum_j beta_ij v_j, the authors' ``zero-order``).
    forces: "direct" (a force head on the l=1 features) or "conservative" (-dE/dx by ``jax.grad``).
    force_head: the direct force head: "linear" (one linear map of the l=1 features) or "painn" (two gated
      equivariant blocks, the authors' ``with_moe=painn``).
    heads: names of the energy (and direct force) heads; the first is the default. One head keeps the
      parameter names ``energy_head``/``force_head``; the others live under ``extra_heads/<name>/``.
    long_range_layers: zero-order attention blocks on a second neighbour list after the short-range blocks
      (the authors' ``with_cluster='node'``); 0 = none. Molecules only.
    long_range_cutoff, long_range_min_distance: the second list's distance window (Angstrom).
    long_range_max_neighbors: its slots per atom (the authors' int(2.5 max_neighbors)).
    use_charge_spin: add the charge/multiplicity embedding to the l=0 row after each block's first norm.
    spin_input: "multiplicity" feeds the multiplicity 2S+1 to the spin embedding; "zero" always feeds 0
      (what the authors' SPICE runs do, since SPICE has no spin field).
    num_species: rows of the atom-type embeddings (atomic numbers must be below it).
    edge_degree_species: rows of the edge-degree embedding tables (300 in the authors' code).
    dtype: "float32" or "float64" (float64 needs ``jax_enable_x64``).
    attention_impl: "auto" (= "pallas" on GPU; elsewhere "jnp_dense" for batches of at most 256 atom slots,
      "jnp_node" above), "pallas", "jnp_node", "jnp_dense", "jnp_edge" (``e2former_jax.attention``).
    matmul_precision: precision of the dense matrix products: "highest" (true float32), "tensorfloat32"
      or "bfloat16".
    remat: rematerialise each transformer block in the backward pass (``nnx.remat``): reverse mode keeps only
      the blocks' inputs and recomputes one block at a time, so the peak memory of forces (and of a training
      step) holds one block's per-edge activations instead of every block's, for about one more forward pass.
      Off by default; it changes no result beyond float32 round-off.
    edge_chunk: target atoms per chunk of the per-edge work (``chunking.py``): the edge-degree embedding, and in
      each block the gate and rho MLPs together with the attention op on those targets and the readout of its
      message (message, path linears, output map), so their [N, K, hidden] temporaries, the op's [N, K, H] gate,
      weights and cotangents and its [N, R, C] aggregate exist for one chunk at a time and the backward pass
      recomputes them per chunk; each chunk reads the keys and rows of its distinct sources only, so the work
      per atom does not grow with N. 0 (default) computes all atoms at once. Changes no result beyond
      float32 round-off.
    node_chunk: atoms per chunk of each block's node-level maps (queries, keys, values and the EAAS rows before
      the attention op; the FFN and residual sums after it, and with ``attention_impl="jnp_edge"`` the message's
      readout too): their
      [N, rows, width] temporaries exist for one chunk at a time, and with ``remat`` a block's backward pass
      holds one chunk's of them. 0 (default) computes all atoms at once. Changes no result beyond float32
      round-off. With ``remat`` and both chunk fields at 4,096, conservative forces of the paper model need
      about 0.17 MiB per atom on a GPU, energy and direct forces 0.07 (a million atoms in 71 GiB;
      docs/performance.md §5a).
  """

  cutoff: float = 5.0
  max_neighbors: int = 32
  lmax: int = 2
  channels: int = 256
  num_layers: int = 4
  num_heads: int = 128
  head_dim: int = 8
  qk_hidden: int = 512
  type_embed_dim: int = 128
  num_basis: int = 256
  basis_width: float = 2.0
  radial_hidden: int = 128
  avg_degree: float = 23.01
  gate: Literal["QK_alpha", "QKdot_alpha", "QKdotS_alpha"] = "QK_alpha"
  gate_activation: Literal["softmax", "softplus", "sigmoid"] = "softmax"
  softmax_max: Literal["valid", "all_slots", "e2formerv2"] = "valid"
  envelope: Literal["e2formerv2", "main"] = "e2formerv2"
  attention_orders: tuple[str, str] = ("first", "first")
  forces: Literal["direct", "conservative"] = "conservative"
  force_head: Literal["linear", "painn"] = "linear"
  heads: tuple[str, ...] = ("default",)
  long_range_layers: int = 0
  long_range_cutoff: float = 12.0
  long_range_min_distance: float = 0.1
  long_range_max_neighbors: int = 80
  use_charge_spin: bool = True
  spin_input: Literal["multiplicity", "zero"] = "multiplicity"
  num_species: int = 256
  edge_degree_species: int = 300
  dtype: Literal["float32", "float64"] = "float32"
  attention_impl: Literal["auto", "pallas", "jnp_node", "jnp_dense", "jnp_edge"] = "auto"
  matmul_precision: Literal["highest", "tensorfloat32", "bfloat16"] = "highest"
  remat: bool = False
  edge_chunk: int = 0
  node_chunk: int = 0

  def __post_init__(self):
    for name in ("attention_orders", "heads"):  # JSON and YAML give lists; the config must stay hashable
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if self.gate not in GATES:
      raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
    if self.gate_activation not in GATE_ACTIVATIONS:
      raise ValueError(f"gate_activation must be one of {GATE_ACTIVATIONS}, got {self.gate_activation!r}")
    if self.envelope not in ENVELOPES:
      raise ValueError(f"envelope must be one of {ENVELOPES}, got {self.envelope!r}")
    if len(self.attention_orders) != 2 or not set(self.attention_orders) <= set(ATTENTION_ORDERS):
      raise ValueError(
        f"attention_orders must be two of {ATTENTION_ORDERS} (first and second half of the blocks), "
        f"got {self.attention_orders!r}"
      )
    if self.force_head not in FORCE_HEADS:
      raise ValueError(f"force_head must be one of {FORCE_HEADS}, got {self.force_head!r}")
    if (
      not self.heads
      or len(set(self.heads)) != len(self.heads)
      or not all(isinstance(h, str) and h and "/" not in h for h in self.heads)
    ):
      raise ValueError(f"heads must be distinct non-empty names without '/', got {self.heads!r}")
    if self.long_range_layers < 0 or self.long_range_max_neighbors < 1:
      raise ValueError("long_range_layers must be >= 0 and long_range_max_neighbors >= 1")
    if not 0 <= self.long_range_min_distance < self.long_range_cutoff:
      raise ValueError(
        f"need 0 <= long_range_min_distance < long_range_cutoff, got {self.long_range_min_distance} and "
        f"{self.long_range_cutoff}"
      )
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
    if self.matmul_precision not in MATMUL_PRECISIONS:
      raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {self.matmul_precision!r}")
    if self.softmax_max not in SOFTMAX_MAX:
      raise ValueError(f"softmax_max must be one of {SOFTMAX_MAX}, got {self.softmax_max!r}")
    if self.forces not in ("direct", "conservative"):
      raise ValueError(f"forces must be 'direct' or 'conservative', got {self.forces!r}")
    if self.spin_input not in ("multiplicity", "zero"):
      raise ValueError(f"spin_input must be 'multiplicity' or 'zero', got {self.spin_input!r}")
    if self.dtype not in ("float32", "float64"):
      raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
    if self.channels % self.num_heads:
      raise ValueError(f"channels ({self.channels}) must be a multiple of num_heads ({self.num_heads})")
    for name in ("edge_chunk", "node_chunk"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be 0 (off) or a positive number of atoms, got {getattr(self, name)}")
    if self.cutoff <= 0 or self.max_neighbors < 1 or self.lmax < 1:
      raise ValueError("cutoff must be positive, max_neighbors >= 1 and lmax >= 1")

  @property
  def numpy_dtype(self) -> type:
    """The numpy float type of positions, cells and outputs: ``np.float64`` or ``np.float32``."""
    return np.float64 if self.dtype == "float64" else np.float32

  def replace(self, **overrides) -> ModelConfig:
    """Returns a copy with ``overrides`` applied; unknown field names raise ``TypeError``."""
    names = {f.name for f in dataclasses.fields(self)}
    unknown = sorted(set(overrides) - names)
    if unknown:
      raise TypeError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(names)}")
    return dataclasses.replace(self, **overrides)

  def to_dict(self) -> dict:
    """Every field; tuples as lists (JSON and YAML form; ``from_dict`` reads them back)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, values: dict) -> ModelConfig:
    return cls().replace(**values)


MODEL_PRESETS: dict[str, ModelConfig] = {
  # The authors' `main` SPICE run (main:scripts/spice/spice.sh): QKdot_alpha, 5 A, direct forces,
  # charge path on, multiplicity fed as 0. The linear direct force head (their run uses force_head="painn").
  "paper_spice": ModelConfig(cutoff=5.0, gate="QKdot_alpha", forces="direct", spin_input="zero"),
  # main:scripts/pretrain_omol25_stage1.sh: 6 A, QKdot_alpha, direct forces.
  "paper_omol25_stage1": ModelConfig(cutoff=6.0, gate="QKdot_alpha", forces="direct"),
  # main:scripts/pretrain_omol25_stage2.sh: 4.5 A, QK_alpha, conservative forces.
  "paper_omol25_stage2": ModelConfig(cutoff=4.5, gate="QK_alpha", forces="conservative"),
  # Trains on a 2-core CPU in minutes; conservative forces (finite differences and NVE need them).
  "small": ModelConfig(
    cutoff=5.0,
    max_neighbors=24,
    channels=64,
    num_layers=2,
    num_heads=32,
    head_dim=4,
    qk_hidden=64,
    type_embed_dim=32,
    num_basis=32,
    radial_hidden=64,
    gate="QKdot_alpha",
    forces="conservative",
  ),
}


def get_config(config: str | ModelConfig = "small", **overrides) -> ModelConfig:
  """Resolves a preset name or a ``ModelConfig`` and applies field overrides."""
  if isinstance(config, str):
    if config not in MODEL_PRESETS:
      raise ValueError(f"unknown preset {config!r}; presets: {sorted(MODEL_PRESETS)}")
    config = MODEL_PRESETS[config]
  elif not isinstance(config, ModelConfig):
    raise TypeError(f"config must be a preset name or a ModelConfig, got {type(config).__name__}")
  return config.replace(**overrides) if overrides else config
