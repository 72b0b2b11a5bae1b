"""One entry point for each op of this package, whatever computes it: the node-centric attention
(``node_attention``), the direction gate of ``QKdot_alpha`` (``direction_gate``) and the radial profile of the
edges, the model's per-edge MLPs (``radial_profile``).

``node_attention(..., implementation=name)`` dispatches to a file named after the implementation:

  * "jnp_node"  (``jnp_node.py``): the reference twin in plain jnp; gathers [N, K, R, C].
  * "jnp_dense" (``jnp_dense.py``): the sum over slots as per-head [N, N] products; fastest on a CPU for small
    batches, quadratic in N.
  * "pallas"    (``pallas.py``): the fused Pallas kernel lowered to Triton; reverse mode to any order.
  * "auto": "pallas" on a GPU; on other backends "jnp_dense" up to ``DENSE_MAX_ATOMS`` atom slots, else
    "jnp_node".

Variants of the weights (``jnp_node.attention_weights``): ``softmax_max``, a lower bound ``max_floor`` of the
softmax shift, and the unnormalised ``activation`` "softplus" / "sigmoid". Every implementation computes every
variant; the Pallas kernel fuses only the softmax, so "pallas" with another activation runs the "jnp_node" twin
(same arguments, same results, no Triton launch).

The model's fourth path, "jnp_edge" (the per-edge "standard implementation"), is not this op: it rotates every
edge into its own frame and needs the EAAS tables, so it lives with the model (``e2former_jax.attention``) and
uses only ``attention_weights`` from here. Nothing in this package imports e3x or the model.

``direction_gate(..., implementation=name)``: "jnp" (``gate_jnp.py``, the twin) or "pallas" (``gate_pallas.py``,
fused kernels; float32 only, other types run the twin).

``radial_profile(..., implementation=name)``: "jnp" (``radial_jnp.py``, the twin) or "pallas"
(``radial_pallas.py``, fused kernels; float32 only, other types run the twin).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gate_jnp import jnp_direction_gate
from pallas_kernels.jnp_dense import jnp_dense_attention
from pallas_kernels.jnp_node import ACTIVATIONS, jnp_node_attention
from pallas_kernels.radial_jnp import jnp_radial_profile

IMPLEMENTATIONS = ("jnp_node", "jnp_dense", "pallas")
GATE_IMPLEMENTATIONS = ("jnp", "pallas")  # also the radial profile's
TRITON_CALL = "__gpu$xla.gpu.triton"  # the XLA custom call the Pallas kernels lower to on GPUs
DENSE_MAX_ATOMS = 256  # "auto" off the GPU uses "jnp_dense" up to this many atom slots, "jnp_node" above


def resolve_implementation(implementation: str, num_atoms: int) -> str:
  """The implementation ``implementation`` names for ``num_atoms`` target slots ("auto" resolved)."""
  if implementation == "auto":
    if jax.default_backend() == "gpu":
      return "pallas"
    return "jnp_dense" if num_atoms <= DENSE_MAX_ATOMS else "jnp_node"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"unknown attention implementation {implementation!r}; expected 'auto' or one of {IMPLEMENTATIONS}"
    )
  return implementation


def node_attention(
  q,
  k,
  gate,
  edge_scale,
  envelope,
  valid,
  neighbors,
  rows,
  shifts=None,
  *,
  implementation: str = "auto",
  num_shift_rows: int = 0,
  softmax_max: str = "valid",
  activation: str = "softmax",
  max_floor=None,
  return_weights: bool = False,
  **kernel_options,
):
  """Node-centric attention aggregate (the math is in ``jnp_node``'s docstring).

  Args:
    q: [N, H, d] queries of target atoms.
    k: [M, H, d] keys of source atoms.
    gate: [N, K, H] per-edge logit gate.
    edge_scale: [N, K, H] per-edge factor applied after the softmax (rho / |r_ij|, 1/Angstrom).
    envelope: [N, K] cutoff envelope phi(|r_ij|).
    valid: [N, K] bool, slot holds a neighbour within the cutoff.
    neighbors: [N, K] int32 source atom of each slot.
    rows: [M, R, C] per-node rows to aggregate; channel c belongs to head c mod H.
    shifts: optional [N, K, 3] Cartesian image offsets (Angstrom) of periodic structures.
    implementation: "auto" or one of ``IMPLEMENTATIONS``.
    num_shift_rows: how many trailing rows enter the shift-weighted aggregate.
    softmax_max: "valid" (max over in-cutoff slots) or "all_slots".
    activation: "softmax", or "softplus" / "sigmoid" (unnormalised; "pallas" runs these on "jnp_node").
    max_floor: optional [N, H] lower bound of the softmax shift (the max of logits that enter only the shift,
      -inf where there are none).
    return_weights: also return alpha [N, K, H] (not with "pallas", which never forms it).
    **kernel_options: tiling and launch options of the Pallas kernel (``pallas.pallas_node_attention``).

  Returns:
    agg [N, R, C]; with ``shifts`` also agg_shift [N, 3, num_shift_rows, C]; with ``return_weights`` also
    alpha; a tuple in that order, or a bare array when only agg is returned.
  """
  implementation = resolve_implementation(implementation, q.shape[0])
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
  args = (q, k, gate, edge_scale, envelope, valid, neighbors, rows, shifts)
  options = dict(num_shift_rows=num_shift_rows, softmax_max=softmax_max, max_floor=max_floor)
  if implementation == "pallas":
    if return_weights:
      raise ValueError("the pallas implementation never forms the attention weights: use 'jnp_node' or 'jnp_dense'")
    if activation == "softmax":
      from pallas_kernels.pallas import pallas_node_attention  # Pallas/Triton imported only when used

      return pallas_node_attention(*args, **options, **kernel_options)
    implementation = "jnp_node"  # the kernel fuses the softmax only; the other activations run the twin
  elif kernel_options:
    raise TypeError(f"{implementation!r} takes no kernel options, got {sorted(kernel_options)}")
  fn = jnp_dense_attention if implementation == "jnp_dense" else jnp_node_attention
  return fn(*args, **options, activation=activation, return_weights=return_weights)


def direction_gate(
  hidden, sh, projected, w_mix, b_mix, w_gate, b_gate, *, precision: str, implementation: str, **kernel_options
):
  """The direction gate g [N, K, H] of ``QKdot_alpha`` (the math is in ``gate_jnp``'s docstring).

  Args:
    hidden: [N, K, A] last hidden layer of the gate's edge MLP.
    sh: [N, K, (L+1)^2] spherical harmonics of the slots' directions.
    projected: [N, (L+1)^2, F] projected target features.
    w_mix, b_mix: [A, (L+1) F], [(L+1) F]: the edge MLP's last layer.
    w_gate, b_gate: [(L+1) F, H], [H]: the gate's output layer.
    precision: matmul precision ("highest", "tensorfloat32", "bfloat16").
    implementation: one of ``GATE_IMPLEMENTATIONS``.
    **kernel_options: tiling and launch options of the Pallas kernels (``gate_pallas.pallas_direction_gate``).
  """
  if implementation not in GATE_IMPLEMENTATIONS:
    raise ValueError(f"unknown gate implementation {implementation!r}; expected one of {GATE_IMPLEMENTATIONS}")
  args = (hidden, sh, projected, w_mix, b_mix, w_gate, b_gate)
  if implementation == "pallas" and all(x.dtype == jnp.float32 for x in args):
    from pallas_kernels.gate_pallas import pallas_direction_gate  # Pallas/Triton imported only when used

    return pallas_direction_gate(*args, precision=precision, **kernel_options)
  if kernel_options:
    raise TypeError(f"the jnp twin takes no kernel options, got {sorted(kernel_options)}")
  return jnp_direction_gate(*args, precision=precision)


def radial_profile(
  distance,
  target_rows,
  source_table,
  source_numbers,
  w_rbf,
  norms,
  linears,
  *,
  basis: tuple[float, int, float],
  precision: str,
  implementation: str,
  **kernel_options,
):
  """The radial profile of the edges [N, K, O], a per-edge MLP of the invariant edge features (the math is in
  ``radial_jnp``'s docstring).

  Args:
    distance: [N, K] slot distances (Angstrom).
    target_rows: [N, A] the first Linear's target-type block and bias, one row per target.
    source_table: [S, A] the first Linear's source-type block, one row per element.
    source_numbers: [N, K] int, each slot's source element (row of ``source_table``).
    w_rbf: [B, A] the first Linear's radial-basis block.
    norms: ((scale, bias), ...) of the LayerNorms.
    linears: ((w, b), ...) of the Linears after the norms (one fewer than the norms, or as many).
    basis: (cutoff, num_basis, width) of the Gaussian radial basis.
    precision: matmul precision ("highest", "tensorfloat32", "bfloat16").
    implementation: one of ``GATE_IMPLEMENTATIONS``.
    **kernel_options: tiling and launch options of the Pallas kernels (``radial_pallas.pallas_radial_profile``).
  """
  if implementation not in GATE_IMPLEMENTATIONS:
    raise ValueError(
      f"unknown radial profile implementation {implementation!r}; expected one of {GATE_IMPLEMENTATIONS}"
    )
  args = (distance, target_rows, source_table, source_numbers, w_rbf, norms, linears)
  floats = (distance, target_rows, source_table, w_rbf, *jax.tree.leaves((norms, linears)))
  if implementation == "pallas" and all(x.dtype == jnp.float32 for x in floats):
    from pallas_kernels.radial_pallas import pallas_radial_profile  # Pallas/Triton imported only when used

    return pallas_radial_profile(*args, basis=basis, precision=precision, **kernel_options)
  if kernel_options:
    raise TypeError(f"the jnp twin takes no kernel options, got {sorted(kernel_options)}")
  return jnp_radial_profile(*args, basis=basis, precision=precision)
