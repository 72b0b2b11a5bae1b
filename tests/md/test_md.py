"""MD with the demo checkpoint on a held-out aspirin frame: NVE energy conservation through ASE and through
the jitted JAX loop (atoms in Morton order inside it), their step-by-step agreement, ASE Langevin, and the
``e2former-md`` command, including its blow-up guard with both drivers.

The module runs with ``jax_enable_x64`` on: the model stays float32 (as trained) and both integrators keep
float64 positions and velocities, so the two drivers feed the model identical float32 inputs. (In float32
alone, total energies near -1000 eV are resolved to about 1e-4 eV, too coarse for a 1e-5 eV comparison.)
Each run is made once and shared by the tests.
"""

import math

import jax
import numpy as np
import pytest

from e2former_jax.calculator import E2FormerCalculator
from e2former_jax.checkpoint import DEMO_CHECKPOINT, load_model
from e2former_jax.data import load_demo
from e2former_jax.md import BlowUpLimits, JaxMD, MDBlowUpError, MDLog, cli, initial_velocities, read_log, run_ase_md
from e2former_jax.md.ase_driver import run_statistics

TIMESTEP_FS = 0.5
NVE_STEPS = 400  # 200 fs of the jitted loop
# ASE's loop calls the calculator once per step (host neighbour list, one device call: 90 ms a step on the suite's
# host): 100 steps (50 fs) check its energy conservation and give the 10 steps the drivers compare; the same
# forces are integrated for 200 fs by the jitted loop.
ASE_NVE_STEPS = 100
SPREAD_PER_ATOM = 1e-3  # eV/atom, max - min of the total energy
AGREE = 1e-5  # eV, ASE vs JAX on each of the first 10 steps
CHUNK = 50


@pytest.fixture(scope="module", autouse=True)
def x64(optimized_programs):
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


@pytest.fixture(scope="module")
def model(x64):
  return load_model(DEMO_CHECKPOINT)


@pytest.fixture(scope="module")
def start():
  """The first held-out (test split) aspirin frame with 300 K Maxwell-Boltzmann velocities."""
  atoms = next(a for a in load_demo("test") if a.info["config_type"] == "aspirin").copy()
  initial_velocities(atoms, 300.0, seed=0)
  return atoms


@pytest.fixture(scope="module")
def calculator(model):
  return E2FormerCalculator(model=model)


@pytest.fixture(scope="module")
def ase_nve(start, calculator):
  atoms = start.copy()
  atoms.calc = calculator
  return run_ase_md(atoms, ASE_NVE_STEPS, timestep_fs=TIMESTEP_FS)


@pytest.fixture(scope="module")
def jax_nve(model, start):
  sim = JaxMD(model, start, timestep_fs=TIMESTEP_FS, steps_per_call=CHUNK)
  rows = sim.run(NVE_STEPS)
  return sim, rows


def _report(name, rows, n_atoms, seconds_per_step):
  spread = np.ptp(rows["total"])
  print(
    f"\n{name}: {len(rows['step']) - 1} steps, total-energy spread {1e3 * spread:.3f} meV "
    f"({1e3 * spread / n_atoms:.4f} meV/atom), drift {1e3 * (rows['total'][-1] - rows['total'][0]):.3f} meV, "
    f"T {rows['temperature'].min():.0f}-{rows['temperature'].max():.0f} K, {1e3 * seconds_per_step:.1f} ms/step"
  )
  return spread


@pytest.mark.slow
def test_ase_nve_conserves_energy(ase_nve, start):
  spread = _report("ASE VelocityVerlet", ase_nve, len(start), np.median(ase_nve["seconds"][2:]))
  assert len(ase_nve["step"]) == ASE_NVE_STEPS + 1
  assert spread <= SPREAD_PER_ATOM * len(start)


@pytest.mark.slow
def test_jax_nve_conserves_energy(jax_nve, start):
  sim, rows = jax_nve
  steps = sum(s for s, _ in sim.chunk_seconds[1:])
  seconds = sum(t for _, t in sim.chunk_seconds[1:])
  spread = _report("JAX velocity Verlet", rows, len(start), seconds / steps)
  np.testing.assert_array_equal(rows["step"], np.arange(NVE_STEPS + 1))
  assert spread <= SPREAD_PER_ATOM * len(start)
  assert sim.reallocations == 0 and np.all(rows["beyond_k"] == 0)


