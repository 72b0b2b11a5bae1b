"""Attention core alone at the paper's sizes: the fused Pallas kernel against XLA baselines.

Implementations (float32, the same inputs for all):
  pallas    ``pallas_kernels.pallas.pallas_node_attention`` (fused forward; backward gather and edge-weight kernels)
  jnp_node  ``jnp_node_attention`` under XLA (what ``attention_impl="jnp_node"`` runs)
  jnp_edge  per-edge stand-in: the softmax of ``jnp_node_attention``, then sum_j beta_ij (v_j (x) r_ij) with the
            product of every edge by a dense [9, 3, 20] coupling einsum, the contraction
            ``e2former_jax.eaas.dense_vector_product`` uses. The coupling is a fixed random tensor (the model
            package needs e3x, which the GPU image lacks; values do not change the cost). The node paths'
            O(N) EAAS products before and after the aggregation are not timed.

Cases: forward, and forward + backward (value and gradient of sum(out * cotangent) with respect to every float
input). Reported per case: median time, compiled memory (XLA's temp + argument + output buffers), FLOP/s with the
one shared count (docs/performance.md §3: 17,922 FLOP per edge slot forward; forward + backward counted as 3x
forward, a convention), and the share of the HBM floor: fewest bytes (each input read once, each output
written once; the byte model below) over the device-to-device copy bandwidth measured in the same run.

Neighbours (``--neighbors``): "window" (default, every entry before 2026-12-07), K = 32 sources drawn within
+-256 of the target's index, 28-32 of them valid; "spatial", the K nearest atoms of a uniform box at 0.1 atoms
per A^3 numbered in Morton order, valid within 5 A: the pattern of the model's own calls (``DevicePotential``
sorts atoms so), in which a tile's gathered rows are mostly shared with its neighbours'. The "spatial" inputs
import the package (``e2former_jax.potential.morton_order``) and scipy.

Usage: PYTHONPATH=$PWD python benchmarks/attention.py --sizes 4096 32768 --check --sweep --breakdown --out r.json
(``--sweep-backward``: each backward kernel over a few tilings, block_n/block_h/num_warps/num_stages, at the
smallest size)
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import pallas as kernels  # noqa: E402 - the op and the backward's building blocks
from pallas_kernels.jnp_node import attention_logits, attention_weights, jnp_node_attention, per_channel  # noqa: E402
from pallas_kernels.softmax_pallas import edge_weights_vjp, pallas_edge_weights  # noqa: E402
from pallas_kernels.triton_launch import Launch  # noqa: E402

H, D, C, K, V_ROWS, PRODUCT_ROWS = 128, 8, 256, 32, 9, 20
R = PRODUCT_ROWS + V_ROWS
FLOP_PER_EDGE = 2048 + 256 + 770 + 14848  # docs/performance.md §3 attention core
HP = jax.lax.Precision.HIGHEST
NOMINAL_BANDWIDTH = 2.9e12  # bytes/s, the H100 copy figure docs/performance.md §2's floor shares use


def forward_bytes_per_atom() -> int:
  """Fewest fp32 bytes of the forward: q, k, rows, gate, edge_scale, envelope, neighbour index, valid read
  once; agg written once."""
  return 4 * (2 * H * D + R * C + 2 * K * H + 2 * K) + K + 4 * R * C


def forward_backward_bytes_per_atom() -> int:
  """Forward, then the backward reading the inputs again and the output cotangent, writing every float
  input's gradient."""
  inputs = 4 * (2 * H * D + R * C + 2 * K * H + 2 * K) + K
  gradients = 4 * (2 * H * D + R * C + 2 * K * H + K)
  return forward_bytes_per_atom() + inputs + 4 * R * C + gradients


NEIGHBORS = ("window", "spatial")
DENSITY = 0.1  # atoms per A^3, the benchmark structures' (benchmarks/model.py)
CUTOFF = 5.0  # A, the paper's


