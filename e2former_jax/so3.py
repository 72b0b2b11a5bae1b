"""SO(3) machinery in the authors' (e3nn) real basis: spherical harmonics, Wigner-D matrices, CG coefficients.

Convention (docs/model.md §4): rows are indexed l^2 + (m + l); the real basis is e3nn's, with y as the
polar axis and the l=1 block ordered (x, y, z). It equals e3x's real basis (z polar, m = -l..l, no
Condon-Shortley phase) evaluated at the cyclically permuted vector (z, x, y). That permutation is a proper
rotation, so Clebsch-Gordan coefficients are the same numbers in both bases; ``tests/ops/test_so3.py`` checks
the basis change against the values of docs/model.md §4.
"""

from __future__ import annotations

import contextlib
import functools

import e3x
import jax
import jax.numpy as jnp
import numpy as np
from e3x.so3._spherical_harmonics_lut import (
  _generate_spherical_harmonics_lookup_table,
)  # tested against e3x's public function


def num_rows(lmax: int) -> int:
  return (lmax + 1) ** 2


def host_tables():
  """Context for the numpy tables computed with JAX (CG coefficients): their eager operations run
  on the CPU backend when there is one, so a GPU process does not compile dozens of one-off programs for the
  GPU while the model is first traced. The tables leave as numpy arrays."""
  try:
    cpu = jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu
    return contextlib.nullcontext()
  return jax.default_device(cpu)


def degree_of_rows(lmax: int) -> np.ndarray:
  """[(lmax+1)^2] degree l of every row."""
  return np.concatenate([np.full(2 * l + 1, l) for l in range(lmax + 1)])


def rows_at(x: jax.Array, rows) -> jax.Array:
  """``x[..., rows, :]`` for fixed row indices, as slices of contiguous runs put together.

  The same values as an indexed gather, but its transpose pads and adds the cotangent's slices where a gather's
  scatters it into an array of zeros; XLA may create such a zero array, for every block at once, at the start
  of the program and hold it until its scatter runs (docs/performance.md, memory).

  Args:
    x: [..., rows_in, C].
    rows: host integers, each in [0, rows_in).
  Returns:
    [..., len(rows), C].
  """
  runs: list[list[int]] = []
  for row in map(int, rows):
    if runs and runs[-1][1] == row:
      runs[-1][1] += 1
    else:
      runs.append([row, row + 1])
  parts = [x[..., start:stop, :] for start, stop in runs]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-2)


@functools.cache
def _harmonic_polynomials(lmax: int, normalization: str) -> tuple[np.ndarray, np.ndarray]:
  """The real spherical harmonics up to degree ``lmax`` as polynomials of the unit vector's (x, y, z) in the e3nn
  basis: exponents [M, 3] (int) of the M Cartesian monomials x^a y^b z^c with a + b + c <= lmax, and
  coefficients [M, (lmax+1)^2] (float64) of each harmonic, ``normalization`` included.

  From e3x's table (z polar, Racah normalisation), with its axes renamed to e3nn's (e3x's x, y, z are e3nn's
  z, x, y) and the normalisation folded in, so evaluating the harmonics needs no table work while a model is
  traced. ``tests/ops/test_so3.py`` checks the result against e3x's own ``spherical_harmonics``.
  """
  table = _generate_spherical_harmonics_lookup_table(lmax)
  exponents = np.asarray(table["ls"])[:, [1, 2, 0]]
  degrees = degree_of_rows(lmax)
  scale = 2 * degrees + 1.0 if normalization == "component" else (2 * degrees + 1.0) / (4 * np.pi)
  return exponents, np.asarray(table["cm"], np.float64) * np.sqrt(scale)


def spherical_harmonics(
  vectors: jax.Array, lmax: int, normalization: str = "component", normalize: bool = True
) -> jax.Array:
  """Real spherical harmonics Y_lm in the e3nn basis, [..., (lmax+1)^2].

  Args:
    vectors: [..., 3] Cartesian vectors.
    lmax: maximum degree.
    normalization: "component" (Y_0 = 1, Y_1 = sqrt(3) u, sum_m Y_lm^2 = 2l+1) or "integral"
      (orthonormal on the sphere, Y_0 = 1/sqrt(4 pi)).
    normalize: evaluate on the unit vector u = v/|v| (True) or on the raw vector, so that degree l scales
      as |v|^l (False; the ``QKdotS`` gate uses this). A zero vector gives Y_0 and zeros.

  The polynomial is evaluated in true float32 (or the input's type) whatever JAX's default matmul precision.
  """
  if normalization not in ("component", "integral"):
    raise ValueError(f"normalization must be 'component' or 'integral', got {normalization!r}")
  exponents, coefficients = _harmonic_polynomials(lmax, normalization)
  squared = jnp.sum(vectors**2, axis=-1, keepdims=True)
  nonzero = squared > 0
  norm = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squared, 1.0)), 0.0)  # finite gradient at 0
  unit = jnp.where(nonzero, vectors / jnp.where(nonzero, norm, 1.0), 0.0)
  # u_a^0 .. u_a^lmax by repeated products (no pow: its gradient is NaN at 0), [..., lmax+1, 3]
  powers = jnp.cumprod(
    jnp.concatenate([jnp.ones_like(unit[..., None, :]), jnp.repeat(unit[..., None, :], lmax, -2)], -2), -2
  )
  monomials = powers[..., exponents[:, 0], 0] * powers[..., exponents[:, 1], 1] * powers[..., exponents[:, 2], 2]
  out = jnp.einsum(
    "...m,mr->...r", monomials, jnp.asarray(coefficients, unit.dtype), precision=jax.lax.Precision.HIGHEST
  )
  if not normalize:
    out = out * jnp.concatenate([norm**l * jnp.ones((2 * l + 1,), out.dtype) for l in range(lmax + 1)], -1)
  return out


