"""Every matrix product of the model carries its precision explicitly.

JAX's default precision for float32 products on recent NVIDIA GPUs is TF32 (10-bit mantissa); on the CPU it is
true float32, so a product left at the default passes every CPU test and still loses three digits on a GPU. The
test reads the traced program (no compilation) of energies, forces, stress and a force-matching gradient, and
checks each dot_general: the model's dense maps follow ``matmul_precision``; the geometry (spherical harmonics,
Wigner-D matrices, frames, strain) and the EAAS products are always HIGHEST.
"""

import collections

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from kernel_helpers import equations
from model_helpers import NUM_ATOMS, NUM_GRAPHS, TINY, molecules

from e2former_jax.config import get_config
from e2former_jax.graph import graph_from_atoms
from e2former_jax.model import E2Former
from e2former_jax.predict import predict


def dot_precisions(jaxpr) -> collections.Counter:
  """Counts (precision, source file:line) of every dot_general in ``jaxpr`` and the programs nested in it."""
  found = collections.Counter()
  for eqn in equations(jaxpr):
    if eqn.primitive.name == "dot_general":
      frames = [f for f in eqn.source_info.traceback.frames if "e2former_jax" in f.file_name]
      where = f"{frames[0].file_name.rsplit('/', 1)[-1]}:{frames[0].line_num}" if frames else "?"
      found[(str(eqn.params["precision"]), where)] += 1
  return found


@pytest.mark.parametrize(
  "gate, precision, impl",
  [
    ("QKdot_alpha", "highest", "jnp_node"),
    ("QKdotS_alpha", "highest", "pallas"),
    ("QKdot_alpha", "tensorfloat32", "jnp_node"),
    ("QKdot_alpha", "tensorfloat32", "pallas"),  # the fused direction gate's products
  ],
)
def test_every_product_states_its_precision(gate, precision, impl):
  cfg = get_config("small", **TINY, gate=gate, attention_impl=impl, matmul_precision=precision)
  model = E2Former(cfg, rngs=nnx.Rngs(0))
  graph, _ = graph_from_atoms(molecules(), cfg.cutoff, cfg.max_neighbors, NUM_ATOMS, NUM_GRAPHS)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    out = predict(nnx.merge(graphdef, params, rest), graph, compute_stress=True)
    return jnp.sum(out["energy"]) + jnp.mean(jnp.sum(out["forces"] ** 2, -1)) + jnp.sum(out["stress"] ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
  found = dot_precisions(jaxpr)
  kernels = [
    eqn.params["jaxpr"].debug_info.func_src_info for eqn in equations(jaxpr) if eqn.primitive.name == "pallas_call"
  ]
  fused_gate = any(name.startswith("_gate_forward_kernel") for name in kernels)
  assert fused_gate == (gate == "QKdot_alpha" and impl == "pallas" and precision != "highest")
  highest = str((jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST))
  default = str((jax.lax.Precision.DEFAULT, jax.lax.Precision.DEFAULT))
  assert sum(found.values()) > 100
  unstated = {where: n for (p, where), n in found.items() if p == "None"}
  assert not unstated, f"products at JAX's default precision (TF32 on a GPU): {unstated}"
  if precision == "highest":
    assert {p for p, _ in found} == {highest}
  else:
    geometric = {where for p, where in found if p == highest}
    assert {p for p, _ in found} == {highest, default}
    assert any(w.startswith("so3.py") for w in geometric) and any(w.startswith("eaas.py") for w in geometric)
    assert not any(w.startswith(("so3.py", "eaas.py", "predict.py")) for p, w in found if p == default)
