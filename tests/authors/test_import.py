"""Importing the authors' checkpoints: float32 parity for every fixture and head, element references, strict
errors naming keys, every attention path, the e2former-import command and its checkpoint, fine-tuning.

Float64 parity (1e-10) is in test_import_float64.py (a module with 64-bit JAX)."""

import csv
import functools
import json

import numpy as np
import pytest
from authors_helpers import (
  BRANCHES,
  FIXTURES,
  batch,
  checkpoint_path,
  comparisons,
  config_path,
  evaluate_together,
  key_list,
  key_list_config,
  molecules,
  outputs,
  relative,
)

from e2former_jax.authors import (
  AuthorsCheckpointError,
  UnsupportedSwitchError,
  head_reference_table,
  import_authors_checkpoint,
  read_state_dict,
  translate,
)
from e2former_jax.authors.cli import main as import_main
from e2former_jax.authors.importer import checkpoint_parameters, constants
from e2former_jax.checkpoint import load_model, read_meta
from e2former_jax.data.references import OMOL25_ELEMENT_REFERENCES
from e2former_jax.evaluation import main as eval_main

# Float32 against the authors' float32: two float32 computations of the same function in a different order.
# Their float32 and float64 outputs differ by up to 2e-5 eV / 1e-4 eV/A on the full-size model (large random
# weights); on these reduced models each float32 path is within ~5e-6 relative of float64 (measured), so two of
# them agree to 1e-5.
TOL32 = 1e-5
# The attention paths sum over neighbours in different orders (gathered slots, dense per-head products, per-edge
# frames, the fused kernel): float32 round-off of O(1e-7) relative per operation, accumulated over two blocks.
TOL_PATHS = 2e-5


@functools.cache
def imported(name: str, attention_impl: str = "jnp_node", element_references: bool = False):
  model = import_authors_checkpoint(
    checkpoint_path(name), config_path(name), branch=BRANCHES[name], element_references=element_references
  )
  if attention_impl == "jnp_node":
    return model
  return with_attention(model, attention_impl)


def with_attention(model, attention_impl):
  """The same weights computed with another attention path."""
  from flax import nnx

  from e2former_jax.checkpoint import assign_params, flatten
  from e2former_jax.model import E2Former

  other = E2Former(model.config.replace(attention_impl=attention_impl), rngs=nnx.Rngs(0))
  assign_params(other, flatten(nnx.state(model, nnx.Param)))
  return other


FIXTURE_NAMES = sorted(BRANCHES)


def every_fixture(**models) -> dict:
  """Fixture name -> ``evaluate`` of its imported model on its molecules, every fixture in one compiled call (one
  program for the float32 comparisons of this file); ``models`` puts another model of a fixture's config (other
  weights or element energies) in that fixture's place, through the same program."""
  chosen = [models[name] if name in models else imported(name) for name in FIXTURE_NAMES]
  graphs = [batch(model, molecules(name)) for model, name in zip(chosen, FIXTURE_NAMES, strict=True)]
  return dict(zip(FIXTURE_NAMES, evaluate_together(chosen, graphs), strict=True))


@functools.cache
def imported_outputs() -> dict:
  """``every_fixture()``, computed once."""
  return every_fixture()


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_float32_outputs_equal_the_authors(name):
  for head, result in imported_outputs()[name].items():
    errors = comparisons(name, result, head, "float32")
    assert max(errors.values()) <= TOL32, {k: f"{v:.2e}" for k, v in errors.items() if v > TOL32}


