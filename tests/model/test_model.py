"""Whole-model tests in float32: parameter counts, symmetries, padding, batching, implementations, errors.

The settings compared with one another (gates, attention paths) run together, one compiled call per batch
(``evaluate_together``): XLA compiles one program of several models of one batch in less time than a program per
model (measured: about half for four)."""

import functools

import ase.build
import jax
import numpy as np
import pytest
from flax import nnx
from model_helpers import (
  NUM_ATOMS,
  NUM_GRAPHS,
  TINY,
  evaluate,
  evaluate_together,
  molecules,
  predictor,
  random_rotation,
  relative,
  transformed,
)

from e2former_jax.config import get_config
from e2former_jax.graph import graph_from_atoms
from e2former_jax.model import E2Former
from e2former_jax.predict import merge_model, split_model

# float32 tolerances of the issue: energy 1e-6 and forces 1e-5 relative (max|diff| / max|reference|).
ENERGY_TOL, FORCE_TOL = 1e-6, 1e-5


@pytest.mark.parametrize(
  "gate, backbone", [("QK_alpha", 23_793_920), ("QKdot_alpha", 25_636_096), ("QKdotS_alpha", 24_059_308)]
)
def test_parameter_counts_match_model_md(gate, backbone):
  cfg = get_config("paper_spice", gate=gate)
  model = nnx.eval_shape(lambda: E2Former(cfg, rngs=nnx.Rngs(0)))
  sizes = {"/".join(map(str, path)): v.size for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  heads = {k: s for k, s in sizes.items() if k.startswith(("energy_head", "force_head"))}
  assert sum(sizes.values()) - sum(heads.values()) == backbone
  assert sum(s for k, s in heads.items() if k.startswith("energy_head")) == 131_841
  assert sum(s for k, s in heads.items() if k.startswith("force_head")) == 256


def test_rotation_translation_permutation_invariance():
  mols = molecules()
  ref = evaluate(mols)
  rot = random_rotation(5)
  moved = [
    transformed(
      a, rot, translation=np.array([100.0, -100.0, 50.0]), permutation=np.random.default_rng(i).permutation(len(a))
    )
    for i, a in enumerate(mols)
  ]
  out = evaluate(moved)
  assert relative(out["energy"], ref["energy"]) <= ENERGY_TOL
  for i, a in enumerate(mols):
    perm = np.random.default_rng(i).permutation(len(a))
    assert relative(out["forces"][i], ref["forces"][i][perm] @ rot.T) <= FORCE_TOL


def test_direct_force_head_is_equivariant():
  mols = molecules()
  ref = evaluate(mols, forces="direct")
  rot = random_rotation(8)
  out = evaluate([transformed(a, rot) for a in mols], forces="direct")
  assert relative(out["energy"], ref["energy"]) <= ENERGY_TOL
  for i in range(len(mols)):
    assert relative(out["forces"][i], ref["forces"][i] @ rot.T) <= FORCE_TOL


def test_padding_and_batching_do_not_change_results():
  """Each molecule alone in another padded shape (its structure slot and one padding slot; atom slots for the
  largest molecule plus one, so the smaller ones carry more padding atoms) against the batch of all three."""
  mols = molecules()
  batched = evaluate(mols)
  alone_atoms = max(len(a) for a in mols) + 1  # one shape: one compilation for the three
  for i, a in enumerate(mols):
    alone = evaluate([a], num_atoms=alone_atoms, num_graphs=2)
    assert relative(alone["energy"], batched["energy"][i : i + 1]) <= ENERGY_TOL
    assert relative(alone["forces"][0], batched["forces"][i]) <= FORCE_TOL


GATES = ("QK_alpha", "QKdot_alpha", "QKdotS_alpha")
DEFAULT = ("QKdot_alpha", "jnp_node")  # predictor's gate and attention path
IMPLS = ("jnp_dense", "jnp_edge", "pallas")  # compared with "jnp_node"; pallas in interpret mode on the CPU
# With TF32 products "pallas" also runs QKdot_alpha's direction gate as its fused kernels (``gate.py``); on a CPU
# "tensorfloat32" products are true float32, so the comparison with "jnp_node" keeps its float32 tolerances.
IMPL_SETTINGS = {"pallas": dict(precision="tensorfloat32")}


@functools.cache
def molecule_runs(offset: float = 0.0) -> dict:
  """(gate, attention_impl) -> ``evaluate`` of the molecules moved by (offset, -offset, offset) A: node-centric and
  edge-aligned messages of every gate, and every attention path of the default gate, in one compiled call (the
  default setting, QKdot_alpha on jnp_node, is the program of the tests above)."""
  runs = [(gate, impl) for gate in GATES for impl in ("jnp_node", "jnp_edge") if (gate, impl) != DEFAULT]
  runs += [("QKdot_alpha", impl) for impl in IMPLS if impl != "jnp_edge"]
  shift = [offset, -offset, offset]
  settings = [dict(gate=g, impl=i, **IMPL_SETTINGS.get(i, {})) for g, i in runs]
  out = evaluate_together(molecules(), settings, offset=shift)
  return {DEFAULT: evaluate(molecules(), offset=shift), **dict(zip(runs, out, strict=True))}


@pytest.mark.parametrize("gate", GATES)
def test_node_centric_and_edge_aligned_messages_agree(gate):
  node, edge = molecule_runs()[gate, "jnp_node"], molecule_runs()[gate, "jnp_edge"]
  assert relative(edge["energy"], node["energy"]) <= 1e-5
  for i in range(len(node["forces"])):
    assert relative(edge["forces"][i], node["forces"][i]) <= 1e-5
  for offset in (10.0, 30.0):
    shifted = molecule_runs(offset)[gate, "jnp_node"]
    diff = max(relative(shifted["forces"][i], edge["forces"][i]) for i in range(len(node["forces"])))
    print(f"{gate}: node-centric force difference at origin offset {offset} A: {diff:.2e} relative")


PERIODIC = dict(cutoff=3.0, max_neighbors=16, stress=True)


def copper_cell():
  cell = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
  cell.rattle(0.05, seed=3)
  return cell


@functools.cache
def copper_runs() -> dict:
  """attention_impl -> ``evaluate`` of the copper cell (``PERIODIC``), every path in one compiled call."""
  impls = ("jnp_node", *IMPLS)
  settings = [dict(impl=i, **PERIODIC, **IMPL_SETTINGS.get(i, {})) for i in impls]
  return dict(zip(impls, evaluate_together([copper_cell()], settings), strict=True))


@pytest.mark.parametrize("impl", IMPLS)
def test_every_attention_impl_matches_jnp_node(impl):
  """Every path of ``attention_impl`` through the whole model against the jnp twin ("jnp_node"), float32, on
  molecules and on a rattled periodic copper cell (image shifts, repeated sources): 1e-5 relative in energies
  and forces. The stress is a sum of r_ij F_ij terms of both signs over every slot of the cell, so its largest
  entry is a difference of larger terms: round-off relative to it is some times that of the forces (1.2e-5
  seen), hence 1e-4."""
  node, other = molecule_runs()["QKdot_alpha", "jnp_node"], molecule_runs()["QKdot_alpha", impl]
  assert relative(other["energy"], node["energy"]) <= 1e-5
  for i in range(len(node["forces"])):
    assert relative(other["forces"][i], node["forces"][i]) <= 1e-5
  node, other = copper_runs()["jnp_node"], copper_runs()[impl]
  assert relative(other["energy"], node["energy"]) <= 1e-5
  assert relative(other["forces"][0], node["forces"][0]) <= 1e-5
  assert relative(other["stress"], node["stress"]) <= 1e-4


@functools.cache
def attention_weights(impls: tuple) -> list:
  """Per path of ``impls``, the softmax weights of every layer on the molecules, in one compiled call."""
  runs = [predictor(impl=impl) for impl in impls]
  cfg = runs[0][0]
  graph, _ = graph_from_atoms(molecules(), cfg.cutoff, cfg.max_neighbors, NUM_ATOMS, NUM_GRAPHS)

  @jax.jit
  def weights_of(weights, graph):
    return [
      merge_model(run_cfg, params, elements)(graph, return_attention=True)["attention"]
      for (run_cfg, _, _), (params, elements) in zip(runs, weights, strict=True)
    ]

  return weights_of([split_model(model)[1:3] for _, model, _ in runs], graph)


def test_attention_weights_of_the_paths_that_form_them():
  """``return_attention`` gives the same softmax weights on "jnp_node" and "jnp_dense" (weights in [0, 1]:
  absolute bound) and is refused by the paths that never form them."""
  weights = attention_weights(("jnp_node", "jnp_dense"))
  assert len(weights[0]) == TINY["num_layers"]
  for node_alpha, dense_alpha in zip(*weights, strict=True):
    np.testing.assert_allclose(dense_alpha, node_alpha, rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match="return_attention needs"):
    attention_weights(("jnp_edge",))
