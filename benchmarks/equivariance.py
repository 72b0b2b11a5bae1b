"""Float32 accuracy on the device: the geometry against float64 on the host, and the model's rotation equivariance.

A CPU test cannot see a matrix product that runs at JAX's default precision, because on the CPU the default is
true float32; on an NVIDIA GPU it is TF32 (10-bit mantissa). This script measures, on the default device:

* ``harmonics``: max |Y - Y64| of the spherical harmonics up to l = 4 of 4,096 random vectors (component
  normalisation, values of order 1), against the same function in float64 on the CPU;
* ``frames``: max |R - R64| of the EAAS frames (rotations taking each vector to +y);
* ``wigner``: max |D - D64| of the l = 2 Wigner-D matrices of those frames, and max |D D^T - I| (orthogonality);
* ``model``: the paper backbone (``paper_spice`` with the ``QKdotS_alpha`` gate, random weights, float32,
  ``matmul_precision`` "highest") on ``random_structure(--atoms)`` of ``benchmarks/model.py`` and on the same
  structure rotated, through ``DevicePotential``: max |F(Rx) - R F(x)| / max |F| and |E(Rx) - E(x)| / |E|, for
  direct and conservative forces;
* ``float64`` (``--float64``; needs 64-bit JAX, which the flag turns on): the shipped demo checkpoint's forces in
  float32 against the same weights in float64, through ``DevicePotential``, on ``--structures`` structures spread over
  the demo test split: max |F32 - F64| / max |F64| per structure (positions rounded to float32 included).

Float32 round-off of these is about 1e-7 (harmonics, frames, Wigner-D) and 1e-6 to 1e-5 (the model's forces, a sum
over four blocks and 32 neighbours); TF32 anywhere in the geometry shows as 1e-4 to 1e-3.

  PYTHONPATH=$PWD python benchmarks/equivariance.py --json $OUT/equivariance.jsonl
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy.spatial.transform import Rotation

from benchmarks.model import random_structure
from benchmarks.report import emit, stamp
from e2former_jax import so3
from e2former_jax.config import get_config
from e2former_jax.model import E2Former
from e2former_jax.potential import DevicePotential


def geometry_errors(num_vectors: int = 4096, seed: int = 0) -> dict:
  """Errors of the float32 geometry on the default device against float64 on the CPU (see the module doc)."""
  vectors = np.random.default_rng(seed).normal(size=(num_vectors, 3))
  with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
    harmonics = np.asarray(so3.spherical_harmonics(jnp.asarray(vectors), 4))
    frames = np.asarray(so3.rotation_to_y(jnp.asarray(vectors)))
    wigner = np.asarray(so3.wigner_d(jnp.asarray(frames), 2))
  harmonics32 = np.asarray(jax.jit(lambda v: so3.spherical_harmonics(v, 4))(jnp.asarray(vectors, jnp.float32)))
  frames32 = np.asarray(jax.jit(so3.rotation_to_y)(jnp.asarray(vectors, jnp.float32)))
  wigner32 = np.asarray(jax.jit(lambda r: so3.wigner_d(r, 2))(jnp.asarray(frames, jnp.float32)), np.float64)
  return {
    "harmonics": float(np.max(np.abs(harmonics32 - harmonics))),
    "frames": float(np.max(np.abs(frames32 - frames))),
    "wigner": float(np.max(np.abs(wigner32 - wigner))),
    "wigner_orthogonality": float(np.max(np.abs(wigner32 @ wigner32.swapaxes(-1, -2) - np.eye(5)))),
  }


def model_errors(forces: str, atoms: int, seed: int = 3) -> dict:
  """Rotation equivariance of the paper backbone's energy and forces on the default device (module doc)."""
  cfg = get_config("paper_spice", gate="QKdotS_alpha", forces=forces, matmul_precision="highest")
  potential = DevicePotential(E2Former(cfg, rngs=nnx.Rngs(0)))
  structure = random_structure(atoms)
  positions = structure.get_positions() - structure.get_positions().mean(0)
  numbers = structure.get_atomic_numbers()
  rotation = Rotation.random(random_state=seed).as_matrix()
  plain, rotated = potential(positions, numbers), potential(positions @ rotation.T, numbers)
  scale = np.max(np.abs(plain["forces"]))
  return {
    "force_equivariance": float(np.max(np.abs(rotated["forces"] - plain["forces"] @ rotation.T)) / scale),
    "energy_invariance": float(abs(rotated["energy"] - plain["energy"]) / abs(plain["energy"])),
  }


def float64_errors(num_structures: int) -> list[dict]:
  """Forces of the demo checkpoint in float32 against float64 (same weights) on demo test structures (module doc)."""
  from e2former_jax.checkpoint import DEMO_CHECKPOINT, load_model
  from e2former_jax.data import load_demo

  single, double = (DevicePotential(load_model(DEMO_CHECKPOINT, dtype=d)) for d in ("float32", "float64"))
  rows = []
  structures = load_demo("test")
  for atoms in structures[:: max(1, len(structures) // num_structures)][:num_structures]:
    reference = double.from_atoms(atoms)["forces"]
    error = np.max(np.abs(single.from_atoms(atoms)["forces"] - reference)) / np.max(np.abs(reference))
    rows.append({"structure": atoms.info.get("config_type", ""), "atoms": len(atoms), "force_error": float(error)})
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--atoms", type=int, default=1024)
  p.add_argument("--float64", action="store_true", help="also the demo checkpoint in float32 against float64")
  p.add_argument("--structures", type=int, default=20, help="demo test structures for --float64")
  p.add_argument("--json", help="append one JSON line per measurement")
  args = p.parse_args()
  emit(stamp({"what": "geometry", **geometry_errors()}), args.json)
  for forces in ("direct", "conservative"):
    emit(stamp({"what": "model", "forces": forces, "atoms": args.atoms, **model_errors(forces, args.atoms)}), args.json)
  if args.float64:
    jax.config.update("jax_enable_x64", True)
    for row in float64_errors(args.structures):
      emit(stamp({"what": "float64", **row}), args.json)


if __name__ == "__main__":
  main()
