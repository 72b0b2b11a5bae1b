"""Evaluation: error-table numbers and units, text/markdown tables, parity plot, the ``e2former-eval`` command."""

import json

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
