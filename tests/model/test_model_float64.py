"""Float64 model tests: exact symmetries, finite-difference forces and stress, periodic cells, locality."""

import ase
import ase.build
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import evaluate, molecules, predictor, random_rotation, relative, transformed

from e2former_jax.graph import graph_from_atoms
from e2former_jax.predict import merge_model, predict, split_model

TOL64 = 1e-10  # symmetries in float64: round-off of a few hundred operations on O(10) values
FD_TOL = 1e-7  # central differences, h = 2e-5 A: truncation ~1e-9, round-off ~1e-9 relative


@pytest.fixture(scope="module", autouse=True)
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def f64(**kw):
  return dict(dtype="float64", **kw)


def central_difference_forces(structure, h=2e-5, **kw):
  forces = np.zeros((len(structure), 3))
  for i in range(len(structure)):
    for a in range(3):
      plus, minus = structure.copy(), structure.copy()
      plus.positions[i, a] += h
      minus.positions[i, a] -= h
      e = evaluate([plus, minus], **kw)["energy"]
      forces[i, a] = -(e[0] - e[1]) / (2 * h)
  return forces


def centroid_structures():
  """CH4 with the carbon exactly at the centroid, and a structure with an atom on the polar axis.

  The attention softmax shifts by the max logit and adds 1e-3 to the denominator (the authors' choice), so
  the energy has a kink where two logits tie, as they do at exactly symmetric geometries; central
  differences are no oracle there. The hydrogens are therefore displaced slightly off
  symmetry, and the carbon is placed at their mean, i.e. at the centroid (p = 0 after centring).
  (CO2 with its carbon at the centroid is necessarily linear and centrosymmetric, so it is checked at its
  symmetric geometry in ``test_exactly_symmetric_molecules_give_finite_balanced_forces`` instead.)
  """
  methane = ase.build.molecule("CH4")
  methane.positions[1:] += np.random.default_rng(5).normal(scale=0.05, size=(4, 3))
  methane.positions[0] = methane.positions[1:].mean(0)
  polar = ase.Atoms("NOH", positions=[[0, 0.0, 0], [0.1, 1.3, -0.2], [0.9, -0.5, 0.3]])
  polar.positions[0, [0, 2]] = polar.positions[1:, [0, 2]].mean(0)  # x, z of N = centroid's: on the y axis
  return [methane, polar]


@pytest.mark.parametrize("index", [0, 1], ids=["CH4", "polar-axis"])
def test_forces_equal_central_differences(index):
  structure = centroid_structures()[index]
  analytic = evaluate([structure], **f64())["forces"][0]
  assert relative(central_difference_forces(structure, **f64()), analytic) <= FD_TOL


@pytest.mark.parametrize("name", ["CH4", "CO2"])
def test_exactly_symmetric_molecules_give_finite_balanced_forces(name):
  forces = evaluate([ase.build.molecule(name)], **f64())["forces"][0]
  assert np.all(np.isfinite(forces))
  assert np.max(np.abs(forces.sum(0))) <= 1e-10 * np.max(np.abs(forces))


def test_rotation_translation_permutation_float64():
  mols = molecules()
  ref = evaluate(mols, **f64())
  rot = random_rotation(11)
  out = evaluate(
    [transformed(a, rot, translation=np.array([100.0, 3.0, -40.0]), permutation=np.arange(len(a))[::-1]) for a in mols],
    **f64(),
  )
  assert relative(out["energy"], ref["energy"]) <= TOL64
  for i, _a in enumerate(mols):
    assert relative(out["forces"][i], ref["forces"][i][::-1] @ rot.T) <= TOL64


def copper(cubic=True):
  atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=cubic)
  atoms.rattle(0.05, seed=3)
  return atoms


PERIODIC = dict(cutoff=3.0, max_neighbors=16)


def test_stress_equals_strain_derivative():
  from ase.calculators.fd import calculate_numerical_stress

  from e2former_jax import E2FormerCalculator

  _, model, _ = predictor(**f64(**PERIODIC))
  atoms = copper()
  atoms.calc = E2FormerCalculator(model=model)
  assert relative(calculate_numerical_stress(atoms, eps=1e-5), atoms.get_stress()) <= FD_TOL


