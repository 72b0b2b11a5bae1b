"""ASE calculator for E2Former-V2 models."""

from __future__ import annotations

import warnings

import ase
import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from flax import nnx

from e2former_jax.config import ModelConfig, get_config
from e2former_jax.graph import graph_from_atoms
from e2former_jax.model import E2Former
from e2former_jax.predict import make_predict_fn


class E2FormerCalculator(Calculator):
  """Energy (eV), forces (eV/A) and, for periodic cells, stress (eV/A^3) from an E2Former-V2 model.

  Reads ``atoms.info["charge"]`` (default 0) and ``atoms.info["spin"]`` (multiplicity, default 1).

  ``E2FormerCalculator(config="small", seed=0, **overrides)`` builds a randomly initialised model
  (``config`` a preset name or a ``ModelConfig``, ``overrides`` any ``ModelConfig`` field);
  ``E2FormerCalculator.from_checkpoint(path)`` loads a trained one; ``E2FormerCalculator(model=model)``
  wraps a model in memory.

  Structures are padded to a multiple of ``pad_to`` atoms, so an MD run compiles once.
  """

  implemented_properties = ["energy", "free_energy", "forces", "stress"]

  def __init__(
    self,
    config: str | ModelConfig = "small",
    seed: int = 0,
    *,
    model: E2Former | None = None,
    pad_to: int = 32,
    **overrides,
  ):
    super().__init__()
    if model is None:
      model = E2Former(get_config(config, **overrides), rngs=nnx.Rngs(seed))
    elif overrides:
      raise TypeError("overrides apply only when the calculator builds the model")
    self.model = model
    self.pad_to = pad_to
    self._predict = {}
    self._warned_truncation = False

  @classmethod
  def from_checkpoint(cls, path, **kwargs) -> E2FormerCalculator:
    """Loads a trained model from a training run directory (best, else last) or a step directory."""
    from e2former_jax.checkpoint import load_model

    return cls(model=load_model(path), **kwargs)

  def check_state(self, atoms: ase.Atoms, tol: float = 1e-15) -> list[str]:
    """ASE's change detection, plus the total charge and multiplicity in ``atoms.info``."""
    changes = super().check_state(atoms, tol)
    if self.atoms is not None and any(atoms.info.get(k) != self.atoms.info.get(k) for k in ("charge", "spin")):
      changes.append("info")
    return changes

  @property
  def config(self) -> ModelConfig:
    return self.model.config

  def calculate(self, atoms: ase.Atoms | None = None, properties=("energy",), system_changes=all_changes):
    super().calculate(atoms, properties, system_changes)
    atoms = self.atoms
    cfg = self.config
    num_atoms = (len(atoms) // self.pad_to + 1) * self.pad_to
    dtype = np.float64 if cfg.dtype == "float64" else np.float32
    graph, beyond = graph_from_atoms(
      [atoms], cfg.cutoff, cfg.max_neighbors, num_atoms=num_atoms, num_graphs=2, dtype=dtype
    )
    if beyond and not self._warned_truncation:
      warnings.warn(
        f"{beyond} neighbour pairs within the cutoff were dropped because atoms have more than "
        f"K={cfg.max_neighbors} neighbours (the model's definition); consider a larger "
        "max_neighbors for condensed phases",
        stacklevel=2,
      )
      self._warned_truncation = True
    want_stress = "stress" in properties and bool(atoms.pbc.all())
    if want_stress not in self._predict:
      self._predict[want_stress] = make_predict_fn(self.model, compute_stress=want_stress)
    out = self._predict[want_stress](graph)
    energy = float(out["energy"][0])
    self.results["energy"] = energy
    self.results["free_energy"] = energy
    self.results["forces"] = np.asarray(out["forces"][: len(atoms)], dtype=np.float64)
    if want_stress:
      s = np.asarray(out["stress"][0], dtype=np.float64)
      self.results["stress"] = s[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    elif "stress" in properties:
      raise ValueError("stress is defined only for fully periodic structures (atoms.pbc all True)")
