"""Bad inputs fail with clear errors; the ASE calculator's public interface."""

import warnings

import ase
import ase.build
import numpy as np
import pytest
from model_helpers import TINY, predictor

from e2former_jax import E2FormerCalculator, ModelConfig, get_config
from e2former_jax.checkpoint import DEMO_CHECKPOINT
from e2former_jax.graph import graph_from_atoms
from e2former_jax.trained_domain import TrainedDomain, UntrainedElementError


def graph(atoms):
  return graph_from_atoms(atoms, 5.0, 8)


def test_unknown_element():
  with pytest.raises(ValueError, match="unknown element.*119"):
    graph(ase.Atoms(numbers=[6, 119], positions=[[0, 0, 0], [1.5, 0, 0]]))


def test_nan_positions():
  with pytest.raises(ValueError, match="non-finite"):
    graph(ase.Atoms("CO", positions=[[0, 0, 0], [np.nan, 0, 0]]))


def test_overlapping_atoms_are_named():
  with pytest.raises(ValueError, match=r"atoms (1 and 2|2 and 1) overlap"):
    graph(ase.Atoms("COH", positions=[[0, 0, 0], [1.2, 0, 0], [1.25, 0, 0]]))


def test_empty_structure():
  with pytest.raises(ValueError, match="empty"):
    graph(ase.Atoms())


def test_mismatched_shapes():
  _, model, _ = predictor()
  good, _ = graph_from_atoms(ase.build.molecule("H2O"), 5.0, 12)
  with pytest.raises(ValueError, match="AtomGraph.neighbor_mask has shape"):
    model(good.replace(neighbor_mask=good.neighbor_mask[:, :4]))


def test_bad_charge_and_config_fields():
  water = ase.build.molecule("H2O")
  water.info["spin"] = 0
  with pytest.raises(ValueError, match="multiplicity"):
    graph(water)
  with pytest.raises(TypeError, match="unknown ModelConfig field"):
    get_config("small", chanels=8)
  with pytest.raises(ValueError, match="unknown preset"):
    get_config("paper_qm9")
  with pytest.raises(ValueError, match="attention_impl"):
    ModelConfig(attention_impl="cuda")


def test_float64_without_x64_names_the_fix():
  with pytest.raises(ValueError, match='jax.config.update\\("jax_enable_x64", True\\)'):
    E2FormerCalculator("small", dtype="float64", **TINY)


def test_calculator_reads_charge_and_spin_and_overrides():
  calc = E2FormerCalculator("small", seed=0, attention_impl="jnp_edge", **TINY)
  assert calc.config.attention_impl == "jnp_edge" and calc.config.channels == TINY["channels"]
  oh = ase.Atoms("OH", positions=[[0, 0, 0], [0.97, 0, 0]])
  oh.calc = calc
  neutral = oh.get_potential_energy()
  oh.info["charge"] = -1
  anion = oh.get_potential_energy()
  oh.info["spin"] = 3
  triplet = oh.get_potential_energy()
  assert len({neutral, anion, triplet}) == 3
  forces = oh.get_forces()
  assert forces.shape == (2, 3) and np.all(np.isfinite(forces))
  with pytest.raises(ValueError, match="periodic"):
    oh.get_stress()


def test_calculator_warns_once_about_truncated_neighbours_at_the_users_line():
  atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
  atoms.calc = E2FormerCalculator("small", **{**TINY, "max_neighbors": 4}, cutoff=3.0)
  with pytest.warns(UserWarning, match="dropped because atoms have more than K=4.*pass a larger max_neighbors=") as rec:
    atoms.get_potential_energy()
  assert [w.filename for w in rec if "dropped" in str(w.message)] == [__file__]  # this line, not ASE's get_property
  atoms.rattle(0.01, seed=1)
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    atoms.get_potential_energy()  # once per calculator


