"""Molecular dynamics with E2Former models: through ASE, or fully in JAX with an on-device neighbour list.

- ``run_ase_md``: ASE ``VelocityVerlet`` / ``Langevin`` driving ``E2FormerCalculator``.
- ``JaxMD``: velocity Verlet / BAOAB Langevin jitted on the device (``lax.scan`` over steps), with the
  neighbour list of ``e2former_jax.neighbors.skin``.
- ``e2former-md``: the console script (``e2former_jax.md.cli:main``).
"""

from e2former_jax.md.ase_driver import MDLog, initial_velocities, make_dynamics, read_log, run_ase_md
from e2former_jax.md.jax_driver import JaxMD, MDState

__all__ = ["JaxMD", "MDLog", "MDState", "initial_velocities", "make_dynamics", "read_log", "run_ase_md"]
