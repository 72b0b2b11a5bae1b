"""orbax checkpoints of training runs and trained models.

A run directory (``--workdir``) holds::

    config.yaml                       the fully resolved training config
    checkpoints/last/<step>/          state (exact resume), params, meta   -- the newest ``keep`` steps
    checkpoints/best/<step>/          params, meta                         -- best by validation
    metrics.csv, tensorboard/         logs

A step directory holds ``params`` (the weights to use: the EMA when it is on; named flat arrays),
``meta`` (JSON: model config, element reference energies, training config, step, metrics) and, in "last"
checkpoints, ``state`` (parameters, optimizer state, EMA, step, RNG, skip count: everything a step changes).
So ``load_model`` needs nothing but the directory.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from e2former_jax.config import ModelConfig
from e2former_jax.model import E2Former
from e2former_jax.trained_domain import TrainedDomain
from e2former_jax.tree_paths import path_name

FORMAT = "e2former-jax-checkpoint"
VERSION = 2
"""Version history of the parameter names (read back by migrating older names):
  1: the gate's parameters directly under ``blocks/<i>/attention/``;
  2: under ``blocks/<i>/attention/gate/`` (the ``Gate`` module)."""
_GATE_PARAMETERS = re.compile(r"(blocks/\d+/attention/)(edge_mlp|direction_proj|direction_mlp|direction_gate|rho_mlp)/")
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "demo_checkpoint"
"""The shipped demo model (the ``small`` preset trained by ``python train.py``; see its ``CARD.md``)."""


def flatten(tree) -> dict[str, np.ndarray]:
  """``{"a/b/0/kernel": array}`` with numpy copies of every leaf (safe while device buffers are donated)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = path_name(path)
    if name in out:
      raise ValueError(f"two leaves map to the checkpoint name {name!r}")
    out[name] = np.array(leaf, copy=True)
  return out


