"""Strict import of the authors' PyTorch checkpoints into an ``E2Former`` (docs/authors_checkpoints.md §5, §6).

Every entry of the checkpoint's state dict is one of:

* a parameter, copied into this project's parameter with a transform (``Source``): ``copy``, ``transpose``
  (torch ``Linear.weight`` [out, in] -> ``kernel`` [in, out]), ``swap`` (the authors' SO(3) linear weight
  [L+1, out, in] -> [L+1, in, out]) or ``flatten`` (the query/key bias [1, 1, n] -> [n]);
* a constant that this project computes itself (basis centres, degree indices, RMS-norm row weights, the EAAS
  gather table and CG weights, path norms, the l = 2 harmonics map, the degree indicator): checked equal to
  ours at float32 precision, so a configuration mismatch cannot pass silently;
* e3nn's ``Jd`` matrices (``Jd_list``), which the authors use to build Wigner matrices from Euler angles; this
  project builds its frames without Euler angles, so there is nothing to compare and they are ignored;
* a tensor the authors create but never use (no gradient reaches it): ignored (``dead_keys``).

Anything else, every parameter of this project without a source, every shape that does not fit and every
constant that differs is reported in one ``AuthorsCheckpointError`` that names each key as the checkpoint
spells it (the authors' own loader uses ``strict=False`` and would keep random weights instead).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from e2former_jax import eaas, so3
from e2former_jax.authors.pt_file import read_state_dict
from e2former_jax.authors.references import head_reference_table
from e2former_jax.authors.yaml_config import BRANCHES, AuthorsConfig, read_yaml_config, translate
from e2former_jax.checkpoint import assign_params, flatten
from e2former_jax.config import ModelConfig
from e2former_jax.model import E2Former

CONSTANT_RTOL = 1e-6  # authors' constants are float32: agreement to float32 round-off (2^-23 ~ 1.2e-7, x8)
CONSTANT_ATOL = 1e-7  # for entries that are zero in exact arithmetic (CG weights, W of the l = 2 harmonics)


class AuthorsCheckpointError(ValueError):
  """The checkpoint does not fit the model its config describes.

  Attributes:
    unknown: checkpoint keys that are neither a parameter of this model, a known constant nor a dead tensor.
    missing: checkpoint keys this model needs that the checkpoint lacks (each the source of a parameter).
    mismatched: ``(key, message)`` for entries whose shape does not fit their parameter.
    constants: ``(key, message)`` for constants that differ from this project's values.
    unsourced: this project's parameters that no checkpoint key maps to.
  """

  def __init__(self, source: str, unknown=(), missing=(), mismatched=(), constants=(), unsourced=()):
    self.unknown, self.missing, self.mismatched = tuple(unknown), tuple(missing), tuple(mismatched)
    self.constants, self.unsourced = tuple(constants), tuple(unsourced)
    parts = []
    if self.unknown:
      parts.append(f"{len(self.unknown)} unknown key(s) (not a parameter of this config): {list(self.unknown)}")
    if self.missing:
      parts.append(f"{len(self.missing)} missing key(s) (parameters left without a source): {list(self.missing)}")
    if self.mismatched:
      parts.append("shape mismatch: " + "; ".join(f"{k}: {m}" for k, m in self.mismatched))
    if self.constants:
      parts.append("constants that differ from this project's: " + "; ".join(f"{k}: {m}" for k, m in self.constants))
    if self.unsourced:
      parts.append(f"parameters of this project without a checkpoint key: {list(self.unsourced)}")
    super().__init__(f"{source}: strict import failed; " + " | ".join(parts))


@dataclasses.dataclass(frozen=True)
class Source:
  """One checkpoint tensor copied into one parameter: ``key`` (authors') -> ``target`` (this project's flat
  name, as ``checkpoint.flatten`` writes it) by ``transform``."""

  key: str
  target: str
  transform: str  # "copy", "transpose", "swap", "flatten"


def _apply(transform: str, value: np.ndarray) -> np.ndarray:
  if transform == "copy":
    return value
  if transform == "transpose":
    return value.T if value.ndim == 2 else value
  if transform == "swap":
    return np.swapaxes(value, -1, -2) if value.ndim >= 2 else value
  if transform == "flatten":
    return value.reshape(-1)
  raise ValueError(f"unknown transform {transform!r}")


def _linear(key: str, target: str, bias: bool = True) -> list[Source]:
  """torch ``nn.Linear`` -> ``Dense``."""
  out = [Source(f"{key}.weight", f"{target}/kernel", "transpose")]
  return out + ([Source(f"{key}.bias", f"{target}/bias", "copy")] if bias else [])


def _so3_linear(key: str, target: str) -> list[Source]:
  """The authors' ``SO3_Linear_e2former`` -> ``SO3Linear``."""
  return [Source(f"{key}.weight", f"{target}/kernel", "swap"), Source(f"{key}.bias", f"{target}/bias", "copy")]


