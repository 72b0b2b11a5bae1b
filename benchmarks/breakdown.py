"""Where the time of one model call goes: the parts of E2Former-V2 timed alone, with XLA's FLOP and byte counts.

Parts (each jitted alone on the benchmark structure of ``benchmarks/model.py``, the paper backbone):

* ``geometry``: edge vectors, distances and envelope of the [N, K] slots (once per call; the Gaussian basis is
  formed inside each radial profile, ``pallas_kernels.radial_profile``).
* ``edge_degree``: the edge-degree embedding (per-edge radial MLPs per degree, spherical harmonics).
* ``gates``: every block's per-edge gate and rho ([N, K, hidden] MLPs, degree contractions), all blocks.
* ``attention_op``: every block's node-centric attention aggregate (``pallas_kernels.node_attention``).
* ``messages``: every block's first-order message from an aggregate of that shape (``attention.node_centric_message``:
  the two EAAS products with the target positions).
* ``model``: the whole call (energy, and forces direct or conservative); ``rest`` = model minus the parts:
  node-level work (queries, keys, values, path linears, FFN, norms), the EAAS products of the value rows and the
  heads.

``--mode direct`` times forward passes; ``--mode conservative`` times each part's forward + VJP (what the force
needs of it) and the model's E + conservative F. FLOPs are XLA's ``cost_analysis`` of each part's program as
lowered (the optimised GPU program no longer counts the matrix products it hands to cuBLAS; Pallas kernels are
not counted either), bytes that of the compiled program (after fusion); the floors are FLOPs / ``--peak-tflops``
and bytes / ``--peak-tbs`` (docs/performance.md). Medians of ``--repeats`` after 2 warm-ups, each ended by
``block_until_ready``.

  PYTHONPATH=$PWD python benchmarks/breakdown.py --atoms 4096 16384 --mode direct conservative --json $OUT/b.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.model import benchmark_config, random_structure
from benchmarks.report import median_ms
from e2former_jax.attention import node_centric_message
from e2former_jax.eaas import eaas_table
from e2former_jax.geometry import edge_geometry
from e2former_jax.graph import graph_from_atoms
from e2former_jax.model import E2Former
from e2former_jax.predict import predict
from pallas_kernels import node_attention


def _cost(stage) -> dict:
  """XLA's cost analysis of a lowered or compiled program, as floats."""
  cost = stage.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, list) else cost
  return {k: float(v) for k, v in cost.items()}


def _with_vjp(f):
  """f's forward and the VJP with a cotangent of ones (what reverse mode needs of it)."""

  def g(*args):
    out, pull = jax.vjp(f, *args)
    return pull(jax.tree.map(jnp.ones_like, out))

  return g


