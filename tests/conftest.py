"""Test session settings and a per-file time report (printed at the end of every run)."""

import collections
import gc
import os
import sys
from pathlib import Path

# Shared helpers (model_helpers, md_helpers) import by name from every test folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The tools turn on JAX's persistent compilation cache; the suite compiles each program once anyway.
os.environ.setdefault("E2FORMER_JAX_CACHE_DIR", "off")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

_FILE_SECONDS = collections.defaultdict(float)


def pytest_runtest_teardown(item, nextitem):
  """After the last test of a file, JAX's compiled programs are dropped. Each program XLA compiles for the CPU
  keeps its machine code in memory mappings, and the whole suite in one process would pass Linux's
  ``vm.max_map_count`` (65,530), after which compilation crashes; a file's programs are not used by the next."""
  if nextitem is None or nextitem.path != item.path:
    import jax

    jax.clear_caches()
    gc.collect()


def pytest_runtest_logreport(report):
  _FILE_SECONDS[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter):
  terminalreporter.section("time per test file (setup + call + teardown)")
  for path, seconds in sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1]):
    terminalreporter.write_line(f"{seconds:8.1f} s  {path}")
  terminalreporter.write_line(f"{sum(_FILE_SECONDS.values()):8.1f} s  total")