@pytest.mark.slow
def test_ase_and_jax_drivers_agree_step_by_step(ase_nve, jax_nve):
  _, rows = jax_nve
  for key in ("potential", "kinetic", "total"):
    diff = np.abs(ase_nve[key][:11] - rows[key][:11])
    print(f"{key}: max |ASE - JAX| over steps 0-10 = {diff.max():.2e} eV")
    assert np.all(diff <= AGREE), (key, diff)


@pytest.mark.slow
def test_jax_final_state_matches_a_fresh_evaluation(jax_nve, calculator):
  """The JAX loop's last energy and forces are what the calculator gives for its last positions."""
  sim, _ = jax_nve
  atoms = sim.atoms
  reference = atoms.copy()
  reference.calc = calculator
  assert abs(atoms.get_potential_energy() - reference.get_potential_energy()) <= AGREE
  np.testing.assert_allclose(atoms.get_forces(), reference.get_forces(), atol=1e-4)


def test_ase_langevin_runs_heats_and_writes(start, calculator, tmp_path):
  import ase.io

  atoms = start.copy()
  atoms.set_momenta(np.zeros((len(atoms), 3)))
  atoms.calc = calculator
  log = MDLog(tmp_path / "nvt.log", {"run": "ASE Langevin"})
  rows = run_ase_md(
    atoms,
    20,
    timestep_fs=TIMESTEP_FS,
    ensemble="nvt",
    temperature_K=600.0,
    friction_per_fs=0.1,
    seed=1,
    interval=5,
    trajectory=tmp_path / "nvt.extxyz",
    log=log,
  )
  log.close()
  assert np.all(np.isfinite(rows["total"]))
  assert rows["temperature"][0] == 0.0 and rows["temperature"][-1] > 50.0  # the bath heats it from rest
  columns = read_log(tmp_path / "nvt.log")
  np.testing.assert_array_equal(columns["step"], [0, 5, 10, 15, 20])
  np.testing.assert_allclose(columns["epot_eV"], rows["potential"][::5], atol=1e-5)
  assert np.all(columns["beyond_K"] == 0) and np.all(columns["ns_per_day"][1:] > 0)
  assert np.all(rows["max_force"] > 0) and run_statistics(rows, "nvt", len(atoms)).startswith("temperature ")
  frames = ase.io.read(tmp_path / "nvt.extxyz", index=":")
  assert len(frames) == 5
  np.testing.assert_allclose(frames[-1].get_positions(), atoms.get_positions(), atol=1e-6)
  np.testing.assert_allclose(frames[-1].get_potential_energy(), rows["potential"][-1], atol=1e-5)


def test_cli_jax_driver_writes_trajectory_and_log(tmp_path, model, start, monkeypatch, capsys):
  import ase.io

  structure = tmp_path / "aspirin.xyz"
  ase.io.write(structure, start)
  monkeypatch.setattr(cli, "_load_model", lambda opts: (model, str(DEMO_CHECKPOINT)))  # compiled already
  traj, log = tmp_path / "md.extxyz", tmp_path / "md.log"
  code = cli.main(
    [
      str(structure),
      "--checkpoint",
      str(DEMO_CHECKPOINT),
      "--driver",
      "jax",
      "--steps",
      "100",
      "--interval",
      str(CHUNK),
      "--trajectory",
      str(traj),
      "--log",
      str(log),
      "--progress",
      "on",
    ]
  )
  assert code == 0
  out, err = capsys.readouterr()
  assert "100/100" in err  # the progress bar
  assert "ns/day after compilation; total-energy spread" in out and "builds (skin 0.5 A)" in out
  frames = ase.io.read(traj, index=":")
  assert len(frames) == 3 and all(len(f) == len(start) for f in frames)
  assert frames[0].get_potential_energy() < 0 and frames[-1].get_forces().shape == (len(start), 3)
  columns = read_log(log)
  np.testing.assert_array_equal(columns["step"], [0, 50, 100])
  assert np.all(np.abs(columns["etot_eV"] - columns["etot_eV"][0]) <= SPREAD_PER_ATOM * len(start))
  text = log.read_text()
  assert "ns/day" in text and "jax driver" in text and "C9H8O4 (21 atoms)" in text


