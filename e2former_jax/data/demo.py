"""The demo data shipped in ``e2former_jax/demo_data`` (see its DATA_CARD.md)."""

from __future__ import annotations

from pathlib import Path

import ase

DEMO_SPLITS = ("train", "valid", "test", "ethanol_pbe_def2svp")


def demo_data_path(split: str = "train") -> Path:
  """Path of a shipped demo file: ``"train"``, ``"valid"``, ``"test"`` (GFN2-xTB MD frames) or
  ``"ethanol_pbe_def2svp"`` (ethanol frames relabelled with PBE/def2-SVP)."""
  if split not in DEMO_SPLITS:
    raise ValueError(f"unknown demo split {split!r}; choose from {DEMO_SPLITS}")
  path = Path(__file__).resolve().parent.parent / "demo_data" / f"{split}.xyz"
  if not path.exists():
    raise FileNotFoundError(
      f"{path} is missing: the package was installed without its data files (regenerate with scripts/make_demo_data.py)"
    )
  return path


def load_demo(split: str = "train", config_types: str | list[str] | None = None) -> list[ase.Atoms]:
  """Reads a shipped demo split; ``config_types`` keeps only those molecules (e.g. ``"ethanol"``)."""
  from e2former_jax.data.readers import load

  atoms = load(demo_data_path(split))
  if config_types is not None:
    keep = {config_types} if isinstance(config_types, str) else set(config_types)
    atoms = [a for a in atoms if a.info.get("config_type") in keep]
  return atoms
