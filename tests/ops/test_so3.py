"""Spherical harmonics, Wigner-D matrices and CG coefficients in the authors' e3nn basis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from e2former_jax import so3


def random_rotation(seed):
  return Rotation.random(random_state=seed).as_matrix()


def test_component_harmonics_match_model_md_values():
  """docs/model.md §4: raw vector (0.3, -1.2, 2.0), l=2 block of the component polynomials."""
  with jax.enable_x64(True):
    y = so3.spherical_harmonics(jnp.array([0.3, -1.2, 2.0]), 2, "component", normalize=False)
  np.testing.assert_allclose(y[4:9], [2.3238, -1.3943, -1.3528, -9.2952, 7.5717], atol=1e-4)
  np.testing.assert_allclose(y[1:4], np.sqrt(3) * np.array([0.3, -1.2, 2.0]), atol=1e-12)
  assert y[0] == 1.0


def test_integral_normalisation_and_addition_theorem():
  """Orthonormality implies sum_m Y_lm(a) Y_lm(b) = (2l+1)/(4 pi) P_l(a.b) (scipy's Legendre oracle)."""
  from scipy.special import eval_legendre

  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 3))
  with jax.enable_x64(True):
    ya = np.asarray(so3.spherical_harmonics(jnp.asarray(a), 4, "integral"))
    yb = np.asarray(so3.spherical_harmonics(jnp.asarray(b), 4, "integral"))
  assert abs(ya[0] - 1 / np.sqrt(4 * np.pi)) < 1e-14
  cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
  for l in range(5):
    lhs = float(ya[l * l : (l + 1) ** 2] @ yb[l * l : (l + 1) ** 2])
    assert abs(lhs - (2 * l + 1) / (4 * np.pi) * eval_legendre(l, cos)) < 1e-13


@pytest.mark.parametrize("l", [1, 2, 3, 4])
def test_wigner_d_is_an_orthogonal_representation(l):
  with jax.enable_x64(True):
    r1, r2 = random_rotation(1), random_rotation(2)
    d1, d2, d12 = (so3.wigner_d(jnp.asarray(r), l) for r in (r1, r2, r1 @ r2))
    x = jnp.asarray(np.random.default_rng(l).normal(size=3))
    y = so3.spherical_harmonics(x, l)[l * l :]
    np.testing.assert_allclose(so3.spherical_harmonics(jnp.asarray(r1) @ x, l)[l * l :], d1 @ y, atol=1e-13)
    np.testing.assert_allclose(d1 @ d1.T, np.eye(2 * l + 1), atol=1e-13)
    np.testing.assert_allclose(d12, d1 @ d2, atol=1e-13)


def test_frame_maps_vector_to_y_including_poles_and_origin():
  vectors = np.array([[0.3, -1.2, 2.0], [0, 2.0, 0], [0, -3.0, 0], [1e-9, -1, 0], [0, 0, 0], [-1, 1e-12, 0]])
  with jax.enable_x64(True):
    rot = so3.rotation_to_y(jnp.asarray(vectors))
    np.testing.assert_allclose(np.einsum("nij,nkj->nik", rot, rot), np.broadcast_to(np.eye(3), rot.shape), atol=1e-14)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-14)
    nonzero = np.linalg.norm(vectors, axis=1) > 0
    mapped = np.einsum("nij,nj->ni", rot, vectors)[nonzero]
    np.testing.assert_allclose(mapped, np.linalg.norm(vectors[nonzero], axis=1)[:, None] * [0, 1, 0], atol=1e-12)
    # D Y(u) = Y(y): only the m = 0 entry of each degree survives (docs/model.md §10).
    d = so3.block_diagonal_wigner(rot[0], (0, 1, 2))
    np.testing.assert_allclose(
      d @ so3.spherical_harmonics(jnp.asarray(vectors[0]), 2),
      so3.spherical_harmonics(jnp.array([0.0, 1.0, 0.0]), 2),
      atol=1e-13,
    )


def test_clebsch_gordan_intertwines_rotations():
  with jax.enable_x64(True):
    rot = jnp.asarray(random_rotation(3))
    for l1, l2, l3 in [(1, 1, 0), (1, 1, 2), (2, 1, 1), (2, 1, 2), (2, 2, 2), (3, 1, 4)]:
      c = so3.clebsch_gordan(l1, l2, l3)
      d1, d2, d3 = (np.asarray(so3.wigner_d(rot, l)) for l in (l1, l2, l3))
      lhs = np.einsum("ijk,ia,jb->abk", c, d1, d2)
      rhs = np.einsum("abc,kc->abk", c, d3)
      np.testing.assert_allclose(lhs, rhs, atol=1e-12)


@pytest.mark.parametrize("normalization", ["component", "integral"])
def test_harmonics_equal_e3x_in_the_e3nn_axes(normalization):
  """Our polynomial evaluation of e3x's table equals e3x's own spherical_harmonics at the permuted vector (e3x's
  z is e3nn's y), up to float64 round-off, for degrees 0..6, raw vectors, the origin, and their gradients."""
  import e3x

  rng = np.random.default_rng(7)
  vectors = np.concatenate([rng.normal(size=(64, 3)) * 3.0, np.eye(3), -np.eye(3)])
  lmax = 6
  degrees = so3.degree_of_rows(lmax)
  scale = np.sqrt(2 * degrees + 1.0) if normalization == "component" else np.sqrt((2 * degrees + 1.0) / (4 * np.pi))
  with jax.enable_x64(True):

    def theirs(v):
      return e3x.so3.spherical_harmonics(v[..., [2, 0, 1]], lmax, cartesian_order=False, normalization="racah") * scale

    def ours(v):
      return so3.spherical_harmonics(v, lmax, normalization)

    v = jnp.asarray(vectors)
    np.testing.assert_allclose(ours(v), theirs(v), atol=1e-12)
    jac_ours = jax.vmap(jax.jacobian(ours))(v)
    jac_theirs = jax.vmap(jax.jacobian(theirs))(v)
    np.testing.assert_allclose(jac_ours, jac_theirs, atol=1e-11)
    origin = so3.spherical_harmonics(jnp.zeros(3), lmax, normalization)
    np.testing.assert_allclose(origin, np.where(degrees == 0, scale, 0.0), atol=0)
    assert np.all(np.isfinite(jax.jacobian(ours)(jnp.zeros(3))))


@pytest.mark.parametrize("rows", [[2, 0, 0, 0, 3, 0, 1, 5, 6, 7, 8, 4], [4, 5, 6], [7]])
def test_rows_at_equals_the_gather_and_transposes_without_a_scatter(rows):
  """Fixed rows in any order, repeated, in contiguous runs or alone: the values and the gradient of an indexed
  gather, and a backward pass with no scatter (whose zero-filled operand XLA may hold from the start of the
  program)."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 9, 4)), jnp.float32)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(len(rows), 4)), jnp.float32)
  np.testing.assert_array_equal(so3.rows_at(x, rows), x[..., np.asarray(rows), :])

  def loss(take):
    return lambda x: jnp.sum(jnp.sin(take(x)) * weights)

  ours = loss(lambda x: so3.rows_at(x, rows))
  gathered = loss(lambda x: x[..., np.asarray(rows), :])
  np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(gathered)(x), rtol=1e-6, atol=1e-7)
  primitives = {eqn.primitive.name for eqn in jax.make_jaxpr(jax.grad(ours))(x).eqns}
  assert not {p for p in primitives if "scatter" in p}, primitives
  assert {p for p in (eqn.primitive.name for eqn in jax.make_jaxpr(jax.grad(gathered))(x).eqns) if "scatter" in p}
