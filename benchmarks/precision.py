"""Matmul precision modes: speed and force deviation from "highest" (true float32), on the same inputs.

Two models, each evaluated with ``matmul_precision`` = "highest", "tensorfloat32" and "bfloat16" (the dense
matrix products only; EAAS products, softmax and accumulations stay float32):

* ``demo``: the shipped demo checkpoint on the demo test split (molecules, one padded batch), conservative forces;
* ``paper``: the paper backbone with random weights (``paper_spice``, ``QKdot_alpha``) on the benchmark structure
  of ``benchmarks/model.py`` (``--atoms``), direct and conservative forces.

Reported per mode: median time of the jitted call (2 warm-ups, ``--repeats`` calls, ``block_until_ready``) and
the force deviation from "highest": max|dF| / max|F| and the mean |dF| (meV/A). Run it twice, once with
``XLA_FLAGS=--xla_gpu_deterministic_ops=true``, for the cost of the deterministic mode (the JSON line records the
flags).

  PYTHONPATH=$PWD python benchmarks/precision.py --atoms 4096 --json $OUT/precision.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np
from flax import nnx

from benchmarks.model import random_structure
from e2former_jax.checkpoint import DEMO_CHECKPOINT, load_model
from e2former_jax.config import get_config
from e2former_jax.data import load_demo
from e2former_jax.graph import graph_from_atoms
from e2former_jax.model import E2Former
from e2former_jax.predict import make_predict_fn

MODES = ("highest", "tensorfloat32", "bfloat16")


def _timed(fn, graph, repeats):
  for _ in range(2):
    out = jax.block_until_ready(fn(graph))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(graph))
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3, jax.device_get(out)


def cases(atoms: int):
  """(name, model builder taking a precision, structures)."""
  demo = load_demo("test")

  def demo_model(precision):
    return load_model(DEMO_CHECKPOINT, matmul_precision=precision, attention_impl="auto")

  def paper(forces):
    def build(precision):
      cfg = get_config("paper_spice", gate="QKdot_alpha", forces=forces, matmul_precision=precision)
      return E2Former(cfg, rngs=nnx.Rngs(0))

    return build

  structure = random_structure(atoms)
  return [
    ("demo", demo_model, demo),
    ("paper_direct", paper("direct"), [structure]),
    ("paper_conservative", paper("conservative"), [structure]),
  ]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--atoms", type=int, default=4096)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--json")
  args = p.parse_args()
  kind = jax.devices()[0].device_kind
  flags = os.environ.get("XLA_FLAGS", "")
  print(f"{kind}; XLA_FLAGS={flags!r}")
  print(f"{'case':>19} {'precision':>14} {'ms':>9} {'max|dF|/max|F|':>15} {'mean|dF| meV/A':>15}")
  for name, build, structures in cases(args.atoms):
    reference = None
    for precision in MODES:
      model = build(precision)
      cfg = model.config
      graph, _ = graph_from_atoms(structures, cfg.cutoff, cfg.max_neighbors, dtype=cfg.numpy_dtype)
      real = np.asarray(graph.atom_mask)
      ms, out = _timed(make_predict_fn(model), jax.device_put(graph), args.repeats)
      forces = np.asarray(out["forces"])[real]
      if reference is None:
        reference = forces
      rel = float(np.abs(forces - reference).max() / np.abs(reference).max())
      mean = float(np.abs(forces - reference).mean() * 1e3)
      print(f"{name:>19} {precision:>14} {ms:9.2f} {rel:15.2e} {mean:15.3f}", flush=True)
      if args.json:
        row = dict(
          case=name,
          precision=precision,
          ms=ms,
          force_rel_dev=rel,
          force_mean_abs_dev_meV_A=mean,
          atoms=int(real.sum()),
          device=kind,
          xla_flags=flags,
          date=time.strftime("%Y-%m-%d"),
        )
        with open(args.json, "a") as fh:
          fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
