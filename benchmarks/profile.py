"""Device time per XLA operation of one model call, traced with ``jax.profiler`` and mapped to the model's source.

For each size and mode the jitted call of the paper backbone is traced with every module of the package inside
``jax.named_scope(<class name>)`` (``module_scopes``), compiled, warmed up twice, then run ``--repeats`` times
inside ``jax.profiler.trace``. The trace's device events (the kernels of the GPU, or the thunks of the CPU) carry
the name of the HLO instruction they ran (``hlo_op``); the compiled program's text gives each instruction's
``op_name`` (its module path, "bwd" where it is backward code) and the innermost source line XLA keeps (for a
fusion, that of its root). Device time is summed per instruction, divided by the number of calls and printed as
three tables, largest first, with the share of the call's wall time: per module path (forward and backward
together), per scope and source line, and per instruction. Wall time minus the summed kernel time is the time
the device waits between kernels (on the CPU, thunks run on several threads, so the sum can exceed the wall time),
or for the host: the wall time is taken while tracing, which slows each launch. The device's own timeline says
which: its span from the call's first kernel to its last, the idle time inside it, and the largest idle intervals
with the instructions on either side (``idle_between_kernels``).
XLA's command buffers (CUDA graphs) are off for the run, else the trace sees one event per call; calls are then
slightly slower (29.5 against 28.1 ms for E + direct F at 4,096 atoms on an H100, RESULTS.md).

Modes (``benchmarks/model.py``'s structure and backbone, ``--gate`` QKdotS_alpha by default):
  direct        E + direct forces (forward only)
  conservative  E + F = -dE/dx
  train         gradient of E + mean F^2 with respect to the parameters, F = -dE/dx (the authors' protocol)

  PYTHONPATH=$PWD python benchmarks/profile.py --atoms 4096 --modes direct conservative --json $OUT/profile.jsonl

A fourth table sums the instructions by kind of work (``kind_of_work``: the Pallas kernels, the matrix products,
the slices around the per-degree products, ...). ``--summarize FILE`` prints the tables of a saved JSON lines file
without running anything (no GPU needed).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

import jax
from flax import nnx

from benchmarks.model import benchmark_config, model_function, random_structure
from benchmarks.report import stamp
from e2former_jax.graph import graph_from_atoms
from e2former_jax.model import E2Former

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{([^}]*)\}")
_TABLE_ROW = re.compile(r"^(\d+) (.*)$")
_FIELDS = re.compile(r"(\w+)=(-?\d+)")
_TRANSFORM = re.compile(r"^(\w+)\((.*)\)$")
_PACKAGES = ("e2former_jax/", "pallas_kernels/")


@contextlib.contextmanager
def module_scopes():
  """Every ``nnx.Module`` of the package runs its ``__call__`` inside ``jax.named_scope(<class name>)`` while
  this is active, so each HLO instruction's ``op_name`` names the modules it came from."""
  wrapped = []
  for name, module in list(sys.modules.items()):
    if not name.startswith("e2former_jax"):
      continue
    for cls in vars(module).values():
      if isinstance(cls, type) and issubclass(cls, nnx.Module) and "__call__" in cls.__dict__:
        call = cls.__dict__["__call__"]
        if getattr(call, "__wrapped_by_profile__", False):
          continue

        def scoped(self, *a, __call=call, __name=cls.__name__, **kw):
          with jax.named_scope(__name):
            return __call(self, *a, **kw)

        scoped.__wrapped_by_profile__ = True
        cls.__call__ = scoped
        wrapped.append((cls, call))
  try:
    yield
  finally:
    for cls, call in wrapped:
      cls.__call__ = call


def _scope(op_name: str) -> str:
  """ "jit(f)/transpose(jvp(TransformerBlock))/E2Attention/dot_general" -> "bwd TransformerBlock/E2Attention":
  the module path without the program name and the primitive, "bwd" for transposed (backward) code."""
  parts = op_name.split("/")[1:-1]
  backward = False
  for i, part in enumerate(parts):
    while m := _TRANSFORM.match(part):
      backward |= m.group(1) == "transpose"
      part = m.group(2)
    parts[i] = part
  return ("bwd " if backward else "") + "/".join(p for p in parts if p and p != "checkpoint")


def _modules(source: str) -> str:
  """The module classes of a ``source_of_instructions`` label, forward and backward together:
  "bwd E2Former/TransformerBlock/E2Attention/QueryKey/SO3Linear/...ri,rio->...ro | ..." -> "TransformerBlock/
  E2Attention/QueryKey/SO3Linear" (the root E2Former dropped; "(outside modules)" for the rest)."""
  scope = source.split(" | ")[0].removeprefix("bwd ")
  names = [p for p in scope.split("/") if p[:1].isupper() and p.isidentifier() and p != "E2Former"]
  return "/".join(names) or "(outside modules)"


def _tables(hlo_text: str) -> dict[str, dict[int, str]]:
  """The FileNames, FunctionNames, FileLocations and StackFrames tables of a compiled HLO module's text."""
  tables, current = collections.defaultdict(dict), None
  for line in hlo_text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = line
    elif not line.strip() or line.startswith(("%", "ENTRY", "HloModule")):
      current = None
    elif current and (m := _TABLE_ROW.match(line)):
      tables[current][int(m.group(1))] = m.group(2)
  return tables