@pytest.mark.parametrize("key,value", [("total_charge", 1), ("charge", 1), ("total_spin", 3), ("multiplicity", 3)])
def test_every_spelling_of_charge_and_multiplicity_reaches_the_model(key, value):
  oh = ase.Atoms("OH", positions=[[0, 0, 0], [0.97, 0, 0]])
  oh.calc = E2FormerCalculator("small", seed=0, **TINY)
  neutral = oh.get_potential_energy()
  oh.info[key] = value  # ASE's change detection must see it, or the cached energy comes back
  assert oh.get_potential_energy() != neutral
  other = {"total_charge": "charge", "charge": "total_charge", "total_spin": "spin", "multiplicity": "spin"}[key]
  oh.info[other] = value + 1
  with pytest.raises(ValueError, match="given more than once with different values"):
    oh.get_potential_energy()


def test_charge_outside_what_the_model_saw_warns():
  oh = ase.Atoms("OH", positions=[[0, 0, 0], [0.97, 0, 0]], info={"charge": 12})
  oh.calc = E2FormerCalculator("small", seed=0, **TINY)
  with pytest.warns(UserWarning, match=r"total charge 12 is outside the charge embedding's range -10\.\.10"):
    oh.get_potential_energy()
  calc = E2FormerCalculator("small", seed=0, domain=TrainedDomain(None, charges=[0], multiplicities=[1]), **TINY)
  oh.calc = calc
  oh.info.update(charge=-1, spin=2)
  with pytest.warns(UserWarning, match=r"total charge -1 never occurred in training.*multiplicity 2 never occurred"):
    oh.get_potential_energy()


@pytest.fixture(scope="module")
def demo_calculator():
  return E2FormerCalculator.from_checkpoint(DEMO_CHECKPOINT, attention_impl="jnp_node", matmul_precision="highest")


def test_untrained_elements_are_refused_unless_allowed(demo_calculator):
  ethanol = ase.build.molecule("CH3CH2OH")
  ethanol.numbers[0] = 92
  ethanol.calc = demo_calculator
  trained = r"trained on H \(1\), C \(6\), N \(7\), O \(8\), F \(9\), S \(16\), Cl \(17\)"
  with pytest.raises(
    UntrainedElementError, match=rf"element\(s\) U \(92\) that the checkpoint was not trained on \({trained}\)"
  ):
    ethanol.get_potential_energy()
  with pytest.raises(UntrainedElementError):  # the refused structure is not cached as checked
    ethanol.get_potential_energy()
  ethanol.calc = E2FormerCalculator(
    model=demo_calculator.model, domain=demo_calculator.domain, allow_untrained_elements=True
  )
  with pytest.warns(UserWarning, match=r"U \(92\) .*predicting anyway \(allowed\)"):
    assert np.isfinite(ethanol.get_potential_energy())


def test_from_checkpoint_takes_only_settings_that_keep_the_trained_function(demo_calculator):
  assert demo_calculator.config.attention_impl == "jnp_node"
  for field in ("cutoff", "max_neighbors", "channels"):
    with pytest.raises(TypeError, match=rf"'{field}' would change the trained model.*allowed: dtype, attention_impl"):
      E2FormerCalculator.from_checkpoint(DEMO_CHECKPOINT, **{field: 1})


def test_truncation_warning_names_a_remedy_for_a_trained_checkpoint(demo_calculator):
  atoms = ase.build.bulk("C", "diamond", a=3.57, cubic=True) * (2, 2, 2)  # 34 neighbours within 5 A, K = 24
  atoms.calc = E2FormerCalculator(model=demo_calculator.model, domain=demo_calculator.domain)
  atoms.calc.checkpoint = demo_calculator.checkpoint
  with pytest.warns(UserWarning, match=r"K=24 .*--init-from .*demo_checkpoint --set model.max_neighbors=") as rec:
    atoms.get_potential_energy()
  assert [w.filename for w in rec if "dropped" in str(w.message)] == [__file__]