def spatial_neighbors(n: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Atoms uniform in a cube at ``DENSITY``, numbered in Morton order as ``DevicePotential`` numbers them, and their
  K nearest neighbours: (positions [n, 3], neighbors [n, K], valid [n, K], valid = within ``CUTOFF``)."""
  from scipy.spatial import cKDTree

  from e2former_jax.potential import morton_order

  positions = rng.uniform(0.0, (n / DENSITY) ** (1 / 3), size=(n, 3)).astype(np.float32)
  positions = positions[np.asarray(morton_order(jnp.asarray(positions), jnp.ones(n, bool)))]
  distances, neighbors = cKDTree(positions).query(positions, K + 1)
  return positions, neighbors[:, 1:], distances[:, 1:] < CUTOFF


def make_inputs(n: int, seed: int, neighbors: str = "window"):
  """Random float32 inputs; rows = [v (x) p (20 rows); v (9 rows)]. Neighbours "window": K sources drawn within
  +-256 of the target's index, 28-32 of them valid (the protocol of every entry before 2026-12-07); "spatial": the
  K nearest atoms of a uniform box numbered in Morton order (``spatial_neighbors``), the model's own pattern."""
  rng = np.random.default_rng(seed)
  f32 = lambda *shape, scale=1.0: jnp.asarray(scale * rng.normal(size=shape), jnp.float32)
  if neighbors == "spatial":
    positions, slots, valid = spatial_neighbors(n, rng)
    positions = jnp.asarray(positions)
  else:
    slots = np.clip(np.arange(n)[:, None] + rng.integers(-256, 257, size=(n, K)), 0, n - 1)
    valid = np.arange(K)[None] < rng.integers(K - 4, K + 1, size=n)[:, None]
    positions = f32(n, 3, scale=10.0)
  coupling = f32(V_ROWS, 3, PRODUCT_ROWS, scale=0.3)
  v = f32(n, V_ROWS, C)
  inputs = dict(
    q=f32(n, H, D),
    k=f32(n, H, D),
    gate=f32(n, K, H, scale=0.5),
    edge_scale=f32(n, K, H),
    envelope=jnp.asarray(rng.uniform(0.05, 1.0, size=(n, K)), jnp.float32),
    valid=jnp.asarray(valid),
    neighbors=jnp.asarray(slots, jnp.int32),
    v=v,
    positions=positions,
  )
  inputs["rows"] = jnp.concatenate([product(v, positions, coupling), v], axis=1)
  return inputs, coupling


def product(v, vectors, coupling):
  """v (x) vector by a dense coupling einsum: [..., 9, C] x [..., 3] -> [..., 20, C]."""
  return jnp.einsum("rao,...rc,...a->...oc", coupling, v, vectors, precision=HP)


NODE_ARGS = ("q", "k", "gate", "edge_scale", "envelope", "valid", "neighbors", "rows")
EDGE_ARGS = ("q", "k", "gate", "edge_scale", "envelope", "valid", "neighbors", "v", "positions")


def edge_message(q, k, gate, edge_scale, envelope, valid, neighbors, v, positions, *, coupling):
  """jnp_edge stand-in: sum_j beta_ij (v_j (x) r_ij), every per-edge product materialised."""
  alpha = attention_weights(attention_logits(q, k, gate, neighbors), envelope, valid)
  beta = per_channel(alpha * edge_scale, C)
  vectors = positions[:, None, :] - positions[neighbors]  # r_ij = p_i - p_j
  return jnp.einsum("nkc,nkoc->noc", beta, product(v[neighbors], vectors, coupling), precision=HP)


def node_message(agg, positions, coupling):
  """The node-centric split: (sum beta v) (x) p_i - sum beta (v (x) p_j)."""
  return product(agg[:, PRODUCT_ROWS:], positions, coupling) - agg[:, :PRODUCT_ROWS]


def implementations(coupling, tiling=None):
  """name -> (function, names of its arguments in ``make_inputs``)."""
  tiling = tiling or {}
  return {
    "pallas": (lambda *a: kernels.pallas_node_attention(*a, **tiling), NODE_ARGS),
    "jnp_node": (jnp_node_attention, NODE_ARGS),
    "jnp_edge": (functools.partial(edge_message, coupling=coupling), EDGE_ARGS),
  }


def forward_backward(fn, names):
  """Value and gradient of sum(out * cotangent) with respect to every float input."""
  diff = [i for i, name in enumerate(names) if name not in ("valid", "neighbors")]

  def run(cotangent, *args):
    def loss(*d):
      full = list(args)
      for i, x in zip(diff, d):
        full[i] = x
      return jnp.sum(fn(*full) * cotangent)

    return jax.value_and_grad(loss, argnums=tuple(range(len(diff))))(*[args[i] for i in diff])

  return run


def timed(fn, args, max_reps=30, budget_s=2.0):
  """Median seconds of fn(*args) over repetitions after two warm-up calls."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  start = time.perf_counter()
  while len(times) < max_reps and (len(times) < 5 or time.perf_counter() - start < budget_s):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), len(times)


def compile_with_bytes(jitted, args):
  """(compiled function, XLA's temp + argument + output bytes or None)."""
  compiled = jitted.lower(*args).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    return compiled, None
  return compiled, int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes)


def copy_bandwidth() -> float:
  """Bytes read plus written per second by a 4 GiB device-to-device elementwise pass."""
  x = jnp.ones((1 << 30,), jnp.float32)
  seconds, _ = timed(jax.jit(lambda a: a * 1.0001), (x,), max_reps=20)
  return 2 * x.nbytes / seconds


def rel_error(got, want) -> float:
  """max over arrays of max|got - want| / max|want| (host numpy)."""
  got, want = jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(jax.device_get(want))
  return max(float(np.max(np.abs(g - w)) / np.max(np.abs(w))) for g, w in zip(got, want))


def benchmark_size(n: int, bandwidth: float, impl_names, seed: int, neighbors: str):
  inputs, coupling = make_inputs(n, seed, neighbors)
  impls = implementations(coupling)
  cotangent = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(n, R, C)), jnp.float32)
  edge_cotangent = cotangent[:, :PRODUCT_ROWS]
  results, outputs = [], {}
  for name in impl_names:
    fn, names = impls[name]
    args = [inputs[a] for a in names]
    ct = edge_cotangent if name == "jnp_edge" else cotangent
    for case, jitted, call_args in (
      ("forward", jax.jit(fn), args),
      ("forward+backward", jax.jit(forward_backward(fn, names)), [ct, *args]),
    ):
      row = dict(n=n, impl=name, case=case)
      try:
        compiled, row["bytes_compiled"] = compile_with_bytes(jitted, call_args)
        row["seconds"], row["reps"] = timed(compiled, call_args)
        outputs[(name, case)] = jax.device_get(compiled(*call_args))
        del compiled
      except Exception as err:  # noqa: BLE001 - out of memory is a result here
        row["error"] = str(err).splitlines()[0][:160]
      if "seconds" in row:
        flop = FLOP_PER_EDGE * n * K * (1 if case == "forward" else 3)
        floor_bytes = n * (forward_bytes_per_atom() if case == "forward" else forward_backward_bytes_per_atom())
        row["tflop_s"] = flop / row["seconds"] / 1e12
        row["floor_share"] = floor_bytes / bandwidth / row["seconds"]
        row["floor_share_2.9"] = floor_bytes / NOMINAL_BANDWIDTH / row["seconds"]
      results.append(row)
      print(json.dumps(row), flush=True)
      gc.collect()
  checks = {}
  for case in ("forward", "forward+backward"):
    if ("pallas", case) in outputs and ("jnp_node", case) in outputs:
      checks[f"pallas_vs_jnp_node_{case}"] = rel_error(outputs[("pallas", case)], outputs[("jnp_node", case)])
  if ("pallas", "forward") in outputs and ("jnp_edge", "forward") in outputs:
    node = node_message(jnp.asarray(outputs[("pallas", "forward")]), inputs["positions"], coupling)
    # Both sides are float32 sums of terms of |p| ~ 10-40 A whose difference is ~|r_ij|: cancellation.
    checks["pallas_node_split_vs_jnp_edge_forward"] = rel_error(node, outputs[("jnp_edge", "forward")])
  print(json.dumps(dict(n=n, checks=checks)), flush=True)
  return results, checks


