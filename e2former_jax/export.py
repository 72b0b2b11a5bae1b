"""A trained model as a ``jax.export`` artifact for one atom bucket, and the ``e2former-export`` command.

    e2former-export CHECKPOINT --out model.jaxexport --atoms 256 [--graphs 2] [--head NAME] [--stress]
        [--periodic] [--attention jnp_node|jnp_dense|pallas] [--platforms cpu,cuda]

The artifact is the serialized ``jax.export.Exported`` of ``predict`` with the weights and element energies
inside: a StableHLO program that a process with a compatible jaxlib runs without this package's model code
(``jax.export.deserialize(...).call(*graph arrays)``). Its shapes are fixed: N atom slots, G structure slots
and K neighbour slots (at least one padding atom and one padding structure, as ``graph_from_atoms`` pads), so
one artifact serves every batch padded to that bucket. A JSON file next to it (``<out>.json``) records the
input order, shapes and dtypes, the cutoff and K to build graphs with, the head and the model config.

Attention paths: "jnp_node" (default) and "jnp_dense" export to any platform. "pallas" lowers to a Triton
custom call: export on a GPU for ``cuda`` with the safety check for that call disabled
(``DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")``, done here), and run it with the same jaxlib
(the kernel is compiled into the artifact for that version).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from jax import export as jax_export

from e2former_jax.cli_errors import add_debug_flag, run_command
from e2former_jax.graph import AtomGraph
from e2former_jax.model import E2Former
from e2former_jax.predict import make_predict_fn
from pallas_kernels.api import TRITON_CALL

GRAPH_FIELDS = (
  "positions",
  "numbers",
  "atom_mask",
  "neighbors",
  "neighbor_mask",
  "neighbor_shift",
  "graph_index",
  "charge",
  "spin",
  "cell",
  "pbc",
  "graph_mask",
)
EXPORT_ATTENTION = ("jnp_node", "jnp_dense", "pallas")


def bucket_shapes(model: E2Former, num_atoms: int, num_graphs: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The input of one bucket: every ``AtomGraph`` array field with its shape and dtype, in ``GRAPH_FIELDS``
  order (N = num_atoms, G = num_graphs, K = the model's max_neighbors)."""
  if num_atoms < 2 or num_graphs < 2:
    raise ValueError(
      f"a bucket needs at least 2 atom and 2 structure slots (one of each for padding), got {num_atoms}, {num_graphs}"
    )
  n, g, k = num_atoms, num_graphs, model.config.max_neighbors
  real = np.float64 if model.config.dtype == "float64" else np.float32
  shapes = {
    "positions": ((n, 3), real),
    "numbers": ((n,), np.int32),
    "atom_mask": ((n,), np.bool_),
    "neighbors": ((n, k), np.int32),
    "neighbor_mask": ((n, k), np.bool_),
    "neighbor_shift": ((n, k, 3), real),
    "graph_index": ((n,), np.int32),
    "charge": ((g,), np.int32),
    "spin": ((g,), np.int32),
    "cell": ((g, 3, 3), real),
    "pbc": ((g, 3), np.bool_),
    "graph_mask": ((g,), np.bool_),
  }
  return {name: jax.ShapeDtypeStruct(*shapes[name]) for name in GRAPH_FIELDS}


def export_predict(
  model: E2Former,
  num_atoms: int,
  num_graphs: int = 2,
  *,
  head: str | None = None,
  compute_stress: bool = False,
  periodic: bool = False,
  platforms: Sequence[str] | None = None,
) -> jax_export.Exported:
  """``predict`` of ``model`` (weights inside) for one bucket, exported.

  Args:
    model: the model; its ``attention_impl`` is the path exported ("auto" is refused: name one).
    num_atoms, num_graphs: the bucket's atom and structure slots.
    head: the output head (None: the default).
    compute_stress: also return "stress" and "virial".
    periodic: graphs whose slots may cross cell boundaries (``AtomGraph.periodic``, static in the program).
    platforms: e.g. ("cpu", "cuda"); default: the current backend.

  The exported function takes the arrays of ``GRAPH_FIELDS`` in that order and returns the dict of ``predict``.
  """
  impl = model.config.attention_impl
  if impl not in EXPORT_ATTENTION:
    raise ValueError(f"export needs a named attention path, one of {EXPORT_ATTENTION}; the model has {impl!r}")
  predict_fn = make_predict_fn(model, compute_stress=compute_stress, head=head)

  def fn(*arrays):
    return predict_fn(AtomGraph(**dict(zip(GRAPH_FIELDS, arrays)), periodic=periodic))

  checks = [jax_export.DisabledSafetyCheck.custom_call(TRITON_CALL)] if impl == "pallas" else []
  shapes = bucket_shapes(model, num_atoms, num_graphs)
  return jax_export.export(jax.jit(fn), platforms=platforms, disabled_checks=checks)(*shapes.values())


