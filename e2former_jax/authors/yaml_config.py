"""The authors' inference config (one YAML file) translated to this project's ``ModelConfig``.

The authors' interface builds its model from one flattened YAML: training-run fields at the top level and the
backbone's constructor arguments under ``backbone_config`` (this module also accepts them flattened at the top
level). ``translate`` maps the fields that define the function to a ``ModelConfig`` plus the list of energy/force
heads, reports the fields that do not change the function as ``ignored``, and refuses:

* unknown fields and malformed values (``AuthorsConfigError``, naming every one);
* switches the JAX model cannot represent yet (``UnsupportedSwitchError``, naming every one with its value; the
  supported values of each switch are the table ``SUPPORTED_SWITCHES``, extended as the model grows);
* configurations outside the shapes the JAX model hard-codes (``AuthorsConfigError``, naming the value).

Missing backbone fields take the defaults of the authors' constructor, as their code would. Field meanings and
the parameter mapping: docs/authors_checkpoints.md.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

from e2former_jax.config import GATES, ModelConfig


class AuthorsConfigError(ValueError):
  """The authors' config is malformed or cannot be built by this project."""


class UnsupportedSwitchError(AuthorsConfigError):
  """The config selects architecture switches the JAX model cannot represent.

  Attributes:
    switches: ``(switch, value)`` for every unsupported switch, ``value`` as the config spells it.
  """

  def __init__(self, switches: tuple[tuple[str, Any], ...], source: str = "config"):
    self.switches = switches
    listed = "; ".join(f"{name}={value!r}" for name, value in switches)
    super().__init__(f"{source}: switch(es) this project cannot represent yet: {listed}")


# Switch -> values the JAX model implements. Switch values are normalised by ``_switches``:
#   gate_activation: "softmax" (default), "softplus", "sigmoid" (tp_type containing softplus/sigmoid);
#   attn_type: (first half of the blocks, second half), each "so2-first-order" or "zero-order" ("A+B" in the
#     config gives A to blocks i < num_layers // 2 and B to the rest; a single name is used for both halves);
#   with_cluster: "off" or "node" / "node_bell" (long-range blocks with the poly or poly_bell envelope);
#   force_head: "gradient" (AutoGradForce), "linear", "painn", "escn";
#   energy_head: "mlp" or "escn";
#   edge_layernorm: "on", or "off" (edge_embedtype containing "wolayernorm");
#   norm_layer, encoder, basis_type, ffn_type: the authors' names.
SUPPORTED_SWITCHES: dict[str, frozenset[str]] = {
  "gate_activation": frozenset({"softmax", "softplus", "sigmoid"}),
  "attn_type": frozenset({"so2-first-order", "zero-order"}),
  "with_cluster": frozenset({"off", "node"}),
  "force_head": frozenset({"gradient", "linear", "painn"}),
  "energy_head": frozenset({"mlp"}),
  "edge_layernorm": frozenset({"on"}),
  "norm_layer": frozenset({"rms_norm_sh"}),
  "encoder": frozenset({"default"}),
  "basis_type": frozenset({"gaussiansmear"}),
  "ffn_type": frozenset({"s3"}),
}

# The paper branch (e2formerv2) differs from main in these switches and only its default is implemented: its
# "+softplus" suffix is ignored there (its softplus is tp_type QK_softplus, without rho), and its zero-order and
# long-range code paths were not compared with this project's.
E2FORMERV2_SUPPORTED: dict[str, frozenset[str]] = {
  "gate_activation": frozenset({"softmax"}),
  "attn_type": frozenset({"so2-first-order"}),
  "with_cluster": frozenset({"off"}),
}

# attn_type of the authors -> ModelConfig.attention_orders entry.
ATTENTION_ORDERS = {"so2-first-order": "first", "zero-order": "zero"}

BRANCHES = ("main", "e2formerv2")