def _layer_norm(key: str, target: str) -> list[Source]:
  return [Source(f"{key}.weight", f"{target}/scale", "copy"), Source(f"{key}.bias", f"{target}/bias", "copy")]


def _rms_norm(key: str, target: str) -> list[Source]:
  return [
    Source(f"{key}.affine_weight", f"{target}/scale", "copy"),
    Source(f"{key}.affine_bias", f"{target}/bias", "copy"),
  ]


def _sequential_mlp(key: str, target: str, num_linear: int) -> list[Source]:
  """Linear, LayerNorm, SiLU, ... , Linear (Sequential indices 3i and 3i + 1) -> ``RadialProfile``."""
  out = []
  for i in range(num_linear):
    out += _linear(f"{key}.{3 * i}", f"{target}/linears/{i}")
    if i < num_linear - 1:
      out += _layer_norm(f"{key}.{3 * i + 1}", f"{target}/norms/{i}")
  return out


def _query_key(key: str, target: str) -> list[Source]:
  """``SO3_Linear2Scalar_e2former`` -> ``QueryKey``."""
  return [
    Source(f"{key}.weight", f"{target}/left/kernel", "swap"),
    Source(f"{key}.bias", f"{target}/left/bias", "flatten"),
    Source(f"{key}.weight2", f"{target}/right/kernel", "swap"),
    *_linear(f"{key}.final_linear.0", f"{target}/mix"),
    *_layer_norm(f"{key}.final_linear.1", f"{target}/norm"),
    *_linear(f"{key}.final_linear.3", f"{target}/out"),
  ]


def _gate(a: str, g: str, gate: str) -> list[Source]:
  """The logit gate's parameters (``gate.py``) from the attention module ``a`` of the authors."""
  if gate == "QK_alpha":
    return _sequential_mlp(f"{a}.fc_easy.net", f"{g}/edge_mlp", 3)
  if gate == "QKdot_alpha":
    return [
      *_so3_linear(f"{a}.dot_linear", f"{g}/direction_proj"),
      *_sequential_mlp(f"{a}.rad_func_m0.net", f"{g}/edge_mlp", 3),
      *_linear(f"{a}.fc_m0", f"{g}/direction_gate"),
      *_sequential_mlp(f"{a}.fc_easy.net", f"{g}/rho_mlp", 3),
    ]
  return [
    *_sequential_mlp(f"{a}.fc_easy.net", f"{g}/edge_mlp", 3),
    *_so3_linear(f"{a}.dot_linear", f"{g}/direction_proj"),
    *_sequential_mlp(f"{a}.direction_linear", f"{g}/direction_mlp", 2),
  ]


def _block(b: str, target: str, cfg: ModelConfig, order: str) -> list[Source]:
  """A ``TransBlock`` of the authors (``b`` its key prefix) -> ``TransformerBlock`` ``target``."""
  a, at = f"{b}.ga", f"{target}/attention"
  out = [
    *_rms_norm(f"{b}.norm_1", f"{target}/norm_attention"),
    Source(f"{a}.target_embedding.weight", f"{at}/target_type/embedding", "copy"),
    Source(f"{a}.source_embedding.weight", f"{at}/source_type/embedding", "copy"),
    *_query_key(f"{a}.query_linear", f"{at}/query"),
    *_query_key(f"{a}.key_linear", f"{at}/key"),
    *_gate(a, f"{at}/gate", cfg.gate),
    *_so3_linear(f"{a}.proj_value", f"{at}/value"),
  ]
  if order == "first":
    out += [
      Source(f"{a}.first_order_tp.so2_tp.out_linear.{l3}.weight", f"{at}/path_linear/kernels/{l3}", "transpose")
      for l3 in range(cfg.lmax + 1)
    ]
    out += _so3_linear(f"{a}.proj_first", f"{at}/output")
  else:
    out += _so3_linear(f"{a}.proj_zero", f"{at}/output")
  return out + [
    *_rms_norm(f"{b}.norm_ffn", f"{target}/norm_ffn"),
    *_so3_linear(f"{b}.ffn.slinear_1", f"{target}/ffn/linear_in"),
    *_linear(f"{b}.ffn.gate.gates", f"{target}/ffn/gates"),
    *_so3_linear(f"{b}.ffn.slinear_2", f"{target}/ffn/linear_out"),
  ]


