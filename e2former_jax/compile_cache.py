"""JAX's persistent compilation cache, on by default for the calculator, ``DevicePotential`` and the command-line
tools.

Compiling the paper model takes tens of seconds on a GPU; with the cache a second process that runs the same
program (same model config, shapes, jax version and device) loads it from disk instead. The cache lives in
``$E2FORMER_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/e2former_jax/jax`` (``~/.cache/e2former_jax/jax``).
``E2FORMER_JAX_CACHE_DIR=off`` turns it off; a cache directory the user already gave JAX
(``jax.config.update("jax_compilation_cache_dir", ...)`` or ``JAX_COMPILATION_CACHE_DIR``) is left as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "E2FORMER_JAX_CACHE_DIR"
MIN_COMPILE_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def default_cache_dir() -> Path | None:
  """Where the cache goes (None when turned off)."""
  value = os.environ.get(ENV)
  if value is not None:
    return None if value.strip().lower() in ("", "0", "off", "none", "false") else Path(value).expanduser()
  base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
  return base / "e2former_jax" / "jax"


def enable_compile_cache() -> Path | None:
  """Turns the persistent cache on (idempotent); returns its directory, or None when it is off or the user's
  own JAX setting is kept. Every program is stored, also those that compile in under a second (JAX's default
  skips them): a new process otherwise recompiles about a hundred small programs (tables, initialisation,
  the neighbour search), seconds in all; ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` keeps the user's
  threshold."""
  if jax.config.jax_compilation_cache_dir:
    return Path(jax.config.jax_compilation_cache_dir)
  path = default_cache_dir()
  if path is None:
    return None
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError:  # a read-only home: run without the cache
    return None
  jax.config.update("jax_compilation_cache_dir", str(path))
  if MIN_COMPILE_TIME_ENV not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return path