def test_cli_rejects_bad_arguments(tmp_path, capsys):
  assert cli.main([str(tmp_path / "missing.xyz"), "--random-model", "small"]) == 1  # input mistake
  assert cli.main([str(tmp_path / "x.xyz"), "--random-model", "small", "--ensemble", "nvt"]) == 2  # usage
  err = capsys.readouterr().err
  assert "e2former-md: error: cannot read frame '0' of" in err and "e2former-md: error: --ensemble nvt needs" in err


def test_jax_driver_raises_at_the_crossing_step_and_keeps_it(model, start):
  hot = start.copy()
  initial_velocities(hot, 1000.0, seed=0)
  sim = JaxMD(model, hot, timestep_fs=10.0, steps_per_call=CHUNK, limits=BlowUpLimits(max_energy_drift=math.inf))
  with pytest.raises(MDBlowUpError, match=r"step 3 \(30 fs\): temperature") as err:
    sim.run(CHUNK)
  assert (err.value.step, err.value.quantity) == (3, "temperature") and sim.step_count == 3
  assert sim.atoms.get_temperature() == pytest.approx(err.value.value, rel=1e-6) and err.value.value > err.value.limit


@pytest.mark.parametrize("driver", ["jax", "ase"])
def test_cli_stops_a_blow_up_with_one_line(driver, tmp_path, model, start, monkeypatch, capsys):
  """A 10 fs step from 1000 K: the total energy jumps at the first step (NVE drift limit); with the drift
  limit off, the temperature limit stops it at the third. Both drivers stop at the same step."""
  import ase.io

  structure = tmp_path / "aspirin.xyz"
  ase.io.write(structure, start)
  monkeypatch.setattr(cli, "_load_model", lambda opts: (model, str(DEMO_CHECKPOINT)))
  traj = tmp_path / "md.extxyz"
  args = [str(structure), "--checkpoint", str(DEMO_CHECKPOINT), "--driver", driver, "--timestep", "10"]
  args += ["--init-temperature", "1000", "--steps", "50", "--interval", str(CHUNK), "--trajectory", str(traj)]
  args += ["--log", str(tmp_path / "md.log")]
  assert cli.main(args) == cli.EXIT_BLOW_UP
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("e2former-md: error: MD stopped at step 1 (10 fs): total energy drifted")
  assert "beyond the limit 0.1 eV/atom (NVE)" in err[0] and "--max-energy-drift" in err[0]
  assert cli.main([*args, "--max-energy-drift", "inf"]) == cli.EXIT_BLOW_UP
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("e2former-md: error: MD stopped at step 3 (30 fs): temperature")
  assert "5000 K)" in err[0] and "--max-temperature" in err[0]
  frames = ase.io.read(traj, index=":")  # step 0 and the structure where it stopped
  assert len(frames) == 2 and frames[-1].get_temperature() > 5000
  with pytest.raises(MDBlowUpError, match="temperature"):
    cli.main([*args, "--max-energy-drift", "inf", "--debug"])


def test_out_of_device_memory_names_the_settings(model, start):
  """A chunk the device cannot hold raises DeviceMemoryError naming the memory-saving settings (the device's
  error is simulated: the chunk program is replaced by one that raises XLA's RESOURCE_EXHAUSTED)."""
  from e2former_jax.device_memory import DeviceMemoryError

  sim = JaxMD(model, start, timestep_fs=TIMESTEP_FS, steps_per_call=CHUNK)

  def exhausted(*args, **kwargs):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81604378624 bytes.")

  sim._chunk = exhausted
  with pytest.raises(DeviceMemoryError, match="an MD step for 21 atoms ran out of device memory") as caught:
    sim.run(CHUNK)
  assert "81604378624 bytes" in str(caught.value) and "--node-chunk 4096" in str(caught.value)
  assert isinstance(caught.value.__cause__, jax.errors.JaxRuntimeError)
