"""Per-atom work in chunks of atoms, so that its temporaries never exist for all atoms at once.

The per-edge MLPs of the gate, rho and the edge-degree embedding produce [N, K, hidden] (and, for ``QKdot_alpha``,
[N, K, (L+1) C]) tensors whose rows depend only on their target atom, and so does the attention op's aggregate
of a target, which reads every source's rows whole (``ModelConfig.edge_chunk``); the node-level
maps of a block (queries, keys, values and the EAAS rows before the attention op; the message, path linears,
output map and FFN after it) produce [N, rows, width] tensors whose rows depend only on their atom
(``ModelConfig.node_chunk``). ``over_atom_chunks`` computes such a function for ``size`` atoms at a time in a
loop with a custom VJP: the forward pass holds one chunk's temporaries, and the backward pass keeps only the
inputs and recomputes each chunk's temporaries. No loop state starts as zeros (docs/performance.md, memory:
XLA would create every such zero array at the start of the program and hold it until its loop ran).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx


def _num_atoms(per_atom) -> int:
  return jax.tree.leaves(per_atom)[0].shape[0]


def _splits(size: int, per_atom) -> bool:
  """Whether chunks of at most ``size`` atoms split the atoms at all (0 means no chunks)."""
  return 0 < size < _num_atoms(per_atom)


def over_atom_chunks(fn: Callable, size: int, *per_atom):
  """``fn(*per_atom)`` computed ``size`` atoms at a time.

  Args:
    fn: a function of per-atom arrays (every leaf's leading axis is the atom axis) whose outputs are per-atom
      arrays, row i depending only on row i of the inputs (closed-over arrays may be anything).
    size: at most this many atoms per chunk (the fewest chunks that allows, of equal size); 0, or at least the
      number of atoms, calls ``fn`` once on everything.
    *per_atom: pytrees of arrays with leading axis N.

  Returns:
    ``fn(*per_atom)``, equal up to float32 round-off. The last chunk is filled up by repeating the last atom
    (a real atom, so no padding row can produce a NaN whose zero cotangent would still poison a gradient); the
    extra rows are dropped.
  """
  if not _splits(size, per_atom):
    return fn(*per_atom)
  n = _num_atoms(per_atom)
  count = -(-n // size)
  size = -(-n // count)  # the fewest chunks of at most ``size`` atoms, as even as they go: fill < count
  fill = count * size - n

  def chunked(x):
    x = jnp.concatenate([x, jnp.repeat(x[-1:], fill, axis=0)]) if fill else x
    return x.reshape((-1, size, *x.shape[1:]))

  leaves, tree = jax.tree.flatten(jax.tree.map(chunked, per_atom))
  jaxpr, out_shape = jax.make_jaxpr(lambda *x: fn(*jax.tree.unflatten(tree, x)), return_shape=True)(
    *(x[0] for x in leaves)
  )
  # every array fn closes over becomes an argument of the custom VJP, integer ones included: one left closed
  # over would escape its trace where the backward pass is traced apart from the forward (jax.checkpoint)
  inputs = [*leaves, *jaxpr.consts]
  body = _ChunkBody(jaxpr.jaxpr, count, len(leaves), tuple(jnp.issubdtype(x.dtype, jnp.inexact) for x in inputs))
  out = jax.tree.unflatten(jax.tree.structure(out_shape), _map_chunks(body, *body.partition(inputs)))
  return jax.tree.map(lambda x: x.reshape((-1, *x.shape[2:]))[:n], out)


class _ChunkBody:
  """A function traced on one chunk, with the layout of its inputs: the chunked leaves ([count, size, ...]),
  then the arrays it closes over; each either differentiable (floating point) or not."""

  def __init__(self, jaxpr, count: int, num_chunked: int, differentiable: tuple[bool, ...]):
    self.jaxpr, self.count, self.num_chunked, self.differentiable = jaxpr, count, num_chunked, differentiable

  def partition(self, inputs):
    """(differentiable inputs, the others), each in order."""
    pairs = list(zip(inputs, self.differentiable, strict=True))
    return [x for x, d in pairs if d], [x for x, d in pairs if not d]

  def merge(self, differentiable, others):
    pools = {True: iter(differentiable), False: iter(others)}
    return [next(pools[d]) for d in self.differentiable]

  def of_chunk(self, inputs, c):
    """The inputs of chunk ``c``: its rows of the chunked leaves, the closed-over arrays whole."""
    return [x[c] for x in inputs[: self.num_chunked]] + inputs[self.num_chunked :]

  def __call__(self, inputs):
    return jax.core.eval_jaxpr(self.jaxpr, inputs[self.num_chunked :], *inputs[: self.num_chunked])


def _loop_over_chunks(step, count: int):
  """``step(c)`` for chunks c = 0 .. count - 1, where ``step`` returns (per-chunk outputs, outputs to sum): the
  first stacked ([count, ...] leaves), the second summed over the chunks.

  The first chunk runs before the loop and its results start the loop's state (the stack a broadcast of its
  outputs). A loop state that starts as zeros is a constant to XLA, which may create it, and keep it, from the
  start of the program, for every such loop at once: that held most of the memory per atom of a rematerialised
  model (docs/performance.md, memory). Each step is rematerialised: differentiating the loop again (a
  force-matching gradient differentiates the backward pass) keeps a chunk's inputs, not its temporaries."""
  step = jax.checkpoint(step)
  stacked, summed = step(0)
  stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (count, *x.shape)), stacked)

  def body(c, state):
    stacked, summed = state
    each, more = step(c)
    stacked = jax.tree.map(lambda s, x: jax.lax.dynamic_update_index_in_dim(s, x, c, 0), stacked, each)
    return stacked, jax.tree.map(jnp.add, summed, more)

  return jax.lax.fori_loop(1, count, body, (stacked, summed))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _map_chunks(body: _ChunkBody, differentiable, others):
  """``body`` on every chunk, its outputs stacked. The backward pass keeps only the inputs, recomputes each
  chunk from them (what ``jax.checkpoint`` of a chunk does) and sums the chunks' cotangents of the closed-over
  arrays."""
  inputs = body.merge(differentiable, others)
  return _loop_over_chunks(lambda c: (body(body.of_chunk(inputs, c)), ()), body.count)[0]