def _force_head(key: str, target: str, cfg: ModelConfig) -> list[Source]:
  if cfg.force_head == "linear":
    return [Source(f"{key}.sing_linear.weight", f"{target}/kernel", "transpose")]
  out = []
  for i in range(2):
    k, t = f"{key}.output_network.{i}", f"{target}/blocks/{i}"
    out += _linear(f"{k}.vec1_proj", f"{t}/vector_norm_proj", bias=False)
    out += _linear(f"{k}.vec2_proj", f"{t}/vector_proj", bias=False)
    out += _linear(f"{k}.update_net.0", f"{t}/update/0") + _linear(f"{k}.update_net.2", f"{t}/update/1")
  return out


def parameter_sources(cfg: ModelConfig) -> list[Source]:
  """Every parameter of ``E2Former(cfg)`` with its checkpoint key and transform (docs/authors_checkpoints.md §5)."""
  d = "decoder.decoder"
  out = [
    Source("decoder.embedding_charge.weight", "charge_embedding/embedding", "copy"),
    Source("decoder.embedding_multiplicity.weight", "spin_embedding/embedding", "copy"),
    *_linear("decoder.mix_cm.0", "system_mix"),
    Source(f"{d}.edge_deg_embed_dense.target_embedding.weight", "edge_degree/target_type/embedding", "copy"),
    Source(f"{d}.edge_deg_embed_dense.source_embedding.weight", "edge_degree/source_type/embedding", "copy"),
  ]
  for l in range(cfg.lmax + 1):
    out += _sequential_mlp(f"{d}.edge_deg_embed_dense.gbf_projs.{l}.net", f"edge_degree/radial/{l}", 3)
  for i in range(cfg.num_layers):
    order = cfg.attention_orders[0 if i < cfg.num_layers // 2 else 1]
    out += _block(f"{d}.blocks.{i}", f"blocks/{i}", cfg, order)
  if cfg.long_range_layers:
    out += _rms_norm(f"{d}.pre_norm_node", "long_range/pre_norm")
    for i in range(cfg.long_range_layers):
      out += _block(f"{d}.long_blocks.{i}", f"long_range/blocks/{i}", cfg, "zero")
    out += _rms_norm(f"{d}.norm_cluster", "long_range/norm") + _so3_linear(f"{d}.final_linear", "long_range/mix")
  else:
    out += _rms_norm(f"{d}.norm_final", "final_norm")
  for index, name in enumerate(cfg.heads):
    prefix = "" if index == 0 else f"extra_heads/{name}/"
    for i, layer in enumerate((0, 2, 4)):
      out += _linear(f"head.energy_heads.{name}.mlp.{layer}", f"{prefix}energy_head/{i}")
    if cfg.forces == "direct":
      out += _force_head(f"head.force_heads.{name}", f"{prefix}force_head", cfg)
  return out


def _rms_norm_keys(key: str) -> list[str]:
  return [f"{key}.expand_index", f"{key}.balance_degree_weight"]


def constants(cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Checkpoint key -> this project's value of every constant the authors store (checked on import)."""
  d = "decoder.decoder"
  rows = so3.degree_of_rows(cfg.lmax)
  balance = (1.0 / ((cfg.lmax + 1) * (2 * rows + 1.0)))[:, None]
  table = eaas.eaas_table(cfg.lmax)
  counts = {l3: len(table.rows_of_degree(l3)) for l3 in range(cfg.lmax + 1)}
  path_norm = np.array([1 / np.sqrt(counts[l]) for l in rows])[None, :, None]
  out = {f"{d}.rbf.offset": np.linspace(0.0, cfg.cutoff, cfg.num_basis)}
  if cfg.lmax == 2:
    out[f"{d}.edge_deg_embed_dense.sph.W"] = _quadratic_harmonics()
  norms = []

  def block(b: str, order: str) -> None:
    norms.extend([f"{b}.norm_1", f"{b}.norm_ffn"])
    for qk in ("query_linear", "key_linear"):
      out[f"{b}.ga.{qk}.expand_index"] = rows
    if cfg.gate == "QKdotS_alpha":
      out[f"{b}.ga.sum_vec"] = np.eye(cfg.lmax + 1)[rows]
    if order == "first":
      tp = f"{b}.ga.first_order_tp.so2_tp"
      out[f"{tp}.selected_idx"] = table.source_row
      out[f"{tp}.CG_weight"] = table.weight
      out[f"{tp}.path_norm"] = path_norm

  for i in range(cfg.num_layers):
    block(f"{d}.blocks.{i}", cfg.attention_orders[0 if i < cfg.num_layers // 2 else 1])
  if cfg.long_range_layers:
    norms.extend([f"{d}.pre_norm_node", f"{d}.norm_cluster"])
    out[f"{d}.rbf_long.offset"] = np.linspace(0.0, cfg.long_range_cutoff, cfg.num_basis)
    for i in range(cfg.long_range_layers):
      block(f"{d}.long_blocks.{i}", "zero")
  else:
    norms.append(f"{d}.norm_final")
  for norm in norms:
    out[f"{norm}.expand_index"] = rows
    out[f"{norm}.balance_degree_weight"] = balance
  return out


def _quadratic_harmonics() -> np.ndarray:
  """W [9, 5] with Y_2(v) = (v v^T).ravel() @ W for the component-normalised l = 2 harmonics (homogeneous
  quadratics), fitted on random vectors; the symmetric split of the cross terms is fixed by ``_compare_sph``."""
  rng = np.random.default_rng(0)
  v = rng.normal(size=(64, 3))
  y2 = np.asarray(so3.spherical_harmonics(jnp.asarray(v), 2, "component"))[:, 4:9] * np.sum(v**2, 1)[:, None]
  return np.linalg.lstsq(np.einsum("na,nb->nab", v, v).reshape(-1, 9), y2, rcond=None)[0]


def dead_keys(cfg: ModelConfig) -> set[str]:
  """Trainable tensors the authors create but never use (docs/authors_checkpoints.md §6), and the Jd matrices."""
  d = "decoder.decoder"
  out = {
    "decoder.embedding.weight",
    "decoder.unifiedtokentoembedding.weight",
    "decoder.unifiedtokentoembedding.bias",
    f"{d}.default_node_embedding.weight",
    f"{d}.heads2basis.weight",
    f"{d}.heads2basis.bias",
    f"{d}.edge_deg_embed_dense.proj.weight",
    f"{d}.edge_deg_embed_dense.proj.bias",
  }
  if cfg.long_range_layers:
    out |= {f"{d}.norm_final.affine_weight", f"{d}.norm_final.affine_bias", *_rms_norm_keys(f"{d}.norm_final")}
  return out


def _is_jd(key: str) -> bool:
  prefix = "decoder.decoder.Jd_list."
  return key.startswith(prefix) and key[len(prefix) :].isdigit()


def _compare(key: str, theirs: np.ndarray, ours: np.ndarray) -> str | None:
  """None when the constant agrees, else what differs."""
  theirs = np.asarray(theirs)
  atol = CONSTANT_ATOL
  if key.endswith(".sph.W"):
    # Compare as functions of unit vectors v: the split of the cross terms between rows 3a+b and 3b+a is
    # arbitrary. Each value sums nine float32-rounded entries, so the tolerance scales with the largest value.
    if theirs.shape != (9, 5):
      return f"shape {list(theirs.shape)}, expected [9, 5]"
    v = np.random.default_rng(1).normal(size=(16, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    outer = np.einsum("na,nb->nab", v, v).reshape(-1, 9)
    theirs, ours = outer @ np.asarray(theirs, np.float64), outer @ ours
    atol = CONSTANT_RTOL * float(np.max(np.abs(ours)))
  if theirs.shape != np.shape(ours):
    return f"shape {list(theirs.shape)}, expected {list(np.shape(ours))}"
  if np.issubdtype(theirs.dtype, np.integer):
    bad = not np.array_equal(theirs, ours)
  else:
    bad = not np.allclose(theirs, ours, rtol=CONSTANT_RTOL, atol=atol)
  if bad:
    worst = float(np.max(np.abs(np.asarray(theirs, np.float64) - np.asarray(ours, np.float64))))
    return f"differs by up to {worst:.3g} (the config does not describe this checkpoint)"
  return None


def _read_checkpoint(checkpoint) -> tuple[dict[str, np.ndarray], str]:
  if isinstance(checkpoint, Mapping):
    return {str(k): np.asarray(v) for k, v in checkpoint.items()}, "checkpoint"
  path = os.fspath(checkpoint)
  return read_state_dict(path), path


def _read_config(config, branch: str) -> AuthorsConfig:
  if isinstance(config, AuthorsConfig):
    return config
  if isinstance(config, Mapping):
    return translate(config, branch)
  return read_yaml_config(config, branch)


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """This project's parameter names (as ``checkpoint.flatten`` writes them) and shapes for ``cfg``, from an
  abstract model (no arrays are allocated)."""
  abstract = nnx.state(nnx.eval_shape(lambda: E2Former(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  names = flatten(jax.tree.map(lambda leaf: np.zeros(0), abstract))
  return {name: tuple(leaf.shape) for name, leaf in zip(names, jax.tree.leaves(abstract))}


def checkpoint_parameters(state: Mapping[str, np.ndarray], cfg: ModelConfig, source: str = "checkpoint") -> dict:
  """This project's flat parameters (name -> array) from the authors' state dict, strictly.

  Raises:
    AuthorsCheckpointError: naming every unknown key, missing key, shape mismatch, differing constant and
      parameter without a source (``template`` shapes are those of ``E2Former(cfg)``).
  """
  template = parameter_shapes(cfg)
  sources = parameter_sources(cfg)
  expected = constants(cfg)
  dead = dead_keys(cfg)
  known = {s.key for s in sources} | set(expected) | dead
  unknown = [k for k in state if k not in known and not _is_jd(k)]
  missing = [s.key for s in sources if s.key not in state]
  unsourced = sorted(set(template) - {s.target for s in sources})
  mismatched, differing, flat = [], [], {}
  for s in sources:
    if s.key not in state or s.target not in template:
      continue
    value = _apply(s.transform, np.asarray(state[s.key]))
    if value.shape != template[s.target]:
      mismatched.append(
        (
          s.key,
          f"checkpoint {list(state[s.key].shape)} ({s.transform}) does not fit {s.target} {list(template[s.target])}",
        )
      )
    else:
      flat[s.target] = value
  for key, ours in expected.items():
    if key in state:
      problem = _compare(key, state[key], ours)
      if problem:
        differing.append((key, problem))
  if unknown or missing or mismatched or differing or unsourced:
    raise AuthorsCheckpointError(source, unknown, missing, mismatched, differing, unsourced)
  return flat


def import_authors_checkpoint(
  checkpoint,
  config,
  *,
  branch: str = "main",
  dtype: str = "float32",
  element_references: bool = True,
) -> E2Former:
  """An ``E2Former`` with the weights of an authors' checkpoint and every one of its heads.

  Args:
    checkpoint: the ``.pt`` file (``{"model": state_dict, ...}`` or a bare state dict), or a state dict of
      arrays.
    config: the authors' YAML config file, its parsed mapping, or an ``AuthorsConfig``.
    branch: the authors' code that wrote the checkpoint: "main" (their released models) or "e2formerv2" (the
      paper branch: its envelope and its softmax); neither the file nor the config says which.
    dtype: "float32" or "float64" (float64 needs ``jax_enable_x64``).
    element_references: set each head's element reference energies as the authors' calculator adds them, so
      every head predicts total energies in eV (``authors.references``); False keeps the raw output, the sum
      of atomic energies.

  Returns:
    The model; ``model.config.heads`` lists the heads in the checkpoint's order (the first is the default) and
    ``model.head_elements`` maps each head with a reference table to the atomic numbers in it (the elements
    it was trained on), also without ``element_references``.

  Raises:
    AuthorsConfigError, UnsupportedSwitchError: the config is malformed or selects what this project cannot
      build (every such switch named).
    AuthorsCheckpointError: the checkpoint does not fit the config (every key named).
    CheckpointFormatError: the file is not a readable PyTorch checkpoint.
    MissingReferenceTable: ``element_references`` for a head whose table is not included.
  """
  if branch not in BRANCHES:
    raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
  if dtype not in ("float32", "float64"):
    raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
  authors = _read_config(config, branch)
  cfg = authors.model.replace(dtype=dtype)
  state, source = _read_checkpoint(checkpoint)
  flat = checkpoint_parameters(state, cfg, source)
  tables = {head: head_reference_table(head) for head in cfg.heads} if element_references else {}
  model = E2Former(cfg, rngs=nnx.Rngs(0))
  assign_params(model, flat, strict=True)
  for head, (table, _) in tables.items():
    model.set_element_energies(table, head=head)
  model.head_elements = head_elements(cfg.heads)
  return model


def head_elements(heads: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
  """Head -> the atomic numbers of its reference table in the authors' code (heads without a table left out;
  a head whose table is not included here is left out too)."""
  out = {}
  for head in heads:
    try:
      _, elements = head_reference_table(head)
    except ValueError:
      continue
    if elements is not None:
      out[head] = elements
  return out
