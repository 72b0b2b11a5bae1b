"""The node-centric equivariant attention op: one entry point (``api.node_attention``), its jnp reference twin
(``jnp_node``), a dense jnp variant (``jnp_dense``) and the fused Pallas-Triton kernel (``pallas``)."""

from pallas_kernels.api import DENSE_MAX_ATOMS, IMPLEMENTATIONS, node_attention, resolve_implementation

__all__ = ["DENSE_MAX_ATOMS", "IMPLEMENTATIONS", "node_attention", "resolve_implementation"]
