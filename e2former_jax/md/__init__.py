"""Molecular dynamics with E2Former models: through ASE, or fully in JAX with an on-device neighbour list.

- ``run_ase_md``: ASE ``VelocityVerlet`` / ``Langevin`` driving ``E2FormerCalculator``.
- ``JaxMD``: velocity Verlet / BAOAB Langevin jitted on the device (``lax.scan`` over steps, state donated),
  with the Verlet neighbour list of ``e2former_jax.neighbors.skin`` and atoms in Morton order.
- Both stop with ``MDBlowUpError`` when the temperature, a force or the NVE energy drift crosses its limit
  (``BlowUpLimits``, ``e2former_jax.md.guard``).
- ``e2former-md``: the console script (``e2former_jax.md.cli:main``).
"""

from e2former_jax.md.ase_driver import MDLog, initial_velocities, make_dynamics, read_log, run_ase_md
from e2former_jax.md.guard import BlowUpLimits, MDBlowUpError
from e2former_jax.md.jax_driver import JaxMD, MDState

__all__ = [
  "BlowUpLimits",
  "JaxMD",
  "MDBlowUpError",
  "MDLog",
  "MDState",
  "initial_velocities",
  "make_dynamics",
  "read_log",
  "run_ase_md",
]