def check_derivatives(n: int, seed: int):
  """Forward, VJP and VJP of VJP of the kernel against the twin at the paper's sizes (all four kernels)."""
  rng = np.random.default_rng(seed)
  inputs, _ = make_inputs(n, seed)
  errors = {}
  for softmax_max, num_shift_rows in (("valid", 0), ("all_slots", V_ROWS)):
    valid = jnp.asarray(rng.uniform(size=(n, K)) > 0.3)  # ragged, with empty atoms below
    valid = valid.at[:7].set(False)
    shifts = jnp.asarray(rng.normal(size=(n, K, 3)), jnp.float32) if num_shift_rows else None
    diff = [inputs[a] for a in ("q", "k", "gate", "edge_scale", "envelope", "rows")] + [shifts]

    def derivatives(impl):
      fn = lambda q, k, g, e, env, rows, sh: impl(
        q, k, g, e, env, valid, inputs["neighbors"], rows, sh, num_shift_rows=num_shift_rows, softmax_max=softmax_max
      )
      out, pullback = jax.vjp(fn, *diff)
      draw = lambda tree, s: jax.tree.map(
        lambda x: jnp.asarray(np.random.default_rng(s).normal(size=x.shape), x.dtype), tree
      )
      ct = draw(out, 1)
      first = lambda *x: jax.vjp(fn, *x)[1](ct)
      grads, pullback2 = jax.vjp(first, *diff)
      return out, grads, pullback2(draw(grads, 2))

    got = jax.jit(lambda: derivatives(kernels.pallas_node_attention))()
    want = jax.jit(lambda: derivatives(jnp_node_attention))()
    for order, g, w in zip(("forward", "vjp", "vjp_of_vjp"), got, want):
      errors[f"{softmax_max}_shifts{num_shift_rows}_{order}"] = rel_error(g, w)
  print(json.dumps(dict(n=n, derivative_checks=errors)), flush=True)
  return errors


