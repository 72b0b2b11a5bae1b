"""The authors' full-size V1.5-candidate model imported from a random checkpoint, timed beside the paper preset.

The key list ``tests/fixtures/authors/full_size_keys/main_v15candidate_qk.keys.txt`` (written by the authors' code:
its config in the header, every state-dict entry with shape and dtype) defines the checkpoint: trainable tensors
drawn at random (normal, scaled by 1/sqrt(fan-in); norm scales 1, biases 0), constants (CG tables, Wigner blocks,
basis offsets) set to the values the importer checks, other buffers zero. Where PyTorch is installed the state dict
is written as a ``.pt`` file and imported from the file (the released layout ``{"model": state_dict}``); otherwise
it is imported from memory. The import is strict, so this checks the full-size mapping end to end.

Timed per size (``--atoms``): energy + forces of one structure, end to end on the device
(``DevicePotential``: numpy positions in, numpy forces out, neighbour slots and Morton order included), for the
imported model (its default head, conservative forces as the checkpoint's ``AutoGradForce`` says) and for the
``paper_spice`` preset with random weights (same forces). Protocol as ``benchmarks/end_to_end.py``: the structure of
``benchmarks/model.py`` in random atom order, positions jittered between calls, 2 warm-ups, median of
``--repeats``. Correctness on the same inputs: the device path against the host path (vesin graph, jitted model).

  PYTHONPATH=$PWD python benchmarks/authors_import.py --atoms 1024 4096 --json $OUT/authors.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from benchmarks.end_to_end import device_path, host_path, median_ms
from benchmarks.model import random_structure
from benchmarks.report import emit, stamp
from e2former_jax.authors.importer import constants, import_authors_checkpoint
from e2former_jax.authors.yaml_config import translate
from e2former_jax.config import get_config
from e2former_jax.model import E2Former
from e2former_jax.predict import merge_model, split_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from authors_helpers import key_list, key_list_config  # noqa: E402

KEYS = ROOT / "tests" / "fixtures" / "authors" / "full_size_keys" / "main_v15candidate_qk.keys.txt"


def random_state_dict(path: Path, seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
  """The authors' config of a key list and a random state dict that fits it."""
  config = key_list_config(path)
  fixed = constants(translate(config).model)
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape, dtype, kind, _ in key_list(path):
    if key in fixed:
      state[key] = np.asarray(fixed[key], dtype)
    elif kind == "param" and len(shape) >= 2:
      state[key] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(dtype)
    elif kind == "param" and key.endswith("weight"):
      state[key] = np.ones(shape, dtype)
    else:
      state[key] = np.zeros(shape, dtype)
  return config, state


def write_pt(state: dict[str, np.ndarray], path: Path) -> bool:
  """Write ``{"model": state}`` with PyTorch; False when PyTorch is not installed."""
  try:
    import torch
  except ImportError:
    return False
  torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}}, path)
  return True


def imported_model(repeat_dir: Path) -> tuple[E2Former, dict]:
  config, state = random_state_dict(KEYS)
  pt = repeat_dir / "v15candidate_random.pt"
  source = "pt_file" if write_pt(state, pt) else "state_dict"
  start = time.perf_counter()
  model = import_authors_checkpoint(pt if source == "pt_file" else state, config)
  info = dict(source=source, import_s=round(time.perf_counter() - start, 2))
  info["parameters"] = int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
  return model, info


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--atoms", type=int, nargs="+", default=[1024, 4096])
  p.add_argument("--precision", nargs="+", default=["highest"])
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--json", help="append one JSON line per row")
  args = p.parse_args()
  device = jax.devices()[0]
  with tempfile.TemporaryDirectory() as tmp:
    v15, info = imported_model(Path(tmp))
  print(json.dumps({"imported": KEYS.name, **info, "heads": list(v15.config.heads)}), flush=True)
  forces = v15.config.forces
  rows = []
  for precision in args.precision:
    _, params, elements, _ = split_model(v15)
    models = {
      "v15candidate_imported": merge_model(v15.config.replace(matmul_precision=precision), params, elements),
      "paper_spice": E2Former(get_config("paper_spice", forces=forces, matmul_precision=precision), rngs=nnx.Rngs(0)),
    }
    for n in args.atoms:
      structure = random_structure(n)
      structure = structure[np.random.default_rng(1).permutation(n)]
      for name, model in models.items():
        row = dict(model=name, atoms=n, forces=forces, precision=precision, **(info if "imported" in name else {}))
        device_call, host_call = device_path(model), host_path(model)
        start = time.perf_counter()
        e_dev, f_dev = device_call(structure)
        row["first_call_s"] = round(time.perf_counter() - start, 2)
        row["device_ms"] = round(median_ms(device_call, structure, args.repeats, seed=n), 2)
        e_host, f_host = host_call(structure)
        row["energy_rel_diff"] = float(abs(e_dev - e_host) / max(abs(e_host), 1e-30))
        row["force_rel_diff"] = float(np.abs(f_dev - f_host).max() / np.abs(f_host).max())
        stamp(row)
        rows.append(row)
        emit(row, args.json)
  print(f"\n{device.device_kind}, jax {jax.__version__}")
  head = ["model", "atoms", "forces", "precision", "device_ms", "first_call_s", "force_rel_diff"]
  print(" | ".join(head))
  for r in rows:
    print(" | ".join(str(r.get(h, "")) for h in head))


if __name__ == "__main__":
  main()