def unflatten(flat: dict[str, Any], template, what: str = "state"):
  """``template`` with every leaf replaced by ``flat[name]``; names, shapes and dtypes must all match."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  names = [path_name(p) for p, _ in leaves]
  missing = sorted(set(names) - set(flat))
  unexpected = sorted(set(flat) - set(names))
  if missing or unexpected:
    raise ValueError(
      f"checkpoint {what} does not match: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}"
      f", unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
    )
  values = []
  for (_path, leaf), name in zip(leaves, names):
    value = np.asarray(flat[name])
    if value.shape != np.shape(leaf) or value.dtype != np.asarray(leaf).dtype:
      raise ValueError(
        f"checkpoint {what} entry {name!r} has {value.dtype}{list(value.shape)}, expected "
        f"{np.asarray(leaf).dtype}{list(np.shape(leaf))}"
      )
    values.append(jax.numpy.asarray(value))
  return jax.tree_util.tree_unflatten(treedef, values)


def element_references_of(model: E2Former, head: str | None = None) -> dict[int, float]:
  """The non-zero element reference energies (eV) of head ``head`` (None: the default head)."""
  table = np.asarray(model.head(head).element_energy[...], dtype=np.float64)
  return {int(z): float(table[z]) for z in np.nonzero(table)[0]}


def head_meta(model: E2Former) -> dict:
  """Meta entries of a multi-head model: ``"head_element_references"`` (the heads after the first; the first's
  are ``"element_references"``) and, when the model knows them (``model.head_elements``, set on import),
  ``"head_elements"`` (each head's trained elements) and ``"elements"`` (the default head's)."""
  heads = model.config.heads
  meta = {}
  if len(heads) > 1:
    meta["head_element_references"] = {
      head: {str(z): v for z, v in sorted(element_references_of(model, head).items())} for head in heads[1:]
    }
  known = getattr(model, "head_elements", None) or {}
  if known:
    meta["head_elements"] = {head: sorted(int(z) for z in known[head]) for head in heads if head in known}
    if heads[0] in known:
      meta["elements"] = meta["head_elements"][heads[0]]
  return meta


def trained_domain(path: str | Path, head: str | None = None) -> TrainedDomain:
  """``TrainedDomain.from_checkpoint``, with the elements of head ``head`` where the meta lists them per head."""
  meta = read_meta(path)
  domain = TrainedDomain.from_meta(meta)
  elements = (meta.get("head_elements") or {}).get(head) if head is not None else None
  return domain if elements is None else dataclasses.replace(domain, elements=tuple(elements))


def make_meta(
  model_cfg: ModelConfig,
  element_references: dict[int, float],
  *,
  elements: Iterable[int] | None = None,
  charges: Iterable[int] | None = None,
  multiplicities: Iterable[int] | None = None,
  **extra,
) -> dict:
  """A checkpoint's meta: model config, element references, versions, and ``extra`` entries.

  ``elements``, ``charges``, ``multiplicities``: what the model was trained on (atomic numbers, total charges in
  e, multiplicities 2S+1), stored sorted; the calculator, evaluation and MD refuse other elements and warn about
  other charges and multiplicities (``trained_domain.TrainedDomain``, whose ``of_structures(train).to_meta()``
  gives all three). Without ``elements`` the keys of ``element_references`` stand for them.
  """
  meta = {
    "format": FORMAT,
    "version": VERSION,
    "model_config": model_cfg.to_dict(),
    "element_references": {str(int(z)): float(v) for z, v in sorted(element_references.items())},
    "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "versions": {"jax": jax.__version__, "python": platform.python_version()},
  }
  meta.update(TrainedDomain(elements, charges, multiplicities).to_meta())
  meta.update(extra)
  return meta


def _step_dirs(directory: Path) -> list[int]:
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit() and (p / "meta").exists())


class Checkpointer:
  """Writes "last" checkpoints (keep ``keep``) and the best-by-validation one, asynchronously by default.

  Only steps whose write finished are ever read back: orbax writes into a temporary directory and renames
  it when the step is complete, so a run killed mid-write leaves the previous step intact.
  """

  def __init__(self, workdir: str | Path, keep: int = 3, async_checkpointing: bool = True, keep_best: int = 1):
    self.root = Path(workdir).resolve() / "checkpoints"
    options = lambda n: ocp.CheckpointManagerOptions(
      max_to_keep=n, create=True, enable_async_checkpointing=async_checkpointing
    )
    self.last = ocp.CheckpointManager(self.root / "last", options=options(keep), item_names=("state", "params", "meta"))
    self.best = ocp.CheckpointManager(self.root / "best", options=options(keep_best), item_names=("params", "meta"))

  def save(self, step: int, *, params, meta: dict, state=None, best: bool = False, last: bool = True) -> None:
    """Saves ``params`` (and ``state``) at ``step``: to "last" when ``last``, to "best" when ``best``."""
    flat_params = flatten(params)
    meta = json.loads(json.dumps(meta))  # a plain JSON copy, fixed now
    if last:
      items = dict(params=ocp.args.StandardSave(flat_params), meta=ocp.args.JsonSave(meta))
      if state is not None:
        items["state"] = ocp.args.StandardSave(flatten(state))
      self.last.save(step, args=ocp.args.Composite(**items), force=True)
    if best:
      self.best.save(
        step,
        args=ocp.args.Composite(params=ocp.args.StandardSave(flat_params), meta=ocp.args.JsonSave(meta)),
        force=True,
      )

  def latest_step(self) -> int | None:
    return self.last.latest_step()

  def read_state(self, step: int | None = None) -> tuple[dict[str, np.ndarray], dict, int]:
    """(flat state arrays, meta, step) of a "last" step; by default the newest readable one: a newest step
    that cannot be read (a corrupt or truncated file) is skipped with a warning naming it."""
    steps = sorted(self.last.all_steps(), reverse=True) if step is None else [step]
    if not steps:
      raise FileNotFoundError(f"no checkpoint to resume from in {self.root / 'last'}")
    for i, candidate in enumerate(steps):
      try:
        restored = self.last.restore(
          candidate, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        )
        if restored.state is None:
          raise FileNotFoundError(f"{self.root / 'last' / str(candidate)} holds no training state")
      except Exception as err:  # orbax raises many types for damaged files; the next step is tried
        if step is not None or i + 1 == len(steps):
          raise ValueError(f"checkpoint {self.root / 'last' / str(candidate)} cannot be read: {err}") from err
        bad = self.root / "last" / str(candidate)
        kept = bad.with_name(f"{candidate}.unreadable")
        bad.rename(kept)  # out of the way of the step that will be written again, not deleted
        self.last.reload()
        warnings.warn(
          f"checkpoint step {candidate} in {self.root / 'last'} cannot be read ({type(err).__name__}: "
          f"{str(err).splitlines()[0] if str(err) else ''}); resuming from step {steps[i + 1]} instead "
          f"(the unreadable step is kept as {kept.name})",
          stacklevel=2,
        )
        continue
      if i:  # best steps past the fallback step are redone by the resumed run: kept aside, not deleted
        for later in [t for t in self.best.all_steps() if t > candidate]:
          (self.root / "best" / str(later)).rename(self.root / "best" / f"{later}.superseded")
        self.best.reload()
      meta = dict(restored.meta)
      flat = {k: np.asarray(v) for k, v in dict(restored.state).items()}
      return migrate_names(flat, int(meta.get("version", 1))), meta, candidate

  def restore(self, template_state, step: int | None = None):
    """(state, meta) of a "last" step (default: the newest readable); ``template_state`` gives the structure."""
    flat, meta, _ = self.read_state(step)
    return unflatten(flat, template_state, "state"), meta

  def wait(self) -> None:
    self.last.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.last.close()
    self.best.close()


def resolve_step_dir(path: str | Path) -> Path:
  """The step directory that ``path`` names: a step directory itself; a run directory (best, else last,
  newest step); or a ``checkpoints/best`` / ``checkpoints/last`` directory (newest step). Absolute."""
  path = Path(path).resolve()
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
  if (path / "meta").exists() and (path / "params").exists():
    return path
  candidates = []
  if (path / "checkpoints").is_dir():
    candidates = [path / "checkpoints" / "best", path / "checkpoints" / "last"]
  elif path.name in ("best", "last") or _step_dirs(path):
    candidates = [path]
  for directory in candidates:
    steps = _step_dirs(directory)
    if steps:
      return directory / str(steps[-1])
  raise FileNotFoundError(
    f"{path}: no finished checkpoint found (expected a step directory with params/ and "
    "meta/, or a run directory with checkpoints/best or checkpoints/last)"
  )


def migrate_names(flat: dict[str, Any], version: int) -> dict[str, Any]:
  """Flat arrays named as checkpoint format ``version`` wrote them, renamed to this version's names (the names
  may carry prefixes, such as the optimizer state's)."""
  if version < 2:
    flat = {_GATE_PARAMETERS.sub(r"\1gate/\2/", name): value for name, value in flat.items()}
  return flat


