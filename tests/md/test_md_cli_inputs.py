"""``e2former-md`` input checks that need no dynamics: charge and multiplicity keys, untrained elements, one-line
errors with the traceback behind ``--debug``."""

import ase.build
import ase.io
import pytest

from e2former_jax.checkpoint import DEMO_CHECKPOINT
from e2former_jax.md import cli
from e2former_jax.trained_domain import UntrainedElementError


def options(*extra):
  return cli._parser().parse_args(["start.xyz", "--random-model", "small", *extra])


def test_charge_and_multiplicity_in_any_spelling_or_a_named_key():
  atoms = ase.build.molecule("H2O")
  atoms.info.update(total_charge=1, multiplicity=2, q=-1, mult=3)
  prepared = cli._prepare(atoms, options())
  assert (prepared.info["charge"], prepared.info["spin"]) == (1, 2)
  prepared = cli._prepare(atoms, options("--charge-key", "q", "--spin-key", "mult"))
  assert (prepared.info["charge"], prepared.info["spin"]) == (-1, 3)
  assert (cli._prepare(atoms, options("--charge", "0", "--spin", "1")).info["charge"]) == 0  # flags win
  atoms.info["charge"] = 0  # disagrees with total_charge=1
  with pytest.raises(ValueError, match=r"start.xyz\[0\]: the total charge is given more than once"):
    cli._prepare(atoms, options())
  with pytest.raises(ValueError, match=r"--charge/--spin: spin multiplicity must be >= 1"):
    cli._prepare(ase.build.molecule("H2O"), options("--spin", "0"))


def test_untrained_elements_and_bad_checkpoints_are_one_line_errors(tmp_path, capsys):
  start = ase.build.molecule("CH3CH2OH")
  start.numbers[0] = 92
  path = tmp_path / "u.xyz"
  ase.io.write(path, start)
  args = [str(path), "--checkpoint", str(DEMO_CHECKPOINT), "--steps", "0", "--trajectory", str(tmp_path / "t.xyz")]
  assert cli.main(args) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("e2former-md: error: structure 0 (CH6OU) contains element(s) U (92)")
  assert "--allow-untrained-elements" in err[0] and "Traceback" not in err[0]
  with pytest.raises(UntrainedElementError):
    cli.main([*args, "--debug"])
  bad = tmp_path / "bad_checkpoint"
  (bad / "meta").mkdir(parents=True)
  (bad / "params").mkdir()
  (bad / "meta" / "metadata").write_text("{not json")
  assert cli.main([str(path), "--checkpoint", str(bad)]) == 1
  assert "unreadable checkpoint meta/metadata (JSONDecodeError" in capsys.readouterr().err


def test_precision_remat_and_chunks_reach_the_model():
  opts = options("--precision", "tensorfloat32", "--remat", "--edge-chunk", "64", "--node-chunk", "32")
  model, _ = cli._load_model(opts)
  cfg = model.config
  assert (cfg.matmul_precision, cfg.remat, cfg.edge_chunk, cfg.node_chunk) == ("tensorfloat32", True, 64, 32)
  checkpoint = options("--edge-chunk", "16")
  checkpoint.random_model, checkpoint.checkpoint = None, str(DEMO_CHECKPOINT)
  model, _ = cli._load_model(checkpoint)
  assert model.config.edge_chunk == 16 and model.config.matmul_precision == "highest"  # the checkpoint's
  with pytest.raises(cli.UsageError, match="--edge-chunk must be a positive number of atoms, got 0"):
    cli._load_model(options("--edge-chunk", "0"))
  with pytest.raises(cli.UsageError, match="--node-chunk must be a positive number of atoms, got -2"):
    cli._load_model(options("--node-chunk", "-2"))
