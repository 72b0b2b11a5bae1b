"""Shared by the import tests: the authors' fixtures, their molecules as one padded batch, and comparisons of a
model's outputs (energies, atomic energies, forces, per-stage node features) with the authors' outputs."""

import ast
import functools
import json
from pathlib import Path

import ase
import jax

# Pallas registers a JAX setting of the trace context when it is first traced; every function traced before that
# would then be traced and compiled again on its next call. Importing the module that registers it first keeps one
# trace context for the whole test session.
import jax.experimental.pallas.fuser  # noqa: F401
import jax.numpy as jnp
import numpy as np

from e2former_jax.graph import graph_from_atoms
from e2former_jax.predict import merge_model, split_model

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "authors"
BRANCHES = {
  "main_reduced_qk": "main",
  "main_reduced_qk_lsr": "main",
  "main_reduced_qkdot_linear": "main",
  "main_reduced_qkdot_painn": "main",
  "v2_reduced_qkdots": "e2formerv2",
}
NUM_ATOMS, NUM_GRAPHS = 64, 5  # the four molecules (57 atoms) in one batch: one compilation per head


def checkpoint_path(name: str) -> Path:
  return FIXTURES / name / f"{name}.pt"


def config_path(name: str) -> Path:
  return FIXTURES / name / "config.yaml"


@functools.cache
def outputs(name: str) -> dict:
  return json.loads((FIXTURES / name / f"{name}.outputs.json").read_text())


@functools.cache
def features(name: str) -> dict:
  with np.load(FIXTURES / name / f"{name}.features.npz") as data:
    return dict(data)


def molecules(name: str) -> list[ase.Atoms]:
  """The fixture's molecules (uncentred positions as the authors ran them), charge and multiplicity in info."""
  out = []
  for mol in outputs(name)["molecules"]:
    atoms = ase.Atoms(numbers=mol["numbers"], positions=mol["positions"])
    atoms.info.update(charge=mol["charge"], spin=mol["multiplicity"], name=mol["name"])
    out.append(atoms)
  return out


def batch(model, structures):
  cfg = model.config
  dtype = np.float64 if cfg.dtype == "float64" else np.float32
  graph, beyond = graph_from_atoms(structures, cfg.cutoff, cfg.max_neighbors, NUM_ATOMS, NUM_GRAPHS, dtype)
  assert beyond == 0
  return graph


def _outputs(cfg, heads, params, elements, graph) -> dict:
  """Per head: energies, atomic energies, -dE/dx, direct forces (direct heads) and stage features (traced)."""
  model = merge_model(cfg, params, elements)
  results = {}
  for head in heads:

    def energy(positions, head=head):
      out = model(graph.replace(positions=positions), head=head, return_stages=True)
      energies = jax.ops.segment_sum(out["atom_energy"], graph.graph_index, graph.num_graphs)
      return jnp.sum(energies), (energies, out)

    (_, (energies, out)), gradient = jax.value_and_grad(energy, has_aux=True)(graph.positions)
    result = {"energy": energies, "atom_energy": out["atom_energy"], "forces_autograd": -gradient}
    result["stages"] = out["stages"]
    if "direct_forces" in out:
      result["forces_direct"] = out["direct_forces"]
    results[head] = result
  return results


@functools.cache
def _evaluator(cfgs, heads):
  def fn(weights, graphs):
    return [
      _outputs(cfg, model_heads, params, elements, graph)
      for cfg, model_heads, (params, elements), graph in zip(cfgs, heads, weights, graphs, strict=True)
    ]

  return jax.jit(fn)


def evaluate(model, graph, heads=None) -> dict:
  """Per head (default: every head of the model): energies [G], atomic energies [N], -dE/dx [N, 3], direct
  forces (direct heads) and node features per stage (numpy), all heads in one compiled call."""
  return evaluate_together([model], [graph], heads)[0]


def evaluate_together(models, graphs, heads=None) -> list[dict]:
  """``[evaluate(model, graph, heads) for model, graph in zip(models, graphs)]`` from one compiled call (``graphs``
  one per model, or one graph for all; ``heads`` None: each model's own). XLA compiles one program of several
  models in less time than a program per model (measured: 38 s instead of 53 s for the five fixtures, about half
  for four attention paths of one batch, which share its geometry)."""
  graphs = list(graphs) if isinstance(graphs, list | tuple) else [graphs] * len(models)
  heads = tuple(tuple(model.config.heads if heads is None else heads) for model in models)
  weights = [split_model(model)[1:3] for model in models]
  outs = _evaluator(tuple(model.config for model in models), heads)(weights, graphs)
  return jax.tree.map(np.asarray, outs)


