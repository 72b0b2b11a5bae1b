"""ASE calculator for E2Former-V2 models."""

from __future__ import annotations

import ase
import jax
import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from flax import nnx

from e2former_jax.caller_warning import warn_at_caller
from e2former_jax.compile_cache import enable_compile_cache
from e2former_jax.config import ModelConfig, get_config
from e2former_jax.graph import graph_from_atoms
from e2former_jax.model import E2Former
from e2former_jax.potential import DevicePotential
from e2former_jax.predict import make_predict_fn, reference_table, total_energy_float64
from e2former_jax.system_keys import SYSTEM_KEYS
from e2former_jax.trained_domain import TrainedDomain

NEIGHBOR_LISTS = ("auto", "host", "device")


class E2FormerCalculator(Calculator):
  """Energy (eV), forces (eV/A) and, for periodic cells, stress (eV/A^3) from an E2Former-V2 model.

  Reads the total charge (default 0) and the multiplicity 2S+1 (default 1) from ``atoms.info`` in any spelling of
  ``e2former_jax.system_keys`` (``charge``/``total_charge``, ``spin``/``total_spin``/``multiplicity``).

  ``E2FormerCalculator(config="small", seed=0, **overrides)`` builds a randomly initialised model
  (``config`` a preset name or a ``ModelConfig``, ``overrides`` any ``ModelConfig`` field);
  ``E2FormerCalculator.from_checkpoint(path, **overrides)`` loads a trained one; ``E2FormerCalculator(model=model)``
  wraps a model in memory. ``head=`` picks one of a multi-head model's output heads (``model.config.heads``;
  default: the first), e.g. ``E2FormerCalculator.from_checkpoint(path, head="svp")``.

  A calculator from a checkpoint refuses structures with elements the checkpoint was not trained on
  (``UntrainedElementError`` naming them and the trained list; ``allow_untrained_elements=True`` makes it a
  warning) and warns about a total charge or multiplicity outside what training saw (``e2former_jax.trained_domain``).

  ``neighbor_list`` chooses how a structure reaches the model: "host" builds the neighbour slots with vesin on
  the CPU and pads atoms to a multiple of ``pad_to`` (an MD run compiles once); "device" builds them on the
  device in the same compiled call as the model (``e2former_jax.potential.DevicePotential``: atoms in Morton
  order, geometric atom buckets), several times faster for a new structure on a GPU; "auto" (default) takes
  "device" on a GPU and "host" elsewhere. Both give the same K nearest neighbours.
  """

  implemented_properties = ["energy", "free_energy", "forces", "stress"]

  def __init__(
    self,
    config: str | ModelConfig = "small",
    seed: int = 0,
    *,
    model: E2Former | None = None,
    pad_to: int = 32,
    head: str | None = None,
    domain: TrainedDomain | None = None,
    allow_untrained_elements: bool = False,
    neighbor_list: str = "auto",
    **overrides,
  ):
    super().__init__()
    enable_compile_cache()
    if neighbor_list not in NEIGHBOR_LISTS:
      raise ValueError(f"neighbor_list must be one of {NEIGHBOR_LISTS}, got {neighbor_list!r}")
    if neighbor_list == "auto":
      neighbor_list = "device" if jax.default_backend() == "gpu" else "host"
    self.neighbor_list = neighbor_list
    if model is None:
      model = E2Former(get_config(config, **overrides), rngs=nnx.Rngs(seed))
    elif overrides:
      raise TypeError("overrides apply only when the calculator builds the model")
    model.head(head)  # an unknown head name raises here, naming the model's heads
    self.model = model
    self.head = head
    self.pad_to = pad_to
    self.domain = domain if domain is not None else TrainedDomain()
    self.allow_untrained_elements = allow_untrained_elements
    self.checkpoint: str | None = None
    self._predict = {}
    self._device = {}
    self._warned_truncation = False

  @classmethod
  def from_checkpoint(
    cls,
    path,
    *,
    pad_to: int = 32,
    head: str | None = None,
    allow_untrained_elements: bool = False,
    neighbor_list: str = "auto",
    **overrides,
  ) -> E2FormerCalculator:
    """Loads a trained model from a training run directory (best, else last) or a step directory.

    ``head`` picks the output head of a multi-head checkpoint (default: its first); the elements it checks are
    that head's when the checkpoint lists them per head (imported checkpoints, meta ``"head_elements"``).

    ``overrides`` may set what does not change the trained function (``checkpoint.RUNTIME_OVERRIDES``:
    ``dtype``, ``attention_impl``, ``matmul_precision``); any other field is refused by name.
    """
    from e2former_jax.checkpoint import load_model, resolve_step_dir, trained_domain

    step_dir = resolve_step_dir(path)
    calc = cls(
      model=load_model(step_dir, **overrides),
      pad_to=pad_to,
      head=head,
      neighbor_list=neighbor_list,
      domain=trained_domain(step_dir, head),
      allow_untrained_elements=allow_untrained_elements,
    )
    calc.checkpoint = str(step_dir)
    return calc

  def check_state(self, atoms: ase.Atoms, tol: float = 1e-15) -> list[str]:
    """ASE's change detection, plus every spelling of the total charge and multiplicity in ``atoms.info``."""
    changes = super().check_state(atoms, tol)
    if self.atoms is not None and any(repr(atoms.info.get(k)) != repr(self.atoms.info.get(k)) for k in SYSTEM_KEYS):
      changes.append("info")
    return changes

  @property
  def config(self) -> ModelConfig:
    return self.model.config

  def calculate(self, atoms: ase.Atoms | None = None, properties=("energy",), system_changes=all_changes):
    # checked before ASE stores the atoms, so a refused structure is checked again on the next call
    if {"numbers", "info"} & set(system_changes):
      self.domain.check(
        [atoms if atoms is not None else self.atoms],
        self.config,
        self.allow_untrained_elements,
        allow_hint="pass allow_untrained_elements=True to the calculator",
      )
    super().calculate(atoms, properties, system_changes)
    atoms = self.atoms
    want_stress = "stress" in properties and bool(atoms.pbc.any()) and atoms.cell.volume > 0
    if self.neighbor_list == "device":
      out = self._device_call(atoms, want_stress)
    else:
      out = self._host_call(atoms, want_stress)
    self._warn_truncation(out["num_dropped"])
    self.results["energy"] = out["energy"]
    self.results["free_energy"] = out["energy"]
    self.results["forces"] = np.asarray(out["forces"], dtype=np.float64)
    if want_stress:
      s = np.asarray(out["stress"], dtype=np.float64)
      self.results["stress"] = s[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    elif "stress" in properties:
      raise ValueError(
        "stress needs a structure periodic along some lattice vector and a cell of non-zero volume (for a slab, "
        "give the free direction a cell vector; the stress is that of the periodic directions)"
      )

  def _host_call(self, atoms: ase.Atoms, want_stress: bool) -> dict:
    """Neighbour slots on the host (vesin), atoms padded to a multiple of ``pad_to``, then the jitted model."""
    cfg = self.config
    num_atoms = (len(atoms) // self.pad_to + 1) * self.pad_to
    graph, beyond = graph_from_atoms(
      [atoms], cfg.cutoff, cfg.max_neighbors, num_atoms=num_atoms, num_graphs=2, dtype=cfg.numpy_dtype
    )
    if want_stress not in self._predict:  # the weights and the references are read together, here
      fn = make_predict_fn(self.model, compute_stress=want_stress, head=self.head)
      self._predict[want_stress] = fn, reference_table(self.model, self.head)
    fn, references = self._predict[want_stress]
    out = jax.device_get(fn(graph))
    energy = total_energy_float64(out["energy_above_reference"][0], atoms.numbers, references)
    result = {"energy": energy, "forces": out["forces"][: len(atoms)], "num_dropped": beyond}
    if want_stress:
      result["stress"] = out["stress"][0]
    return result

  def _device_call(self, atoms: ase.Atoms, want_stress: bool) -> dict:
    """Positions to forces in one compiled call with the neighbour slots built on the device (``potential``)."""
    if want_stress not in self._device:
      self._device[want_stress] = DevicePotential(self.model, compute_stress=want_stress, head=self.head)
    return self._device[want_stress].from_atoms(atoms)

  def _warn_truncation(self, beyond: int) -> None:
    if not beyond or self._warned_truncation:
      return
    cfg = self.config
    if self.checkpoint is None:
      remedy = "pass a larger max_neighbors= to E2FormerCalculator"
    else:
      remedy = (
        "the K nearest are part of this trained model, so for condensed phases use a model trained with a larger K, "
        f"e.g. fine-tune this one: --init-from {self.checkpoint} --set model.max_neighbors=64"
      )
    warn_at_caller(
      f"{beyond} neighbour pairs within the cutoff ({cfg.cutoff} A) were dropped because atoms have more than "
      f"K={cfg.max_neighbors} neighbours (the model sees the K nearest); {remedy}"
    )
    self._warned_truncation = True
