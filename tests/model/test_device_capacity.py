"""``DevicePotential`` sizes its neighbour search before compiling the model: one model program on first use."""

import numpy as np
from model_helpers import predictor

from e2former_jax import potential as potential_module
from e2former_jax.neighbors.device import SearchCapacity
from e2former_jax.potential import DevicePotential


def dense_cluster(n=120, density=0.1, seed=0):
  """n atoms at liquid density (atoms/A^3) in a cube: more per bin and more in-cutoff candidates than the
  default capacity holds (32 per bin, 64 candidates)."""
  side = (n / density) ** (1 / 3)
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.arange(5)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n]
  return grid * side / 5 + rng.uniform(-0.1, 0.1, (n, 3)), rng.choice([1, 6, 8], n)


def test_first_call_compiles_one_model_program():
  _, model, _ = predictor(forces="direct")
  positions, numbers = dense_cluster()
  potential = DevicePotential(model)
  assert potential.capacity == SearchCapacity()
  potential_module._compiled.cache_clear()
  potential(positions, numbers)
  assert potential_module._compiled.cache_info().misses == 1  # no program for an overflowing default capacity
  grown = potential.capacity
  assert grown.candidate_capacity > SearchCapacity().candidate_capacity
  moved = positions + np.random.default_rng(1).uniform(-0.2, 0.2, positions.shape)
  potential(moved, numbers)  # a nearby structure fits the headroom: no new program
  assert potential.capacity == grown and potential_module._compiled.cache_info().misses == 1


def test_large_systems_pay_little_padding():
  """Above 65,536 slots the buckets step by 16,384 atoms: every size fits, with less than 16,384 padding atoms
  (under 2% at a million), and the buckets join the geometric ones below without a gap."""
  from e2former_jax.potential import LARGE_BUCKET_FROM, LARGE_BUCKET_STEP, atom_bucket

  for n in (LARGE_BUCKET_FROM - 1, LARGE_BUCKET_FROM, 100_000, 250_000, 1_000_000):
    bucket = atom_bucket(n)
    assert n + 1 <= bucket
    if n + 1 > LARGE_BUCKET_FROM:
      assert bucket % LARGE_BUCKET_STEP == 0 and bucket - (n + 1) < LARGE_BUCKET_STEP
  assert atom_bucket(1_000_000) / 1_000_001 < 1.02
  assert atom_bucket(LARGE_BUCKET_FROM) > atom_bucket(LARGE_BUCKET_FROM - 1) >= LARGE_BUCKET_FROM
