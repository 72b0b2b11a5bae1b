"""EAAS tables generated from CG coefficients, against docs/model.md §10 and against the dense CG product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2former_jax import eaas

S2, S3, S6 = np.sqrt(2), np.sqrt(3), np.sqrt(6)
# docs/model.md §10, exact values.
PAPER_SOURCE = [2, 0, 0, 0, 3, 0, 1, 5, 6, 7, 0, 1, 2, 3, 0, 8, 7, 0, 5, 4]
PAPER_WEIGHT = [
  1 / S3,
  0,
  1,
  0,
  -1 / S2,
  0,
  1 / S2,
  np.sqrt(3 / 10),
  np.sqrt(2 / 5),
  np.sqrt(3 / 10),
  0,
  1 / S2,
  np.sqrt(2 / 3),
  1 / S2,
  0,
  -2 / S6,
  -1 / S6,
  0,
  1 / S6,
  2 / S6,
]

# Compiled programs (one per lmax): run op by op, every primitive compiled on its own and the file took twice as long.
vector_product = jax.jit(eaas.vector_product, static_argnums=2)
dense_vector_product = jax.jit(eaas.dense_vector_product, static_argnums=2)


def test_lmax2_table_matches_model_md_exactly():
  table = eaas.eaas_table(2)
  assert table.paths == ((1, 0), (0, 1), (1, 1), (2, 1), (1, 2), (2, 2))
  np.testing.assert_array_equal(table.source_row, PAPER_SOURCE)
  np.testing.assert_allclose(table.weight, PAPER_WEIGHT, rtol=0, atol=1e-12)
  assert np.count_nonzero(table.weight) == 14


@pytest.mark.parametrize("lmax", [1, 2, 3, 4])
def test_table_follows_parity_rule_closed_form(lmax):
  """docs/model.md §10: even paths keep m with positive weights, odd paths swap m <-> -m."""
  table = eaas.eaas_table(lmax)
  start = 0
  for l1, l3 in table.paths:
    for i in range(2 * l3 + 1):
      m = i - l3
      src, w = table.source_row[start + i], table.weight[start + i]
      if l3 == l1 + 1:
        expect, src_m = (np.sqrt((l1 + 1) ** 2 - m * m) / np.sqrt((2 * l1 + 1) * (l1 + 1)), m)
      elif l3 == l1 - 1:
        expect, src_m = (np.sqrt(l1 * l1 - m * m) / np.sqrt(l1 * (2 * l1 + 1)), m)
      else:
        expect, src_m = (np.sign(m) * abs(m) / np.sqrt(l1 * (l1 + 1)), -m)
      if abs(src_m) > l1 or expect == 0:
        assert w == 0
      else:
        assert src == l1 * l1 + src_m + l1
        assert abs(w - expect) < 1e-12
    start += 2 * l3 + 1


@pytest.mark.parametrize("lmax", [1, 2, 3, 4])
def test_rotate_sparse_rotate_back_equals_dense_cg(lmax):
  rng = np.random.default_rng(lmax)
  h = rng.normal(size=(64, (lmax + 1) ** 2, 3))
  p = rng.normal(size=(64, 3)) * 3
  p[0] = [0, 2.5, 0]  # on the polar axis
  p[1] = [0, -1.5, 0]  # on the negative polar axis
  p[2] = 0  # at the origin
  with jax.enable_x64(True):
    sparse = vector_product(jnp.asarray(h), jnp.asarray(p), lmax)
    dense = dense_vector_product(jnp.asarray(h), jnp.asarray(p), lmax)
    sparse, dense = np.asarray(sparse), np.asarray(dense)
  assert np.max(np.abs(sparse - dense)) <= 1e-12 * np.max(np.abs(dense))
  sparse32 = np.asarray(vector_product(jnp.asarray(h, jnp.float32), jnp.asarray(p, jnp.float32), lmax))
  assert np.max(np.abs(sparse32 - dense)) <= 1e-6 * np.max(np.abs(dense))


def test_derivatives_follow_linearity_everywhere():
  """First and second derivatives equal the dense product's, also at p = 0 and on the polar axis."""
  rng = np.random.default_rng(7)
  h = jnp.asarray(rng.normal(size=(4, 9, 2)))
  p = jnp.asarray(np.array([[0.0, 0, 0], [0, 1.5, 0], [0.3, -0.2, 0.9], [0, -2.0, 0]]))
  with jax.enable_x64(True):
    h, p = h.astype(jnp.float64), p.astype(jnp.float64)
    sparse = lambda h, p: jnp.sum(jnp.sin(eaas.vector_product(h, p, 2)))
    dense = lambda h, p: jnp.sum(jnp.sin(eaas.dense_vector_product(h, p, 2)))
    for a, b in zip(jax.jit(jax.grad(sparse, (0, 1)))(h, p), jax.jit(jax.grad(dense, (0, 1)))(h, p)):
      np.testing.assert_allclose(a, b, atol=1e-12)
    hessian_sparse, hessian_dense = jax.jit(jax.hessian(sparse, 1))(h, p), jax.jit(jax.hessian(dense, 1))(h, p)
    np.testing.assert_allclose(hessian_sparse, hessian_dense, atol=1e-12)
    assert np.all(np.isfinite(jax.jit(jax.hessian(sparse, 0))(h, p)))


def test_near_origin_takes_no_branch_and_stays_within_its_bound():
  """Below NEAR_ORIGIN the product is taken as zero (exact at p = 0, at most ~|p| |h| elsewhere); just above it the
  frame gives the dense product; and the program has no branch (padding atoms sit at the origin in every batch,
  so a branch for them was taken on every call)."""
  rng = np.random.default_rng(5)
  h = rng.normal(size=(3, 9, 4))
  direction = np.array([0.6, -0.48, 0.64])
  p = np.stack([np.zeros(3), 0.5 * eaas.NEAR_ORIGIN * direction, 10 * eaas.NEAR_ORIGIN * direction])
  with jax.enable_x64(True):
    sparse = np.asarray(vector_product(jnp.asarray(h), jnp.asarray(p), 2))
    dense = np.asarray(dense_vector_product(jnp.asarray(h), jnp.asarray(p), 2))
    program = str(jax.make_jaxpr(eaas.vector_product, static_argnums=2)(jnp.asarray(h), jnp.asarray(p), 2))
  assert np.all(sparse[:2] == 0)
  assert np.max(np.abs(dense[1])) <= eaas.NEAR_ORIGIN * np.max(np.abs(h))
  np.testing.assert_allclose(sparse[2], dense[2], rtol=0, atol=1e-12 * np.max(np.abs(dense[2])))
  assert "cond" not in program
