"""The attention's softmax weights with a closed-form VJP (``attention_softmax.softmax_weights``) against JAX's
derivatives of the reference ``jnp_node.attention_weights``: value, VJP and VJP of VJP, on fresh random inputs
with the cases where the shift is not smooth (several slots at the max, the max equal to ``max_floor``, targets
without valid slots, a floor of -inf) in both ``softmax_max`` modes.

Tolerance (float32), relative to the largest entry of all outputs of an order: the rule and JAX's chain compute
the same sums in another order, e.g. alpha (g - c) against g / D - sum(g w) / D^2 times w; entries are sums over
K = 8 slots of terms of order |g alpha|, so a few ulps (6e-8) times K stays below 1e-6; 1e-5, and 5e-5 for the
second order, which chains once more. Not relative to each output's own largest entry: the shift's cotangent
(that of max_floor) is -c eps / D, a thousand times smaller than the other entries, which JAX's chain forms as
c - c S / D, a difference of two O(c) numbers with an error of a few ulps of c (the rule's closed form has none).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_helpers import errors_against_largest

from pallas_kernels.attention_softmax import softmax_weights
from pallas_kernels.jnp_node import attention_weights

SEED = int(np.random.SeedSequence().entropy % 2**31)
TOLERANCE = {"value": 1e-5, "vjp": 1e-5, "vjp_of_vjp": 5e-5}
N, K, H = 6, 8, 4


def _inputs(seed: int):
  """(logits, envelope, valid, max_floor) and cotangents of alpha and of the first-order cotangents. Target 0
  has three slots at its max, target 1 a floor equal to its max, target 2 no valid slot (a finite floor), target
  3 no valid slot and a floor of -inf, target 4 an envelope of 0 on one valid slot (the cutoff)."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(N, K, H)).astype(np.float32)
  valid = rng.uniform(size=(N, K)) < 0.7
  valid[:2, :4] = True
  valid[2:4] = False
  logits[0, 1:3] = logits[0, 0] = np.abs(logits[0]).max() + 1.0
  floor = rng.normal(size=(N, H)).astype(np.float32) - 3.0
  floor[1] = np.where(valid[1][:, None], logits[1], -np.inf).max(axis=0)
  floor[3] = -np.inf
  envelope = rng.uniform(0.1, 1.0, size=(N, K)).astype(np.float32)
  envelope[4, np.flatnonzero(valid[4])[0]] = 0.0
  f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  cts = (f32(N, K, H), (f32(N, K, H), f32(N, K), f32(N, H)))
  return (jnp.asarray(logits), jnp.asarray(envelope), jnp.asarray(valid), jnp.asarray(floor)), cts


def _orders(weights, args, cts, with_floor: bool):
  logits, envelope, valid, floor = args
  g, g2 = cts
  fn = lambda x, phi, f: weights(x, phi, valid, f if with_floor else None)
  value, pullback = jax.vjp(fn, logits, envelope, floor)
  first = lambda *x: jax.vjp(fn, *x)[1](g)
  second = jax.vjp(first, logits, envelope, floor)[1](g2)
  return {"value": value, "vjp": pullback(g), "vjp_of_vjp": second}


@functools.cache
def _results(softmax_max: str, with_floor: bool):
  args, cts = _inputs(SEED + len(softmax_max) + with_floor)
  rule = lambda x, phi, valid, f: softmax_weights(x, phi, valid, softmax_max, f)
  reference = lambda x, phi, valid, f: attention_weights(x, phi, valid, softmax_max, max_floor=f)
  both = jax.jit(lambda a, c: (_orders(rule, a, c, with_floor), _orders(reference, a, c, with_floor)))
  return both(args, cts)


@pytest.mark.parametrize("with_floor", [False, True])
@pytest.mark.parametrize("softmax_max", ["valid", "all_slots"])
@pytest.mark.parametrize("order", TOLERANCE)
def test_closed_form_derivative_matches_jax(order, softmax_max, with_floor):
  rule, reference = _results(softmax_max, with_floor)
  for shape, error in errors_against_largest(rule[order], reference[order]):
    assert error <= TOLERANCE[order], f"{order} {softmax_max} floor={with_floor} {shape}: {error:.2e} (seed {SEED})"


def test_ties_at_the_max_share_its_cotangent():
  """Three slots at the max each get a third of the shift's cotangent, as JAX's reduce_max; the floor at a tie
  gets half of it: checked on the cotangent alone, where the rule and JAX could differ most."""
  args, (g, _) = _inputs(SEED)
  logits, envelope, valid, floor = args
  grads = [
    jax.grad(lambda x, f: jnp.sum(g * w(x, f)), argnums=(0, 1))(logits, floor)
    for w in (
      lambda x, f: softmax_weights(x, envelope, valid, "valid", f),
      lambda x, f: attention_weights(x, envelope, valid, "valid", max_floor=f),
    )
  ]
  for rule, reference in zip(*grads, strict=True):
    np.testing.assert_allclose(rule, reference, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(grads[0][1][1]).max()) > 0  # the tied floor of target 1 receives a cotangent
