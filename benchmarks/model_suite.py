"""Runs several ``benchmarks/model.py`` rows in one go and prints their table.

Each row is its own process (its own peak-memory counter). Up to ``--parallel`` processes compile at once
(compilation of the paper model takes minutes and is CPU-bound); a lock file lets only one of them use the
GPU at a time, so timings and peak memory are those of a process alone on the card. A row is
``MODE:IMPL:ATOMS`` with an optional ``:det`` suffix for XLA's deterministic mode
(``XLA_FLAGS=--xla_gpu_deterministic_ops=true``):

  python benchmarks/model_suite.py --out $OUT/model.jsonl --parallel 7 \\
      step_conservative:pallas:4096 step_conservative:jnp_node:4096 step_conservative:pallas:4096:det
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SCRIPT = Path(__file__).with_name("model.py")


def run_row(row: str, out: Path, lock: Path, timeout: float, extra: list[str]) -> tuple[str, int, str]:
  mode, impl, atoms, *flags = row.split(":")
  env = dict(os.environ)
  if "det" in flags:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()
  cmd = [
    sys.executable,
    str(SCRIPT),
    "--mode",
    mode,
    "--impl",
    impl,
    "--atoms",
    atoms,
    "--lock",
    str(lock),
    "--json",
    str(out),
    *extra,
  ]
  if mode == "infer" and "check" in flags:
    cmd.append("--check")
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return row, -1, f"timed out after {timeout:.0f} s"
  return row, proc.returncode, proc.stderr[-2000:] if proc.returncode else ""


def table(lines: list[dict]) -> str:
  """The rows as a markdown table (the layout of ``benchmarks/RESULTS.md``)."""
  rows = ["| N | mode | attention_impl | ms | steps/s | atoms/s | peak GiB | compile s |", "|" + "---|" * 8]
  for r in sorted(lines, key=lambda r: (r["atoms"], r["deterministic"], r["mode"], r["impl"])):
    mode = r["mode"] + (", XLA deterministic" if r["deterministic"] else "")
    rows.append(
      f"| {r['atoms']:,} | {mode} | {r['impl']} | {r['ms']:.1f} | {r['steps_per_s']:.2f} | "
      f"{r['atoms_per_s']:,.0f} | {r['peak_gib']:.2f} | {r['compile_s']:.0f} |"
    )
  return "\n".join(rows)


def agreement(lines: list[dict]) -> list[str]:
  """First-call loss (step rows) and gradient norm (step and train rows), pallas vs jnp_node (same inputs and
  weights)."""

  def compared(r, other, key):
    return f"{key} {r[key]:.6g} vs {other[key]:.6g} (rel {abs(r[key] - other[key]) / abs(other[key]):.1e})"

  notes = []
  rows = {(r["mode"], r["atoms"], r["impl"], r["deterministic"]): r for r in lines if "grad_norm0" in r}
  for (mode, atoms, impl, det), r in sorted(rows.items()):
    other = rows.get((mode, atoms, "jnp_node", det))
    if impl == "pallas" and other is not None:
      keys = ["loss0", "grad_norm0"] if "loss0" in r else ["grad_norm0"]
      notes.append(f"{mode} N={atoms}: " + ", ".join(compared(r, other, key) for key in keys))
  for r in lines:
    if "force_rel_diff" in r:
      notes.append(
        f"infer N={r['atoms']}: {r['impl']} vs {r['check_vs']}: energy rel {r['energy_rel_diff']:.1e}, "
        f"forces max|dF|/max|F| {r['force_rel_diff']:.1e}"
      )
  return notes


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("rows", nargs="+", help="MODE:IMPL:ATOMS[:det][:check]")
  parser.add_argument("--out", required=True, help="JSON lines file (appended)")
  parser.add_argument("--parallel", type=int, default=4)
  parser.add_argument("--timeout", type=float, default=560.0, help="seconds per row")
  parser.add_argument("--preset", default="paper_spice")
  args = parser.parse_args()
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  lock = Path(tempfile.mkdtemp()) / "gpu.lock"
  env_note = os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  start = time.perf_counter()
  with ThreadPoolExecutor(args.parallel) as pool:
    futures = [pool.submit(run_row, row, out, lock, args.timeout, ["--preset", args.preset]) for row in args.rows]
    for f in futures:
      row, code, err = f.result()
      print(f"[{time.perf_counter() - start:6.0f} s] {row}: {'ok' if code == 0 else f'FAILED ({code})'}", flush=True)
      if code:
        print(err, flush=True)
  lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
  print(f"\ndevice: {lines[0]['device'] if lines else '?'}; XLA_PYTHON_CLIENT_PREALLOCATE={env_note}")
  print(table(lines))
  for note in agreement(lines):
    print(note)


if __name__ == "__main__":
  main()