# Backbone constructor arguments and their defaults in the authors' code (E2FormerBackbone -> E2former).
BACKBONE_DEFAULTS: dict[str, Any] = {
  "name": "e2former",
  "encoder": "default",
  "irreps_node_embedding": None,
  "num_layers": 6,
  "max_neighbors": 300,
  "max_radius": 4.5,
  "basis_type": "gaussiansmear",
  "number_of_basis": 128,
  "num_attn_heads": 4,
  "attn_scalar_head": 32,
  "irreps_head": "32x0e+32x1e+32x2e",
  "norm_layer": "rms_norm_sh",
  "tp_type": "QK_alpha",
  "attn_type": "first-order",
  "edge_embedtype": "default",
  "ffn_type": "default",
  "avg_degree": 23.01,
  "with_cluster": False,
  "long_range_layers": 2,
  "long_cutoff_lower": 0.1,
  "long_cutoff_upper": 12.0,
}

# Backbone fields with no effect on an inference model's function: dropout (off in eval), periodic-image and
# neighbour-search settings, the unused per-atom embedding size, and the settings of the unused "dit" encoder.
BACKBONE_IGNORED = frozenset(
  {
    "alpha_drop",
    "atom_type_cnt",
    "pbc_max_radius",
    "pbc_expanded_num_cell_per_direction",
    "pbc_expanded_token_cutoff",
    "expanded_token_cutoff",
    "pbc_multigraph_cutoff",
    "use_faiss",
    "use_compile",
    "encoder_embed_dim",
    "ffn_embedding_dim",
    "num_attention_heads",
    "dropout",
    "num_encoder_layers",
  }
)

# Top-level fields that define the heads.
TOP_DEFAULTS: dict[str, Any] = {
  "dataset_name_list": "",
  "head_cfg_str": "",
  "AutoGradForce": True,
  "with_moe": "None",
}

# Top-level fields of the authors' run config and interface that do not change the function: distributed setup,
# seeds, data, paths, schedule, loss, optimizer, loggers, early stopping, resume, compile/precision/search options.
TOP_IGNORED = frozenset(
  {
    "local_rank",
    "world_size",
    "node_rank",
    "rank",
    "seed",
    "dist_backend",
    "scheduler_config",
    "strategy_config",
    "backbone",
    "data_path",
    "data_path_list",
    "data_path_list_valid",
    "dataset_name_list_valid",
    "dataset_sample_prob",
    "dataset_micro_batch_size",
    "train_val_test_split",
    "shuffle",
    "save_dir",
    "ckpt_path",
    "total_num_steps",
    "total_num_epochs",
    "save_batch_interval",
    "save_epoch_interval",
    "log_interval",
    "val_batch_interval",
    "val_epoch_interval",
    "energy_loss_weight",
    "force_loss_weight",
    "loss_unit",
    "loss_fn",
    "lr",
    "custom_factors",
    "clip_grad_norm",
    "gradient_accumulation_steps",
    "weight_decay",
    "experiment_name",
    "wandb",
    "wandb_project",
    "aim",
    "aim_dir",
    "tb",
    "tb_dir",
    "swanlab",
    "swanlab_project",
    "swanlab_workspace",
    "early_stopping",
    "early_stopping_patience",
    "early_stopping_metric",
    "early_stopping_mode",
    "ifresume",
    "use_compile",
    "use_tf32",
    "use_faiss",
    "recompute_budget",
  }
)

# Head renaming of the authors' `main` branch (MDEnergyForceMultiHead); `svp` is never renamed.
HEAD_RENAMES = {"svp-enhance": "tzvpd", "tzvpd-small": "tzvpd", "tzvpd-forceatomfilter": "tzvpd"}
SHARED_HEAD_RENAMES = {
  "svp-enhance": "omol25",
  "tzvpd-small": "omol25",
  "tzvpd": "omol25",
  "tzvpd-forceatomfilter": "omol25",
}

_CLUSTER_OFF = {"false", "0", "none"}
_IRREP_TERM = re.compile(r"^(\d+)x(\d+)([eo])$")


@dataclasses.dataclass(frozen=True)
class AuthorsConfig:
  """An authors' config translated.

  Attributes:
    model: the ``ModelConfig`` that builds the same model: backbone, every head (``heads``), the branch's
      envelope and softmax.
    heads: head names in the checkpoint's order (``head.energy_heads.<name>``), after the authors' renaming.
    force_head: "gradient" (forces = -dE/dx, no parameters), "linear", "painn" or "escn".
    with_cluster: the long-range (LSR) blocks: None when off, else the authors' string (e.g. "node").
    long_range: with LSR, its settings (layers, cutoff_lower, cutoff_upper in Angstrom, envelope); else None.
    switches: every architecture switch with its normalised value (see ``SUPPORTED_SWITCHES``).
    ignored: fields of the config that do not change the function, sorted, each once.
    unsupported: ``(switch, value)`` of the switches the JAX model cannot represent (only non-empty when
      ``translate`` was called with ``allow_unsupported=True``).
  """

  model: ModelConfig
  heads: tuple[str, ...]
  force_head: str
  with_cluster: str | None
  long_range: Mapping[str, Any] | None
  switches: Mapping[str, tuple[str, ...]]
  ignored: tuple[str, ...]
  unsupported: tuple[tuple[str, Any], ...]