def test_heads_and_element_references_as_the_authors_calculator_adds_them():
  raw, total = imported("main_reduced_qk"), imported("main_reduced_qk", element_references=True)
  assert raw.config.heads == ("omol25", "svp")
  structures = molecules("main_reduced_qk")
  raw_out, total_out = imported_outputs()["main_reduced_qk"], every_fixture(main_reduced_qk=total)["main_reduced_qk"]
  for head in ("omol25", "svp"):
    table, _ = head_reference_table(head)
    added = [sum(table[int(z)] for z in atoms.numbers) for atoms in structures]
    difference = total_out[head]["energy"] - raw_out[head]["energy"]
    np.testing.assert_allclose(difference[: len(structures)], added, rtol=1e-6)
  # omol25 in eV; svp in kcal/mol times 0.0433634 eV per kcal/mol (hydrogen: -372.43346 kcal/mol)
  assert table[1] == pytest.approx(-372.43346 * 0.0433634)
  assert head_reference_table("omol25")[0] == OMOL25_ELEMENT_REFERENCES
  assert total.head_elements["omol25"] == tuple(range(1, 84))
  assert set(total.head_elements["svp"]) >= {1, 6, 7, 8} and 2 not in total.head_elements["svp"]
  assert raw.head_elements == total.head_elements, "the coverage is known without the references too"
  assert imported("main_reduced_qkdot_linear").head_elements == {}, "spice: the authors add no references"
  with pytest.raises(ValueError, match="unknown head 'tzvpd'.*'omol25', 'svp'"):
    raw.head("tzvpd")


@functools.cache
def state(name: str) -> dict:
  return read_state_dict(checkpoint_path(name))


def strict_error(name: str, state_dict: dict, config=None) -> AuthorsCheckpointError:
  with pytest.raises(AuthorsCheckpointError) as error:
    import_authors_checkpoint(state_dict, config or config_path(name), branch=BRANCHES[name])
  return error.value


def test_unknown_missing_and_misshapen_keys_are_named():
  sd = dict(state("main_reduced_qk"))
  sd["head.energy_heads.tzvpd.mlp.0.weight"] = sd.pop("head.energy_heads.svp.mlp.0.weight")
  sd["decoder.decoder.blocks.1.ga.proj_value.weight"] = sd["decoder.decoder.blocks.1.ga.proj_value.weight"][:, :, :16]
  del sd["decoder.decoder.blocks.0.ga.first_order_tp.so2_tp.out_linear.2.weight"]
  error = strict_error("main_reduced_qk", sd)
  assert error.unknown == ("head.energy_heads.tzvpd.mlp.0.weight",)
  assert error.missing == (
    "decoder.decoder.blocks.0.ga.first_order_tp.so2_tp.out_linear.2.weight",
    "head.energy_heads.svp.mlp.0.weight",
  )
  assert [key for key, _ in error.mismatched] == ["decoder.decoder.blocks.1.ga.proj_value.weight"]
  message = str(error)
  for key in (*error.unknown, *error.missing, "blocks/1/attention/value/kernel [3, 32, 32]", "[3, 32, 16]"):
    assert key in message


def test_constants_that_differ_and_a_checkpoint_of_another_config_are_errors():
  sd = dict(state("main_reduced_qk"))
  sd["decoder.decoder.rbf.offset"] = sd["decoder.decoder.rbf.offset"] * (5.0 / 4.5)  # basis of a 5 A model
  sd["decoder.decoder.blocks.0.ga.first_order_tp.so2_tp.selected_idx"] = np.zeros(20, np.int64)
  error = strict_error("main_reduced_qk", sd)
  assert [key for key, _ in error.constants] == [
    "decoder.decoder.rbf.offset",
    "decoder.decoder.blocks.0.ga.first_order_tp.so2_tp.selected_idx",
  ]
  # the long-range checkpoint against the config without long-range blocks: its extra keys are unknown
  error = strict_error("main_reduced_qk", dict(state("main_reduced_qk_lsr")))
  assert "decoder.decoder.long_blocks.0.ga.proj_zero.weight" in error.unknown
  assert "decoder.decoder.final_linear.weight" in error.unknown
  assert error.missing == ()  # its norm_final (unused there) still feeds this model's final norm


def test_unsupported_switches_are_named():
  config = {"backbone_config": {"irreps_node_embedding": "32x0e+32x1e+32x2e", "attn_type": "so2-first-order"}}
  config.update(dataset_name_list="omol25", AutoGradForce=False, with_moe="escn")
  with pytest.raises(UnsupportedSwitchError, match="with_moe='escn'"):
    import_authors_checkpoint(state("main_reduced_qk"), config)
  config.update(with_moe="None")
  config["backbone_config"].update(attn_type="first-order", with_cluster="node_bell")
  with pytest.raises(UnsupportedSwitchError, match="attn_type='first-order'.*with_cluster='node_bell'"):
    import_authors_checkpoint(state("main_reduced_qk"), config)