def read_meta(path: str | Path) -> dict:
  step_dir = resolve_step_dir(path)
  try:
    with open(step_dir / "meta" / "metadata") as fh:
      meta = json.load(fh)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
    raise ValueError(f"{step_dir}: unreadable checkpoint meta/metadata ({type(err).__name__}: {err})") from None
  if not isinstance(meta, dict):
    raise ValueError(f"{step_dir}: checkpoint meta/metadata holds {type(meta).__name__}, not a JSON object")
  if meta.get("format") != FORMAT:
    raise ValueError(f"{step_dir}: not an {FORMAT} (meta format {meta.get('format')!r})")
  if int(meta.get("version", 0)) > VERSION:
    raise ValueError(f"{step_dir}: checkpoint version {meta['version']} is newer than this code ({VERSION})")
  return meta


def read_params(path: str | Path) -> dict[str, np.ndarray]:
  """The named flat parameter arrays of a checkpoint."""
  step_dir = resolve_step_dir(path)
  version = int(read_meta(step_dir).get("version", 1))
  with ocp.StandardCheckpointer() as ckptr:
    return migrate_names({k: np.asarray(v) for k, v in ckptr.restore(step_dir / "params").items()}, version)


def assign_params(model: E2Former, flat: dict[str, np.ndarray], strict: bool = True) -> dict[str, list[str]]:
  """Copies named arrays into the model's ``nnx.Param``s.

  With ``strict`` every parameter must be present with its shape and nothing else may be there. Otherwise
  the parameters whose name and shape match are loaded and the rest keep their values (the authors'
  ``model_state_unstrict``). Returns the names ``loaded``, ``missing`` (kept), ``unexpected`` (ignored) and
  ``mismatched`` (shape differs; kept).
  """
  params = nnx.state(model, nnx.Param)
  report = {"loaded": [], "missing": [], "unexpected": [], "mismatched": []}
  names = set()

  def pick(path, leaf):
    name = path_name(path)
    names.add(name)
    if name not in flat:
      report["missing"].append(name)
      return leaf
    value = np.asarray(flat[name])
    if value.shape != leaf.shape:
      report["mismatched"].append(name)
      return leaf
    report["loaded"].append(name)
    return jax.numpy.asarray(value, dtype=leaf.dtype)

  new = jax.tree_util.tree_map_with_path(pick, params)
  report["unexpected"] = sorted(set(flat) - names)
  if strict and (report["missing"] or report["unexpected"] or report["mismatched"]):
    raise ValueError(
      "strict parameter load failed: "
      + "; ".join(f"{k} {v[:5]}{' ...' if len(v) > 5 else ''}" for k, v in report.items() if k != "loaded" and v)
      + " (load with strict=False to keep the parameters that do not match)"
    )
  nnx.update(model, new)
  return report


