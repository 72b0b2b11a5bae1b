"""A radial profile of the invariant edge features applied by parts (``layers.EdgeFeatures``, one op in either
implementation) equals the MLP of the concatenated features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from e2former_jax.layers import EdgeFeatures, RadialProfile
from pallas_kernels.radial_jnp import gaussian_basis

N, K, B, T, S = 7, 5, 6, 4, 3
BASIS = (5.0, B, 2.0)


def parts(seed=0, implementation="jnp"):
  rng = np.random.default_rng(seed)
  neighbors = rng.integers(0, N, (N, K))
  neighbors[:, -1] = neighbors[:, 0]  # duplicate sources
  neighbors[-1] = 0  # a padding row: every slot points at atom 0
  numbers = rng.integers(0, S, N)
  return EdgeFeatures(
    jnp.asarray(rng.uniform(0.5, 5.0, size=(N, K)), jnp.float32),
    BASIS,
    jnp.asarray(rng.normal(size=(S, T)), jnp.float32),
    jnp.asarray(rng.normal(size=(S, T)), jnp.float32),
    jnp.asarray(numbers),
    jnp.asarray(numbers[neighbors]),
    implementation,
  )


def concatenated(e: EdgeFeatures) -> jax.Array:
  target = jnp.broadcast_to(e.target_table[e.target_numbers][:, None], (N, K, T))
  rbf = gaussian_basis(e.distance, *e.basis)
  return jnp.concatenate([rbf, target, e.source_table[e.source_numbers]], axis=-1)


@pytest.mark.parametrize("implementation", ["jnp", "pallas"])
@pytest.mark.parametrize("last", [True, False])
def test_radial_profile_by_parts_equals_concatenated_input(implementation, last):
  """Forward and the gradients with respect to the distances, both tables and every parameter, for the whole MLP
  and for its last hidden layer; the Pallas kernels in interpret mode. Float32 sums of at most B + 2T = 14 terms in
  another order: 1e-5 relative."""
  mlp = RadialProfile((B + 2 * T, 8, 8, 3), precision="highest", dtype=jnp.float32, rngs=nnx.Rngs(1))
  graphdef, params = nnx.split(mlp)
  e = parts(implementation=implementation)

  def loss(params, distance, target, source, by_parts):
    features = EdgeFeatures(distance, BASIS, target, source, e.target_numbers, e.source_numbers, implementation)
    module = nnx.merge(graphdef, params)
    apply = module if last else module.hidden
    return jnp.sum(jnp.sin(apply(features if by_parts else concatenated(features))))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)
  args = (e.distance, e.target_table, e.source_table)
  split, whole = (grad(params, *args, by_parts) for by_parts in (True, False))
  assert float(loss(params, *args, True)) == pytest.approx(float(loss(params, *args, False)), rel=1e-5)
  for a, b in zip(jax.tree.leaves(split), jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_a_profile_of_another_width_is_refused():
  mlp = RadialProfile((B + 2 * T + 1, 8, 3), precision="highest", dtype=jnp.float32, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="input width 15 cannot read edge features of width 14"):
    mlp(parts())


@pytest.mark.parametrize("by_parts", [True, False])
def test_weighted_sum_moves_the_last_layer_after_the_sum_over_slots(by_parts):
  """``weighted_sum(x, w)`` = sum_k w[..., k, m] profile(x)[..., k, :] with the last Linear applied after the sum
  (its bias times sum_k w): value and the gradients with respect to the distances, the weights and every parameter,
  on edge features and on a plain array, weights zero on some slots (padding) and negative on others. The same
  float32 terms summed in another order: 1e-5 relative."""
  mlp = RadialProfile((B + 2 * T, 8, 8, 3), precision="highest", dtype=jnp.float32, rngs=nnx.Rngs(2))
  mlp.linears[-1].bias[...] = jnp.asarray([0.3, -1.1, 0.7])  # zero-initialised: a bias the test can see
  graphdef, params = nnx.split(mlp)
  e = parts(seed=1)
  weights = jnp.asarray(np.random.default_rng(2).normal(size=(N, K, 5)), jnp.float32).at[:, -2:].set(0.0)

  def loss(params, distance, weights, moved):
    features = EdgeFeatures(distance, BASIS, e.target_table, e.source_table, e.target_numbers, e.source_numbers, "jnp")
    x = features if by_parts else concatenated(features)
    module = nnx.merge(graphdef, params)
    out = module.weighted_sum(x, weights) if moved else jnp.einsum("nkm,nko->nmo", weights, module(x))
    return jnp.sum(jnp.sin(out))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  moved, summed = (grad(params, e.distance, weights, m) for m in (True, False))
  assert float(loss(params, e.distance, weights, True)) == pytest.approx(
    float(loss(params, e.distance, weights, False)), rel=1e-5
  )
  for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(summed), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))