@pytest.mark.parametrize(
  ("name", "branch"),
  [
    ("main_v15candidate_qk", "main"),
    ("main_v15candidate_qk_lsr", "main"),
    ("main_spice_qkdot_painn", "main"),
    ("v2_paper_qkdots", "e2formerv2"),
  ],
)
def test_full_size_key_lists_map_every_key(name, branch):
  """The key lists of full-size configurations (the V1.5 candidate with and without long-range blocks, the SPICE
  PaiNN run, the paper model): every key has a home, and the parameters this project fills hold exactly the
  trainable tensors the authors' forward pass uses (dead tensors aside)."""
  path = FIXTURES / "full_size_keys" / f"{name}.keys.txt"
  cfg = translate(key_list_config(path), branch).model
  ours = constants(cfg)
  rows = key_list(path)
  state_dict = {key: ours[key] if key in ours else np.zeros(shape, dtype) for key, shape, dtype, _, _ in rows}
  parameters = checkpoint_parameters(state_dict, cfg, name)
  used = sum(int(np.prod(shape)) for _, shape, _, kind, use in rows if kind == "param" and use == "used")
  assert sum(value.size for value in parameters.values()) == used


def test_escn_heads_are_refused():
  config = key_list_config(FIXTURES / "full_size_keys" / "main_reduced_qk_escn.keys.txt")
  with pytest.raises(UnsupportedSwitchError, match="with_moe='escn'"):
    translate(config)


IMPLS = ("jnp_dense", "jnp_edge", "pallas")  # compared with jnp_node; pallas in interpret mode on the CPU


@functools.cache
def attention_paths(name: str) -> dict:
  """attention_impl -> ``evaluate`` of the fixture's molecules, the imported weights on every other path than
  jnp_node, in one compiled call."""
  graph = batch(imported(name), molecules(name))
  return dict(zip(IMPLS, evaluate_together([imported(name, impl) for impl in IMPLS], graph), strict=True))


@pytest.mark.parametrize("impl", IMPLS)
def test_every_attention_path_gives_the_same_results(impl):
  """First-order and zero-order (long-range) blocks on every path (pallas in interpret mode on the CPU) against
  jnp_node; the e2formerv2 shift and the other weight variants on every path: tests/ops/test_attention_variants.py."""
  name = "main_reduced_qk_lsr"
  expected, result = imported_outputs()[name], attention_paths(name)[impl]
  for head in imported(name).config.heads:
    for key in ("energy", "atom_energy", "forces_autograd"):
      assert relative(result[head][key], expected[head][key]) <= TOL_PATHS, (head, key)


