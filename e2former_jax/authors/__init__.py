"""Reading the authors' PyTorch checkpoints and YAML configs without PyTorch (docs/authors_checkpoints.md)."""

from e2former_jax.authors.importer import AuthorsCheckpointError, import_authors_checkpoint
from e2former_jax.authors.pt_file import CheckpointFormatError, read_pt, read_state_dict
from e2former_jax.authors.references import MissingReferenceTable, head_reference_table
from e2former_jax.authors.yaml_config import (
  SUPPORTED_SWITCHES,
  AuthorsConfig,
  AuthorsConfigError,
  UnsupportedSwitchError,
  head_names,
  parse_irreps,
  read_yaml_config,
  translate,
)

__all__ = [
  "SUPPORTED_SWITCHES",
  "AuthorsCheckpointError",
  "AuthorsConfig",
  "AuthorsConfigError",
  "CheckpointFormatError",
  "UnsupportedSwitchError",
  "MissingReferenceTable",
  "head_names",
  "head_reference_table",
  "import_authors_checkpoint",
  "parse_irreps",
  "read_pt",
  "read_state_dict",
  "read_yaml_config",
  "translate",
]
