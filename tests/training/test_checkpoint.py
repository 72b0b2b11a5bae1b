"""Checkpoints: export/load round trip, path resolution, strict/unstrict parameter loads, the committed demo
checkpoint (this test fails loudly when it no longer loads or predicts)."""

import json

import numpy as np
import pytest
from flax import nnx

from e2former_jax import data as D
from e2former_jax.calculator import E2FormerCalculator
from e2former_jax.checkpoint import (
  DEMO_CHECKPOINT,
  Checkpointer,
  assign_params,
  export_model,
  flatten,
  load_model,
  read_meta,
  resolve_step_dir,
)
from e2former_jax.config import get_config
from e2former_jax.evaluation import error_table, evaluate_model
from e2former_jax.model import E2Former

TINY = dict(
  channels=16,
  num_heads=8,
  num_layers=1,
  max_neighbors=12,
  num_basis=16,
  radial_hidden=16,
  qk_hidden=16,
  type_embed_dim=8,
)


@pytest.fixture(scope="module")
def tiny_model():
  model = E2Former(get_config("small", **TINY), rngs=nnx.Rngs(5))
  model.set_element_energies({1: -13.5, 6: -1030.25, 8: -2040.0})
  return model


def test_export_and_load_round_trip(tiny_model, tmp_path):
  path = export_model(tiny_model, tmp_path / "model", note="test")
  assert resolve_step_dir(path) == path
  meta = read_meta(path)
  assert meta["note"] == "test" and meta["model_config"] == tiny_model.config.to_dict()
  assert meta["element_references"] == {"1": -13.5, "6": -1030.25, "8": -2040.0}
  loaded = load_model(path)
  assert loaded.config == tiny_model.config
  a, b = read_params_of(tiny_model), read_params_of(loaded)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  np.testing.assert_array_equal(np.asarray(loaded.element_energy[...]), np.asarray(tiny_model.element_energy[...]))
  with pytest.raises(FileExistsError):
    export_model(tiny_model, path)
  # config fields that do not change the parameters may be overridden at load time
  assert load_model(path, attention_impl="jnp_edge").config.attention_impl == "jnp_edge"


def test_run_directory_resolution_prefers_best_then_last(tiny_model, tmp_path, monkeypatch):
  params = nnx.state(tiny_model, nnx.Param)
  meta = {
    "format": "e2former-jax-checkpoint",
    "version": 1,
    "model_config": tiny_model.config.to_dict(),
    "element_references": {"1": -13.5},
  }
  ckpt = Checkpointer(tmp_path, keep=2, async_checkpointing=True)
  for step in (1, 2, 3):
    ckpt.save(step, params=params, meta={**meta, "step": step}, best=(step == 2))
  ckpt.close()
  assert sorted(p.name for p in (tmp_path / "checkpoints" / "last").iterdir() if p.name.isdigit()) == ["2", "3"]
  assert resolve_step_dir(tmp_path) == tmp_path.resolve() / "checkpoints" / "best" / "2"
  assert resolve_step_dir(tmp_path / "checkpoints" / "last").name == "3"
  assert read_meta(tmp_path)["step"] == 2
  # no best yet: the newest last
  other = tmp_path / "other"
  ckpt = Checkpointer(other, keep=1, async_checkpointing=False)
  ckpt.save(7, params=params, meta={**meta, "step": 7})
  ckpt.close()
  assert resolve_step_dir(other).name == "7" and resolve_step_dir(other).parent.name == "last"
  with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
    resolve_step_dir(tmp_path / "checkpoints")
  with pytest.raises(FileNotFoundError):
    resolve_step_dir(tmp_path / "missing")
  # a relative path (orbax needs absolute ones) loads too
  monkeypatch.chdir(tmp_path)
  assert resolve_step_dir("other") == (other / "checkpoints" / "last" / "7").resolve()
  assert load_model("other").config == tiny_model.config


def test_strict_load_names_what_differs(tiny_model):
  flat = read_params_of(tiny_model)  # QKdot_alpha
  target = E2Former(get_config("small", **dict(TINY, gate="QK_alpha")), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="strict parameter load failed") as err:
    assign_params(target, flat, strict=True)
  assert "unexpected" in str(err.value) and "mismatched" in str(err.value)
  report = assign_params(target, flat, strict=False)
  assert report["loaded"] and report["unexpected"] and report["mismatched"] and not report["missing"]
  loaded = flatten(nnx.state(target, nnx.Param))
  for name in report["loaded"]:
    np.testing.assert_array_equal(loaded[name], flat[name])
  # the other way round, the QKdot_alpha parameters are missing and keep their initialisation
  back = E2Former(get_config("small", **TINY), rngs=nnx.Rngs(9))
  before = read_params_of(back)
  report = assign_params(back, read_params_of(target), strict=False)
  assert report["missing"] and not report["unexpected"]
  after = read_params_of(back)
  for name in report["missing"]:
    np.testing.assert_array_equal(after[name], before[name])


def read_params_of(model):
  return flatten(nnx.state(model, nnx.Param))


# ---------------------------------------------------------------------------------------------------------------
# the committed demo checkpoint


@pytest.fixture(scope="module")
def demo_frames():
  test = D.load_demo("test")
  by_type = {}
  for a in test:
    by_type.setdefault(a.info["config_type"], []).append(a)
  return [frames[0] for _, frames in sorted(by_type.items())] + by_type["ethanol"][1:4] + by_type["aspirin"][1:4]


def test_demo_checkpoint_loads_and_predicts(demo_frames):
  assert DEMO_CHECKPOINT.is_dir(), f"{DEMO_CHECKPOINT} is missing"
  card = DEMO_CHECKPOINT / "CARD.md"
  assert card.exists(), "the demo checkpoint has no card"
  meta = read_meta(DEMO_CHECKPOINT)
  model = load_model(DEMO_CHECKPOINT)  # raises if the parameters no longer match the model code
  assert model.config == get_config("small"), "the demo checkpoint is not the `small` preset any more"
  assert {int(z) for z in meta["element_references"]} == {1, 6, 7, 8, 9, 16, 17}
  preds = evaluate_model(model, demo_frames, atom_budget=256)  # the shapes of the e2former-eval test
  assert np.all(np.isfinite(preds.energy_pred)) and np.all(np.isfinite(preds.forces_pred))
  # still a trained model: the card's held-out errors, with a wide margin for these few frames
  table = error_table(preds)["overall"]
  assert table["force_mae_meV_per_A"] < 100.0, table
  assert table["energy_mae_meV_per_atom"] < 10.0, table
  # and the ASE calculator reads it
  calc = E2FormerCalculator.from_checkpoint(DEMO_CHECKPOINT)
  atoms = demo_frames[0].copy()
  atoms.calc = calc
  assert np.isfinite(atoms.get_potential_energy())
  np.testing.assert_allclose(atoms.get_potential_energy(), preds.energy_pred[0], rtol=0, atol=1e-3)


def test_demo_checkpoint_is_small_and_self_describing():
  size = sum(p.stat().st_size for p in DEMO_CHECKPOINT.rglob("*") if p.is_file())
  assert size < 8e6, f"demo checkpoint is {size / 1e6:.1f} MB"
  meta = json.loads((DEMO_CHECKPOINT / "meta" / "metadata").read_text())
  assert meta["train_config"]["model"]["preset"] == "small"
  assert "test_errors" in meta and "checkpoint" not in meta["test_errors"]  # no path of the training machine
  assert not (DEMO_CHECKPOINT / "state").exists()  # weights only, no optimizer state
