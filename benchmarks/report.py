"""One JSON line per benchmark row: stamped with the card, date and jax version, printed and appended to a file;
the median time of a jitted call; and the largest relative difference of two results."""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp


def stamp(row: dict) -> dict:
  """``row`` with "device" (the first device's kind), "date" (YYYY-MM-DD) and "jax" (version) set."""
  row.update(device=jax.devices()[0].device_kind, date=time.strftime("%Y-%m-%d"), jax=jax.__version__)
  return row


def emit(row: dict, path: str | None) -> None:
  """Prints ``row`` as one JSON line and appends it to ``path`` (when given)."""
  line = json.dumps(row)
  print(line, flush=True)
  if path:
    with open(path, "a") as fh:
      fh.write(line + "\n")


def median_ms(fn, args, repeats: int) -> float:
  """Median wall time (ms) of ``fn(*args)``, each call ended by ``block_until_ready``, over ``repeats`` calls
  after two warm-ups."""
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def max_relative(out, ref) -> float:
  """The largest of max|out - ref| / max|ref| over the leaves of two pytrees of arrays."""
  leaves = zip(jax.tree.leaves(out), jax.tree.leaves(ref))
  return max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in leaves)
