"""Bad inputs fail with clear errors; the ASE calculator's public interface."""

import ase
import ase.build
import numpy as np
import pytest
from model_helpers import TINY, predictor

from e2former_jax import E2FormerCalculator, ModelConfig, get_config
from e2former_jax.graph import graph_from_atoms


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


def test_calculator_warns_once_about_truncated_neighbours():
  atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
  atoms.calc = E2FormerCalculator("small", **{**TINY, "max_neighbors": 4}, cutoff=3.0)
  with pytest.warns(UserWarning, match="dropped because atoms have more than K=4"):
    atoms.get_potential_energy()
