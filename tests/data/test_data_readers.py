"""Readers: tiny files in the real SPICE / MACE-OFF extxyz / OMol25 aselmdb layouts, units, signs, errors."""

import sys

import ase
import ase.units
import h5py
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from e2former_jax import data as D

BOHR = ase.units.create_units("2018")["Bohr"]  # Angstrom per bohr, CODATA 2018 through ASE
HARTREE = ase.units.create_units("2018")["Hartree"]  # eV per hartree


def test_unit_constants():
  assert D.BOHR_TO_ANGSTROM == BOHR and D.HARTREE_TO_EV == HARTREE
  # the CODATA 2018 recommended values (0.529177210903 A, 27.211386245988 eV) to 1e-11 relative (their ratio to
  # 2e-11): ASE derives them from the fundamental constants; far below float32 (6e-8) and the labels' precision
  assert D.BOHR_TO_ANGSTROM == pytest.approx(0.529177210903, rel=1e-11)
  assert D.HARTREE_TO_EV == pytest.approx(27.211386245988, rel=1e-11)
  # 1 hartree/bohr = 51.42206747632590 eV/A (CODATA 2018 atomic unit of force 8.2387235038e-8 N)
  assert D.HARTREE_PER_BOHR_TO_EV_PER_ANGSTROM == pytest.approx(51.4220674763259, rel=2e-11)


# ------------------------------------------------------------------------------------------------------------
# SPICE HDF5


WATER_BOHR = np.array(
  [[[0.0, 0.0, 0.2], [1.4, 0.0, -0.9], [-1.4, 0.0, -0.9]], [[0.0, 0.1, 0.2], [1.5, 0.0, -0.9], [-1.4, 0.0, -1.0]]],
  np.float32,
)
WATER_GRAD = np.array(
  [
    [[0.01, -0.02, 0.03], [-0.005, 0.01, -0.015], [-0.005, 0.01, -0.015]],
    [[0.02, 0.0, 0.0], [-0.01, 0.0, 0.0], [-0.01, 0.0, 0.0]],
  ],
  np.float32,
)


def _spice_group(
  f, name, numbers, conf, energy, grad, smiles, subset="SPICE PubChem Set 1 Single Points Dataset v1.3", formation=None
):
  g = f.create_group(name)
  g.create_dataset("subset", data=np.array([subset.encode()], dtype=h5py.string_dtype()))
  g.create_dataset("smiles", data=np.array([smiles.encode()], dtype=h5py.string_dtype()))
  g.create_dataset("atomic_numbers", data=np.asarray(numbers, np.int16))
  c = g.create_dataset("conformations", data=np.asarray(conf, np.float32))
  c.attrs["units"] = "bohr"
  e = g.create_dataset("dft_total_energy", data=np.asarray(energy, np.float64))
  e.attrs["units"] = "hartree"
  fe = g.create_dataset(
    "formation_energy", data=np.asarray(formation if formation is not None else np.asarray(energy) + 76.0, np.float64)
  )
  fe.attrs["units"] = "hartree"
  gr = g.create_dataset("dft_total_gradient", data=np.asarray(grad, np.float32))
  gr.attrs["units"] = "hartree/bohr"
  return g


def _write_spice(path):
  with h5py.File(path, "w") as f:
    _spice_group(
      f,
      "[O:1]([H:2])[H:3]",
      [8, 1, 1],
      WATER_BOHR,
      [-76.4, -76.3],
      WATER_GRAD,
      "[O:1]([H:2])[H:3]",
      formation=[-0.35, -0.25],
    )
    nh4 = np.array([[[0.0, 0.0, 0.0], [1.9, 0.0, 0.0], [-0.6, 1.8, 0.0], [-0.6, -0.9, 1.6], [-0.6, -0.9, -1.6]]])
    _spice_group(
      f,
      "[N+:1]([H:2])([H:3])([H:4])[H:5]",
      [7, 1, 1, 1, 1],
      nh4,
      [-56.9],
      np.zeros((1, 5, 3)),
      "[N+:1]([H:2])([H:3])([H:4])[H:5]",
      subset="SPICE Ion Pairs Single Points Dataset v1.2",
    )


