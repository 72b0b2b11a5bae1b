"""Edge geometry shared by all layers: per-slot vectors and distances, cutoff envelope, radial basis parameters."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from e2former_jax.config import ModelConfig
from e2former_jax.graph import AtomGraph


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["vectors", "distance", "valid", "envelope"],
  meta_fields=["basis"],
)
@dataclasses.dataclass(frozen=True)
class EdgeGeometry:
  """Per-slot geometry shared by all layers.

  Attributes:
    vectors: [N, K, 3] r_ij = p_i - (p_j + shift), target minus source (Angstrom).
    distance: [N, K] |r_ij| (Angstrom; 1 where not valid, so divisions stay finite).
    valid: [N, K] slot holds a neighbour within the cutoff.
    envelope: [N, K] phi(|r_ij|), 0 where not valid.
    basis: (cutoff, num_basis, width) of the Gaussian radial basis (static).
  """

  vectors: jax.Array
  distance: jax.Array
  valid: jax.Array
  envelope: jax.Array
  basis: tuple[float, int, float]


def polynomial_envelope(distance: jax.Array, cutoff: float) -> jax.Array:
  """phi(d) = max(1 - 6 t^5 + 15 t^4 - 10 t^3, 0), t = d / cutoff (the ``e2formerv2`` branch)."""
  t = distance / cutoff
  return jnp.maximum(1 - 6 * t**5 + 15 * t**4 - 10 * t**3, 0.0)


def main_envelope(distance: jax.Array, cutoff: float) -> jax.Array:
  """phi(d) = 1 - 21 t^5 + 35 t^6 - 15 t^7 for t = d / cutoff < 1, else 0 (the authors' ``main`` branch: the
  polynomial envelope of exponent p = 5, 1 - (p+1)(p+2)/2 t^p + p(p+2) t^(p+1) - p(p+1)/2 t^(p+2))."""
  t = distance / cutoff
  return jnp.where(t < 1, 1 + t**5 * (-21 + t * (35 - 15 * t)), 0.0)


ENVELOPES = {"e2formerv2": polynomial_envelope, "main": main_envelope}


def cutoff_envelope(distance: jax.Array, cutoff: float, kind: str) -> jax.Array:
  """The envelope ``ModelConfig.envelope`` names, phi(d) in [0, 1]."""
  return ENVELOPES[kind](distance, cutoff)


def edge_geometry(graph: AtomGraph, cfg: ModelConfig) -> EdgeGeometry:
  """Per-slot vectors, distances, validity, envelope and radial basis parameters of a padded graph."""
  vectors = graph.positions[:, None, :] - graph.positions[graph.neighbors] - graph.neighbor_shift
  squared = jnp.sum(vectors**2, axis=-1)
  valid = graph.neighbor_mask & (squared <= cfg.cutoff**2) & (squared > 0)
  distance = jnp.sqrt(jnp.where(valid, squared, 1.0))
  envelope = jnp.where(valid, cutoff_envelope(distance, cfg.cutoff, cfg.envelope), 0.0)
  basis = (cfg.cutoff, cfg.num_basis, cfg.basis_width)
  return EdgeGeometry(vectors=vectors, distance=distance, valid=valid, envelope=envelope, basis=basis)
