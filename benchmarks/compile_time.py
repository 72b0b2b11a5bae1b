"""Compile time of the paper model on first use and in a second process (JAX's persistent compilation cache).

Protocol (issue 17 of the project; target: <= 20 s on first use, <= 5 s in a second process): for each preset x
forces x atom count, three fresh processes (``sys.executable``, the same PYTHONPATH), each of which imports the
package, builds the model with random weights (``build`` of ``benchmarks/model.py``: the ``QKdotS_alpha`` gate,
float32, ``matmul_precision="highest"``), wraps it in ``e2former_jax.potential.DevicePotential`` and calls it twice
on ``random_structure(n)`` of ``benchmarks/model.py``:

* ``off``: the cache turned off (``E2FORMER_JAX_CACHE_DIR=off``), the baseline;
* ``first``: the cache on (``e2former_jax.compile_cache.enable_compile_cache``, called by the process itself) in an
  empty temporary directory: a user's first run;
* ``second``: the same directory again: a user's second run, which should load the program from disk.

``--target md`` times ``e2former_jax.md.JaxMD`` instead (a water box of about n atoms, ``child`` says how):
the jitted MD chunk, which holds the neighbour list, the model and the integrator.

Each process reports, in seconds: ``import`` (jax and the package), ``build`` (model construction with random
weights and ``DevicePotential``: eager, many small programs; ``build_compile`` of it is their XLA compilation), and
for its first call, from JAX's ``jax.monitoring`` time spans '/jax/core/compile/jaxpr_trace_duration',
'.../jaxpr_to_mlir_module_duration' and '.../backend_compile_duration' made exclusive (overlaps counted once, the
compile spans first, then lowering, then tracing): ``compile`` (XLA backend compilation of every program of the
call, or the cache read on a hit; ``compile_max`` the longest single one; ``programs`` their number: the main
program, once per neighbour-search capacity tried, and small eager programs that build constant tables while
tracing), ``lower`` (jaxpr to MLIR) and ``trace`` (Python to jaxpr); ``compile_total`` = trace + lower + compile;
``first_call`` (the call's wall time: those, one evaluation and the transfer) and ``run_ms`` (the second call,
evaluation alone); ``capacity``: the neighbour search's (cell, candidate) capacity after the first call (from
(32, 64); a larger one means the main program was compiled again). JAX's cache events of the first call:
``requests`` (programs given a cache key, which JAX also computes with no cache directory), ``hits`` (loaded from
disk) and ``written`` (stored). ``process`` is the process's wall time seen from outside, interpreter start-up
included. JAX stores only programs that compiled in at least ``jax_persistent_cache_min_compile_time_secs`` (JAX's
default 1 s, which is what a user gets; ``--min-compile-secs`` changes it for all three processes).

``--layers`` overrides the number of transformer blocks (all identical in the paper presets): the difference
between 4 and 1 blocks is what compiling one block instead of four (``jax.lax.scan`` over stacked block
parameters) could save. ``--variants`` picks the processes (in order; ``second`` needs ``first`` before it).

  PYTHONPATH=$PWD python benchmarks/compile_time.py --preset paper_spice --forces direct conservative \
      --atoms 4096 --json $OUT/compile_time.jsonl

CPU smoke test: ``JAX_PLATFORMS=cpu PYTHONPATH=$PWD python benchmarks/compile_time.py --preset small --atoms 256``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MARK = "COMPILE_TIME_RESULT "
CACHE_ENV = "E2FORMER_JAX_CACHE_DIR"
VARIANTS = ("off", "first", "second")
STEPS_PER_CALL = 10  # JaxMD's default chunk
TRACE, LOWER, COMPILE = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
)
CACHE_EVENTS = {
  "/jax/compilation_cache/compile_requests_use_cache": "requests",
  "/jax/compilation_cache/cache_hits": "hits",
  "/jax/compilation_cache/cache_misses": "written",  # JAX records a miss when it writes the entry
}


def merged_seconds(spans: list[tuple[float, float]]) -> float:
  """Length of the union of (start, end) intervals (seconds): nested or overlapping spans count once."""
  total, end = 0.0, float("-inf")
  for lo, hi in sorted(spans):
    if hi > end:
      total += hi - max(lo, end)
      end = hi
  return total


class CompileEvents:
  """``jax.monitoring`` listener: time spans of tracing, lowering and backend compilation, and cache events, per
  phase of the process (``phase`` is set by the caller)."""

  def __init__(self):
    import jax

    self.phase = "import"
    self.spans: dict[tuple[str, str], list[tuple[float, float]]] = {}
    self.counts: dict[tuple[str, str], int] = {}
    jax.monitoring.register_event_time_span_listener(self._span)
    jax.monitoring.register_event_listener(self._event)

  def _span(self, event, start, end, **_):
    self.spans.setdefault((self.phase, event), []).append((start, end))

  def _event(self, event, **_):
    if event in CACHE_EVENTS:
      key = (self.phase, CACHE_EVENTS[event])
      self.counts[key] = self.counts.get(key, 0) + 1

  def seconds(self, phase: str, *events: str) -> float:
    """Wall time of ``phase`` covered by spans of any of ``events`` (overlaps counted once)."""
    return merged_seconds([span for event in events for span in self.spans.get((phase, event), [])])

  def summary(self, phase: str) -> dict:
    """Exclusive shares of ``phase``: backend compile first, then lowering outside it, then tracing outside both
    (tracing runs small eager programs that build constant tables; their compiles count as compile)."""
    compile_, lower_or_compile = self.seconds(phase, COMPILE), self.seconds(phase, LOWER, COMPILE)
    compiles = self.spans.get((phase, COMPILE), [])
    row = {
      "trace": self.seconds(phase, TRACE, LOWER, COMPILE) - lower_or_compile,
      "lower": lower_or_compile - compile_,
      "compile": compile_,
      "compile_max": max((hi - lo for lo, hi in compiles), default=0.0),
      "programs": len(compiles),
    }
    return row | {name: self.counts.get((phase, name), 0) for name in CACHE_EVENTS.values()}


def child(preset: str, forces: str, atoms: int, impl: str, layers: int | None, target: str = "potential") -> dict:
  """One process's measurement (run by ``main`` with ``--child``): import, build, first and second call.
  ``layers``: number of transformer blocks (None: the preset's). ``target`` "potential": a ``DevicePotential``
  call on ``random_structure(atoms)``; "md": ``JaxMD`` on ``benchmarks.md.water_box(atoms)`` (masses of 1e6
  amu, NVE 0.5 fs), whose first call is the driver's construction (one force evaluation) and one chunk of
  ``STEPS_PER_CALL`` steps, and whose second call is one more chunk."""
  start = time.perf_counter()
  import jax  # imported here so that the import is timed

  events = CompileEvents()
  from flax import nnx

  from benchmarks.model import benchmark_config, random_structure
  from e2former_jax.compile_cache import enable_compile_cache
  from e2former_jax.model import E2Former
  from e2former_jax.potential import DevicePotential

  cache_dir = enable_compile_cache()
  row = {"import": time.perf_counter() - start}

  events.phase = "build"
  t = time.perf_counter()
  blocks = {} if layers is None else {"num_layers": layers}
  cfg = benchmark_config(forces, impl=impl, preset=preset, **blocks)
  model = E2Former(cfg, rngs=nnx.Rngs(0))
  potential = DevicePotential(model) if target == "potential" else None
  row["build"] = time.perf_counter() - t
  row["build_compile"] = events.seconds("build", COMPILE)
  row["build_programs"] = len(events.spans.get(("build", COMPILE), []))

  if target == "potential":
    structure = random_structure(atoms)
    positions, numbers = structure.get_positions(), structure.get_atomic_numbers()
    calls = [lambda: potential(positions, numbers)] * 2
  else:
    from benchmarks.md import water_box
    from e2former_jax.md import JaxMD

    structure = water_box(atoms)
    structure.set_masses(np.full(len(structure), 1e6))
    md = {}
    calls = [
      lambda: md.setdefault("driver", JaxMD(model, structure, timestep_fs=0.5)).run(STEPS_PER_CALL),
      lambda: md["driver"].run(STEPS_PER_CALL),
    ]
  events.phase = "first_call"
  t = time.perf_counter()
  calls[0]()
  row["first_call"] = time.perf_counter() - t
  if potential is not None:
    row["capacity"] = [potential.capacity.cell_capacity, potential.capacity.candidate_capacity]  # after growth
  first = events.summary("first_call")
  events.phase = "second_call"
  t = time.perf_counter()
  calls[1]()
  row["run_ms"] = (time.perf_counter() - t) * 1e3
  row.update(first, compile_total=first["trace"] + first["lower"] + first["compile"])
  row.update(
    num_layers=cfg.num_layers,
    cache_dir=None if cache_dir is None else str(cache_dir),
    min_compile_secs=jax.config.jax_persistent_cache_min_compile_time_secs,
    device=jax.devices()[0].device_kind,
    jax=jax.__version__,
  )
  return row


def run_child(spec: dict, cache: str, min_compile_secs: float | None) -> dict:
  """Runs ``child(**spec)`` in a fresh interpreter with the cache setting ``cache`` (a directory or "off")."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the package picks the dir
  env[CACHE_ENV] = cache
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
  if min_compile_secs is not None:
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(min_compile_secs)
  command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
  start = time.perf_counter()
  done = subprocess.run(command, env=env, capture_output=True, text=True)
  process = time.perf_counter() - start
  lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
  if done.returncode != 0 or not lines:
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"exit status {done.returncode}: {tail[0]}", "process": process}
  return json.loads(lines[-1][len(MARK) :]) | {"process": process}