def test_spice_units_signs_and_info(tmp_path):
  path = tmp_path / "spice.hdf5"
  _write_spice(path)
  ds = D.open_dataset(path)
  assert isinstance(ds, D.SpiceDataset) and ds.format == "spice"
  assert len(ds) == 3 and ds.skipped == []
  # records follow h5py's (sorted) group order: "[N+:1]..." then "[O:1]..." conformations 0 and 1
  a = ds[2]
  np.testing.assert_allclose(a.positions, WATER_BOHR[1].astype(np.float64) * BOHR, rtol=0, atol=1e-12)
  assert a.positions[1, 0] == pytest.approx(1.5 * 0.529177210903, abs=1e-7)
  assert a.get_potential_energy() == pytest.approx(-76.3 * HARTREE, rel=1e-15)
  assert a.get_potential_energy() == pytest.approx(-2076.228770553, abs=1e-6)
  # forces are minus the gradient: +0.02 Ha/bohr gradient -> -1.0284417 eV/A force
  assert a.get_forces()[0, 0] == pytest.approx(-0.02 * 51.4220674763259, rel=1e-6)
  np.testing.assert_allclose(a.get_forces(), -WATER_GRAD[1].astype(np.float64) * HARTREE / BOHR, rtol=1e-12)
  assert a.numbers.tolist() == [8, 1, 1]
  assert a.info["charge"] == 0 and a.info["spin"] == 1
  assert a.info["config_type"] == "SPICE PubChem Set 1 Single Points Dataset v1.3"
  assert a.info["source"] == "spice:[O:1]([H:2])[H:3]/1"
  assert a.info["smiles"] == "[O:1]([H:2])[H:3]"
  ion = ds[0]
  assert ion.info["charge"] == 1 and len(ion) == 5
  assert ion.info["config_type"].startswith("SPICE Ion Pairs")
  assert [x.info["source"] for x in ds[1:3]] == ["spice:[O:1]([H:2])[H:3]/0", "spice:[O:1]([H:2])[H:3]/1"]
  assert ds[-1].info["source"] == "spice:[O:1]([H:2])[H:3]/1"
  ds.close()


def test_spice_formation_energy_selectable(tmp_path):
  path = tmp_path / "spice.h5"
  _write_spice(path)
  atoms = D.load(path, energy="formation_energy")
  assert atoms[1].get_potential_energy() == pytest.approx(-0.35 * HARTREE, rel=1e-15)
  assert D.load(path)[1].get_potential_energy() == pytest.approx(-76.4 * HARTREE, rel=1e-15)


@pytest.mark.parametrize(
  "smiles,charge",
  [
    ("[O:1]([H:2])[H:3]", 0),
    ("CCO", 0),
    ("[NH4+]", 1),
    ("[O-]C(=O)C", -1),
    ("[NH3+:7]CC([O-:9])=O", 0),
    ("[Fe+2]", 2),
    ("[Fe++]", 2),
    ("[O--]", -2),
    ("[Na+].[Cl-]", 0),
    ("[2H]C([2H])[2H]", 0),
    ("[C@@H](N)(C)O", 0),
    ("[Mg+2].[Cl-].[Cl-]", 0),
    ("[N+](=O)([O-])[O-]", -1),
    ("[Co-3]", -3),
  ],
)
def test_smiles_formal_charge(smiles, charge):
  assert D.smiles_formal_charge(smiles) == charge


def _mutate_spice(path, fn):
  _write_spice(path)
  with h5py.File(path, "a") as f:
    fn(f["[O:1]([H:2])[H:3]"])


def test_spice_missing_key(tmp_path):
  path = tmp_path / "s.h5"
  _mutate_spice(path, lambda g: g.__delitem__("dft_total_gradient"))
  record = r"\[O:1\]\(\[H:2\]\)\[H:3\]"
  with pytest.raises(D.DataFormatError, match=rf"s\.h5, record {record}: missing key 'dft_total_gradient'"):
    D.open_dataset(path)


