"""Energy/force losses of the authors' code (docs/model.md §14.1), in eV and eV/A.

Every loss takes flat arrays, so the same function serves a padded training batch (inside ``jax.jit``) and a
whole validation set (concatenated predictions): structures with ``energy_mask`` False and atoms with
``forces_mask`` False (padding or missing labels) do not count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from e2former_jax.training.config import LossConfig


def _safe_norm(x, mask):
  """|x| over the last axis, with a finite gradient where x = 0 (padding)."""
  sq = jnp.sum(x * x, axis=-1)
  ok = mask & (sq > 0)
  return jnp.where(ok, jnp.sqrt(jnp.where(ok, sq, 1.0)), 0.0)


def _huber(x, delta):
  a = jnp.abs(x)
  return jnp.where(a <= delta, 0.5 * x * x, delta * (a - 0.5 * delta))


def _global_count(mask, dtype, axis_name):
  n = jnp.sum(mask.astype(dtype))
  return n if axis_name is None else jax.lax.psum(n, axis_name)


def loss_terms(
  pred_energy,
  energy,
  energy_mask,
  structure_mask,
  num_atoms,
  pred_forces,
  forces,
  forces_mask,
  cfg: LossConfig,
  axis_name=None,
) -> dict:
  """The loss and its parts.

  Args:
    pred_energy, energy: [G] total energies (eV); energy_mask: [G] bool, structure has an energy label.
    structure_mask: [G] bool, real structure (the B of ``l2mae``).
    num_atoms: [G] real atoms per structure.
    pred_forces, forces: [N, 3] eV/A; forces_mask: [N] bool.
    cfg: the loss configuration.
    axis_name: inside ``shard_map`` over a data axis, the axis name: the counts (labelled structures, atoms,
      real structures) are summed over all devices, so every returned term is this device's share of the
      global mean and ``jax.lax.psum`` of the terms is the loss of the whole global batch.

  Returns:
    ``loss`` = w_E * ``energy_loss`` + w_F * ``force_loss``, plus ``energy_mae`` (eV/atom) and ``force_mae``
    (eV/A per component) of the same inputs, for logging.
  """
  e_mask = energy_mask.astype(pred_energy.dtype)
  f_mask = forces_mask.astype(pred_forces.dtype)
  num_e = jnp.maximum(_global_count(energy_mask, pred_energy.dtype, axis_name), 1.0)
  num_f = jnp.maximum(_global_count(forces_mask, pred_forces.dtype, axis_name), 1.0)
  de = (pred_energy - energy) * e_mask
  de_atom = de / jnp.maximum(num_atoms, 1).astype(de.dtype)
  df = (pred_forces - forces) * f_mask[:, None]
  kind = cfg.kind
  if kind == "atoml2mae":
    e_loss = jnp.sum(jnp.abs(de_atom)) / num_e
    f_loss = jnp.sum(_safe_norm(df, forces_mask)) / num_f
  elif kind == "l2mae":
    e_loss = jnp.sum(jnp.abs(de)) / num_e
    num_b = jnp.maximum(_global_count(structure_mask, df.dtype, axis_name), 1.0)
    f_loss = jnp.sum(_safe_norm(df, forces_mask)) / num_b  # per structure, as the authors
  elif kind == "mse":
    e_loss = jnp.sum(de_atom**2) / num_e
    f_loss = jnp.sum(df**2) / (3.0 * num_f)
  elif kind == "huber":
    e_loss = jnp.sum(_huber(de_atom, cfg.huber_delta) * e_mask) / num_e
    f_loss = jnp.sum(_huber(df, cfg.huber_delta) * f_mask[:, None]) / (3.0 * num_f)
  elif kind == "mae":
    e_loss = jnp.sum(jnp.abs(de_atom)) / num_e
    f_loss = jnp.sum(jnp.abs(df)) / (3.0 * num_f)
  else:  # guarded by LossConfig
    raise ValueError(f"unknown loss {kind!r}")
  # With no label of a kind in the batch, its term is exactly 0 (the sums are empty).
  loss = cfg.energy_weight * e_loss + cfg.force_weight * f_loss
  return {
    "loss": loss,
    "energy_loss": e_loss,
    "force_loss": f_loss,
    "energy_mae": jnp.sum(jnp.abs(de_atom)) / num_e,
    "force_mae": jnp.sum(jnp.abs(df)) / (3.0 * num_f),
  }
