"""Index range of the Pallas attention kernels at very large systems (docs/kernel.md §5, "Index range").

Nothing here allocates: the shapes are abstract (``jax.ShapeDtypeStruct``), traced with ``jax.eval_shape`` or
lowered for CUDA against an abstract H100 on the CPU host.

* The backward's by-source list holds int32 flat slot ids n*K + k and pointers up to N*K: one atom past
  ``max_backward_atoms(K)`` is refused with a clear error at trace time, the limit itself is accepted, and the
  forward alone has no such limit.
* Element offsets: the Triton module of every kernel is read back from the lowered program, and every load or
  store address into an array of more than 2**31 elements is formed with 64-bit offsets, the array's strides
  multiplied in 64 bits (only the per-axis index values, each below 2**31, are int32).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest
from jax._src.interpreters import mlir  # the Triton dialect's context, to read the kernels back (jax pinned)
from jax._src.lib.mlir import ir
from jax._src.lib.triton import dialect as tt_dialect
from kernel_helpers import ATTENTION_KERNELS, PAPER, attention_inputs, cuda_lowering

from pallas_kernels.pallas import INT32_MAX, max_backward_atoms, pallas_node_attention

# The order of ``_loss``'s arguments: the differentiable ones first.
ORDER = ("q", "k", "gate", "edge_scale", "envelope", "rows", "shifts", "valid", "neighbors")


def _abstract_inputs(n, k, h, d, c, r, m=None, shifts=False):
  inputs = attention_inputs(n, k, h, d, c, r, m=m, shifts=shifts)
  return tuple(inputs[name] for name in ORDER)


def _loss(q, k, gate, scale, env, rows, shifts, valid, neighbors, interpret=None):
  s = 0 if shifts is None else 9
  out = pallas_node_attention(
    q, k, gate, scale, env, valid, neighbors, rows, shifts, num_shift_rows=s, interpret=interpret
  )
  return sum(jnp.sum(o**2) for o in jax.tree.leaves(out))


def _gradient(*args, interpret=None):
  diff = tuple(i for i in range(7) if args[i] is not None)
  return jax.grad(lambda *x: _loss(*x, interpret=interpret), argnums=diff)(*args)


@pytest.mark.parametrize("num_slots", [8, 32])
def test_backward_refuses_flat_slot_ids_beyond_int32(num_slots):
  limit = max_backward_atoms(num_slots)
  assert limit * num_slots <= INT32_MAX < (limit + 1) * num_slots
  jax.eval_shape(_gradient, *_abstract_inputs(limit, num_slots, **PAPER))
  above = _abstract_inputs(limit + 1, num_slots, **PAPER)
  with pytest.raises(ValueError, match=f"at most {limit:,} atoms") as error:
    jax.eval_shape(_gradient, *above)
  assert f"order [N*K] = [{(limit + 1) * num_slots:,}]" in str(error.value)
  assert "jnp_node" in str(error.value)
  # The forward (direct forces) forms no flat slot id: the same system runs forward.
  out = jax.eval_shape(_loss, *above)
  assert out.shape == ()


def test_backward_refuses_sources_beyond_int32():
  jax.eval_shape(_gradient, *_abstract_inputs(4, 2, **PAPER, m=INT32_MAX))
  with pytest.raises(ValueError, match="source atoms"):
    jax.eval_shape(_gradient, *_abstract_inputs(4, 2, **PAPER, m=INT32_MAX + 1))


def test_paper_model_limit_in_atoms():
  """K = 32 slots: 67,108,863 atoms, far above the 1M atoms of direct and the 250k of conservative forces."""
  assert max_backward_atoms(32) == 67_108_863


# ---------------------------------------------------------------------------------------------------------
# Element offsets in the lowered Triton kernels
# ---------------------------------------------------------------------------------------------------------


def _operations(op):
  for region in op.regions:
    for block in region.blocks:
      for inner in block.operations:
        yield inner.operation
        yield from _operations(inner.operation)


def _triton_kernels(fn, *args):
  """[(kernel name, Triton module, shapes of its arguments: operands then results)] of a CUDA lowering."""
  lowered = cuda_lowering(fn, *args)
  context = mlir.JaxIrContext()
  context.append_dialect_registry(mlir.upstream_dialects)
  tt_dialect.register_dialect(context)
  kernels = []
  for call in _operations(lowered.compiler_ir("stablehlo").operation):
    if call.name != "stablehlo.custom_call":
      continue
    config = ir.DictAttr(call.attributes["mhlo.backend_config"])
    shapes = [tuple(ir.RankedTensorType(v.type).shape) for v in (*call.operands, *call.results)]
    with context:
      module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
    kernels.append((ir.StringAttr(config["name"]).value, module, shapes))
  return context, kernels


def _constant(value) -> int | None:
  """The integer a (splatted) arith.constant holds, else None."""
  while isinstance(value.owner, ir.OpView) and value.owner.operation.name in ("tt.splat", "tt.broadcast"):
    value = value.owner.operation.operands[0]
  op = value.owner
  if isinstance(op, ir.OpView) and op.operation.name == "arith.constant":
    return ir.IntegerAttr(op.operation.attributes["value"]).value
  return None


def _element_type(value) -> str:
  """ "i32" or "i64" of a scalar or a tensor value."""
  try:
    return str(ir.RankedTensorType(value.type).element_type)
  except ValueError:
    return str(value.type)


def _offset_chain(offset):
  """(integer element types, stride constants, widened types) of the arithmetic forming one address offset,
  followed back to the int32 index values that are widened (arith.ext*) or loaded."""
  types, strides, widened = set(), set(), set()
  stack = [offset]
  while stack:
    value = stack.pop()
    types.add(_element_type(value))
    op = value.owner
    if not isinstance(op, ir.OpView):  # a block argument (loop counter): an index value
      continue
    name = op.operation.name
    if name.startswith("arith.ext"):
      widened.add(_element_type(op.operation.operands[0]))
      continue
    if name == "arith.muli":
      strides.update(c for c in map(_constant, op.operation.operands) if c is not None)
    if name in ("arith.addi", "arith.muli", "tt.splat", "tt.broadcast", "tt.expand_dims"):
      stack.extend(op.operation.operands)
  return types, strides, widened


def _row_major_strides(shape):
  return {math.prod(shape[i + 1 :]) for i in range(len(shape))}


@pytest.mark.parametrize("num_atoms", [2**20, max_backward_atoms(32)])
def test_large_arrays_get_64_bit_offsets(num_atoms):
  """Forward, backward and shifts at the paper's sizes with K = 32: 1M atoms (the direct-force target) and the
  backward's limit. Every address into an array of more than 2**31 elements is a 64-bit offset built from the
  array's strides in 64 bits; smaller arrays may use 32-bit offsets, which cannot exceed their size."""
  args = _abstract_inputs(num_atoms, 32, **PAPER, shifts=True)
  context, kernels = _triton_kernels(lambda *a: _gradient(*a, interpret=False), *args)
  assert {name for name, _, _ in kernels} == ATTENTION_KERNELS
  wide = narrow = 0
  with context:
    for name, module, shapes in kernels:
      for op in _operations(module.operation):
        if op.name != "tt.addptr":
          continue
        base = op.operands[0].owner.operation
        assert base.name == "tt.splat", (name, base.name)
        shape = shapes[ir.BlockArgument(base.operands[0]).arg_number]
        types, strides, widened = _offset_chain(op.operands[1])
        if math.prod(shape) <= 2**31:
          narrow += 1
          continue
        wide += 1
        assert types == {"i64"}, (name, shape, types)
        assert _row_major_strides(shape) <= strides, (name, shape, strides)
        assert widened <= {"i32"}, (name, shape, widened)
  assert wide and narrow  # both kinds occur at these sizes, so the check above bites
