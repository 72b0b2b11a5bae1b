"""Training: schedule, parameter groups, losses, the jitted step (NaN batches skipped), the loop, exact resume.

Every loop test uses the same tiny model, optimizer, loss and batch shape, so the train step compiles once for
the module (``compiled_train_step`` is cached per configuration).
"""

import csv
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from flax import nnx

from e2former_jax import data as D
from e2former_jax.checkpoint import Checkpointer, flatten, load_model, read_meta, resolve_step_dir
from e2former_jax.config import get_config
from e2former_jax.model import E2Former
from e2former_jax.predict import split_model
from e2former_jax.training import config as C
from e2former_jax.training.loop import train
from e2former_jax.training.losses import loss_terms
from e2former_jax.training.optim import decay_mask, learning_rate, lr_factor, make_optimizer, warmup_steps
from e2former_jax.training.step import compiled_train_step, init_state

TINY_MODEL = {
  "preset": "small",
  "channels": 16,
  "num_heads": 8,
  "num_layers": 1,
  "max_neighbors": 12,
  "num_basis": 16,
  "radial_hidden": 16,
  "qk_hidden": 16,
  "type_embed_dim": 8,
}


def tiny_config(**sections) -> C.TrainConfig:
  base = dict(
    model=dict(TINY_MODEL),
    data=dict(
      atom_budget=40, max_structures=4, num_buckets=1, eval_atom_budget=40, prefetch=2, element_references="fit"
    ),
    loss=dict(kind="mse", energy_weight=1.0, force_weight=10.0),
    # a fixed schedule length: runs of any length share one compiled step (it is a static argument)
    optim=dict(lr=2e-3, warmup_steps=2, clip_norm=10.0, ema_decay=0.9, weight_decay=1e-3, schedule_steps=6),
    run=dict(steps=6, eval_every=3, log_every=1, keep_checkpoints=2, progress_bar=False, tensorboard=True, seed=3),
  )
  for name, values in sections.items():
    base.setdefault(name, {}).update(values)
  return C.TrainConfig.from_dict(base)


@pytest.fixture(scope="module")
def tiny_data():
  """Ethanol (9 atoms) and water dimer (6 atoms) frames: small, two compositions, several batches/epoch."""
  train = D.load_demo("train", ["ethanol", "water_dimer"])
  valid = D.load_demo("valid", ["ethanol", "water_dimer"])
  pick = lambda frames, n: [frames[i] for i in np.linspace(0, len(frames) - 1, n).astype(int)]
  return {"train": pick(train, 14), "valid": pick(valid, 4), "test": pick(valid, 3)}


# ---------------------------------------------------------------------------------------------------------------
# schedule and optimizer


def test_lr_schedule_is_the_authors_formula():
  cfg = C.OptimConfig(lr=1e-3, warmup_steps=4000, warmup_factor=0.2, lr_min_factor=0.01)
  t = 200_000
  f = lambda s: float(lr_factor(s, cfg, t))
  assert f(0) == pytest.approx(0.2)
  assert f(2000) == pytest.approx(0.6)
  assert f(4000) == pytest.approx(1.0)
  for s in (4001, 50_000, 150_000, 199_999):  # cosine phase is s/T, not (s-W)/(T-W)
    assert f(s) == pytest.approx(0.01 + 0.495 * (1 + math.cos(math.pi * s / t)), rel=1e-5)
  assert f(t) == pytest.approx(0.01) and f(10 * t) == pytest.approx(0.01)
  assert float(learning_rate(2000, cfg, t)) == pytest.approx(6e-4)
  # the demo caps warmup at 10% of the run; paper configs keep 4,000
  demo = C.OptimConfig(warmup_steps=4000, max_warmup_fraction=0.1)
  assert warmup_steps(demo, 900) == 90 and warmup_steps(cfg, 900) == 4000
  assert float(lr_factor(90, demo, 900)) == pytest.approx(1.0)
  assert float(lr_factor(45, demo, 900)) == pytest.approx(0.6)


@pytest.fixture(scope="module")
def tiny_model():
  model = E2Former(C.TrainConfig.from_dict({"model": TINY_MODEL}).model_config(), rngs=nnx.Rngs(0))
  return model


