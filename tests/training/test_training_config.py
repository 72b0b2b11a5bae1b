"""Training configs: presets (one YAML file each, linked from configs/), overrides, validation, the resolved config
round trip, what a resume may change, the CLI."""

from pathlib import Path

import pytest
import yaml

from e2former_jax.cli_errors import UsageError
from e2former_jax.config import get_config
from e2former_jax.training import config as C
from e2former_jax.training.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", C.TRAIN_PRESETS)
def test_config_files_are_links_to_the_presets(name):
  path = CONFIGS / f"{name}.yaml"
  assert path.is_symlink() and path.resolve() == C.preset_path(name).resolve(), f"configs/{name}.yaml"
  assert C.load_config(name) == C.get_train_config(name) == C.load_config(path)


def test_presets_and_links_cover_each_other():
  assert set(C.TRAIN_PRESETS) == {"demo", "paper_spice", "paper_omol25_stage1", "paper_omol25_stage2"}
  assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(C.TRAIN_PRESETS)
  with pytest.raises(ValueError, match="unknown training preset 'demoo'"):
    C.get_train_config("demoo")
  with pytest.raises(FileNotFoundError, match="or give a preset name: demo"):
    C.load_config("no/such.yaml")


def test_what_a_resume_may_change():
  saved = C.load_config("demo", ["optim.schedule_steps=null"])
  longer = C.resumed_config(saved, ["run.steps=20000", "run.eval_every=1000"])
  assert longer.run.steps == 20000 and longer.optim.schedule_steps == saved.run.steps == 8640
  C.check_resumable(saved, longer)
  memory = C.resumed_config(saved, ["model.remat=true", "model.edge_chunk=64", "model.node_chunk=32"])
  assert [memory.model[k] for k in ("remat", "edge_chunk", "node_chunk")] == [True, 64, 32]
  C.check_resumable(saved, memory)  # how the model is computed, not what it computes
  pinned = C.resumed_config(C.load_config("paper_omol25_stage2"), ["run.steps=5"])
  assert pinned.optim.schedule_steps == 100_000_000  # an explicit schedule stays as it was
  with pytest.raises(ValueError, match="cannot change optim.lr, model.channels"):
    C.resumed_config(saved, ["optim.lr=1e-4", "model.channels=8", "run.steps=9"])
  with pytest.raises(ValueError, match=r"data.atom_budget: 48 -> 64"):
    C.check_resumable(saved, C.load_config("demo", ["optim.schedule_steps=null", "data.atom_budget=64"]))


def test_paper_presets_follow_the_authors_scripts():
  spice = C.get_train_config("paper_spice")
  assert spice.model_config() == get_config("paper_spice")
  assert (spice.loss.kind, spice.loss.energy_weight, spice.loss.force_weight) == ("atoml2mae", 0.2, 0.9)
  assert (spice.optim.lr, spice.optim.weight_decay, spice.optim.clip_norm, spice.run.steps) == (4e-4, 0, 100, 200_000)
  s1 = C.get_train_config("paper_omol25_stage1")
  assert (s1.loss.energy_weight, s1.loss.force_weight, s1.optim.lr, s1.optim.weight_decay) == (1, 30, 8e-4, 1e-3)
  assert s1.data.atom_budget == 2048 and s1.data.element_references == "omol25"
  s2 = C.get_train_config("paper_omol25_stage2")
  assert (s2.loss.kind, s2.loss.energy_weight, s2.loss.force_weight) == ("l2mae", 20, 2)
  assert s2.model_config().forces == "conservative" and s2.init.strict is False
  assert s2.schedule_steps() == 100_000_000
  for cfg in (spice, s1, s2):  # the authors' schedule constants, no EMA
    assert (cfg.optim.warmup_steps, cfg.optim.warmup_factor, cfg.optim.lr_min_factor) == (4000, 0.2, 0.01)
    assert cfg.optim.max_warmup_fraction is None and cfg.optim.ema_decay is None
  demo = C.get_train_config("demo")
  assert demo.model_config() == get_config("small") and demo.model_config().forces == "conservative"
  assert demo.optim.max_warmup_fraction <= 0.1 and demo.data.element_references == "fit"
  assert demo.loss.kind == "atoml2mae" and demo.loss.force_weight >= 10 * demo.loss.energy_weight
  assert demo.optim.ema_decay is not None  # the recipe of the sweep in benchmarks/RESULTS.md


