"""Molecular dynamics fully in JAX: velocity Verlet (NVE) and BAOAB Langevin (NVT), jitted on the device.

The fastest way to run dynamics with a model: ``steps_per_call`` steps run as one compiled program (a
``lax.scan``) holding the neighbour list, the model and the integrator, with the state's buffers donated
(updated in place). The neighbour list (``e2former_jax.neighbors.skin``) is a Verlet buffer within
``cutoff + skin`` from the O(N) device search (molecules, periodic cells and slabs alike), rebuilt inside the
scan only when an atom has moved more than half the skin; every step picks the K nearest from it by the host
builder's rule. Its capacities are sized once by device searches, with headroom; a build that needs more rolls
its step back and stops the chunk, the host grows the capacity (recompiling once) and the run goes on from
there, so no neighbour is ever dropped.

Atoms are kept in spatial (Morton) order (``potential.morton_order``) at the start and after every rebuild, so
the targets of an attention tile share most neighbour rows; ``order`` maps the state's slots back to the input
atoms for trajectories and results (``JaxMD.atoms``).

The blow-up guard (``e2former_jax.md.guard``) runs on the device: the first step whose temperature, largest
force or (NVE) energy drift crosses its limit ends the chunk, and the host raises ``MDBlowUpError`` naming it.

Units are ASE's (eV, Angstrom, amu, time in Angstrom sqrt(amu/eV)); velocities are ASE velocities. The
integrator state is float64 when ``jax_enable_x64`` is on, else float32; either way the model sees positions
centred in the state's precision and then cast to the model's dtype, as the host builder ``graph_from_atoms``
does. Each chunk takes a time step and an "active" flag per step, so one compiled program also initialises
(one active step of length 0 evaluates the starting forces) and runs a short last chunk.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
import warnings
import weakref
from collections.abc import Callable

import ase
import ase.units
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator
from flax import nnx

from e2former_jax.compile_cache import StoredPrograms
from e2former_jax.device_memory import explained_out_of_memory
from e2former_jax.graph import AtomGraph, validate_atoms
from e2former_jax.md.ase_driver import simulated_ns_per_day
from e2former_jax.md.guard import BlowUpLimits, Guard, exceeded
from e2former_jax.model import E2Former
from e2former_jax.neighbors import skin as nl
from e2former_jax.neighbors.device import SearchCapacity
from e2former_jax.potential import morton_order
from e2former_jax.predict import predict, reference_table, total_energy_float64
from e2former_jax.system_keys import charge_and_multiplicity

ENSEMBLES = ("nve", "nvt")


@flax.struct.dataclass
class MDState:
  """Integrator state over N atom slots (real atoms first in some order, padding atoms last, at rest at the
  origin with no neighbours).

  Attributes:
    positions: [N, 3] Angstrom, never wrapped into the cell.
    velocities: [N, 3] Angstrom per ASE time unit.
    forces: [N, 3] eV/A at ``positions``.
    potential_energy: eV at ``positions``, less the element reference energies of the atoms (constant along a
      run: the host adds them in float64 where it reports energies, so the device never rounds a large total).
    masses: [N] amu (1 for padding).
    numbers: [N] int32 atomic numbers (0 for padding).
    order: [N] int32 input atom held by each slot.
    neighbors: the neighbour list state.
    key: PRNG key of the Langevin noise.
  """

  positions: jax.Array
  velocities: jax.Array
  forces: jax.Array
  potential_energy: jax.Array
  masses: jax.Array
  numbers: jax.Array
  order: jax.Array
  neighbors: nl.NeighborState
  key: jax.Array


@flax.struct.dataclass
class System:
  """What stays fixed over a run: ``atom_mask`` [N], ``cell`` [3, 3] (Angstrom, state dtype), ``charge``,
  ``spin`` (int32 scalars) and the static ``pbc``."""

  atom_mask: jax.Array
  cell: jax.Array
  charge: jax.Array
  spin: jax.Array
  pbc: tuple[bool, bool, bool] = flax.struct.field(pytree_node=False, default=(False, False, False))


def state_dtype():
  """float64 when ``jax_enable_x64`` is on, else float32."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)


def _kinetic(velocities, masses):
  return 0.5 * jnp.sum(masses[:, None] * velocities**2)


