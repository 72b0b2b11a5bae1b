"""Optimizer, parameter groups and learning-rate schedule of the authors' trainer (docs/model.md §14.2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from e2former_jax.training.config import OptimConfig
from e2former_jax.tree_paths import path_name


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
  """The warmup length: ``cfg.warmup_steps``, capped at ``max_warmup_fraction`` of T when that is set."""
  w = int(cfg.warmup_steps)
  if cfg.max_warmup_fraction is not None:
    w = min(w, int(cfg.max_warmup_fraction * total_steps))
  return w


def lr_factor(step, cfg: OptimConfig, total_steps: int):
  """The authors' ``groupWarmupDecayLR`` factor f(s) (``utils/optimizer.py``), lr = base_lr * f(s).

  f(s) = w0 + (1 - w0) s / W for s <= W; f(s) = m + (1 - m)/2 (1 + cos(pi s / T)) for W < s < T (the cosine
  phase is s / T, not (s - W) / (T - W), as in their code); f = m for s >= T. w0 = ``warmup_factor``,
  m = ``lr_min_factor``, W = ``warmup_steps`` (capped), T = ``total_steps``.
  """
  w = warmup_steps(cfg, total_steps)
  s = jnp.asarray(step, jnp.float32)
  t = float(total_steps)
  w0, m = cfg.warmup_factor, cfg.lr_min_factor
  warm = w0 + (1.0 - w0) * s / max(w, 1)
  cos = m + 0.5 * (1.0 - m) * (1.0 + jnp.cos(jnp.pi * s / t))
  f = jnp.where(s <= w, warm, jnp.where(s < t, cos, m))
  return f if w > 0 else jnp.where(s < t, cos, m)


def learning_rate(step, cfg: OptimConfig, total_steps: int):
  return cfg.lr * lr_factor(step, cfg, total_steps)


def param_path(path) -> str:
  """'blocks/0/attention/query/left/kernel' from a ``jax.tree_util`` key path."""
  return path_name(path)


def decays(path: str, ndim: int, cfg: OptimConfig) -> bool:
  """The authors' groups: no decay for 0-/1-D parameters (biases, norm scales) and for names containing any
  of ``cfg.no_decay`` (biases, embeddings, norms); decay for every other (weight matrix)."""
  if ndim <= 1:
    return False
  lowered = path.lower()
  return not any(s.lower() in lowered for s in cfg.no_decay)


def decay_mask(params, cfg: OptimConfig):
  """A pytree of bools like ``params``: True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(lambda p, x: decays(param_path(p), jnp.ndim(x), cfg), params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then Adam, then decoupled weight decay on the decaying group.

  The result is the update *direction*; the train step multiplies it by ``-learning_rate(step)``, so the
  schedule follows the global step (skipped steps included) and is logged exactly. With weight decay
  this is AdamW (PyTorch's and optax's decoupled form: p -= lr (adam + wd p)); without it, Adam.
  """
  parts = []
  if cfg.clip_norm is not None:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.scale_by_adam(b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps))
  if cfg.weight_decay > 0:
    parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=lambda p: decay_mask(p, cfg)))
  return optax.chain(*parts)
