"""Translating the authors' YAML config: the fixtures' configs, the full-size key-list headers, switches, errors."""

import re
from pathlib import Path

import pytest
import yaml
from authors_helpers import key_list_config

from e2former_jax.authors import (
  SUPPORTED_SWITCHES,
  AuthorsConfigError,
  UnsupportedSwitchError,
  head_names,
  parse_irreps,
  read_yaml_config,
  translate,
)
from e2former_jax.config import ModelConfig

FIXTURES = Path(__file__).parent.parent / "fixtures" / "authors"

REDUCED = dict(
  max_neighbors=32,
  lmax=2,
  channels=32,
  num_layers=2,
  num_heads=16,
  head_dim=4,
  qk_hidden=32,
  type_embed_dim=128,
  num_basis=32,
  basis_width=2.0,
  radial_hidden=16,
  avg_degree=23.01,
  use_charge_spin=True,
  spin_input="multiplicity",
  num_species=256,
  edge_degree_species=300,
)

# fixture -> (branch, ModelConfig fields beyond REDUCED, heads, force head, unsupported switches)
EXPECTED = {
  "main_reduced_qk": (
    "main",
    dict(cutoff=4.5, gate="QK_alpha", forces="conservative", envelope="main", heads=("omol25", "svp")),
    ("omol25", "svp"),
    "gradient",
    (),
  ),
  "main_reduced_qk_lsr": (
    "main",
    dict(
      cutoff=4.5,
      gate="QK_alpha",
      forces="conservative",
      envelope="main",
      heads=("omol25", "svp"),
      long_range_layers=2,
      long_range_cutoff=12.0,
      long_range_min_distance=0.1,
      long_range_max_neighbors=80,
    ),
    ("omol25", "svp"),
    "gradient",
    (),
  ),
  "main_reduced_qkdot_linear": (
    "main",
    dict(cutoff=5.0, gate="QKdot_alpha", forces="direct", envelope="main", heads=("spice",)),
    ("spice",),
    "linear",
    (),
  ),
  "main_reduced_qkdot_painn": (
    "main",
    dict(cutoff=5.0, gate="QKdot_alpha", forces="direct", force_head="painn", envelope="main", heads=("spice",)),
    ("spice",),
    "painn",
    (),
  ),
  "v2_reduced_qkdots": (
    "e2formerv2",
    dict(cutoff=6.0, gate="QKdotS_alpha", forces="direct", softmax_max="e2formerv2", heads=("omol25",)),
    ("omol25",),
    "linear",
    (),
  ),
}


