"""The shipped demo data: layout, counts, trajectory-segment splits, provenance, and the generator's helpers."""

import collections
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from e2former_jax import data as D

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "e2former_jax" / "demo_data"
SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def frames():
  return {s: D.load_demo(s) for s in SPLITS}


def _generator():
  spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "scripts" / "make_demo_data.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_layout_and_labels(frames):
  for split, atoms in frames.items():
    assert atoms, split
    for a in atoms:
      assert a.info["split"] == split
      assert a.info["charge"] == 0 and a.info["spin"] == 1
      assert np.isfinite(a.get_potential_energy()) and np.all(np.isfinite(a.get_forces()))
      assert np.abs(a.get_forces()).max() < 20.0  # eV/A; thermal MD, no broken geometries
      assert not a.pbc.any()
  # raw MACE-OFF keys, as written in the files
  head = (DEMO / "train.xyz").read_text().splitlines()[1]
  for key in ("REF_forces:R:3", "REF_energy=", "config_type=", "total_charge=0", "total_spin=1"):
    assert key in head


def test_counts_elements_and_energy_scale(frames):
  prov = json.loads((DEMO / "provenance_xtb.json").read_text())
  expected = collections.Counter()
  for t in prov["trajectories"]:
    for s in SPLITS:
      expected[(t["molecule"], s)] += t[f"n_{s}"]
  got = collections.Counter((a.info["config_type"], s) for s, v in frames.items() for a in v)
  assert got == expected
  assert got[("ethanol", "train")] >= 250 and got[("aspirin", "train")] >= 250
  assert 1000 <= sum(got.values()) <= 2000
  elements = {int(z) for v in frames.values() for a in v for z in a.numbers}
  assert elements == {1, 6, 7, 8, 9, 16, 17}
  assert "water_dimer" in {a.info["config_type"] for a in frames["train"]}
  ethanol = [a.get_potential_energy() for a in frames["train"] if a.info["config_type"] == "ethanol"]
  # GFN2-xTB total energy of ethanol is about -11.38 hartree
  assert -315 < np.mean(ethanol) < -305


def test_splits_are_contiguous_trajectory_segments(frames):
  sources = [a.info["source"] for v in frames.values() for a in v]
  assert len(sources) == len(set(sources))
  steps = collections.defaultdict(dict)
  for s, v in frames.items():
    for a in v:
      traj, step = a.info["source"].rsplit(":", 1)
      assert int(step) == a.info["md_step"]
      steps[traj].setdefault(s, []).append(int(step))
  for traj, by_split in steps.items():
    assert set(by_split) == set(SPLITS), traj
    assert max(by_split["train"]) < min(by_split["valid"]) and max(by_split["valid"]) < min(by_split["test"])
    allsteps = sorted(x for v in by_split.values() for x in v)
    assert np.all(np.diff(allsteps) == np.diff(allsteps)[0]), traj  # evenly strided, nothing missing
    n = len(allsteps)
    assert len(by_split["train"]) == round(0.8 * n)


def test_dft_relabelled_ethanol(frames):
  path = DEMO / "ethanol_pbe_def2svp.xyz"
  dft = D.load(path)
  assert len(dft) >= 100
  xtb = {a.info["source"]: a for v in frames.values() for a in v}
  splits = collections.Counter()
  for a in dft:
    assert a.info["config_type"] == "ethanol" and len(a) == 9
    ref = xtb[a.info["source"]]
    np.testing.assert_allclose(a.positions, ref.positions, atol=1e-7)
    assert a.info["xtb_energy"] == pytest.approx(ref.get_potential_energy(), abs=1e-6)
    assert a.info["split"] == ref.info["split"]
    splits[a.info["split"]] += 1
    # PBE/def2-SVP total energy of ethanol is about -154.7 hartree
    assert -4215 < a.get_potential_energy() < -4205
    assert np.abs(a.get_forces().sum(axis=0)).max() < 0.05  # no net force (density fitting, grids: small)
  assert set(splits) == set(SPLITS)
  # DFT and GFN2-xTB forces agree roughly, and the sign convention is the same
  f_dft = np.concatenate([a.get_forces().ravel() for a in dft])
  f_xtb = np.concatenate([xtb[a.info["source"]].get_forces().ravel() for a in dft])
  assert np.corrcoef(f_dft, f_xtb)[0, 1] > 0.8


def test_demo_paths():
  assert D.demo_data_path("valid") == DEMO / "valid.xyz"
  with pytest.raises(ValueError, match="unknown demo split"):
    D.demo_data_path("val")
  eth = D.load_demo("test", config_types="ethanol")
  assert eth and {a.info["config_type"] for a in eth} == {"ethanol"}


def test_generator_split_and_order_helpers():
  gen = _generator()

  class Fake:
    def __init__(self):
      self.info = {}

  parts = gen.split_contiguous([Fake() for _ in range(130)])
  assert [len(parts[s]) for s in SPLITS] == [104, 13, 13]
  assert all(a.info["split"] == s for s in SPLITS for a in parts[s])
  for n in (1, 7, 200):
    order = gen.dft_order(n)
    assert sorted(order) == list(range(n))
  first = sorted(gen.dft_order(200)[:100])
  assert max(np.diff(first)) <= 4 and first[0] == 0  # any prefix is spread over the whole range
  # the generator writes the CODATA 2018 recommended values, the readers take CODATA 2018 from ase.units
  assert gen.HARTREE_TO_EV == pytest.approx(D.HARTREE_TO_EV, rel=1e-11)
  assert gen.BOHR_TO_ANGSTROM == pytest.approx(D.BOHR_TO_ANGSTROM, rel=1e-11)