def test_supercell_wrapping_and_small_box():
  cell = copper()
  # 32 atom slots, two structure slots: the calculator's padding, so these run the program of the stress test
  base = evaluate([cell], num_atoms=32, num_graphs=2, **f64(**PERIODIC))["energy"][0]
  supercell = cell.repeat((2, 2, 1))
  assert (
    abs(evaluate([supercell], num_atoms=32, num_graphs=2, **f64(**PERIODIC))["energy"][0] - 4 * base)
    <= 1e-9 * abs(base) * 4
  )
  wrapped = cell.copy()
  wrapped.positions[1] += wrapped.cell[0] - 2 * wrapped.cell[2]
  out = evaluate([wrapped], num_atoms=32, num_graphs=2, **f64(**PERIODIC))
  assert abs(out["energy"][0] - base) <= 1e-9 * abs(base)
  # The 3.6 A box is smaller than twice the 3 A cutoff: atoms see several images of one another. The same
  # local environments in an explicit cluster of images give the same atomic energies for the central cell.
  cfg, model, _ = predictor(**f64(**PERIODIC))
  images = [
    cell.positions + np.array([i, j, k]) @ cell.cell.array
    for i in range(-3, 4)
    for j in range(-3, 4)
    for k in range(-3, 4)
  ]
  positions = np.concatenate(images)
  # Atomic energies see (layers + 1) cutoffs: the edge-degree embedding plus one cutoff per block.
  radius = (cfg.num_layers + 1) * cfg.cutoff + 0.5
  keep = np.linalg.norm(positions[:, None] - cell.positions[None], axis=-1).min(1) <= radius
  cluster = ase.Atoms("Cu" * int(keep.sum()), positions=positions[keep])
  central = [np.flatnonzero(np.all(np.abs(cluster.positions - p) < 1e-12, axis=1))[0] for p in cell.positions]
  graphs = [
    graph_from_atoms([cell], cfg.cutoff, cfg.max_neighbors, 32, 2, np.float64)[0],
    graph_from_atoms([cluster], cfg.cutoff, cfg.max_neighbors, len(cluster) + 1, 2, np.float64)[0],
  ]
  _, params, elements, _ = split_model(model)

  @jax.jit
  def atom_energies(params, elements, graphs):  # the periodic cell and the cluster in one compiled call
    return [merge_model(cfg, params, elements)(graph)["atom_energy"] for graph in graphs]

  periodic_atoms, cluster_atoms = atom_energies(params, elements, graphs)
  assert relative(np.asarray(cluster_atoms)[central], np.asarray(periodic_atoms)[:4]) <= 1e-9


def test_locality_of_distant_fragments():
  water, ethanol = ase.build.molecule("H2O"), ase.build.molecule("CH3CH2OH")
  cfg, _, _ = predictor(**f64())
  dimer = water + transformed(ethanol, translation=np.array([(cfg.num_layers + 1) * cfg.cutoff + 1.0, 0, 0]))
  parts = evaluate([water, ethanol], **f64())["energy"]
  assert abs(evaluate([dimer], **f64())["energy"][0] - parts.sum()) <= 1e-10 * abs(parts.sum())


def test_isolated_atom_and_dilute_structure_have_finite_second_derivatives():
  cfg, model, _ = predictor(**f64())
  lonely = ase.Atoms("C")
  dilute = ase.Atoms("OH", positions=[[0, 0, 0], [0, 0, cfg.cutoff + 0.5]])
  graph, _ = graph_from_atoms([lonely, dilute], cfg.cutoff, cfg.max_neighbors, 8, 3, np.float64)
  outputs = lambda x: predict(model, graph.replace(positions=x))
  force_norm = lambda x: jnp.sum(outputs(x)["forces"] ** 2)

  @jax.jit
  def second_order(x, v):  # energies and forces with their derivative along v (-H v), the force-matching gradient
    out, tangent = jax.jvp(outputs, (x,), (v,))
    return out["energy"], out["forces"], tangent["forces"], jax.grad(force_norm)(x)

  direction = jnp.asarray(np.random.default_rng(0).normal(size=graph.positions.shape))
  energies, forces, *derivatives = second_order(graph.positions, direction)
  assert np.all(np.isfinite(np.asarray(energies))) and np.all(np.isfinite(np.asarray(forces)))
  for value in derivatives:
    assert np.all(np.isfinite(np.asarray(value)))
