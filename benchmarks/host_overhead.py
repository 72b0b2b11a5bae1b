"""Host-side time of one warm ``DevicePotential`` call, piece by piece, against the device program it launches.

A call of the device path is: pad and centre the structure on the host (``pad``), hand the compiled program its
inputs (``dispatch``: flattening and signing the arguments in ``compile_cache.StoredPrograms``, then JAX's own
dispatch and the host-to-device copies), wait for the device (``wait``), copy the outputs back (``get``: energy,
forces and the search's report as one int32 vector), check the report and add the reference energies in float64
(``finish``). Everything but ``wait`` is host time that a small structure pays on top of the model. ``call`` is
the median of whole ``DevicePotential`` calls on the same inputs; the pieces are medians of the same steps run
one by one; ``host share`` is the pieces other than ``wait`` over ``call``.

  PYTHONPATH=$PWD python benchmarks/host_overhead.py --preset small paper_spice --atoms 1024 --json $OUT/host.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from flax import nnx

from benchmarks.model import random_structure
from benchmarks.report import emit, stamp
from e2former_jax import potential as device_potential
from e2former_jax.config import get_config
from e2former_jax.model import E2Former
from e2former_jax.neighbors.device import DeviceSlots, raise_for_bad_input
from e2former_jax.predict import total_energy_float64

PIECES = ("pad", "dispatch", "wait", "get", "finish")


def pieces_ms(potential: device_potential.DevicePotential, structure, repeats: int) -> dict:
  """Median ms of each piece of a warm call (the structure's program compiled beforehand)."""
  positions, numbers = structure.get_positions(), structure.get_atomic_numbers()
  potential(positions, numbers)  # compiles, and sizes the search
  pbc = (False, False, False)  # the benchmark structure is free, as ``potential(positions, numbers)`` takes it
  program = device_potential._compiled(
    potential.cfg,
    potential._weights_tree,
    pbc,
    potential.capacity,
    potential.compute_stress,
    potential.spatial_order,
    potential.head,
  )
  times = {piece: [] for piece in PIECES}
  for _ in range(repeats + 2):
    t0 = time.perf_counter()
    args = device_potential.padded_structure(
      positions, numbers, None, device_potential.atom_bucket(len(numbers)), potential.dtype
    )
    t1 = time.perf_counter()
    pending = program(potential._weights, *args, np.int32(0), np.int32(1))
    t2 = time.perf_counter()
    jax.block_until_ready(pending)
    t3 = time.perf_counter()
    out, report = jax.device_get(pending)
    t4 = time.perf_counter()
    raise_for_bad_input(DeviceSlots.from_report(report))
    total_energy_float64(out["energy_above_reference"], numbers, potential.references)
    t5 = time.perf_counter()
    for piece, seconds in zip(PIECES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
      times[piece].append(seconds)
  return {piece: round(statistics.median(t[2:]) * 1e3, 3) for piece, t in times.items()}


def call_ms(potential, structure, repeats: int) -> float:
  positions, numbers = structure.get_positions(), structure.get_atomic_numbers()
  times = []
  for _ in range(repeats + 2):
    start = time.perf_counter()
    potential(positions, numbers)
    times.append(time.perf_counter() - start)
  return round(statistics.median(times[2:]) * 1e3, 3)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", nargs="+", default=["small"])
  p.add_argument("--atoms", type=int, nargs="+", default=[1024])
  p.add_argument("--repeats", type=int, default=30)
  p.add_argument("--json", help="append one JSON line per row")
  args = p.parse_args()
  print(" | ".join(["preset", "atoms", "call", *PIECES, "host share"]))
  for preset in args.preset:
    potential = device_potential.DevicePotential(E2Former(get_config(preset), rngs=nnx.Rngs(0)))
    for n in args.atoms:
      structure = random_structure(n)
      row = dict(preset=preset, atoms=n, **pieces_ms(potential, structure, args.repeats))
      row["call"] = call_ms(potential, structure, args.repeats)
      row["host_share"] = round(sum(row[piece] for piece in PIECES if piece != "wait") / row["call"], 3)
      stamp(row)
      emit(row, args.json)
      print(" | ".join(str(row[k]) for k in ("preset", "atoms", "call", *PIECES, "host_share")))


if __name__ == "__main__":
  main()
