"""One definition of the total charge and the multiplicity keys (``e2former_jax.system_keys``)."""

import ase.build
import numpy as np
import pytest

from e2former_jax.graph import graph_from_atoms
from e2former_jax.system_keys import SPIN_KEYS, charge_and_multiplicity, integer_value, multiplicity, total_charge


@pytest.mark.parametrize(
  "info,expected",
  [
    ({}, (0, 1)),
    ({"charge": 1, "spin": 2}, (1, 2)),
    ({"total_charge": -2, "total_spin": 3}, (-2, 3)),
    ({"charge": 1, "total_charge": 1.0, "multiplicity": 2, "spin": np.int64(2)}, (1, 2)),
    ({"charge": np.array(1), "total_spin": np.array([4.0])}, (1, 4)),
    ({"charge": None, "spin": None}, (0, 1)),  # None counts as absent
  ],
)
def test_every_spelling(info, expected):
  assert charge_and_multiplicity(info) == expected


@pytest.mark.parametrize(
  "value,message",
  [
    ("1", r"charge must be an integer, got '1' \(a str\)"),
    (True, r"charge must be an integer, got True \(a bool\)"),
    (0.5, r"charge must be an integer, got 0\.5$"),
    (float("nan"), r"charge must be an integer, got nan"),
    ([1], r"charge must be an integer, got \[1\] \(a list\)"),
  ],
)
def test_values_that_are_not_whole_numbers_are_refused_with_their_repr(value, message):
  with pytest.raises(ValueError, match=message):
    integer_value(value, "charge")


def test_disagreement_and_named_keys():
  with pytest.raises(ValueError, match=r"total charge is given more than once .*\(charge=1, total_charge=0\)"):
    total_charge({"charge": 1, "total_charge": 0})
  with pytest.raises(ValueError, match=r"multiplicity is given more than once .*total_spin=1, multiplicity=3"):
    multiplicity({"total_spin": 1, "multiplicity": 3})
  # a named key is the only one read (absent: the default)
  assert total_charge({"q": -1, "charge": 1}, key="q") == -1
  assert multiplicity({"spin": 3}, key="mult") == 1
  with pytest.raises(ValueError, match="must be >= 1"):
    multiplicity({"multiplicity": 0})
  with pytest.raises(ValueError, match="a key name must be a non-empty string"):
    total_charge({}, key="")
  assert set(SPIN_KEYS) == {"spin", "total_spin", "multiplicity"}


def test_graph_building_reads_every_spelling_and_names_the_structure():
  water = ase.build.molecule("H2O")
  water.info.update(total_charge=-1, multiplicity=2)
  graph, _ = graph_from_atoms(water, 5.0, 4)
  assert (int(graph.charge[0]), int(graph.spin[0])) == (-1, 2)
  water.info.update(source="w-1", charge="-1")
  with pytest.raises(ValueError, match=r"structure 0 \(w-1\): charge must be an integer, got '-1' \(a str\)"):
    graph_from_atoms(water, 5.0, 4)