def sweep(n: int, seed: int, bandwidth: float, neighbors: str):
  """Forward time of the kernel over a few tilings (block_n, block_h, num_warps, num_stages)."""
  inputs, coupling = make_inputs(n, seed, neighbors)
  args = [inputs[a] for a in NODE_ARGS]
  rows = []
  for block_n, block_h, warps, stages in (
    (1, 64, 4, 1),
    (2, 64, 4, 1),
    (4, 64, 4, 1),
    (1, 128, 4, 1),
    (2, 128, 4, 1),
    (2, 32, 4, 1),
    (4, 32, 4, 1),
    (2, 64, 8, 1),
    (2, 128, 8, 1),
    (4, 64, 8, 1),
    (2, 64, 4, 2),
    (1, 128, 8, 1),
  ):
    tiling = dict(block_n=block_n, block_h=block_h, num_warps=warps, num_stages=stages)
    fn = jax.jit(implementations(coupling, tiling)["pallas"][0])
    row = dict(n=n, **tiling)
    try:
      row["seconds"], _ = timed(fn, args, max_reps=20, budget_s=1.0)
      row["floor_share"] = n * forward_bytes_per_atom() / bandwidth / row["seconds"]
    except Exception as err:  # noqa: BLE001
      row["error"] = str(err).splitlines()[0][:160]
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def backward_pieces(n: int, seed: int, neighbors: str):
  """The by-source list and the seven kernel calls of a first-order backward at the paper's sizes, on random
  weights: name -> (function of a ``Launch``, its arguments, flat row width F of its gathered rows; None for the
  pieces that gather nothing)."""
  inputs, _ = make_inputs(n, seed, neighbors)
  rng = np.random.default_rng(seed + 2)
  build = jax.jit(kernels._graph, static_argnums=2)
  graph = build(inputs["neighbors"], inputs["valid"], n)
  q_t, k_t = jnp.swapaxes(inputs["q"], 1, 2), jnp.swapaxes(inputs["k"], 1, 2)
  flat_rows = inputs["rows"].reshape(n, -1, H)
  weights = jnp.asarray(rng.normal(size=(n, K, H)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=flat_rows.shape), jnp.float32)
  kernel = lambda f: lambda launch: jax.jit(functools.partial(f, launch))  # noqa: E731
  dot, total, source = (kernel(f) for f in (kernels.gather_dot, kernels.gather_sum, kernels.source_sum))
  softmax = lambda f: lambda launch: jax.jit(functools.partial(f, launch, "valid", D**-0.5))  # noqa: E731
  edge_args = (inputs["gate"], weights, inputs["edge_scale"], inputs["envelope"], inputs["valid"], None)
  return {
    "by-source list (sort)": (lambda launch: build, (inputs["neighbors"], inputs["valid"], n), None),
    "gather_dot q.k (logits)": (dot, (graph, q_t, k_t), D),
    "edge weights beta (softmax)": (softmax(pallas_edge_weights), edge_args, None),
    "gather_dot ct.rows (d beta)": (dot, (graph, cotangent, flat_rows), flat_rows.shape[1]),
    "source_sum beta ct (d rows)": (source, (graph, weights, cotangent), flat_rows.shape[1]),
    "edge weights VJP (d gate, d q.k, d scale, d envelope)": (softmax(edge_weights_vjp), (*edge_args, weights), None),
    "gather_sum w k (d q)": (total, (graph, weights, k_t), D),
    "source_sum w q (d k)": (source, (graph, weights, q_t), D),
  }