RUNTIME_OVERRIDES = ("dtype", "attention_impl", "matmul_precision", "remat", "edge_chunk", "node_chunk")
"""``ModelConfig`` fields a trained model may be loaded with: they change how it is computed, not what."""


def load_model(path: str | Path, *, dtype: str | None = None, **config_overrides) -> E2Former:
  """The trained model of a checkpoint, with its element reference energies set.

  Args:
    path: a run directory (its best checkpoint, else its newest last one), a ``checkpoints/best`` or
      ``checkpoints/last`` directory, or a step directory.
    dtype: cast to "float32"/"float64" (default: as trained).
    **config_overrides: ``RUNTIME_OVERRIDES`` only (``attention_impl="jnp_edge"``, ``matmul_precision``); a
      field that changes the trained function (cutoff, K, ...) is refused by name.
  """
  refused = sorted(set(config_overrides) - set(RUNTIME_OVERRIDES))
  if refused:
    raise TypeError(
      f"{', '.join(map(repr, refused))} would change the trained model and cannot be overridden when loading a "
      f"checkpoint; allowed: {', '.join(RUNTIME_OVERRIDES)}"
    )
  step_dir = resolve_step_dir(path)
  meta = read_meta(step_dir)
  cfg = ModelConfig.from_dict(meta["model_config"])
  if dtype is not None:
    config_overrides["dtype"] = dtype
  if config_overrides:
    cfg = cfg.replace(**config_overrides)
  model = E2Former(cfg, rngs=nnx.Rngs(0))
  assign_params(model, read_params(step_dir), strict=True)
  model.set_element_energies({int(z): float(v) for z, v in meta["element_references"].items()})
  for head, references in meta.get("head_element_references", {}).items():
    model.set_element_energies({int(z): float(v) for z, v in references.items()}, head=head)
  if "head_elements" in meta:
    model.head_elements = {head: tuple(elements) for head, elements in meta["head_elements"].items()}
  return model


def export_model(model: E2Former, directory: str | Path, **meta_extra) -> Path:
  """Writes a standalone step directory (params + meta, no optimizer state) that ``load_model`` reads."""
  directory = Path(directory).resolve()
  if directory.exists() and any(directory.iterdir()):
    raise FileExistsError(f"{directory} exists and is not empty")
  meta = make_meta(model.config, element_references_of(model), **{**head_meta(model), **meta_extra})
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(
      directory,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(flatten(nnx.state(model, nnx.Param))), meta=ocp.args.JsonSave(meta)
      ),
      force=True,
    )
  return directory


def export_run(run: str | Path, out: str | Path) -> Path:
  """A standalone copy of a run's checkpoint (best, else last): weights, config, element references, and the
  run's training config, validation metrics and test errors (``test_errors.json``) in its meta."""
  step_dir = resolve_step_dir(run)
  meta = read_meta(step_dir)
  keep = ("step", "train_config", "valid", "best", "params", "elements", "charges", "multiplicities", "head_elements")
  extra = {k: meta[k] for k in keep if k in meta}
  errors = Path(run) / "test_errors.json"
  if errors.exists():  # without its "checkpoint" entry, a path on the machine that trained
    extra["test_errors"] = {k: v for k, v in json.loads(errors.read_text()).items() if k != "checkpoint"}
  extra["exported_from"] = str(step_dir.relative_to(Path(run).resolve().parent))  # "<run>/checkpoints/..."
  return export_model(load_model(step_dir), out, **extra)


def main(argv=None) -> int:
  import argparse

  parser = argparse.ArgumentParser(
    prog="python -m e2former_jax.checkpoint",
    description="Export a run's checkpoint (best, else last) as a standalone weights-only step directory.",
  )
  parser.add_argument("run", help="run directory or step directory")
  parser.add_argument("out", help="new directory")
  args = parser.parse_args(argv)
  print(export_run(args.run, args.out))
  return 0


__all__ = [
  "Checkpointer",
  "DEMO_CHECKPOINT",
  "load_model",
  "export_model",
  "export_run",
  "read_meta",
  "read_params",
  "assign_params",
  "resolve_step_dir",
  "make_meta",
  "RUNTIME_OVERRIDES",
  "flatten",
  "unflatten",
  "migrate_names",
  "element_references_of",
  "head_meta",
  "trained_domain",
]


if __name__ == "__main__":
  raise SystemExit(main())