def test_parameter_groups_no_decay_on_norms_biases_embeddings(tiny_model):
  _, params, _, _ = split_model(tiny_model)
  mask = decay_mask(params, C.OptimConfig())
  flat = {k: bool(v) for k, v in flatten(mask).items()}
  decayed = {k for k, v in flat.items() if v}
  assert decayed and len(decayed) < len(flat)
  for name, v in flat.items():
    leaf = name.split("/")[-1]
    if leaf == "bias" or "embedding" in name or "norm" in name:
      assert not v, name
    if leaf == "kernel" and "norm" not in name:
      assert v, name
  # RMS-SH norm scales are 2-D and still excluded (by name)
  assert "final_norm/scale" in flat and not flat["final_norm/scale"]
  # with zero gradients the AdamW direction is wd * p on the decayed group and exactly 0 elsewhere
  cfg = C.OptimConfig(weight_decay=0.5, clip_norm=None)
  tx = make_optimizer(cfg)
  zeros = jax.tree.map(jnp.zeros_like, params)
  direction, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  d, p = flatten(direction), flatten(params)
  for name in flat:
    expected = 0.5 * p[name] if flat[name] else np.zeros_like(p[name])
    np.testing.assert_allclose(d[name], expected, rtol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------------------------
# losses


def _loss_inputs(seed=0):
  rng = np.random.default_rng(seed)
  n_atoms = np.array([3, 5, 0])  # the last structure is padding
  n = int(n_atoms.sum()) + 2  # two padding atoms
  pe, e = rng.normal(size=3), rng.normal(size=3)
  pf, f = rng.normal(size=(n, 3)), rng.normal(size=(n, 3))
  structure_mask = np.array([True, True, False])
  energy_mask = np.array([True, True, False])
  forces_mask = np.array([True] * 8 + [False] * 2)
  return pe, e, energy_mask, structure_mask, n_atoms, pf, f, forces_mask


@pytest.mark.parametrize("kind", C.LOSSES)
def test_losses_match_their_definitions(kind):
  pe, e, em, sm, na, pf, f, fm = _loss_inputs()
  cfg = C.LossConfig(kind=kind, energy_weight=0.7, force_weight=3.0, huber_delta=0.5)
  out = loss_terms(*map(jnp.asarray, (pe, e, em, sm, na, pf, f, fm)), cfg)
  de, de_atom = (pe - e)[:2], ((pe - e) / np.maximum(na, 1))[:2]
  df = (pf - f)[:8]
  norms = np.linalg.norm(df, axis=1)
  huber = lambda x, d: np.where(np.abs(x) <= d, 0.5 * x**2, d * (np.abs(x) - 0.5 * d))
  expected = {
    "atoml2mae": (np.mean(np.abs(de_atom)), np.mean(norms)),
    "l2mae": (np.mean(np.abs(de)), norms.sum() / 2),
    "mse": (np.mean(de_atom**2), np.mean(df**2)),
    "huber": (np.mean(huber(de_atom, 0.5)), np.mean(huber(df, 0.5))),
    "mae": (np.mean(np.abs(de_atom)), np.mean(np.abs(df))),
  }[kind]
  np.testing.assert_allclose(float(out["energy_loss"]), expected[0], rtol=1e-5)
  np.testing.assert_allclose(float(out["force_loss"]), expected[1], rtol=1e-5)
  np.testing.assert_allclose(float(out["loss"]), 0.7 * expected[0] + 3.0 * expected[1], rtol=1e-5)
  np.testing.assert_allclose(float(out["force_mae"]), np.mean(np.abs(df)), rtol=1e-5)


def test_norm_losses_have_finite_gradients_at_zero_error():
  pe, e, em, sm, na, pf, f, fm = _loss_inputs()
  f = pf.copy()  # zero force error everywhere
  for kind in ("atoml2mae", "l2mae"):
    g = jax.grad(
      lambda x: loss_terms(
        *map(jnp.asarray, (pe, e, em, sm, na)), x, jnp.asarray(f), jnp.asarray(fm), C.LossConfig(kind=kind)
      )["loss"]
    )(jnp.asarray(pf))
    assert np.all(np.isfinite(np.asarray(g)))


# ---------------------------------------------------------------------------------------------------------------
# the jitted step


def _batch(structures, cfg):
  mcfg = cfg.model_config()
  bucket = D.Bucket(48, 5)
  batch, _ = D.batch_from_atoms(structures, bucket, mcfg.cutoff, mcfg.max_neighbors)
  return batch


def test_step_skips_non_finite_batches_and_counts_them(tiny_data):
  cfg = tiny_config()
  mcfg = cfg.model_config()
  model = E2Former(mcfg, rngs=nnx.Rngs(0))
  model.set_element_energies(D.fit_element_references(tiny_data["train"]))
  _, params, elements, _ = split_model(model)
  step = compiled_train_step(mcfg, cfg.optim, cfg.loss, cfg.schedule_steps())
  good = _batch(tiny_data["train"][:3], cfg)
  positions = np.array(good.graph.positions)
  positions[0, 0] = np.nan
  bad = good.replace(graph=good.graph.replace(positions=positions))
  state = init_state(params, cfg.optim, seed=0)
  before = flatten(state)
  state, metrics = step(state, elements, bad)  # the old state's buffers are donated
  after = flatten(state)
  assert not bool(metrics["finite"])
  assert int(state.step) == 1 and int(state.skipped) == 1
  for name, value in before.items():
    if name not in ("step", "skipped", "rng"):
      np.testing.assert_array_equal(after[name], value, err_msg=name)  # params, Adam moments, EMA untouched
  state, metrics = step(state, elements, good)
  assert bool(metrics["finite"]) and int(state.step) == 2 and int(state.skipped) == 1
  moved = flatten(state)
  assert any(not np.array_equal(moved[k], before[k]) for k in before if k.startswith("params/"))
  assert all(np.all(np.isfinite(v)) for v in moved.values())


# ---------------------------------------------------------------------------------------------------------------
# the loop: logs, checkpoints, exact resume, init-from


def _read_csv(path):
  with open(path, newline="") as fh:
    return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def full_run(tiny_data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  result = train(tiny_config(), workdir, datasets=tiny_data, verbose=False)
  return workdir, result


def test_run_writes_config_logs_checkpoints_and_test_table(full_run, tiny_data):
  workdir, result = full_run
  assert result.step == 6 and result.skipped == 0 and not result.interrupted
  assert C.load_config(workdir / "config.yaml") == tiny_config()
  rows = _read_csv(workdir / "train.csv")
  assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
  assert all(math.isfinite(float(r["loss"])) and float(r["lr"]) > 0 for r in rows)
  assert [int(r["step"]) for r in _read_csv(workdir / "valid.csv")] == [3, 6]
  assert any((workdir / "tensorboard").iterdir())
  assert sorted(int(p.name) for p in (workdir / "checkpoints" / "last").iterdir() if p.name.isdigit()) == [3, 6]
  meta = read_meta(workdir)
  assert resolve_step_dir(workdir).parent.name == "best"
  assert int(resolve_step_dir(workdir).name) == meta["best"]["step"] == result.best["step"]
  assert set(meta["element_references"]) == {"1", "6", "8"}
  assert meta["params"] == "ema"
  table = result.test_table
  assert set(table["per_config_type"]) == {"ethanol", "water_dimer"} and table["overall"]["structures"] == 3
  # the run directory is a model: config, element references and (EMA) weights
  model = load_model(workdir)
  assert model.config == tiny_config().model_config()
  assert float(model.element_energy[...][8]) == pytest.approx(meta["element_references"]["8"])


def test_killed_run_resumes_bit_for_bit(full_run, tiny_data, tmp_path):
  workdir_a, _ = full_run
  workdir_b = tmp_path / "interrupted"
  cfg = tiny_config()
  # "killed" after step 5: the newest finished checkpoint is step 3, mid-epoch (4 batches per epoch)
  first = train(cfg, workdir_b, datasets=tiny_data, verbose=False, stop_after=5)
  assert first.interrupted and first.step == 5
  assert Checkpointer(workdir_b).latest_step() == 3
  second = train(cfg, workdir_b, datasets=tiny_data, verbose=False, resume=True)
  assert second.step == 6
  ref_state = _state_of(workdir_a)
  new_state = _state_of(workdir_b)
  assert ref_state.keys() == new_state.keys()
  for name in ref_state:
    np.testing.assert_array_equal(new_state[name], ref_state[name], err_msg=name)
  # the logs read as one run: steps 4 and 5 of the killed process were dropped and redone identically
  rows_a, rows_b = _read_csv(workdir_a / "train.csv"), _read_csv(workdir_b / "train.csv")
  assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a]
  assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows_a]


