"""Training configuration: dataclasses, the named presets, YAML files and ``--set key=value`` overrides.

A run is described by one ``TrainConfig`` with the sections ``model`` (a ``ModelConfig`` preset name plus field
overrides), ``data``, ``loss``, ``optim``, ``run`` and ``init``. ``resolve`` fills in everything a preset or a
YAML file leaves out, and ``to_dict`` gives the fully resolved form that is saved as ``config.yaml`` in the run
directory; loading that file gives the same config back.

The presets are YAML files in ``presets/`` (one source; ``configs/`` links to them): the paper presets follow
the authors' training scripts (docs/model.md), ``demo`` is the CPU run on the shipped demo data that
``python train.py`` starts.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from e2former_jax.config import ModelConfig, get_config

LOSSES = ("atoml2mae", "l2mae", "mse", "huber", "mae")
ELEMENT_REFERENCE_CHOICES = ("fit", "spice", "omol25", "none", "init")
BEST_METRICS = ("loss", "energy_mae", "force_mae")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Energy/force loss (docs/model.md §14.1); energies in eV, forces in eV/A.

  Attributes:
    kind: ``atoml2mae`` (w_E mean_b |dE_b|/n_b + w_F mean_i |dF_i|_2), ``l2mae`` (w_E mean_b |dE_b| +
      w_F sum_i |dF_i|_2 / B), ``mse`` (w_E mean_b (dE_b/n_b)^2 + w_F mean over components dF^2),
      ``huber`` (as ``mse`` with the Huber function of ``huber_delta``), ``mae`` (w_E mean_b |dE_b|/n_b +
      w_F mean over components |dF|).
    energy_weight: w_E.
    force_weight: w_F.
    huber_delta: Huber threshold (eV/atom for energies, eV/A for force components).
  """

  kind: str = "atoml2mae"
  energy_weight: float = 1.0
  force_weight: float = 30.0
  huber_delta: float = 0.01

  def __post_init__(self):
    if self.kind not in LOSSES:
      raise ValueError(f"loss.kind must be one of {LOSSES}, got {self.kind!r}")
    if self.energy_weight < 0 or self.force_weight < 0:
      raise ValueError("loss weights must be >= 0")
    if self.huber_delta <= 0:
      raise ValueError("loss.huber_delta must be positive")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Adam/AdamW with the authors' parameter groups and warmup + cosine schedule (docs/model.md §14.2).

  Attributes:
    lr: base learning rate.
    weight_decay: decoupled weight decay (AdamW); 0 is plain Adam (the authors switch the same way).
    beta1, beta2, eps: Adam constants.
    clip_norm: gradient clipping by global norm (None: off).
    warmup_steps: linear warmup length (the authors' 4,000).
    warmup_factor: LR factor at step 0 (0.2).
    lr_min_factor: final LR factor (0.01).
    schedule_steps: T of the cosine phase cos(pi s / T) (None: ``run.steps``).
    max_warmup_fraction: if set, warmup is at most this fraction of T (the demo's 10%).
    ema_decay: EMA of the weights (None: off, as the authors).
    no_decay: parameters whose path contains one of these substrings get no weight decay, nor do 0-/1-D
      parameters (biases, norm scales) -- the authors' groups.
  """

  lr: float = 8e-4
  weight_decay: float = 0.0
  beta1: float = 0.9
  beta2: float = 0.999
  eps: float = 1e-8
  clip_norm: float | None = 100.0
  warmup_steps: int = 4000
  warmup_factor: float = 0.2
  lr_min_factor: float = 0.01
  schedule_steps: int | None = None
  max_warmup_fraction: float | None = None
  ema_decay: float | None = None
  no_decay: tuple[str, ...] = ("bias", "embedding", "norm")

  def __post_init__(self):
    object.__setattr__(self, "no_decay", tuple(self.no_decay))
    if self.lr <= 0:
      raise ValueError("optim.lr must be positive")
    if self.weight_decay < 0:
      raise ValueError("optim.weight_decay must be >= 0")
    if self.clip_norm is not None and self.clip_norm <= 0:
      raise ValueError("optim.clip_norm must be positive or null")
    if self.warmup_steps < 0:
      raise ValueError("optim.warmup_steps must be >= 0")
    if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
      raise ValueError("optim.ema_decay must be in (0, 1) or null")
    if self.max_warmup_fraction is not None and not 0.0 <= self.max_warmup_fraction <= 1.0:
      raise ValueError("optim.max_warmup_fraction must be in [0, 1] or null")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the data come from and how they are batched.

  Paths are files (extxyz, SPICE HDF5, aselmdb), lists of files, or directories (every data file inside);
  ``demo:train``, ``demo:valid``, ``demo:test`` name the shipped demo splits.

  Attributes:
    train, valid, test: data sets; ``valid`` None takes ``valid_fraction`` of ``train`` at random (seeded);
      ``test`` (optional) is evaluated at the end with the error table.
    valid_fraction: used when ``valid`` is None.
    format: reader format (None: from the extension).
    reader: extra reader options (e.g. ``energy_key``, ``forces_key`` for extxyz).
    in_memory: read every structure once up front (small data sets) instead of lazily.
    atom_budget: most real atoms per training batch (the authors use 2,048 per GPU).
    max_structures: most structures per training batch (None: only the atom budget limits).
    num_buckets: padded batch shapes for training (each is one compilation).
    eval_atom_budget: atoms per evaluation batch (None: ``atom_budget``).
    element_references: ``fit`` (least squares on ``train``), ``spice`` / ``omol25`` (the authors' tables),
      ``none``, or ``init`` (those of the ``--init-from`` checkpoint).
    prefetch: batches built ahead in a background thread.
    max_train_structures, max_eval_structures: use only the first so many (quick tests).
  """

  train: Any = "demo:train"
  valid: Any = "demo:valid"
  test: Any = "demo:test"
  valid_fraction: float = 0.05
  format: str | None = None
  reader: dict = dataclasses.field(default_factory=dict)
  in_memory: bool = False
  atom_budget: int = 2048
  max_structures: int | None = None
  num_buckets: int = 4
  eval_atom_budget: int | None = None
  element_references: str = "fit"
  prefetch: int = 4
  max_train_structures: int | None = None
  max_eval_structures: int | None = None

  def __post_init__(self):
    if self.element_references not in ELEMENT_REFERENCE_CHOICES:
      raise ValueError(
        f"data.element_references must be one of {ELEMENT_REFERENCE_CHOICES}, got {self.element_references!r}"
      )
    if self.atom_budget < 1 or self.num_buckets < 1:
      raise ValueError("data.atom_budget and data.num_buckets must be >= 1")
    if not 0.0 <= self.valid_fraction < 1.0:
      raise ValueError("data.valid_fraction must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Length, seed, logging and checkpointing of a run.

  Attributes:
    steps: optimizer steps (batches) in the run.
    seed: parameter initialisation, data order and the step RNG.
    eval_every: validate (and save a checkpoint) every so many steps; also at the end.
    log_every: write metrics every so many steps.
    checkpoint_every: save the "last" checkpoint every so many steps (None: at every validation).
    keep_checkpoints: "last" checkpoints kept (the best one is kept separately).
    best_metric: validation metric that selects the "best" checkpoint: ``loss`` (the training loss on the
      validation set), ``energy_mae`` (eV/atom) or ``force_mae`` (eV/A per component).
    async_checkpointing: write checkpoints in the background.
    progress_bar: tqdm progress bar on stderr.
    tensorboard: write TensorBoard event files (``metrics.csv`` is always written).
  """

  steps: int = 1000
  seed: int = 0
  eval_every: int = 500
  log_every: int = 10
  checkpoint_every: int | None = None
  keep_checkpoints: int = 3
  best_metric: str = "loss"
  async_checkpointing: bool = True
  progress_bar: bool = True
  tensorboard: bool = True

  def __post_init__(self):
    if self.steps < 1 or self.eval_every < 1 or self.log_every < 1 or self.keep_checkpoints < 1:
      raise ValueError("run.steps, run.eval_every, run.log_every and run.keep_checkpoints must be >= 1")
    if self.best_metric not in BEST_METRICS:
      raise ValueError(f"run.best_metric must be one of {BEST_METRICS}, got {self.best_metric!r}")
    if self.checkpoint_every is not None and self.checkpoint_every < 1:
      raise ValueError("run.checkpoint_every must be >= 1 or null")


@dataclasses.dataclass(frozen=True)
class InitConfig:
  """Fine-tuning start point (not a resume: optimizer state, step and data order start afresh).

  Attributes:
    checkpoint: a run directory (best, else last) or a step directory; None starts from random weights.
    strict: every parameter must match in name and shape; with False, matching parameters are loaded and
      the others keep their initialisation (the authors' ``model_state_unstrict``).
  """

  checkpoint: str | None = None
  strict: bool = True


SECTIONS = {"data": DataConfig, "loss": LossConfig, "optim": OptimConfig, "run": RunConfig, "init": InitConfig}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """A whole training run. ``model`` is ``{"preset": name, **ModelConfig field overrides}``."""

  model: dict = dataclasses.field(default_factory=lambda: {"preset": "small", **get_config("small").to_dict()})
  data: DataConfig = DataConfig()
  loss: LossConfig = LossConfig()
  optim: OptimConfig = OptimConfig()
  run: RunConfig = RunConfig()
  init: InitConfig = InitConfig()

  def model_config(self) -> ModelConfig:
    fields = dict(self.model)
    preset = fields.pop("preset", "small")
    return get_config(preset, **fields)

  def schedule_steps(self) -> int:
    return self.optim.schedule_steps or self.run.steps

  def to_dict(self) -> dict:
    """The fully resolved config: every field of every section, the model config expanded."""
    out = {"model": dict(self.model)}
    for name in SECTIONS:
      section = dataclasses.asdict(getattr(self, name))
      for k, v in section.items():
        if isinstance(v, tuple):
          section[k] = list(v)
      out[name] = section
    return out

  @classmethod
  def from_dict(cls, values: dict) -> TrainConfig:
    values = copy.deepcopy(values or {})
    unknown = sorted(set(values) - {"model", *SECTIONS})
    if unknown:
      raise ValueError(f"unknown config section(s) {unknown}; sections: {['model', *SECTIONS]}")
    kwargs = {}
    model = values.get("model", {"preset": "small"})
    if not isinstance(model, dict):
      raise ValueError("the model section must be a mapping (preset: NAME plus ModelConfig fields)")
    model = _coerce_fields(ModelConfig, dict(model), "model")
    preset = model.pop("preset", "small")
    # stored resolved: the preset name and every ModelConfig field (so equal runs compare equal)
    kwargs["model"] = {"preset": preset, **get_config(preset, **model).to_dict()}
    for name, klass in SECTIONS.items():
      section = values.get(name) or {}
      if not isinstance(section, dict):
        raise ValueError(f"config section {name!r} must be a mapping")
      known = {f.name for f in dataclasses.fields(klass)}
      bad = sorted(set(section) - known)
      if bad:
        raise ValueError(f"unknown key(s) {bad} in section {name!r}; known: {sorted(known)}")
      kwargs[name] = klass(**_coerce_fields(klass, section, name))
    cfg = cls(**kwargs)
    cfg.model_config()  # validates the model section
    return cfg

  def replace(self, **sections) -> TrainConfig:
    return dataclasses.replace(self, **sections)


def _coerce(value, annotation: str):
  """YAML 1.1 reads ``2e-4`` as a string and ``5`` as an int: convert to the field's declared number type."""
  if value is None or isinstance(value, bool):
    return value
  kinds = {t.strip() for t in str(annotation).split("|")}
  if "int" in kinds and isinstance(value, (str, float)):
    try:
      f = float(value)
    except ValueError:
      return value
    return int(f) if f.is_integer() else value
  if "float" in kinds and isinstance(value, (str, int)):
    try:
      return float(value)
    except ValueError:
      return value
  return value


_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "dict": dict, "None": type(None)}


def _coerce_fields(klass, values: dict, section: str) -> dict:
  """``values`` with numbers converted to the fields' types; a value of another type is an error that names
  ``section.key``, the expected type and the value."""
  types = {f.name: str(f.type) for f in dataclasses.fields(klass)}
  out = {}
  for key, value in values.items():
    if key not in types:
      out[key] = value
      continue
    value = _coerce(value, types[key])
    kinds = [t.strip() for t in types[key].split("|")]
    expected = tuple(_TYPES[t] for t in kinds if t in _TYPES)
    wrong_bool = isinstance(value, bool) and "bool" not in kinds
    if expected and len(expected) == len(kinds) and (not isinstance(value, expected) or wrong_bool):
      raise ValueError(f"{section}.{key}: expected {types[key]}, got {value!r}")
    out[key] = value
  return out


def apply_overrides(values: dict, overrides: list[str] | tuple[str, ...]) -> dict:
  """Applies ``section.key=value`` strings (values parsed as YAML) to a config dict."""
  values = copy.deepcopy(values)
  overrides = list(overrides)
  # a new model preset replaces the whole model section; other model.* overrides then apply on top
  presets = [o for o in overrides if o.split("=", 1)[0].strip() == "model.preset"]
  for item in presets:
    values["model"] = {"preset": yaml.safe_load(item.split("=", 1)[1])}
  overrides = [o for o in overrides if o not in presets]
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"override {item!r} is not of the form section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
      raise ValueError(f"override key {key!r} must be section.key (e.g. optim.lr=2e-4)")
    section, name = parts
    value = yaml.safe_load(raw) if raw.strip() else None
    values.setdefault(section, {})
    if values[section] is None:
      values[section] = {}
    values[section][name] = value
  return values


PRESETS_DIR = Path(__file__).resolve().parent / "presets"
"""The training presets, one YAML file each (``configs/`` at the top of the repository links to them)."""
TRAIN_PRESETS = tuple(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))


def preset_path(name: str) -> Path:
  """The YAML file of the training preset ``name``."""
  if name not in TRAIN_PRESETS:
    raise ValueError(f"unknown training preset {name!r}; presets: {list(TRAIN_PRESETS)}")
  return PRESETS_DIR / f"{name}.yaml"


def get_train_config(name: str = "demo") -> TrainConfig:
  """The training preset ``name`` (its YAML file in ``presets/``), fully resolved."""
  return load_config(preset_path(name))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
  """A config from a YAML file or a preset name (None: the ``demo`` preset) with ``section.key=value`` overrides.

  A file may start from a preset with a top-level ``preset: NAME`` entry; its sections then override it.
  """
  path = (
    preset_path("demo" if path is None else str(path)) if path is None or str(path) in TRAIN_PRESETS else Path(path)
  )
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such config file (or give a preset name: {', '.join(TRAIN_PRESETS)})")
  with open(path) as fh:
    values = yaml.safe_load(fh) or {}
  if not isinstance(values, dict):
    raise ValueError(f"{path}: a config file must be a mapping of sections")
  base = values.pop("preset", None)
  if base is not None:
    merged = get_train_config(base).to_dict()
    for section, entries in values.items():
      if isinstance(entries, dict) and isinstance(merged.get(section), dict):
        if section == "model" and "preset" in entries and entries["preset"] != merged["model"]["preset"]:
          merged["model"] = {}
        merged[section].update(entries)
      else:
        merged[section] = entries
    values = merged
  values = apply_overrides(values, list(overrides))
  return TrainConfig.from_dict(values)


def dump_config(cfg: TrainConfig, path: str | Path) -> None:
  with open(path, "w") as fh:
    yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)


RESUME_OVERRIDABLE = (
  "run.steps",
  "run.eval_every",
  "run.log_every",
  "run.checkpoint_every",
  "run.keep_checkpoints",
  "run.progress_bar",
  "run.tensorboard",
  "run.async_checkpointing",
  "data.prefetch",
  "data.eval_atom_budget",
  "model.remat",
  "model.edge_chunk",
  "model.node_chunk",
)
"""What a resumed run may change: neither the model's function (``model.remat``, ``model.edge_chunk`` and
``model.node_chunk`` only change how it and its gradient are computed), nor the data order, nor the optimizer."""


def resumed_config(saved: TrainConfig, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
  """The config of a resumed run: the run's ``saved`` config with ``overrides`` (``section.key=value``).

  Only ``RESUME_OVERRIDABLE`` keys may change. When ``run.steps`` changes and the cosine schedule followed
  ``run.steps`` (``optim.schedule_steps`` null), the schedule keeps the old length, so the steps already taken
  keep their learning rates; past the old end the rate stays at its final value, ``lr * lr_min_factor``.
  """
  keys = [str(o).split("=", 1)[0].strip() for o in overrides]
  refused = [k for k in keys if k not in RESUME_OVERRIDABLE]
  if refused:
    raise ValueError(
      f"--resume cannot change {', '.join(refused)} (it would change the model, the data order or the "
      f"optimizer of the run); a resumed run may change: {', '.join(RESUME_OVERRIDABLE)}"
    )
  cfg = TrainConfig.from_dict(apply_overrides(saved.to_dict(), list(overrides)))
  if cfg.run.steps != saved.run.steps and saved.optim.schedule_steps is None:
    cfg = cfg.replace(optim=dataclasses.replace(cfg.optim, schedule_steps=saved.run.steps))
  return cfg


def check_resumable(saved: TrainConfig, cfg: TrainConfig) -> None:
  """Raises unless ``cfg`` is ``saved`` changed at most as ``resumed_config`` allows."""
  allowed = set(RESUME_OVERRIDABLE)
  if saved.optim.schedule_steps is None and cfg.optim.schedule_steps == saved.run.steps:
    allowed.add("optim.schedule_steps")
  diffs = [d for d in diff_configs(saved, cfg) if d.split(":", 1)[0] not in allowed]
  if diffs:
    raise ValueError("--resume needs the run's own config; it differs from the saved one in: " + "; ".join(diffs))


def diff_configs(a: TrainConfig, b: TrainConfig) -> list[str]:
  """``section.key: a -> b`` for every resolved field that differs."""
  da, db = a.to_dict(), b.to_dict()
  out = []
  for section in da:
    for key in sorted(set(da[section]) | set(db.get(section, {}))):
      va, vb = da[section].get(key), db.get(section, {}).get(key)
      if va != vb:
        out.append(f"{section}.{key}: {va!r} -> {vb!r}")
  return out