def test_spice_wrong_shape(tmp_path):
  path = tmp_path / "s.h5"

  def fn(g):
    del g["dft_total_energy"]
    g.create_dataset("dft_total_energy", data=np.zeros(3))

  _mutate_spice(path, fn)
  with pytest.raises(D.DataFormatError, match=r"dft_total_energy has shape \(3,\), expected \(2,\)"):
    D.open_dataset(path)


def test_spice_nanometer_input_file_rejected(tmp_path):
  path = tmp_path / "s.h5"
  _mutate_spice(path, lambda g: g["conformations"].attrs.__setitem__("units", "nanometers"))
  with pytest.raises(D.DataFormatError, match="expected 'bohr'"):
    D.open_dataset(path)


@pytest.mark.parametrize("z", [0, 119])
def test_spice_unknown_element(tmp_path, z):
  path = tmp_path / "s.h5"
  _mutate_spice(path, lambda g: g["atomic_numbers"].__setitem__(1, z))
  with pytest.raises(D.DataFormatError, match=rf"unknown element: atomic number\(s\) \[{z}\]"):
    D.open_dataset(path)


def test_spice_nan_raises_on_read_and_is_counted_when_skipping(tmp_path):
  path = tmp_path / "s.h5"
  _mutate_spice(path, lambda g: g["dft_total_gradient"].__setitem__((1, 2, 0), np.nan))
  ds = D.open_dataset(path)  # structure is fine; values are checked when read
  assert len(ds) == 3
  ds[1]
  with pytest.raises(D.DataFormatError, match=r"record \[O:1\]\(\[H:2\]\)\[H:3\]/1: forces contains NaN"):
    ds[2]
  with pytest.raises(D.DataFormatError, match="NaN"):
    D.load(path)
  with pytest.warns(UserWarning, match="skipped 1 bad record"):
    ds2 = D.open_dataset(path, on_error="skip")
  assert len(ds2) == 2
  assert ds2.skipped == [("[O:1]([H:2])[H:3]/1", "forces contains NaN or inf")]
  assert [a.info["source"] for a in ds2] == ["spice:[N+:1]([H:2])([H:3])([H:4])[H:5]/0", "spice:[O:1]([H:2])[H:3]/0"]


def test_spice_skip_bad_group(tmp_path):
  path = tmp_path / "s.h5"
  _mutate_spice(path, lambda g: g["atomic_numbers"].__setitem__(0, 0))
  with pytest.warns(UserWarning, match="skipped 1 bad record"):
    ds = D.open_dataset(path, on_error="skip")
  assert len(ds) == 1 and len(ds.skipped) == 1 and "unknown element" in ds.skipped[0][1]
  assert ds.skipped[0][0] == "[O:1]([H:2])[H:3]" and ds[0].info["charge"] == 1


