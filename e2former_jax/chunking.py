"""Per-atom work in chunks of atoms, so that its temporaries never exist for all atoms at once.

The per-edge MLPs of the gate, rho and the edge-degree embedding produce [N, K, hidden] (and, for ``QKdot_alpha``,
[N, K, (L+1) C]) tensors whose rows depend only on their target atom, and so does the attention op's aggregate
of a target, with the readout of its message (``ModelConfig.edge_chunk``; a chunk's op reads the rows of its
distinct sources, gathered: ``over_atom_chunks_of_sources``);
the node-level maps of a block (queries, keys, values and the EAAS rows before the attention op; the FFN after
it) produce [N, rows, width] tensors whose rows depend only on their atom
(``ModelConfig.node_chunk``). ``over_atom_chunks`` computes such a function for ``size`` atoms at a time in a
loop with a custom VJP: the forward pass holds one chunk's temporaries, and the backward pass keeps only the
inputs and recomputes each chunk's temporaries. No loop state starts as constant zeros (docs/performance.md,
memory: XLA would create every such zero array at the start of the program and hold it until its loop ran).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.custom_derivatives import SymbolicZero


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
    ``fn(*per_atom)``, equal up to float32 round-off. Every chunk holds real atoms: where the chunks do not divide
    N, the last one ends at atom N and overlaps the one before it, and the overlap's rows count once (in the
    outputs and in the cotangents). No input or output is copied into a padded [count, size, ...] layout.
  """
  if not _splits(size, per_atom):
    return fn(*per_atom)
  leaves, tree = jax.tree.flatten(per_atom)
  chunks = _Chunks(_num_atoms(per_atom), size)
  shapes = [jax.ShapeDtypeStruct((chunks.size, *x.shape[1:]), x.dtype) for x in leaves]
  jaxpr, out_shape = jax.make_jaxpr(lambda *x: fn(*jax.tree.unflatten(tree, x)), return_shape=True)(*shapes)
  # every array fn closes over becomes an argument of the custom VJP, integer ones included: one left closed
  # over would escape its trace where the backward pass is traced apart from the forward (jax.checkpoint)
  inputs = [*leaves, *jaxpr.consts]
  body = _ChunkBody(jaxpr.jaxpr, chunks, len(leaves), tuple(jnp.issubdtype(x.dtype, jnp.inexact) for x in inputs))
  return jax.tree.unflatten(jax.tree.structure(out_shape), _map_chunks(body, *body.partition(inputs)))


