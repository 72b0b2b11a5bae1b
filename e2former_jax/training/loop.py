"""The training loop, in named phases: set-up, data, state, the loop, the test.

``train(cfg, workdir)`` runs a whole ``TrainConfig``; ``train(cfg, workdir, resume=True)`` continues the run
in ``workdir`` from its newest "last" checkpoint exactly as if it had not stopped: parameters, optimizer
state, EMA, step, RNG, skip count and the position in the data order all come from the checkpoint (the data
order is a function of the seed and the epoch, so the remaining batches are the same). A resumed run may
change what ``config.RESUME_OVERRIDABLE`` lists (for example ``run.steps`` to extend a finished run).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from e2former_jax.checkpoint import (
  Checkpointer,
  assign_params,
  load_model,
  make_meta,
  read_meta,
  read_params,
  resolve_step_dir,
  unflatten,
)
from e2former_jax.config import get_config
from e2former_jax.data.batching import GraphLoader
from e2former_jax.data.sources import read_structures
from e2former_jax.evaluation import Predictions, error_table, evaluate_model, predict_dataset
from e2former_jax.model import E2Former
from e2former_jax.predict import split_model
from e2former_jax.trained_domain import TrainedDomain
from e2former_jax.training.config import TrainConfig, check_resumable, dump_config, load_config
from e2former_jax.training.data import element_references, net_force_check, split_validation, without_untrained_elements
from e2former_jax.training.distributed import (
  ShardedGraphLoader,
  compiled_sharded_train_step,
  data_mesh,
  local_copy,
  replicate,
)
from e2former_jax.training.losses import loss_terms
from e2former_jax.training.metrics import MetricsLogger
from e2former_jax.training.step import compiled_train_step, eval_params, init_state


@dataclasses.dataclass
class TrainResult:
  """What a run did.

  Attributes:
    workdir: the run directory.
    step: steps done.
    skipped: steps skipped (non-finite loss or gradients).
    valid: validation metrics at the last validation.
    best: {"metric", "value", "step"} of the best checkpoint.
    test_table: the error table of the test set (best weights), or None.
    wall_s: wall time of ``train`` (data, compilation, steps, validation, test).
    interrupted: stopped by ``stop_after`` before the end.
  """

  workdir: Path
  step: int
  skipped: int
  valid: dict
  best: dict
  test_table: dict | None
  wall_s: float
  interrupted: bool = False


def validation_metrics(p: Predictions, cfg: TrainConfig) -> dict:
  """The training loss and MAEs over a whole validation set (same loss function as the steps)."""
  e_ok = np.isfinite(p.energy_ref)
  f_ok = np.all(np.isfinite(p.forces_ref), axis=1)
  terms = loss_terms(
    jnp.asarray(p.energy_pred),
    jnp.asarray(np.where(e_ok, p.energy_ref, 0.0)),
    jnp.asarray(e_ok),
    jnp.ones(len(e_ok), bool),
    jnp.asarray(p.num_atoms),
    jnp.asarray(p.forces_pred),
    jnp.asarray(np.where(f_ok[:, None], p.forces_ref, 0.0)),
    jnp.asarray(f_ok),
    cfg.loss,
  )
  table = error_table(p)["overall"]
  return {
    "loss": float(terms["loss"]),
    "energy_loss": float(terms["energy_loss"]),
    "force_loss": float(terms["force_loss"]),
    "energy_mae": table["energy_mae_meV_per_atom"] / 1e3,
    "force_mae": table["force_mae_meV_per_A"] / 1e3,
    "energy_rmse": table["energy_rmse_meV_per_atom"] / 1e3,
    "force_rmse": table["force_rmse_meV_per_A"] / 1e3,
  }


def _say(msg: str, bar=None) -> None:
  if bar is not None:
    bar.write(msg, file=sys.stderr)
  else:
    print(msg, file=sys.stderr, flush=True)


class TrainingRun:
  """One run of ``cfg`` in ``workdir``, phase by phase: ``set_up``, ``load_data``, ``build_state``, ``loop``,
  ``test`` (``train`` calls them in that order). Arguments as ``train``."""

  def __init__(self, cfg: TrainConfig, workdir: str | Path, *, resume=False, datasets=None, verbose=True, devices=None):
    self.cfg, self.workdir, self.resume = cfg, Path(workdir), resume
    self.datasets, self.verbose, self.devices = datasets, verbose, devices
    self.model_cfg = cfg.model_config()
    self.best = {"metric": cfg.run.best_metric, "value": None, "step": None}
    self.last_valid: dict = {}
    self.epoch = self.position = self.step = 0

  # set-up ------------------------------------------------------------------------------------------------

  def set_up(self) -> None:
    """The run directory (new, or the run to resume with a config it accepts) and the device mesh."""
    cfg, workdir = self.cfg, self.workdir
    path = workdir / "config.yaml"
    if self.resume:
      if not path.exists():
        raise FileNotFoundError(f"{workdir}: no run to resume (no config.yaml)")
      check_resumable(load_config(path), cfg)
    elif (workdir / "checkpoints").exists() and any((workdir / "checkpoints").rglob("meta")):
      raise FileExistsError(
        f"{workdir} already holds checkpoints: pass --resume to continue that run, or choose another --workdir"
      )
    workdir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, path)
    mesh = data_mesh(self.devices)
    self.num_devices = int(mesh.devices.size)
    self.mesh = None if self.num_devices == 1 else mesh  # one device: the plain step
    # single-device views of the (replicated) state for evaluation and checkpoints
    self.local = (lambda tree: tree) if self.mesh is None else local_copy
    run = cfg.run
    self.ckpt = Checkpointer(workdir, keep=run.keep_checkpoints, async_checkpointing=run.async_checkpointing)
    if self.resume:
      if self.ckpt.latest_step() is None:
        raise FileNotFoundError(f"{workdir}: no finished checkpoint to resume from")
      self.resumed_flat, self.resumed_meta, _ = self.ckpt.read_state()
      if int(self.resumed_meta.get("devices", 1)) != self.num_devices:
        raise ValueError(
          f"--resume: the run trained on {self.resumed_meta.get('devices', 1)} device(s), not "
          f"{self.num_devices} (the global batches depend on it); pass --devices accordingly"
        )

  # data --------------------------------------------------------------------------------------------------

  def load_data(self) -> None:
    """Train, validation and (optional) test structures: ``datasets`` if given, else ``cfg.data``'s paths."""
    run, dcfg = self.cfg.run, self.cfg.data
    if self.datasets is not None:
      train_data, valid_data, test_data = (self.datasets.get(k) for k in ("train", "valid", "test"))
      if valid_data is None:
        train_data, valid_data = split_validation(train_data, dcfg.valid_fraction, run.seed)
    else:
      read = lambda spec, limit: read_structures(spec, dcfg.format, dcfg.reader, dcfg.in_memory, limit)
      train_data = read(dcfg.train, dcfg.max_train_structures)
      if dcfg.valid is None:
        train_data, valid_data = split_validation(train_data, dcfg.valid_fraction, run.seed)
      else:
        valid_data = read(dcfg.valid, dcfg.max_eval_structures)
      test_data = read(dcfg.test, dcfg.max_eval_structures) if dcfg.test else None
    if not self.resume:
      problem = net_force_check(train_data, seed=run.seed)
      if problem:
        warnings.warn(problem, stacklevel=3)
    self.train_data = train_data
    self.domain = self._trained_domain()
    self.valid_data = without_untrained_elements(valid_data, self.domain, "validation")
    self.test_data = None if test_data is None else without_untrained_elements(test_data, self.domain, "test")

  # state -------------------------------------------------------------------------------------------------

  def _trained_domain(self) -> TrainedDomain:
    """Elements, charges and multiplicities the run trains on (recorded in its checkpoints): those of the
    training set, with those of the ``--init-from`` checkpoint added; a resumed run keeps its recorded ones."""
    if self.resume:
      return TrainedDomain.from_meta(self.resumed_meta)
    domain = TrainedDomain.of_structures(self.train_data)
    if self.cfg.init.checkpoint:
      domain = domain.union(TrainedDomain.from_checkpoint(self.cfg.init.checkpoint))
    return domain

  def _element_references(self) -> dict[int, float]:
    dcfg = self.cfg.data
    if self.resume:
      return {int(z): v for z, v in self.resumed_meta["element_references"].items()}
    if dcfg.element_references == "init":
      if not self.cfg.init.checkpoint:
        raise ValueError("data.element_references=init needs init.checkpoint (--init-from)")
      return {int(z): v for z, v in read_meta(self.cfg.init.checkpoint)["element_references"].items()}
    return element_references(dcfg.element_references, self.train_data, seed=self.cfg.run.seed)

  def build_state(self) -> None:
    """Model, element references, initial weights, optimizer state (or the resumed state), loader, step."""
    cfg, run, dcfg, model_cfg = self.cfg, self.cfg.run, self.cfg.data, self.model_cfg
    model = E2Former(model_cfg, rngs=nnx.Rngs(run.seed))
    self.refs = self._element_references()
    model.set_element_energies(self.refs)
    if cfg.init.checkpoint and not self.resume:
      report = assign_params(model, read_params(cfg.init.checkpoint), strict=cfg.init.strict)
      if self.verbose:
        _say(
          f"init from {cfg.init.checkpoint}: loaded {len(report['loaded'])} parameter arrays"
          + "".join(f", {k} {len(v)}" for k, v in report.items() if k != "loaded" and v)
        )
    _, params, self.elements, _ = split_model(model)
    self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    self.state = init_state(params, cfg.optim, run.seed)
    if self.resume:
      self.state, meta = unflatten(self.resumed_flat, self.state, "state"), self.resumed_meta
      self.epoch, self.position = int(meta["data_position"]["epoch"]), int(meta["data_position"]["batch"])
      self.best = dict(meta["best"])
    self.step = int(self.state.step)
    dtype = model_cfg.numpy_dtype
    loader_args = dict(
      atom_budget=dcfg.atom_budget,
      max_structures=dcfg.max_structures,
      num_buckets=dcfg.num_buckets,
      shuffle=True,
      seed=run.seed,
      prefetch=dcfg.prefetch,
      dtype=dtype,
    )
    graph_args = (self.train_data, model_cfg.cutoff, model_cfg.max_neighbors)
    if self.mesh is None:
      self.loader = GraphLoader(*graph_args, **loader_args)
      self.step_fn = compiled_train_step(model_cfg, cfg.optim, cfg.loss, cfg.schedule_steps())
    else:
      self.loader = ShardedGraphLoader(*graph_args, mesh=self.mesh, **loader_args)
      self.step_fn = compiled_sharded_train_step(model_cfg, cfg.optim, cfg.loss, cfg.schedule_steps(), self.mesh)
      self.state, self.elements = replicate((self.state, self.elements), self.mesh)
    # several hosts: process 0 writes the run's logs, the others their own (same values) in process<h>/
    log_dir = self.workdir if jax.process_index() == 0 else self.workdir / f"process{jax.process_index()}"
    self.logger = MetricsLogger(log_dir, tensorboard=run.tensorboard, resume_step=self.step if self.resume else None)
    if self.verbose:
      _say(self._summary())

  def _summary(self) -> str:
    cfg, model_cfg, dcfg = self.cfg, self.model_cfg, self.cfg.data
    sizes = f"{len(self.train_data)} train / {len(self.valid_data)} valid" + (
      "" if self.test_data is None else f" / {len(self.test_data)} test"
    )
    text = (
      f"{self.workdir}: {'resuming at step ' + str(self.step) if self.resume else 'new run'}; model "
      f"{model_cfg_name(cfg)} ({self.num_params:,} parameters, forces {model_cfg.forces}); {sizes} structures; "
      f"{self.loader.padding_stats(self.epoch)}"
    )
    if self.mesh is not None:
      text += (
        f"; data-parallel on {self.num_devices} devices ({jax.process_count()} process(es)), global batch "
        f"{self.num_devices} x {dcfg.atom_budget} atoms, {self.loader.num_batches(self.epoch)} steps per epoch"
      )
    return text

  # the loop ----------------------------------------------------------------------------------------------

  def _meta(self, valid_metrics=None) -> dict:
    return make_meta(
      self.model_cfg,
      self.refs,
      **self.domain.to_meta(),
      step=self.step,
      params="ema" if self.cfg.optim.ema_decay is not None else "raw",
      train_config=self.cfg.to_dict(),
      data_position={"epoch": self.epoch, "batch": self.position},
      best=self.best,
      valid=valid_metrics or {},
      devices=self.num_devices,
    )

  def _log_window(self, values: list, seconds: float, atoms: int, bar) -> dict:
    """Logs the mean metrics of the steps since the last log (non-finite, skipped steps left out)."""
    bad = [v for v in values if not bool(v["finite"])]
    row = {
      k: float(np.mean([float(v[k]) for v in values if bool(v["finite"])] or [math.nan]))
      for k in ("loss", "energy_loss", "force_loss", "energy_mae", "force_mae", "grad_norm")
    }
    rate = atoms / max(seconds, 1e-9)
    row.update(
      lr=float(values[-1]["lr"]), atoms_per_s=rate, epoch=self.epoch, skipped=int(jax.device_get(self.state.skipped))
    )
    self.logger.log("train", self.step, row)
    if bad and self.verbose:
      _say(
        f"step {self.step}: {len(bad)} step(s) skipped in the last {len(values)} (non-finite loss or "
        f"gradients); {row['skipped']} skipped so far",
        bar,
      )
    if bar is not None:
      bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{row['lr']:.2e}", atoms_s=f"{rate:.0f}", refresh=False)
    return row

  def _validate(self, bar) -> bool:
    """Validation metrics of the current weights; returns whether they are the best so far."""
    run, dcfg = self.cfg.run, self.cfg.data
    preds = predict_dataset(
      self.model_cfg,
      self.local(eval_params(self.state)),
      self.local(self.elements),
      self.valid_data,
      atom_budget=dcfg.eval_atom_budget or dcfg.atom_budget,
      num_buckets=1,
      prefetch=dcfg.prefetch,
    )
    self.last_valid = validation_metrics(preds, self.cfg)
    self.logger.log("valid", self.step, self.last_valid)
    value = self.last_valid[run.best_metric]
    improved = self.best["value"] is None or value < self.best["value"]
    if improved:
      self.best = {"metric": run.best_metric, "value": value, "step": self.step}
    if self.verbose:
      v = self.last_valid
      _say(
        f"step {self.step}: valid loss {v['loss']:.4g}, E MAE {1e3 * v['energy_mae']:.2f} meV/atom, "
        f"F MAE {1e3 * v['force_mae']:.1f} meV/A" + (" (best)" if improved else ""),
        bar,
      )
    return improved

  def _after_step(self, bar) -> None:
    """Validation and checkpoints due at this step."""
    run = self.cfg.run
    at_eval = self.step % run.eval_every == 0 or self.step == run.steps
    at_ckpt = (
      at_eval if run.checkpoint_every is None else (self.step % run.checkpoint_every == 0 or self.step == run.steps)
    )
    if not (at_eval or at_ckpt):
      return
    improved = self._validate(bar) if at_eval else False
    self.ckpt.save(
      self.step,
      params=self.local(eval_params(self.state)),
      state=self.local(self.state),
      meta=self._meta(self.last_valid if at_eval else None),
      best=improved,
      last=at_ckpt,
    )

  def loop(self, stop_after: int | None = None) -> bool:
    """Steps until ``run.steps`` (or ``stop_after``: then returns True, as a killed run would stop)."""
    run = self.cfg.run
    bar = None
    if self.verbose and run.progress_bar:
      from tqdm import tqdm

      bar = tqdm(
        total=run.steps,
        initial=self.step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=1.0,
      )
    pending: list = []
    window_t, window_atoms, compiled = time.time(), 0, False
    try:
      while self.step < run.steps:
        num_batches = self.loader.num_batches(self.epoch)
        for i, batch in enumerate(self.loader.epoch(self.epoch)):
          if i < self.position:
            continue
          self.state, metrics = self.step_fn(self.state, self.elements, batch)
          if not compiled:  # keep compilation out of the atoms/s of the first window
            metrics = jax.device_get(jax.block_until_ready(metrics))
            compiled, window_t, window_atoms = True, time.time(), -int(metrics["atoms"])
          self.step += 1
          self.position = i + 1
          if self.position >= num_batches:
            self.epoch, self.position = self.epoch + 1, 0
          pending.append(metrics)
          if self.step % run.log_every == 0 or self.step == run.steps:
            values, pending = jax.device_get(pending), []
            now = time.time()
            self._log_window(values, now - window_t, window_atoms + sum(int(v["atoms"]) for v in values), bar)
            window_t, window_atoms = now, 0
          if bar is not None:
            bar.update(1)
          if stop_after is not None and self.step >= stop_after and self.step < run.steps:
            return True
          self._after_step(bar)
          if self.step >= run.steps:
            break
    finally:
      if bar is not None:
        bar.close()
      self.logger.close()
      self.ckpt.close()
    return False

  # the test ----------------------------------------------------------------------------------------------

  def test(self) -> dict | None:
    """The error table of the test set with the best weights (else the last), also in ``test_errors.json``."""
    if self.test_data is None:
      return None
    source = self.ckpt.root / ("best" if self.best["step"] is not None else "last")
    dcfg = self.cfg.data
    model = load_model(source)
    preds = evaluate_model(
      model,
      self.test_data,
      atom_budget=dcfg.eval_atom_budget or dcfg.atom_budget,
      num_buckets=1,
      prefetch=dcfg.prefetch,
    )
    table = error_table(preds)
    step_dir = resolve_step_dir(source)
    (self.workdir / "test_errors.json").write_text(
      json.dumps({"checkpoint": str(step_dir), "step": self.best["step"], **table}, indent=1)
    )
    return table


