"""Memory of a model call from XLA's buffer assignment, with and without ``remat`` (issue 14).

For each size and mode the jitted call is compiled (not run) on the benchmark structure of
``benchmarks/model.py`` and ``compiled.memory_analysis()`` gives the bytes XLA assigned: temporaries (the
activations kept for the backward pass live here), arguments and outputs. The per-atom slope between two sizes is
what memory per atom means for large systems (the constant part, parameters and tables, drops out). With ``--run``
the script also runs each call (1 warm-up, median of 3) and reads the device's peak (``memory_stats``; sizes in
increasing order, so each row's peak is its own); a call the device cannot hold is recorded as such and the next
configuration goes on. The time with remat on against off is its cost.

``--graph device`` builds the neighbour slots on the device (``potential.device_graph``) instead of the host
(vesin): needed above a few hundred thousand atoms, where the host list takes minutes; the device's peak then
also covers the search, which needs less than the model.

Modes: ``direct`` (E + direct F, forward only), ``conservative`` (E + F = -dE/dx), ``train`` (gradient of
E + mean F^2 with respect to the parameters, conservative F: the authors' training protocol).

  PYTHONPATH=$PWD python benchmarks/memory.py --atoms 512 1024 --modes conservative --remat off on --edge-chunk 0 256
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import jax
import numpy as np
from flax import nnx

from benchmarks.model import model_function, random_structure
from benchmarks.report import emit
from e2former_jax.config import get_config
from e2former_jax.graph import graph_from_atoms
from e2former_jax.model import E2Former
from e2former_jax.neighbors.device import fit_neighbor_slots
from e2former_jax.potential import device_graph, padded_structure


def benchmark_graph(cfg, n: int, where: str):
  """The benchmark structure of ``n`` atoms as an ``AtomGraph``: built by ``graph_from_atoms`` on the host
  ("host"), or on the device ("device": ``potential.device_graph`` with the capacity ``fit_neighbor_slots``
  finds; minutes faster at a million atoms). Both give the same K nearest slots; the device graph is in Morton
  order with its padding atom last."""
  structure = random_structure(n)
  if where == "host":
    return graph_from_atoms([structure], cfg.cutoff, cfg.max_neighbors)[0]
  positions, numbers, mask, cell = padded_structure(structure.positions, structure.numbers, None, n + 1, np.float32)
  _, capacity = fit_neighbor_slots(positions, cell, mask, cutoff=cfg.cutoff, max_neighbors=cfg.max_neighbors)
  build = jax.jit(device_graph, static_argnames=("cfg", "pbc", "capacity"))
  graph, _, _ = build(
    positions, numbers, mask, cell, np.int32(0), np.int32(1), cfg=cfg, pbc=(False, False, False), capacity=capacity
  )
  return graph


def compiled_call(mode: str, cfg, n: int, where: str = "host"):
  model = E2Former(cfg, rngs=nnx.Rngs(0))
  graph = benchmark_graph(cfg, n, where)
  fn, params = model_function(model, train=mode == "train")
  return jax.jit(fn).lower(params, graph).compile(), (params, graph)


def run_once(compiled, call_args) -> dict:
  """Median time (ms) of 3 calls after one warm-up and the device's peak memory (GiB), or the error."""
  try:
    jax.block_until_ready(compiled(*call_args))
    times = []
    for _ in range(3):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*call_args))
      times.append(time.perf_counter() - start)
  except jax.errors.JaxRuntimeError as error:
    return {"run_error": str(error).splitlines()[0][:200]}
  peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", float("nan")) / 2**30
  return {"ms": round(statistics.median(times) * 1e3, 2), "peak_gib": round(peak, 3)}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--atoms", type=int, nargs="+", default=[512, 1024])
  p.add_argument("--modes", nargs="+", default=["direct", "conservative", "train"])
  p.add_argument("--remat", nargs="+", default=["off", "on"])
  p.add_argument("--edge-chunk", type=int, nargs="+", default=[0], help="ModelConfig.edge_chunk values")
  p.add_argument("--node-chunk", type=int, nargs="+", default=[0], help="ModelConfig.node_chunk values")
  p.add_argument("--preset", default="paper_spice")
  p.add_argument("--gate", default="QKdot_alpha")
  p.add_argument("--impl", default="auto")
  p.add_argument("--run", action="store_true", help="also run once and read the device's peak memory")
  p.add_argument("--graph", choices=["host", "device"], default="host", help="where the neighbour slots are built")
  p.add_argument("--json")
  args = p.parse_args()
  kind = jax.devices()[0].device_kind
  rows = []
  for mode, remat, edge_chunk, node_chunk in itertools.product(
    args.modes, args.remat, args.edge_chunk, args.node_chunk
  ):
    cfg = get_config(
      args.preset,
      gate=args.gate,
      attention_impl=args.impl,
      forces="direct" if mode == "direct" else "conservative",
      remat=remat == "on",
      edge_chunk=edge_chunk,
      node_chunk=node_chunk,
    )
    sizes = {}
    for n in args.atoms:
      start = time.perf_counter()
      compiled, call_args = compiled_call(mode, cfg, n, args.graph)
      m = compiled.memory_analysis()
      row = dict(
        mode=mode,
        remat=remat,
        edge_chunk=edge_chunk,
        node_chunk=node_chunk,
        graph=args.graph,
        atoms=n,
        temp_mib=m.temp_size_in_bytes / 2**20,
        args_mib=m.argument_size_in_bytes / 2**20,
        out_mib=m.output_size_in_bytes / 2**20,
        compile_s=round(time.perf_counter() - start, 1),
        device=kind,
        preset=args.preset,
        gate=args.gate,
        date=time.strftime("%Y-%m-%d"),
      )
      if args.run:
        row.update(run_once(compiled, call_args))
      sizes[n] = row["temp_mib"] + row["args_mib"] + row["out_mib"]
      rows.append(row)
      emit(row, args.json)
    if len(sizes) > 1:
      (n0, b0), (n1, b1) = sorted(sizes.items())[0], sorted(sizes.items())[-1]
      print(
        f"{mode} remat={remat} edge_chunk={edge_chunk} node_chunk={node_chunk}: "
        f"{(b1 - b0) / (n1 - n0):.3f} MiB per atom ({n0} -> {n1} atoms)",
        flush=True,
      )


if __name__ == "__main__":
  main()