class _Chunks:
  """``count`` chunks of ``size`` consecutive rows of N: chunk c < count - 1 holds rows [c size, (c + 1) size),
  the last one rows [N - size, N), overlapping the one before it where count * size > N."""

  def __init__(self, n: int, size: int):
    self.count = -(-n // size)
    self.n, self.size = n, -(-n // self.count)  # the fewest chunks of at most ``size`` atoms, as even as they go
    self.last = self.count - 1

  def start(self, c):
    return jnp.minimum(c * self.size, self.n - self.size)

  def rows(self, x: jax.Array, c) -> jax.Array:
    """Chunk ``c``'s rows of ``x`` ([N, ...] -> [size, ...])."""
    return jax.lax.dynamic_slice_in_dim(x, self.start(c), self.size)

  def counted(self, x: jax.Array, c) -> jax.Array:
    """``x`` ([size, ...], chunk ``c``'s rows) with the rows the chunk before also holds set to zero (only the last
    chunk has such rows), so that a sum over the chunks counts every row once."""
    own = self.start(c) + jnp.arange(self.size) >= c * self.size
    return jnp.where(own.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))

  def write(self, whole: jax.Array, x: jax.Array, c) -> jax.Array:
    """``whole`` ([N, ...]) with chunk ``c``'s rows replaced by ``x`` ([size, ...])."""
    return jax.lax.dynamic_update_slice_in_dim(whole, x, self.start(c), 0)


class _ChunkBody:
  """A function traced on one chunk, with the layout of its inputs: the per-atom leaves ([N, ...]), then the
  arrays it closes over; each either differentiable (floating point) or not."""

  def __init__(self, jaxpr, chunks: _Chunks, num_chunked: int, differentiable: tuple[bool, ...]):
    self.jaxpr, self.chunks, self.num_chunked, self.differentiable = jaxpr, chunks, num_chunked, differentiable

  def partition(self, inputs):
    """(differentiable inputs, the others), each in order."""
    pairs = list(zip(inputs, self.differentiable, strict=True))
    return [x for x, d in pairs if d], [x for x, d in pairs if not d]

  def merge(self, differentiable, others):
    pools = {True: iter(differentiable), False: iter(others)}
    return [next(pools[d]) for d in self.differentiable]

  def of_chunk(self, inputs, c):
    """The inputs of chunk ``c``: its rows of the per-atom leaves, the closed-over arrays whole."""
    return [self.chunks.rows(x, c) for x in inputs[: self.num_chunked]] + inputs[self.num_chunked :]

  def __call__(self, inputs):
    return jax.core.eval_jaxpr(self.jaxpr, inputs[self.num_chunked :], *inputs[: self.num_chunked])


def _loop_over_chunks(step, chunks: _Chunks, anchor: jax.Array):
  """``step(c)`` for every chunk c, where ``step`` returns (per-chunk outputs, outputs to sum): the first
  written into [N, ...] arrays, the second summed over the chunks.

  The last chunk runs first, so that the chunk before it overwrites the rows they share. The loop's state starts
  as zeros made from an opaque zero that depends on ``anchor`` (an input of the loop): a state that starts as
  constant zeros is a constant to XLA, which may create it, and keep it, from the start of the program, for
  every such loop at once: that held most of the memory per atom of a rematerialised model
  (docs/performance.md, memory). Each step is rematerialised: differentiating the loop again (a force-matching
  gradient differentiates the backward pass) keeps a chunk's inputs, not its temporaries."""
  step = jax.checkpoint(step)
  each, summed = jax.eval_shape(step, 0)
  zero, _ = jax.lax.optimization_barrier((jnp.zeros(()), anchor))

  def zeros(shape):
    return jnp.broadcast_to(zero.astype(shape.dtype), shape.shape)

  def body(i, state):
    whole, summed = state
    c = (i + chunks.last) % chunks.count
    each, more = step(c)
    whole = jax.tree.map(lambda w, x: chunks.write(w, x, c), whole, each)
    return whole, jax.tree.map(jnp.add, summed, more)

  whole = jax.tree.map(lambda x: jax.ShapeDtypeStruct((chunks.n, *x.shape[1:]), x.dtype), each)
  return jax.lax.fori_loop(0, chunks.count, body, (jax.tree.map(zeros, whole), jax.tree.map(zeros, summed)))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _map_chunks(body: _ChunkBody, differentiable, others):
  """``body`` on every chunk, its outputs written into [N, ...] arrays. The backward pass keeps only the
  inputs, recomputes each chunk from them (what ``jax.checkpoint`` of a chunk does) and sums the chunks'
  cotangents of the closed-over arrays."""
  inputs = body.merge(differentiable, others)
  return _loop_over_chunks(lambda c: (body(body.of_chunk(inputs, c)), ()), body.chunks, inputs[0])[0]


def _map_chunks_forward(body, differentiable, others):
  values = [x.value for x in differentiable], [x.value for x in others]
  return _map_chunks(body, *values), values


def _map_chunks_backward(body, residuals, cotangent):
  chunks = body.chunks
  # an output nothing reads has a symbolic zero cotangent: each chunk makes its own zeros, not [N, ...] ones
  read = [not isinstance(x, SymbolicZero) for x in cotangent]
  shapes = [jax.ShapeDtypeStruct((chunks.size, *x.shape[1:]), x.dtype) for x in cotangent]
  # a barrier between the cotangent and the recomputed chunks, so that XLA cannot merge a recomputed chunk with
  # the same computation in the forward pass (and keep that one's temporaries until here)
  differentiable, others, given = jax.lax.optimization_barrier(
    (*residuals, [x for x, r in zip(cotangent, read, strict=True) if r])
  )
  given = iter(given)
  cotangent = [next(given) if r else None for r in read]
  inputs = body.merge(differentiable, others)
  num_chunked = sum(body.differentiable[: body.num_chunked])

  def chunk_cotangent(x, shape, c):
    return jnp.zeros(shape.shape, shape.dtype) if x is None else chunks.counted(chunks.rows(x, c), c)

  def step(c):
    chunk, chunk_others = body.partition(body.of_chunk(inputs, c))
    _, pullback = jax.vjp(lambda x: body(body.merge(x, chunk_others)), chunk)
    (grads,) = pullback([chunk_cotangent(x, shape, c) for x, shape in zip(cotangent, shapes, strict=True)])
    return grads[:num_chunked], grads[num_chunked:]

  whole, summed = _loop_over_chunks(step, chunks, inputs[0])
  return [*whole, *summed], None


_map_chunks.defvjp(_map_chunks_forward, _map_chunks_backward, symbolic_zeros=True)


def source_capacity(num_targets: int, num_slots: int, num_sources: int) -> int:
  """Room for the distinct sources of a chunk of ``num_targets`` consecutive target atoms with ``num_slots``
  neighbour slots each (``over_atom_chunks_of_sources``).

  In spatial (Morton) order a chunk of n targets fills a region of about n atom volumes, a cube of side
  a = n^(1/3) atom spacings; its sources are the targets and a shell around them as thick as the K-nearest radius,
  about K^(1/3) spacings at any density. Room for a shell of h = 0.8 K^(1/3) spacings, (a + 2h)^3 atoms: 1.3-1.5
  times the most distinct sources counted in any chunk of 256-8,192 targets of a Morton-ordered 32k-atom structure
  at K = 32 (docs/performance.md §5a). Never more than the sources there are, nor than the slots.
  """
  shell = 0.8 * num_slots ** (1 / 3)
  room = math.ceil((num_targets ** (1 / 3) + 2 * shell) ** 3)
  return min(room, num_sources, num_targets * num_slots)


def distinct_sources(neighbors: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The distinct source atoms of the slots ``neighbors`` [n, K], in increasing order, and the slots renumbered
  to index them.

  Returns:
    sources [capacity] int (entries past the count repeat the smallest source), local [n, K] int32 with
    ``sources[local] == neighbors`` when count <= capacity, and count (scalar int32).
  """
  flat = neighbors.reshape(-1)
  ordered, order = jax.lax.sort((flat, jnp.arange(flat.shape[0], dtype=jnp.int32)), num_keys=1)
  first = jnp.concatenate([jnp.ones(1, bool), ordered[1:] != ordered[:-1]])
  rank = jnp.cumsum(first, dtype=jnp.int32) - 1
  sources = jnp.full(capacity, ordered[0], flat.dtype).at[rank].set(ordered, mode="drop")
  local = jnp.zeros(flat.shape, jnp.int32).at[order].set(rank, unique_indices=True)
  return sources, local.reshape(neighbors.shape), rank[-1] + 1


def over_atom_chunks_of(module: nnx.Module, fn: Callable, size: int, *per_atom):
  """``fn(module, *per_atom)`` computed ``size`` atoms at a time (``over_atom_chunks``), with the module passed
  as its graph and state so that no module is touched from inside the transforms."""
  if not _splits(size, per_atom):  # no chunks: no split and merge of the module either
    return fn(module, *per_atom)
  graphdef, state = nnx.split(module)
  return over_atom_chunks(lambda *args: fn(nnx.merge(graphdef, state), *args), size, *per_atom)


def chunks_fit_sources(neighbors: jax.Array, size: int, capacity: int) -> jax.Array:
  """Whether every chunk of ``size`` target atoms (the chunks of ``over_atom_chunks``) has at most ``capacity``
  distinct sources in its slots ``neighbors`` [N, K] (scalar bool)."""
  chunks = _Chunks(neighbors.shape[0], size)

  def distinct_count(c):
    ordered = jnp.sort(chunks.rows(neighbors, c).reshape(-1))
    return 1 + jnp.sum(ordered[1:] != ordered[:-1])

  return jnp.max(jax.vmap(distinct_count)(jnp.arange(chunks.count))) <= capacity


def over_atom_chunks_of_sources(
  module: nnx.Module, fn: Callable, size: int, sources: tuple[jax.Array, ...], neighbors: jax.Array, *per_atom
):
  """``fn(module, sources, neighbors, *per_atom)`` computed ``size`` target atoms at a time
  (``over_atom_chunks_of``), where ``sources`` are arrays with a row per source atom ([M, ...] each, of the whole
  system) and ``neighbors`` [N, K] the chunked targets' slots into them.

  Each chunk calls ``fn`` on the rows of its distinct sources only, gathered into [S, ...] arrays (S =
  ``source_capacity``), with its slots renumbered to index them. Why: the gradient with respect to ``sources``
  would otherwise be an [M, ...] cotangent per chunk, written and summed N/size times (work growing as N^2 /
  size); through the gather, a chunk's share is a scatter of its S rows, which XLA adds into the loop's sum in
  place. When some chunk has more distinct sources than S (not seen with atoms in spatial order; possible in
  another order), every chunk reads the whole arrays instead: one branch or the other for the whole loop, chosen
  on the device, so that XLA's in-place sum is never split by a branch inside the loop. Either way the sums
  are those of ``fn(module, sources, neighbors, *per_atom)``.
  """

  def whole(module, neighbors, *per_atom):
    return fn(module, sources, neighbors, *per_atom)

  num_sources = sources[0].shape[0]
  capacity = source_capacity(min(size, neighbors.shape[0]), neighbors.shape[1], num_sources)
  if not _splits(size, neighbors) or capacity >= num_sources:
    return over_atom_chunks_of(module, whole, size, neighbors, *per_atom)

  def distinct(module, neighbors, *per_atom):
    rows, slots, _ = distinct_sources(neighbors, capacity)
    return fn(module, tuple(jnp.take(x, rows, axis=0) for x in sources), slots, *per_atom)

  return jax.lax.cond(
    chunks_fit_sources(neighbors, size, capacity),
    lambda: over_atom_chunks_of(module, distinct, size, neighbors, *per_atom),
    lambda: over_atom_chunks_of(module, whole, size, neighbors, *per_atom),
  )