def train(
  cfg: TrainConfig,
  workdir: str | Path,
  *,
  resume: bool = False,
  stop_after: int | None = None,
  datasets: dict[str, Sequence] | None = None,
  verbose: bool = True,
  devices: int | None = None,
) -> TrainResult:
  """Runs (or with ``resume`` continues) the training run ``cfg`` in ``workdir``.

  Args:
    cfg: the run.
    workdir: run directory (config, checkpoints, logs, test errors).
    resume: continue from the newest "last" checkpoint in ``workdir``; ``cfg`` must be the run's own config,
      changed at most in what ``config.RESUME_OVERRIDABLE`` lists (``config.resumed_config`` builds it).
    stop_after: stop after this many steps without the final validation and checkpoint, as a killed run
      would (for tests of resuming).
    datasets: in-memory data sets ``{"train": [...], "valid": [...], "test": [...]}`` (lists of
      ``ase.Atoms`` with energies/forces) used instead of ``cfg.data``'s paths.
    verbose: progress bar (if ``cfg.run.progress_bar``) and messages on stderr.
    devices: local devices to train on (default: all). With more than one device in all (over every
      process), each step is a global batch of one ``data.atom_budget`` batch per device, trained
      data-parallel (``training/distributed.py``); a resumed run must use the same number of devices.
  """
  t_start = time.time()
  run = TrainingRun(cfg, workdir, resume=resume, datasets=datasets, verbose=verbose, devices=devices)
  run.set_up()
  run.load_data()
  run.build_state()
  interrupted = run.loop(stop_after)
  test_table = None if interrupted else run.test()
  skipped = int(jax.device_get(run.state.skipped))
  wall = time.time() - t_start
  if verbose and not interrupted:
    best = run.best
    _say(
      f"{run.step} steps ({skipped} skipped) in {wall:.0f} s; best {best['metric']} {best['value']:.4g} at step "
      f"{best['step']}"
      if best["value"] is not None
      else f"{run.step} steps in {wall:.0f} s"
    )
  return TrainResult(
    workdir=run.workdir,
    step=run.step,
    skipped=skipped,
    valid=run.last_valid,
    best=run.best,
    test_table=test_table,
    wall_s=wall,
    interrupted=interrupted,
  )


def model_cfg_name(cfg: TrainConfig) -> str:
  """``small`` or ``small (channels=16, num_layers=1)``: the preset and the fields that differ from it."""
  base = cfg.model.get("preset", "small")
  preset, resolved = get_config(base).to_dict(), cfg.model_config().to_dict()
  changed = [f"{k}={v}" for k, v in resolved.items() if preset[k] != v]
  return base if not changed else f"{base} ({', '.join(changed)})"
