"""What an installing user meets: the metadata (extras, scripts, licence), ``e2former-info`` /
``python -m e2former_jax``, and the command-line error convention."""

import importlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from e2former_jax import info
from e2former_jax.cli_errors import EXIT_USAGE, EXIT_USER_ERROR, UsageError, one_line, run_command
from e2former_jax.device_memory import DeviceMemoryError

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_console_script_resolves_to_a_function():
  scripts = PROJECT["scripts"]
  assert {"e2former-eval", "e2former-md", "e2former-info"} <= set(scripts)
  for name, target in scripts.items():
    module, function = target.split(":")
    assert callable(getattr(importlib.import_module(module), function)), name


def test_extras_and_licence():
  extras = PROJECT["optional-dependencies"]
  jax_pin = next(d for d in PROJECT["dependencies"] if d.startswith("jax=="))
  # the CUDA plugin must be the one built for the pinned jax
  assert extras["cuda"] == [f"jax[cuda13]=={jax_pin.split('==')[1]}"]
  assert any(d.startswith("ase-db-backends") for d in extras["omol25"])
  assert not any(d.startswith("ase-db-backends") for d in PROJECT["dependencies"])  # optional, not in every install
  assert "e2former-jax[omol25]" in extras["test"]
  assert PROJECT["requires-python"] == ">=3.12"
  licence = (ROOT / "LICENSE").read_text()
  assert PROJECT["license"] == {"text": "MIT"} and licence.startswith("MIT License")
  assert "Copyright (c) 2026 e2former-jax developers" in licence


def test_info_reports_versions_devices_and_the_auto_path(capsys):
  assert info.main([]) == 0
  text = capsys.readouterr().out
  import jax

  assert re.search(rf"\n  jax +{re.escape(jax.__version__)}\n", text)
  for name in ("jaxlib", "flax", "e3x", "python", "e2former-jax", "devices"):
    assert re.search(rf"\n  {name} +\S", text), name
  if jax.default_backend() == "cpu":
    assert "attention auto     jnp_dense for batches of at most 256 atom slots, jnp_node above" in text
    assert "install the cuda extra: pip install -e '.[cuda]'" in text


def test_python_m_e2former_jax_prints_json():
  result = subprocess.run(
    [sys.executable, "-m", "e2former_jax", "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT
  )
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout)
  assert report["versions"]["jax"] and report["devices"] and report["attention_auto"]


def test_cli_errors_one_line_exit_codes_and_debug(capsys):
  def fail(err):
    def body():
      raise err

    return body

  assert run_command("tool", fail(ValueError("bad value 'x'\n  on two lines"))) == EXIT_USER_ERROR
  assert capsys.readouterr().err == "tool: error: bad value 'x' on two lines (--debug shows the traceback)\n"
  assert run_command("tool", fail(UsageError("--a needs --b"))) == EXIT_USAGE
  assert run_command("tool", fail(FileNotFoundError("x.xyz: no such file"))) == EXIT_USER_ERROR
  assert (
    run_command("tool", fail(DeviceMemoryError("an MD step for 9 atoms ran out of device memory"))) == EXIT_USER_ERROR
  )
  assert one_line(KeyError("model_config")) == "missing key 'model_config'"
  assert run_command("tool", lambda: None) == 0
  with pytest.raises(ValueError):
    run_command("tool", fail(ValueError("shown in full")), debug=True)
  with pytest.raises(RuntimeError):  # not a user's mistake: the traceback stays
    run_command("tool", fail(RuntimeError("bug")))
