"""The Table 2 protocol: user roles, leakage-free graph event masks, cold-user tasks.

Roles (one per user, fixed across training seeds so per-user results pair):

* ``TOO_SHORT``: fewer than ``min_steps`` valid steps — no history before the
  test step; reported, not evaluated.
* ``COLD``: ``cold_fraction`` of the users with ``>= cold_min_steps`` valid
  steps (so h = 2 history steps exist before the test step), drawn within
  each history-length bucket (stratified); never used to train anything;
  evaluated on their test step shown only h = 0, 1, 2 history steps.
* ``TRAIN``: everyone else with ``>= min_steps`` steps: their training steps
  train GraphSAGE and every shared model; evaluated on their test step.

Graph events (the leakage guard): GraphSAGE trains on the training steps of
TRAIN users only; test-task embeddings may add their validation steps (they
precede the test step); cold users' embeddings come from their own events
before the test step (or only the shown steps), embedded inductively.
"""
from __future__ import annotations

import jax
import numpy as np

from dennl_jax.recsys.events import DROPPED
from dennl_jax.recsys.metrics import BUCKETS
from dennl_jax.recsys.task import NextStepTask, last_steps

TOO_SHORT, TRAIN, COLD = 0, 1, 2
ROLE_NAMES = {TOO_SHORT: "too_short", TRAIN: "train", COLD: "cold"}


def assign_roles(key, lengths, *, min_steps: int = 2, cold_fraction: float = 0.2,
                 cold_min_steps: int = 3) -> np.ndarray:
  """(U,) int roles; cold users drawn per bucket of pre-test history length.

  Each bucket of eligible users (``lengths >= cold_min_steps``) contributes
  ``round(cold_fraction * bucket size)`` cold users, so the cold set has the
  history-length mix of the evaluated users that can show h = 2 steps.
  """
  lengths = np.asarray(lengths)
  if not 0.0 <= cold_fraction < 1.0:
    raise ValueError(f"cold_fraction must be in [0, 1); got {cold_fraction}")
  if min_steps < 2 or cold_min_steps < min_steps:
    raise ValueError(f"need 2 <= min_steps <= cold_min_steps; got {min_steps}, {cold_min_steps}")
  roles = np.where(lengths >= min_steps, TRAIN, TOO_SHORT)
  history = lengths - 1
  for j, (lo, hi) in enumerate(BUCKETS):
    pool = np.flatnonzero((lengths >= cold_min_steps) & (history >= lo)
                          & (history <= (np.inf if hi is None else hi)))
    take = int(round(cold_fraction * pool.size))
    if take:
      chosen = np.asarray(jax.random.permutation(jax.random.fold_in(key, j), pool.size))[:take]
      roles[pool[chosen]] = COLD
  return roles


def role_counts(roles) -> dict:
  roles = np.asarray(roles)
  return {name: int(np.sum(roles == r)) for r, name in ROLE_NAMES.items()}


def graph_event_masks(log_event_user, event_step, split, roles, *, include_val: bool,
                      cold_shown: int | None = None):
  """(train_events, test_events, cold_events): (N,) bool masks over the log's events.

  event_user/event_step: each event's user index and step (``Sequences``);
  split: ``TimeSplit``.  train_events: TRAIN users' steps before their
  validation step (what GraphSAGE trains on).  test_events: train_events plus
  the validation steps when ``include_val``.  cold_events: test_events plus
  COLD users' events before their test step (``cold_shown=h``: only the last
  h steps before it).  No mask ever contains a test-step event, nor an event
  of a dropped trailing partial block (``events.DROPPED``: after the test step).
  Events cut by ``max_steps`` (step -1) precede every kept step and count as
  training-period events.
  """
  user = np.asarray(log_event_user)
  step = np.asarray(event_step)
  ok = (user >= 0) & (step != DROPPED)
  u = np.where(ok, user, 0)
  role = np.where(ok, np.asarray(roles)[u], TOO_SHORT)
  val = np.asarray(split.val_step)[u]
  test = np.asarray(split.test_step)[u]
  train_events = ok & (role == TRAIN) & (val >= 0) & (step < val)
  test_events = train_events | (ok & (role == TRAIN) & include_val & (val >= 0) & (step == val))
  lo = -1 if cold_shown is None else test - cold_shown - 1
  cold_events = test_events | (ok & (role == COLD) & (step < test) & (step > lo))
  return train_events, test_events, cold_events


def only_users(task: NextStepTask, users) -> NextStepTask:
  """``task`` with targets kept only for ``users`` (bool (U,))."""
  users = np.asarray(users, bool)
  return task._replace(target_step=np.where(users, task.target_step, -1))


def cold_task(test_task: NextStepTask, cold_users, h: int, embeddings,
              idle_index=None) -> NextStepTask:
  """Cold users' test targets, each shown only the last ``h`` (active) history steps."""
  task = only_users(test_task, cold_users)
  task = last_steps(task, h, idle_index)._replace(embeddings=np.asarray(embeddings, np.float32),
                                      train_users=np.zeros_like(task.train_users))
  return task
