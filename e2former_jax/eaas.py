"""Equivariant axis-aligned sparsification (EAAS) of the product with an l=1 vector (docs/model.md §10).

In the frame where the vector p lies along +y, the Clebsch-Gordan product (h (x) p)^{l3} has exactly one
non-zero coefficient per output entry, so the dense contraction becomes a gather and a scale ("parity
re-indexing"). ``eaas_table`` generates that table from the CG coefficients for any lmax; ``vector_product``
rotates h into the frame of p and applies the table, folded into the rotation back (docs/model.md §10).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from e2former_jax import so3

_Y = 1  # index of the y component inside the (x, y, z)-ordered l=1 block


@dataclasses.dataclass(frozen=True)
class EAASTable:
  """Sparse parity re-indexing table for all paths l1 -> l3 (l1, l3 <= lmax) of h (x) vector.

  Attributes:
    lmax: maximum degree of input and output.
    paths: (l1, l3) pairs in output order: sorted stably by l3, ascending l1 inside each l3.
    source_row: [R] input row (l1^2 + m1 + l1) feeding each output row; 0 where the weight is 0.
    weight: [R] float64 CG coefficient C^{l3 m3}_{l1 m1, 1 0} (vector along +y).
    output_degrees: degree l3 of each path (the blocks of the inverse rotation).
  """

  lmax: int
  paths: tuple[tuple[int, int], ...]
  source_row: np.ndarray
  weight: np.ndarray
  output_degrees: tuple[int, ...]

  @property
  def num_output_rows(self) -> int:
    return len(self.weight)

  def rows_of_degree(self, l3: int) -> list[np.ndarray]:
    """For each path ending in degree l3 (in order), the indices of its 2*l3+1 output rows."""
    out, start = [], 0
    for _, lo in self.paths:
      if lo == l3:
        out.append(np.arange(start, start + 2 * lo + 1))
      start += 2 * lo + 1
    return out


@functools.cache
def eaas_table(lmax: int) -> EAASTable:
  """Generates the EAAS table from the real-basis CG coefficients (never typed in)."""
  paths = tuple(
    sorted(
      ((l1, l3) for l3 in range(lmax + 1) for l1 in range(lmax + 1) if abs(l1 - 1) <= l3 <= l1 + 1), key=lambda p: p[1]
    )
  )
  rows, weights = [], []
  for l1, l3 in paths:
    column = so3.clebsch_gordan(l1, 1, l3)[:, _Y, :]  # [2l1+1, 2l3+1]
    for m3 in range(2 * l3 + 1):
      nonzero = np.flatnonzero(np.abs(column[:, m3]) > 1e-12)
      if len(nonzero) > 1:
        raise AssertionError(f"path {l1}->{l3}, m3={m3 - l3}: not axis-aligned sparse")
      if len(nonzero) == 0:
        rows.append(0)
        weights.append(0.0)
      else:
        rows.append(l1 * l1 + int(nonzero[0]))
        weights.append(float(column[nonzero[0], m3]))
  return EAASTable(
    lmax=lmax,
    paths=paths,
    source_row=np.array(rows, np.int32),
    weight=np.array(weights, np.float64),
    output_degrees=tuple(l3 for _, l3 in paths),
  )


@functools.cache
def dense_vector_coupling(lmax: int) -> np.ndarray:
  """Dense CG tensor T [(lmax+1)^2, 3, R] in the EAAS output layout: out_o = sum T[r, a, o] h_r p_a."""
  table = eaas_table(lmax)
  t = np.zeros((so3.num_rows(lmax), 3, table.num_output_rows))
  start = 0
  for l1, l3 in table.paths:
    t[l1 * l1 : (l1 + 1) ** 2, :, start : start + 2 * l3 + 1] = so3.clebsch_gordan(l1, 1, l3)
    start += 2 * l3 + 1
  return t


def dense_vector_product(h: jax.Array, vectors: jax.Array, lmax: int) -> jax.Array:
  """h (x) vector by the explicit CG contraction (50 non-zeros for lmax 2): the reference for EAAS.

  Args:
    h: [..., (lmax+1)^2, C] spherical features.
    vectors: [..., 3] vectors (Angstrom).
  Returns:
    [..., R, C] in the EAAS output layout.
  """
  t = jnp.asarray(dense_vector_coupling(lmax), h.dtype)
  return jnp.einsum("rao,...rc,...a->...oc", t, h, vectors, precision=jax.lax.Precision.HIGHEST)


def axis_weighted_product(h_per_axis: jax.Array, lmax: int) -> jax.Array:
  """sum_a h^a (x) e_a for features weighted by the Cartesian components of a vector, [..., 3, rows, C].

  With h^a = sum_j w_j s_ja h_j this equals sum_j w_j (h_j (x) s_j): the periodic-image term of the
  node-centric message, where s_j are image offsets.
  """
  t = jnp.asarray(dense_vector_coupling(lmax), h_per_axis.dtype)
  return jnp.einsum("rao,...arc->...oc", t, h_per_axis, precision=jax.lax.Precision.HIGHEST)


@functools.cache
def sparse_matrix(lmax: int) -> np.ndarray:
  """The parity re-indexing as a matrix S [R, rows] (float64): S[o, source_row[o]] = weight[o], one entry per row."""
  table = eaas_table(lmax)
  matrix = np.zeros((table.num_output_rows, so3.num_rows(lmax)))
  matrix[np.arange(table.num_output_rows), table.source_row] = table.weight
  return matrix


NEAR_ORIGIN = 1e-8  # Angstrom; below this |p| the product (at most ~|p| |h|) is taken as zero.


def _eaas_forward(h: jax.Array, vectors: jax.Array, lmax: int) -> jax.Array:
  table = eaas_table(lmax)
  squared = jnp.sum(vectors**2, axis=-1, keepdims=True)
  near_origin = squared < NEAR_ORIGIN**2
  # Vectors at the origin get a stand-in frame, so that every derivative stays finite, and a zero length: their
  # product is exactly zero at p = 0 and below 1e-8 |h| elsewhere in that ball, under the float32 round-off of
  # the product with any vector longer than 0.2 A. No branch: one pass over every atom whatever the positions.
  safe = jnp.where(near_origin, jnp.array([0.0, 1.0, 0.0], vectors.dtype), vectors)
  rotation = so3.rotation_to_y(safe)
  d_in = so3.block_diagonal_wigner(rotation, tuple(range(lmax + 1)))
  d_out = so3.block_diagonal_wigner(rotation, table.output_degrees)
  hp = jax.lax.Precision.HIGHEST
  aligned = jnp.einsum("...ij,...jc->...ic", d_in, h, precision=hp)
  # D_out^T (S h') as (D_out^T S) h': the re-indexing applied to the [R, R] rotation, not to the [rows, C]
  # features, leaves one [R, rows] x [rows, C] product per atom whose transpose is a product as well.
  length = jnp.where(near_origin, 0.0, jnp.sqrt(jnp.sum(safe**2, axis=-1, keepdims=True)))[..., None]
  back = jnp.einsum("...oi,or->...ir", d_out, jnp.asarray(sparse_matrix(lmax), h.dtype), precision=hp) * length
  return jnp.einsum("...ir,...rc->...ic", back, aligned, precision=hp)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def vector_product(h: jax.Array, vectors: jax.Array, lmax: int) -> jax.Array:
  """h (x) vector with EAAS: rotate h into the frame where the vector is +y, gather and scale, rotate back.

  Args:
    h: [..., (lmax+1)^2, C] spherical features.
    vectors: [..., 3] one vector per leading index (Angstrom).
    lmax: maximum degree.
  Returns:
    [..., R, C], R = ``eaas_table(lmax).num_output_rows`` (20 for lmax 2).

  Derivatives use the linearity in each argument (docs/model.md §10): d(h (x) p) = dh (x) p + h (x) dp, the first
  term by EAAS in the same frame, the second by the dense CG product, so first derivatives never pass
  through the frame. (JAX drops custom rules inside linearised tangents, so forward-over-reverse
  derivatives in p do go through the frame; it is smooth except at p = 0.)
  """
  return _eaas_forward(h, vectors, lmax)


@vector_product.defjvp
def _vector_product_jvp(lmax, primals, tangents):
  h, vectors = primals
  dh, dvectors = tangents
  out = vector_product(h, vectors, lmax)
  return out, vector_product(dh, vectors, lmax) + dense_vector_product(h, dvectors, lmax)
