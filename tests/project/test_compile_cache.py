"""The persistent compilation cache: where it goes, how it is turned off, and that a second process reuses it."""

import json
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

# A tiny model's first ``DevicePotential`` call; prints JAX's cache events of that call as JSON.
MODEL_PROGRAM = textwrap.dedent(
  """
  import json, jax, numpy as np
  from flax import nnx
  from e2former_jax.compile_cache import enable_compile_cache
  from e2former_jax.config import get_config
  from e2former_jax.model import E2Former
  from e2former_jax.potential import DevicePotential
  import e2former_jax.potential as potential_module
  enable_compile_cache()
  traces = [0]
  search = potential_module.device_graph
  def counted(*args, **kwargs):  # runs while the model program is traced, not when a stored one is loaded
    traces[0] += 1
    return search(*args, **kwargs)
  potential_module.device_graph = counted
  tiny = dict(channels=8, num_heads=2, head_dim=4, qk_hidden=8, type_embed_dim=4, num_basis=8, radial_hidden=8)
  cfg = get_config("small", **tiny, num_layers=1, max_neighbors=4, attention_impl="jnp_node", forces="direct")
  potential = DevicePotential(E2Former(cfg, rngs=nnx.Rngs(0)))
  names = {"compile_requests_use_cache": "requests", "cache_hits": "hits", "cache_misses": "written"}
  counts = dict.fromkeys(names.values(), 0)
  def count(event, **_):
    name = names.get(event.rsplit("/", 1)[-1])
    if name and event.startswith("/jax/compilation_cache/"):
      counts[name] += 1
  jax.monitoring.register_event_listener(count)
  positions = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0], [3.0, 0.0, 0.0]])
  potential(positions, np.array([8, 1, 1, 6]))
  print(json.dumps(dict(counts, traces=traces[0])))
  """
)


def _run(env, program=PROGRAM):
  """Runs ``program`` in a new process; JAX's own threshold for storing programs is left to the package."""
  unset = ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "JAX_COMPILATION_CACHE_DIR")  # the suite's own cache
  base = {k: v for k, v in os.environ.items() if k not in unset}
  out = subprocess.run([sys.executable, "-c", program], env={**base, **env}, capture_output=True, text=True, check=True)
  return out.stdout


def test_cache_directory_is_filled_and_reused(tmp_path):
  """Also programs that compile in well under JAX's default threshold of 1 s are stored."""
  env = {"E2FORMER_JAX_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
  first = _run(env)
  assert f"dir {tmp_path / 'cache'}" in first
  entries = list((tmp_path / "cache").iterdir())
  assert entries, "nothing was written to the cache"
  _run(env)
  assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(p.name for p in entries)  # a hit


def test_cache_can_be_turned_off(tmp_path):
  assert "dir None" in _run({"E2FORMER_JAX_CACHE_DIR": "off", "PYTHONPATH": str(ROOT)})


def test_second_process_loads_the_model_program_from_the_cache(tmp_path):
  """The potential's traced program is stored (``programs/``) and its compiled form gets the same cache key in a
  new process: the second process neither traces the model nor compiles nor writes anything."""
  env = {"E2FORMER_JAX_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
  first = json.loads(_run(env, MODEL_PROGRAM).splitlines()[-1])
  # Every program is written, or read back when an identical one was written earlier in the same process.
  assert first["written"] >= 1 and first["hits"] + first["written"] == first["requests"], first
  assert first["traces"] >= 1 and len(list((tmp_path / "cache" / "programs").glob("*.jaxexport"))) == 1
  second = json.loads(_run(env, MODEL_PROGRAM).splitlines()[-1])
  assert second["traces"] == 0 and second["written"] == 0 and second["hits"] == second["requests"] >= 1, second