def _map_chunks_forward(body, differentiable, others):
  return _map_chunks(body, differentiable, others), (differentiable, others)


def _map_chunks_backward(body, residuals, cotangent):
  # a barrier between the cotangent and the recomputed chunks, so that XLA cannot merge a recomputed chunk with
  # the same computation in the forward pass (and keep that one's temporaries until here)
  differentiable, others, cotangent = jax.lax.optimization_barrier((*residuals, cotangent))
  inputs = body.merge(differentiable, others)
  num_chunked = sum(body.differentiable[: body.num_chunked])

  def step(c):
    chunk, chunk_others = body.partition(body.of_chunk(inputs, c))
    _, pullback = jax.vjp(lambda x: body(body.merge(x, chunk_others)), chunk)
    (grads,) = pullback([x[c] for x in cotangent])
    return grads[:num_chunked], grads[num_chunked:]

  stacked, summed = _loop_over_chunks(step, body.count)
  return [*stacked, *summed], None


_map_chunks.defvjp(_map_chunks_forward, _map_chunks_backward)


def over_atom_chunks_of(module: nnx.Module, fn: Callable, size: int, *per_atom):
  """``fn(module, *per_atom)`` computed ``size`` atoms at a time (``over_atom_chunks``), with the module passed
  as its graph and state so that no module is touched from inside the transforms."""
  if not _splits(size, per_atom):  # no chunks: no split and merge of the module either
    return fn(module, *per_atom)
  graphdef, state = nnx.split(module)
  return over_atom_chunks(lambda *args: fn(nnx.merge(graphdef, state), *args), size, *per_atom)
