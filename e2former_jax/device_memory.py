"""A structure too large for the device's memory: an error that says so and names the settings that trade time for
memory, instead of XLA's RESOURCE_EXHAUSTED and a traceback.

    with explained_out_of_memory(cfg, num_atoms, "energy and forces"):
      out = compiled(params, graph)

The settings (docs/performance.md §5a gives their measured memory per atom and time cost): ``remat`` (each block
recomputed in the backward pass of conservative forces), ``edge_chunk`` and ``node_chunk`` (per-edge MLPs with the
attention op, and node-level maps, over chunks of atoms), and JAX's share of the device
(``XLA_PYTHON_CLIENT_MEM_FRACTION``, 0.75 by default; ``e2former-md`` sets 0.95). JAX is imported only when an
error is caught, so ``cli_errors``, which every command-line tool imports first, stays quick to import.
"""

from __future__ import annotations

import contextlib
import os

from e2former_jax.config import ModelConfig

SUGGESTED_CHUNK = 4096  # with remat and both chunk fields: 0.17 MiB/atom for conservative forces (H100, §5a)
SUGGESTED_MEMORY_FRACTION = "0.95"


class DeviceMemoryError(MemoryError):
  """The device ran out of memory for one structure (or batch); the message says which settings would help."""


def is_out_of_memory(err: BaseException) -> bool:
  """Whether an XLA runtime error is the device's allocator running out of memory."""
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


def memory_advice(cfg: ModelConfig, num_atoms: int, what: str, err: BaseException) -> str:
  """The message of ``DeviceMemoryError``: what ran out, XLA's own first line, and the settings of ``cfg`` and of
  the process that are not yet at their memory-saving values."""
  first_line = " ".join(str(err).strip().splitlines()[0].split())[:300] if str(err).strip() else type(err).__name__
  steps = []
  if cfg.forces == "conservative" and not cfg.remat:
    steps.append("remat=True (about half the memory of conservative forces)")
  if not cfg.edge_chunk:
    steps.append(f"edge_chunk={SUGGESTED_CHUNK}")
  if not cfg.node_chunk:
    steps.append(f"node_chunk={SUGGESTED_CHUNK}")
  fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
  if fraction is None or float(fraction) < float(SUGGESTED_MEMORY_FRACTION):
    steps.append(
      f"XLA_PYTHON_CLIENT_MEM_FRACTION={SUGGESTED_MEMORY_FRACTION} in the environment before Python starts "
      f"(JAX may use {fraction or '0.75'} of the device now)"
    )
  head = f"{what} for {num_atoms:,} atoms ran out of device memory ({first_line})"
  if not steps:
    return (
      f"{head}; remat, edge_chunk, node_chunk and the allocator's share are at their memory-saving settings already, "
      "so this size needs a device with more memory (docs/performance.md §5a gives the memory per atom)"
    )
  return (
    f"{head}. Settings that trade time for memory: {'; '.join(steps)}. They are overrides of "
    f"E2FormerCalculator.from_checkpoint and load_model (e.g. remat=True, edge_chunk={SUGGESTED_CHUNK}, "
    f"node_chunk={SUGGESTED_CHUNK}) and options of e2former-md (--remat --edge-chunk {SUGGESTED_CHUNK} "
    f"--node-chunk {SUGGESTED_CHUNK}); docs/performance.md §5a gives the memory per atom of each"
  )


@contextlib.contextmanager
def explained_out_of_memory(cfg: ModelConfig, num_atoms: int, what: str):
  """Inside the block, the device's out-of-memory error becomes a ``DeviceMemoryError`` about ``what`` for
  ``num_atoms`` atoms under ``cfg`` (chained to XLA's error); every other error passes unchanged."""
  import jax

  try:
    yield
  except jax.errors.JaxRuntimeError as err:
    if not is_out_of_memory(err):
      raise
    raise DeviceMemoryError(memory_advice(cfg, num_atoms, what, err)) from err
