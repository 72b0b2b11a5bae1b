"""The per-edge MLPs computed in chunks of atoms (``ModelConfig.edge_chunk``) change no result."""

import ase.build
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import NUM_GRAPHS, TINY, force_matching_gradients, molecules, relative

from e2former_jax.chunking import over_atom_chunks
from e2former_jax.config import get_config


def test_over_atom_chunks_equals_one_call_and_keeps_gradients_finite():
  """A chunk size that does not divide N (the filled-up last chunk), outputs and gradients; the function is
  singular at a zero row, which the fill must never create."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(10, 3)))
  table = jnp.arange(3.0)

  def fn(x):
    return {"norm": jnp.linalg.norm(x, axis=-1), "scaled": x * table}

  def loss(x, size):
    out = over_atom_chunks(fn, size, x)
    return jnp.sum(out["norm"] ** 3) + jnp.sum(jnp.sin(out["scaled"]))

  whole, whole_grad = loss(x, 0), jax.grad(loss)(x, 0)
  for size in (3, 4, 10, 16):
    np.testing.assert_allclose(loss(x, size), whole, rtol=1e-6)
    grad = jax.grad(loss)(x, size)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, whole_grad, rtol=1e-6)


@pytest.mark.parametrize("gate,softmax_max", [("QKdot_alpha", "valid"), ("QKdotS_alpha", "e2formerv2")])
def test_edge_chunk_changes_no_result(gate, softmax_max):
  """Energies, conservative forces and the parameter gradients of a force-matching loss with chunks of 7 atoms
  (not a divisor of the 48 atom slots) against no chunking: the same operations in another grouping, so float32
  round-off only (1e-5 relative). Molecules and a periodic cell in one batch (molecules only for the
  ``e2formerv2`` softmax, whose shift slots are defined for molecules)."""
  structures = molecules()
  if softmax_max != "e2formerv2":
    structures.append(ase.build.bulk("Si", "diamond", a=5.43, cubic=True))
  results = []
  for edge_chunk in (0, 7):
    cfg = get_config(
      "small",
      **{**TINY, "num_layers": 1},  # one block exercises the chunked gate as well as two
      gate=gate,
      softmax_max=softmax_max,
      attention_impl="jnp_node",
      edge_chunk=edge_chunk,
    )
    results.append(force_matching_gradients(cfg, structures, NUM_GRAPHS + 1))
  (e0, f0, g0), (e1, f1, g1) = results
  assert relative(e1, e0) <= 1e-5 and relative(f1, f0) <= 1e-5
  assert max(relative(b, a) for a, b in zip(g0, g1, strict=True)) <= 1e-5


def test_a_negative_chunk_is_refused():
  with pytest.raises(ValueError, match="edge_chunk must be 0"):
    get_config("small", edge_chunk=-1)