CLEBSCH_GORDAN_MIN_DEGREE = 4  # one read of e3x's table file covers every degree the model couples


@functools.cache
def _clebsch_gordan_table(max_degree: int) -> np.ndarray:
  """e3x's coefficients for all degrees up to ``max_degree`` [(L+1)^2, (L+1)^2, (L+1)^2] (float64). e3x reads its
  whole table file for every call, so it is read once here and sliced."""
  with host_tables(), jax.ensure_compile_time_eval(), jax.enable_x64(True):
    cg = e3x.so3.clebsch_gordan(max_degree, max_degree, max_degree, cartesian_order=False)
    return np.asarray(cg, dtype=np.float64)


def clebsch_gordan(l1: int, l2: int, l3: int) -> np.ndarray:
  """Real-basis Clebsch-Gordan coefficients C[m1, m2, m3] (float64, unitary normalisation).

  (a (x) b)^{l3}_{m3} = sum_{m1, m2} C[m1, m2, m3] a^{l1}_{m1} b^{l2}_{m2}, with the l=1 block in (x, y, z)
  order, the authors' ``wigner_3j_wonorm``.
  """
  table = _clebsch_gordan_table(max(l1, l2, l3, CLEBSCH_GORDAN_MIN_DEGREE))
  return table[l1 * l1 : (l1 + 1) ** 2, l2 * l2 : (l2 + 1) ** 2, l3 * l3 : (l3 + 1) ** 2].copy()


@functools.cache
def _sample_inverse(l: int) -> tuple[np.ndarray, np.ndarray]:
  """Fixed sample directions X [P, 3] and pinv(Y_l(X)) [2l+1, P] for fitting Wigner-D matrices."""
  rng = np.random.default_rng(1234 + l)
  points = rng.normal(size=(4 * l + 4, 3))
  points /= np.linalg.norm(points, axis=1, keepdims=True)
  exponents, coefficients = _harmonic_polynomials(l, "component")
  ys = (np.prod(points[:, None, :] ** exponents, axis=-1) @ coefficients)[:, l * l :]  # on the host, float64
  return points, np.linalg.pinv(ys)


def wigner_d(rotation: jax.Array, l: int) -> jax.Array:
  """Wigner-D matrix D^l(R), [..., 2l+1, 2l+1], with Y_l(R u) = D^l(R) Y_l(u).

  Polynomial in the entries of R (no Euler angles), so it is smooth everywhere.
  """
  if l == 0:
    return jnp.ones(rotation.shape[:-2] + (1, 1), rotation.dtype)
  points, pinv = _sample_inverse(l)
  hp = jax.lax.Precision.HIGHEST
  rotated = jnp.einsum("...ij,pj->...pi", rotation, jnp.asarray(points, rotation.dtype), precision=hp)
  ys = spherical_harmonics(rotated, l, normalize=False)[..., l * l :]
  return jnp.einsum("...pm,np->...mn", ys, jnp.asarray(pinv, rotation.dtype), precision=hp)


def rotation_to_y(vectors: jax.Array) -> jax.Array:
  """A rotation R [..., 3, 3] with R v/|v| = +y (the EAAS frame of docs/model.md §10).

  Rotates about v x y; where v points into the lower half-space it first aligns v with -y and then turns
  by pi about z, so the formula never divides by a small 1 + cos. A zero vector gives the identity.
  The roll about y is arbitrary: EAAS results do not depend on it.
  """
  squared = jnp.sum(vectors**2, axis=-1, keepdims=True)
  nonzero = squared > 0
  u = jnp.where(
    nonzero, vectors * jax.lax.rsqrt(jnp.where(nonzero, squared, 1.0)), jnp.array([0.0, 1.0, 0.0], vectors.dtype)
  )
  flip = u[..., 1:2] < 0
  target_y = jnp.where(flip, -1.0, 1.0)
  # k = u x (target_y * y); R = I + [k]x + [k]x^2 / (1 + u . target)
  ux, uy, uz = u[..., 0], u[..., 1], u[..., 2]
  t = target_y[..., 0]
  kx, ky, kz = -uz * t, jnp.zeros_like(ux), ux * t
  zero = jnp.zeros_like(ux)
  k_cross = jnp.stack(
    [jnp.stack([zero, -kz, ky], -1), jnp.stack([kz, zero, -kx], -1), jnp.stack([-ky, kx, zero], -1)], -2
  )
  c = uy * t
  eye = jnp.eye(3, dtype=vectors.dtype)
  rot = eye + k_cross + jnp.matmul(k_cross, k_cross, precision=jax.lax.Precision.HIGHEST) / (1.0 + c)[..., None, None]
  turn = jnp.diag(jnp.array([-1.0, -1.0, 1.0], vectors.dtype))
  return jnp.where(flip[..., None], jnp.matmul(turn, rot, precision=jax.lax.Precision.HIGHEST), rot)


def block_diagonal_wigner(rotation: jax.Array, degrees) -> jax.Array:
  """Block-diagonal Wigner-D [..., R, R] with one block per entry of ``degrees`` (in that order)."""
  blocks = {l: wigner_d(rotation, l) for l in set(degrees)}
  size = sum(2 * l + 1 for l in degrees)
  out = jnp.zeros(rotation.shape[:-2] + (size, size), rotation.dtype)
  start = 0
  for l in degrees:
    out = out.at[..., start : start + 2 * l + 1, start : start + 2 * l + 1].set(blocks[l])
    start += 2 * l + 1
  return out