def source_of_instructions(hlo_text: str) -> dict[str, str]:
  """{instruction name: "<module scope> | file:line function"} from a compiled HLO module's text: the module
  path of its ``op_name`` (``module_scopes``) and the innermost source location that XLA keeps (a fusion carries
  its root's). Lines outside the package are left out."""
  tables = _tables(hlo_text)
  files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
  functions = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
  locations, frames = {}, {}
  for k, v in tables["FileLocations"].items():
    f = dict(_FIELDS.findall(v))
    path = files.get(int(f.get("file_name_id", -1)), "?")
    for root in _PACKAGES:
      if root in path:
        function = functions.get(int(f.get("function_name_id", -1)), "?")
        locations[k] = f"{root}{path.split(root, 1)[1]}:{f.get('line')} {function}"
  for k, v in tables["StackFrames"].items():
    frames[k] = int(dict(_FIELDS.findall(v)).get("file_location_id", -1))
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    op_name = re.search(r'op_name="([^"]*)"', m.group(2))
    frame = re.search(r"stack_frame_id=(\d+)", m.group(2))
    location = locations.get(frames.get(int(frame.group(1)), -1), "") if frame else ""
    out[m.group(1)] = f"{_scope(op_name.group(1)) if op_name else ''} | {location}"
  return out


