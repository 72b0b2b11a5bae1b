"""Element reference energies are added on the host in float64: a float32 total of a few hundred atoms with the
authors' references (about -1,036 eV per carbon) would round to several meV."""

import ase
import numpy as np
import pytest
from flax import nnx
from model_helpers import TINY

from e2former_jax.calculator import E2FormerCalculator
from e2former_jax.config import get_config
from e2former_jax.model import E2Former
from e2former_jax.potential import DevicePotential

REFERENCES = {1: -13.5719, 6: -1036.1178, 8: -2043.9317}  # eV, magnitudes of the authors' svp table


def cluster(n=300, seed=0):
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.arange(7)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n] * 1.6
  return ase.Atoms(numbers=rng.choice([1, 6, 8], n), positions=grid + rng.uniform(-0.1, 0.1, (n, 3)))


@pytest.mark.parametrize("path", ["device", "calculator"])
def test_references_add_exactly(path):
  """E(with references) - E(without) equals the float64 sum of the references to float32 round-off of the part
  above them (1e-5 eV here), far below the 31 meV spacing of float32 numbers near the total (-3e5 eV)."""
  atoms = cluster()
  cfg = get_config("small", **TINY, forces="direct", attention_impl="jnp_node")
  energies = []
  for references in ({}, REFERENCES):
    model = E2Former(cfg, rngs=nnx.Rngs(0))
    model.set_element_energies(references)
    if path == "device":
      energies.append(DevicePotential(model).from_atoms(atoms)["energy"])
    else:
      energies.append(E2FormerCalculator(model=model, neighbor_list="host").get_potential_energy(atoms))
  expected = sum(float(np.float32(REFERENCES[z])) for z in atoms.numbers)  # the model stores them in float32
  assert abs(expected) > 2e5
  assert abs((energies[1] - energies[0]) - expected) < 1e-5
