"""One JSON line per benchmark row: stamped with the card, date and jax version, printed and appended to a file."""

from __future__ import annotations

import json
import time

import jax


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