def write_artifact(
  model: E2Former,
  path: str | Path,
  num_atoms: int,
  num_graphs: int = 2,
  *,
  head: str | None = None,
  compute_stress: bool = False,
  periodic: bool = False,
  platforms: Sequence[str] | None = None,
) -> Path:
  """Writes the artifact of ``export_predict`` to ``path`` and its description to ``<path>.json``."""
  path = Path(path)
  exported = export_predict(
    model,
    num_atoms,
    num_graphs,
    head=head,
    compute_stress=compute_stress,
    periodic=periodic,
    platforms=platforms,
  )
  path.write_bytes(exported.serialize())
  shapes = bucket_shapes(model, num_atoms, num_graphs)
  description = {
    "inputs": [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype)} for k, v in shapes.items()],
    "outputs": sorted(["energy", "forces", *(["stress", "virial"] if compute_stress else [])]),
    "num_atoms": num_atoms,
    "num_graphs": num_graphs,
    "cutoff": model.config.cutoff,
    "max_neighbors": model.config.max_neighbors,
    "periodic": periodic,
    "head": head or model.config.heads[0],
    "platforms": list(exported.platforms),
    "jax": jax.__version__,
    "model_config": model.config.to_dict(),
  }
  Path(f"{path}.json").write_text(json.dumps(description, indent=1))
  return path


class ExportedPredictor:
  """A reloaded artifact: ``predictor(graph)`` -> the dict of ``predict`` for a graph of the artifact's bucket.

  ``graph_from_atoms(structures, predictor.cutoff, predictor.max_neighbors, predictor.num_atoms,
  predictor.num_graphs)`` builds such graphs.
  """

  def __init__(self, path: str | Path):
    path = Path(path)
    self.exported = jax_export.deserialize(bytearray(path.read_bytes()))
    self.description = json.loads(Path(f"{path}.json").read_text())
    for key in ("cutoff", "max_neighbors", "num_atoms", "num_graphs", "periodic", "head"):
      setattr(self, key, self.description[key])

  def __call__(self, graph: AtomGraph) -> dict:
    if graph.periodic and not self.periodic:
      raise ValueError("this artifact was exported for molecules (periodic=False); the graph is periodic")
    arrays = []
    for spec in self.description["inputs"]:
      value = getattr(graph, spec["name"])
      if list(value.shape) != spec["shape"]:
        raise ValueError(
          f"graph.{spec['name']} has shape {list(value.shape)}, the artifact takes {spec['shape']} "
          f"(bucket of {self.num_atoms} atoms and {self.num_graphs} structures)"
        )
      arrays.append(np.asarray(value, dtype=spec["dtype"]))
    return self.exported.call(*arrays)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="e2former-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("checkpoint", help="a checkpoint of this project (run or step directory, e.g. from e2former-import)")
  p.add_argument("--out", required=True, help="artifact file to write (and <out>.json)")
  p.add_argument("--atoms", type=int, required=True, help="atom slots N of the bucket (real atoms + at least 1)")
  p.add_argument("--graphs", type=int, default=2, help="structure slots G (structures + at least 1; default 2)")
  p.add_argument("--head", help="output head (default: the checkpoint's first)")
  p.add_argument("--stress", action="store_true", help="also export stress and virial")
  p.add_argument("--periodic", action="store_true", help="for periodic cells (default: molecules)")
  p.add_argument("--attention", choices=EXPORT_ATTENTION, default="jnp_node", help="attention path (jnp_node)")
  p.add_argument("--platforms", help="comma-separated, e.g. cpu,cuda (default: the current backend)")
  p.add_argument("--dtype", choices=("float32", "float64"), help="compute in this dtype (default: as trained)")
  add_debug_flag(p)
  return p


def _export(opts) -> int:
  if opts.dtype == "float64":
    jax.config.update("jax_enable_x64", True)
  from e2former_jax.checkpoint import load_model

  model = load_model(opts.checkpoint, dtype=opts.dtype, attention_impl=opts.attention)
  platforms = tuple(opts.platforms.split(",")) if opts.platforms else None
  path = write_artifact(
    model,
    opts.out,
    opts.atoms,
    opts.graphs,
    head=opts.head,
    compute_stress=opts.stress,
    periodic=opts.periodic,
    platforms=platforms,
  )
  print(
    f"exported {opts.checkpoint} -> {path} ({path.stat().st_size / 1e6:.1f} MB; {opts.atoms} atoms, {opts.graphs} "
    f"structures, K {model.config.max_neighbors}, attention {opts.attention}); description in {path}.json"
  )
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  opts = _parser().parse_args(argv)
  return run_command("e2former-export", lambda: _export(opts), debug=opts.debug)


if __name__ == "__main__":
  sys.exit(main())
