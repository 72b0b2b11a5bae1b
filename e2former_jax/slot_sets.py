"""Slot sets the model derives on the device from all atom pairs of each structure (molecules only).

Two options of the authors' code need neighbours that the graph's K-nearest-within-cutoff list does not hold:

* the long-range blocks (``ModelConfig.long_range_layers``, the authors' ``with_cluster='node'``) attend over a
  second list: for every atom, the ``long_range_max_neighbors`` nearest atoms of its structure with
  ``long_range_min_distance <= d <= long_range_cutoff``, hydrogens excluded as sources;
* the ``e2formerv2`` softmax (``softmax_max="e2formerv2"``) takes its shift over the K_s = min(K, largest
  in-cutoff count of the structure) nearest atoms, beyond-cutoff ones included (``e2formerv2_shift_slots``).

Both are computed from the dense [N, N] distance matrix of the padded batch (pairs of different structures
excluded): O(N^2) time and memory, meant for molecules of up to a few thousand atoms. Periodic structures are
refused (the authors expand periodic images for these lists; this project does not reproduce that).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from e2former_jax.attention import ShiftSlots
from e2former_jax.config import ModelConfig
from e2former_jax.geometry import EdgeGeometry, cutoff_envelope
from e2former_jax.graph import AtomGraph

HYDROGEN = 1
MIN_DISTANCE = 1e-4  # Angstrom: the authors' neighbour search drops pairs closer than this (an atom itself)


def refuse_periodic(graph: AtomGraph, option: str) -> None:
  """Raises ``ValueError`` for a periodic batch: ``option`` builds its slots from the atoms of the cell only."""
  if graph.periodic:
    raise ValueError(
      f"{option} is implemented for molecules only (its slots come from all pairs of atoms of a structure, "
      "without periodic images); this batch holds a periodic structure"
    )


def pair_distances(graph: AtomGraph) -> tuple[jax.Array, jax.Array]:
  """Squared distances [N, N] (Angstrom^2, no gradient) and the mask of pairs of real atoms of one structure."""
  positions = jax.lax.stop_gradient(graph.positions)
  squared = jnp.sum((positions[:, None, :] - positions[None, :, :]) ** 2, axis=-1)
  real = graph.atom_mask[:, None] & graph.atom_mask[None, :]
  return squared, real & (graph.graph_index[:, None] == graph.graph_index[None, :])


def nearest(squared: jax.Array, allowed: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The k nearest allowed atoms of every atom, nearest first: indices [N, k'] and found [N, k'], k' = min(k, N)."""
  key = jnp.where(allowed, squared, jnp.inf)
  negative, index = jax.lax.top_k(-key, min(k, squared.shape[0]))
  return index, negative > -jnp.inf


def slot_geometry(
  graph: AtomGraph, neighbors: jax.Array, valid: jax.Array, cutoff: float, cfg: ModelConfig, envelope: bool
) -> EdgeGeometry:
  """``EdgeGeometry`` of explicit slots (no periodic shifts): the basis on [0, cutoff] with ``cfg.num_basis``
  Gaussians, the envelope ``cfg.envelope`` of ``cutoff`` where ``envelope`` (else zero)."""
  vectors = graph.positions[:, None, :] - graph.positions[neighbors]
  squared = jnp.sum(vectors**2, axis=-1)
  distance = jnp.sqrt(jnp.where(valid, squared, 1.0))
  phi = jnp.where(valid, cutoff_envelope(distance, cutoff, cfg.envelope), 0.0) if envelope else jnp.zeros_like(distance)
  basis = (cutoff, cfg.num_basis, cfg.basis_width)
  return EdgeGeometry(vectors=vectors, distance=distance, valid=valid, envelope=phi, basis=basis)


def long_range_slots(graph: AtomGraph, cfg: ModelConfig) -> tuple[jax.Array, EdgeGeometry]:
  """The long-range list: neighbours [N, K_l] and their geometry (basis and envelope on [0, long_range_cutoff]).

  Sources: real atoms of the same structure other than hydrogen, at long_range_min_distance <= d <=
  long_range_cutoff; the K_l = long_range_max_neighbors nearest (all of them when fewer).
  """
  refuse_periodic(graph, "long_range_layers > 0")
  squared, same = pair_distances(graph)
  low, high = cfg.long_range_min_distance, cfg.long_range_cutoff
  allowed = same & (graph.numbers[None, :] != HYDROGEN) & (squared >= low**2) & (squared <= high**2)
  neighbors, found = nearest(squared, allowed, cfg.long_range_max_neighbors)
  return neighbors, slot_geometry(graph, neighbors, found, high, cfg, envelope=True)


def e2formerv2_shift_slots(graph: AtomGraph, geometry: EdgeGeometry, cfg: ModelConfig) -> ShiftSlots:
  """The beyond-cutoff slots of the ``e2formerv2`` branch's slot set, whose logits enter only the softmax max.

  That branch gives every atom of a batch the K_s = min(K, largest in-cutoff count) nearest other atoms; the
  in-cutoff ones are this model's valid slots, the others are returned here (valid where they take part).
  K_s is taken per structure (the authors' batch of one structure, as their calculator runs).
  """
  refuse_periodic(graph, "softmax_max='e2formerv2'")
  counts = jnp.sum(geometry.valid, axis=1)
  largest = jax.ops.segment_max(counts, graph.graph_index, graph.num_graphs)[graph.graph_index]
  squared, same = pair_distances(graph)
  neighbors, found = nearest(squared, same & (squared >= MIN_DISTANCE**2), cfg.max_neighbors)
  rank = jnp.arange(neighbors.shape[1])
  beyond = jnp.sum((graph.positions[:, None, :] - graph.positions[neighbors]) ** 2, axis=-1) > cfg.cutoff**2
  valid = found & (rank[None, :] < jnp.maximum(largest, 1)[:, None]) & beyond
  return ShiftSlots(neighbors=neighbors, geometry=slot_geometry(graph, neighbors, valid, cfg.cutoff, cfg, False))