_CHUNKS: weakref.WeakKeyDictionary[E2Former, Callable] = weakref.WeakKeyDictionary()


def chunk_fn(model: E2Former):
  """The compiled chunk of ``model`` (one per model object, so every ``JaxMD`` of it shares compilations).

  ``fn(params, *, spec, ensemble, spatial_order, state, system, dts, active, gamma, kT, limits)``: ``spec``,
  ``ensemble`` and ``spatial_order`` pick the program, ``state`` is donated. Each program is a
  ``compile_cache.StoredPrograms``: a later process with the same model, options and sizes loads it instead of
  tracing the model, the list and the integrator again.
  """
  if model not in _CHUNKS:
    graphdef = nnx.graphdef(model)
    model_key = hashlib.sha256(repr(graphdef).encode()).hexdigest()  # the module structure and its static fields
    programs = {}

    def run(params, *, spec, ensemble, spatial_order, state, system, dts, active, gamma, kT, limits):
      static = (spec, ensemble, spatial_order)
      if static not in programs:

        def program(params, state, system, dts, active, gamma, kT, limits):
          return _chunk(graphdef, params, spec, ensemble, spatial_order, state, system, dts, active, gamma, kT, limits)

        programs[static] = StoredPrograms(
          program,
          f"JaxMD chunk {model_key} {spec!r} ensemble={ensemble} sorted={spatial_order}",
          donate_argnums=(1,),
        )
      return programs[static](params, state, system, dts, active, gamma, kT, limits)

    _CHUNKS[model] = run
  return _CHUNKS[model]


def _graph(system: System, positions, numbers, neighbors, mask, shift, dtype) -> AtomGraph:
  """The model's input: one structure (centred positions cast to ``dtype``) and the padding structure."""
  real = system.atom_mask
  centre = jnp.sum(jnp.where(real[:, None], positions, 0.0), axis=0) / jnp.sum(real)
  return AtomGraph(
    positions=jnp.where(real[:, None], positions - centre, 0.0).astype(dtype),
    numbers=numbers,
    atom_mask=real,
    neighbors=neighbors,
    neighbor_mask=mask,
    neighbor_shift=shift.astype(dtype),
    graph_index=jnp.where(real, 0, 1).astype(jnp.int32),
    charge=jnp.stack([system.charge, jnp.int32(0)]),
    spin=jnp.stack([system.spin, jnp.int32(1)]),
    cell=jnp.stack([system.cell, jnp.zeros((3, 3), system.cell.dtype)]).astype(dtype),
    pbc=jnp.asarray([system.pbc, (False, False, False)]),
    graph_mask=jnp.asarray([True, False]),
    periodic=any(system.pbc),
  )


