#!/usr/bin/env python
"""Generate the demo data set shipped in ``e2former_jax/demo_data``.

Two steps, both deterministic for the fixed seeds below (same library versions, one thread):

``xtb``
    RDKit ETKDG + MMFF starting conformers (the water dimer starts from the S22 geometry that ASE ships),
    then GFN2-xTB (tblite) Langevin MD at 0.5 fs. After an equilibration phase one frame is kept every
    ``STRIDE`` steps. Each trajectory is split by contiguous segments: the first 80 % of its frames go
    to ``train.xyz``, the next 10 % to ``valid.xyz``, the last 10 % to ``test.xyz``.

``dft``
    Relabels evenly spaced ethanol frames from the ``xtb`` step with PBE/def2-SVP (pyscf, density fitting)
    and writes ``ethanol_pbe_def2svp.xyz``. Frames are computed in an order whose every prefix is spread over
    the whole set, and written as they finish, so an interrupted run still leaves a usable file.

Files use the MACE-OFF extxyz layout: info ``REF_energy`` (eV), ``config_type`` (molecule name),
``total_charge``, ``total_spin`` (multiplicity); array ``REF_forces`` (eV/A). Extra info keys: ``source``
(stable id ``<trajectory>:<md step>``), ``split``, ``temperature_K``, ``md_step``.

Needs the ``generate`` extra (tblite, rdkit, pyscf, ase). Run single-threaded::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python scripts/make_demo_data.py xtb
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python scripts/make_demo_data.py dft --n-frames 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HARTREE_TO_EV = 27.211386245988
BOHR_TO_ANGSTROM = 0.529177210903

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "e2former_jax" / "demo_data"

TIMESTEP_FS = 0.5
STRIDE = 10  # MD steps between kept frames
EQUIL_STEPS = 1000  # 0.5 ps of Langevin equilibration before the first kept frame
FRICTION_PER_FS = 0.01
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

# (molecule name, SMILES or "s22:<name>", [(temperature K, kept frames, seed), ...])
TRAJECTORIES = [
  ("ethanol", "CCO", [(300.0, 250, 101), (500.0, 250, 102)]),
  ("aspirin", "CC(=O)Oc1ccccc1C(=O)O", [(300.0, 250, 201), (500.0, 250, 202)]),
  ("fluorobenzene", "Fc1ccccc1", [(400.0, 130, 301)]),
  ("2-chlorothiophene", "Clc1cccs1", [(400.0, 130, 401)]),
  ("thioanisole", "CSc1ccccc1", [(400.0, 130, 501)]),
  ("N-methylacetamide", "CC(=O)NC", [(400.0, 130, 701)]),
  ("water_dimer", "s22:Water_dimer", [(300.0, 130, 601)]),
]
RDKIT_SEED = 42


def _versions() -> dict:
  from importlib.metadata import version

  import ase
  import rdkit
  import tblite  # noqa: F401

  out = {
    "python": platform.python_version(),
    "numpy": np.__version__,
    "ase": ase.__version__,
    "rdkit": rdkit.__version__,
    "tblite": version("tblite"),
  }
  try:
    out["pyscf"] = version("pyscf")
  except Exception:  # pragma: no cover - pyscf only needed for the dft step
    pass
  return out


def starting_structure(spec: str):
  """ETKDG (v3) + MMFF conformer for a SMILES, or an S22 geometry for ``s22:<name>``."""
  from ase import Atoms

  if spec.startswith("s22:"):
    from ase.collections import s22

    return s22[spec[4:]].copy()
  from rdkit import Chem
  from rdkit.Chem import AllChem

  mol = Chem.AddHs(Chem.MolFromSmiles(spec))
  params = AllChem.ETKDGv3()
  params.randomSeed = RDKIT_SEED
  if AllChem.EmbedMolecule(mol, params) != 0:
    raise RuntimeError(f"ETKDG embedding failed for {spec}")
  if AllChem.MMFFOptimizeMolecule(mol, maxIters=2000) != 0:
    raise RuntimeError(f"MMFF did not converge for {spec}")
  pos = mol.GetConformer().GetPositions()
  numbers = [a.GetAtomicNum() for a in mol.GetAtoms()]
  return Atoms(numbers=numbers, positions=pos)


def run_trajectory(name, spec, temperature, n_frames, seed):
  from ase import units
  from ase.constraints import FixCom
  from ase.md.langevin import Langevin
  from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
  from tblite.ase import TBLite

  atoms = starting_structure(spec)
  atoms.calc = TBLite(method="GFN2-xTB", charge=0, multiplicity=1, verbosity=0)
  rng = np.random.default_rng(seed)
  MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
  Stationary(atoms)
  ZeroRotation(atoms)
  atoms.set_constraint(FixCom())
  dyn = Langevin(
    atoms,
    timestep=TIMESTEP_FS * units.fs,
    temperature_K=temperature,
    friction=FRICTION_PER_FS / units.fs,
    fixcm=False,
    rng=rng,
  )
  dyn.run(EQUIL_STEPS)
  traj_id = f"{name}_T{int(temperature)}_s{seed}"
  frames = []
  for k in range(n_frames):
    dyn.run(STRIDE)
    e = float(atoms.get_potential_energy())
    # apply_constraint=False: the FixCom constraint would otherwise subtract a mass-weighted net force
    # (ASE's FixCom.adjust_forces), and the labels would not be GFN2-xTB's forces.
    f = np.array(atoms.get_forces(apply_constraint=False), dtype=np.float64)
    if not (np.isfinite(e) and np.all(np.isfinite(f))):
      raise RuntimeError(f"non-finite label in {traj_id} frame {k}")
    fr = atoms.copy()
    fr.calc = None
    fr.set_constraint()
    step = EQUIL_STEPS + (k + 1) * STRIDE
    fr.info = {
      "REF_energy": e,
      "config_type": name,
      "total_charge": 0,
      "total_spin": 1,
      "source": f"{traj_id}:{step}",
      "temperature_K": float(temperature),
      "md_step": int(step),
    }
    fr.arrays.pop("momenta", None)
    fr.arrays["REF_forces"] = f
    frames.append(fr)
  return traj_id, frames


def split_contiguous(frames):
  n = len(frames)
  n_train = int(round(SPLIT_FRACTIONS[0] * n))
  n_valid = int(round(SPLIT_FRACTIONS[1] * n))
  parts = {
    "train": frames[:n_train],
    "valid": frames[n_train : n_train + n_valid],
    "test": frames[n_train + n_valid :],
  }
  for split, fr in parts.items():
    for a in fr:
      a.info["split"] = split
  return parts


def cmd_xtb(args):
  from ase.io import write

  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  t_start = time.time()
  cpu_start = time.process_time()
  splits = {"train": [], "valid": [], "test": []}
  log = {"trajectories": [], "settings": {}}
  for name, spec, runs in TRAJECTORIES:
    for temperature, n_frames, seed in runs:
      t0 = time.time()
      traj_id, frames = run_trajectory(name, spec, temperature, n_frames, seed)
      parts = split_contiguous(frames)
      for k, v in parts.items():
        splits[k].extend(v)
      dt = time.time() - t0
      entry = {
        "trajectory": traj_id,
        "molecule": name,
        "start": spec,
        "temperature_K": temperature,
        "seed": seed,
        "frames": len(frames),
        **{f"n_{k}": len(v) for k, v in parts.items()},
        "wall_s": round(dt, 1),
      }
      log["trajectories"].append(entry)
      print(json.dumps(entry), flush=True)
  for k, v in splits.items():
    write(out / f"{k}.xyz", v, format="extxyz")
  log["settings"] = {
    "method": "GFN2-xTB (tblite.ase.TBLite, accuracy 1.0, electronic temperature 300 K)",
    "timestep_fs": TIMESTEP_FS,
    "stride": STRIDE,
    "equilibration_steps": EQUIL_STEPS,
    "friction_per_fs": FRICTION_PER_FS,
    "thermostat": "ase.md.langevin.Langevin(fixcm=False) with ase.constraints.FixCom",
    "rdkit_seed": RDKIT_SEED,
    "split_fractions": SPLIT_FRACTIONS,
  }
  log["versions"] = _versions()
  log["wall_s"] = round(time.time() - t_start, 1)
  log["cpu_s"] = round(time.process_time() - cpu_start, 1)
  log["threads"] = os.environ.get("OMP_NUM_THREADS")
  with open(out / "provenance_xtb.json", "w") as fh:
    json.dump(log, fh, indent=1)
  print(f"done: {sum(len(v) for v in splits.values())} frames in {log['wall_s']} s", flush=True)


def dft_order(n: int) -> list[int]:
  """Order 0..n-1 so that every prefix is spread evenly (bit-reversal-like halving)."""
  order, seen = [], set()
  step = 1 << max(0, (n - 1).bit_length())
  while step >= 1:
    for i in range(0, n, step):
      if i not in seen:
        seen.add(i)
        order.append(i)
    step //= 2
  return order


def pbe_def2svp(atoms, dm0=None, conv_tol=1e-9):
  from pyscf import dft, gto

  mol = gto.M(
    atom=[(s, tuple(p)) for s, p in zip(atoms.get_chemical_symbols(), atoms.positions)],
    unit="Angstrom",
    basis="def2-svp",
    charge=0,
    spin=0,
    verbose=0,
  )
  mf = dft.RKS(mol).density_fit()
  mf.xc = "PBE"
  mf.conv_tol = conv_tol
  e = mf.kernel(dm0=dm0)
  if not mf.converged:
    raise RuntimeError("SCF did not converge")
  g = mf.nuc_grad_method().kernel()
  return e, np.asarray(g), mf.make_rdm1(), mf


def cmd_dft(args):
  from ase.io import read, write
  from pyscf import lib
  from pyscf.df.addons import make_auxbasis

  lib.num_threads(1)
  out = Path(args.out)
  frames = []
  for split in ("train", "valid", "test"):
    frames += [a for a in read(out / f"{split}.xyz", ":") if a.info["config_type"] == "ethanol"]
  frames.sort(key=lambda a: (a.info["source"].split(":")[0], a.info["md_step"]))
  sel = np.unique(np.round(np.linspace(0, len(frames) - 1, args.n_frames)).astype(int))
  chosen = [frames[i] for i in sel]
  order = dft_order(len(chosen))
  partial = out / "ethanol_pbe_def2svp.partial.xyz"
  done = {}
  if partial.exists() and not args.restart:
    for a in read(partial, ":"):
      done[a.info["source"]] = a
  t_start = time.time()
  cpu_start = time.process_time()
  dm = None
  settings = None
  for j in order:
    src = chosen[j].info["source"]
    if src in done:
      continue
    a = chosen[j].copy()
    t0 = time.time()
    try:
      e, g, dm, mf = pbe_def2svp(a, dm0=dm)
    except Exception:
      e, g, dm, mf = pbe_def2svp(a, dm0=None)
    if settings is None:
      settings = {
        "xc": mf.xc,
        "basis": "def2-svp",
        "auxbasis": str(mf.with_df.auxbasis or sorted(set(make_auxbasis(mf.mol).values()))),
        "grids_level": mf.grids.level,
        "conv_tol": mf.conv_tol,
        "density_fitting": True,
      }
    a.info = {
      "REF_energy": float(e) * HARTREE_TO_EV,
      "config_type": "ethanol",
      "total_charge": 0,
      "total_spin": 1,
      "source": src,
      "split": a.info["split"],
      "temperature_K": a.info["temperature_K"],
      "md_step": a.info["md_step"],
      "xtb_energy": a.info["REF_energy"],
    }
    a.arrays["REF_forces"] = -g * (HARTREE_TO_EV / BOHR_TO_ANGSTROM)
    done[src] = a
    write(partial, [a], format="extxyz", append=True)
    print(f"{len(done)}/{len(chosen)} {src} {time.time() - t0:.1f} s", flush=True)
    if args.max_minutes and (time.time() - t_start) > 60 * args.max_minutes:
      print("time limit reached", flush=True)
      break
  final = sorted(done.values(), key=lambda a: (a.info["source"].split(":")[0], a.info["md_step"]))
  write(out / "ethanol_pbe_def2svp.xyz", final, format="extxyz")
  log = {
    "frames": len(final),
    "selected": len(chosen),
    "settings": settings,
    "versions": _versions(),
    "wall_s_this_run": round(time.time() - t_start, 1),
    "cpu_s_this_run": round(time.process_time() - cpu_start, 1),
    "per_split": {s: sum(a.info["split"] == s for a in final) for s in ("train", "valid", "test")},
  }
  with open(out / "provenance_dft.json", "w") as fh:
    json.dump(log, fh, indent=1)
  if len(final) == len(chosen):
    partial.unlink(missing_ok=True)
  print(json.dumps(log), flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  px = sub.add_parser("xtb", help="GFN2-xTB MD frames -> train/valid/test.xyz")
  px.add_argument("--out", default=str(DEFAULT_OUT))
  pd = sub.add_parser("dft", help="PBE/def2-SVP relabelling of ethanol frames")
  pd.add_argument("--out", default=str(DEFAULT_OUT))
  pd.add_argument("--n-frames", type=int, default=200)
  pd.add_argument("--max-minutes", type=float, default=0.0, help="stop after this wall time (0: no limit)")
  pd.add_argument("--restart", action="store_true", help="ignore an existing partial file")
  args = p.parse_args(argv)
  {"xtb": cmd_xtb, "dft": cmd_dft}[args.cmd](args)


if __name__ == "__main__":
  sys.exit(main())
