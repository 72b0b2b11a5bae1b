"""Error tables and parity plots of a model on a labelled data set; the ``e2former-eval`` command.

Conventions (MACE-OFF and OMol25 papers): energy errors per atom (meV/atom) and per structure (meV), force
errors per Cartesian component (meV/A) and per atom as the norm of the force-error vector (meV/A); MAE and
RMSE of each, per ``config_type`` and overall. The vector RMSE is sqrt(mean_i |dF_i|^2) = sqrt(3) times the
component RMSE.

    e2former-eval --checkpoint RUN_DIR --data test.xyz [--json errors.json] [--output predictions.xyz]

``--output`` writes every structure as extxyz with the predictions (``E2Former_energy`` in eV,
``E2Former_forces`` in eV/A; ``--prefix`` renames them) next to the reference labels (``REF_energy``,
``REF_forces`` or the ``--energy-key`` / ``--forces-key`` names), like ``mace_eval_configs``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import ase
import ase.io
import jax
import numpy as np

from e2former_jax.cli_errors import add_debug_flag, run_command
from e2former_jax.config import ModelConfig
from e2former_jax.data.batching import GraphLoader
from e2former_jax.data.labels import stored_results
from e2former_jax.data.sources import read_structures
from e2former_jax.model import E2Former
from e2former_jax.predict import compiled_predict, split_model
from e2former_jax.system_keys import charge_and_multiplicity, without_system_keys

NO_CONFIG_TYPE = "(none)"


@dataclasses.dataclass
class Predictions:
  """Per-structure predictions and labels of a data set, in its order.

  Attributes:
    config_type: [S] ``atoms.info["config_type"]`` (``"(none)"`` when absent).
    num_atoms: [S].
    energy_pred, energy_ref: [S] eV (``energy_ref`` NaN where the structure has no energy label).
    forces_pred, forces_ref: [A, 3] eV/A, all atoms in order (``forces_ref`` NaN where unlabelled).
  """

  config_type: np.ndarray
  num_atoms: np.ndarray
  energy_pred: np.ndarray
  energy_ref: np.ndarray
  forces_pred: np.ndarray
  forces_ref: np.ndarray

  @property
  def atom_structure(self) -> np.ndarray:
    """[A] structure of each atom."""
    return np.repeat(np.arange(len(self.num_atoms)), self.num_atoms)


def _labels(atoms: ase.Atoms) -> tuple[float, np.ndarray]:
  results = stored_results(atoms)
  energy = float(results["energy"]) if "energy" in results else np.nan
  forces = np.asarray(results["forces"], np.float64) if "forces" in results else np.full((len(atoms), 3), np.nan)
  return energy, forces


def predict_dataset(
  model_cfg: ModelConfig,
  params,
  elements,
  structures: Sequence[ase.Atoms],
  atom_budget: int = 1024,
  num_buckets: int = 2,
  prefetch: int = 2,
  progress: bool = False,
  head: str | None = None,
) -> Predictions:
  """Predictions of the model given by (config, parameters, element energies) for every structure, from output
  head ``head`` (None: the default head)."""
  n = len(structures)
  if n == 0:
    raise ValueError("no structures to evaluate")
  sizes = np.array([len(structures[i]) for i in range(n)])
  budget = max(int(atom_budget), int(sizes.max()))
  dtype = model_cfg.numpy_dtype
  loader = GraphLoader(
    structures,
    model_cfg.cutoff,
    model_cfg.max_neighbors,
    atom_budget=budget,
    num_buckets=num_buckets,
    shuffle=False,
    prefetch=prefetch,
    dtype=dtype,
  )
  fn = compiled_predict(model_cfg, head=head)
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  energy = np.full(n, np.nan)
  forces = np.full((offsets[-1], 3), np.nan)
  batches = loader.epoch(0)
  if progress:
    from tqdm import tqdm

    batches = tqdm(batches, total=loader.num_batches(0), desc="evaluate", unit="batch", leave=False)
  for batch in batches:
    out = jax.device_get(fn(params, elements, batch.graph))
    graph_index = np.asarray(batch.graph.graph_index)
    atom_mask = np.asarray(batch.graph.atom_mask)
    for g, s in enumerate(np.asarray(batch.structure_index)):
      if s < 0:
        continue
      energy[s] = out["energy"][g]
      rows = np.nonzero(atom_mask & (graph_index == g))[0]
      forces[offsets[s] : offsets[s + 1]] = out["forces"][rows]
  refs = [_labels(structures[i]) for i in range(n)]
  return Predictions(
    config_type=np.array([str(structures[i].info.get("config_type", NO_CONFIG_TYPE)) for i in range(n)]),
    num_atoms=sizes,
    energy_pred=energy,
    energy_ref=np.array([e for e, _ in refs]),
    forces_pred=forces,
    forces_ref=np.concatenate([f for _, f in refs], axis=0),
  )


def evaluate_model(model: E2Former, structures: Sequence[ase.Atoms], **kwargs) -> Predictions:
  """``predict_dataset`` for an ``E2Former`` (e.g. from ``checkpoint.load_model``)."""
  model.head(kwargs.get("head"))  # an unknown head name raises here, naming the model's heads
  _, params, elements, _ = split_model(model)
  return predict_dataset(model.config, params, elements, structures, **kwargs)


def _errors(p: Predictions, structure_mask: np.ndarray) -> dict:
  out = {"structures": int(structure_mask.sum()), "atoms": int(p.num_atoms[structure_mask].sum())}
  e_ok = structure_mask & np.isfinite(p.energy_ref)
  de = (p.energy_pred - p.energy_ref)[e_ok]
  de_atom = de / p.num_atoms[e_ok]
  nan = float("nan")
  mae = lambda x: float(np.mean(np.abs(x))) if x.size else nan
  rmse = lambda x: float(np.sqrt(np.mean(x**2))) if x.size else nan
  out["energy_structures"] = int(e_ok.sum())
  out["energy_mae_meV_per_atom"] = 1e3 * mae(de_atom)
  out["energy_rmse_meV_per_atom"] = 1e3 * rmse(de_atom)
  out["energy_mae_meV"] = 1e3 * mae(de)
  out["energy_rmse_meV"] = 1e3 * rmse(de)
  atom_mask = structure_mask[p.atom_structure] & np.all(np.isfinite(p.forces_ref), axis=1)
  df = (p.forces_pred - p.forces_ref)[atom_mask]
  norm = np.linalg.norm(df, axis=1)
  out["force_atoms"] = int(atom_mask.sum())
  out["force_mae_meV_per_A"] = 1e3 * mae(df)
  out["force_rmse_meV_per_A"] = 1e3 * rmse(df)
  out["force_vector_mae_meV_per_A"] = 1e3 * mae(norm)
  out["force_vector_rmse_meV_per_A"] = 1e3 * rmse(norm)
  return out


def error_table(p: Predictions) -> dict:
  """``{"per_config_type": {name: errors}, "overall": errors}`` with the keys of the module docstring."""
  names = sorted(set(p.config_type.tolist()))
  per = {name: _errors(p, p.config_type == name) for name in names}
  return {"per_config_type": per, "overall": _errors(p, np.ones(len(p.num_atoms), bool))}


COLUMNS = (
  ("structures", "N", "{:d}"),
  ("energy_mae_meV_per_atom", "E MAE\nmeV/at", "{:.2f}"),
  ("energy_rmse_meV_per_atom", "E RMSE\nmeV/at", "{:.2f}"),
  ("energy_mae_meV", "E MAE\nmeV", "{:.1f}"),
  ("energy_rmse_meV", "E RMSE\nmeV", "{:.1f}"),
  ("force_mae_meV_per_A", "F MAE\nmeV/A", "{:.1f}"),
  ("force_rmse_meV_per_A", "F RMSE\nmeV/A", "{:.1f}"),
  ("force_vector_mae_meV_per_A", "|F| MAE\nmeV/A", "{:.1f}"),
  ("force_vector_rmse_meV_per_A", "|F| RMSE\nmeV/A", "{:.1f}"),
)


def format_table(table: dict, markdown: bool = False) -> str:
  """The table as aligned text (or GitHub markdown): one row per config_type, then "overall".

  F columns are per Cartesian component; |F| columns are per atom, the norm of the force-error vector.
  """
  rows = [(name, errs) for name, errs in table["per_config_type"].items()]
  rows.append(("overall", table["overall"]))

  def fmt(errs, key, spec):
    v = errs.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
      return "-"
    return spec.format(v)

  if markdown:
    head = "| config_type | " + " | ".join(h.replace("\n", " ") for _, h, _ in COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(COLUMNS)
    body = ["| " + name + " | " + " | ".join(fmt(e, k, s) for k, _, s in COLUMNS) + " |" for name, e in rows]
    return "\n".join([head, sep, *body])
  cells = [[name] + [fmt(e, k, s) for k, _, s in COLUMNS] for name, e in rows]
  heads = [h.split("\n") for _, h, _ in COLUMNS]
  widths = [max(len("config_type"), *(len(c[0]) for c in cells))]
  widths += [max(max(len(x) for x in h), *(len(c[i + 1]) for c in cells)) for i, h in enumerate(heads)]
  line1 = ["config_type".ljust(widths[0])] + [h[0].rjust(w) for h, w in zip(heads, widths[1:])]
  line2 = ["".ljust(widths[0])] + [(h[1] if len(h) > 1 else "").rjust(w) for h, w in zip(heads, widths[1:])]
  out = ["  ".join(line1), "  ".join(line2), "-" * (sum(widths) + 2 * len(widths) - 2)]
  for i, c in enumerate(cells):
    if i == len(cells) - 1:
      out.append("-" * (sum(widths) + 2 * len(widths) - 2))
    out.append("  ".join([c[0].ljust(widths[0])] + [x.rjust(w) for x, w in zip(c[1:], widths[1:])]))
  return "\n".join(out)


def parity_plot(
  p: Predictions, config_types: Sequence[str] | None = None, axes=None, max_force_points: int = 20000, seed: int = 0
):
  """Predicted vs reference energies (eV/atom, each structure's energy minus the mean over the plotted
  structures of the same config_type, so molecules share one axis) and force components (eV/A).

  Returns the matplotlib figure. ``config_types`` restricts the plot; ``axes`` (two axes) draws into an
  existing figure.
  """
  import matplotlib.pyplot as plt

  names = sorted(set(p.config_type.tolist())) if config_types is None else list(config_types)
  if axes is None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
  else:
    fig = axes[0].figure
  rng = np.random.default_rng(seed)
  per_type_atoms = max(1, max_force_points // max(1, len(names)))
  atom_structure = p.atom_structure
  e_all, f_all = [], []
  for name in names:
    sel = (p.config_type == name) & np.isfinite(p.energy_ref)
    if sel.any():
      ref = p.energy_ref[sel] / p.num_atoms[sel]
      pred = p.energy_pred[sel] / p.num_atoms[sel]
      shift = ref.mean()
      axes[0].scatter(ref - shift, pred - shift, s=6, alpha=0.6, label=name)
      e_all.append(np.concatenate([ref - shift, pred - shift]))
    atoms = np.nonzero((p.config_type[atom_structure] == name) & np.all(np.isfinite(p.forces_ref), axis=1))[0]
    if atoms.size:
      if atoms.size > per_type_atoms:
        atoms = rng.choice(atoms, per_type_atoms, replace=False)
      ref, pred = p.forces_ref[atoms].ravel(), p.forces_pred[atoms].ravel()
      axes[1].scatter(ref, pred, s=3, alpha=0.4, label=name)
      f_all.append(np.concatenate([ref, pred]))
  table = error_table(p)["overall"]
  for ax, values, title, unit in (
    (axes[0], e_all, "energy per atom (shifted per config_type)", "eV/atom"),
    (axes[1], f_all, "force components", "eV/A"),
  ):
    if values:
      v = np.concatenate(values)
      lo, hi = float(v.min()), float(v.max())
      pad = 0.05 * (hi - lo + 1e-12)
      ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k-", lw=0.8)
      ax.set_xlim(lo - pad, hi + pad)
      ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel(f"reference ({unit})")
    ax.set_ylabel(f"predicted ({unit})")
    ax.set_title(title)
    ax.set_aspect("equal")
  axes[0].text(
    0.03, 0.97, f"MAE {table['energy_mae_meV_per_atom']:.2f} meV/atom", transform=axes[0].transAxes, va="top"
  )
  axes[1].text(0.03, 0.97, f"MAE {table['force_mae_meV_per_A']:.1f} meV/A", transform=axes[1].transAxes, va="top")
  axes[1].legend(fontsize=7, markerscale=2, loc="lower right")
  fig.tight_layout()
  return fig


def predictions_as_frames(
  structures: Sequence[ase.Atoms],
  p: Predictions,
  prefix: str = "E2Former_",
  energy_key: str = "REF_energy",
  forces_key: str = "REF_forces",
  charge_key: str = "total_charge",
  spin_key: str = "total_spin",
) -> list[ase.Atoms]:
  """Each structure with its predictions (info ``<prefix>energy`` eV, arrays ``<prefix>forces`` eV/A) next to
  its reference labels (``energy_key``, ``forces_key``, where labelled; stress as ``REF_stress``), total charge
  and multiplicity (``charge_key``, ``spin_key``) and its other info entries; no calculator attached."""
  offsets = np.concatenate([[0], np.cumsum(p.num_atoms)])
  frames = []
  for i in range(len(structures)):
    atoms = structures[i]
    frame = ase.Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    frame.info.update(without_system_keys(atoms.info))
    frame.info[charge_key], frame.info[spin_key] = charge_and_multiplicity(atoms.info, where=f"structure {i}")
    if np.isfinite(p.energy_ref[i]):
      frame.info[energy_key] = float(p.energy_ref[i])
    results = stored_results(atoms)
    if "stress" in results:
      frame.info["REF_stress"] = np.asarray(results["stress"], np.float64)
    frame.info[f"{prefix}energy"] = float(p.energy_pred[i])
    rows = slice(offsets[i], offsets[i + 1])
    if np.all(np.isfinite(p.forces_ref[rows])):
      frame.arrays[forces_key] = np.array(p.forces_ref[rows], np.float64)
    frame.arrays[f"{prefix}forces"] = np.array(p.forces_pred[rows], np.float64)
    frames.append(frame)
  return frames


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="e2former-eval",
    description="Energy and force errors of a trained E2Former-V2 checkpoint on a "
    "labelled data set, per config_type and overall (energies meV/atom and meV per structure; forces meV/A "
    "per component and per atom as the error-vector norm).",
  )
  parser.add_argument("--checkpoint", required=True, help="run directory (best, else last) or step directory")
  parser.add_argument("--data", required=True, help="data file (extxyz, SPICE HDF5, aselmdb) or demo:test")
  parser.add_argument("--json", help="also write the numbers to this JSON file")
  parser.add_argument("--format", help="data format (default: from the file extension)")
  parser.add_argument("--energy-key", help="extxyz energy key (default REF_energy)")
  parser.add_argument("--forces-key", help="extxyz forces key (default REF_forces)")
  parser.add_argument(
    "--charge-key", help="extxyz/aselmdb total-charge key (default: any of charge, total_charge, which must agree)"
  )
  parser.add_argument(
    "--spin-key",
    help="extxyz/aselmdb multiplicity (2S+1) key (default: any of spin, total_spin, multiplicity, which must agree)",
  )
  parser.add_argument("--skip-bad-frames", action="store_true", help="leave out unreadable frames (counted, warned)")
  parser.add_argument("--dtype", choices=("float32", "float64"), help="compute in this dtype (default: as trained)")
  parser.add_argument("--head", help="output head of a multi-head checkpoint (default: its first)")
  parser.add_argument(
    "--allow-untrained-elements",
    action="store_true",
    help="predict structures with elements the checkpoint was not trained on (a warning instead of an error)",
  )
  parser.add_argument("--batch-atoms", type=int, default=1024, help="atoms per evaluation batch")
  parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
  parser.add_argument("--plot", help="save a parity plot (png/pdf) to this path")
  parser.add_argument(
    "--output", help="write the structures with predicted energies and forces next to the references (extxyz)"
  )
  parser.add_argument(
    "--prefix", default="E2Former_", help="prefix of the predicted keys in --output (default E2Former_)"
  )
  add_debug_flag(parser)
  return parser


def _evaluate(args) -> int:
  from e2former_jax.checkpoint import load_model, resolve_step_dir, trained_domain

  t0 = time.time()
  if args.batch_atoms < 1:
    raise ValueError(f"--batch-atoms must be >= 1, got {args.batch_atoms!r}")
  if args.dtype == "float64":
    jax.config.update("jax_enable_x64", True)
  step_dir = resolve_step_dir(args.checkpoint)
  model = load_model(step_dir, dtype=args.dtype)
  model.head(args.head)  # an unknown --head is named before the data is read
  keys = {
    k: v
    for k, v in dict(
      energy_key=args.energy_key, forces_key=args.forces_key, charge_key=args.charge_key, spin_key=args.spin_key
    ).items()
    if v
  }
  if args.skip_bad_frames:
    keys["on_error"] = "skip"
  structures = read_structures(args.data, fmt=args.format, reader=keys, in_memory=True)
  if not structures:
    raise ValueError(f"{args.data}: no structures to evaluate")
  trained_domain(step_dir, args.head).check(
    structures, model.config, args.allow_untrained_elements, allow_hint="pass --allow-untrained-elements"
  )
  preds = evaluate_model(model, structures, atom_budget=args.batch_atoms, progress=sys.stderr.isatty(), head=args.head)
  table = error_table(preds)
  print(f"checkpoint: {step_dir}\ndata: {args.data} ({len(structures)} structures)")
  print(format_table(table, markdown=args.markdown))
  print(f"({time.time() - t0:.1f} s)")
  if args.json:
    Path(args.json).write_text(json.dumps({"checkpoint": str(step_dir), "data": str(args.data), **table}, indent=1))
  if args.plot:
    parity_plot(preds).savefig(args.plot, dpi=150)
  if args.output:
    frames = predictions_as_frames(
      structures,
      preds,
      prefix=args.prefix,
      energy_key=args.energy_key or "REF_energy",
      forces_key=args.forces_key or "REF_forces",
      charge_key=args.charge_key or "total_charge",
      spin_key=args.spin_key or "total_spin",
    )
    ase.io.write(args.output, frames, format="extxyz")
    print(f"predictions: {args.output} ({args.prefix}energy, {args.prefix}forces)")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  return run_command("e2former-eval", lambda: _evaluate(args), debug=args.debug)


if __name__ == "__main__":
  raise SystemExit(main())