def _chunk(
  graphdef,
  params,
  spec: nl.NeighborListSpec,
  ensemble: str,
  spatial_order: bool,
  state: MDState,
  system: System,
  dts,
  active,
  gamma,
  kT,
  limits,
):
  """Steps of velocity Verlet or BAOAB of lengths ``dts`` where ``active``, until one crosses a guard limit or
  overflows the neighbour list (that step is rolled back); returns the final state and per-step observables
  ("done" marks the steps taken; "overflow" and "too_close" are the list's flags after each step, so the host
  reads everything in one transfer)."""
  model = nnx.merge(graphdef, params)
  model_dtype = jnp.dtype(model.config.dtype)
  atom_mask, cell = system.atom_mask, system.cell
  count = jnp.sum(atom_mask)

  def rebuild(s: MDState) -> MDState:
    if spatial_order:
      perm = morton_order(s.positions, atom_mask)  # padding atoms stay last: atom_mask is unchanged
      s = s.replace(
        positions=s.positions[perm],
        velocities=s.velocities[perm],
        forces=s.forces[perm],
        masses=s.masses[perm],
        numbers=s.numbers[perm],
        order=s.order[perm],
      )
    return s.replace(neighbors=nl.build(spec, s.neighbors, s.positions, cell, atom_mask))

  def evaluate(s: MDState):
    idx, mask, shift, beyond, neighbors = nl.nearest_slots(spec, s.neighbors, s.positions, cell)
    out = predict(model, _graph(system, s.positions, s.numbers, idx, mask, shift, model_dtype))
    forces = jnp.where(atom_mask[:, None], out["forces"].astype(s.positions.dtype), 0.0)
    energy = out["energy_above_reference"][0].astype(s.positions.dtype)
    return s.replace(forces=forces, potential_energy=energy, neighbors=neighbors), beyond

  def step(s: MDState, dt):
    dt = dt.astype(s.positions.dtype)
    inv_mass = (1.0 / s.masses)[:, None]
    v = s.velocities + 0.5 * dt * s.forces * inv_mass
    key = s.key
    if ensemble == "nvt":
      x = s.positions + 0.5 * dt * v
      key, sub = jax.random.split(key)
      c1 = jnp.exp(-gamma * dt)
      noise = jax.random.normal(sub, v.shape, v.dtype)
      v = c1 * v + jnp.sqrt((1.0 - c1**2) * kT * inv_mass) * noise
      v = jnp.where(atom_mask[:, None], v, 0.0)
      x = x + 0.5 * dt * v
    else:
      x = s.positions + dt * v
    moved = s.replace(positions=x, velocities=v, key=key)
    stale = nl.needs_rebuild(spec, moved.neighbors, x, atom_mask)
    moved = jax.lax.cond(stale, rebuild, lambda t: t, moved)

    def finish(t: MDState):
      t, beyond = evaluate(t)
      return t.replace(velocities=t.velocities + 0.5 * dt * t.forces / t.masses[:, None]), beyond

    def roll_back(t: MDState):  # the build overflowed: keep the step's start, report what the build needed
      needs = t.neighbors
      report = s.neighbors.replace(
        overflow=True,
        max_cell_count=needs.max_cell_count,
        max_candidates=needs.max_candidates,
        reach_needed=needs.reach_needed,
      )
      return s.replace(neighbors=report), jnp.zeros((), jnp.int32)

    return jax.lax.cond(moved.neighbors.overflow, roll_back, finish, moved)

  def maybe_step(carry, xs):
    s, halted = carry
    dt, act = xs
    go = act & ~halted
    s, beyond = jax.lax.cond(go, step, lambda s, dt: (s, jnp.zeros((), jnp.int32)), s, dt)
    done = go & ~s.neighbors.overflow
    kinetic = _kinetic(s.velocities, s.masses)
    temperature = 2.0 * kinetic / (3.0 * count * ase.units.kB)
    max_force = jnp.sqrt(jnp.max(jnp.sum(s.forces**2, axis=-1)))
    drift = (s.potential_energy + kinetic - limits["start_total"]) / count
    crossed = exceeded(temperature, max_force, drift, limits["temperature"], limits["force"], limits["drift"])
    halted = halted | s.neighbors.overflow | s.neighbors.too_close | (done & functools.reduce(jnp.logical_or, crossed))
    observed = dict(
      potential=s.potential_energy,
      kinetic=kinetic,
      max_force=max_force,
      beyond_k=beyond,
      builds=s.neighbors.builds,
      done=done,
      overflow=s.neighbors.overflow,
      too_close=s.neighbors.too_close,
    )
    return (s, halted), observed

  (state, _), observed = jax.lax.scan(maybe_step, (state, jnp.zeros((), bool)), (dts, active))
  return state, observed


