"""Metrics of a run: CSV files (always) and TensorBoard event files (tensorboardX, no network needed).

``train.csv`` and ``valid.csv`` in the run directory have one row per logged step. On resume, rows after the
resumed step (written by the interrupted run after its last checkpoint) are dropped, so the files read as
one uninterrupted run, and ``wall_s`` continues from the resumed step's value (wall time of the whole run).
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path


class MetricsLogger:
  """Appends ``{name: value}`` rows per split to ``<split>.csv`` and to TensorBoard as ``<split>/<name>``."""

  def __init__(self, workdir: str | Path, tensorboard: bool = True, resume_step: int | None = None):
    self.workdir = Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._files: dict = {}
    self._writers: dict = {}
    elapsed = 0.0
    if resume_step is not None:
      for path in self.workdir.glob("*.csv"):
        elapsed = max(elapsed, self._truncate(path, resume_step))
    self._start = time.time() - elapsed
    self.tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter

      self.tb = SummaryWriter(
        str(self.workdir / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1
      )

  @staticmethod
  def _truncate(path: Path, step: int) -> float:
    """Drops the rows after ``step``; returns the wall time (s) of the last row kept (0 if none)."""
    with open(path, newline="") as fh:
      rows = list(csv.reader(fh))
    if not rows:
      return 0.0
    head, body = rows[0], rows[1:]
    kept = [r for r in body if r and int(float(r[0])) <= step]
    with open(path, "w", newline="") as fh:
      w = csv.writer(fh)
      w.writerow(head)
      w.writerows(kept)
    return float(kept[-1][head.index("wall_s")]) if kept and "wall_s" in head else 0.0

  def log(self, split: str, step: int, values: dict) -> None:
    row = {"step": int(step), "wall_s": round(time.time() - self._start, 3)}
    row.update({k: float(v) for k, v in values.items()})
    if split not in self._writers:
      path = self.workdir / f"{split}.csv"
      exists = path.exists() and path.stat().st_size > 0
      if exists:
        with open(path, newline="") as fh:
          fields = next(csv.reader(fh))
        if set(fields) != set(row):
          raise ValueError(f"{path} has columns {fields}, the run logs {list(row)}")
      else:
        fields = list(row)
      fh = open(path, "a", newline="")
      writer = csv.DictWriter(fh, fieldnames=fields)
      if not exists:
        writer.writeheader()
      self._files[split], self._writers[split] = fh, writer
    self._writers[split].writerow(row)
    self._files[split].flush()
    if self.tb is not None:
      for k, v in values.items():
        v = float(v)
        if math.isfinite(v):
          self.tb.add_scalar(f"{split}/{k}", v, int(step))

  def close(self) -> None:
    for fh in self._files.values():
      fh.close()
    self._files.clear()
    self._writers.clear()
    if self.tb is not None:
      self.tb.close()
      self.tb = None
