"""Slabs (periodic along two lattice vectors): the calculator gives the energy, forces and in-plane stress of the
same slab in a fully periodic cell with more vacuum than the model sees across."""

import ase.build
import numpy as np
import pytest
from model_helpers import TINY

from e2former_jax import E2FormerCalculator


def _slab():
  slab = ase.build.fcc111("Al", size=(2, 2, 3), vacuum=None, periodic=True, a=4.05)
  slab.rattle(0.05, seed=4)
  # vacuum: more than the receptive field each way, (blocks + 1) x cutoff (10 A for the tests' one block)
  slab.cell[2] = [0.0, 0.0, slab.positions[:, 2].max() - slab.positions[:, 2].min() + 25.0]
  slab.pbc = (True, True, False)
  return slab


@pytest.fixture(scope="module")
def calculator():
  return E2FormerCalculator("small", seed=0, attention_impl="jnp_node", **TINY)


def test_slab_equals_the_periodic_cell_with_vacuum(calculator):
  slab = _slab()
  bulk_like = slab.copy()
  bulk_like.pbc = True
  results = []
  for atoms in (slab, bulk_like):
    atoms.calc = calculator
    results.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)))
    atoms.calc = None
  (e0, f0, s0), (e1, f1, s1) = results
  # identical neighbour slots (no image across the vacuum): the same sums in the same order
  assert e0 == pytest.approx(e1, rel=1e-6) and np.allclose(f0, f1, rtol=0, atol=1e-5 * np.abs(f1).max())
  plane = np.ix_([0, 1], [0, 1])
  np.testing.assert_allclose(s0[plane], s1[plane], rtol=0, atol=1e-5 * np.abs(s1[plane]).max())
  assert np.all(s0[2] == 0) and np.all(s0[:, 2] == 0)  # no stress across the free direction
  assert np.abs(s0[plane]).max() > 0


def test_slab_stress_needs_a_volume(calculator):
  slab = _slab()
  slab.cell[2] = 0.0
  slab.calc = calculator
  slab.get_potential_energy()
  with pytest.raises(ValueError, match="cell of non-zero volume"):
    slab.get_stress()