def _state_of(workdir):
  ckpt = Checkpointer(workdir)
  flat, _, _ = ckpt.read_state()
  ckpt.close()
  return flat


def test_finished_run_extends_and_keeps_its_wall_clock(full_run, tiny_data, tmp_path):
  import shutil

  workdir = tmp_path / "extended"
  shutil.copytree(full_run[0], workdir)
  cfg = C.resumed_config(C.load_config(workdir / "config.yaml"), ["run.steps=8", "run.eval_every=4"])
  result = train(cfg, workdir, datasets=tiny_data, verbose=False, resume=True)
  assert result.step == 8 and C.load_config(workdir / "config.yaml").run.steps == 8
  rows = _read_csv(workdir / "train.csv")
  assert [int(r["step"]) for r in rows] == list(range(1, 9))
  walls = [float(r["wall_s"]) for r in rows]
  assert walls == sorted(walls) and walls[6] >= walls[5]  # cumulative across the resume
  # the schedule's length (6) is kept: past its end the rate stays at lr * lr_min_factor
  final = cfg.optim.lr * cfg.optim.lr_min_factor
  assert [float(r["lr"]) for r in rows[6:]] == pytest.approx([final, final])


def test_unreadable_newest_checkpoint_falls_back_to_the_previous(full_run, tiny_data, tmp_path):
  import shutil

  workdir = tmp_path / "damaged"
  shutil.copytree(full_run[0], workdir)
  for path in (workdir / "checkpoints" / "last" / "6" / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"not a checkpoint")
  with pytest.warns(UserWarning, match="checkpoint step 6 .* cannot be read.*step 3"):
    result = train(tiny_config(), workdir, datasets=tiny_data, verbose=False, resume=True)
  assert result.step == 6  # steps 4-6 redone from step 3
  ref, new = _state_of(full_run[0]), _state_of(workdir)
  for name in ref:
    np.testing.assert_array_equal(new[name], ref[name], err_msg=name)


