"""Per-atom work computed in chunks of atoms (``ModelConfig.edge_chunk``: the per-edge MLPs; ``node_chunk``: the
node-level maps of each block) changes no result."""

import functools

import ase.build
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from kernel_helpers import equations
from model_helpers import NUM_ATOMS, NUM_GRAPHS, TINY, force_matching_gradients, molecules, relative

from e2former_jax import chunking
from e2former_jax.chunking import chunks_fit_sources, distinct_sources, over_atom_chunks, source_capacity
from e2former_jax.config import get_config
from e2former_jax.graph import graph_from_atoms
from e2former_jax.model import E2Former
from e2former_jax.potential import morton_order
from e2former_jax.predict import predict


def test_over_atom_chunks_equals_one_call_and_keeps_gradients_finite():
  """A chunk size that does not divide N (the last chunk overlaps the one before it: its shared rows must keep
  the per-atom gradient and count once in the gradient of the closed-over ``table``), outputs and gradients; the
  function is singular at a zero row, which no chunk may create."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(10, 3)))

  def loss(x, table, size):
    def fn(x):
      return {"norm": jnp.linalg.norm(x, axis=-1), "scaled": x * table}

    out = over_atom_chunks(fn, size, x)
    return jnp.sum(out["norm"] ** 3) + jnp.sum(jnp.sin(out["scaled"]))

  table = jnp.arange(3.0)
  gradients = jax.grad(loss, argnums=(0, 1))
  whole, whole_grads = loss(x, table, 0), gradients(x, table, 0)
  for size in (3, 4, 10, 16):
    np.testing.assert_allclose(loss(x, table, size), whole, rtol=1e-6)
    for grad, whole_grad in zip(gradients(x, table, size), whole_grads, strict=True):
      assert np.all(np.isfinite(grad))
      np.testing.assert_allclose(grad, whole_grad, rtol=1e-6)


QKDOT = dict(gate="QKdot_alpha", softmax_max="valid")
BOTH_CHUNKS = dict(edge_chunk=7, node_chunk=5)  # neither divides the 48 atom slots

# case -> (model options, chunk and remat settings, whether the parameter gradients of a force-matching loss are
# compared too). That second order through the chunk loops is checked where the loops differ: the node-level
# chunks with remat (zero_order_remat) and the kernel's chunks of targets reading gathered sources
# (first_order_pallas); the other cases compare energies and forces (a first-order program compiles in a fraction
# of the time: CI time). The loops are the same whatever the attention path inside them.
CHUNKED_CASES = {
  # the first-order message through the node-centric op, a periodic cell in the batch
  "first_order": ({**QKDOT, "attention_impl": "jnp_node"}, BOTH_CHUNKS, False),
  # the zero-order message, the e2formerv2 softmax (its shift slots run the chunked gate too) and remat
  "zero_order_remat": (
    dict(gate="QKdotS_alpha", softmax_max="e2formerv2", attention_orders=("first", "zero"), attention_impl="jnp_node"),
    {**BOTH_CHUNKS, "remat": True},
    True,
  ),
  # the fused kernel (interpret mode here) on chunks of targets and the rows of their sources; not QKdotS_alpha with
  # the Si cell: its unnormalised harmonics leave the cell's zero forces (by symmetry) at float32 noise of 1e-3
  # eV/A whatever the grouping, 1.3e-4 of max|F| (measured with and without chunks, before and after the op joined).
  # The node-level maps unchunked: their chunks do not depend on the attention path, and they add a third of this
  # case's compile time (CI time).
  "first_order_pallas": ({**QKDOT, "attention_impl": "pallas"}, dict(edge_chunk=7), True),
  # the per-edge ("standard") message, only its readout chunked per atom, and remat on this path too
  "edge_aligned_remat": ({**QKDOT, "attention_impl": "jnp_edge"}, {**BOTH_CHUNKS, "remat": True}, False),
}


# Room for a chunk's distinct sources (``chunking.source_capacity``): at these sizes its formula leaves room for
# every atom (no gather), so the kernel's case sets it to 30, and every chunk of 7 targets reads its distinct
# sources gathered (the molecules' and the 8-atom cell's chunks have fewer); the branch that reads the whole
# arrays is tested below, on a small function. One case only: both branches compile (CI time).
GATHERED_CASES = ("first_order_pallas",)


def _chunk_test_structures(options: dict) -> list:
  """Molecules and a periodic cell in one batch; molecules only for the ``e2formerv2`` softmax, whose shift slots
  are defined for molecules."""
  cell = [ase.build.bulk("Si", "diamond", a=5.43, cubic=True)]
  return molecules() + (cell if options["softmax_max"] != "e2formerv2" else [])


@functools.cache
def _unchunked(options: tuple) -> tuple:
  """(energies, forces, parameter gradients) of the one-block model of ``options`` (a sorted tuple of config
  items, the attention path left out) without chunks, through the node-centric jnp op: the reference of every
  chunked case of these options, whatever the order it compares (one compilation shared by the cases)."""
  options = dict(options)
  cfg = get_config("small", **TINY, **options, attention_impl="jnp_node")
  return force_matching_gradients(cfg, _chunk_test_structures(options), NUM_GRAPHS + 1)


@pytest.mark.parametrize("case", CHUNKED_CASES)
def test_chunks_change_no_result(case, monkeypatch):
  """Energies, conservative forces and (where a case says) the parameter gradients of a force-matching loss with
  the per-edge MLPs in chunks of 7 atoms and (where a case says) the node-level maps in chunks of 5, or each block
  rematerialised, against no chunks and no remat on the node-centric jnp path: the same operations in another
  grouping or re-run instead of stored (for the other paths also the same model by another op, equal to round-off
  as tests/model/test_model.py checks), so float32 round-off only (1e-5 relative)."""
  if case in GATHERED_CASES:
    monkeypatch.setattr(chunking, "source_capacity", lambda n, k, m: min(m, 30))
  options, chunks, second_order = CHUNKED_CASES[case]
  cfg = get_config("small", **TINY, **options, **chunks)
  e1, f1, g1 = force_matching_gradients(cfg, _chunk_test_structures(options), NUM_GRAPHS + 1, second_order)
  reference = tuple(sorted((k, v) for k, v in options.items() if k != "attention_impl"))
  e0, f0, g0 = _unchunked(reference)
  assert relative(e1, e0) <= 1e-5 and relative(f1, f0) <= 1e-5
  if second_order:
    assert all(relative(b, a) <= 1e-5 for a, b in zip(g0, g1, strict=True))


class _Attend(nnx.Module):
  """A small attention of targets over their slots: nonlinear in the sources' keys and rows, as the model's op."""

  def __init__(self):
    self.scale = nnx.Param(jnp.asarray([0.7, -1.3]))

  def __call__(self, sources, slots, queries):
    keys, rows = sources
    logits = jnp.einsum("nc,nkc->nk", queries * self.scale[...], keys[slots])
    out = jnp.einsum("nk,nkc->nc", jax.nn.softmax(logits, axis=-1), jnp.tanh(rows[slots]))
    return out, jnp.full(queries.shape[0], keys.shape[0])  # and how many source rows the call was given


@pytest.mark.parametrize("fits", [True, False])
def test_chunks_read_their_distinct_sources_or_the_whole_arrays(fits, monkeypatch):
  """``over_atom_chunks_of_sources`` in chunks of 4 of 10 targets over 24 sources: with room for exactly the most
  distinct sources of any chunk, each chunk reads its own gathered; with one less, that chunk overflows and every
  chunk reads the whole arrays. Either way the outputs, the gradient with respect to the sources and the module,
  and the gradient of a function of that gradient (what force matching differentiates) equal one call on
  everything (1e-6 relative: the same sums)."""
  rng = np.random.default_rng(3)
  keys, rows = (jnp.asarray(rng.normal(size=(24, 2)), jnp.float32) for _ in range(2))
  queries = jnp.asarray(rng.normal(size=(10, 2)), jnp.float32)
  neighbors = jnp.asarray(rng.integers(0, 24, size=(10, 5)), jnp.int32).at[:4].set(jnp.arange(5) % 3)
  most = next(room for room in range(1, 24) if chunks_fit_sources(neighbors, 4, room))
  room = most if fits else most - 1
  graphdef, state = nnx.split(_Attend())
  monkeypatch.setattr(chunking, "source_capacity", lambda n, k, m: room)

  def attend(state, sources, size):
    fn = lambda module, sources, slots, queries: module(sources, slots, queries)  # noqa: E731
    return chunking.over_atom_chunks_of_sources(nnx.merge(graphdef, state), fn, size, sources, neighbors, queries)

  def loss(state, sources, size):
    return jnp.sum(attend(state, sources, size)[0] ** 3)

  def gradient_norm(state, sources, size):
    grads = jax.grad(loss, argnums=(0, 1))(state, sources, size)
    return sum(jnp.sum(x**2) for x in jax.tree.leaves(grads))

  np.testing.assert_array_equal(attend(state, (keys, rows), 4)[1], room if fits else 24)
  for fn in (loss, jax.grad(loss, argnums=(0, 1)), jax.grad(gradient_norm, argnums=(0, 1))):
    whole = jax.tree.leaves(fn(state, (keys, rows), 0))
    for got, want in zip(jax.tree.leaves(fn(state, (keys, rows), 4)), whole, strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(want))))


def test_distinct_sources_renumber_the_slots():
  """The distinct sources of a chunk's slots (duplicates and a padding source included), in increasing order,
  with the slots renumbered to index them; the count is exact also where it exceeds the room (the caller's test
  for overflow)."""
  neighbors = jnp.asarray(np.random.default_rng(1).integers(0, 40, size=(9, 6)), jnp.int32).at[0, :3].set(39)
  expected = np.unique(np.asarray(neighbors))
  sources, slots, count = distinct_sources(neighbors, 48)
  assert int(count) == len(expected)
  np.testing.assert_array_equal(np.asarray(sources)[: len(expected)], expected)
  np.testing.assert_array_equal(np.asarray(sources)[np.asarray(slots)], neighbors)
  assert int(distinct_sources(neighbors, 5)[2]) == len(expected)


def _knn_in_a_box(n: int, num_slots: int, spatial: bool) -> jax.Array:
  """[n, K] K nearest neighbours (self excluded) of n uniform random atoms at 0.1 per A^3, the atoms numbered in
  Morton order (as ``DevicePotential`` numbers them) or at random."""
  from scipy.spatial import cKDTree

  rng = np.random.default_rng(2)
  positions = rng.uniform(0.0, (n / 0.1) ** (1 / 3), size=(n, 3)).astype(np.float32)
  order = np.asarray(morton_order(jnp.asarray(positions), jnp.ones(n, bool))) if spatial else rng.permutation(n)
  positions = positions[order]
  return jnp.asarray(cKDTree(positions).query(positions, num_slots + 1)[1][:, 1:], jnp.int32)


def test_chunks_in_spatial_order_fit_their_source_room():
  """With the atoms in Morton order every chunk of 128 or 512 targets (K = 32) has room for its distinct sources,
  so the attention's chunks read gathered rows; numbered at random they do not (so this can fail), and the model
  takes the branch that reads the whole arrays."""
  num_slots, n = 32, 4096
  for spatial in (True, False):
    neighbors = _knn_in_a_box(n, num_slots, spatial)
    for size in (128, 512):
      capacity = source_capacity(size, num_slots, n)
      assert capacity < n
      assert bool(chunks_fit_sources(neighbors, size, capacity)) is spatial


@pytest.mark.parametrize("name", ["edge_chunk", "node_chunk"])
def test_a_negative_chunk_is_refused(name):
  with pytest.raises(ValueError, match=f"{name} must be 0"):
    get_config("small", **{name: -1})


def _temporaries(fn, *shapes) -> int:
  """XLA's temporary bytes of ``fn`` compiled (not run) for these input shapes."""
  return jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def _energy_of_chunked_blocks(y, w1, w2, size):
  """sum(y**2) after four rematerialised blocks of per-atom maps y -> tanh(tanh(y w1) w2) y, in chunks of
  ``size`` atoms: with w1 [64, 1024], [N, 9, 1024] temporaries."""

  def node_maps(y):
    return jnp.tanh(jnp.tanh(y @ w1) @ w2) * y

  for _ in range(4):
    y = jax.checkpoint(lambda y: y + over_atom_chunks(node_maps, size, y))(y)
  return jnp.sum(y**2)


