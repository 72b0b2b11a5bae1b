"""Reading the authors' PyTorch checkpoints and YAML configs without PyTorch (docs/authors_checkpoints.md)."""

from e2former_jax.authors.pt_file import CheckpointFormatError, read_pt, read_state_dict
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
  "AuthorsConfig",
  "AuthorsConfigError",
  "CheckpointFormatError",
  "UnsupportedSwitchError",
  "head_names",
  "parse_irreps",
  "read_pt",
  "read_state_dict",
  "read_yaml_config",
  "translate",
]