def test_resume_refuses_a_different_config(full_run, tiny_data):
  workdir, _ = full_run
  with pytest.raises(ValueError, match="optim.lr"):
    train(tiny_config(optim={"lr": 1e-4}), workdir, datasets=tiny_data, verbose=False, resume=True)
  with pytest.raises(FileExistsError, match="--resume"):
    train(tiny_config(), workdir, datasets=tiny_data, verbose=False)


def test_run_records_its_domain_and_leaves_untrained_elements_out_of_the_tables(tiny_data, tmp_path):
  """Training records the elements, charges and multiplicities of its training set in every checkpoint, and
  validation/test frames with other elements (here S and Cl) are left out of the tables with one warning."""
  foreign = D.load_demo("valid", ["2-chlorothiophene"])[:2]
  data = {**tiny_data, "valid": tiny_data["valid"] + foreign[:1], "test": tiny_data["test"] + foreign}
  cfg = tiny_config(run={"steps": 3, "eval_every": 3})
  with pytest.warns(UserWarning, match=r"2 test structure\(s\) hold elements absent .*\(2-chlorothiophene 2\)"):
    result = train(cfg, tmp_path, datasets=data, verbose=False)
  meta = read_meta(tmp_path)
  assert meta["elements"] == [1, 6, 8] and meta["charges"] == [0] and meta["multiplicities"] == [1]
  assert result.test_table["overall"]["structures"] == len(tiny_data["test"])
  assert "2-chlorothiophene" not in result.test_table["per_config_type"]


def test_nan_batch_in_the_loop_is_skipped_counted_and_logged(tiny_data, tmp_path):
  broken = [a.copy() for a in tiny_data["train"]]
  for a, src in zip(broken, tiny_data["train"]):
    a.calc = SinglePointCalculator(a, energy=src.get_potential_energy(), forces=src.get_forces())
  a = broken[5]
  a.calc = SinglePointCalculator(a, energy=float("nan"), forces=a.get_forces())
  cfg = tiny_config(data={"element_references": "none"}, run={"steps": 4, "eval_every": 4})
  result = train(cfg, tmp_path, datasets={**tiny_data, "train": broken}, verbose=False)
  assert result.skipped == 1
  rows = _read_csv(tmp_path / "train.csv")
  assert int(float(rows[-1]["skipped"])) == 1
  assert sum(1 for r in rows if math.isnan(float(r["loss"]))) == 1  # the skipped step's row has no mean loss
  assert all(np.all(np.isfinite(v)) for v in _state_of(tmp_path).values())


