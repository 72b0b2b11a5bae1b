"""JAX's persistent compilation cache, on by default for the calculator, ``DevicePotential`` and the command-line
tools, and the traced programs of ``DevicePotential`` and of the jitted MD loop kept beside it.

Compiling the paper model takes tens of seconds on a GPU; with the cache a second process that runs the same
program (same model config, shapes, jax version and device) loads it from disk instead. The cache lives in
``$E2FORMER_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/e2former_jax/jax`` (``~/.cache/e2former_jax/jax``).
``E2FORMER_JAX_CACHE_DIR=off`` turns it off; a cache directory the user already gave JAX
(``jax.config.update("jax_compilation_cache_dir", ...)`` or ``JAX_COMPILATION_CACHE_DIR``) is left as it is.

JAX's cache starts after tracing and lowering, which for the paper model are seconds of Python in every process.
``StoredPrograms`` keeps the lowered program itself (a ``jax.export`` artifact) in the ``programs/``
subdirectory of the cache, keyed by everything that defines it (the function's description, the shapes, the
source of this package, the jax version and the device): a second process deserializes it instead of tracing,
and JAX's cache then has its compiled form.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import jaxlib
import numpy as np
from jax import export as jax_export
from jax.sharding import SingleDeviceSharding

from pallas_kernels.api import TRITON_CALL

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


PROGRAMS_SUBDIR = "programs"
_DISABLED_CHECKS = (jax_export.DisabledSafetyCheck.custom_call(TRITON_CALL),)
_PACKAGES = ("e2former_jax", "pallas_kernels")


def programs_dir() -> Path | None:
  """Where ``StoredPrograms`` keeps its artifacts (None when the cache is turned off)."""
  base = default_cache_dir()
  return None if base is None else base / PROGRAMS_SUBDIR


@functools.cache
def source_fingerprint() -> str:
  """A hash of every Python source file of this package and its kernels (read once per process): a stored
  program is never used by other code than the code that traced it."""
  root = Path(__file__).resolve().parents[1]
  digest = hashlib.sha256()
  for package in _PACKAGES:
    for path in sorted((root / package).rglob("*.py")):
      digest.update(path.relative_to(root).as_posix().encode())
      digest.update(path.read_bytes())
  return digest.hexdigest()


class StoredPrograms:
  """``jax.jit(fn)`` whose traced and lowered programs are also kept on disk (``programs_dir``), one per input
  signature (tree structure, shapes, dtypes).

  A call with a new signature loads the program stored by an earlier process when there is one, else traces and
  exports ``fn`` (``jax.export``, flattened to arrays in and out) and stores it with the tree structure of its
  outputs; either way it then runs ``jax.jit`` of the exported call, whose compiled form JAX's persistent cache
  keeps. Inputs and outputs may be any pytrees of arrays. An unreadable artifact is traced again and replaced; a
  program that cannot be exported (a host callback, say), or whose artifact does not compile here, runs as
  plain ``jax.jit`` with a warning (the cost is the trace in every process, not a result).

  The export allows the Pallas kernels' Triton custom call (``pallas_kernels.api.TRITON_CALL``), which jax.export
  refuses by default because its compiled kernel is tied to the jaxlib that made it: a stored program is only
  ever loaded by the same jax and jaxlib (``key``).

  Args:
    fn: the function (pure; its closed-over values must be part of ``description``).
    description: a string that names everything static about ``fn`` (configuration, options).
    donate_argnums: positions of the arguments whose buffers the call may reuse (``jax.jit``'s).
  """

  FORMAT = "e2former-jax stored program 1"

  def __init__(self, fn: Callable, description: str, donate_argnums=()):
    self.fn, self.description = fn, description
    self.donate_argnums = tuple(donate_argnums)
    self._programs = {}

  def __call__(self, *args):
    leaves, tree = jax.tree.flatten(args)
    signature = (tree, tuple(map(_shape_and_dtype, leaves)))
    entry = self._programs.get(signature)
    if entry is not None:
      program, out_tree = entry
      return jax.tree.unflatten(out_tree, program(*leaves))
    fn, traced_tree = self.fn, {}

    def flat(*leaves):
      out_leaves, traced_tree["out"] = jax.tree.flatten(fn(*jax.tree.unflatten(tree, leaves)))
      return tuple(out_leaves)

    donated = _leaf_positions(args, self.donate_argnums)
    program, out_tree, reason = self._load_or_export(flat, traced_tree, tree, signature[1], donated)
    if program is not None:
      try:
        out = program(*leaves)
      except Exception as error:  # the stored program does not compile or run here: trace as usual
        program, reason = None, f"{type(error).__name__}: {error}"
    if program is None:
      program = jax.jit(flat, donate_argnums=donated)
      out = program(*leaves)  # raises what the function itself raises
      out_tree = traced_tree["out"]
      warnings.warn(f"a traced program could not be stored ({reason}); it is traced in every process", stacklevel=2)
    self._programs[signature] = (program, out_tree)
    return jax.tree.unflatten(out_tree, out)

  def key(self, tree, shapes) -> str:
    """The artifact's name: a hash of the description, the signature, the source, jax and the device."""
    device = jax.devices()[0]
    parts = (self.FORMAT, self.description, str(tree), str(shapes), str(self.donate_argnums), source_fingerprint())
    parts += (jax.__version__, jaxlib.__version__, device.platform, device.device_kind, str(jax.config.jax_enable_x64))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]

  def _load_or_export(self, flat: Callable, traced_tree: dict, tree, shapes, donated):
    """(``jax.jit`` of the stored or newly exported program, its output tree, "") or (None, None, why it could
    not be exported). ``flat`` records its output tree in ``traced_tree["out"]`` when it is traced."""
    directory = programs_dir()
    path = None if directory is None else directory / f"{self.key(tree, shapes)}.jaxexport"
    exported = out_tree = None
    if path is not None and path.is_file():
      try:
        out_tree, data = pickle.loads(path.read_bytes())
        exported = jax_export.deserialize(bytearray(data))
      except Exception:  # a damaged or foreign file: trace again and replace it
        exported = None
    if exported is None:
      abstract = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
      try:
        exported = jax_export.export(jax.jit(flat), disabled_checks=_DISABLED_CHECKS)(*abstract)
        out_tree = traced_tree["out"]
        data = pickle.dumps((out_tree, exported.serialize()))
      except Exception as error:
        return None, None, f"{type(error).__name__}: {error}"
      if path is not None:
        _write_atomically(path, data)
    # Placed on the default device explicitly: without in_shardings the exported call is traced and compiled again
    # when the same inputs come once uncommitted and then committed (as a donated state does).
    device = SingleDeviceSharding(jax.devices()[0])
    return jax.jit(exported.call, in_shardings=device, donate_argnums=donated), out_tree, ""