class JaxMD:
  """MD of one structure with an E2Former model, jitted on the device.

  ``JaxMD(model, atoms, timestep_fs=0.5)`` runs NVE (velocity Verlet, ASE's update order);
  ``ensemble="nvt"`` with ``temperature_K`` and ``friction_per_fs`` runs BAOAB Langevin dynamics.
  Velocities come from ``atoms`` (e.g. ``initial_velocities``); charge and multiplicity from ``atoms.info``
  (any spelling, as for the calculator). ``run(steps)`` returns per-step observables; ``atoms`` is the current
  structure, in the input's atom order, with energy and forces attached.

  Args:
    model: an ``E2Former``.
    atoms: the starting structure: a molecule, a periodic cell or a slab/wire (any ``pbc``).
    timestep_fs: time step in fs.
    ensemble: "nve" or "nvt".
    temperature_K, friction_per_fs: Langevin bath (NVT only).
    seed: PRNG seed of the Langevin noise.
    skin: Verlet skin of the neighbour list (Angstrom).
    capacity: the neighbour search's ``SearchCapacity``; default: fitted to the starting structure by device
      searches (``skin.plan``); either way grown on overflow.
    steps_per_call: steps per compiled chunk (one host round trip; trajectory frames at chunk ends).
    pad_to: atom slots are a multiple of this, with at least one padding atom.
    spatial_order: keep atoms in Morton order (re-sorted at every neighbour-list build).
    limits: the blow-up guard's ``BlowUpLimits``.

  Raises:
    ValueError: for bad input (empty, unknown elements, non-finite positions, overlapping atoms, bad options).
  """

  def __init__(
    self,
    model: E2Former,
    atoms: ase.Atoms,
    *,
    timestep_fs: float = 0.5,
    ensemble: str = "nve",
    temperature_K: float | None = None,
    friction_per_fs: float = 0.01,
    seed: int = 0,
    skin: float = 0.5,
    capacity: SearchCapacity | None = None,
    steps_per_call: int = 20,
    pad_to: int = 32,
    spatial_order: bool = True,
    limits: BlowUpLimits | None = None,
  ):
    if ensemble not in ENSEMBLES:
      raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
    if ensemble == "nvt" and temperature_K is None:
      raise ValueError("ensemble='nvt' needs temperature_K")
    if steps_per_call < 1 or pad_to < 1:
      raise ValueError(f"steps_per_call and pad_to must be at least 1, got {steps_per_call}, {pad_to}")
    if not timestep_fs > 0:
      raise ValueError(f"timestep_fs must be > 0, got {timestep_fs!r}")
    validate_atoms(atoms)
    cfg = model.config
    self.model = model
    self.params = nnx.state(model)
    self._chunk = chunk_fn(model)
    self.ensemble = ensemble
    self.temperature_K = temperature_K
    self.timestep_fs = float(timestep_fs)
    self.steps_per_call = int(steps_per_call)
    self.spatial_order = bool(spatial_order)
    self.limits = BlowUpLimits() if limits is None else limits
    self._symbols = atoms.get_chemical_symbols()
    self._reference_energy = total_energy_float64(0.0, atoms.numbers, reference_table(model))
    self._info = dict(atoms.info)
    self._cell = atoms.cell.array.copy()
    self._pbc = atoms.pbc.copy()
    self.num_real = n = len(atoms)
    num_atoms = (n // pad_to + 1) * pad_to
    self.dtype = dtype = state_dtype()
    charge, spin = charge_and_multiplicity(atoms.info)
    pad = lambda a, fill=0.0: np.concatenate([a, np.full((num_atoms - n,) + a.shape[1:], fill)])
    self.system = System(
      atom_mask=jnp.arange(num_atoms) < n,
      cell=jnp.asarray(self._cell, dtype),
      charge=jnp.int32(charge),
      spin=jnp.int32(spin),
      pbc=tuple(bool(p) for p in self._pbc),
    )
    positions = jnp.asarray(pad(atoms.get_positions()), dtype)
    self.spec = nl.plan(
      positions,
      self.system.cell,
      self.system.pbc,
      cfg.cutoff,
      cfg.max_neighbors,
      skin=skin,
      atom_mask=self.system.atom_mask,
      capacity=capacity,
    )
    self.state = MDState(
      positions=positions,
      velocities=jnp.asarray(pad(atoms.get_velocities()), dtype),
      forces=jnp.zeros((num_atoms, 3), dtype),
      potential_energy=jnp.zeros((), dtype),
      masses=jnp.asarray(pad(atoms.get_masses(), 1.0), dtype),
      numbers=jnp.asarray(pad(atoms.get_atomic_numbers(), 0).astype(np.int32)),
      order=jnp.arange(num_atoms, dtype=jnp.int32),
      neighbors=nl.empty_state(self.spec, num_atoms, dtype),
      key=jax.random.key(seed),
    )
    self.gamma = jnp.asarray(friction_per_fs / ase.units.fs if ensemble == "nvt" else 0.0, dtype)
    self.kT = jnp.asarray(ase.units.kB * (temperature_K or 0.0), dtype)
    self.guard: Guard | None = None
    self.initialised = False
    self.step_count = 0
    self.reallocations = 0
    self.chunk_seconds: list[tuple[int, float]] = []  # (steps taken, wall seconds) of each chunk call
    self._warned_truncation = False

  @property
  def dt(self) -> float:
    return self.timestep_fs * ase.units.fs

  @property
  def num_atoms(self) -> int:
    """Atom slots N (real and padding)."""
    return self.state.positions.shape[0]

  @property
  def builds(self) -> int:
    """Neighbour-list builds so far."""
    return int(self.state.neighbors.builds)

  def _limits(self) -> dict:
    guard = self.guard
    if guard is None:  # initialisation: nothing to compare with yet
      values = dict(temperature=math.inf, force=math.inf, drift=math.inf, start_total=0.0)
    else:
      values = dict(
        temperature=guard.temperature_limit,
        force=guard.force_limit,
        drift=guard.drift_limit,
        start_total=guard.start_total - self._reference_energy,  # the device's energies leave the references out
      )
    return {k: jnp.asarray(v, self.dtype) for k, v in values.items()}

  def _call(self, dt: float, n: int):
    """One chunk of ``n`` steps of length ``dt`` (the rest of the chunk inactive); the state is donated."""
    dts = np.zeros(self.steps_per_call)
    dts[:n] = dt
    active = np.arange(self.steps_per_call) < n
    with explained_out_of_memory(self.model.config, self.num_real, "an MD step"):
      self.state, observed = self._chunk(
        self.params,
        spec=self.spec,
        ensemble=self.ensemble,
        spatial_order=self.spatial_order,
        state=self.state,
        system=self.system,
        dts=jnp.asarray(dts, self.dtype),
        active=jnp.asarray(active),
        gamma=self.gamma,
        kT=self.kT,
        limits=self._limits(),
      )
      return jax.device_get(observed)

  def _advance(self, dt: float, n: int, first_step: int) -> dict[str, np.ndarray]:
    """Up to ``n`` steps in one chunk: stops early at a neighbour-list overflow (then grows the capacity) and
    raises at a guard crossing. Returns the observables of the steps taken (numbered from ``first_step``) and
    counts them in ``step_count`` (steps of length 0, the initialisation, are not counted)."""
    tic = time.perf_counter()
    observed = self._call(dt, n)
    done = np.asarray(observed["done"])
    taken = int(np.sum(done))
    self.chunk_seconds.append((taken if dt > 0 else 0, time.perf_counter() - tic))
    steps = first_step + np.arange(taken)
    if dt > 0:
      self.step_count += taken  # before the guard's check, so a stopped run knows where it stopped
    rows = {k: np.asarray(observed[k])[:taken] for k in ("potential", "kinetic", "max_force", "beyond_k", "builds")}
    rows["potential"] = rows["potential"].astype(np.float64) + self._reference_energy
    rows["kinetic"] = rows["kinetic"].astype(np.float64)
    rows["step"] = steps
    rows["time_fs"] = steps * self.timestep_fs
    rows["total"] = rows["potential"] + rows["kinetic"]
    rows["temperature"] = 2.0 * rows["kinetic"] / (3 * self.num_real * ase.units.kB)
    if observed["too_close"][-1]:
      raise ValueError(f"two atoms came closer than {nl.MIN_DISTANCE} A by MD step {first_step + taken}")
    if self.guard is not None:
      self.guard.check(rows["step"], rows["time_fs"], rows["temperature"], rows["max_force"], rows["total"])
    if observed["overflow"][-1]:
      neighbors = self.state.neighbors
      self.spec = nl.grown(self.spec, neighbors)
      self.reallocations += 1
      fresh = nl.empty_state(self.spec, self.num_atoms, self.dtype)
      keep = dict(builds=neighbors.builds, max_cell_count=neighbors.max_cell_count)
      self.state = self.state.replace(
        neighbors=fresh.replace(**keep, max_candidates=neighbors.max_candidates, reach_needed=neighbors.reach_needed)
      )
    if not self._warned_truncation and np.any(rows["beyond_k"] > 0):
      warnings.warn(
        f"{int(np.max(rows['beyond_k']))} neighbour pairs within the cutoff were dropped because "
        f"atoms have more than K={self.model.config.max_neighbors} neighbours (the model's "
        "definition); consider a larger max_neighbors for condensed phases",
        stacklevel=3,
      )
      self._warned_truncation = True
    return rows

  def initialise(self) -> dict[str, np.ndarray]:
    """Evaluates the starting forces and builds the neighbour list; fixes the guard's limits; returns the
    observables of step 0."""
    rows = self._advance(0.0, 1, 0)
    while len(rows["step"]) == 0:  # the first build overflowed the fitted capacity: grown, once more
      rows = self._advance(0.0, 1, 0)
    self.guard = Guard(
      self.limits,
      self.ensemble,
      self.num_real,
      start_temperature=float(rows["temperature"][0]),
      start_total=float(rows["total"][0]),
      bath_temperature=self.temperature_K if self.ensemble == "nvt" else None,
    )
    self.guard.check(rows["step"], rows["time_fs"], rows["temperature"], rows["max_force"], rows["total"])
    self.initialised = True
    return rows

  def run(self, steps: int, callback=None) -> dict[str, np.ndarray]:
    """Advances ``steps`` time steps in chunks of ``steps_per_call``.

    Args:
      steps: number of steps.
      callback: called as ``callback(self, rows)`` after each chunk with that chunk's observables (and after
        the initial evaluation), e.g. to write trajectory frames and log rows.

    Returns:
      Per-step observables as numpy arrays: "step", "time_fs", "potential", "kinetic", "total" (eV),
      "temperature" (K), "max_force" (eV/A, largest on one atom), "beyond_k" (in-cutoff pairs beyond the K
      slots), "builds" (neighbour builds so far). The first run also reports the starting structure as step 0.

    Raises:
      MDBlowUpError: when a step crosses a guard limit (``limits``); the state (``atoms``, ``step_count``) is
        that step's.
    """
    chunks = []
    if not self.initialised:
      chunks.append(self.initialise())
      if callback is not None:
        callback(self, chunks[-1])
    remaining = int(steps)
    while remaining > 0:
      rows = self._advance(self.dt, min(self.steps_per_call, remaining), self.step_count + 1)
      taken = len(rows["step"])
      remaining -= taken
      if taken:
        chunks.append(rows)
        if callback is not None:
          callback(self, rows)
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}

  def ns_per_day(self, skip_first: bool = True) -> float:
    """Simulated ns per wall-clock day over the chunk calls that took steps (the first, which compiles, left
    out)."""
    calls = [c for c in self.chunk_seconds if c[0] > 0]
    calls = calls[1:] if skip_first and len(calls) > 1 else calls
    steps = sum(s for s, _ in calls)
    seconds = sum(t for _, t in calls)
    return simulated_ns_per_day(steps * self.timestep_fs, seconds) if seconds > 0 else float("nan")

  def _input_order(self, values: np.ndarray) -> np.ndarray:
    """Per-slot ``values`` [N, ...] of the real atoms, in the input's atom order [n, ...]."""
    n = self.num_real
    out = np.empty((n,) + values.shape[1:], values.dtype)
    out[np.asarray(self.state.order)[:n]] = values[:n]  # padding atoms stay last: real slots are the first n
    return out

  @property
  def atoms(self) -> ase.Atoms:
    """The current structure (input atom order): positions, velocities, and energy and forces as a
    single-point calculator."""
    atoms = ase.Atoms(
      self._symbols,
      positions=self._input_order(np.asarray(self.state.positions, np.float64)),
      cell=self._cell,
      pbc=self._pbc,
      info=dict(self._info),
    )
    atoms.set_velocities(self._input_order(np.asarray(self.state.velocities, np.float64)))
    if self.initialised:
      forces = self._input_order(np.asarray(self.state.forces, np.float64))
      atoms.calc = SinglePointCalculator(
        atoms, energy=float(self.state.potential_energy) + self._reference_energy, forces=forces
      )
    return atoms

  def neighbor_slots(self):
    """(neighbors, mask, shift, beyond_k) of the current positions from the device list, in the input's atom
    order with ``num_atoms`` slots like ``graph_from_atoms`` (for tests and inspection); builds the list when
    it is stale."""
    s, system = self.state, self.system
    state = s.neighbors
    if bool(nl.needs_rebuild(self.spec, state, s.positions, system.atom_mask)):
      state = nl.build(self.spec, state, s.positions, system.cell, system.atom_mask)
    if bool(state.overflow):
      raise RuntimeError("neighbour buffer overflow; run a step to reallocate")
    idx, mask, shift, beyond, _ = nl.nearest_slots(self.spec, state, s.positions, system.cell)
    order = np.asarray(s.order)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    idx = np.asarray(idx)[inverse]
    return order[idx], np.asarray(mask)[inverse], np.asarray(shift)[inverse], int(beyond)
