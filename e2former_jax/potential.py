"""Positions to energy, forces and stress in one compiled call: neighbour slots, spatial order and the model all on
the device (the calculator's path on a GPU, and a function for JAX users).

``device_graph`` is the jittable part for JAX pipelines: padded positions, numbers and a cell in, an ``AtomGraph``
out, its atoms in spatial (Morton) order and its slots from the O(N) device search
(``e2former_jax.neighbors.device``). ``DevicePotential`` is the host-facing wrapper: numpy in, numpy out, atom
counts padded to a few geometric buckets (screening structures of many sizes compiles a few programs, not one per
size), search capacities grown and the program rebuilt when a build overflows, bad input refused by name.

Spatial order. Atoms are sorted by the Morton code of their position (10 bits per axis over the bounding box of
the structure) before the model and the outputs are mapped back, so that the targets of a tile of the attention
kernel read mostly the same neighbour rows. The order never changes the result beyond float32 round-off: the
neighbour search keeps the same K atoms whatever the order in memory (distance, then displacement, on a fixed
grid: ``neighbors.host.selection_order``), and the model sums over slots and atoms.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from e2former_jax.compile_cache import StoredPrograms, enable_compile_cache
from e2former_jax.config import ModelConfig
from e2former_jax.device_memory import explained_out_of_memory
from e2former_jax.elements import MAX_ATOMIC_NUMBER
from e2former_jax.graph import AtomGraph
from e2former_jax.model import E2Former
from e2former_jax.neighbors.device import (
  DeviceSlots,
  SearchCapacity,
  fit_neighbor_slots,
  neighbor_slots,
  raise_for_bad_input,
)
from e2former_jax.predict import merge_model, predict, reference_table, split_model, total_energy_float64

MORTON_BITS = 10  # per axis: 1024 bins along the longest side of the bounding box
LARGE_BUCKET_FROM, LARGE_BUCKET_STEP = 65_536, 16_384  # atom slots
CAPACITY_HEADROOM = 1.25  # search capacity for 1.25x the bin and candidate counts of the first structure


def atom_bucket(num_atoms: int, smallest: int = 32, growth: float = 1.25) -> int:
  """Atom slots for ``num_atoms`` real atoms and one padding atom: the smallest of smallest * growth^k, rounded
  up to a multiple of 32, that holds them (32, 64, 96, 128, 160, 192, 256, 320, 384, 480, ...: from 256 atoms
  on, each bucket is at most 1.3 times the one before, so 27 programs cover every size up to 20,000 atoms).
  Where that bucket would exceed ``LARGE_BUCKET_FROM`` slots, the buckets are multiples of ``LARGE_BUCKET_STEP``
  instead: a large system pays fewer padding atoms than that (1.6% at a million), not up to a quarter of its
  size."""
  need, bucket = num_atoms + 1, float(smallest)
  while int(32 * np.ceil(bucket / 32)) < need:
    bucket *= growth
  geometric = int(32 * np.ceil(bucket / 32))
  return geometric if geometric <= LARGE_BUCKET_FROM else -(-need // LARGE_BUCKET_STEP) * LARGE_BUCKET_STEP


def _spread_bits(x: jax.Array) -> jax.Array:
  """Bits b of a 10-bit integer moved to bit 3b (uint32)."""
  x = x & 0x3FF
  x = (x | (x << 16)) & 0x030000FF
  x = (x | (x << 8)) & 0x0300F00F
  x = (x | (x << 4)) & 0x030C30C3
  return (x | (x << 2)) & 0x09249249


def morton_order(positions: jax.Array, atom_mask: jax.Array) -> jax.Array:
  """[N] int32 permutation that sorts real atoms by the Morton code of their position (ties by index) and puts
  padding atoms last, in their order."""
  real = atom_mask[:, None]
  lo = jnp.min(jnp.where(real, positions, jnp.inf), axis=0)
  hi = jnp.max(jnp.where(real, positions, -jnp.inf), axis=0)
  scale = (2**MORTON_BITS - 1) / jnp.maximum(jnp.max(hi - lo), 1e-6)
  q = jnp.clip(jnp.floor((positions - lo) * scale), 0, 2**MORTON_BITS - 1).astype(jnp.uint32)
  code = _spread_bits(q[:, 0]) | (_spread_bits(q[:, 1]) << 1) | (_spread_bits(q[:, 2]) << 2)
  code = jnp.where(atom_mask, code.astype(jnp.int32), 2 ** (3 * MORTON_BITS))
  return jnp.argsort(code, stable=True).astype(jnp.int32)


def device_graph(
  positions: jax.Array,
  numbers: jax.Array,
  atom_mask: jax.Array,
  cell: jax.Array,
  charge: jax.Array,
  spin: jax.Array,
  *,
  cfg: ModelConfig,
  pbc: tuple[bool, bool, bool],
  capacity: SearchCapacity,
  spatial_order: bool = True,
) -> tuple[AtomGraph, jax.Array, DeviceSlots]:
  """One structure as a padded ``AtomGraph`` built on the device (jittable; static: cfg, pbc, capacity).

  Args:
    positions: [N, 3] Angstrom, centred (real atoms first or anywhere; at least one padding atom).
    numbers: [N] int32 atomic numbers (0 for padding).
    atom_mask: [N] bool, real atom.
    cell: [3, 3] lattice vectors as rows (Angstrom; rows of free directions unused).
    charge, spin: int32 scalars, total charge and multiplicity 2S+1.
    cfg: the model's config (cutoff, K).
    pbc: periodicity along each lattice vector.
    capacity: search capacity (``SearchCapacity``).
    spatial_order: sort atoms by Morton code first.

  Returns:
    The graph (two structure slots: the structure and the padding one), the permutation ``order`` with
    ``graph.positions == positions[order]`` (outputs per atom map back by ``out.at[order].set(...)``), and the
    search's ``DeviceSlots`` (overflow and bad-input reports).
  """
  n = positions.shape[0]
  order = morton_order(positions, atom_mask) if spatial_order else jnp.arange(n, dtype=jnp.int32)
  positions, numbers, atom_mask = positions[order], numbers[order], atom_mask[order]
  slots = neighbor_slots(
    positions, cell, atom_mask, pbc=pbc, cutoff=cfg.cutoff, max_neighbors=cfg.max_neighbors, capacity=capacity
  )
  graph = AtomGraph(
    positions=positions,
    numbers=jnp.where(atom_mask, numbers, 0).astype(jnp.int32),
    atom_mask=atom_mask,
    neighbors=slots.neighbors,
    neighbor_mask=slots.mask,
    neighbor_shift=slots.shift,
    graph_index=jnp.where(atom_mask, 0, 1).astype(jnp.int32),
    charge=jnp.stack([jnp.asarray(charge, jnp.int32), jnp.int32(0)]),
    spin=jnp.stack([jnp.asarray(spin, jnp.int32), jnp.int32(1)]),
    cell=jnp.stack([jnp.asarray(cell, positions.dtype), jnp.zeros((3, 3), positions.dtype)]),
    pbc=jnp.asarray([pbc, (False, False, False)]),
    graph_mask=jnp.asarray([True, False]),
    periodic=any(pbc),
  )
  return graph, order, slots


@functools.cache
def _compiled(
  cfg: ModelConfig,
  weights_tree,
  pbc: tuple,
  capacity: SearchCapacity,
  compute_stress: bool,
  spatial_order: bool,
  head: str | None,
) -> StoredPrograms:
  """The jitted positions-to-outputs function of one static setting, its traced programs kept on disk
  (``compile_cache.StoredPrograms``): (outputs, the search's report as ``DeviceSlots.report``). Its first
  argument is the flat tuple of the model's weights, (parameters, element energies) flattened to
  ``weights_tree``: a tuple is flattened and signed in microseconds on every call, where the nested parameter
  state took about a millisecond."""

  def fn(weights, positions, numbers, atom_mask, cell, charge, spin):
    params, elements = jax.tree.unflatten(weights_tree, weights)
    graph, order, slots = device_graph(
      positions,
      numbers,
      atom_mask,
      cell,
      charge,
      spin,
      cfg=cfg,
      pbc=pbc,
      capacity=capacity,
      spatial_order=spatial_order,
    )
    out = predict(merge_model(cfg, params, elements), graph, compute_stress, head)
    result = {
      "energy_above_reference": out["energy_above_reference"][0],
      "forces": jnp.zeros_like(out["forces"]).at[order].set(out["forces"]),
    }
    if compute_stress:
      result["stress"] = out["stress"][0]
    return result, slots.report()

  setting = f"DevicePotential {cfg!r} pbc={pbc} {capacity!r} stress={compute_stress} sorted={spatial_order} {head=}"
  return StoredPrograms(fn, setting)


def padded_structure(positions, numbers, cell, num_slots: int, dtype) -> tuple[np.ndarray, ...]:
  """One structure as the device path takes it, padded to ``num_slots`` atom slots: positions [num_slots, 3]
  (Angstrom, centred on their mean in float64, then cast to ``dtype``; left as given if any is not finite, so
  the device's input check names them), atomic numbers [num_slots] int32 (0 for padding), mask [num_slots] and
  cell [3, 3] (``dtype``; zeros for None)."""
  positions = np.asarray(positions, np.float64)
  n = len(positions)
  padded = np.zeros((num_slots, 3))
  padded[:n] = positions - (positions.mean(axis=0) if np.all(np.isfinite(positions)) else 0.0)
  z = np.zeros(num_slots, np.int32)
  z[:n] = numbers
  cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, np.float64)
  return padded.astype(dtype), z, np.arange(num_slots) < n, cell.astype(dtype)


@dataclasses.dataclass
class DevicePotential:
  """Energy, forces and (optionally) stress of one structure at a time, everything on the device.

  Attributes:
    model: the ``E2Former`` (its parameters are read once, at construction).
    compute_stress: also return the stress (periodic directions only; eV/A^3).
    spatial_order: sort atoms by Morton code before the model (results unchanged; faster attention).
    capacity: the neighbour search's current capacity; grown (through fixed buckets) when a build overflows.
    head: the output head of a multi-head model (None: its default head).
  """

  model: E2Former
  compute_stress: bool = False
  spatial_order: bool = True
  capacity: SearchCapacity = dataclasses.field(default_factory=SearchCapacity)
  head: str | None = None

  def __post_init__(self):
    enable_compile_cache()
    self.model.head(self.head)  # an unknown head name raises here, naming the model's heads
    self._probed = set()
    _, params, elements, _ = split_model(self.model)
    weights, self._weights_tree = jax.tree.flatten((params, elements))
    self._weights = tuple(weights)
    self.cfg = self.model.config
    self.dtype = self.cfg.numpy_dtype
    self.references = reference_table(self.model, self.head)

  def __call__(self, positions, numbers, cell=None, pbc=(False, False, False), charge: int = 0, spin: int = 1) -> dict:
    """Outputs for one structure.

    Args:
      positions: [n, 3] Angstrom.
      numbers: [n] atomic numbers.
      cell: [3, 3] lattice vectors as rows (Angstrom), needed along periodic directions.
      pbc: periodicity along each lattice vector (bool or three).
      charge, spin: total charge and multiplicity 2S+1.

    Returns:
      numpy: "energy" (eV), "forces" [n, 3] (eV/A), "stress" [3, 3] (eV/A^3, with ``compute_stress``) and
      "num_dropped" (in-cutoff pairs beyond K, part of the model's definition).
    """
    positions = np.asarray(positions, np.float64)
    numbers = np.asarray(numbers)
    n = len(numbers)
    if n == 0:
      raise ValueError("the structure is empty (no atoms)")
    if positions.shape != (n, 3):
      raise ValueError(f"positions must have shape [{n}, 3] for {n} atoms, got {positions.shape}")
    bad = (numbers < 1) | (numbers > MAX_ATOMIC_NUMBER) | (numbers >= self.cfg.num_species)
    if bad.any():
      raise ValueError(f"unknown element(s) with atomic number {sorted(set(numbers[bad].tolist()))}")
    pbc = tuple(bool(p) for p in np.broadcast_to(np.asarray(pbc, bool), (3,)))
    slots_n = atom_bucket(n)
    padded, z, mask, cell = padded_structure(positions, numbers, cell, slots_n, self.dtype)
    args = (padded, z, mask, cell, np.int32(charge), np.int32(spin))
    if (slots_n, pbc) not in self._probed:
      self._probe_capacity(padded, cell, mask, pbc)
      self._probed.add((slots_n, pbc))
    while True:
      fn = _compiled(
        self.cfg, self._weights_tree, pbc, self.capacity, self.compute_stress, self.spatial_order, self.head
      )
      with explained_out_of_memory(self.cfg, n, "energy and forces"):
        out, report = jax.device_get(fn(self._weights, *args))  # one transfer of three arrays
      slots = DeviceSlots.from_report(report)
      raise_for_bad_input(slots)
      if not bool(slots.overflow):
        break
      grown = self.capacity.grown(slots)
      if grown == self.capacity:  # what fit_neighbor_slots bounds with max_attempts: never rebuild in a loop
        raise RuntimeError(f"the device neighbour search overflows and its capacity cannot grow ({grown})")
      self.capacity = grown
    energy = total_energy_float64(out["energy_above_reference"], numbers, self.references)
    result = {"energy": energy, "forces": out["forces"][:n]}
    if self.compute_stress:
      result["stress"] = out["stress"]
    result["num_dropped"] = int(slots.num_dropped)
    return result

  def _probe_capacity(self, positions, cell, mask, pbc) -> None:
    """Before the first model program of an atom bucket: the search alone (a small program, quick to compile)
    finds the capacity this structure needs, with ``CAPACITY_HEADROOM``, so the model program is not compiled
    once for an overflowing default and again for the grown capacity, and nearby structures (an MD run, a
    relaxation) fit it too."""
    cfg = self.cfg
    slots, _ = fit_neighbor_slots(
      positions, cell, mask, pbc=pbc, cutoff=cfg.cutoff, max_neighbors=cfg.max_neighbors, capacity=self.capacity
    )
    self.capacity = self.capacity.grown(slots, headroom=CAPACITY_HEADROOM)

  def from_atoms(self, atoms) -> dict:
    """``self(...)`` for an ``ase.Atoms`` (charge and multiplicity from ``atoms.info``, any spelling)."""
    from e2former_jax.system_keys import charge_and_multiplicity

    charge, spin = charge_and_multiplicity(atoms.info)
    return self(atoms.get_positions(), atoms.get_atomic_numbers(), atoms.cell.array, atoms.pbc, charge, spin)