def parse_irreps(irreps: str, field: str) -> tuple[int, int]:
  """Parses ``"Cx0e+Cx1e+...+CxLe"`` (the authors' notation: every degree even, equal multiplicities).

  Returns:
    (multiplicity C, maximum degree L).
  """
  if not isinstance(irreps, str) or not irreps.strip():
    raise AuthorsConfigError(f"{field}: expected an irreps string like '256x0e+256x1e+256x2e', got {irreps!r}")
  terms = [t.strip() for t in irreps.split("+")]
  parsed = []
  for term in terms:
    match = _IRREP_TERM.match(term)
    if not match:
      raise AuthorsConfigError(f"{field}={irreps!r}: cannot parse term {term!r} (expected e.g. '256x1e')")
    parsed.append((int(match[1]), int(match[2]), match[3]))
  degrees = [l for _, l, _ in parsed]
  if degrees != list(range(len(parsed))):
    raise AuthorsConfigError(f"{field}={irreps!r}: degrees must be 0, 1, ..., L once each in order, got {degrees}")
  if any(parity != "e" for _, _, parity in parsed):
    raise AuthorsConfigError(f"{field}={irreps!r}: every degree must carry parity 'e' as in the authors' configs")
  multiplicities = {mul for mul, _, _ in parsed}
  if len(multiplicities) != 1 or 0 in multiplicities:
    raise AuthorsConfigError(
      f"{field}={irreps!r}: multiplicities must be equal and positive, got {sorted(multiplicities)}"
    )
  return parsed[0][0], len(parsed) - 1


def head_names(dataset_name_list: str, head_cfg_str: str = "", branch: str = "main") -> tuple[str, ...]:
  """The heads the authors' ``MDEnergyForceMultiHead`` builds from ``dataset_name_list``.

  ``main``: ``svp-enhance``, ``tzvpd-small``, ``tzvpd-forceatomfilter`` -> ``tzvpd``; with "share" in
  ``head_cfg_str`` those and ``tzvpd`` -> ``omol25``. ``e2formerv2``: no renaming. Order kept, duplicates dropped.
  """
  if not isinstance(dataset_name_list, str):
    raise AuthorsConfigError(f"dataset_name_list: expected a comma-separated string, got {dataset_name_list!r}")
  renames = {}
  if branch == "main":
    renames = dict(HEAD_RENAMES)
    if "share" in str(head_cfg_str):
      renames.update(SHARED_HEAD_RENAMES)
  names = dataset_name_list.split(",")
  bad = [name for name in names if not name or name != name.strip()]
  if bad:
    raise AuthorsConfigError(f"dataset_name_list={dataset_name_list!r}: empty or space-padded head name(s) {bad}")
  heads: list[str] = []
  for name in names:
    head = renames.get(name, name)
    if head not in heads:
      heads.append(head)
  return tuple(heads)