def fixture_config(name: str) -> dict:
  return yaml.safe_load((FIXTURES / name / "config.yaml").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_configs_translate(name):
  branch, fields, heads, force_head, unsupported = EXPECTED[name]
  path = FIXTURES / name / "config.yaml"
  if unsupported:
    with pytest.raises(UnsupportedSwitchError) as error:
      read_yaml_config(path, branch)
    assert error.value.switches == unsupported
    assert str(path) in str(error.value)
  result = read_yaml_config(path, branch, allow_unsupported=bool(unsupported))
  assert result.model == ModelConfig(**REDUCED, **fields)
  assert result.heads == heads
  assert result.force_head == force_head
  assert result.unsupported == unsupported
  assert result.ignored == ("alpha_drop", "pbc_expanded_num_cell_per_direction", "pbc_max_radius") + (
    ("with_moe",) if branch == "e2formerv2" else ()
  )


def test_long_range_settings_are_reported():
  result = translate(fixture_config("main_reduced_qk_lsr"), allow_unsupported=True)
  assert result.with_cluster == "node"
  assert result.long_range == {"layers": 2, "cutoff_lower": 0.1, "cutoff_upper": 12.0, "envelope": "poly"}
  assert translate(fixture_config("main_reduced_qk")).long_range is None
  assert translate(fixture_config("main_reduced_qk")).with_cluster is None


def test_full_size_v15_candidate():
  config = key_list_config(FIXTURES / "full_size_keys" / "main_v15candidate_qk.keys.txt")
  result = translate(config)
  assert result.model == ModelConfig(
    cutoff=4.5,
    max_neighbors=32,
    lmax=2,
    channels=256,
    num_layers=4,
    num_heads=128,
    head_dim=8,
    qk_hidden=512,
    type_embed_dim=128,
    num_basis=256,
    radial_hidden=128,
    gate="QK_alpha",
    softmax_max="valid",
    envelope="main",
    forces="conservative",
    heads=("omol25", "svp"),
  )
  assert result.heads == ("omol25", "svp")


@pytest.mark.parametrize(
  ("name", "branch", "unsupported"),
  [
    ("main_v15candidate_qk_lsr", "main", ()),
    ("main_spice_qkdot_painn", "main", ()),
    ("main_reduced_qk_escn", "main", (("with_moe", "escn"),)),
    ("v2_paper_qkdots", "e2formerv2", ()),
  ],
)
def test_full_size_key_list_configs(name, branch, unsupported):
  config = key_list_config(FIXTURES / "full_size_keys" / f"{name}.keys.txt")
  result = translate(config, branch, allow_unsupported=True)
  assert result.unsupported == unsupported
  assert result.model.num_basis == result.model.channels


def flattened(config: dict) -> dict:
  flat = {k: v for k, v in config.items() if k != "backbone_config"}
  flat.update(config["backbone_config"])
  return flat


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_nested_and_flattened_give_the_same_result(name):
  branch = EXPECTED[name][0]
  nested = translate(fixture_config(name), branch, allow_unsupported=True)
  flat = translate(flattened(fixture_config(name)), branch, allow_unsupported=True)
  assert flat == nested


def test_field_given_nested_and_at_top_level_is_an_error():
  config = fixture_config("main_reduced_qk")
  config["max_radius"] = 5.0
  with pytest.raises(AuthorsConfigError, match="\\['max_radius'\\] given both"):
    translate(config)


def test_every_unsupported_switch_is_named_with_its_value():
  config = fixture_config("main_reduced_qk")
  backbone = config["backbone_config"]
  backbone.update(
    attn_type="first-order",
    with_cluster="node_bell",
    edge_embedtype="wolayernorm",
    norm_layer="identity",
    encoder="dit",
    ffn_type="eqv2ffn",
    basis_type="bessel",
  )
  config.update(with_moe="escn", AutoGradForce=False)
  with pytest.raises(UnsupportedSwitchError) as error:
    translate(config)
  expected = {
    ("attn_type", "first-order"),
    ("with_cluster", "node_bell"),
    ("with_moe", "escn"),
    ("edge_embedtype", "wolayernorm"),
    ("norm_layer", "identity"),
    ("encoder", "dit"),
    ("ffn_type", "eqv2ffn"),
    ("basis_type", "bessel"),
  }
  assert set(error.value.switches) == expected
  assert len(error.value.switches) == len(expected)
  for field, value in expected:
    assert f"{field}={value!r}" in str(error.value)


@pytest.mark.parametrize(
  ("field", "value", "switch", "normalised"),
  [
    ("attn_type", "first-order", "attn_type", ("first-order", "first-order")),
    ("attn_type", "so2-first-order+first-order", "attn_type", ("so2-first-order", "first-order")),
    ("with_cluster", "node_bell", "with_cluster", ("node_bell",)),
    ("edge_embedtype", "default_wolayernorm", "edge_layernorm", ("off",)),
    ("norm_layer", "identity", "norm_layer", ("identity",)),
  ],
)
def test_supported_switch_table_is_the_one_place_to_extend(field, value, switch, normalised):
  config = fixture_config("main_reduced_qk")
  config["backbone_config"][field] = value
  with pytest.raises(UnsupportedSwitchError, match=re.escape(f"{field}={value!r}")):
    translate(config)
  extended = {**SUPPORTED_SWITCHES, switch: SUPPORTED_SWITCHES[switch] | set(normalised)}
  result = translate(config, supported=extended)
  assert result.switches[switch] == normalised
  assert result.unsupported == ()


def test_triton_suffix_changes_nothing():
  config = fixture_config("main_reduced_qkdot_linear")
  config["backbone_config"]["tp_type"] = "QKdot_alpha+triton"
  assert translate(config) == translate(fixture_config("main_reduced_qkdot_linear"))


def test_force_heads_follow_autograd_and_with_moe():
  config = fixture_config("main_reduced_qk")
  config["with_moe"] = "painn"  # AutoGradForce replaces every force head; the energy head stays the MLP
  assert translate(config).force_head == "gradient"
  config["with_moe"] = "escn"  # the eSCN energy head remains
  with pytest.raises(UnsupportedSwitchError, match="with_moe='escn'"):
    translate(config)
  config = fixture_config("main_reduced_qkdot_painn")
  assert translate(config, "e2formerv2").force_head == "linear"  # e2formerv2 has no with_moe


def test_unknown_fields_are_named():
  config = fixture_config("main_reduced_qk")
  config["learning_rate_typo"] = 1e-3
  config["backbone_config"]["num_layer"] = 3
  with pytest.raises(AuthorsConfigError, match="unknown field\\(s\\) \\['num_layer', 'learning_rate_typo'\\]"):
    translate(config)


def test_ignored_fields_are_listed_once_and_sorted():
  config = fixture_config("main_reduced_qk")
  config.update(lr=1e-4, use_compile=True, use_faiss=True, seed=3, loss_fn="atoml2mae", scheduler_config={"a": 1})
  config["backbone_config"]["use_faiss"] = False
  result = translate(config)
  assert result.ignored == tuple(
    sorted(
      {
        "alpha_drop",
        "pbc_expanded_num_cell_per_direction",
        "pbc_max_radius",
        "lr",
        "use_compile",
        "use_faiss",
        "seed",
        "loss_fn",
        "scheduler_config",
      }
    )
  )
  assert result.model == translate(fixture_config("main_reduced_qk")).model


def test_missing_fields_take_the_authors_defaults():
  result = translate(
    {
      "backbone_config": {
        "irreps_node_embedding": "128x0e+128x1e+128x2e",
        "attn_type": "so2-first-order",
        "number_of_basis": 128,
      },
      "dataset_name_list": "omol25",
    }
  )
  assert (result.model.num_layers, result.model.num_heads, result.model.head_dim) == (6, 4, 32)
  assert (result.model.max_neighbors, result.model.cutoff, result.model.avg_degree) == (300, 4.5, 23.01)
  assert result.force_head == "gradient"
  with pytest.raises(AuthorsConfigError, match="AutoGradForce='False': expected true or false"):
    translate({"backbone_config": {"irreps_node_embedding": "8x0e+8x1e"}, "AutoGradForce": "False"})
  with pytest.raises(AuthorsConfigError, match="irreps_node_embedding is required"):
    translate({"backbone_config": {"num_layers": 2}})


def test_head_renaming_rules():
  names = "omol25,svp-enhance,tzvpd-small,svp,tzvpd,tzvpd-forceatomfilter,omol25"
  assert head_names(names) == ("omol25", "tzvpd", "svp")
  assert head_names(names, "reweight;share") == ("omol25", "svp")
  assert head_names(names, branch="e2formerv2") == (
    "omol25",
    "svp-enhance",
    "tzvpd-small",
    "svp",
    "tzvpd",
    "tzvpd-forceatomfilter",
  )
  assert head_names("svp,omol25") == ("svp", "omol25")
  for bad in ("", "omol25,", "omol25, svp"):
    with pytest.raises(AuthorsConfigError, match="head name"):
      head_names(bad)
  config = fixture_config("main_reduced_qk")
  config.update(dataset_name_list="tzvpd,svp-enhance,svp", head_cfg_str="share")
  assert translate(config).heads == ("omol25", "svp")


def test_irreps_parsing():
  assert parse_irreps("256x0e+256x1e+256x2e", "f") == (256, 2)
  assert parse_irreps("2x0e + 2x1e", "f") == (2, 1)
  for bad, message in [
    ("256x0e+128x1e+256x2e", "multiplicities must be equal"),
    ("256x0e+256x1o+256x2e", "parity 'e'"),
    ("256x0e+256x2e", "degrees must be 0, 1, ..., L"),
    ("256x1e+256x0e", "degrees must be 0, 1, ..., L"),
    ("0e+1e", "cannot parse term '0e'"),
    ("", "expected an irreps string"),
  ]:
    with pytest.raises(AuthorsConfigError, match=message):
      parse_irreps(bad, "irreps_node_embedding")


@pytest.mark.parametrize(
  ("backbone", "message"),
  [
    ({"number_of_basis": 64}, "number_of_basis=64 must equal the channels C = 32"),
    ({"irreps_head": "4x0e+4x1e+4x2e"}, "16 \\* 4 = 64 must equal the channels C = 32"),
    ({"irreps_head": "2x0e+2x1e"}, "maximum degree 1 != 2"),
    ({"max_neighbors": "None"}, "max_neighbors=None"),
    ({"tp_type": "QKV_alpha+triton"}, "gate 'QKV_alpha' is not one of"),
    (
      {
        "irreps_node_embedding": "3x0e+3x1e+3x2e",
        "number_of_basis": 3,
        "irreps_head": "1x0e+1x1e+1x2e",
        "num_attn_heads": 3,
        "attn_scalar_head": 3,
      },
      "num_attn_heads \\* attn_scalar_head = 9 must be even",
    ),
    ({"irreps_node_embedding": "32x0e"}, "L >= 1"),
    ({"num_layers": "two"}, "num_layers: expected an integer"),
  ],
)
def test_constraints_of_the_jax_model_are_named(backbone, message):
  config = fixture_config("main_reduced_qk")
  config["backbone_config"].update(backbone)
  with pytest.raises(AuthorsConfigError, match=message):
    translate(config)


def test_branch_and_file_errors(tmp_path):
  with pytest.raises(ValueError, match="branch must be one of"):
    translate(fixture_config("main_reduced_qk"), branch="v2")
  bad = tmp_path / "bad.yaml"
  bad.write_text("backbone_config: [unclosed")
  with pytest.raises(AuthorsConfigError, match="bad.yaml: not valid YAML"):
    read_yaml_config(bad)
  empty = tmp_path / "empty.yaml"
  empty.write_text("")
  with pytest.raises(AuthorsConfigError, match="empty.yaml: expected a mapping of config fields, got NoneType"):
    read_yaml_config(empty)
  with pytest.raises(AuthorsConfigError, match="expected a mapping"):
    translate(["not", "a", "mapping"])
  config = fixture_config("main_reduced_qk")
  config["backbone_config"]["name"] = "equiformer_v2"
  with pytest.raises(AuthorsConfigError, match="'equiformer_v2' is not an E2Former backbone"):
    translate(config)


@pytest.mark.parametrize(
  ("field", "value", "model_fields"),
  [
    ("tp_type", "QKdot_alpha+triton+sigmoid", dict(gate="QKdot_alpha", gate_activation="sigmoid")),
    ("tp_type", "QK_alpha+softplus", dict(gate_activation="softplus")),
    ("attn_type", "zero-order", dict(attention_orders=("zero", "zero"))),
    ("attn_type", "so2-first-order+zero-order", dict(attention_orders=("first", "zero"))),
  ],
)
def test_main_switches_translate_to_model_fields(field, value, model_fields):
  config = fixture_config("main_reduced_qk")
  config["backbone_config"][field] = value
  model = translate(config).model
  assert model == translate(fixture_config("main_reduced_qk")).model.replace(**model_fields)


@pytest.mark.parametrize(
  ("field", "value"),
  [("tp_type", "QKdotS_alpha+softplus"), ("attn_type", "zero-order"), ("with_cluster", "node")],
)
def test_paper_branch_refuses_what_differs_from_main(field, value):
  config = fixture_config("v2_reduced_qkdots")
  config["backbone_config"][field] = value
  translate(config)  # main builds it
  with pytest.raises(UnsupportedSwitchError, match=re.escape(f"{field}={value!r}")):
    translate(config, "e2formerv2")