_RNG = np.random.default_rng(0)
_W1 = jnp.asarray(_RNG.normal(size=(64, 1024)) / 8, jnp.float32)
_W2 = jnp.asarray(_RNG.normal(size=(1024, 64)) / 32, jnp.float32)
_Y = jax.ShapeDtypeStruct((1024, 9, 64), jnp.float32)


def test_chunks_bound_the_memory_of_rematerialised_blocks():
  """The point of chunking: with every block rematerialised, the backward pass holds one chunk's temporaries
  instead of all atoms'. XLA's buffer assignment of the gradient of four blocks of per-atom maps with
  [N, 9, 1024] temporaries (compiled, not run): chunks of 128 of 1,024 atoms need well under the unchunked
  temporaries (26 against 83 MiB on the CPU; asserted: at least a third less)."""
  temporaries = {
    size: _temporaries(jax.grad(lambda y, size=size: _energy_of_chunked_blocks(y, _W1, _W2, size)), _Y)
    for size in (0, 128)
  }
  assert temporaries[128] < 0.67 * temporaries[0], temporaries


def test_chunks_bound_the_memory_of_a_force_matching_gradient():
  """Force matching differentiates the backward pass again, and with it the chunk loops of both passes: each
  chunk must still be recomputed from its inputs there, not stored. The parameter gradient of a loss on
  dE/dy through the same four blocks (compiled, not run): chunks of 128 of 1,024 atoms against none (65
  against 452 MiB on the CPU; 745 MiB when the loops' steps were not rematerialised; asserted: at least a third
  less)."""

  def force_matching_gradient(size):
    forces = jax.grad(lambda y, w1: _energy_of_chunked_blocks(y, w1, _W2, size))
    return jax.grad(lambda w1, y: jnp.sum(forces(y, w1) ** 2))

  w1 = jax.ShapeDtypeStruct(_W1.shape, jnp.float32)
  temporaries = {size: _temporaries(force_matching_gradient(size), w1, _Y) for size in (0, 128)}
  assert temporaries[128] < 0.67 * temporaries[0], temporaries


