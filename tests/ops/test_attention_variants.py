"""The attention op's weight variants on every implementation: the unnormalised softplus/sigmoid activations and a
lower bound of the softmax shift (``max_floor``), values and reverse-mode derivatives against the formulas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.api import node_attention
from pallas_kernels.jnp_node import EPSILON, attention_logits, softplus

N, K, H, D, R, C = 7, 5, 2, 4, 3, 4
IMPLEMENTATIONS = ("jnp_node", "jnp_dense", "pallas")  # pallas in interpret mode on the CPU
TOL = 1e-5  # float32, sums over 5 slots in different orders


def inputs(seed=0):
  keys = jax.random.split(jax.random.key(seed), 8)
  q = jax.random.normal(keys[0], (N, H, D))
  k = jax.random.normal(keys[1], (N, H, D))
  gate = jax.random.normal(keys[2], (N, K, H))
  scale = jax.random.normal(keys[3], (N, K, H))
  envelope = jax.random.uniform(keys[4], (N, K))
  valid = jax.random.uniform(keys[5], (N, K)) < 0.7
  valid = valid.at[0].set(False)  # an atom without neighbours
  neighbors = jax.random.randint(keys[6], (N, K), 0, N)
  rows = jax.random.normal(keys[7], (N, R, C))
  return q, k, gate, scale, envelope, valid, neighbors, rows


def expected(q, k, gate, scale, envelope, valid, neighbors, rows, activation, floor):
  """The formulas of jnp_node's docstring, written out per head."""
  logits = np.asarray(attention_logits(q, k, gate, neighbors), np.float64)
  valid, envelope = np.asarray(valid)[..., None], np.asarray(envelope)[..., None]
  if activation == "softmax":
    shift = np.max(np.where(valid, logits, -np.inf), axis=1)
    shift = np.maximum(shift, np.asarray(floor)) if floor is not None else shift
    shift = np.where(np.isfinite(shift), shift, 0.0)[:, None]
    w = np.where(valid, np.exp(np.where(valid, logits - shift, 0.0)) * envelope, 0.0)
    alpha = w / (w.sum(1, keepdims=True) + EPSILON)
  else:
    act = np.asarray(softplus(jnp.asarray(logits))) if activation == "softplus" else 1 / (1 + np.exp(-logits))
    alpha = np.where(valid, act * envelope, 0.0)
  beta = np.tile(alpha * np.asarray(scale), (1, 1, C // H))
  return np.einsum("nkc,nkrc->nrc", beta, np.asarray(rows)[np.asarray(neighbors)])


def floors(kind):
  if kind is None:
    return None
  if kind == "none":  # -inf everywhere: the same as no floor
    return jnp.full((N, H), -jnp.inf)
  return jnp.where(jnp.arange(N)[:, None] % 2 == 0, 3.0, -jnp.inf) * jnp.ones((N, H))  # above most logits


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(
  ("activation", "floor"), [("softplus", None), ("sigmoid", None), ("softmax", "none"), ("softmax", "high")]
)
def test_variants_equal_their_formulas_on_every_implementation(impl, activation, floor):
  args = inputs()
  out = node_attention(*args, implementation=impl, activation=activation, max_floor=floors(floor))
  np.testing.assert_allclose(out, expected(*args, activation, floors(floor)), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("impl", ("jnp_dense", "pallas"))
@pytest.mark.parametrize(("activation", "floor"), [("softplus", None), ("softmax", "high")])
def test_variant_derivatives_equal_the_reference_twin(impl, activation, floor):
  args = inputs(1)

  def loss(q, k, gate, scale, envelope, rows, max_floor, impl):
    out = node_attention(
      q,
      k,
      gate,
      scale,
      envelope,
      args[5],
      args[6],
      rows,
      implementation=impl,
      activation=activation,
      max_floor=max_floor,
    )
    return jnp.sum(jnp.sin(out))

  differentiable = (*args[:5], args[7], floors(floor))
  argnums = tuple(range(6 if floor is None else 7))
  reference = jax.grad(loss, argnums)(*differentiable, "jnp_node")
  result = jax.grad(loss, argnums)(*differentiable, impl)
  for ours, theirs in zip(result, reference):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
  if floor is not None:
    assert float(jnp.max(jnp.abs(reference[-1]))) > 0, "the floor is where the shift sits for the even atoms"


def test_unknown_activation_is_named():
  with pytest.raises(ValueError, match="activation must be one of .* got 'relu'"):
    node_attention(*inputs(), implementation="jnp_node", activation="relu")


@pytest.mark.parametrize("softmax_max", ["valid", "all_slots"])
def test_tied_maxima_share_the_cotangent_as_in_the_twin(softmax_max):
  """Two slots with the same source and gate tie at the max; with envelopes of 1e-3 the +1e-3 in the softmax
  denominator weighs as much as the sum, so the shift's derivative is large; every path must split it between the
  tied slots as the twin's max does (a backward that takes the softmax derivative itself has to follow that rule).
  It failed against a fused backward kernel (68614e2, taken back) altered to give each tied slot the whole
  cotangent."""
  q, k, gate, scale, envelope, valid, neighbors, rows = inputs(2)
  neighbors = neighbors.at[:, 1].set(neighbors[:, 0])
  # the tied pair holds the max where q . k > 0
  gate = gate.at[:, 1].set(gate[:, 0]).at[:, 0].add(5.0).at[:, 1].add(5.0)
  valid = valid.at[1:, :2].set(True)
  envelope = jnp.full_like(envelope, 1e-3)

  def loss(impl, *x):
    out = node_attention(*x[:5], valid, neighbors, x[5], implementation=impl, softmax_max=softmax_max)
    return jnp.sum(jnp.sin(out))

  diff = (q, k, gate, scale, envelope, rows)
  reference = jax.grad(functools.partial(loss, "jnp_node"), argnums=tuple(range(6)))(*diff)
  result = jax.grad(functools.partial(loss, "pallas"), argnums=tuple(range(6)))(*diff)
  for ours, theirs in zip(result, reference):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
