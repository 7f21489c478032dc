"""Run tracking: per-step scalars as TensorBoard event files and as JSONL beside them.

``Tracker(logdir)`` writes ``logdir/metrics.jsonl`` (one JSON object per
call: ``{"step": s, "name": value, ...}``, readable with :func:`read_jsonl`
or pandas) and TensorBoard event files in ``logdir`` (tensorboardX; view
with ``tensorboard --logdir <workdir>``).  A run resumed from step ``k``
(``start_step=k``) first drops what the killed run wrote after step ``k``
-- JSONL lines with a larger step, and TensorBoard events through
``purge_step`` -- so the resumed curves have no duplicated or stale points.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping


def _number(v) -> float | None:
  v = float(v)
  return v if math.isfinite(v) else None     # JSON has no NaN/inf; null marks them


def read_jsonl(path: str) -> list[dict]:
  """The records of a metrics.jsonl file (a torn last line, from a kill, is dropped)."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:
        break
  return records


class Tracker:
  """Scalars to ``logdir/metrics.jsonl`` and (``tensorboard=True``) TensorBoard events."""

  def __init__(self, logdir: str, *, start_step: int = 0, tensorboard: bool = True):
    os.makedirs(logdir, exist_ok=True)
    self.logdir = logdir
    self.jsonl_path = os.path.join(logdir, "metrics.jsonl")
    if os.path.exists(self.jsonl_path):
      kept = [r for r in read_jsonl(self.jsonl_path) if r.get("step", 0) <= start_step]
      with open(self.jsonl_path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
      os.replace(self.jsonl_path + ".tmp", self.jsonl_path)
    self._jsonl = open(self.jsonl_path, "a")
    self._writer = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      # tensorboardX names files by the second: a resume within the same second
      # would overwrite the first run's file unless the name is unique
      self._writer = SummaryWriter(logdir, purge_step=start_step + 1 if start_step else None,
                                   flush_secs=30, filename_suffix=f".{time.time_ns()}")

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """Record ``values`` (name -> number) at ``step``."""
    self._jsonl.write(json.dumps({"step": int(step),
                                  **{k: _number(v) for k, v in values.items()}}) + "\n")
    if self._writer is not None:
      for k, v in values.items():
        self._writer.add_scalar(k, float(v), int(step))

  def flush(self) -> None:
    self._jsonl.flush()
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    self.flush()
    self._jsonl.close()
    if self._writer is not None:
      self._writer.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
