"""Molecular dynamics fully in JAX: velocity Verlet (NVE) and BAOAB Langevin (NVT), jitted on the device.

Steps run in chunks of ``steps_per_call`` under one ``lax.scan``; the neighbour list lives on the device
(``e2former_jax.neighbors.skin``) and is rebuilt inside the scan when atoms have moved more than half the
skin. After each chunk the host checks the neighbour buffers: on an overflow it grows them, recompiles and
reruns the chunk from its saved start, so no neighbour is ever dropped.

Units are ASE's (eV, Angstrom, amu, time in Angstrom sqrt(amu/eV)); velocities are ASE velocities. The
integrator state is float64 when ``jax_enable_x64`` is on, else float32; either way the model sees positions
centred per structure in the state's precision and then cast to the model's dtype, as the host builder
``graph_from_atoms`` does, so a float64 run feeds the model the same inputs as the ASE calculator.

Each chunk's scan takes a time step and an "active" flag per step, so one compiled program also initialises
(one active step of length 0 evaluates the starting forces) and runs a short last chunk (inactive steps at the
end cost nothing).
"""

from __future__ import annotations

import functools
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

from e2former_jax.graph import AtomGraph, graph_from_atoms
from e2former_jax.model import E2Former
from e2former_jax.neighbors import skin as nl
from e2former_jax.predict import predict

ENSEMBLES = ("nve", "nvt")


@flax.struct.dataclass
class MDState:
  """Integrator state (padded to the graph's N atom slots; padding atoms stay at rest at the origin).

  Attributes:
    positions: [N, 3] Angstrom, never wrapped into the cell.
    velocities: [N, 3] Angstrom per ASE time unit.
    forces: [N, 3] eV/A at ``positions``.
    potential_energy: eV at ``positions``.
    neighbors: the neighbour list state.
    key: PRNG key of the Langevin noise.
  """

  positions: jax.Array
  velocities: jax.Array
  forces: jax.Array
  potential_energy: jax.Array
  neighbors: nl.NeighborState
  key: jax.Array


