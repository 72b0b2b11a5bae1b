"""``e2former-info`` (also ``python -m e2former_jax``): versions, devices and the attention path ``auto`` picks.

e2former-info            # what to paste into a bug report
e2former-info --check    # also computes energy and forces of a small random model on the "auto" path
e2former-info --json     # the same as JSON
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from e2former_jax.cli_errors import add_debug_flag, run_command

DISTRIBUTIONS = (
  "e2former-jax",
  "jax",
  "jaxlib",
  "jax-cuda13-plugin",
  "jax-cuda13-pjrt",
  "flax",
  "e3x",
  "optax",
  "orbax-checkpoint",
  "numpy",
  "ase",
  "vesin",
  "ase-db-backends",
)
GPU_INSTALL = "pip install -e '.[cuda]' (a checkout) or pip install 'e2former-jax[cuda]'"


def _version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def attention_paths(backend: str) -> str:
  """What ``attention_impl="auto"`` computes on ``backend`` (``pallas_kernels.api.resolve_implementation``)."""
  from pallas_kernels.api import DENSE_MAX_ATOMS

  if backend == "gpu":
    return "pallas (the fused Pallas-Triton kernel)"
  return f"jnp_dense for batches of at most {DENSE_MAX_ATOMS} atom slots, jnp_node above (no GPU: no Pallas kernel)"


def collect() -> dict:
  """Versions, the JAX backend and devices, the attention path "auto" picks, and set-up hints."""
  import jax

  import e2former_jax

  versions = {name: _version(name) for name in DISTRIBUTIONS}
  versions["python"] = f"{platform.python_version()} ({sys.executable})"
  backend = jax.default_backend()
  report = {
    "versions": versions,
    "package": str(Path(e2former_jax.__file__).resolve().parent),
    "backend": backend,
    "devices": [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()],
    "attention_auto": attention_paths(backend),
    "hints": [],
  }
  if backend != "gpu":
    if versions["jax-cuda13-plugin"]:
      report["hints"].append(
        "the CUDA plugin is installed but JAX found no GPU: check nvidia-smi and an NVIDIA driver for CUDA 13 (580 "
        "or newer); JAX_PLATFORMS=cuda makes JAX say why"
      )
    else:
      report["hints"].append(f"JAX runs on the CPU; for NVIDIA GPUs install the cuda extra: {GPU_INSTALL}")
  if versions["e2former-jax"] is None:
    report["hints"].append("e2former-jax is imported from a source tree without being installed (pip install -e .)")
  return report


def check_auto_path() -> dict:
  """Energy and forces of the randomly initialised ``small`` model on ethanol through the "auto" path, compared
  with the ``jnp_node`` reference path: (path, compile + first call seconds, max |dE|, max |dF|)."""
  import ase.build
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from e2former_jax.config import get_config
  from e2former_jax.graph import graph_from_atoms
  from e2former_jax.model import E2Former
  from e2former_jax.predict import make_predict_fn
  from pallas_kernels.api import resolve_implementation

  atoms = ase.build.molecule("CH3CH2OH")
  out = {}
  for impl in ("auto", "jnp_node"):
    cfg = get_config("small", attention_impl=impl)
    graph, _ = graph_from_atoms(atoms, cfg.cutoff, cfg.max_neighbors, num_atoms=16, num_graphs=2)
    tic = time.perf_counter()
    result = make_predict_fn(E2Former(cfg, rngs=nnx.Rngs(0)))(graph)
    energy = float(result["energy"][0])
    out[impl] = (energy, np.asarray(result["forces"][: len(atoms)]), time.perf_counter() - tic)
  (e_auto, f_auto, seconds), (e_ref, f_ref, _) = out["auto"], out["jnp_node"]
  return {
    "path": resolve_implementation("auto", 16),
    "seconds": seconds,
    "energy_difference_eV": abs(e_auto - e_ref),
    "force_difference_eV_per_A": float(jnp.max(jnp.abs(f_auto - f_ref))),
  }


def format_report(report: dict) -> str:
  lines = ["e2former-jax environment"]
  for name, version in report["versions"].items():
    lines.append(f"  {name:<18} {version or 'not installed'}")
  lines.append(f"  {'package':<18} {report['package']}")
  lines.append(f"  {'backend':<18} {report['backend']}")
  lines.append(f"  {'devices':<18} {', '.join(report['devices'])}")
  lines.append(f"  {'attention auto':<18} {report['attention_auto']}")
  if "check" in report:
    c = report["check"]
    lines.append(
      f"  {'check':<18} small model on ethanol via {c['path']}: {c['seconds']:.1f} s (compile + first call), "
      f"|dE| {c['energy_difference_eV']:.2e} eV and max |dF| {c['force_difference_eV_per_A']:.2e} eV/A against "
      "jnp_node"
    )
  lines.extend(f"hint: {h}" for h in report["hints"])
  return "\n".join(lines)


def _info(args) -> int:
  report = collect()
  if args.check:
    report["check"] = check_auto_path()
  print(json.dumps(report, indent=1) if args.json else format_report(report))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="e2former-info", description=__doc__.split("\n")[0])
  parser.add_argument("--json", action="store_true", help="print the report as JSON")
  parser.add_argument("--check", action="store_true", help="also run a small model through the 'auto' path")
  add_debug_flag(parser)
  args = parser.parse_args(argv)
  return run_command("e2former-info", lambda: _info(args), debug=args.debug)


if __name__ == "__main__":
  raise SystemExit(main())
