"""Test session settings and a per-file time report (printed at the end of every run, also with pytest-xdist
workers: the workers send every test's report back, and the report names the worker that ran each file)."""

import collections
import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Shared helpers (model_helpers, md_helpers) import by name from every test folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The tools' own cache (``compile_cache``: ~/.cache/e2former_jax) stays off: a test must not read programs an
# earlier run left there. The session has its own JAX compilation cache instead, a new directory shared by the
# xdist workers and the tests' subprocesses (train.py resumed after a kill, the notebooks' kernels, the 4-device
# run), some of whose programs another process of the session compiled already (train.py's step after its kill,
# the demo model's); the tools find it through ``JAX_COMPILATION_CACHE_DIR`` and leave it as it is. Removed when
# the session ends.
os.environ.setdefault("E2FORMER_JAX_CACHE_DIR", "off")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix="e2former-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
else:
  _SESSION_CACHE = None
# About half of the tests' time is XLA compiling for the CPU and a quarter JAX tracing and lowering (measured
# 2026-12-08, benchmarks/RESULTS.md), so XLA compiles with most optimisations off (JAX's
# ``jax_disable_most_optimizations``: LLVM at level 0, no expensive passes): a one-block force-matching program
# compiles in 17-20 s instead of 27-30 s, and the tests' arrays are small. A file whose time is running its
# programs rather than compiling them turns them back on (``optimized_programs``). XLA reads XLA_FLAGS up to the
# first word without "--" (it ignores the rest), so every flag there starts with "--". Subprocesses of the tests
# inherit both settings.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# The slowest files (seconds in a two-worker run as CI runs it, 2026-12-07), slowest first. With pytest-xdist's
# ``--dist loadfile`` a worker takes the next whole file when it is nearly done with its current one, in
# collection order; starting with the long files keeps one worker from running a long file alone at the end.
# A file missing here (new or renamed) runs after these, in its usual order.
SLOWEST_FILES = (
  "tests/model/test_atom_chunks.py",  # 335 s
  "tests/authors/test_import.py",  # 212 s
  "tests/model/test_model.py",  # 163 s
  "tests/training/test_training.py",  # 146 s
  "tests/model/test_potential.py",  # 124 s
  "tests/project/test_notebooks.py",  # 117 s
  "tests/training/test_distributed.py",  # 106 s
  "tests/md/test_md.py",  # 95 s
  "tests/model/test_model_float64.py",  # 92 s
  "tests/authors/test_import_float64.py",  # 88 s
  "tests/model/test_calculator.py",  # 80 s
  "tests/training/test_evaluation.py",  # 75 s
)

_FILE_SECONDS = collections.defaultdict(float)
_FILE_WORKER = {}


def _file_of(nodeid: str) -> str:
  return nodeid.split("::")[0]


def pytest_collection_modifyitems(config, items):
  """Under pytest-xdist, the files of ``SLOWEST_FILES`` first (each file's tests keep their order)."""
  if "PYTEST_XDIST_WORKER" in os.environ:
    rank = {path: i for i, path in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(_file_of(item.nodeid), len(rank)))


@pytest.fixture(scope="module")
def optimized_programs():
  """XLA's optimisations on for the programs of one test file (its long runs take longer than compiling them
  optimised: tests/md/test_md.py, 142 against 184 s on this suite's 2-core host, 2026-12-07)."""
  import jax

  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


def pytest_runtest_teardown(item, nextitem):
  """After the last test of a file, JAX's compiled programs are dropped. Each program XLA compiles for the CPU
  keeps its machine code in memory mappings, and the whole suite in one process would pass Linux's
  ``vm.max_map_count`` (65,530), after which compilation crashes; a file's programs are not used by the next."""
  if nextitem is None or nextitem.path != item.path:
    import jax

    jax.clear_caches()
    gc.collect()


def pytest_runtest_logreport(report):
  """Sums each file's durations; on the xdist controller ``report.node`` is the worker that sent the report."""
  path = _file_of(report.nodeid)
  _FILE_SECONDS[path] += report.duration
  node = getattr(report, "node", None)
  if node is not None:
    _FILE_WORKER[path] = node.gateway.id


def pytest_terminal_summary(terminalreporter):
  terminalreporter.section("time per test file (setup + call + teardown)")
  for path, seconds in sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1]):
    worker = f"  [{_FILE_WORKER[path]}]" if path in _FILE_WORKER else ""
    terminalreporter.write_line(f"{seconds:8.1f} s  {path}{worker}")
  per_worker = collections.defaultdict(float)
  for path, worker in _FILE_WORKER.items():
    per_worker[worker] += _FILE_SECONDS[path]
  for worker, seconds in sorted(per_worker.items()):
    terminalreporter.write_line(f"{seconds:8.1f} s  total of worker {worker}")
  terminalreporter.write_line(f"{sum(_FILE_SECONDS.values()):8.1f} s  total")


def pytest_unconfigure(config):
  """The session's compilation cache goes with the process that made it (the controller under xdist)."""
  if _SESSION_CACHE is not None:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
