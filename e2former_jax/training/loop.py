"""The training loop: data, model, element references, jitted steps, validation, checkpoints, logs, test table.

``train(cfg, workdir)`` runs a whole ``TrainConfig``; ``train(cfg, workdir, resume=True)`` continues the run
in ``workdir`` from its newest "last" checkpoint exactly as if it had not stopped: parameters, optimizer
state, EMA, step, RNG, skip count and the position in the data order all come from the checkpoint (the data
order is a function of the seed and the epoch, so the remaining batches are the same).
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

from e2former_jax.checkpoint import Checkpointer, assign_params, make_meta, read_meta, read_params, resolve_step_dir
from e2former_jax.config import get_config
from e2former_jax.data.batching import GraphLoader
from e2former_jax.data.sources import read_structures
from e2former_jax.evaluation import Predictions, error_table, predict_dataset
from e2former_jax.model import E2Former
from e2former_jax.predict import split_model
from e2former_jax.training.config import TrainConfig, diff_configs, dump_config, load_config
from e2former_jax.training.data import element_references, net_force_check, split_validation
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


def _prepare_workdir(cfg: TrainConfig, workdir: Path, resume: bool) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / "config.yaml"
  if resume:
    if not path.exists():
      raise FileNotFoundError(f"{workdir}: no config.yaml, nothing to resume")
    diffs = diff_configs(load_config(path), cfg)
    if diffs:
      raise ValueError(f"--resume needs the run's own config; it differs from {path} in: " + "; ".join(diffs))
    return
  if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").rglob("meta")):
    raise FileExistsError(
      f"{workdir} already holds checkpoints: pass --resume to continue that run, or choose another --workdir"
    )
  dump_config(cfg, path)


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
    resume: continue from the newest "last" checkpoint in ``workdir`` (the config must be the run's own).
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
  workdir = Path(workdir)
  _prepare_workdir(cfg, workdir, resume)
  run, dcfg = cfg.run, cfg.data
  mesh = data_mesh(devices)
  num_devices = int(mesh.devices.size)
  if num_devices == 1:
    mesh = None  # the plain one-device step
  model_cfg = cfg.model_config()
  dtype = np.float64 if model_cfg.dtype == "float64" else np.float32

  # data
  if datasets is not None:
    train_data = datasets["train"]
    valid_data = datasets.get("valid")
    test_data = datasets.get("test")
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

  if not resume:
    problem = net_force_check(train_data, seed=run.seed)
    if problem:
      warnings.warn(problem, stacklevel=2)

  # model and element references
  model = E2Former(model_cfg, rngs=nnx.Rngs(run.seed))
  ckpt = Checkpointer(workdir, keep=run.keep_checkpoints, async_checkpointing=run.async_checkpointing)
  resumed_meta = None
  if resume:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"{workdir}: no finished checkpoint to resume from")
    resumed_meta = read_meta(ckpt.root / "last" / str(ckpt.latest_step()))
    refs = {int(z): v for z, v in resumed_meta["element_references"].items()}
    if int(resumed_meta.get("devices", 1)) != num_devices:
      raise ValueError(
        f"--resume: the run trained on {resumed_meta.get('devices', 1)} device(s), not "
        f"{num_devices} (the global batches depend on it); pass --devices accordingly"
      )
  elif dcfg.element_references == "init":
    if not cfg.init.checkpoint:
      raise ValueError("data.element_references=init needs init.checkpoint (--init-from)")
    refs = {int(z): v for z, v in read_meta(cfg.init.checkpoint)["element_references"].items()}
  else:
    refs = element_references(dcfg.element_references, train_data, seed=run.seed)
  model.set_element_energies(refs)
  if cfg.init.checkpoint and not resume:
    report = assign_params(model, read_params(cfg.init.checkpoint), strict=cfg.init.strict)
    if verbose:
      _say(
        f"init from {cfg.init.checkpoint}: loaded {len(report['loaded'])} parameter arrays"
        + "".join(f", {k} {len(v)}" for k, v in report.items() if k != "loaded" and v)
      )

  _, params, elements, _ = split_model(model)
  state = init_state(params, cfg.optim, run.seed)
  epoch, position = 0, 0
  best = {"metric": run.best_metric, "value": None, "step": None}
  if resume:
    state, meta = ckpt.restore(state)
    epoch, position = int(meta["data_position"]["epoch"]), int(meta["data_position"]["batch"])
    best = dict(meta["best"])
  step = int(state.step)

  loader_args = dict(
    atom_budget=dcfg.atom_budget,
    max_structures=dcfg.max_structures,
    num_buckets=dcfg.num_buckets,
    shuffle=True,
    seed=run.seed,
    prefetch=dcfg.prefetch,
    dtype=dtype,
  )
  eval_budget = dcfg.eval_atom_budget or dcfg.atom_budget
  if mesh is None:
    loader = GraphLoader(train_data, model_cfg.cutoff, model_cfg.max_neighbors, **loader_args)
    step_fn = compiled_train_step(model_cfg, cfg.optim, cfg.loss, cfg.schedule_steps())
  else:
    loader = ShardedGraphLoader(train_data, model_cfg.cutoff, model_cfg.max_neighbors, mesh=mesh, **loader_args)
    step_fn = compiled_sharded_train_step(model_cfg, cfg.optim, cfg.loss, cfg.schedule_steps(), mesh)
    state, elements = replicate((state, elements), mesh)
  # single-device views of the (replicated) state for evaluation and checkpoints
  local = (lambda tree: tree) if mesh is None else local_copy
  # several hosts: process 0 writes the run's logs, the others their own (same values) in process<h>/
  log_dir = workdir if jax.process_index() == 0 else workdir / f"process{jax.process_index()}"
  logger = MetricsLogger(log_dir, tensorboard=run.tensorboard, resume_step=step if resume else None)
  if verbose:
    nparams = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    _say(
      f"{workdir}: {'resuming at step ' + str(step) if resume else 'new run'}; model {model_cfg_name(cfg)} "
      f"({nparams:,} parameters, forces {model_cfg.forces}); {len(train_data)} train / {len(valid_data)} valid"
      f"{'' if test_data is None else ' / ' + str(len(test_data)) + ' test'} structures; "
      f"{loader.padding_stats(epoch)}"
      + (
        ""
        if mesh is None
        else f"; data-parallel on {num_devices} devices ({jax.process_count()} "
        f"process(es)), global batch {num_devices} x {dcfg.atom_budget} atoms, {loader.num_batches(epoch)} "
        "steps per epoch"
      )
    )

  def base_meta(valid_metrics=None):
    return make_meta(
      model_cfg,
      refs,
      step=step,
      params="ema" if cfg.optim.ema_decay is not None else "raw",
      train_config=cfg.to_dict(),
      data_position={"epoch": epoch, "batch": position},
      best=best,
      valid=valid_metrics or {},
      devices=num_devices,
    )

  bar = None
  if verbose and run.progress_bar:
    from tqdm import tqdm

    bar = tqdm(
      total=run.steps, initial=step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr, mininterval=1.0
    )
  pending: list = []
  window_t, window_atoms = time.time(), 0
  last_valid: dict = {}
  interrupted = False
  compiled = False
  try:
    while step < run.steps and not interrupted:
      num_batches = loader.num_batches(epoch)
      for i, batch in enumerate(loader.epoch(epoch)):
        if i < position:
          continue
        state, metrics = step_fn(state, elements, batch)
        if not compiled:  # keep compilation out of the atoms/s of the first window
          jax.block_until_ready(metrics)
          compiled, window_t = True, time.time()
          metrics = jax.device_get(metrics)
          window_atoms -= int(metrics["atoms"])
        step += 1
        position = i + 1
        if position >= num_batches:
          epoch, position = epoch + 1, 0
        pending.append(metrics)
        if step % run.log_every == 0 or step == run.steps:
          values = jax.device_get(pending)
          pending = []
          atoms = sum(int(v["atoms"]) for v in values)
          now = time.time()
          rate = (window_atoms + atoms) / max(now - window_t, 1e-9)
          window_t, window_atoms = now, 0
          bad = [v for v in values if not bool(v["finite"])]
          row = {
            k: float(np.mean([float(v[k]) for v in values if bool(v["finite"])] or [math.nan]))
            for k in ("loss", "energy_loss", "force_loss", "energy_mae", "force_mae", "grad_norm")
          }
          row.update(
            lr=float(values[-1]["lr"]), atoms_per_s=rate, epoch=epoch, skipped=int(jax.device_get(state.skipped))
          )
          logger.log("train", step, row)
          if bad and verbose:
            _say(
              f"step {step}: {len(bad)} step(s) skipped in the last {len(values)} (non-finite loss or "
              f"gradients); {row['skipped']} skipped so far",
              bar,
            )
          if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{row['lr']:.2e}", atoms_s=f"{rate:.0f}", refresh=False)
        if bar is not None:
          bar.update(1)
        if stop_after is not None and step >= stop_after and step < run.steps:
          interrupted = True
          break
        at_eval = step % run.eval_every == 0 or step == run.steps
        at_ckpt = at_eval if run.checkpoint_every is None else (step % run.checkpoint_every == 0 or step == run.steps)
        if at_eval:
          preds = predict_dataset(
            model_cfg,
            local(eval_params(state)),
            local(elements),
            valid_data,
            atom_budget=eval_budget,
            num_buckets=1,
            prefetch=dcfg.prefetch,
          )
          last_valid = validation_metrics(preds, cfg)
          logger.log("valid", step, last_valid)
          value = last_valid[run.best_metric]
          improved = best["value"] is None or value < best["value"]
          if improved:
            best = {"metric": run.best_metric, "value": value, "step": step}
          if verbose:
            _say(
              f"step {step}: valid loss {last_valid['loss']:.4g}, E MAE {1e3 * last_valid['energy_mae']:.2f} "
              f"meV/atom, F MAE {1e3 * last_valid['force_mae']:.1f} meV/A" + (" (best)" if improved else ""),
              bar,
            )
          ckpt.save(
            step,
            params=local(eval_params(state)),
            state=local(state),
            meta=base_meta(last_valid),
            best=improved,
            last=at_ckpt,
          )
        elif at_ckpt:
          ckpt.save(step, params=local(eval_params(state)), state=local(state), meta=base_meta())
        if step >= run.steps:
          break
  finally:
    if bar is not None:
      bar.close()
    logger.close()
    ckpt.close()

  skipped = int(jax.device_get(state.skipped))
  test_table = None
  if not interrupted and test_data is not None:
    source = ckpt.root / "best" if best["step"] is not None else ckpt.root / "last"
    test_model = E2Former(model_cfg, rngs=nnx.Rngs(0))
    assign_params(test_model, read_params(resolve_step_dir(source)), strict=True)
    test_model.set_element_energies(refs)
    _, tparams, telements, _ = split_model(test_model)
    preds = predict_dataset(
      model_cfg, tparams, telements, test_data, atom_budget=eval_budget, num_buckets=1, prefetch=dcfg.prefetch
    )
    test_table = error_table(preds)
    (workdir / "test_errors.json").write_text(
      json.dumps({"checkpoint": str(resolve_step_dir(source)), "step": best["step"], **test_table}, indent=1)
    )
  wall = time.time() - t_start
  if verbose and not interrupted:
    _say(
      f"{step} steps ({skipped} skipped) in {wall:.0f} s; best {best['metric']} {best['value']:.4g} at step "
      f"{best['step']}"
      if best["value"] is not None
      else f"{step} steps in {wall:.0f} s"
    )
  return TrainResult(
    workdir=workdir,
    step=step,
    skipped=skipped,
    valid=last_valid,
    best=best,
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