def relative(a, b, scale=None) -> float:
  """max |a - b| / scale, by default max |b| (the error relative to the array's scale)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) if scale is None else scale))


def comparisons(name: str, result: dict, head: str, dtype: str) -> dict[str, float]:
  """Relative errors against the authors' outputs: ``<molecule>/<quantity>`` for energy, atom_energies,
  forces_autograd and forces_direct (when the fixture has them). A structure's energy is the sum of its atomic
  energies, which cancel (aspirin's -0.07 eV is a sum of terms of up to 0.3 eV in one fixture): its error is
  taken relative to sum_i |E_i|, the size of the terms, since no precision resolves a sum finer than that."""
  errors = {}
  offset = 0
  for g, mol in enumerate(outputs(name)["molecules"]):
    n = len(mol["numbers"])
    ref = mol[f"head_{head}"][dtype]
    rows = slice(offset, offset + n)
    ours = {
      "energy": result["energy"][g],
      "atom_energies": result["atom_energy"][rows],
      "forces_autograd": result["forces_autograd"][rows],
    }
    if "forces_direct" in ref:
      ours["forces_direct"] = result["forces_direct"][rows]
    for key, value in ours.items():
      scale = np.sum(np.abs(ref["atom_energies"])) if key == "energy" else None
      errors[f"{mol['name']}/{key}"] = relative(value, ref[key], scale)
    offset += n
  return errors


def network_order(stage: str) -> tuple[int, int]:
  """Sort key of the stage names: edge_degree, block_<i>, long_block_<i>, final."""
  kind, _, index = stage.rpartition("_")
  if stage in ("edge_degree", "final"):
    return (0 if stage == "edge_degree" else 3), 0
  return (1 if kind == "block" else 2), int(index)


def stage_errors(name: str, result: dict, head: str) -> dict[str, float]:
  """Relative errors of the node features after each stage against the authors' float64 features, in the
  order of the network (``<molecule>/<stage>``)."""
  stored = features(name)
  errors = {}
  offset = 0
  for mol in outputs(name)["molecules"]:
    n = len(mol["numbers"])
    for stage in sorted(result["stages"], key=network_order):
      value = result["stages"][stage]
      key = f"{mol['name']}/{head}/{stage}"
      if key in stored:
        errors[f"{mol['name']}/{stage}"] = relative(value[offset : offset + n], stored[key])
    offset += n
  return errors


def where_it_starts(errors: dict[str, float], stages: dict[str, float], tolerance: float) -> str:
  """A failure message: the outputs above ``tolerance`` and the first network stage whose features already
  differ from the authors' (edge-degree embedding, blocks, long-range blocks, final)."""
  bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= tolerance}
  ordered = sorted(stages, key=lambda k: network_order(k.split("/")[1]))
  first = next((k for k in ordered if not stages[k] <= tolerance), None)
  start = f"features first differ at {first} ({stages[first]:.2e})" if first else "every stage's features agree"
  return f"outputs above {tolerance:g}: {bad}; {start}"


def key_list_config(path: Path) -> dict:
  """The authors' config of a ``*.keys.txt`` header: '# name: branch=... heads=... AutoGradForce=... with_moe=...'
  then '# backbone_config={json}'."""
  lines = path.read_text().splitlines()
  summary = dict(part.split("=", 1) for part in lines[0].split(": ", 1)[1].split())
  backbone = json.loads(lines[1].split("=", 1)[1])
  return {
    "backbone_config": backbone,
    "dataset_name_list": summary["heads"],
    "AutoGradForce": summary["AutoGradForce"] == "True",
    "with_moe": summary["with_moe"],
  }


def key_list(path: Path) -> list[tuple[str, tuple[int, ...], str, str, str]]:
  """The rows of a ``*.keys.txt``: (key, shape, dtype, kind, used) with used "used", "UNUSED" or ""."""
  rows = []
  for line in path.read_text().splitlines():
    if line.startswith("#") or not line.strip():
      continue
    key, shape, dtype, _, kind, *used = line.split("\t")
    rows.append((key, tuple(ast.literal_eval(shape)), dtype, kind, used[0] if used else ""))
  return rows