def test_import_command_writes_a_checkpoint_the_tools_load(tmp_path, capsys):
  from e2former_jax.calculator import E2FormerCalculator
  from e2former_jax.training import load_config

  name = "main_reduced_qk"
  out, finetune = tmp_path / "imported", tmp_path / "finetune.yaml"
  argv = [str(checkpoint_path(name)), "--config", str(config_path(name)), "--out", str(out)]
  assert import_main([*argv, "--train-config", str(finetune)]) == 0
  assert "heads: omol25, svp (default omol25)" in capsys.readouterr().out
  train_config = load_config(finetune, [f"init.checkpoint={out}"])
  assert train_config.model_config() == load_model(out).config
  assert train_config.data.element_references == "init" and train_config.data.train == "demo:train"
  meta = read_meta(out)
  assert meta["elements"] == list(range(1, 84))
  assert set(meta["head_elements"]) == {"omol25", "svp"}
  assert meta["head_element_references"]["svp"]["1"] == pytest.approx(-372.43346 * 0.0433634)
  assert meta["imported_from"]["checkpoint"] == f"{name}.pt" and meta["imported_from"]["branch"] == "main"
  loaded, reference = load_model(out), imported(name, element_references=True)
  expected, result = every_fixture(**{name: reference})[name], every_fixture(**{name: loaded})[name]
  for head in ("omol25", "svp"):
    np.testing.assert_array_equal(result[head]["energy"], expected[head]["energy"])
    calculator = E2FormerCalculator.from_checkpoint(out, head=head)
    assert calculator.head == head and calculator.domain.elements == tuple(meta["head_elements"][head])
  labelled = tmp_path / "labelled.xyz"
  write_with_labels(labelled, name, "svp", "float32")
  report = tmp_path / "errors.json"
  assert eval_main(["--checkpoint", str(out), "--data", str(labelled), "--head", "svp", "--json", str(report)]) == 0
  overall = json.loads(report.read_text())["overall"]
  # float32 total energies near -4000 eV are spaced 0.24-0.49 meV apart: the energies agree to that spacing
  assert overall["energy_mae_meV"] < 1.0 and overall["force_mae_meV_per_A"] < 0.1, overall
  svp_first = loaded.with_default_head("svp")
  assert svp_first.config.heads == ("svp", "omol25") and svp_first.head("svp") is svp_first
  for head in ("svp", "omol25"):
    moved, original = svp_first.head(head), loaded.head(head)
    np.testing.assert_array_equal(moved.energy_head[2].kernel[...], original.energy_head[2].kernel[...])
    np.testing.assert_array_equal(moved.element_energy[...], original.element_energy[...])
  with pytest.raises(ValueError, match="unknown head 'spice'"):
    E2FormerCalculator.from_checkpoint(out, head="spice")
  assert import_main(argv) == 1
  assert "exists and is not empty" in capsys.readouterr().err
  raw = tmp_path / "raw"
  argv = [str(checkpoint_path(name)), "--config", str(config_path(name)), "--out", str(raw), "--head", "svp"]
  assert import_main([*argv, "--no-element-references"]) == 0
  meta = read_meta(raw)
  assert meta["model_config"]["heads"] == ["svp", "omol25"] and meta["element_references"] == {}
  assert meta["elements"] == list(head_reference_table("svp")[1])


def write_with_labels(path, name: str, head: str, dtype: str) -> None:
  """The fixture's molecules as extxyz, labelled with the authors' outputs of ``head`` plus the head's element
  references (total energies, as e2former-eval compares them)."""
  import ase.io

  table, _ = head_reference_table(head)
  frames = []
  for atoms, mol in zip(molecules(name), outputs(name)["molecules"]):
    ref = mol[f"head_{head}"][dtype]
    atoms.info["REF_energy"] = ref["energy"] + sum(table[int(z)] for z in atoms.numbers)
    atoms.arrays["REF_forces"] = np.asarray(ref["forces_autograd"])
    frames.append(atoms)
  ase.io.write(path, frames, format="extxyz")


def test_an_imported_model_fine_tunes(tmp_path):
  """A few training steps from the imported checkpoint (``init.checkpoint``, what ``--init-from`` sets) on four
  demo structures, one batch per step, lower the training loss."""
  from e2former_jax.data.sources import read_structures
  from e2former_jax.training import TrainConfig, get_train_config, train

  name = "main_reduced_qk"
  start = tmp_path / "imported"
  assert import_main([str(checkpoint_path(name)), "--config", str(config_path(name)), "--out", str(start)]) == 0
  structures = read_structures("demo:train", in_memory=True)[:4]
  values = get_train_config("demo").to_dict()
  values["model"] = {"preset": "small", **load_model(start).config.to_dict()}
  values["init"] = {"checkpoint": str(start), "strict": True}
  values["data"].update(element_references="init", atom_budget=128, eval_atom_budget=128, test=None)
  values["optim"].update(lr=2e-3, warmup_steps=1, ema_decay=None, max_warmup_fraction=None)
  values["run"].update(steps=5, eval_every=5, log_every=1, progress_bar=False, tensorboard=False)
  values["run"].update(async_checkpointing=False)
  datasets = {"train": structures, "valid": structures[:1]}
  result = train(TrainConfig.from_dict(values), tmp_path / "run", datasets=datasets, verbose=False)
  with open(result.workdir / "train.csv", newline="") as fh:
    losses = [float(row["loss"]) for row in csv.DictReader(fh)]
  assert result.step == 5 and len(losses) == 5
  assert all(after < before for before, after in zip(losses, losses[1:])), losses
