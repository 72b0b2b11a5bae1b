"""Shared fixtures for model tests: a tiny configuration, fixed padded shapes, one compilation each."""

import functools

import ase
import ase.build
import jax

# Pallas registers a JAX setting of the trace context when it is first traced; every function traced before that
# would then be traced and compiled again on its next call. Importing the module that registers it first keeps one
# trace context for the whole test session.
import jax.experimental.pallas.fuser  # noqa: F401
import numpy as np
from flax import nnx

from e2former_jax.config import get_config
from e2former_jax.graph import graph_from_atoms
from e2former_jax.model import E2Former
from e2former_jax.predict import make_predict_fn, merge_model, predict, split_model

TINY = dict(
  channels=16,
  num_heads=8,
  head_dim=4,
  qk_hidden=16,
  type_embed_dim=8,
  num_basis=16,
  radial_hidden=16,
  num_layers=1,
  max_neighbors=12,
)
# One block: a second compiles as long again and checks nothing the first does not (each block is the same
# function of features of every degree). Models of two blocks are the authors' five reduced checkpoints
# (tests/authors: two first-order blocks each, one with long-range zero-order blocks after them), compared with
# the authors' outputs in float32 and float64, the long-range one on every attention path.
NUM_ATOMS, NUM_GRAPHS = 48, 4


def predictor(
  dtype="float32",
  gate="QKdot_alpha",
  impl="jnp_node",
  stress=False,
  forces="conservative",
  cutoff=5.0,
  max_neighbors=12,
  precision="highest",
):
  """(config, model, jitted predict) for a tiny randomly initialised model, one per setting however the
  arguments are spelled (``predictor(stress=True)`` and ``predictor(impl="jnp_node", stress=True)`` are one).
  ``precision`` is ``matmul_precision`` (on a CPU every mode's float32 products are true float32)."""
  return _predictor(dtype, gate, impl, stress, forces, cutoff, max_neighbors, precision)


@functools.cache
def _predictor(dtype, gate, impl, stress, forces, cutoff, max_neighbors, precision):
  cfg = get_config(
    "small",
    **{**TINY, "max_neighbors": max_neighbors},
    gate=gate,
    attention_impl=impl,
    dtype=dtype,
    forces=forces,
    cutoff=cutoff,
    matmul_precision=precision,
  )
  model = E2Former(cfg, rngs=nnx.Rngs(0))
  return cfg, model, make_predict_fn(model, compute_stress=stress)


def evaluate(structures, num_atoms=NUM_ATOMS, num_graphs=NUM_GRAPHS, offset=None, **kw):
  """Energies [S] and per-structure force arrays (numpy, float64) of ``structures``."""
  cfg, _, fn = predictor(**kw)
  return results(fn(padded_graph(cfg, structures, num_atoms, num_graphs, offset)), structures)


def padded_graph(cfg, structures, num_atoms=NUM_ATOMS, num_graphs=NUM_GRAPHS, offset=None):
  """The ``AtomGraph`` of ``structures`` for a model of config ``cfg``, positions moved by ``offset`` (A)."""
  dtype = np.float64 if cfg.dtype == "float64" else np.float32
  graph, _ = graph_from_atoms(structures, cfg.cutoff, cfg.max_neighbors, num_atoms, num_graphs, dtype)
  if offset is not None:
    graph = graph.replace(positions=graph.positions + np.asarray(offset, dtype))
  return graph


def evaluate_together(structures, settings, num_atoms=NUM_ATOMS, num_graphs=NUM_GRAPHS, offset=None):
  """``[evaluate(structures, **s) for s in settings]`` from one compiled call: the same padded batch through the
  tiny models of several settings (gates, attention paths; the same cutoff, K and dtype). XLA compiles one program
  of several models of one batch in less time than a program per model (measured: about half for four); the
  program is compiled once per list of settings."""
  runs = [predictor(**s) for s in settings]
  cfgs = tuple(cfg for cfg, _, _ in runs)
  if len({(cfg.cutoff, cfg.max_neighbors, cfg.dtype) for cfg in cfgs}) != 1:
    raise ValueError("settings evaluated together must share the cutoff, max_neighbors and dtype (one graph)")
  weights = [split_model(model)[1:3] for _, model, _ in runs]
  stresses = tuple(bool(s.get("stress", False)) for s in settings)
  outs = _together(cfgs, stresses)(weights, padded_graph(cfgs[0], structures, num_atoms, num_graphs, offset))
  return [results(out, structures) for out in outs]


@functools.cache
def _together(cfgs, stresses):
  def fn(weights, graph):
    return [
      predict(merge_model(cfg, params, elements), graph, stress)
      for cfg, stress, (params, elements) in zip(cfgs, stresses, weights, strict=True)
    ]

  return jax.jit(fn)


def results(out, structures):
  """A padded batch's ``predict`` outputs as numpy float64: energies [S], forces per structure, stress [S, 3, 3]."""
  energy = np.asarray(out["energy"], np.float64)[: len(structures)]
  forces = np.asarray(out["forces"], np.float64)
  split = np.cumsum([len(a) for a in structures])[:-1]
  result = {"energy": energy, "forces": np.split(forces[: sum(len(a) for a in structures)], split)}
  if "stress" in out:
    result["stress"] = np.asarray(out["stress"], np.float64)[: len(structures)]
  return result


def molecules():
  """Small test molecules: ethanol, an asymmetric C/N/O molecule, water."""
  ethanol = ase.build.molecule("CH3CH2OH")
  glycine = ase.build.molecule("CH3CONH2")
  water = ase.build.molecule("H2O")
  for atoms, seed in ((ethanol, 0), (glycine, 1), (water, 2)):
    atoms.rattle(0.05, seed=seed)
  return [ethanol, glycine, water]


def relative(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def random_rotation(seed):
  from scipy.spatial.transform import Rotation

  return Rotation.random(random_state=seed).as_matrix()


def transformed(atoms, rotation=None, translation=None, permutation=None):
  atoms = atoms.copy()
  pos = atoms.get_positions()
  if rotation is not None:
    pos = pos @ rotation.T
  if translation is not None:
    pos = pos + translation
  atoms.set_positions(pos)
  if permutation is not None:
    atoms = atoms[permutation]
  return atoms


def force_matching_gradients(cfg, structures, num_graphs=NUM_GRAPHS, parameter_gradients=True):
  """(energies, forces, parameter-gradient leaves) of the model of config ``cfg`` (seed 0) on ``structures``, the
  gradients of the force-matching loss sum(E) + mean |F|^2 (reverse over reverse), in one jitted call; with
  ``parameter_gradients=False`` only energies and forces (one reverse pass) and an empty list."""
  model = E2Former(cfg, rngs=nnx.Rngs(0))
  graph, _ = graph_from_atoms(structures, cfg.cutoff, cfg.max_neighbors, NUM_ATOMS, num_graphs)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, graph):
    out = predict(nnx.merge(graphdef, params, rest), graph)
    return jax.numpy.sum(out["energy"]) + jax.numpy.mean(jax.numpy.sum(out["forces"] ** 2, -1)), out

  if not parameter_gradients:
    out = jax.jit(lambda params, graph: loss(params, graph)[1])(params, graph)
    return out["energy"], out["forces"], []
  grads, out = jax.jit(jax.grad(loss, has_aux=True))(params, graph)
  return out["energy"], out["forces"], jax.tree.leaves(grads)
