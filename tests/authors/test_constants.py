"""The constants a checkpoint stores (CG tables, harmonics, basis offsets, norm indices) are accepted at float32
round-off, as the authors' float32 checkpoints hold them, and refused when they are really different."""

import numpy as np
import pytest
from authors_helpers import FIXTURES, key_list_config

from e2former_jax.authors.importer import _compare, constants
from e2former_jax.authors.yaml_config import translate

NAMES = ["main_v15candidate_qk", "main_v15candidate_qk_lsr", "main_spice_qkdot_painn"]


def float32_neighbours(value: np.ndarray, seed: int) -> np.ndarray:
  """``value`` rounded to float32 and moved by up to one ulp at random (what another float32 computation of the
  same constant may store)."""
  rounded = np.asarray(value, np.float32)
  if np.issubdtype(rounded.dtype, np.integer) or rounded.dtype == np.bool_:
    return rounded
  step = np.random.default_rng(seed).integers(-1, 2, rounded.shape)
  return np.where(
    step > 0,
    np.nextafter(rounded, np.float32(np.inf)),
    np.where(step < 0, np.nextafter(rounded, np.float32(-np.inf)), rounded),
  )


@pytest.mark.parametrize("name", NAMES)
def test_float32_round_off_of_every_constant_is_accepted(name):
  cfg = translate(key_list_config(FIXTURES / "full_size_keys" / f"{name}.keys.txt")).model
  for i, (key, ours) in enumerate(constants(cfg).items()):
    stored = ours if np.issubdtype(np.asarray(ours).dtype, np.integer) else float32_neighbours(ours, i)
    assert _compare(key, stored, ours) is None, key


def test_a_different_constant_is_refused():
  cfg = translate(key_list_config(FIXTURES / "full_size_keys" / "main_v15candidate_qk.keys.txt")).model
  ours = constants(cfg)
  key = "decoder.decoder.edge_deg_embed_dense.sph.W"
  wrong = np.asarray(ours[key], np.float32).copy()
  wrong[0, 0] += 1e-3
  assert "differs by up to" in _compare(key, wrong, ours[key])
  offsets = "decoder.decoder.rbf.offset"
  assert "differs by up to" in _compare(offsets, ours[offsets] * 1.001, ours[offsets])
