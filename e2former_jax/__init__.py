"""E2Former-V2 in JAX/Flax NNX: an equivariant transformer for energies and forces of atomistic systems."""

from e2former_jax.authors.importer import import_authors_checkpoint
from e2former_jax.calculator import E2FormerCalculator
from e2former_jax.config import MODEL_PRESETS, ModelConfig, get_config
from e2former_jax.graph import AtomGraph, graph_from_atoms
from e2former_jax.model import E2Former
from e2former_jax.predict import make_predict_fn, predict

__all__ = [
  "AtomGraph",
  "E2Former",
  "E2FormerCalculator",
  "ModelConfig",
  "MODEL_PRESETS",
  "get_config",
  "graph_from_atoms",
  "import_authors_checkpoint",
  "make_predict_fn",
  "predict",
]
