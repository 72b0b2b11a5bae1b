"""Evaluation: error-table numbers and units, text/markdown tables, parity plot, the ``e2former-eval`` command."""

import json
import subprocess
import sys

import ase.io
import matplotlib
import numpy as np
import pytest

from e2former_jax import data as D
from e2former_jax.checkpoint import DEMO_CHECKPOINT
from e2former_jax.evaluation import Predictions, error_table, format_table, main, parity_plot

matplotlib.use("Agg")


def _predictions():
  # two config types; structure 2 has no energy label, atom 0 of structure 0 has no force label
  num_atoms = np.array([2, 3, 1])
  energy_ref = np.array([-10.0, -20.0, np.nan])
  energy_pred = np.array([-10.2, -19.7, -5.0])
  forces_ref = np.zeros((6, 3))
  forces_ref[0] = np.nan
  forces_pred = np.zeros((6, 3))
  forces_pred[1] = [0.3, 0.0, -0.4]  # |dF| = 0.5
  forces_pred[2] = [0.0, 0.1, 0.0]
  forces_pred[5] = [1.0, 2.0, 2.0]  # |dF| = 3
  return Predictions(
    config_type=np.array(["a", "b", "a"]),
    num_atoms=num_atoms,
    energy_pred=energy_pred,
    energy_ref=energy_ref,
    forces_pred=forces_pred,
    forces_ref=forces_ref,
  )


def test_error_table_numbers_and_units():
  t = error_table(_predictions())
  a, b, overall = t["per_config_type"]["a"], t["per_config_type"]["b"], t["overall"]
  assert (a["structures"], a["atoms"], a["energy_structures"], a["force_atoms"]) == (2, 3, 1, 2)
  assert a["energy_mae_meV"] == pytest.approx(200.0) and a["energy_mae_meV_per_atom"] == pytest.approx(100.0)
  # a: atoms 1 (dF = (0.3, 0, -0.4)) and 5 (dF = (1, 2, 2))
  comps = np.array([0.3, 0.0, -0.4, 1.0, 2.0, 2.0])
  assert a["force_mae_meV_per_A"] == pytest.approx(1e3 * np.mean(np.abs(comps)))
  assert a["force_rmse_meV_per_A"] == pytest.approx(1e3 * np.sqrt(np.mean(comps**2)))
  assert a["force_vector_mae_meV_per_A"] == pytest.approx(1e3 * (0.5 + 3.0) / 2)
  assert a["force_vector_rmse_meV_per_A"] == pytest.approx(1e3 * np.sqrt((0.25 + 9.0) / 2))
  assert b["energy_mae_meV_per_atom"] == pytest.approx(100.0) and b["energy_mae_meV"] == pytest.approx(300.0)
  assert b["force_mae_meV_per_A"] == pytest.approx(1e3 * 0.1 / 9)
  assert overall["structures"] == 3 and overall["energy_structures"] == 2 and overall["force_atoms"] == 5
  assert overall["energy_rmse_meV"] == pytest.approx(1e3 * np.sqrt((0.04 + 0.09) / 2))
  # vector RMSE is sqrt(3) x component RMSE
  assert overall["force_vector_rmse_meV_per_A"] == pytest.approx(np.sqrt(3) * overall["force_rmse_meV_per_A"])


def test_tables_and_parity_plot():
  p = _predictions()
  t = error_table(p)
  text = format_table(t)
  lines = text.splitlines()
  assert lines[0].startswith("config_type") and "meV/at" in lines[1]
  assert any(l.startswith("a ") for l in lines) and lines[-1].startswith("overall")
  md = format_table(t, markdown=True)
  assert md.splitlines()[0].startswith("| config_type |") and md.count("\n") == 4
  fig = parity_plot(p)
  assert len(fig.axes) == 2
  assert fig.axes[0].get_xlabel() == "reference (eV/atom)"


def test_eval_command_on_the_demo_checkpoint(tmp_path):
  frames = D.load_demo("test")
  by_type = {}
  for a in frames:
    by_type.setdefault(a.info["config_type"], []).append(a)
  subset = [f for _, fs in sorted(by_type.items()) for f in fs[:2]]
  path = tmp_path / "subset.xyz"
  ase.io.write(path, [_as_mace_frame(a) for a in subset], format="extxyz")
  out = tmp_path / "errors.json"
  plot = tmp_path / "parity.png"
  assert (
    main(
      [
        "--checkpoint",
        str(DEMO_CHECKPOINT),
        "--data",
        str(path),
        "--json",
        str(out),
        "--batch-atoms",
        "256",
        "--plot",
        str(plot),
      ]
    )
    == 0
  )
  numbers = json.loads(out.read_text())
  assert set(numbers["per_config_type"]) == set(by_type)
  assert numbers["overall"]["structures"] == len(subset)
  assert np.isfinite(numbers["overall"]["force_mae_meV_per_A"])
  assert plot.stat().st_size > 10_000