def backward_launch(**tiling):
  """Launch parameters of the backward's kernels (interpret mode off a GPU), tiles as given or the op's default
  (``pallas.BACKWARD_STAGES`` pipelining stages)."""
  tiling.setdefault("num_stages", kernels.BACKWARD_STAGES)
  return Launch(interpret=jax.default_backend() != "gpu", **tiling)


def breakdown(n: int, seed: int, neighbors: str):
  """Seconds of each piece of the kernel backward with the default launch parameters (the rest of forward +
  backward is the forward kernel and a few XLA products of [N, K, H] arrays)."""
  rows = []
  for name, (fn, args, _) in backward_pieces(n, seed, neighbors).items():
    seconds, _ = timed(fn(backward_launch()), args, max_reps=20, budget_s=1.0)
    rows.append(dict(n=n, piece=name, seconds=seconds))
    print(json.dumps(rows[-1]), flush=True)
  return rows


# (block_n, block_h, num_warps, num_stages) tried for the backward's kernels; None = the default rule
# fmt: off
BACKWARD_TILINGS = {
  "wide": (None, (1, 64, 4, 2), (1, 64, 4, 3), (1, 64, 8, 1), (1, 64, 8, 2), (1, 32, 4, 1), (1, 32, 2, 1),
           (1, 32, 4, 2), (2, 32, 4, 1), (1, 128, 8, 1), (2, 64, 8, 1), (1, 16, 2, 1)),
  "narrow": (None, (4, 128, 4, 2), (8, 128, 8, 1), (8, 128, 4, 1), (2, 128, 4, 1), (1, 128, 4, 1), (8, 64, 4, 1),
             (4, 64, 4, 1), (16, 64, 8, 1), (16, 128, 8, 1), (8, 128, 8, 2)),
}
# fmt: on