def _leaf_positions(args: tuple, argnums: tuple[int, ...]) -> tuple[int, ...]:
  """Positions, among the leaves of ``args``, of the leaves of the arguments ``argnums``."""
  positions, start = [], 0
  for i, arg in enumerate(args):
    count = len(jax.tree.leaves(arg))
    if i in argnums:
      positions.extend(range(start, start + count))
    start += count
  return tuple(positions)


def _shape_and_dtype(x) -> tuple:
  """A leaf's part of a call's signature: (shape, the dtype JAX gives it); read straight off a JAX array, whose
  dtype is already canonical (the common case, and the fast one: a call may have hundreds of weights)."""
  if isinstance(x, jax.Array):
    return x.shape, x.dtype
  return np.shape(x), _dtype_of(x)


def _dtype_of(x):
  """The dtype JAX gives ``x`` (an array's own, PRNG key types included; Python numbers canonicalised as JAX
  does)."""
  dtype = getattr(x, "dtype", None)
  return jax.dtypes.canonicalize_dtype(np.result_type(x) if dtype is None else dtype, allow_extended_dtype=True)


def _write_atomically(path: Path, data: bytes) -> None:
  """Writes ``data`` so that a reader sees the whole file or none (concurrent processes may race); a read-only
  or full disk only costs the next process a trace."""
  temporary = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as fh:
      temporary = fh.name
      fh.write(data)
    os.replace(temporary, path)
  except OSError:
    if temporary is not None and os.path.exists(temporary):
      os.unlink(temporary)
