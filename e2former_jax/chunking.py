"""Per-atom work in chunks of atoms, so that its temporaries never exist for all atoms at once.

The per-edge MLPs of the gate, rho and the edge-degree embedding produce [N, K, hidden] (and, for ``QKdot_alpha``,
[N, K, (L+1) C]) tensors whose rows depend only on their target atom, and so does the attention op's aggregate
of a target, which reads every source's rows whole (``ModelConfig.edge_chunk``); the node-level
maps of a block (queries, keys, values and the EAAS rows before the attention op; the message, path linears,
output map and FFN after it) produce [N, rows, width] tensors whose rows depend only on their atom
(``ModelConfig.node_chunk``). ``over_atom_chunks`` computes such a function for ``size`` atoms at a time
(``jax.lax.map``), each chunk under ``jax.checkpoint``: the forward pass holds one chunk's temporaries, and the
backward pass keeps only each chunk's inputs and recomputes its temporaries (docs/performance.md, memory).
"""

from __future__ import annotations

from collections.abc import Callable

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

  out = jax.lax.map(lambda args: jax.checkpoint(fn)(*args), jax.tree.map(chunked, per_atom))
  return jax.tree.map(lambda x: x.reshape((-1, *x.shape[2:]))[:n], out)


def over_atom_chunks_of(module: nnx.Module, fn: Callable, size: int, *per_atom):
  """``fn(module, *per_atom)`` computed ``size`` atoms at a time (``over_atom_chunks``), with the module passed
  as its graph and state so that no module is touched from inside the transforms."""
  if not _splits(size, per_atom):  # no chunks: no split and merge of the module either
    return fn(module, *per_atom)
  graphdef, state = nnx.split(module)
  return over_atom_chunks(lambda *args: fn(nnx.merge(graphdef, state), *args), size, *per_atom)
