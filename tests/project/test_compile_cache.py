"""The persistent compilation cache: where it goes, how it is turned off, and that a second process reuses it."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROGRAM = textwrap.dedent(
  """
  import time, jax, jax.numpy as jnp
  from e2former_jax.compile_cache import enable_compile_cache
  print("dir", enable_compile_cache())
  f = jax.jit(lambda x: jnp.linalg.qr(jnp.sin(x) @ x.T + jnp.cos(x))[0].sum())
  t = time.perf_counter(); f.lower(jnp.ones((64, 64))).compile(); print("compile", time.perf_counter() - t)
  """
)


def _run(env):
  out = subprocess.run(
    [sys.executable, "-c", PROGRAM], env={**os.environ, **env}, capture_output=True, text=True, check=True
  )
  return out.stdout


def test_cache_directory_is_filled_and_reused(tmp_path):
  env = {"E2FORMER_JAX_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the test's program compiles in well under 1 s
  first = _run(env)
  assert f"dir {tmp_path / 'cache'}" in first
  entries = list((tmp_path / "cache").iterdir())
  assert entries, "nothing was written to the cache"
  _run(env)
  assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(p.name for p in entries)  # a hit


def test_cache_can_be_turned_off(tmp_path):
  assert "dir None" in _run({"E2FORMER_JAX_CACHE_DIR": "off", "PYTHONPATH": str(ROOT)})