def device_events(trace_dir: str, module_prefix: str) -> list[tuple[float, float, str]]:
  """(start, duration, hlo_op) in microseconds of the device events of modules named ``module_prefix*`` in a
  perfetto trace, in order of start."""
  (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  with gzip.open(path) as fh:
    trace = json.load(fh)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  devices = {
    e["pid"]
    for e in events
    if e.get("ph") == "M" and e.get("name") == "process_name" and "/device:" in e.get("args", {}).get("name", "")
  }
  out = []
  for e in events:
    args = e.get("args") or {}
    if e.get("ph") != "X" or "hlo_op" not in args or not args.get("hlo_module", "").startswith(module_prefix):
      continue
    if devices and e["pid"] not in devices:
      continue
    out.append((float(e["ts"]), float(e["dur"]), args["hlo_op"]))
  return sorted(out)


def device_time_per_op(events: list[tuple[float, float, str]]) -> dict[str, float]:
  """{hlo_op: total device microseconds} of ``device_events``."""
  totals = collections.defaultdict(float)
  for _, dur, op in events:
    totals[op] += dur
  return dict(totals)


def idle_between_kernels(events: list[tuple[float, float, str]], calls: int, top: int) -> dict:
  """The device's idle time inside a call: ``events`` (all calls, in order of start) split into ``calls`` groups
  of equal size (each call runs the same instructions), each group's span from its first start to its last end
  minus the time some kernel was running. Returns the median span and idle time (ms) and the ``top`` largest
  idle intervals, as the mean over calls of (microseconds, instruction before, instruction after)."""
  per_call = len(events) // calls
  spans, idles, gaps = [], [], collections.defaultdict(float)
  for c in range(calls):
    group = events[c * per_call : (c + 1) * per_call]
    busy_until, idle = group[0][0], 0.0
    previous = group[0][2]
    for start, dur, op in group:
      if start > busy_until:
        idle += start - busy_until
        gaps[(previous, op)] += (start - busy_until) / calls
      if start + dur >= busy_until:
        busy_until, previous = start + dur, op
    spans.append((busy_until - group[0][0]) / 1e3)
    idles.append(idle / 1e3)
  largest = sorted(gaps.items(), key=lambda kv: -kv[1])[:top]
  return dict(
    span_ms=round(statistics.median(spans), 3),
    idle_ms=round(statistics.median(idles), 3),
    largest_gaps=[(round(us, 1), before, after) for (before, after), us in largest],
  )


def kind_of_work(instruction: str, source: str) -> str:
  """The kind of work of an instruction, from its name and its "scope | source line": the direction gate's, the
  radial profiles' or the attention's Pallas kernels, the attention's softmax in XLA, the EAAS products, the other
  matrix products, the slices and concatenations around the per-degree products, the norms, or other work."""
  if "gate_pallas.py" in source:
    return "direction gate kernels"
  if "radial_pallas.py" in source:
    return "radial profile kernels"
  if instruction.startswith("pallas_call"):
    return "attention forward kernel" if "_fused_forward" in source else "attention backward kernels"
  if "pallas_node_attention" in source:
    return "attention softmax and derivative (XLA)"
  if "eaas.py" in source:
    return "EAAS products"
  if "cublas" in instruction or instruction.startswith("custom-call") or " matmul" in source:
    return "other matrix products"
  if "side_by_side" in source or "node_inputs" in source:
    return "slices and concatenations of the per-degree products"
  if "norms.py" in source:
    return "norms"
  return "other"


def print_tables(row: dict, top: int) -> None:
  """The four tables of one profiled call (one JSON line)."""
  n, mode = row["atoms"], row["mode"]
  print(
    f"\n{row['device']}: N = {n}, {mode}: call {row['wall_ms']:.2f} ms, kernels {row['kernel_ms']:.2f} ms, "
    f"gaps {row['wall_ms'] - row['kernel_ms']:.2f} ms"
  )
  if "idle" in row:
    idle = row["idle"]
    print(
      f"device timeline: first kernel start to last kernel end {idle['span_ms']:.2f} ms, of which idle "
      f"{idle['idle_ms']:.2f} ms; largest idle intervals (us, between):"
    )
    for us, before, after in idle["largest_gaps"][:top]:
      print(f"{us:8.1f}  {before} -> {after}")
  print(f"{'ms':>8} {'share':>6}  modules (forward and backward)")
  for name, ms in row["modules"][:top]:
    print(f"{ms:8.3f} {ms / row['wall_ms']:6.1%}  {name}")
  print(f"{'ms':>8} {'share':>6}  scope | source line")
  for line, ms in row["lines"][:top]:
    print(f"{ms:8.3f} {ms / row['wall_ms']:6.1%}  {line}")
  print(f"{'ms':>8} {'share':>6}  instruction (source)")
  for op, ms, src in row["ops"][:top]:
    print(f"{ms:8.3f} {ms / row['wall_ms']:6.1%}  {op} ({src})")
  kinds = collections.defaultdict(float)
  for op, ms, src in row["ops"]:
    kinds[kind_of_work(op, src)] += ms
  print(f"{'ms':>8} {'share':>6}  kind of work (share of the kernel time)")
  for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
    print(f"{ms:8.3f} {ms / row['kernel_ms']:6.1%}  {kind}")


def profile(mode: str, n: int, args) -> dict:
  forces = "direct" if mode == "direct" else "conservative"
  cfg = benchmark_config(
    forces, impl=args.impl, gate=args.gate, precision=args.precision, remat=args.remat, edge_chunk=args.edge_chunk
  )
  model = E2Former(cfg, rngs=nnx.Rngs(0))
  graph, _ = graph_from_atoms([random_structure(n)], cfg.cutoff, cfg.max_neighbors)
  graph = jax.device_put(graph)
  fn, params = model_function(model, train=mode == "train")
  fn.__name__ = f"profiled_{mode}"
  with module_scopes():
    compiled = jax.jit(fn).lower(params, graph).compile()
  sources = source_of_instructions(compiled.as_text())
  for _ in range(2):
    jax.block_until_ready(compiled(params, graph))
  walls = []
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, graph))
        walls.append(time.perf_counter() - start)
    events = device_events(trace_dir, f"jit_profiled_{mode}")
  per_op = device_time_per_op(events)
  idle = idle_between_kernels(events, args.repeats, args.top)
  per_op = {op: us / args.repeats / 1e3 for op, us in per_op.items()}  # ms per call
  per_line, per_module = collections.defaultdict(float), collections.defaultdict(float)
  for op, ms in per_op.items():
    source = sources.get(op, " | ")
    per_line[source] += ms
    per_module[_modules(source)] += ms
  wall = statistics.median(walls) * 1e3
  kernels = sum(per_op.values())
  return stamp(
    dict(
      mode=mode,
      atoms=n,
      gate=args.gate,
      precision=args.precision,
      remat=args.remat,
      edge_chunk=args.edge_chunk,
      wall_ms=round(wall, 3),
      kernel_ms=round(kernels, 3),
      idle=idle,
      ops=sorted(((op, round(ms, 4), sources.get(op, "")) for op, ms in per_op.items()), key=lambda r: -r[1]),
      lines=sorted(((line, round(ms, 4)) for line, ms in per_line.items()), key=lambda r: -r[1]),
      modules=sorted(((m, round(ms, 4)) for m, ms in per_module.items()), key=lambda r: -r[1]),
    )
  )


def main():
  # CUDA graphs (XLA's command buffers) would show a whole call as one trace event; the script turns them off
  # before JAX starts its backend, so the trace sees every kernel.
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--atoms", type=int, nargs="+", default=[4096])
  p.add_argument("--modes", nargs="+", default=["direct", "conservative"], choices=["direct", "conservative", "train"])
  p.add_argument("--gate", default="QKdotS_alpha")
  p.add_argument("--precision", default="highest")
  p.add_argument("--impl", default="auto")
  p.add_argument("--remat", action="store_true")
  p.add_argument("--edge-chunk", type=int, default=0)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--top", type=int, default=25, help="rows of each printed table")
  p.add_argument("--json", help="append one JSON line per (size, mode), every op and line included")
  p.add_argument("--summarize", metavar="FILE", help="print the tables of a saved --json file and stop")
  args = p.parse_args()
  if args.summarize:
    with open(args.summarize) as fh:
      for line in fh:
        print_tables(json.loads(line), args.top)
    return
  for n in args.atoms:
    for mode in args.modes:
      row = profile(mode, n, args)
      print_tables(row, args.top)
      if args.json:
        with open(args.json, "a") as fh:
          fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
