"""Energies, forces and stress of a model, and the model split into what training and evaluation pass through
``jax.jit`` (graph definition, parameters, element energies, constant tables)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from e2former_jax.config import ModelConfig
from e2former_jax.graph import AtomGraph
from e2former_jax.model import E2Former, ElementEnergy


def split_model(model: E2Former):
  """(graphdef, params, element energies, constants) of a model."""
  return nnx.split(model, nnx.Param, ElementEnergy, ...)


@functools.cache
def model_template(cfg: ModelConfig, x64: bool):
  """The graph definition and constant index tables of a model of this config; its parameters are dropped. A
  real model is built because ``nnx.eval_shape`` would turn the numpy tables into shapes. ``x64``: whether
  64-bit JAX was on (the tables' integer type follows it, so a template is kept per setting)."""
  graphdef, _, _, constants = split_model(E2Former(cfg, rngs=nnx.Rngs(0)))
  return graphdef, constants


def merge_model(cfg: ModelConfig, params, elements) -> E2Former:
  """The model of config ``cfg`` with these parameters and element energies (inside or outside ``jit``)."""
  graphdef, constants = model_template(cfg, bool(jax.config.jax_enable_x64))
  return nnx.merge(graphdef, params, elements, constants)


def total_energy(
  model: E2Former, graph: AtomGraph, return_attention: bool = False, head: str | None = None
) -> tuple[jax.Array, dict]:
  """Energies [G] (eV, 0 for padding structures) of head ``head`` (None: the default) and the per-atom outputs."""
  out = model(graph, return_attention, head=head)
  energy = jax.ops.segment_sum(out["atom_energy"], graph.graph_index, graph.num_graphs)
  return jnp.where(graph.graph_mask, energy, 0.0), out


def strained(graph: AtomGraph, strain: jax.Array) -> AtomGraph:
  """The graph deformed by (I + strain[g]) per structure: positions, image offsets and cells."""
  per_atom = strain[graph.graph_index]
  hp = jax.lax.Precision.HIGHEST
  return graph.replace(
    positions=graph.positions + jnp.einsum("ni,nij->nj", graph.positions, per_atom, precision=hp),
    neighbor_shift=graph.neighbor_shift + jnp.einsum("nki,nij->nkj", graph.neighbor_shift, per_atom, precision=hp),
    cell=graph.cell + jnp.einsum("gai,gij->gaj", graph.cell, strain, precision=hp),
  )


def periodic_projector(cell: jax.Array, pbc: jax.Array) -> jax.Array:
  """[G, 3, 3] orthogonal projector onto the span of each structure's periodic lattice vectors (the identity for
  a fully periodic cell, the plane of a slab's two periodic vectors, zero for a molecule)."""
  lattice = jnp.where(pbc[..., None], cell, 0.0)  # rows of free directions dropped
  return jnp.matmul(jnp.linalg.pinv(lattice), lattice, precision=jax.lax.Precision.HIGHEST)


def predict(model: E2Former, graph: AtomGraph, compute_stress: bool = False, head: str | None = None) -> dict:
  """Energies, forces and (optionally) stress of a padded batch, from head ``head`` (None: the default head).

  Returns:
    "energy": [G] eV; "energy_above_reference": [G] eV, the energy less the structure's element reference
    energies (``total_energy_float64`` adds them on the host); "forces": [N, 3] eV/A (conservative -dE/dx, or
    the direct head);
    with ``compute_stress`` also "stress": [G, 3, 3] eV/A^3 (1/V dE/d strain with V = |det(cell)|; for a
    structure periodic along some lattice vectors only, such as a slab, its components within the span of
    those vectors, P (1/V dE/d strain) P with P the projector onto that span; zero for molecules and for cells
    of zero volume) and "virial": [G, 3, 3] eV (-dE/d strain).
  """
  strain = jnp.zeros((graph.num_graphs, 3, 3), graph.positions.dtype)

  def energy_of(positions, strain):
    energy, out = total_energy(model, strained(graph.replace(positions=positions), strain), head=head)
    return jnp.sum(energy), (energy, out)

  if model.config.forces == "conservative" or compute_stress:
    argnums = (0, 1) if compute_stress else (0,)
    grads, (energy, out) = jax.grad(energy_of, argnums=argnums, has_aux=True)(graph.positions, strain)
  else:
    _, (energy, out) = energy_of(graph.positions, strain)
    grads = None
  above = jax.ops.segment_sum(out["atom_energy_above_reference"], graph.graph_index, graph.num_graphs)
  result = {"energy": energy, "energy_above_reference": jnp.where(graph.graph_mask, above, 0.0)}
  if model.config.forces == "conservative":
    result["forces"] = jnp.where(graph.atom_mask[:, None], -grads[0], 0.0)
  else:
    result["forces"] = out["direct_forces"]
  if compute_stress:
    d_strain = 0.5 * (grads[1] + grads[1].swapaxes(1, 2))
    volume = jnp.abs(jnp.linalg.det(graph.cell))
    periodic = jnp.any(graph.pbc, axis=-1) & graph.graph_mask & (volume > 0)
    p = periodic_projector(graph.cell, graph.pbc)
    result["virial"] = -d_strain
    result["stress"] = jnp.where(
      periodic[:, None, None],
      jnp.einsum("gij,gjk,gkl->gil", p, d_strain, p, precision=jax.lax.Precision.HIGHEST)
      / jnp.where(periodic, volume, 1.0)[:, None, None],
      0.0,
    )
  return result


def reference_table(model: E2Former, head: str | None = None) -> np.ndarray:
  """Head ``head``'s element reference energies by atomic number, float64 (eV)."""
  return np.asarray(model.head(head).element_energy[...], np.float64)


def total_energy_float64(energy_above_reference: float, numbers: np.ndarray, table: np.ndarray) -> float:
  """One structure's energy (eV) with its element references summed on the host in float64.

  The element references of a model trained on total energies are large (about -1,036 eV per carbon atom in
  the authors' tables), so a float32 total of a few hundred atoms already rounds to 0.01 eV and of a million
  atoms to 0.5 eV. The device sums only the part above the references (float32, small); the references are
  added here exactly.
  """
  return float(energy_above_reference) + float(np.sum(table[np.asarray(numbers)]))


@functools.cache
def compiled_predict(cfg: ModelConfig, compute_stress: bool = False, head: str | None = None):
  """``f(params, elements, graph) -> predict(...)``, jitted once per model config (and head): how a model passes
  through ``jax.jit`` everywhere in this package (the config is static, the arrays are arguments)."""

  def fn(params, elements, graph):
    return predict(merge_model(cfg, params, elements), graph, compute_stress, head)

  return jax.jit(fn)


def make_predict_fn(model: E2Former, compute_stress: bool = False, head: str | None = None):
  """A jitted ``AtomGraph -> dict`` with the model's current parameters closed over (see ``predict``); ``head``
  names the output head (None: the default; an unknown name raises ``ValueError`` here)."""
  model.head(head)
  _, params, elements, _ = split_model(model)
  return functools.partial(compiled_predict(model.config, compute_stress, head), params, elements)
