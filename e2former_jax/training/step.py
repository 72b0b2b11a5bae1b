"""The train state and the one jitted training step (loss, gradients, update, EMA), with donated buffers.

The model is split once into its graph definition (fixed by the ``ModelConfig``), its trainable parameters
(``nnx.Param``), its element reference energies (``ElementEnergy``, never trained) and constant index tables.
Compiled steps are cached per (model, optimizer, loss) configuration, so runs and tests with the same
configuration compile once per batch shape.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from e2former_jax.config import ModelConfig
from e2former_jax.data.batching import Batch
from e2former_jax.predict import merge_model, predict
from e2former_jax.training.config import LossConfig, OptimConfig
from e2former_jax.training.losses import loss_terms
from e2former_jax.training.optim import learning_rate, make_optimizer


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; saved whole in the "last" checkpoints (exact resume).

  Attributes:
    step: batches consumed so far (skipped ones included).
    params: trainable parameters (``nnx.State`` of ``nnx.Param``).
    opt_state: optax state.
    ema: EMA of ``params`` (None when off).
    rng: raw PRNG key data (uint32), split once per step for any stochastic layer.
    skipped: steps skipped because the loss or a gradient was not finite.
  """

  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  ema: nnx.State | None
  rng: jax.Array
  skipped: jax.Array


def init_state(params, cfg: OptimConfig, seed: int) -> TrainState:
  opt_state = make_optimizer(cfg).init(params)
  ema = jax.tree.map(jnp.copy, params) if cfg.ema_decay is not None else None
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=opt_state,
    ema=ema,
    rng=jax.random.key_data(jax.random.key(seed)),
    skipped=jnp.zeros((), jnp.int32),
  )


def batch_loss(params, elements, batch: Batch, model_cfg: ModelConfig, loss_cfg: LossConfig, axis_name=None):
  """Loss and its parts for one padded batch (forces by ``jax.grad`` for conservative models). With
  ``axis_name`` (inside ``shard_map``), this device's share of the global batch's loss (global counts)."""
  model = merge_model(model_cfg, params, elements)
  out = predict(model, batch.graph)
  g = batch.graph
  terms = loss_terms(
    out["energy"],
    batch.energy,
    batch.energy_mask & g.graph_mask,
    g.graph_mask,
    g.atoms_per_graph(),
    out["forces"],
    batch.forces,
    batch.forces_mask & g.atom_mask,
    loss_cfg,
    axis_name=axis_name,
  )
  return terms["loss"], terms


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def ema_decay_at(count, decay: float):
  """min(decay, (1 + n) / (10 + n)) after n applied updates: early averages are not dominated by init."""
  n = count.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def train_step_fn(
  state: TrainState,
  elements,
  batch: Batch,
  *,
  model_cfg: ModelConfig,
  optim_cfg: OptimConfig,
  loss_cfg: LossConfig,
  total_steps: int,
  axis_name=None,
):
  """One step: returns the new state and the step's metrics. A step whose loss or gradients are not finite
  leaves parameters, optimizer state and EMA unchanged and increments ``skipped``.

  With ``axis_name`` the step runs inside ``shard_map`` on one device's part of a global batch: the loss
  terms (local sums over global counts) and the gradients are summed over the axis with ``jax.lax.psum``,
  so every device applies the same update, that of the whole global batch."""
  tx = make_optimizer(optim_cfg)
  rng, _step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
  (loss, terms), grads = jax.value_and_grad(batch_loss, has_aux=True)(
    state.params, elements, batch, model_cfg, loss_cfg, axis_name
  )
  atoms = jnp.sum(batch.graph.atom_mask.astype(jnp.int32))
  if axis_name is not None:
    grads, terms, atoms = jax.lax.psum((grads, terms, atoms), axis_name)
    loss = terms["loss"]
  finite = jnp.isfinite(loss) & _all_finite(grads)
  # Zero non-finite gradients before the update so no NaN reaches the (discarded) new state's arithmetic.
  safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
  lr = learning_rate(state.step, optim_cfg, total_steps)
  direction, opt_state = tx.update(safe_grads, state.opt_state, state.params)
  params = jax.tree.map(lambda p, d: p - lr * d, state.params, direction)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  params = keep(params, state.params)
  opt_state = keep(opt_state, state.opt_state)
  ema = state.ema
  if ema is not None:
    applied = state.step - state.skipped
    d = ema_decay_at(applied, optim_cfg.ema_decay)
    ema = keep(jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params), ema)
  new_state = TrainState(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    ema=ema,
    rng=jax.random.key_data(rng),
    skipped=state.skipped + (~finite).astype(jnp.int32),
  )
  metrics = dict(terms)
  metrics.update(lr=lr, grad_norm=optax.tree.norm(safe_grads), finite=finite, atoms=atoms)
  return new_state, metrics


@functools.cache
def compiled_train_step(model_cfg: ModelConfig, optim_cfg: OptimConfig, loss_cfg: LossConfig, total_steps: int):
  """``step(state, elements, batch) -> (state, metrics)``, jitted with the state donated."""
  fn = functools.partial(
    train_step_fn, model_cfg=model_cfg, optim_cfg=optim_cfg, loss_cfg=loss_cfg, total_steps=total_steps
  )
  return jax.jit(fn, donate_argnums=(0,))


def eval_params(state: TrainState):
  """The weights that are evaluated and deployed: the EMA when it is on, else the raw parameters."""
  return state.ema if state.ema is not None else state.params


def host_copy(tree):
  """A numpy copy of every leaf (safe to keep while the device buffers are donated to the next step)."""
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)