def _as_mace_frame(atoms):
  a = atoms.copy()
  a.info = {
    "config_type": atoms.info["config_type"],
    "REF_energy": atoms.get_potential_energy(),
    "total_charge": 0,
    "total_spin": 1,
  }
  a.arrays["REF_forces"] = atoms.get_forces()
  return a


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
  """Four demo test frames in the MACE-OFF layout, with the charge under a custom key ``q``."""
  frames = [_as_mace_frame(a) for a in D.load_demo("test")[:4]]
  for f in frames:
    f.info["q"] = f.info.pop("total_charge")
  path = tmp_path_factory.mktemp("eval") / "four.xyz"
  ase.io.write(path, frames, format="extxyz")
  return path


def test_eval_writes_predictions_next_to_the_references(labelled, tmp_path):
  out = tmp_path / "predictions.xyz"
  args = ["--checkpoint", str(DEMO_CHECKPOINT), "--data", str(labelled), "--output", str(out), "--charge-key", "q"]
  assert main([*args, "--json", str(tmp_path / "e.json")]) == 0
  frames = ase.io.read(out, index=":")
  assert len(frames) == 4
  for written, source in zip(frames, ase.io.read(labelled, index=":")):
    assert written.info["REF_energy"] == pytest.approx(source.info["REF_energy"], abs=1e-9)
    np.testing.assert_allclose(written.arrays["REF_forces"], source.arrays["REF_forces"], atol=1e-9)
    assert written.arrays["E2Former_forces"].shape == (len(source), 3)
    assert (written.info["q"], written.info["total_spin"]) == (0, 1)  # the named key is kept
  # the written predictions are the ones the table was computed from
  de = [f.info["E2Former_energy"] - f.info["REF_energy"] for f in frames]
  table = json.loads((tmp_path / "e.json").read_text())["overall"]
  assert table["energy_mae_meV"] == pytest.approx(1e3 * np.mean(np.abs(de)), rel=1e-6)
  # and the file reads back with this package's reader, predictions as labels
  again = D.load(out, energy_key="E2Former_energy", forces_key="E2Former_forces")
  assert again[0].get_potential_energy() == pytest.approx(frames[0].info["E2Former_energy"])


def test_eval_user_mistakes_are_one_line_errors(labelled, tmp_path, capsys):
  def run(*extra):
    code = main(["--checkpoint", str(DEMO_CHECKPOINT), "--data", str(labelled), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""

  code, err = run("--energy-key", "energy_dft")
  assert code == 1 and err.startswith("e2former-eval: error: ") and "missing key 'energy_dft'" in err
  code, err = run("--checkpoint", str(tmp_path / "nowhere"))
  assert code == 1 and "no such checkpoint or run directory" in err
  code, err = run("--format", "spice")
  assert code == 1 and "cannot open as HDF5" in err
  spice = tmp_path / "s.h5"
  spice.write_bytes(b"")
  code, err = run("--data", str(spice), "--charge-key", "q")
  assert code == 1 and "the spice reader has no option 'charge_key'" in err
  bad = tmp_path / "bad.xyz"
  bad.write_text(labelled.read_text().replace("q=0", "q=one", 1))
  code, err = run("--data", str(bad))  # without --charge-key, q is not read
  assert code == 0
  code, err = run("--data", str(bad), "--charge-key", "q")
  assert code == 1 and "record 0: q must be an integer, got 'one' (a str)" in err
  with pytest.raises(D.DataFormatError):
    main(["--checkpoint", str(DEMO_CHECKPOINT), "--data", str(bad), "--charge-key", "q", "--debug"])


def test_eval_skip_bad_frames_and_untrained_elements(labelled, tmp_path, capsys):
  frames = ase.io.read(labelled, index=":")
  frames[1].info["REF_energy"] = float("nan")
  frames[2].numbers[0] = 92
  path = tmp_path / "mixed.xyz"
  ase.io.write(path, frames, format="extxyz")
  args = ["--checkpoint", str(DEMO_CHECKPOINT), "--data", str(path)]
  assert main(args) == 1
  assert "record 1: energy contains NaN or inf" in capsys.readouterr().err
  assert main([*args, "--skip-bad-frames"]) == 1
  err = capsys.readouterr().err
  assert "e2former-eval: warning: " in err and "skipped 1 bad record" in err
  assert "1 of 3 structures (first: structure 1 (CH6OU, mixed.xyz:2)) contains element(s) U (92)" in err
  out = tmp_path / "p.xyz"
  assert main([*args, "--skip-bad-frames", "--allow-untrained-elements", "--output", str(out)]) == 0
  assert "predicting anyway (allowed)" in capsys.readouterr().err
  assert [f.info["source"] for f in ase.io.read(out, index=":")] == ["mixed.xyz:0", "mixed.xyz:2", "mixed.xyz:3"]


def test_eval_float64_command(labelled, tmp_path):
  """``--dtype float64`` turns on JAX's x64 mode itself (a fresh process: the flag is global)."""
  code = (
    "import sys; from e2former_jax.evaluation import main; import jax;"
    "rc = main(sys.argv[1:]); assert jax.config.jax_enable_x64; raise SystemExit(rc)"
  )
  args = ["--checkpoint", str(DEMO_CHECKPOINT), "--data", str(labelled), "--dtype", "float64"]
  result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  assert "overall" in result.stdout