def state_dtype():
  """float64 when ``jax_enable_x64`` is on, else float32."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)


def _kinetic(velocities, masses):
  return 0.5 * jnp.sum(masses[:, None] * velocities**2)


_CHUNKS: weakref.WeakKeyDictionary[E2Former, Callable] = weakref.WeakKeyDictionary()


def chunk_fn(model: E2Former):
  """The jitted chunk of ``model`` (one per model object, so every ``JaxMD`` of it shares compilations).

  ``fn(params, spec, ensemble, state, template, masses, cell, dts, active, gamma, kT)`` with ``spec`` and
  ``ensemble`` static. (A GraphDef is not hashable, so it is closed over instead of being a static argument.)
  """
  if model not in _CHUNKS:
    graphdef = nnx.graphdef(model)
    _CHUNKS[model] = jax.jit(functools.partial(_chunk, graphdef), static_argnames=("spec", "ensemble"))
  return _CHUNKS[model]


def _chunk(
  graphdef,
  params,
  spec: nl.NeighborListSpec,
  ensemble: str,
  state: MDState,
  template: AtomGraph,
  masses,
  cell,
  dts,
  active,
  gamma,
  kT,
):
  """Steps of velocity Verlet or BAOAB of lengths ``dts`` where ``active`` (inactive ones leave the state as
  it is and cost nothing); returns the final state and per-step observables."""
  model = nnx.merge(graphdef, params)
  model_dtype = template.positions.dtype
  atom_mask = template.atom_mask
  count = jnp.sum(atom_mask)
  inv_mass = (1.0 / masses)[:, None]

  def forces_at(positions, neighbors):
    neighbors = nl.update(spec, neighbors, positions, cell, atom_mask, template.periodic)
    idx, mask, shift, beyond, neighbors = nl.nearest_slots(spec, neighbors, positions, cell)
    centre = jnp.sum(jnp.where(atom_mask[:, None], positions, 0.0), axis=0) / count
    centred = jnp.where(atom_mask[:, None], positions - centre, 0.0)
    graph = template.replace(
      positions=centred.astype(model_dtype), neighbors=idx, neighbor_mask=mask, neighbor_shift=shift.astype(model_dtype)
    )
    out = predict(model, graph)
    forces = jnp.where(atom_mask[:, None], out["forces"].astype(positions.dtype), 0.0)
    return forces, out["energy"][0].astype(positions.dtype), beyond, neighbors

  def step(s: MDState, dt):
    dt = dt.astype(s.positions.dtype)
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
    forces, energy, beyond, neighbors = forces_at(x, s.neighbors)
    v = v + 0.5 * dt * forces * inv_mass
    new = MDState(positions=x, velocities=v, forces=forces, potential_energy=energy, neighbors=neighbors, key=key)
    return new, beyond

  def maybe_step(s: MDState, xs):
    dt, active = xs
    s, beyond = jax.lax.cond(active, step, lambda s, dt: (s, jnp.zeros((), jnp.int32)), s, dt)
    observed = dict(
      potential=s.potential_energy, kinetic=_kinetic(s.velocities, masses), beyond_k=beyond, builds=s.neighbors.builds
    )
    return s, observed

  return jax.lax.scan(maybe_step, state, (dts, active))


class JaxMD:
  """MD of one structure with an E2Former model, jitted on the device.

  ``JaxMD(model, atoms, timestep_fs=0.5)`` runs NVE (velocity Verlet, ASE's update order);
  ``ensemble="nvt"`` with ``temperature_K`` and ``friction_per_fs`` runs BAOAB Langevin dynamics.
  Velocities come from ``atoms`` (set them with ASE's ``MaxwellBoltzmannDistribution``); charge and spin from
  ``atoms.info`` as for the calculator. ``run(steps)`` returns per-step observables; ``atoms`` is the current
  structure with energy and forces attached.

  Args:
    model: an ``E2Former``.
    atoms: the starting structure (a molecule, or a fully periodic cell).
    timestep_fs: time step in fs.
    ensemble: "nve" or "nvt".
    temperature_K, friction_per_fs: Langevin bath (NVT only).
    seed: PRNG seed of the Langevin noise.
    skin: Verlet skin of the neighbour list (Angstrom).
    method, capacity, cell_capacity: neighbour search (see ``skin.plan``); the defaults size the
      buffers from the starting structure, and overflows grow them.
    steps_per_call: steps per compiled chunk (one host round trip, trajectory frames at chunk ends).
    pad_to: atom slots are padded to a multiple of this, as in ``E2FormerCalculator``.
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
    method: str = "auto",
    capacity: int | None = None,
    cell_capacity: int | None = None,
    steps_per_call: int = 20,
    pad_to: int = 32,
  ):
    if ensemble not in ENSEMBLES:
      raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
    if ensemble == "nvt" and temperature_K is None:
      raise ValueError("ensemble='nvt' needs temperature_K")
    if steps_per_call < 1:
      raise ValueError("steps_per_call must be at least 1")
    cfg = model.config
    self.model = model
    self.params = nnx.state(model)
    self._chunk = chunk_fn(model)
    self.ensemble = ensemble
    self.timestep_fs = float(timestep_fs)
    self.steps_per_call = int(steps_per_call)
    self._symbols = atoms.get_chemical_symbols()
    self._info = dict(atoms.info)
    self._cell = atoms.cell.array.copy()
    self._pbc = atoms.pbc.copy()
    self.num_real = len(atoms)
    num_atoms = (len(atoms) // pad_to + 1) * pad_to
    model_dtype = cfg.numpy_dtype
    self.template, _ = graph_from_atoms(
      [atoms], cfg.cutoff, cfg.max_neighbors, num_atoms=num_atoms, num_graphs=2, dtype=model_dtype
    )
    dtype = state_dtype()
    self.dtype = dtype
    self.spec = nl.plan(
      atoms.get_positions(),
      atoms.cell.array,
      atoms.pbc,
      cfg.cutoff,
      cfg.max_neighbors,
      skin=skin,
      method=method,
      capacity=capacity,
      cell_capacity=cell_capacity,
    )
    pad = lambda a, fill=0.0: np.concatenate([a, np.full((num_atoms - len(atoms),) + a.shape[1:], fill)])
    self.masses = jnp.asarray(pad(atoms.get_masses(), 1.0), dtype)
    self.cell = jnp.asarray(self._cell if self.template.periodic else np.zeros((3, 3)), dtype)
    self.state = MDState(
      positions=jnp.asarray(pad(atoms.get_positions()), dtype),
      velocities=jnp.asarray(pad(atoms.get_velocities()), dtype),
      forces=jnp.zeros((num_atoms, 3), dtype),
      potential_energy=jnp.zeros((), dtype),
      neighbors=nl.empty_state(self.spec, num_atoms, dtype),
      key=jax.random.key(seed),
    )
    self.gamma = jnp.asarray(friction_per_fs / ase.units.fs if ensemble == "nvt" else 0.0, dtype)
    self.kT = jnp.asarray(ase.units.kB * (temperature_K or 0.0), dtype)
    self.initialised = False
    self.step_count = 0
    self.reallocations = 0
    self.chunk_seconds: list[tuple[int, float]] = []  # (real steps, wall seconds) of each chunk call
    self._warned_truncation = False

  @property
  def dt(self) -> float:
    return self.timestep_fs * ase.units.fs

  def _call(self, dts: np.ndarray, active: np.ndarray):
    """One chunk, rerun with larger buffers as long as the neighbour list overflows."""
    start = self.state
    while True:
      new, observed = self._chunk(
        self.params,
        spec=self.spec,
        ensemble=self.ensemble,
        state=start,
        template=self.template,
        masses=self.masses,
        cell=self.cell,
        dts=jnp.asarray(dts, self.dtype),
        active=jnp.asarray(active),
        gamma=self.gamma,
        kT=self.kT,
      )
      neighbors = new.neighbors
      if bool(neighbors.too_close):
        raise ValueError(
          f"two atoms came closer than {nl.MIN_DISTANCE} A during MD steps "
          f"{self.step_count}..{self.step_count + int(np.sum(active))}"
        )
      if not np.all(np.isfinite(np.asarray(new.positions))):
        raise FloatingPointError(
          f"non-finite positions during MD steps {self.step_count}..{self.step_count + int(np.sum(active))}"
        )
      if not bool(neighbors.overflow):
        return new, observed
      self.spec = nl.grown(self.spec, neighbors)
      self.reallocations += 1
      fresh = nl.empty_state(self.spec, start.positions.shape[0], self.dtype)
      start = start.replace(
        neighbors=fresh.replace(
          builds=start.neighbors.builds,
          max_candidates=start.neighbors.max_candidates,
          max_cell_count=start.neighbors.max_cell_count,
        )
      )

  def _advance(self, dts: np.ndarray, active: np.ndarray, steps: np.ndarray) -> dict[str, np.ndarray]:
    tic = time.perf_counter()
    new, observed = self._call(dts, active)
    observed = jax.device_get(observed)
    n = len(steps)
    self.chunk_seconds.append((int(np.sum(dts[:n] > 0)), time.perf_counter() - tic))
    self.state = new
    rows = {k: np.asarray(observed[k])[:n] for k in ("potential", "kinetic", "beyond_k", "builds")}
    rows["potential"] = rows["potential"].astype(np.float64)
    rows["kinetic"] = rows["kinetic"].astype(np.float64)
    rows["step"] = steps
    rows["time_fs"] = steps * self.timestep_fs
    rows["total"] = rows["potential"] + rows["kinetic"]
    rows["temperature"] = 2.0 * rows["kinetic"] / (3 * self.num_real * ase.units.kB)
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
    """Evaluates the starting forces and builds the neighbour list; returns the observables of step 0."""
    dts = np.zeros(self.steps_per_call)
    active = np.zeros(self.steps_per_call, bool)
    active[0] = True
    rows = self._advance(dts, active, np.zeros(1, np.int64))
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
      "temperature" (K), "beyond_k" (in-cutoff pairs beyond the K slots), "builds" (neighbour builds so far).
      The first run also reports the starting structure as step 0.
    """
    chunks = []
    if not self.initialised:
      chunks.append(self.initialise())
      if callback is not None:
        callback(self, chunks[-1])
    remaining = int(steps)
    while remaining > 0:
      n = min(self.steps_per_call, remaining)
      dts = np.zeros(self.steps_per_call)
      dts[:n] = self.dt
      active = dts > 0
      chunks.append(self._advance(dts, active, self.step_count + 1 + np.arange(n)))
      self.step_count += n
      remaining -= n
      if callback is not None:
        callback(self, chunks[-1])
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

  def ns_per_day(self, skip_first: bool = True) -> float:
    """Simulated ns per wall-clock day over the chunk calls (the first, which compiles, left out)."""
    calls = self.chunk_seconds[1:] if skip_first and len(self.chunk_seconds) > 1 else self.chunk_seconds
    steps = sum(s for s, _ in calls)
    seconds = sum(t for _, t in calls)
    return steps * self.timestep_fs * 1e-6 / (seconds / 86400.0) if seconds > 0 else float("nan")

  @property
  def atoms(self) -> ase.Atoms:
    """The current structure: positions, velocities, and energy and forces as a single-point calculator."""
    n = self.num_real
    atoms = ase.Atoms(
      self._symbols,
      positions=np.asarray(self.state.positions[:n], np.float64),
      cell=self._cell,
      pbc=self._pbc,
      info=dict(self._info),
    )
    atoms.set_velocities(np.asarray(self.state.velocities[:n], np.float64))
    if self.initialised:
      atoms.calc = SinglePointCalculator(
        atoms, energy=float(self.state.potential_energy), forces=np.asarray(self.state.forces[:n], np.float64)
      )
    return atoms

  def neighbor_slots(self):
    """(neighbors, mask, shift, beyond_k) of the current positions, from the device list (for tests and
    inspection); builds the list when it is stale."""
    positions = self.state.positions
    state = nl.update(
      self.spec, self.state.neighbors, positions, self.cell, self.template.atom_mask, self.template.periodic
    )
    if bool(state.overflow):
      raise RuntimeError("neighbour buffer overflow; run a step to reallocate")
    idx, mask, shift, beyond, _ = nl.nearest_slots(self.spec, state, positions, self.cell)
    return np.asarray(idx), np.asarray(mask), np.asarray(shift), int(beyond)
