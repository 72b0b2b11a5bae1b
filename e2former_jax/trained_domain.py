"""What a checkpoint was trained on (elements, total charges, multiplicities), and checks of inputs against it.

A checkpoint's meta records (``checkpoint.make_meta``):

* ``"elements"``: sorted atomic numbers of the training set. Checkpoints written before this key existed (the
  shipped demo checkpoint among them) take the keys of their element reference energies instead; a checkpoint
  with neither has no list, and nothing is checked.
* ``"charges"``, ``"multiplicities"``: sorted values seen in training, when training recorded them.

Structures with other elements are refused (``UntrainedElementError``, naming them and the trained list) unless
the caller opts in, which turns the error into a warning: the model's output for an element it never saw is
meaningless. A charge or multiplicity outside what training saw only warns (the embedding still gives a value):
outside the recorded values when recorded, else outside the embedding's clip range (model.md §6), and always
when the model ignores the input (``use_charge_spin=False``; multiplicity with ``spin_input="zero"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import ase
import numpy as np
from ase.data import chemical_symbols

from e2former_jax.caller_warning import warn_at_caller
from e2former_jax.config import ModelConfig
from e2former_jax.model import MAX_ABS_CHARGE, MAX_SPIN_INDEX
from e2former_jax.system_keys import DEFAULT_CHARGE, DEFAULT_MULTIPLICITY, charge_and_multiplicity


class UntrainedElementError(ValueError):
  """A structure holds elements that the checkpoint was not trained on."""


def element_names(numbers: Iterable[int]) -> str:
  """``"U (92), Og (118)"``."""
  return ", ".join(f"{chemical_symbols[z] if 0 < z < len(chemical_symbols) else '?'} ({z})" for z in numbers)


def _sorted_ints(values: Iterable, what: str) -> tuple[int, ...]:
  out = set()
  for v in values:
    if isinstance(v, bool) or int(v) != v:
      raise ValueError(f"{what} must be integers, got {v!r}")
    out.add(int(v))
  return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class TrainedDomain:
  """Elements (atomic numbers), total charges (e) and multiplicities (2S+1) a model was trained on.

  ``None`` means unknown (not checked, or checked against the embedding's range for charge and multiplicity).
  """

  elements: tuple[int, ...] | None = None
  charges: tuple[int, ...] | None = None
  multiplicities: tuple[int, ...] | None = None

  def __post_init__(self):
    for name in ("elements", "charges", "multiplicities"):
      value = getattr(self, name)
      if value is not None:
        object.__setattr__(self, name, _sorted_ints(value, name))
    if self.elements is not None and any(not 1 <= z <= 118 for z in self.elements):
      raise ValueError(f"elements must be atomic numbers 1..118, got {list(self.elements)}")

  @classmethod
  def of_structures(cls, structures: Sequence[ase.Atoms]) -> TrainedDomain:
    """The elements, charges and multiplicities of every structure (each one read once)."""
    elements, charges, spins = set(), set(), set()
    for i in range(len(structures)):
      atoms = structures[i]
      elements.update(np.unique(atoms.numbers).tolist())
      charge, spin = charge_and_multiplicity(atoms.info, where=f"structure {i}")
      charges.add(charge)
      spins.add(spin)
    return cls(tuple(elements), tuple(charges), tuple(spins))

  @classmethod
  def from_meta(cls, meta: Mapping) -> TrainedDomain:
    """From a checkpoint's meta (``"elements"``, else the keys of ``"element_references"``)."""
    elements = meta.get("elements")
    if elements is None:
      refs = meta.get("element_references") or {}
      elements = [int(z) for z in refs] or None
    return cls(elements, meta.get("charges"), meta.get("multiplicities"))

  @classmethod
  def from_checkpoint(cls, path) -> TrainedDomain:
    """Of the checkpoint that ``path`` names (see ``checkpoint.resolve_step_dir``)."""
    from e2former_jax.checkpoint import read_meta

    return cls.from_meta(read_meta(path))

  def union(self, other: TrainedDomain) -> TrainedDomain:
    """What either domain covers (unknown where either is unknown)."""
    merged = {}
    for name in ("elements", "charges", "multiplicities"):
      a, b = getattr(self, name), getattr(other, name)
      merged[name] = None if a is None or b is None else tuple(set(a) | set(b))
    return TrainedDomain(**merged)

  def to_meta(self) -> dict:
    """``{"elements": [...], "charges": [...], "multiplicities": [...]}`` (the known entries only)."""
    return {k: list(v) for k, v in dataclasses.asdict(self).items() if v is not None}

  def untrained_elements(self, numbers: Iterable[int]) -> list[int]:
    """The atomic numbers among ``numbers`` outside ``elements`` (none when the list is unknown)."""
    if self.elements is None:
      return []
    return sorted(set(np.asarray(list(numbers), dtype=np.int64).tolist()) - set(self.elements))

  def untrained_elements_message(self, untrained: Sequence[int], where: str, allow_hint: str) -> str:
    """The error (or, when allowed, warning) text for ``untrained`` elements found in ``where``."""
    return (
      f"{where} contains element(s) {element_names(untrained)} that the checkpoint was not trained on "
      f"(trained on {element_names(self.elements or ())}); its predictions for them are meaningless "
      f"({allow_hint} to predict anyway)"
    )

  def charge_and_spin_problem(self, charge: int, spin: int, config: ModelConfig) -> str | None:
    """Why a total charge and multiplicity fall outside what the model saw in training; None when they do not."""
    if not config.use_charge_spin:
      if (charge, spin) != (DEFAULT_CHARGE, DEFAULT_MULTIPLICITY):
        return f"this model has no charge or spin input: total charge {charge} and multiplicity {spin} are ignored"
      return None
    problems = []
    if self.charges is not None and charge not in self.charges:
      problems.append(f"total charge {charge} never occurred in training (charges seen: {list(self.charges)})")
    elif self.charges is None and abs(charge) > MAX_ABS_CHARGE:
      problems.append(
        f"total charge {charge} is outside the charge embedding's range -{MAX_ABS_CHARGE}..{MAX_ABS_CHARGE}"
      )
    if config.spin_input == "zero":
      if spin != DEFAULT_MULTIPLICITY:
        problems.append(f"multiplicity {spin} is ignored by this model (spin_input='zero')")
    elif self.multiplicities is not None and spin not in self.multiplicities:
      problems.append(f"multiplicity {spin} never occurred in training (seen: {list(self.multiplicities)})")
    elif self.multiplicities is None and spin > MAX_SPIN_INDEX:
      problems.append(f"multiplicity {spin} is outside the spin embedding's range 1..{MAX_SPIN_INDEX}")
    return "; ".join(problems) or None

  def check(
    self,
    structures: Sequence[ase.Atoms],
    config: ModelConfig,
    allow_untrained_elements: bool = False,
    allow_hint: str = "pass allow_untrained_elements=True",
  ) -> None:
    """Raises ``UntrainedElementError`` for elements outside ``elements`` (a warning when allowed) and warns
    once about charges and multiplicities outside what the model saw. Both messages count the structures and
    name the first one (index and ``source``)."""
    untrained, first, count = set(), None, 0
    problems: dict[str, int] = {}
    for i in range(len(structures)):
      atoms = structures[i]
      label = ", ".join(
        [atoms.get_chemical_formula(), *([str(atoms.info["source"])] if "source" in atoms.info else [])]
      )
      where = f"structure {i} ({label})"
      bad = self.untrained_elements(atoms.numbers)
      if bad:
        untrained.update(bad)
        first = first or where
        count += 1
      problem = self.charge_and_spin_problem(*charge_and_multiplicity(atoms.info, where=where), config)
      if problem:
        problems.setdefault(problem, 0)
        problems[problem] += 1
    if untrained:
      where = first if len(structures) == 1 else f"{count} of {len(structures)} structures (first: {first})"
      message = self.untrained_elements_message(sorted(untrained), where, allow_hint)
      if not allow_untrained_elements:
        raise UntrainedElementError(message)
      warn_at_caller(message.split("; its predictions")[0] + "; predicting anyway (allowed)")
    for problem, n in problems.items():
      warn_at_caller(problem + ("" if len(structures) == 1 else f" ({n} of {len(structures)} structures)"))


__all__ = ["TrainedDomain", "UntrainedElementError", "element_names"]
