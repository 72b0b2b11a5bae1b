"""The node-centric equivariant attention op: one entry point (``api.node_attention``), its jnp reference twin
(``jnp_node``), a dense jnp variant (``jnp_dense``) and the fused Pallas-Triton kernel (``pallas``); and the
direction gate of ``QKdot_alpha`` (``api.direction_gate``): its twin (``gate_jnp``) and fused kernels
(``gate_pallas``); and the radial profile of the edges, the model's per-edge MLPs (``api.radial_profile``): its
twin (``radial_jnp``) and fused kernels (``radial_pallas``)."""

from pallas_kernels.api import (
  DENSE_MAX_ATOMS,
  GATE_IMPLEMENTATIONS,
  IMPLEMENTATIONS,
  direction_gate,
  node_attention,
  radial_profile,
  resolve_implementation,
)

__all__ = [
  "DENSE_MAX_ATOMS",
  "GATE_IMPLEMENTATIONS",
  "IMPLEMENTATIONS",
  "direction_gate",
  "node_attention",
  "radial_profile",
  "resolve_implementation",
]
