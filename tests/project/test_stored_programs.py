"""``compile_cache.StoredPrograms``: traced programs kept on disk, loaded by a later process instead of tracing."""

import warnings

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2former_jax.compile_cache import StoredPrograms, programs_dir


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("E2FORMER_JAX_CACHE_DIR", str(tmp_path / "cache"))
  return tmp_path / "cache" / "programs"


def counted(fn):
  """``fn`` and a list whose first entry counts its traces."""
  traces = [0]

  def wrapped(*args):
    traces[0] += 1
    return fn(*args)

  return wrapped, traces


def model_like(params, x):
  """A pytree in (a dict of weights, an array), a dict and a tuple out."""
  h = jnp.tanh(x @ params["w"] + params["b"])
  return {"energy": jnp.sum(h**2)}, (h.mean(axis=0), jnp.int32(x.shape[0]))


def inputs(n):
  rng = np.random.default_rng(n)
  return {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}, rng.normal(
    size=(n, 3)
  ).astype(np.float32)


def assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_a_later_process_loads_the_program_instead_of_tracing(cache):
  fn, traces = counted(model_like)
  first = StoredPrograms(fn, "model_like v1")
  out = first(*inputs(5))
  assert traces[0] == 1 and len(list(cache.glob("*.jaxexport"))) == 1
  again, again_traces = counted(model_like)
  later = StoredPrograms(again, "model_like v1")  # what a new process builds
  assert_same(later(*inputs(5)), out)
  assert again_traces[0] == 0
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(model_like(*inputs(5))), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)  # the exported program against the function run eagerly


def test_each_description_and_signature_has_its_own_program(cache):
  fn, traces = counted(model_like)
  StoredPrograms(fn, "model_like v1")(*inputs(5))
  StoredPrograms(fn, "model_like v2")(*inputs(5))  # another static setting
  programs = StoredPrograms(fn, "model_like v1")
  programs(*inputs(7))  # another shape
  programs(*inputs(7))  # in memory now
  assert traces[0] == 3 and len(list(cache.glob("*.jaxexport"))) == 3


def test_numpy_and_jax_leaves_of_one_shape_and_dtype_share_a_program(cache):
  """JAX arrays are signed from their own shape and dtype (the fast path, for the weights of every call), host
  arrays and Python numbers through the dtype JAX gives them: the same values either way are one program."""
  fn, traces = counted(lambda params, x, scale: model_like(params, x * scale))
  programs = StoredPrograms(fn, "model_like scaled")
  params, x = inputs(5)
  out = programs(params, x, 2.0)
  assert_same(programs(jax.device_put(params), jax.device_put(x), 2.0), out)
  assert_same(programs(params, x.astype(np.float64), np.float32(2.0)), out)  # float64 is float32 without x64
  assert traces[0] == 1 and len(list(cache.glob("*.jaxexport"))) == 1


def test_a_damaged_program_is_traced_again_and_replaced(cache):
  fn, traces = counted(model_like)
  out = StoredPrograms(fn, "model_like v1")(*inputs(5))
  (path,) = cache.glob("*.jaxexport")
  path.write_bytes(b"not an artifact")
  again = StoredPrograms(fn, "model_like v1")(*inputs(5))
  assert traces[0] == 2 and path.stat().st_size > 100
  assert_same(again, out)


@flax.struct.dataclass
class Report:
  value: jax.Array
  counts: jax.Array


def test_outputs_of_any_pytree_type_are_stored(cache):
  fn, traces = counted(lambda x: Report(jnp.sum(x), jnp.arange(2)))
  StoredPrograms(fn, "report")(np.ones(3, np.float32))
  out = StoredPrograms(fn, "report")(np.ones(3, np.float32))  # loaded
  assert isinstance(out, Report) and float(out.value) == 3.0 and traces[0] == 1


def test_donated_arguments_are_donated_by_the_stored_program(cache):
  def step(state, x):
    return {"total": state["total"] + x}

  StoredPrograms(step, "step", donate_argnums=(0,))({"total": jnp.zeros(4)}, jnp.ones(4))
  later = StoredPrograms(step, "step", donate_argnums=(0,))  # loaded from disk
  state = later({"total": jnp.zeros(4)}, jnp.ones(4))  # an uncommitted state, as a new run's first
  given = state["total"]
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
  )
  state = later(state, jnp.ones(4))  # the committed output of the last call, as every later chunk's
  np.testing.assert_array_equal(state["total"], 2.0)
  assert given.is_deleted()
  assert not compiles  # committed or not, the inputs go to one device: the program is not compiled again


def test_a_program_that_cannot_be_exported_runs_traced_with_a_warning(cache):
  """A host callback cannot be serialized: the function still runs, and says why it traces."""

  def doubled(x):
    return jax.pure_callback(lambda a: np.asarray(a) * 2, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

  with pytest.warns(UserWarning, match="could not be stored"):
    out = StoredPrograms(doubled, "callback")(np.ones(3, np.float32))
  np.testing.assert_array_equal(out, 2.0)
  assert not list(cache.glob("*.jaxexport"))


def test_nothing_is_written_with_the_cache_off(monkeypatch):
  monkeypatch.setenv("E2FORMER_JAX_CACHE_DIR", "off")
  assert programs_dir() is None
  fn, traces = counted(model_like)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    StoredPrograms(fn, "model_like v1")(*inputs(5))
    StoredPrograms(fn, "model_like v1")(*inputs(5))
  assert traces[0] == 2