def test_chunked_blocks_hold_only_their_inputs_across_the_program():
  """What held most of the GPU's memory per atom: with each chunk loop's stacked outputs and summed cotangents
  starting as zeros, XLA created those zero arrays for every block at the start of the program and kept them
  until their loop ran. Gradient of blocks that each read all atoms' rows from every chunk (as the attention op
  does), compiled, not run: six more blocks may add their six inputs (what remat keeps) and a little, not the
  three [N, rows, width] arrays per block of the zero-started loops (+18 of those units on the CPU, against +6)."""
  n, rows, width = 1024, 16, 64
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(width, width)) / 8, jnp.float32)
  mixing = jnp.asarray(rng.normal(size=(n, n)) / n, jnp.float32)

  def block(y):
    sources = jnp.tanh(y @ w)
    return y + over_atom_chunks(lambda y, a: jnp.einsum("ts,src->trc", a, sources) * y, 128, y, mixing)

  def temporaries(blocks):
    def loss(y):
      for _ in range(blocks):
        y = jax.checkpoint(block)(y)
      return jnp.sum(y**2)

    return _temporaries(jax.grad(loss), jax.ShapeDtypeStruct((n, rows, width), jnp.float32)) / (n * rows * width * 4)

  assert temporaries(8) - temporaries(2) <= 6 * 1.5