def sweep_backward(n: int, seed: int, neighbors: str):
  """Each backward kernel call over a few tilings ("wide" for the 58-row gathers, "narrow" for the d = 8 ones);
  every tiling's result is compared with the default's."""
  rows = []
  for name, (fn, args, num_f) in backward_pieces(n, seed, neighbors).items():
    if num_f is None:
      continue
    reference = None
    for tiling in BACKWARD_TILINGS["narrow" if num_f <= 16 else "wide"]:
      params = {} if tiling is None else dict(zip(("block_n", "block_h", "num_warps", "num_stages"), tiling))
      row = dict(n=n, piece=name, tiling="default" if tiling is None else "/".join(map(str, tiling)))
      try:
        call = fn(backward_launch(**params))
        out = call(*args)
        reference = out if reference is None else reference
        row["rel_vs_default"] = float(jnp.max(jnp.abs(out - reference)) / jnp.max(jnp.abs(reference)))
        row["seconds"], _ = timed(call, args, max_reps=20, budget_s=0.5)
      except Exception as err:  # noqa: BLE001 - a tiling that does not compile or launch is reported
        row["error"] = str(err).splitlines()[0][:160]
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def table(results):
  lines = [f"{'N':>6} {'impl':<9} {'case':<17} {'ms':>9} {'GiB':>7} {'TFLOP/s':>8} {'floor':>6} {'@2.9':>6}"]
  for r in results:
    gib = f"{r['bytes_compiled'] / 2**30:7.2f}" if r.get("bytes_compiled") else "      -"
    if "seconds" in r:
      lines.append(
        f"{r['n']:>6} {r['impl']:<9} {r['case']:<17} {1e3 * r['seconds']:9.3f} {gib} "
        f"{r['tflop_s']:8.3f} {100 * r['floor_share']:5.1f}% {100 * r['floor_share_2.9']:5.1f}%"
      )
    else:
      lines.append(f"{r['n']:>6} {r['impl']:<9} {r['case']:<17} failed: {r.get('error', '')[:60]}")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 32768])
  parser.add_argument("--impls", nargs="+", default=["pallas", "jnp_node", "jnp_edge"])
  parser.add_argument("--check", action="store_true", help="derivative checks against the twin first")
  parser.add_argument("--check-n", type=int, default=1024)
  parser.add_argument("--sweep", action="store_true", help="forward tiling sweep at the largest size")
  parser.add_argument("--breakdown", action="store_true", help="time the backward's pieces at the largest size")
  parser.add_argument("--sweep-backward", action="store_true", help="tilings of each backward kernel, smallest size")
  parser.add_argument("--neighbors", choices=NEIGHBORS, default="window", help="neighbour pattern (make_inputs)")
  parser.add_argument("--seed", type=int, default=int(time.time()))
  parser.add_argument("--out", default="attention_results.json")
  opts = parser.parse_args()

  device = jax.devices()[0]
  report = dict(
    device=device.device_kind,
    jax=jax.__version__,
    seed=opts.seed,
    neighbors=opts.neighbors,
    bytes_per_atom=dict(forward=forward_bytes_per_atom(), forward_backward=forward_backward_bytes_per_atom()),
    results=[],
    checks={},
  )
  print(json.dumps(report), flush=True)

  def stage(key, fn, *args):
    """Runs one stage, keeps going after a failure, and saves the report after each stage."""
    try:
      report[key] = fn(*args)
    except Exception:  # noqa: BLE001 - report the failure, run the other stages
      report[key] = {"error": traceback.format_exc()[-2000:]}
      print(report[key]["error"], flush=True)
    with open(opts.out, "w") as f:
      json.dump(report, f, indent=1, default=str)

  if opts.check:
    stage("derivative_checks", check_derivatives, opts.check_n, opts.seed)
  bandwidth = copy_bandwidth()
  report["copy_bandwidth_tb_s"] = bandwidth / 1e12
  print(json.dumps(dict(copy_bandwidth_tb_s=bandwidth / 1e12)), flush=True)
  for n in opts.sizes:
    stage(f"size_{n}", benchmark_size, n, bandwidth, opts.impls, opts.seed, opts.neighbors)
    results, checks = report.pop(f"size_{n}") if "error" not in report[f"size_{n}"] else ([], {})
    report["results"] += results
    report["checks"][n] = checks
  if opts.sweep:
    stage("sweep", sweep, max(opts.sizes), opts.seed, bandwidth, opts.neighbors)
  if opts.breakdown:
    stage("breakdown", breakdown, max(opts.sizes), opts.seed, opts.neighbors)
  if opts.sweep_backward:
    stage("sweep_backward", sweep_backward, min(opts.sizes), opts.seed, opts.neighbors)
  with open(opts.out, "w") as f:
    json.dump(report, f, indent=1, default=str)
  print(f"\n{device.device_kind}, jax {jax.__version__}, copy {bandwidth / 1e12:.2f} TB/s, seed {opts.seed}")
  print(table(report["results"]))
  print("checks:", json.dumps(report["checks"]))
  if opts.check:
    print("derivative checks:", json.dumps(report["derivative_checks"]))
  if opts.sweep and isinstance(report["sweep"], list):
    best = min((r for r in report["sweep"] if "seconds" in r), key=lambda r: r["seconds"])
    print(
      "sweep:",
      " ".join(
        f"{r['block_n']}/{r['block_h']}/{r['num_warps']}/{r['num_stages']}:{1e3 * r['seconds']:.2f}"
        for r in report["sweep"]
        if "seconds" in r
      ),
      "best",
      best,
    )
  if opts.breakdown and isinstance(report["breakdown"], list):
    print("backward pieces (ms):", ", ".join(f"{r['piece']} {1e3 * r['seconds']:.2f}" for r in report["breakdown"]))
  if opts.sweep_backward and isinstance(report["sweep_backward"], list):
    for piece in dict.fromkeys(r["piece"] for r in report["sweep_backward"]):
      timed_rows = [r for r in report["sweep_backward"] if r["piece"] == piece and "seconds" in r]
      print(f"{piece}:", " ".join(f"{r['tiling']}:{1e3 * r['seconds']:.3f}" for r in timed_rows))


if __name__ == "__main__":
  main()