def test_overrides_and_validation(tmp_path):
  cfg = C.load_config(
    CONFIGS / "paper_spice.yaml",
    ["optim.lr=2e-4", "run.steps=10", "data.reader={energy_key: E}", "model.channels=32", "model.num_heads=16"],
  )
  assert cfg.optim.lr == 2e-4 and cfg.run.steps == 10 and cfg.data.reader == {"energy_key": "E"}
  assert cfg.model_config() == get_config("paper_spice", channels=32, num_heads=16)
  # a new preset replaces the model section, other model overrides apply on top
  cfg = C.load_config(None, ["model.channels=16", "model.preset=paper_spice", "model.num_heads=8"])
  assert cfg.model_config() == get_config("paper_spice", channels=16, num_heads=8)
  with pytest.raises(ValueError, match="unknown key"):
    C.load_config(None, ["optim.learning_rate=1"])
  with pytest.raises(ValueError, match="section.key"):
    C.load_config(None, ["lr=1"])
  with pytest.raises(ValueError, match="loss.kind"):
    C.load_config(None, ["loss.kind=l3"])
  with pytest.raises(TypeError, match="unknown ModelConfig field"):
    C.load_config(None, ["model.chanels=3"])
  # a file may start from a preset
  path = tmp_path / "mine.yaml"
  path.write_text("preset: paper_omol25_stage1\noptim:\n  lr: 1.0e-4\n")
  cfg = C.load_config(path)
  assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 1e-3 and cfg.model_config().cutoff == 6.0
  # the resolved config round-trips and differences are named
  C.dump_config(cfg, tmp_path / "resolved.yaml")
  assert C.load_config(tmp_path / "resolved.yaml") == cfg
  import dataclasses

  shorter = cfg.replace(run=dataclasses.replace(cfg.run, steps=5))
  assert C.diff_configs(cfg, shorter) == ["run.steps: 1400000 -> 5"]


def test_cli_prints_the_resolved_config(capsys):
  assert main(["--print-config", "--set", "optim.lr=2e-4", "--init-from", "runs/x", "--no-strict"]) == 0
  out = yaml.safe_load(capsys.readouterr().out)
  assert out["optim"]["lr"] == 2e-4 and out["init"] == {"checkpoint": "runs/x", "strict": False}
  assert out["model"]["preset"] == "small" and out["model"]["channels"] == get_config("small").channels
  assert main(["--print-config", "--config", str(CONFIGS / "paper_omol25_stage2.yaml")]) == 0
  assert yaml.safe_load(capsys.readouterr().out)["loss"]["kind"] == "l2mae"
  assert main(["--print-config", "--config", "paper_spice"]) == 0  # a preset by name
  assert yaml.safe_load(capsys.readouterr().out)["model"]["preset"] == "paper_spice"


@pytest.mark.parametrize(
  "argv, status, message",
  [
    (["--resume"], 2, "e2former-train: error: --resume needs --workdir (the run to continue)"),
    (["--resume", "--workdir", "no/such/run"], 2, "--resume: no/such/run holds no run to continue"),
    (["--set", "run.steps=ten", "--print-config"], 1, "run.steps: expected int, got 'ten'"),
    (["--config", "no/such.yaml", "--print-config"], 1, "no/such.yaml: no such config file"),
    (["--set", "optim.learning_rate=1", "--print-config"], 1, "unknown key(s) ['learning_rate'] in section 'optim'"),
  ],
)
def test_cli_mistakes_give_one_line_and_a_status(argv, status, message, capsys):
  assert main(argv) == status
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
  with pytest.raises((UsageError, ValueError, OSError)):  # --debug: the exception itself, with its traceback
    main([*argv, "--debug"])
