"""The tree passes the linter and is formatted as `pyproject.toml`'s [tool.ruff] says."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _ruff() -> list[str]:
  exe = Path(sys.executable).with_name("ruff")
  if exe.exists():
    return [str(exe)]
  if shutil.which("ruff"):
    return ["ruff"]
  pytest.fail("ruff is not installed: it comes with the 'test' extra (pip install -e '.[test]')")


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff(args):
  result = subprocess.run([*_ruff(), *args], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr
