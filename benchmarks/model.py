"""Whole-model timing on one GPU: inference (energy + conservative forces) and training steps.

Protocol of docs/performance.md §6 (the authors' measurement), reproduced: one random structure at
0.1 atoms/A^3 with Z in {1, 6, 7, 8} (here a jittered cubic grid, so no two atoms overlap; atoms come out
spatially ordered), cutoff 5 A, K = 32, the paper backbone with the ``QKdotS_alpha`` gate, float32 with
``matmul_precision="highest"`` (``--gate`` and ``--precision`` change the last two: ``--gate QKdot_alpha
--precision tensorfloat32`` is ``paper_spice`` with the authors' TF32 setting). Modes:

* ``infer``: energy + conservative forces (one backward pass).
* ``train_direct`` / ``train_conservative``: the authors' protocol, forward + backward of the loss
  E + mean(F^2) with respect to the parameters, no optimizer step; F from the direct head or F = -dE/dx
  (double backward).
* ``step_direct`` / ``step_conservative``: the real training step of ``e2former_jax.training.step`` (loss of
  the ``paper_spice`` training config, gradients, non-finite guard, optax update, state donated) on the same
  structure with random energy and force labels: what ``train.py`` runs per batch.

Each (mode, N, attention_impl) runs in its own process so the peak-memory counter belongs to it:

  python benchmarks/model.py --mode infer --atoms 4096 --impl pallas --json out.jsonl

The function is compiled ahead of time (``jax.jit(...).lower(...).compile()``), then timed: 2 warm-up calls,
the median of ``--repeats`` calls, each ended by ``block_until_ready``. With ``--lock FILE`` the timing holds
an exclusive lock on FILE, so several processes can compile at once (``benchmarks/model_suite.py``) while
only one uses the GPU. XLA's deterministic mode is on when ``XLA_FLAGS`` has
``--xla_gpu_deterministic_ops=true``; the JSON line records it.

Correctness on the same inputs: ``--check`` (infer) also evaluates the other attention path on the same
structure and reports max|dE| / max|E| and max|dF| / max|F|; the step modes report the first step's loss
and gradient norm, the ``train_*`` modes the norm of the gradient of E + mean(F^2); these must agree across
attention paths (same structure, labels and initial weights).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import statistics
import time

import ase
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ase.calculators.singlepoint import SinglePointCalculator
from flax import nnx

from benchmarks.report import emit
from e2former_jax.config import get_config
from e2former_jax.data.batching import Bucket, batch_from_atoms
from e2former_jax.graph import graph_from_atoms
from e2former_jax.model import E2Former
from e2former_jax.predict import predict, split_model
from e2former_jax.training.config import get_train_config
from e2former_jax.training.step import compiled_train_step, init_state


def random_structure(num_atoms: int, density: float = 0.1, seed: int = 0) -> ase.Atoms:
  """``num_atoms`` atoms (Z in {1, 6, 7, 8}) on a cubic grid of the given density, jittered by +-0.3 A."""
  rng = np.random.default_rng(seed)
  spacing = density ** (-1 / 3)
  side = int(np.ceil(num_atoms ** (1 / 3)))
  grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:num_atoms]
  positions = grid * spacing + rng.uniform(-0.3, 0.3, size=(num_atoms, 3))
  return ase.Atoms(numbers=rng.choice([1, 6, 7, 8], size=num_atoms), positions=positions)


def benchmark_config(
  forces: str,
  *,
  impl: str = "auto",
  gate: str = "QKdotS_alpha",
  precision: str = "highest",
  preset: str = "paper_spice",
  **overrides,
):
  """The benchmarks' model: the paper backbone (``preset``) with the ``gate``, forces "direct" or
  "conservative", attention path ``impl`` and matmul ``precision``; other ``ModelConfig`` fields by name."""
  return get_config(preset, gate=gate, forces=forces, attention_impl=impl, matmul_precision=precision, **overrides)


def model_function(model: E2Former, train: bool):
  """(``fn(params, graph)``, params): energy and forces, or with ``train`` the gradient of the authors' training
  loss sum(E) + mean |F|^2 with respect to the parameters (forces as the model's config says)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def forces(params, graph):
    out = predict(nnx.merge(graphdef, params, rest), graph)
    return out["energy"], out["forces"]

  def gradient(params, graph):
    def loss(params):
      energy, f = forces(params, graph)
      return jnp.sum(energy) + jnp.mean(jnp.sum(f**2, -1))

    return jax.grad(loss)(params)

  return (gradient if train else forces), params


def build(impl: str, forces: str, preset: str = "paper_spice", gate: str = "QKdotS_alpha", precision: str = "highest"):
  cfg = benchmark_config(forces, impl=impl, preset=preset, gate=gate, precision=precision)
  return cfg, E2Former(cfg, rngs=nnx.Rngs(0))


def compiled_call(mode: str, model: E2Former, structure: ase.Atoms):
  """(call, graph): ``call()`` runs one compiled evaluation of ``mode`` and returns its outputs; the
  function is compiled before this returns. Step modes thread the donated train state through calls."""
  cfg = model.config
  if mode.startswith("step"):
    train_cfg = get_train_config("paper_spice")
    rng = np.random.default_rng(1)
    labelled = structure.copy()
    labelled.calc = SinglePointCalculator(
      labelled, energy=float(rng.normal()) * len(labelled), forces=rng.normal(size=(len(labelled), 3))
    )
    batch, _ = batch_from_atoms([labelled], Bucket(len(labelled) + 1, 2), cfg.cutoff, cfg.max_neighbors)
    batch = jax.device_put(batch)
    _, params, elements, _ = split_model(model)
    state = init_state(params, train_cfg.optim, seed=0)
    step = compiled_train_step(cfg, train_cfg.optim, train_cfg.loss, train_cfg.run.steps)
    compiled = step.lower(state, elements, batch).compile()
    holder = {"state": state}

    def call():
      holder["state"], metrics = compiled(holder["state"], elements, batch)
      return metrics

    return call, batch.graph

  graph, _ = graph_from_atoms([structure], cfg.cutoff, cfg.max_neighbors)
  graph = jax.device_put(graph)
  fn, params = model_function(model, train=mode != "infer")
  compiled = jax.jit(fn).lower(params, graph).compile()
  return (lambda: compiled(params, graph)), graph


def timed(call, repeats: int) -> tuple[float, object]:
  out = None
  for _ in range(2):
    out = jax.block_until_ready(call())
  first = out
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3, first


@contextlib.contextmanager
def exclusive(path: str | None):
  """Holds an exclusive ``flock`` on ``path`` (no-op without one)."""
  if path is None:
    yield
    return
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument(
    "--mode", choices=["infer", "train_direct", "train_conservative", "step_direct", "step_conservative"], required=True
  )
  parser.add_argument("--atoms", type=int, default=4096)
  parser.add_argument("--impl", choices=["pallas", "jnp_node", "jnp_dense", "jnp_edge"], default="pallas")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--preset", default="paper_spice", help="model preset (paper_spice; small for a smoke test)")
  parser.add_argument("--gate", default="QKdotS_alpha", help="attention gate (paper_spice's own is QKdot_alpha)")
  parser.add_argument("--precision", default="highest", help="matmul_precision: highest, tensorfloat32 or bfloat16")
  parser.add_argument("--check", action="store_true", help="infer: compare with the other attention path")
  parser.add_argument("--lock", help="time while holding an exclusive lock on this file")
  parser.add_argument("--json", help="append the result as one JSON line to this file")
  args = parser.parse_args()
  forces = "direct" if args.mode.endswith("direct") else "conservative"
  cfg, model = build(args.impl, forces, args.preset, args.gate, args.precision)
  structure = random_structure(args.atoms)
  compile_start = time.perf_counter()
  call, graph = compiled_call(args.mode, model, structure)
  compile_seconds = time.perf_counter() - compile_start
  with exclusive(args.lock):
    ms, first = timed(call, repeats=args.repeats)
    stats = jax.devices()[0].memory_stats() or {}
  mask = np.asarray(graph.neighbor_mask)[: args.atoms]
  result = dict(
    mode=args.mode,
    atoms=args.atoms,
    impl=args.impl,
    gate=args.gate,
    precision=args.precision,
    ms=ms,
    steps_per_s=1e3 / ms,
    peak_gib=stats.get("peak_bytes_in_use", float("nan")) / 2**30,
    compile_s=compile_seconds,
    atoms_per_s=args.atoms / (ms / 1e3),
    mean_neighbours=float(mask.sum(1).mean()),
    deterministic="--xla_gpu_deterministic_ops=true" in os.environ.get("XLA_FLAGS", ""),
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    device=jax.devices()[0].device_kind,
    jax=jax.__version__,
  )
  if args.mode.startswith("step"):
    result.update(loss0=float(first["loss"]), grad_norm0=float(first["grad_norm"]), finite0=bool(first["finite"]))
  elif args.mode.startswith("train"):
    result.update(grad_norm0=float(optax.tree.norm(first)))
  if args.check and args.mode == "infer":
    other = "jnp_node" if args.impl == "pallas" else "pallas"
    _, other_model = build(other, forces, args.preset, args.gate, args.precision)
    other_call, _ = compiled_call("infer", other_model, structure)
    energy, forces_ = first
    other_energy, other_forces = other_call()
    result["check_vs"] = other
    result["energy_rel_diff"] = float(jnp.max(jnp.abs(other_energy - energy)) / jnp.max(jnp.abs(energy)))
    result["force_rel_diff"] = float(jnp.max(jnp.abs(other_forces - forces_)) / jnp.max(jnp.abs(forces_)))
  emit(result, args.json)


if __name__ == "__main__":
  main()