def test_init_from_strict_and_unstrict(full_run, tiny_data, tmp_path):
  workdir, _ = full_run
  source = load_model(workdir)
  cfg = tiny_config(
    run={"steps": 1, "eval_every": 1}, init={"checkpoint": str(workdir)}, data={"element_references": "init"}
  )
  result = train(cfg, tmp_path / "strict", datasets=tiny_data, verbose=False)
  assert result.step == 1
  meta = read_meta(tmp_path / "strict")
  assert meta["element_references"] == read_meta(workdir)["element_references"]
  # a different head count changes some shapes: strict refuses, unstrict keeps what matches
  other = dict(TINY_MODEL, num_heads=4)
  with pytest.raises(ValueError, match="strict parameter load failed"):
    train(
      tiny_config(model=other, init={"checkpoint": str(workdir)}), tmp_path / "s2", datasets=tiny_data, verbose=False
    )
  from e2former_jax.checkpoint import assign_params, read_params

  target = E2Former(get_config("small", **{k: v for k, v in other.items() if k != "preset"}), rngs=nnx.Rngs(1))
  report = assign_params(target, read_params(workdir), strict=False)
  assert report["loaded"] and report["mismatched"] and not report["unexpected"]
  src = flatten(nnx.state(source, nnx.Param))
  dst = flatten(nnx.state(target, nnx.Param))
  for name in report["loaded"]:
    np.testing.assert_array_equal(dst[name], src[name])


# ---------------------------------------------------------------------------------------------------------------
# a real kill: SIGKILL to a `train.py` process, then `train.py --resume`


def _write_xyz(path, frames):
  import ase.io

  out = []
  for a in frames:
    b = a.copy()
    b.info = {
      "config_type": a.info["config_type"],
      "REF_energy": a.get_potential_energy(),
      "total_charge": 0,
      "total_spin": 1,
    }
    b.arrays["REF_forces"] = a.get_forces()
    out.append(b)
  ase.io.write(path, out, format="extxyz")


def test_sigkilled_train_py_resumes_bit_for_bit(tiny_data, tmp_path):
  import os
  import signal
  import subprocess
  import sys
  import time
  from pathlib import Path

  from e2former_jax.training.cli import main

  root = Path(__file__).resolve().parents[2]
  _write_xyz(tmp_path / "train.xyz", tiny_data["train"])
  _write_xyz(tmp_path / "valid.xyz", tiny_data["valid"])
  # the module's tiny run (same compiled step), read from files, a synchronous checkpoint after every step
  cfg = tiny_config(
    data={"train": str(tmp_path / "train.xyz"), "valid": str(tmp_path / "valid.xyz"), "test": None},
    run={"checkpoint_every": 1, "async_checkpointing": False, "progress_bar": False},
  )
  C.dump_config(cfg, tmp_path / "run.yaml")
  reference = train(cfg, tmp_path / "reference", verbose=False)
  assert reference.step == 6

  workdir = tmp_path / "killed"
  env = dict(os.environ, PYTHONPATH=str(root))
  cmd = [sys.executable, str(root / "train.py"), "--config", str(tmp_path / "run.yaml"), "--workdir", str(workdir)]
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  marker = workdir / "checkpoints" / "last" / "3" / "meta"
  deadline = time.time() + 600
  while not marker.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  out = proc.communicate()[0].decode(errors="replace")
  assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{out[-3000:]}"
  assert 3 <= Checkpointer(workdir).latest_step() < 6
  # `train.py --workdir W --resume`, in this process (its compiled step is the reference run's)
  assert main(["--workdir", str(workdir), "--resume"]) == 0
  ref_state, new_state = _state_of(tmp_path / "reference"), _state_of(workdir)
  assert ref_state.keys() == new_state.keys()
  for name in ref_state:
    np.testing.assert_array_equal(new_state[name], ref_state[name], err_msg=name)