def _split_fields(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(backbone fields, top-level fields), from a nested ``backbone_config`` or a flattened config."""
  if not isinstance(config, Mapping):
    raise AuthorsConfigError(f"expected a mapping of config fields, got {type(config).__name__}")
  top = {str(k): v for k, v in config.items()}
  backbone_known = set(BACKBONE_DEFAULTS) | BACKBONE_IGNORED
  if "backbone_config" in top:
    nested = top.pop("backbone_config")
    if not isinstance(nested, Mapping):
      raise AuthorsConfigError(f"backbone_config: expected a mapping, got {type(nested).__name__}")
    backbone = {str(k): v for k, v in nested.items()}
    doubled = sorted(set(top) & set(backbone) & (backbone_known - TOP_IGNORED))
    if doubled:
      raise AuthorsConfigError(f"field(s) {doubled} given both at the top level and under backbone_config")
  else:
    backbone = {k: top.pop(k) for k in list(top) if k in backbone_known and k not in TOP_IGNORED}
  return backbone, top


def _with_cluster(value: Any) -> str:
  """The authors' ``with_cluster`` as "off", "node", "node_bell", or the unrecognised string."""
  text = str(value)
  if text.lower() in _CLUSTER_OFF:
    return "off"
  if "node" in text:
    return "node_bell" if "bell" in text else "node"
  return text


def _switches(backbone: Mapping[str, Any], top: Mapping[str, Any], branch: str) -> dict[str, tuple[str, ...]]:
  """Every architecture switch of the config, normalised (keys of ``SUPPORTED_SWITCHES``)."""
  tp_type = str(backbone["tp_type"])
  activation = "softplus" if "softplus" in tp_type else "sigmoid" if "sigmoid" in tp_type else "softmax"
  attn_type = str(backbone["attn_type"])
  halves = tuple(attn_type.split("+", 1)) if "+" in attn_type else (attn_type, attn_type)
  with_moe = str(top["with_moe"]) if branch == "main" else "None"
  energy_head = "escn" if with_moe == "escn" else "mlp"
  if top["AutoGradForce"]:
    force_head = "gradient"
  else:
    force_head = with_moe if with_moe in ("escn", "painn") else "linear"
  ffn_type = str(backbone["ffn_type"])
  return {
    "gate_activation": (activation,),
    "attn_type": halves,
    "with_cluster": (_with_cluster(backbone["with_cluster"]),),
    "force_head": (force_head,),
    "energy_head": (energy_head,),
    "edge_layernorm": ("off" if "wolayernorm" in str(backbone["edge_embedtype"]) else "on",),
    "norm_layer": (str(backbone["norm_layer"]),),
    "encoder": (str(backbone["encoder"]),),
    "basis_type": (str(backbone["basis_type"]),),
    "ffn_type": ("s3" if ("s3" in ffn_type or "default" in ffn_type) else ffn_type,),
  }


def _switch_source(name: str, backbone: Mapping[str, Any], top: Mapping[str, Any]) -> tuple[str, Any]:
  """The config field (and its raw value) behind a switch, for error messages."""
  field = {
    "gate_activation": "tp_type",
    "attn_type": "attn_type",
    "with_cluster": "with_cluster",
    "edge_layernorm": "edge_embedtype",
    "norm_layer": "norm_layer",
    "encoder": "encoder",
    "basis_type": "basis_type",
    "ffn_type": "ffn_type",
  }.get(name)
  if field is not None:
    return field, backbone[field]
  if name == "force_head" and top["with_moe"] not in ("escn", "painn"):
    return "AutoGradForce", top["AutoGradForce"]
  return "with_moe", top["with_moe"]


def _as_int(value: Any, field: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise AuthorsConfigError(f"{field}: expected an integer, got {value!r}")
  return value


def _as_float(value: Any, field: str) -> float:
  if isinstance(value, bool) or not isinstance(value, int | float):
    raise AuthorsConfigError(f"{field}: expected a number, got {value!r}")
  return float(value)


def _model_config(
  backbone: Mapping[str, Any],
  branch: str,
  switches: Mapping[str, tuple[str, ...]],
  heads: tuple[str, ...],
  long_range: Mapping[str, Any] | None,
) -> ModelConfig:
  """The ``ModelConfig`` of the backbone fields; every violated constraint of the JAX model named at once."""
  channels, lmax = parse_irreps(backbone["irreps_node_embedding"], "irreps_node_embedding")
  head_mult, head_lmax = parse_irreps(backbone["irreps_head"], "irreps_head")
  num_heads = _as_int(backbone["num_attn_heads"], "num_attn_heads")
  head_dim = _as_int(backbone["attn_scalar_head"], "attn_scalar_head")
  num_basis = _as_int(backbone["number_of_basis"], "number_of_basis")
  num_layers = _as_int(backbone["num_layers"], "num_layers")
  cutoff = _as_float(backbone["max_radius"], "max_radius")
  avg_degree = _as_float(backbone["avg_degree"], "avg_degree")
  max_neighbors = backbone["max_neighbors"]
  gate = str(backbone["tp_type"]).split("+")[0]
  problems = []
  if gate not in GATES:
    problems.append(f"tp_type={backbone['tp_type']!r}: gate {gate!r} is not one of {GATES}")
  if max_neighbors is None or str(max_neighbors) == "None":
    problems.append("max_neighbors=None (no neighbour limit): the JAX model needs a fixed number of slots K")
  elif isinstance(max_neighbors, bool) or not isinstance(max_neighbors, int) or max_neighbors < 1:
    problems.append(f"max_neighbors={max_neighbors!r}: expected a positive integer")
  if lmax < 1:
    problems.append(f"irreps_node_embedding={backbone['irreps_node_embedding']!r}: the JAX model needs L >= 1")
  if head_lmax != lmax:
    problems.append(f"irreps_head={backbone['irreps_head']!r}: maximum degree {head_lmax} != {lmax} of the nodes")
  if num_heads < 1 or head_dim < 1 or num_layers < 1 or num_basis < 2:
    problems.append(
      f"num_attn_heads={num_heads}, attn_scalar_head={head_dim}, num_layers={num_layers} must be >= 1 and "
      f"number_of_basis={num_basis} >= 2"
    )
  elif num_heads * head_mult != channels:
    problems.append(
      f"num_attn_heads * multiplicity(irreps_head) = {num_heads} * {head_mult} = {num_heads * head_mult} must "
      f"equal the channels C = {channels} of irreps_node_embedding (the JAX attention keeps C channels per head group)"
    )
  if num_heads >= 1 and head_dim >= 1 and (num_heads * head_dim) % 2:
    problems.append(
      f"num_attn_heads * attn_scalar_head = {num_heads * head_dim} must be even (query/key hidden width H*d/2)"
    )
  if num_basis != channels:
    problems.append(
      f"number_of_basis={num_basis} must equal the channels C = {channels} (the JAX model sizes the edge-degree "
      "type embeddings and the QKdot projection with C)"
    )
  if cutoff <= 0:
    problems.append(f"max_radius={cutoff}: must be positive")
  if problems:
    raise AuthorsConfigError("the JAX model cannot build this config: " + "; ".join(problems))
  force_head = switches["force_head"][0]
  long_range = long_range or {}
  return ModelConfig(
    cutoff=cutoff,
    max_neighbors=max_neighbors,
    lmax=lmax,
    channels=channels,
    num_layers=num_layers,
    num_heads=num_heads,
    head_dim=head_dim,
    qk_hidden=num_heads * head_dim // 2,
    type_embed_dim=128,
    num_basis=num_basis,
    basis_width=2.0,
    radial_hidden=min(128, num_basis // 2),
    avg_degree=avg_degree,
    gate=gate,
    gate_activation=switches["gate_activation"][0],
    softmax_max="valid" if branch == "main" else "e2formerv2",
    envelope="main" if branch == "main" else "e2formerv2",
    attention_orders=tuple(ATTENTION_ORDERS.get(order, "first") for order in switches["attn_type"]),
    forces="conservative" if force_head == "gradient" else "direct",
    force_head="painn" if force_head == "painn" else "linear",
    heads=heads,
    long_range_layers=long_range.get("layers", 0),
    long_range_cutoff=long_range.get("cutoff_upper", 12.0),
    long_range_min_distance=long_range.get("cutoff_lower", 0.1),
    long_range_max_neighbors=int(2.5 * max_neighbors) if long_range else 80,
    use_charge_spin=True,
    spin_input="multiplicity",
    num_species=256,
    edge_degree_species=300,
  )


def translate(
  config: Mapping[str, Any],
  branch: str = "main",
  *,
  supported: Mapping[str, frozenset[str]] = SUPPORTED_SWITCHES,
  allow_unsupported: bool = False,
  source: str = "config",
) -> AuthorsConfig:
  """Translates the authors' config (a parsed YAML mapping) to this project's terms.

  Args:
    config: the authors' fields, the backbone nested under ``backbone_config`` or flattened at the top level.
    branch: "main" (the released checkpoints' code) or "e2formerv2" (the paper branch; no head renaming and no
      ``with_moe``, softmax max over all slots).
    supported: switch -> supported normalised values (default ``SUPPORTED_SWITCHES``).
    allow_unsupported: return the translation with ``unsupported`` filled instead of raising.
    source: name used in error messages (e.g. the file path).

  Raises:
    AuthorsConfigError: unknown fields, malformed values, or a config outside the JAX model's fixed shapes.
    UnsupportedSwitchError: switches outside ``supported`` (all of them named, with the config's values).
  """
  if branch not in BRANCHES:
    raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
  try:
    backbone, top = _split_fields(config)
  except AuthorsConfigError as error:
    raise AuthorsConfigError(f"{source}: {error}") from error
  unknown = sorted(set(backbone) - set(BACKBONE_DEFAULTS) - BACKBONE_IGNORED)
  unknown += sorted(set(top) - set(TOP_DEFAULTS) - TOP_IGNORED)
  if unknown:
    raise AuthorsConfigError(f"{source}: unknown field(s) {unknown} (not a field of the authors' config)")
  if backbone.get("irreps_node_embedding") is None:
    raise AuthorsConfigError(f"{source}: irreps_node_embedding is required (the authors' code has no default)")
  if backbone.get("name", "e2former") not in ("e2former", "e2formerv2"):
    raise AuthorsConfigError(f"{source}: backbone name={backbone['name']!r} is not an E2Former backbone")
  backbone = {**BACKBONE_DEFAULTS, **backbone}
  top = {**TOP_DEFAULTS, **top}
  if not isinstance(top["AutoGradForce"], bool):
    raise AuthorsConfigError(f"{source}: AutoGradForce={top['AutoGradForce']!r}: expected true or false")

  switches = _switches(backbone, top, branch)
  if branch == "e2formerv2":
    supported = {**supported, **{k: supported.get(k, frozenset()) & v for k, v in E2FORMERV2_SUPPORTED.items()}}
  unsupported = []
  for name, values in switches.items():
    if not set(values) <= supported.get(name, frozenset()):
      unsupported.append(_switch_source(name, backbone, top))
  unsupported = tuple(dict.fromkeys(unsupported))
  if unsupported and not allow_unsupported:
    raise UnsupportedSwitchError(unsupported, source)

  with_cluster = None if switches["with_cluster"] == ("off",) else str(backbone["with_cluster"])
  try:
    heads = head_names(top["dataset_name_list"], top["head_cfg_str"], branch)
    long_range = None if with_cluster is None else _long_range(backbone, with_cluster)
    model = _model_config(backbone, branch, switches, heads, long_range)
  except AuthorsConfigError as error:
    raise AuthorsConfigError(f"{source}: {error}") from error

  given = _given(config)
  ignored = given & (BACKBONE_IGNORED | TOP_IGNORED)
  if with_cluster is None:
    ignored |= given & {"long_range_layers", "long_cutoff_lower", "long_cutoff_upper"}
  if branch != "main":
    ignored |= given & {"with_moe"}
  return AuthorsConfig(
    model=model,
    heads=heads,
    force_head=switches["force_head"][0],
    with_cluster=with_cluster,
    long_range=long_range,
    switches=switches,
    ignored=tuple(sorted(ignored)),
    unsupported=unsupported,
  )


def _long_range(backbone: Mapping[str, Any], with_cluster: str) -> dict[str, Any]:
  """Settings of the long-range blocks: block count, neighbour distance window (Angstrom), envelope."""
  return {
    "layers": _as_int(backbone["long_range_layers"], "long_range_layers"),
    "cutoff_lower": _as_float(backbone["long_cutoff_lower"], "long_cutoff_lower"),
    "cutoff_upper": _as_float(backbone["long_cutoff_upper"], "long_cutoff_upper"),
    "envelope": "poly_bell" if "bell" in with_cluster else "poly",
  }


def _given(config: Mapping[str, Any]) -> set[str]:
  """Field names present in the config, top level and under ``backbone_config``."""
  nested = config.get("backbone_config")
  return set(map(str, config)) | (set(map(str, nested)) if isinstance(nested, Mapping) else set())


def read_yaml_config(path: str | os.PathLike, branch: str = "main", **options) -> AuthorsConfig:
  """Reads the authors' YAML config file and translates it (``translate``; errors name the file)."""
  path = os.fspath(path)
  with open(path, encoding="utf-8") as handle:
    try:
      config = yaml.safe_load(handle)
    except yaml.YAMLError as error:
      raise AuthorsConfigError(f"{path}: not valid YAML ({error})") from error
  return translate(config, branch, source=path, **options)
