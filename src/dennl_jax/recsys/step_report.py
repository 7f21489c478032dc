"""What one step of a sequence unit is: its size distribution and its targets'.

:func:`step_sizes` counts the log events in each step; :func:`step_statistics`
summarises a unit (steps per user, events per step, the validation and test
steps' sizes, partial and tied test steps, the validation -> test gap) for the
reports of experiments/table2.py, which print it above every table.
"""
from __future__ import annotations

import numpy as np

from dennl_jax.recsys.events import EventLog, Sequences, TimeSplit

__all__ = ["step_sizes", "step_statistics"]


def _step_index(seqs: Sequences):
  """(kept events mask (N,), their flat (user, step) index) of ``seqs``' events."""
  eu, es = np.asarray(seqs.event_user), np.asarray(seqs.event_step)
  ok = es >= 0
  return ok, eu[ok] * np.asarray(seqs.mask).shape[1] + es[ok]


def step_sizes(seqs: Sequences) -> np.ndarray:
  """(U, T) int64 number of log events in each step (0 on padding and idle days)."""
  mask = np.asarray(seqs.mask)
  _, flat = _step_index(seqs)
  return np.bincount(flat, minlength=mask.size).reshape(mask.shape).astype(np.int64)


def _quantiles(x) -> dict:
  x = np.asarray(x, np.float64)
  if x.size == 0:
    return {"n": 0}
  q = np.quantile(x, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
  return dict(n=int(x.size), mean=float(x.mean()),
              **{k: float(v) for k, v in zip(("min", "p10", "p25", "median", "p75", "p90", "max"), q)})


def step_statistics(log: EventLog, seqs: Sequences, split: TimeSplit,
                    tie_tolerance: float = 1e-6) -> dict:
  """What one step of ``seqs`` is: the length distribution of the unit and of its targets.

  Steps per user and the validation and test steps' sizes are over the users
  with a validation and a test step; log events per step over every user's
  steps (all steps, validation steps, test steps), test steps of a
  single event, test and validation steps smaller than the largest step
  size of the unit's blocks (``partial`` ones, unit="events" only), test
  steps whose maximal strength is tied, and the seconds from the validation
  step's last event to the test step's first (0: the boundary splits one
  same-second burst).  ``seqs`` must come from ``log``.  Plain numbers.
  """
  sizes = step_sizes(seqs)
  mask = np.asarray(seqs.mask, bool)
  val, test = np.asarray(split.val_step), np.asarray(split.test_step)
  users = np.flatnonzero((val >= 0) & (test >= 0))
  active = mask & (sizes > 0)
  test_size, val_size = sizes[users, test[users]], sizes[users, val[users]]
  x = np.asarray(seqs.strengths)[users, test[users]]
  tied = ((x >= x.max(1, keepdims=True) - tie_tolerance).sum(1) > 1)
  if np.shape(seqs.event_user) != (log.num_events,):
    raise ValueError("seqs must come from log (event counts differ)")
  ok, flat = _step_index(seqs)
  first = np.full(mask.size, np.iinfo(np.int64).max)
  last = np.full(mask.size, np.iinfo(np.int64).min)
  np.minimum.at(first, flat, log.timestamp[ok])
  np.maximum.at(last, flat, log.timestamp[ok])
  first, last = first.reshape(mask.shape), last.reshape(mask.shape)
  gap = first[users, test[users]] - last[users, val[users]]
  out = dict(users_with_val_and_test=int(users.size),
             steps_per_user=_quantiles(mask.sum(1)[users]),
             events_per_step=_quantiles(sizes[active]),
             events_per_val_step=_quantiles(val_size),
             events_per_test_step=_quantiles(test_size),
             test_steps_of_one_event=int((test_size == 1).sum()),
             test_steps_tied=int(tied.sum()),
             test_steps_tied_pct=100.0 * float(tied.mean()) if users.size else 0.0,
             val_to_test_seconds=_quantiles(gap),
             test_within_60s_of_val=int((gap <= 60).sum()),
             test_same_second_as_val=int((gap == 0).sum()))
  per_step = (seqs.report or {}).get("events_per_step")
  if per_step:
    out["partial_val_steps"] = int((val_size < per_step).sum())
    out["partial_test_steps"] = int((test_size < per_step).sum())
  return out
