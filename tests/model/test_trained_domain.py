"""What a checkpoint was trained on: recorded in its meta, derived for older checkpoints, checked on input."""

import ase
import ase.build
import pytest
from flax import nnx
from model_helpers import TINY

from e2former_jax.checkpoint import DEMO_CHECKPOINT, export_model, make_meta, read_meta
from e2former_jax.config import get_config
from e2former_jax.model import E2Former
from e2former_jax.trained_domain import TrainedDomain, UntrainedElementError


def test_meta_records_elements_charges_and_multiplicities_sorted():
  cfg = get_config("small", **TINY)
  meta = make_meta(cfg, {8: -2040.0, 1: -13.5}, elements=[8, 1, 1], charges=[1, -1, 0], multiplicities=(2, 1))
  assert (meta["elements"], meta["charges"], meta["multiplicities"]) == ([1, 8], [-1, 0, 1], [1, 2])
  assert "elements" not in make_meta(cfg, {1: -13.5})  # nothing recorded unless training says so
  with pytest.raises(ValueError, match=r"elements must be atomic numbers 1\.\.118, got \[0, 1\]"):
    make_meta(cfg, {}, elements=[0, 1])


def test_older_checkpoints_take_the_keys_of_their_element_references():
  meta = read_meta(DEMO_CHECKPOINT)
  assert "elements" not in meta  # the shipped demo checkpoint predates the key
  assert TrainedDomain.from_checkpoint(DEMO_CHECKPOINT).elements == (1, 6, 7, 8, 9, 16, 17)
  assert TrainedDomain.from_meta({"element_references": {}}).elements is None  # unknown: nothing checked


def test_exported_models_keep_what_they_were_trained_on(tmp_path):
  model = E2Former(get_config("small", **TINY), rngs=nnx.Rngs(0))
  model.set_element_energies({1: -13.5, 6: -1030.0, 8: -2040.0, 17: -12500.0})
  path = export_model(model, tmp_path / "m", **TrainedDomain((1, 8), (0,), (1,)).to_meta())
  domain = TrainedDomain.from_checkpoint(path)
  assert (domain.elements, domain.charges, domain.multiplicities) == ((1, 8), (0,), (1,))


def test_of_structures_and_check_counts_the_structures():
  water, methane = ase.build.molecule("H2O"), ase.build.molecule("CH4")
  water.info["total_charge"] = -1
  domain = TrainedDomain.of_structures([water, ase.build.molecule("H2O")])
  assert (domain.elements, domain.charges, domain.multiplicities) == ((1, 8), (-1, 0), (1,))
  cfg = get_config("small", **TINY)
  with pytest.raises(
    UntrainedElementError, match=r"1 of 3 structures \(first: structure 1 \(CH4\)\) contain.* C \(6\)"
  ):
    domain.check([water, methane, water], cfg)
  with pytest.warns(UserWarning, match=r"C \(6\) .*predicting anyway"):
    domain.check([methane], cfg, allow_untrained_elements=True)
  cation = ase.Atoms("H2O", positions=water.positions, info={"charge": 1})
  with pytest.warns(
    UserWarning, match=r"total charge 1 never occurred in training \(charges seen: \[-1, 0\]\) \(2 of 2"
  ):
    domain.check([cation, cation], cfg)
  with pytest.warns(UserWarning, match=r"no charge or spin input: total charge 1 and multiplicity 1 are ignored"):
    domain.check([cation], cfg.replace(use_charge_spin=False))
  with pytest.warns(UserWarning, match=r"multiplicity 3 is ignored by this model \(spin_input='zero'\)"):
    domain.check([ase.Atoms("O", info={"spin": 3})], cfg.replace(spin_input="zero"))
