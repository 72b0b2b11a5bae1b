"""``e2former-import``: an authors' PyTorch checkpoint and config -> a checkpoint of this project.

    e2former-import molfm-v1p5-stage-3.pt --config config.yaml --out v15 [--no-element-references]
        [--branch main|e2formerv2] [--dtype float32|float64] [--head NAME] [--train-config finetune.yaml]

The output directory is a step directory (``checkpoint.export_model``) that ``load_model``,
``E2FormerCalculator.from_checkpoint``, ``e2former-eval``, ``e2former-md`` and ``e2former-train --init-from`` take.
Its meta records the heads' element reference energies, the elements of each head's reference table
(``"elements"`` for the default head, ``"head_elements"`` for all) and where the weights came from.
``--train-config`` also writes a training config for fine-tuning (``e2former-train --config FILE --init-from
OUT``): the ``demo`` preset with this model's architecture and the checkpoint's element references; training
trains the default head.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from e2former_jax.cli_errors import add_debug_flag, run_command


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="e2former-import", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("checkpoint", help="the authors' .pt checkpoint ({'model': state_dict, ...})")
  p.add_argument("--config", required=True, help="the authors' YAML config the checkpoint was trained with")
  p.add_argument("--out", required=True, help="new (or empty) directory for this project's checkpoint")
  p.add_argument(
    "--no-element-references",
    dest="element_references",
    action="store_false",
    help="keep the raw model output (sum of atomic energies) instead of adding each head's element references",
  )
  p.add_argument(
    "--branch",
    choices=("main", "e2formerv2"),
    default="main",
    help="the authors' code that wrote the checkpoint: main (released models, default) or e2formerv2 (paper)",
  )
  p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="parameter dtype (float32)")
  p.add_argument("--head", help="make this head the default (first) one; default: the checkpoint's first head")
  p.add_argument("--train-config", help="also write a fine-tuning config (YAML) for e2former-train --config")
  add_debug_flag(p)
  return p


def _import(opts) -> int:
  if opts.dtype == "float64":
    import jax

    jax.config.update("jax_enable_x64", True)
  from e2former_jax.authors.importer import import_authors_checkpoint
  from e2former_jax.authors.yaml_config import read_yaml_config
  from e2former_jax.checkpoint import export_model

  authors = read_yaml_config(opts.config, opts.branch)
  model = import_authors_checkpoint(
    opts.checkpoint, authors, branch=opts.branch, dtype=opts.dtype, element_references=opts.element_references
  )
  if opts.head:
    model = model.with_default_head(opts.head)
  source = {
    "checkpoint": Path(opts.checkpoint).name,
    "config": Path(opts.config).name,
    "branch": opts.branch,
    "element_references": opts.element_references,
    "config_fields_ignored": list(authors.ignored),
  }
  out = export_model(model, opts.out, imported_from=source)
  cfg = model.config
  forces = "-dE/dx" if cfg.forces == "conservative" else f"direct ({cfg.force_head} head)"
  coverage = ", ".join(f"{h} {len(e)}" for h, e in model.head_elements.items()) or "unknown"
  print(f"imported {opts.checkpoint} -> {out}")
  print(f"heads: {', '.join(cfg.heads)} (default {cfg.heads[0]}); forces {forces}; dtype {cfg.dtype}")
  print(
    f"elements per head: {coverage}; element references "
    + ("added (energies in eV)" if opts.element_references else "not added (raw sums of atomic energies)")
  )
  if authors.ignored:
    print(f"config fields without effect on the model (ignored): {', '.join(authors.ignored)}")
  if opts.train_config:
    write_train_config(model, opts.train_config)
    print(f"fine-tuning config: {opts.train_config} (e2former-train --config {opts.train_config} --init-from {out})")
  return 0


def write_train_config(model, path) -> None:
  """A training config file: the ``demo`` preset, this model's architecture (``model`` section: every field),
  element references from the ``--init-from`` checkpoint."""
  import yaml

  values = {
    "preset": "demo",
    "model": {"preset": "small", **model.config.to_dict()},
    "data": {"element_references": "init"},
  }
  header = "# written by e2former-import: the demo preset with the imported architecture; set data.train etc.\n"
  Path(path).write_text(header + yaml.safe_dump(values, sort_keys=False))


def main(argv: Sequence[str] | None = None) -> int:
  opts = _parser().parse_args(argv)
  return run_command("e2former-import", lambda: _import(opts), debug=opts.debug)


if __name__ == "__main__":
  sys.exit(main())