COLUMNS = (
  "target",
  "preset",
  "forces",
  "atoms",
  "num_layers",
  "cache",
  "import",
  "build",
  "trace",
  "lower",
  "compile",
  "compile_max",
  "compile_total",
  "first_call",
  "run_ms",
  "programs",
  "requests",
  "hits",
  "written",
  "process",
)


def cell(value) -> str:
  return f"{value:.2f}" if isinstance(value, float) else str(value)


def main():
  if len(sys.argv) == 3 and sys.argv[1] == "--child":
    print(MARK + json.dumps(child(**json.loads(sys.argv[2]))), flush=True)
    return
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", nargs="+", default=["paper_spice"], help="model presets (small for a smoke test)")
  p.add_argument("--forces", nargs="+", default=["direct", "conservative"], choices=["direct", "conservative"])
  p.add_argument("--atoms", type=int, nargs="+", default=[4096])
  p.add_argument("--impl", default="auto", help="attention_impl of the model (auto: pallas on a GPU)")
  p.add_argument("--layers", type=int, nargs="+", default=[None], help="transformer blocks (default: the preset's)")
  p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="processes to run, in order")
  p.add_argument("--min-compile-secs", type=float, help="jax_persistent_cache_min_compile_time_secs (JAX's: 1)")
  p.add_argument("--target", choices=["potential", "md"], default="potential", help="DevicePotential or JaxMD")
  p.add_argument("--json", help="append one JSON line per process")
  args = p.parse_args()
  if any(n < 1 for n in args.atoms):
    p.error(f"--atoms must be positive, got {args.atoms}")
  if any(n is not None and n < 1 for n in args.layers):
    p.error(f"--layers must be positive, got {args.layers}")
  order = args.variants
  if "second" in order and ("first" not in order or order.index("second") < order.index("first")):
    p.error("--variants second needs first before it (the second process reads what the first one stored)")
  rows = []
  specs = [
    dict(preset=preset, forces=forces, atoms=atoms, impl=args.impl, layers=layers, target=args.target)
    for preset in args.preset
    for forces in args.forces
    for atoms in args.atoms
    for layers in args.layers
  ]
  for spec in specs:
    with tempfile.TemporaryDirectory(prefix="e2former_compile_cache_") as cache_dir:
      for variant in args.variants:
        result = run_child(spec, "off" if variant == "off" else cache_dir, args.min_compile_secs)
        row = dict(spec, cache=variant) | result
        row["date"] = time.strftime("%Y-%m-%d")
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
          with open(args.json, "a") as fh:
            fh.write(json.dumps(row) + "\n")
  print(f"\n{rows[0].get('device', '?')}, jax {rows[0].get('jax', '?')}; seconds unless named")
  print(" | ".join(COLUMNS))
  for r in rows:
    print(" | ".join(cell(r.get(c, "")) for c in COLUMNS) + (f" | {r['error']}" if "error" in r else ""))


if __name__ == "__main__":
  main()