def test_spice_truncated_file(tmp_path):
  path = tmp_path / "s.h5"
  _write_spice(path)
  raw = path.read_bytes()
  path.write_bytes(raw[: len(raw) // 2])
  with pytest.raises(D.DataFormatError, match=r"s\.h5.*(truncated or corrupt)"):
    D.load(path)


# ------------------------------------------------------------------------------------------------------------
# extxyz (MACE-OFF layout)

MACE_XYZ = """3
Properties=species:S:1:pos:R:3:REF_forces:R:3 REF_energy=-2076.5 config_type=water total_charge=0 total_spin=1 pbc="F F F"
O 0.0 0.0 0.1 0.5 -0.25 1.0
H 0.75 0.0 -0.5 -0.25 0.125 -0.5
H -0.75 0.0 -0.5 -0.25 0.125 -0.5
2
Properties=species:S:1:pos:R:3:REF_forces:R:3 REF_energy=-13.6 config_type=ion total_charge=-1 source=my-id-7 pbc="F F F"
H 0.0 0.0 0.0 1.5 0.0 0.0
H 0.0 0.0 0.9 -1.5 0.0 0.0
"""


def test_extxyz_mace_layout(tmp_path):
  path = tmp_path / "d.xyz"
  path.write_text(MACE_XYZ)
  ds = D.open_dataset(path)
  assert isinstance(ds, D.ExtxyzDataset) and len(ds) == 2
  a, b = ds[0], ds[1]
  assert a.get_potential_energy() == -2076.5
  np.testing.assert_array_equal(a.get_forces()[0], [0.5, -0.25, 1.0])
  np.testing.assert_array_equal(a.positions[1], [0.75, 0.0, -0.5])
  assert a.info["charge"] == 0 and a.info["spin"] == 1 and a.info["config_type"] == "water"
  assert a.info["source"] == "d.xyz:0"
  assert b.info["charge"] == -1 and b.info["spin"] == 1  # spin absent -> 1
  assert b.info["source"] == "my-id-7"
  assert not a.pbc.any()
  assert [x.info["config_type"] for x in D.load(path, format="extxyz")] == ["water", "ion"]


def test_extxyz_configurable_keys(tmp_path):
  path = tmp_path / "d.extxyz"
  text = """2
Properties=species:S:1:pos:R:3:dft_f:R:3 dft_e=-1.25 q=1 mult=2 kind=cation pbc="F F F"
C 0 0 0 0.1 0.2 0.3
H 0 0 1.1 -0.1 -0.2 -0.3
"""
  path.write_text(text)
  (a,) = D.load(path, energy_key="dft_e", forces_key="dft_f", charge_key="q", spin_key="mult", config_type_key="kind")
  assert a.get_potential_energy() == -1.25
  np.testing.assert_array_equal(a.get_forces()[1], [-0.1, -0.2, -0.3])
  assert (a.info["charge"], a.info["spin"], a.info["config_type"]) == (1, 2, "cation")
  # ASE's own calculator keys (energy=, forces) are readable too
  path2 = tmp_path / "ase.xyz"
  ase.io.write(path2, _atoms_with_calc(), format="extxyz")
  (b,) = D.load(path2, energy_key="energy", forces_key="forces")
  assert b.get_potential_energy() == pytest.approx(-3.5)
  np.testing.assert_allclose(b.get_forces(), _atoms_with_calc().calc.results["forces"])


def _frame(info: str) -> str:
  return f"""2
Properties=species:S:1:pos:R:3:REF_forces:R:3 REF_energy=-1.0 {info} pbc="F F F"
O 0 0 0 0 0 0
H 0 0 0.97 0 0 0
"""


@pytest.mark.parametrize(
  "info,charge,spin",
  [
    ("charge=1 spin=2", 1, 2),  # the calculator's spelling (was read as 0, 1)
    ("total_charge=-1 total_spin=2", -1, 2),  # MACE-OFF's
    ("charge=1 total_charge=1 multiplicity=3", 1, 3),  # several spellings that agree
    ("total_charge=0.0 total_spin=1.0", 0, 1),  # integral floats
    ("", 0, 1),
  ],
)
def test_extxyz_every_spelling_of_charge_and_multiplicity(tmp_path, info, charge, spin):
  path = tmp_path / "q.xyz"
  path.write_text(_frame(info))
  (a,) = D.load(path)
  assert (a.info["charge"], a.info["spin"]) == (charge, spin)
  assert not {"total_charge", "total_spin", "multiplicity"} & set(a.info)  # one spelling in memory


def test_extxyz_disagreeing_spellings_and_named_keys(tmp_path):
  path = tmp_path / "q.xyz"
  path.write_text(_frame("charge=1 total_charge=0"))
  with pytest.raises(
    D.DataFormatError, match=r"record 0: the total charge is given more than once .*charge=1, total_charge=0"
  ):
    D.load(path)
  path.write_text(_frame("spin=2 total_spin=3"))
  with pytest.raises(D.DataFormatError, match=r"spin multiplicity is given more than once .*spin=2, total_spin=3"):
    D.load(path)
  # a named key is the only one read, and the other spellings do not travel on
  path.write_text(_frame("q=2 charge=1 total_spin=3 mult=2"))
  (a,) = D.load(path, charge_key="q", spin_key="mult")
  assert (a.info["charge"], a.info["spin"]) == (2, 2) and "q" not in a.info and "total_spin" not in a.info
  path.write_text(_frame("total_spin=0"))
  with pytest.raises(D.DataFormatError, match=r"spin multiplicity must be >= 1 .*got 0 \(total_spin\)"):
    D.load(path)


def test_unknown_reader_option_is_named(tmp_path):
  path = tmp_path / "spice.h5"
  _write_spice(path)
  with pytest.raises(ValueError, match=r"the spice reader has no option 'charge_key'"):
    D.load(path, charge_key="q")


def test_extxyz_periodic_cell(tmp_path):
  path = tmp_path / "p.xyz"
  text = """1
Lattice="3.0 0.0 0.0 0.0 3.0 0.0 0.0 0.0 3.0" Properties=species:S:1:pos:R:3:REF_forces:R:3 REF_energy=-1.0 pbc="T T T"
Ar 0 0 0 0 0 0
"""
  path.write_text(text)
  (a,) = D.load(path)
  assert a.pbc.all()
  np.testing.assert_array_equal(a.cell.array, 3.0 * np.eye(3))


def test_extxyz_errors(tmp_path):
  path = tmp_path / "bad.xyz"
  path.write_text(MACE_XYZ.replace("REF_forces", "F"))
  with pytest.raises(D.DataFormatError, match=r"bad\.xyz, record 0: missing key 'REF_forces'"):
    D.load(path)
  path.write_text(MACE_XYZ.replace("REF_energy=-13.6", "REF_energy=nan"))
  with pytest.raises(D.DataFormatError, match=r"bad\.xyz, record 1: energy contains NaN"):
    D.load(path)
  path.write_text(
    MACE_XYZ.replace("REF_forces:R:3", "REF_forces:R:2")
    .replace(" 1.0\n", "\n")
    .replace(" -0.5\nH -0.75", "\nH -0.75")
    .replace("-0.25 0.125 -0.5\n2", "-0.25 0.125\n2")
  )
  with pytest.raises(D.DataFormatError, match=r"record 0: forces has shape \(3, 2\), expected \(3, 3\)"):
    D.load(path)
  path.write_text(MACE_XYZ.replace("H 0.0 0.0 0.9", "Xq 0.0 0.0 0.9"))
  with pytest.raises(D.DataFormatError, match=r"bad\.xyz, record 1: cannot parse frame"):
    D.load(path)
  path.write_text(MACE_XYZ.replace("total_charge=-1", "total_charge=0.5"))
  with pytest.raises(D.DataFormatError, match=r"record 1: total_charge must be an integer, got 0\.5"):
    D.load(path)
  path.write_text(MACE_XYZ.replace("total_charge=-1", 'total_charge="+1e"'))
  with pytest.raises(D.DataFormatError, match=r"record 1: total_charge must be an integer, got '\+1e' \(a str\)"):
    D.load(path)


def test_extxyz_truncated_and_skip(tmp_path):
  path = tmp_path / "t.xyz"
  lines = MACE_XYZ.splitlines(keepends=True)
  path.write_text("".join(lines[:-1]))  # last atom line of frame 1 missing
  with pytest.raises(D.DataFormatError, match=r"t\.xyz, record 1: truncated: 2 atoms announced, file ends after 1"):
    D.open_dataset(path)
  with pytest.warns(UserWarning, match="skipped 1 bad record"):
    ds = D.open_dataset(path, on_error="skip")
  assert len(ds) == 1 and ds.skipped[0][0] == 1
  # a corrupt middle frame is skipped, counted, and the frames after it are kept
  path.write_text(MACE_XYZ.replace("REF_energy=-2076.5", "REF_energy=nan") + MACE_XYZ)
  with pytest.warns(UserWarning, match="skipped 1 bad record"):
    ds = D.open_dataset(path, on_error="skip")
  assert len(ds) == 3 and ds.skipped == [(0, "energy contains NaN or inf")]
  assert [a.info["config_type"] for a in ds] == ["ion", "water", "ion"]
  path.write_text("1\ncomment\nH 0 0 0\nnot-a-count\nH 0 0 0\n")
  with pytest.raises(D.DataFormatError, match="expected an atom count line"):
    D.open_dataset(path)


# ------------------------------------------------------------------------------------------------------------
# OMol25 aselmdb


def _atoms_with_calc(numbers=(8, 1, 1), energy=-3.5, seed=0):
  rng = np.random.default_rng(seed)
  a = ase.Atoms(numbers=list(numbers), positions=rng.normal(size=(len(numbers), 3)))
  a.calc = SinglePointCalculator(a, energy=energy, forces=rng.normal(size=(len(numbers), 3)))
  return a


def test_aselmdb_omol_layout(tmp_path):
  from ase.db import connect

  path = tmp_path / "omol.aselmdb"
  written = [
    _atoms_with_calc(energy=-2000.25, seed=1),
    _atoms_with_calc((6, 1, 1, 1, 1), -1100.5, seed=2),
    _atoms_with_calc((26,), -34000.0, seed=3),
  ]
  db = connect(str(path), type="aselmdb")
  db.write(written[0], data={"charge": -1, "spin": 2, "source": "omol/abc/0", "data_id": "elytes"})
  db.write(written[1], data={"charge": 0, "spin": 1, "source": "omol/def/3"})
  db.write(written[2])  # no data: charge 0, spin 1, source from the row id
  db.close()
  ds = D.open_dataset(path)
  assert isinstance(ds, D.AselmdbDataset) and len(ds) == 3
  a = ds[0]
  assert a.get_potential_energy() == -2000.25  # eV as stored, no conversion
  np.testing.assert_allclose(a.get_forces(), written[0].calc.results["forces"], rtol=0, atol=1e-12)
  np.testing.assert_allclose(a.positions, written[0].positions, rtol=0, atol=1e-12)
  assert (a.info["charge"], a.info["spin"], a.info["source"], a.info["config_type"]) == (-1, 2, "omol/abc/0", "elytes")
  assert ds[1].info["source"] == "omol/def/3" and ds[1].numbers.tolist() == [6, 1, 1, 1, 1]
  c = ds[2]
  assert (c.info["charge"], c.info["spin"], c.info["source"]) == (0, 1, f"omol.aselmdb:{ds.row_ids[2]}")
  ds.close()
  assert [x.info.get("source") for x in D.load(path, format="aselmdb")][:2] == ["omol/abc/0", "omol/def/3"]


def test_aselmdb_without_the_optional_backend_names_the_extra(tmp_path, monkeypatch):
  path = tmp_path / "omol.aselmdb"
  path.write_bytes(b"")
  monkeypatch.setitem(sys.modules, "ase_db_backends", None)  # as if not installed
  monkeypatch.setitem(sys.modules, "ase_db_backends.aselmdb", None)
  with pytest.raises(
    ImportError, match=r"omol\.aselmdb: reading OMol25 \.aselmdb files needs .* 'e2former-jax\[omol25\]'"
  ):
    D.open_dataset(path)


# ase-db-backends' LMDBDatabase.__del__ raises when its constructor failed on the corrupt file below
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_aselmdb_errors(tmp_path):
  from ase.db import connect

  path = tmp_path / "bad.aselmdb"
  db = connect(str(path), type="aselmdb")
  db.write(_atoms_with_calc(), data={"charge": 0, "spin": 1, "source": "ok"})
  noforce = ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
  noforce.calc = SinglePointCalculator(noforce, energy=-1.0)
  db.write(noforce, data={"source": "no-forces"})
  bad = _atoms_with_calc()
  db.write(bad, data={"spin": 0, "source": "bad-spin"})
  db.close()
  ds = D.open_dataset(path)
  assert len(ds) == 3
  with pytest.raises(D.DataFormatError, match=rf"bad\.aselmdb, record {ds.row_ids[1]}: missing key 'forces'"):
    ds[1]
  with pytest.raises(D.DataFormatError, match="spin multiplicity must be >= 1"):
    ds[2]
  ds.close()
  with pytest.warns(UserWarning, match="skipped 2 bad record"):
    ds2 = D.open_dataset(path, on_error="skip")
  assert len(ds2) == 1 and ds2[0].info["source"] == "ok" and len(ds2.skipped) == 2
  corrupt = tmp_path / "corrupt.aselmdb"
  corrupt.write_bytes(b"this is not an lmdb file" * 100)
  with pytest.raises(D.DataFormatError, match=r"corrupt\.aselmdb: cannot open as aselmdb"):
    D.open_dataset(corrupt)


# ------------------------------------------------------------------------------------------------------------
# formats, references


def test_format_detection(tmp_path):
  assert D.detect_format("a.h5") == D.detect_format("a.HDF5") == "spice"
  assert D.detect_format("a.xyz") == D.detect_format("a.extxyz") == "extxyz"
  assert D.detect_format("a.aselmdb") == D.detect_format("a.lmdb") == "aselmdb"
  assert D.detect_format("a.dat", format="xyz") == "extxyz"
  with pytest.raises(ValueError, match="cannot tell the format"):
    D.detect_format("a.dat")
  with pytest.raises(ValueError, match="unknown data format"):
    D.detect_format("a.xyz", format="pdb")
  with pytest.raises(FileNotFoundError, match="no such file"):
    D.open_dataset(tmp_path / "missing.xyz")


def test_fit_element_references_recovers_known_values():
  true = {1: -13.6, 6: -1030.0, 8: -2040.0}
  rng = np.random.default_rng(0)
  structs = []
  for k in range(12):
    n = rng.integers(1, 4, size=3)
    numbers = [1] * int(n[0] + k % 3) + [6] * int(n[1]) + [8] * int(n[2])
    a = ase.Atoms(numbers=numbers, positions=rng.normal(size=(len(numbers), 3)) * 3)
    a.calc = SinglePointCalculator(a, energy=sum(true[z] for z in numbers))
    structs.append(a)
  fit = D.fit_element_references(structs)
  assert set(fit) == {1, 6, 8}
  for z in true:
    assert fit[z] == pytest.approx(true[z], abs=1e-8)
  energies = [s.get_potential_energy() for s in structs]
  fit2 = D.fit_element_references(structs, energies=energies, elements=[1, 6, 8, 9])
  assert fit2[9] == 0.0 and fit2[6] == pytest.approx(-1030.0, abs=1e-8)
  # one composition only: underdetermined, warned, still reproduces the energy
  with pytest.warns(UserWarning, match="underdetermined"):
    one = D.fit_element_references(structs[:1])
  assert D.reference_energy(structs[0], one) == pytest.approx(structs[0].get_potential_energy(), abs=1e-8)


def test_reference_tables():
  t = D.SPICE_ELEMENT_REFERENCES
  assert t == {
    1: -16.3841057,
    6: -1037.58911,
    7: -1490.72485,
    8: -2048.14404,
    9: -2718.46191,
    15: -9291.55469,
    16: -10836.9053,
    17: -12524.3545,
    35: -70046.375,
    53: -8102.90869,
  }
  assert D.ELEMENT_REFERENCE_TABLES["spice"] is t
  om = D.OMOL25_ELEMENT_REFERENCES
  assert len(om) == 83 and om[1] == pytest.approx(-15.9710732) and om[6] == pytest.approx(-1037.14414)
  water = ase.Atoms("OH2")
  assert D.reference_energy(water, t) == pytest.approx(-2048.14404 - 2 * 16.3841057)
  with pytest.raises(KeyError, match=r"\[26\]"):
    D.reference_energy([26, 1], t)
  arr = D.reference_array(t)
  assert arr.shape == (119,) and arr[8] == -2048.14404 and arr[2] == 0.0