@pytest.mark.parametrize("impl", ["jnp_node", "pallas"])
def test_edge_chunks_leave_no_slot_array_of_all_atoms(impl):
  """With ``edge_chunk`` the gate, rho / |r_ij|, the logits, the weights and, in the backward pass, their
  cotangents ([N, K, H] each, what held most of the GPU's memory per atom) exist for one chunk of targets at a
  time: the traced force-matching gradient holds no [N, K, H] value; without chunks it does (so this can fail).
  H = 4 heads is a width no other per-slot array of this model has."""
  heads = 4
  graph, _ = graph_from_atoms(molecules(), 5.0, 12, NUM_ATOMS, NUM_GRAPHS)
  shapes = {}
  for chunk in (0, 7):
    cfg = get_config(
      "small",
      **{**TINY, "num_heads": heads},
      gate="QKdot_alpha",
      attention_impl=impl,
      edge_chunk=chunk,
    )
    graphdef, params, rest = nnx.split(E2Former(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)

    def loss(params):
      out = predict(nnx.merge(graphdef, params, rest), graph)
      return jnp.sum(out["energy"]) + jnp.mean(jnp.sum(out["forces"] ** 2, -1))

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
    shapes[chunk] = {tuple(v.aval.shape) for eqn in equations(jaxpr) for v in eqn.outvars if hasattr(v.aval, "shape")}
  slots = (NUM_ATOMS, 12, heads)
  assert slots in shapes[0]
  assert slots not in shapes[7] and (7, 12, heads) in shapes[7]


# writing a chunk's rows into the loop's [N, ...] outputs, and a reshape that keeps the atom axis (a view to XLA)
FREE = ("dynamic_update_slice", "reshape")


@pytest.mark.parametrize("impl", ["jnp_node", "pallas"])
def test_a_chunk_does_no_work_per_atom_of_the_whole_system(impl):
  """Inside the chunk loops of a forward pass (energy and direct forces), no operation makes an array with a row
  for every atom of the system, except writing the chunk's rows into the loop's outputs: work per chunk that
  grows with N makes the time per atom grow with N (or, where XLA hoists it out of the loop, holds an [N, ...]
  array). The per-edge MLPs once projected every source atom's type embedding in every chunk; they now project
  the type tables. Not the backward pass: there each chunk's share of the sources' cotangent is, in the traced
  program, a scatter into an [N, ...] zero array added to the loop's sum, which XLA turns into a scatter into the
  sum itself (docs/performance.md §5a)."""
  cfg = get_config(
    "small",
    **{**TINY, "num_layers": 2},
    gate="QKdot_alpha",
    forces="direct",
    attention_impl=impl,
    edge_chunk=7,
    node_chunk=5,
  )
  graph, _ = graph_from_atoms(molecules(), cfg.cutoff, cfg.max_neighbors, NUM_ATOMS, NUM_GRAPHS)
  graphdef, state = nnx.split(E2Former(cfg, rngs=nnx.Rngs(0)))
  jaxpr = jax.make_jaxpr(lambda state: nnx.merge(graphdef, state)(graph)["direct_forces"])(state).jaxpr
  loops = [eqn.params["jaxpr"].jaxpr for eqn in equations(jaxpr) if eqn.primitive.name == "scan"]
  assert loops
  per_atom = {
    (eqn.primitive.name, tuple(v.aval.shape))
    for body in loops
    for eqn in equations(body)
    for v in eqn.outvars
    if eqn.primitive.name not in FREE and getattr(v.aval, "shape", ())[:1] == (NUM_ATOMS,)
  }
  assert not per_atom, per_atom
