"""The first-order message three ways against the explicit per-edge sum of dense CG products."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2former_jax import eaas
from e2former_jax.attention import edge_aligned_message, node_centric_message
from pallas_kernels.jnp_node import per_channel


def explicit_sum(v, beta, neighbors, vectors, lmax):
  """sum_j beta_ij (v_j (x) r_ij), one dense CG product per edge, in numpy float64."""
  t = eaas.dense_vector_coupling(lmax)
  return np.einsum("nkc,rao,nkrc,nka->noc", beta, t, v[neighbors], vectors)


@pytest.mark.parametrize("periodic", [False, True])
def test_node_centric_and_edge_aligned_messages_equal_explicit_sum(periodic):
  rng = np.random.default_rng(3)
  n, k, heads, channels, lmax = 12, 5, 4, 8, 2
  positions = rng.normal(scale=2.0, size=(n, 3))
  positions[0] = 0.0  # an atom at the origin
  positions[1] = [0.0, 1.7, 0.0]  # and one on the polar axis
  neighbors = rng.integers(0, n, size=(n, k))
  neighbors[2, :3] = 4  # duplicate sources
  shifts = rng.integers(-1, 2, size=(n, k, 3)) * 3.5 if periodic else np.zeros((n, k, 3))
  vectors = positions[:, None] - positions[neighbors] - shifts
  v = rng.normal(size=(n, (lmax + 1) ** 2, channels))
  beta = per_channel(jnp.asarray(rng.normal(size=(n, k, heads))), channels)
  beta = np.asarray(beta)
  expected = explicit_sum(v, beta, neighbors, vectors, lmax)
  with jax.enable_x64(True):
    rows = np.concatenate([np.asarray(eaas.vector_product(jnp.asarray(v), jnp.asarray(positions), lmax)), v], 1)
    agg = np.einsum("nkc,nkrc->nrc", beta, rows[neighbors])
    agg_shift = np.einsum("nkc,nka,nkrc->narc", beta, shifts, v[neighbors]) if periodic else None
    node = node_centric_message(
      jnp.asarray(agg), jnp.asarray(positions), lmax, None if agg_shift is None else jnp.asarray(agg_shift)
    )
    edge = edge_aligned_message(jnp.asarray(v), jnp.asarray(beta), jnp.asarray(neighbors), jnp.asarray(vectors), lmax)
    node, edge = np.asarray(node), np.asarray(edge)
  scale = np.max(np.abs(expected))
  assert np.max(np.abs(node - expected)) <= 1e-12 * scale
  assert np.max(np.abs(edge - expected)) <= 1e-12 * scale
