"""Imported authors' checkpoints in float64 reproduce the authors' float64 outputs: every fixture and head, the
energies, atomic energies, forces (-dE/dx, and the direct head's) and the node features after every stage."""

import jax
import pytest
from authors_helpers import (
  BRANCHES,
  batch,
  checkpoint_path,
  comparisons,
  config_path,
  evaluate,
  molecules,
  stage_errors,
  where_it_starts,
)

from e2former_jax.authors import import_authors_checkpoint

# Float64 against float64: both codes run the same operations in a different order; round-off of a few thousand
# operations on O(1-100) values stays near 1e-14 relative (measured <= 1e-14), far below 1e-10.
TOL64 = 1e-10


@pytest.fixture(scope="module", autouse=True)
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("name", sorted(BRANCHES))
def test_float64_outputs_and_features_equal_the_authors(name):
  model = import_authors_checkpoint(
    checkpoint_path(name), config_path(name), branch=BRANCHES[name], dtype="float64", element_references=False
  )
  graph = batch(model, molecules(name))
  for head, result in evaluate(model, graph).items():
    errors = comparisons(name, result, head, "float64")
    stages = stage_errors(name, result, head)
    assert len(stages) >= 4 * 4, "every molecule has its edge-degree, block and final features"
    worst = max(max(errors.values()), max(stages.values()))
    assert worst <= TOL64, f"{name} head {head}: " + where_it_starts(errors, stages, TOL64)
