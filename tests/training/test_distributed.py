"""Data-parallel training on 4 (CPU) devices: one step equals the one-device step of the same global batch,
and a run stopped mid-epoch resumes exactly.

The devices come from ``XLA_FLAGS=--xla_force_host_platform_device_count=4``, which must be set before JAX
initialises; other tests in the same pytest process have already imported JAX, so the work runs once in a
subprocess (this file run as a script) and the tests check what it reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUM_DEVICES = 4

TINY_MODEL = {
  "preset": "small",
  "channels": 16,
  "num_heads": 8,
  "head_dim": 4,
  "num_layers": 1,
  "max_neighbors": 12,
  "num_basis": 16,
  "radial_hidden": 16,
  "qk_hidden": 16,
  "type_embed_dim": 8,
}

# float32 round-off: the global batch's sums are split into 4 partial sums then psum-ed, in another order.
LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-7  # Adam's first moment after one step, 0.1 * gradient
# Parameters after one step: Adam's step m / (sqrt(v) + eps) is ~lr = 2e-3 per component whatever the
# gradient's size, so on components whose gradient is near eps the round-off above is amplified; 1e-5 is
# 0.5% of one step (measured: 2e-6).
PARAM_ATOL = 1e-5


def _config(**run):
  from e2former_jax.training import config as C

  return C.TrainConfig.from_dict(
    dict(
      model=dict(TINY_MODEL),
      data=dict(
        atom_budget=20, max_structures=2, num_buckets=1, eval_atom_budget=40, prefetch=2, element_references="fit"
      ),
      loss=dict(kind="mse", energy_weight=1.0, force_weight=10.0),
      optim=dict(lr=2e-3, warmup_steps=0, clip_norm=10.0, ema_decay=0.9, weight_decay=1e-3),
      run=dict(
        dict(steps=6, eval_every=3, log_every=1, keep_checkpoints=2, progress_bar=False, tensorboard=False, seed=3),
        **run,
      ),
    )
  )


def _data():
  import numpy as np

  from e2former_jax import data as D

  train = D.load_demo("train", ["ethanol", "water_dimer"])
  valid = D.load_demo("valid", ["ethanol", "water_dimer"])
  pick = lambda frames, n: [frames[i] for i in np.linspace(0, len(frames) - 1, n).astype(int)]
  return {"train": pick(train, 36), "valid": pick(valid, 3)}


def _one_step(out: dict) -> None:
  """One sharded step against the one-device step of the same global batch."""
  import jax
  import numpy as np
  from flax import nnx

  from e2former_jax.data.batching import Bucket, batch_from_atoms
  from e2former_jax.model import E2Former
  from e2former_jax.predict import split_model
  from e2former_jax.training.distributed import (
    ShardedGraphLoader,
    compiled_sharded_train_step,
    data_mesh,
    local_copy,
    replicate,
  )
  from e2former_jax.training.step import compiled_train_step, host_copy, init_state

  cfg, data = _config(), _data()
  mcfg = cfg.model_config()
  model = E2Former(mcfg, rngs=nnx.Rngs(0))
  model.set_element_energies({1: -13.6, 6: -1029.0, 8: -2041.0})
  _, params, elements, _ = split_model(model)
  state0 = host_copy(init_state(params, cfg.optim, seed=0))

  mesh = data_mesh(NUM_DEVICES)
  loader = ShardedGraphLoader(
    data["train"],
    mcfg.cutoff,
    mcfg.max_neighbors,
    mesh=mesh,
    atom_budget=20,
    max_structures=2,
    num_buckets=1,
    shuffle=True,
    seed=1,
    prefetch=0,
  )
  bucket, groups = loader.plan(0)[0]
  sharded_batch = next(iter(loader.epoch(0)))
  out["per_device_shape"] = list(sharded_batch.graph.positions.shape)
  out["batch_sharding"] = [str(a) for a in sharded_batch.graph.positions.sharding.spec]
  out["neighbors_local"] = bool(np.all(np.asarray(sharded_batch.graph.neighbors) < bucket.num_atoms))
  out["structures_per_device"] = [len(g) for g in groups]
  stats = loader.padding_stats(0)
  out["padding_structures"] = [stats.real_structures, sum(len(g) for _, gs in loader.plan(0) for g in gs)]

  step4 = compiled_sharded_train_step(mcfg, cfg.optim, cfg.loss, cfg.schedule_steps(), mesh)
  state4, metrics4 = step4(*replicate((state0, elements), mesh), sharded_batch)
  out["state_sharding"] = str(jax.tree.leaves(state4.params)[0].sharding)

  # the same structures as one batch on one device
  flat = [i for g in groups for i in g]
  big = Bucket(NUM_DEVICES * bucket.num_atoms, NUM_DEVICES * bucket.num_graphs)
  batch1, _ = batch_from_atoms([data["train"][i] for i in flat], big, mcfg.cutoff, mcfg.max_neighbors, flat)
  step1 = compiled_train_step(mcfg, cfg.optim, cfg.loss, cfg.schedule_steps())
  state1, metrics1 = step1(
    jax.device_put(state0, jax.devices()[0]),
    jax.device_put(elements, jax.devices()[0]),
    jax.device_put(batch1, jax.devices()[0]),
  )

  s4, s1 = host_copy(local_copy(state4)), host_copy(state1)
  m4, m1 = jax.device_get(metrics4), jax.device_get(metrics1)
  out["metrics"] = {
    k: [float(m4[k]), float(m1[k])]
    for k in ("loss", "energy_loss", "force_loss", "energy_mae", "force_mae", "grad_norm", "atoms")
  }
  leaves = lambda t: [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]
  p4, p1, p0 = leaves(s4.params), leaves(s1.params), leaves(state0.params)
  out["param_max_abs_diff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(p4, p1))
  out["param_max_change"] = max(float(np.max(np.abs(a - b))) for a, b in zip(p1, p0))
  out["ema_max_abs_diff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(leaves(s4.ema), leaves(s1.ema)))
  mu4, mu1 = leaves(s4.opt_state), leaves(s1.opt_state)
  out["opt_state_close"] = all(np.allclose(a, b, rtol=GRAD_RTOL, atol=GRAD_ATOL) for a, b in zip(mu4, mu1))
  out["opt_state_max_abs_diff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(mu4, mu1))
  out["step"] = [int(s4.step), int(s1.step)]


def _resume(out: dict, tmp: Path) -> None:
  """An uninterrupted 4-device run against one stopped after 5 steps (newest checkpoint: step 3) and
  resumed."""
  import csv

  import numpy as np

  from e2former_jax.checkpoint import Checkpointer, read_meta
  from e2former_jax.training.loop import train

  cfg, data = _config(), _data()
  train(cfg, tmp / "full", datasets=data, verbose=False, devices=NUM_DEVICES)
  part = train(cfg, tmp / "part", datasets=data, verbose=False, devices=NUM_DEVICES, stop_after=5)
  ckpt = Checkpointer(tmp / "part")
  out["stopped"] = [part.step, bool(part.interrupted), ckpt.latest_step()]
  meta = read_meta(ckpt.root / "last" / str(ckpt.latest_step()))
  ckpt.close()
  out["checkpoint_meta"] = {"devices": meta["devices"], "data_position": meta["data_position"]}
  try:
    train(cfg, tmp / "part", datasets=data, verbose=False, devices=1, resume=True)
    out["resume_on_1_device_refused"] = False
  except ValueError as err:
    out["resume_on_1_device_refused"] = "device" in str(err)
  resumed = train(cfg, tmp / "part", datasets=data, verbose=False, devices=NUM_DEVICES, resume=True)
  out["resumed_step"] = resumed.step

  def state(workdir):
    c = Checkpointer(workdir)
    flat, _, _ = c.read_state()
    c.close()
    return flat

  a, b = state(tmp / "full"), state(tmp / "part")
  out["state_keys_equal"] = a.keys() == b.keys()
  out["state_bitwise_equal"] = all(np.array_equal(a[k], b[k]) for k in a)
  out["state_step"] = int(a["step"])
  rows = lambda w: list(csv.DictReader(open(w / "train.csv")))
  ra, rb = rows(tmp / "full"), rows(tmp / "part")
  out["log_steps"] = [[r["step"] for r in ra], [r["step"] for r in rb]]
  out["log_losses_equal"] = [r["loss"] for r in ra] == [r["loss"] for r in rb]


def worker(outdir: str) -> None:
  import jax

  out: dict = {"devices": jax.device_count()}
  _one_step(out)
  _resume(out, Path(outdir))
  Path(outdir, "result.json").write_text(json.dumps(out, indent=1))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  outdir = tmp_path_factory.mktemp("distributed")
  env = dict(
    os.environ,
    XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={NUM_DEVICES}",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  proc = subprocess.run(
    [sys.executable, str(Path(__file__).resolve()), str(outdir)],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-6000:]
  return json.loads((outdir / "result.json").read_text())


def test_one_step_on_4_devices_equals_one_step_on_1_device(result):
  r = result
  assert r["devices"] == NUM_DEVICES
  assert r["batch_sharding"] == ["data"]
  assert r["per_device_shape"][0] == NUM_DEVICES and r["neighbors_local"]
  assert all(n >= 1 for n in r["structures_per_device"])
  assert r["padding_structures"][0] == r["padding_structures"][1] > 0
  assert r["step"] == [1, 1]
  m = r["metrics"]
  assert m["atoms"][0] == m["atoms"][1]
  for k in ("loss", "energy_loss", "force_loss", "energy_mae", "force_mae", "grad_norm"):
    assert m[k][0] == pytest.approx(m[k][1], rel=LOSS_RTOL), (k, m[k])
  assert r["opt_state_close"], r["opt_state_max_abs_diff"]
  assert r["param_max_change"] > 100 * PARAM_ATOL  # the step moved the parameters
  assert r["param_max_abs_diff"] < PARAM_ATOL
  assert r["ema_max_abs_diff"] < PARAM_ATOL


def test_stopped_sharded_run_resumes_exactly(result):
  r = result
  assert r["stopped"] == [5, True, 3]
  assert r["checkpoint_meta"]["devices"] == NUM_DEVICES
  assert r["checkpoint_meta"]["data_position"]["batch"] > 0  # stopped mid-epoch
  assert r["resume_on_1_device_refused"]
  assert r["resumed_step"] == 6 and r["state_step"] == 6
  assert r["state_keys_equal"] and r["state_bitwise_equal"]
  assert r["log_steps"][0] == r["log_steps"][1] == [str(s) for s in range(1, 7)]
  assert r["log_losses_equal"]


if __name__ == "__main__":
  worker(sys.argv[1])
