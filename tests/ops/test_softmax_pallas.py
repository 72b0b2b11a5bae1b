"""The edge-weight kernels (``softmax_pallas.pallas_edge_weights``: beta = softmax(gate * dot / sqrt(d)) *
edge_scale and its VJP kernel) against their twin ``attention_softmax.edge_weights``, in Pallas interpret mode:
value, VJP and VJP of VJP on fresh random inputs, in both ``softmax_max`` modes, with and without ``max_floor``.

The inputs hold the cases where the shift is not smooth: three slots at the max (equal gate and dot, so equal
logits bit for bit), a floor equal to a target's max, targets without valid slots (with a finite floor and with
-inf), a zero envelope on a valid slot; K = 6 and H = 3 are not powers of two (padded and masked in the kernels)
and N = 11 is not a multiple of the kernels' 8 targets per program at these sizes.

Tolerance (float32), relative to the largest entry of all outputs of an order, as in test_attention_softmax.py:
the kernels sum over the K slots and the H heads in another order than XLA, a few ulps (6e-8) per term over at most
K = 6 terms of order |ct alpha|, below 1e-6; 1e-5 leaves a factor of ten. The second order is the twin's own
derivative in XLA on both sides, 5e-5 as there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_helpers import errors_against_largest

from pallas_kernels.attention_softmax import edge_weights
from pallas_kernels.softmax_pallas import pallas_edge_weights
from pallas_kernels.triton_launch import Launch

SEED = int(np.random.SeedSequence().entropy % 2**31)
TOLERANCE = {"value": 1e-5, "vjp": 1e-5, "vjp_of_vjp": 5e-5}
N, K, H = 11, 6, 3
LOGIT_SCALE = 8**-0.5


def _inputs(seed: int):
  """(gate, dot, edge_scale, envelope, valid, max_floor) and the cotangents of beta and of the first-order
  cotangents. Target 0 has three slots at its max, target 1 a floor equal to its max, target 2 no valid slot (a
  finite floor), target 3 none and a floor of -inf, target 4 an envelope of 0 on a valid slot."""
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
  gate, dot, edge_scale = f32(N, K, H), f32(N, K, H), f32(N, K, H)
  valid = rng.uniform(size=(N, K)) < 0.7
  valid[:2, :3] = True
  valid[2:4] = False
  gate[0, :3], dot[0, :3] = 2.0, np.abs(dot[0]).max() + 2.0
  logits = gate * dot * np.float32(LOGIT_SCALE)
  floor = f32(N, H) - 3.0
  floor[1] = np.where(valid[1][:, None], logits[1], -np.inf).max(axis=0)
  floor[3] = -np.inf
  envelope = rng.uniform(0.1, 1.0, size=(N, K)).astype(np.float32)
  envelope[4, np.flatnonzero(valid[4])[0]] = 0.0
  args = tuple(jnp.asarray(x) for x in (gate, dot, edge_scale, envelope, valid, floor))
  cts = (jnp.asarray(f32(N, K, H)), tuple(jnp.asarray(f32(*x.shape)) for x in (gate, dot, edge_scale, envelope, floor)))
  return args, cts


def _orders(weights, args, cts, with_floor: bool):
  gate, dot, edge_scale, envelope, valid, floor = args
  ct, ct2 = cts
  fn = lambda g, d, s, e, f: weights(g, d, s, e, valid, f if with_floor else None)
  diff = (gate, dot, edge_scale, envelope, floor)
  value = fn(*diff)
  first = lambda *x: jax.vjp(fn, *x)[1](ct)
  first_value, first_pullback = jax.vjp(first, *diff)
  return {"value": value, "vjp": first_value, "vjp_of_vjp": first_pullback(ct2)}


@functools.cache
def _results(softmax_max: str, with_floor: bool):
  args, cts = _inputs(SEED + len(softmax_max) + with_floor)
  launch = Launch(interpret=True)
  kernels = lambda g, d, s, e, valid, f: pallas_edge_weights(launch, softmax_max, LOGIT_SCALE, g, d, s, e, valid, f)
  twin = lambda g, d, s, e, valid, f: edge_weights(g, d, s, e, valid, softmax_max, f, LOGIT_SCALE)
  both = jax.jit(lambda a, c: (_orders(kernels, a, c, with_floor), _orders(twin, a, c, with_floor)))
  return both(args, cts)


@pytest.mark.parametrize("with_floor", [False, True])
@pytest.mark.parametrize("softmax_max", ["valid", "all_slots"])
@pytest.mark.parametrize("order", TOLERANCE)
def test_kernels_match_the_twin(order, softmax_max, with_floor):
  got, want = _results(softmax_max, with_floor)
  errors = list(errors_against_largest(got[order], want[order]))
  assert len(errors) == (1 if order == "value" else 5)
  for shape, error in errors:
    assert error <= TOLERANCE[order], f"{order} {softmax_max} floor={with_floor} {shape}: {error:.2e} (seed {SEED})"


def test_ties_match_the_twin_entrywise():
  """Where the shift is not smooth (target 0's three slots at its max, target 1's floor at a tie) each cotangent
  entry equals the twin's, not only up to the largest entry: the kernel splits the shift's cotangent as the twin
  does (which test_attention_softmax.py checks against JAX's own derivative)."""
  got, want = _results("valid", True)
  for index in (0, 1, 4):  # gate, dot, max_floor
    np.testing.assert_allclose(got["vjp"][index][:2], want["vjp"][index][:2], rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(got["vjp"][4][1]).max()) > 0  # the tied floor receives a cotangent


def test_forward_mode_is_refused():
  args, _ = _inputs(SEED)
  gate, dot, edge_scale, envelope, valid, floor = args
  fn = lambda g: pallas_edge_weights(
    Launch(interpret=True), "valid", LOGIT_SCALE, g, dot, edge_scale, envelope, valid, floor
  )
  with pytest.raises(TypeError, match="reverse mode only|forward-mode autodiff"):
    jax.jvp(fn, (gate,), (gate,))
