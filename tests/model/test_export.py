"""e2former-export: a checkpoint as a jax.export artifact for one atom bucket; the reloaded artifact reproduces the
model (energies, forces, stress of a periodic cell) and refuses graphs of another bucket."""

import json

import ase.build
import numpy as np
import pytest
from flax import nnx
from model_helpers import TINY, molecules

from e2former_jax.checkpoint import export_model
from e2former_jax.config import get_config
from e2former_jax.export import ExportedPredictor, main
from e2former_jax.graph import graph_from_atoms
from e2former_jax.model import E2Former
from e2former_jax.predict import make_predict_fn

# The artifact holds the weights as constants, which XLA folds into the program (products of constant tables
# come out precomputed), so it is the same function in another operation order: float32 round-off of a different
# summation order, 1e-5 relative as every other comparison across programs (measured up to 4.4e-6).
TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  model = E2Former(get_config("small", **TINY, heads=("first", "second")), rngs=nnx.Rngs(3))
  model.set_element_energies({1: -13.6, 6: -1029.0, 7: -1485.0, 8: -2041.0}, head="second")
  return model, export_model(model, tmp_path_factory.mktemp("export") / "model")


def test_reloaded_artifact_reproduces_the_model(checkpoint, tmp_path, capsys):
  model, path = checkpoint
  out = tmp_path / "model.jaxexport"
  assert main([str(path), "--out", str(out), "--atoms", "32", "--graphs", "3", "--head", "second"]) == 0
  assert "32 atoms, 3 structures" in capsys.readouterr().out
  predictor = ExportedPredictor(out)
  assert json.loads(out.with_name(out.name + ".json").read_text())["head"] == "second"
  structures = molecules()[:2]
  graph, _ = graph_from_atoms(structures, predictor.cutoff, predictor.max_neighbors, 32, 3)
  expected = make_predict_fn(with_path(model, "jnp_node"), head="second")(graph)
  result = predictor(graph)
  for key in ("energy", "forces"):
    np.testing.assert_allclose(result[key], expected[key], rtol=TOL, atol=TOL * np.max(np.abs(expected[key])))
  bigger, _ = graph_from_atoms(structures, predictor.cutoff, predictor.max_neighbors, 48, 3)
  with pytest.raises(ValueError, match=r"graph.positions has shape \[48, 3\], the artifact takes \[32, 3\]"):
    predictor(bigger)


def test_periodic_artifact_with_stress(checkpoint, tmp_path):
  model, path = checkpoint
  out = tmp_path / "cell.jaxexport"
  assert main([str(path), "--out", str(out), "--atoms", "8", "--stress", "--periodic"]) == 0
  predictor = ExportedPredictor(out)
  copper = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
  copper.rattle(0.05, seed=1)
  graph, _ = graph_from_atoms([copper], predictor.cutoff, predictor.max_neighbors, 8, 2)
  expected = make_predict_fn(with_path(model, "jnp_node"), compute_stress=True)(graph)
  result = predictor(graph)
  for key in ("energy", "forces", "stress"):
    np.testing.assert_allclose(result[key], expected[key], rtol=TOL, atol=TOL * np.max(np.abs(expected[key])))


def with_path(model, attention_impl):
  from e2former_jax.checkpoint import assign_params, flatten

  other = E2Former(model.config.replace(attention_impl=attention_impl), rngs=nnx.Rngs(0))
  assign_params(other, flatten(nnx.state(model, nnx.Param)))
  for head in model.config.heads:
    other.head(head).element_energy[...] = model.head(head).element_energy[...]
  return other