def parts(model: E2Former, graph):
  """{name: (function, arguments)} of the model's parts on ``graph``."""
  cfg = model.config
  geometry = edge_geometry(graph, cfg)
  n, k = graph.neighbors.shape
  rows = (cfg.lmax + 1) ** 2
  key = jax.random.key(0)
  y = jax.random.normal(key, (n, rows, cfg.channels), graph.positions.dtype)
  blocks = list(model.blocks)

  def geometry_part(positions):
    g = edge_geometry(graph.replace(positions=positions), cfg)
    return g.distance, g.envelope, g.vectors

  def edge_degree_part(positions):
    return model.edge_degree(graph, edge_geometry(graph.replace(positions=positions), cfg))

  def gates_part(positions, y):
    geo = edge_geometry(graph.replace(positions=positions), cfg)
    out = []
    for block in blocks:
      att = block.attention
      out.append(att.gate_and_rho(y, graph.numbers, graph.neighbors, geo))
    return out

  h, d = cfg.num_heads, cfg.head_dim
  num_rows = eaas_table(cfg.lmax).num_output_rows + rows  # [v (x) p; v]
  ks = jax.random.split(key, 5)
  q = jax.random.normal(ks[0], (n, h, d))
  kk = jax.random.normal(ks[1], (n, h, d))
  gate = jax.random.normal(ks[2], (n, k, h))
  scale = jax.random.normal(ks[3], (n, k, h))
  values = jax.random.normal(ks[4], (n, num_rows, cfg.channels))

  def attention_part(q, kk, gate, scale, values):
    return [
      node_attention(
        q,
        kk,
        gate,
        scale,
        geometry.envelope,
        geometry.valid,
        graph.neighbors,
        values,
        implementation=cfg.attention_impl,
        softmax_max=cfg.softmax_max,
      )
      for _ in blocks
    ]

  def messages_part(positions, aggregate):
    return [node_centric_message(aggregate, positions, cfg.lmax) for _ in blocks]

  def model_part(positions):
    out = predict(model, graph.replace(positions=positions))
    return out["energy"], out["forces"]

  x = graph.positions
  return {
    "geometry": (geometry_part, (x,)),
    "edge_degree": (edge_degree_part, (x,)),
    "gates": (gates_part, (x, y)),
    "attention_op": (attention_part, (q, kk, gate, scale, values)),
    "messages": (messages_part, (x, values)),
    "model": (model_part, (x,)),
  }


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--atoms", type=int, nargs="+", default=[4096, 16384])
  p.add_argument("--mode", nargs="+", default=["direct", "conservative"])
  p.add_argument("--gate", default="QKdotS_alpha")
  p.add_argument("--precision", default="highest")
  p.add_argument("--impl", default="auto")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--peak-tflops", type=float, default=67.0, help="float32 peak (H100 and H200)")
  p.add_argument("--peak-tbs", type=float, default=3.35, help="HBM bandwidth in TB/s (H100 3.35, H200 4.8)")
  p.add_argument("--json")
  args = p.parse_args()
  kind = jax.devices()[0].device_kind
  for n in args.atoms:
    structure = random_structure(n)
    for mode in args.mode:
      forces = "direct" if mode == "direct" else "conservative"
      cfg = benchmark_config(forces, impl=args.impl, gate=args.gate, precision=args.precision)
      model = E2Former(cfg, rngs=nnx.Rngs(0))
      graph, _ = graph_from_atoms([structure], cfg.cutoff, cfg.max_neighbors)
      graph = jax.device_put(graph)
      rows, total = [], {}
      for name, (fn, fargs) in parts(model, graph).items():
        f = fn if (mode == "direct" or name == "model") else _with_vjp(fn)
        lowered = jax.jit(f).lower(*fargs)
        compiled = lowered.compile()
        flops = _cost(lowered).get("flops", 0.0)  # before GPU rewrites hand the products to cuBLAS (uncounted)
        nbytes = _cost(compiled).get("bytes accessed", 0.0)  # after fusion
        ms = median_ms(compiled, fargs, args.repeats)
        total[name] = ms
        floor = max(flops / (args.peak_tflops * 1e12), nbytes / (args.peak_tbs * 1e12)) * 1e3
        rows.append(
          dict(
            part=name,
            ms=round(ms, 3),
            gflop=round(flops / 1e9, 2),
            gbyte=round(nbytes / 1e9, 3),
            floor_ms=round(floor, 3),
            tflops=round(flops / ms / 1e9, 1),
          )
        )
      rest = total["model"] - sum(v for k, v in total.items() if k != "model")
      rows.append(dict(part="rest", ms=round(rest, 3)))
      print(f"\n{kind}: N = {n}, {mode} ({args.gate}, {args.precision}, impl {args.impl})")
      print(f"{'part':>13} {'ms':>9} {'GFLOP':>9} {'GB':>8} {'floor ms':>9} {'TFLOP/s':>8}")
      for r in rows:
        print(
          f"{r['part']:>13} {r['ms']:9.2f} {r.get('gflop', ''):>9} {r.get('gbyte', ''):>8} "
          f"{r.get('floor_ms', ''):>9} {r.get('tflops', ''):>8}"
        )
        if args.json:
          with open(args.json, "a") as fh:
            rec = dict(
              r,
              atoms=n,
              mode=mode,
              gate=args.gate,
              precision=args.precision,
              device=kind,
              date=time.strftime("%Y-%m-%d"),
            )
            fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
  main()
