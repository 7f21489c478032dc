"""The next-step prediction task of Table 2 and its host-side builders.

A :class:`NextStepTask` holds every user's strength sequence, one target step
per user and the steps a method may look at.  Predictors never receive a
separate "answer": the target is read off ``strengths[u, target_step[u]]``
by the metrics only, and every predictor must use ``history_mask`` steps (and
the embeddings) alone — ``tests/test_recsys_baselines.py`` checks this by
poisoning the target step.

Split (``dennl_jax.recsys.events.time_split``): per user, last valid step =
test, second-last = validation, the rest = training.  The validation task
predicts the validation step from the training steps; the test task predicts
the test step from the training steps plus the validation step.  Everything
here is numpy and never jitted.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

TIE_TOLERANCE = 1e-6   # strengths this close to the maximum count as tied


class NextStepTask(NamedTuple):
  """One next-step prediction problem over U users (numpy arrays).

  strengths:    (U, T, C) float32 strength vectors (valid steps sum to 1).
  mask:         (U, T) bool valid steps (left-aligned).
  target_step:  (U,) int index of the step to predict; -1 = not evaluated.
  history_mask: (U, T) bool steps the method may look at: valid and strictly
                before ``target_step`` (never the target or later steps).
  embeddings:   (U, d) float32 GraphSAGE user embeddings (training-period
                events only for the validation task; see :func:`make_tasks`).
  train_users:  (U,) bool users whose histories may train shared models.
  category_names: (C,) str.
  """
  strengths: np.ndarray
  mask: np.ndarray
  target_step: np.ndarray
  history_mask: np.ndarray
  embeddings: np.ndarray
  train_users: np.ndarray
  category_names: tuple


def check_task(task: NextStepTask) -> NextStepTask:
  """Raise ``ValueError`` naming the problem when ``task`` is inconsistent.

  Checks shapes, that targets are valid steps, and that no history step is
  invalid or at/after its user's target (the leakage rule).
  """
  s, m = np.asarray(task.strengths), np.asarray(task.mask)
  if s.ndim != 3:
    raise ValueError(f"strengths must be (U, T, C); got shape {s.shape}")
  u, t, c = s.shape
  if m.shape != (u, t) or m.dtype != bool:
    raise ValueError(f"mask must be bool (U, T) = {(u, t)}; got {m.dtype} {m.shape}")
  hist = np.asarray(task.history_mask)
  if hist.shape != (u, t) or hist.dtype != bool:
    raise ValueError(f"history_mask must be bool (U, T) = {(u, t)}; got {hist.dtype} {hist.shape}")
  tgt = np.asarray(task.target_step)
  if tgt.shape != (u,) or not np.issubdtype(tgt.dtype, np.integer):
    raise ValueError(f"target_step must be int (U,) = ({u},); got {tgt.dtype} {tgt.shape}")
  if np.any((tgt < -1) | (tgt >= t)):
    raise ValueError(f"target_step must lie in [-1, {t - 1}]")
  has = tgt >= 0
  if not np.all(m[np.flatnonzero(has), tgt[has]]):
    bad = np.flatnonzero(has)[~m[np.flatnonzero(has), tgt[has]]][0]
    raise ValueError(f"target_step of user {bad} points at a padding step")
  if np.any(hist & ~m):
    raise ValueError("history_mask marks padding steps")
  after = np.arange(t)[None, :] >= tgt[:, None]
  leak = hist & after & has[:, None]
  if np.any(leak):
    raise ValueError(f"history_mask of user {np.flatnonzero(leak.any(1))[0]} reaches its target "
                     "step or later (leakage)")
  emb = np.asarray(task.embeddings)
  if emb.ndim != 2 or emb.shape[0] != u:
    raise ValueError(f"embeddings must be (U, d) with U = {u}; got {emb.shape}")
  tu = np.asarray(task.train_users)
  if tu.shape != (u,) or tu.dtype != bool:
    raise ValueError(f"train_users must be bool ({u},); got {tu.dtype} {tu.shape}")
  if len(task.category_names) != c:
    raise ValueError(f"category_names has {len(task.category_names)} names for C = {c}")
  return task


def _history_before(mask: np.ndarray, target_step: np.ndarray) -> np.ndarray:
  t = mask.shape[1]
  return mask & (np.arange(t)[None, :] < target_step[:, None])


def make_task(seqs, target_step, embeddings, train_users, history_mask=None) -> NextStepTask:
  """A checked task; by default the history is every valid step before the target.

  Users with ``target_step == -1`` keep ``history_mask`` (default: no steps),
  so shared models can still be trained on them by passing an explicit mask.
  """
  mask = np.asarray(seqs.mask, bool)
  target_step = np.asarray(target_step, np.int64)
  if history_mask is None:
    history_mask = _history_before(mask, target_step) & (target_step[:, None] >= 0)
  task = NextStepTask(
      strengths=np.asarray(seqs.strengths, np.float32), mask=mask.copy(),
      target_step=target_step.copy(), history_mask=np.asarray(history_mask, bool).copy(),
      embeddings=np.asarray(embeddings, np.float32), train_users=np.asarray(train_users, bool).copy(),
      category_names=tuple(seqs.category_names))
  return check_task(task)


def make_tasks(seqs, split, embeddings, train_users, *, test_embeddings=None):
  """(val_task, test_task) from sequences and their time split.

  seqs: ``Sequences`` (strengths (U, T, C), mask (U, T), category_names).
  split: ``TimeSplit`` (val_step (U,), test_step (U,), train_mask (U, T)).
  embeddings: (U, d) user embeddings from training-step events only; used by
    the validation task, and by the test task unless ``test_embeddings`` is
    given (e.g. recomputed inductively from training + validation events,
    which precede the test step and so are allowed history).
  train_users: (U,) bool.

  val task: target = val step, history = training steps.
  test task: target = test step, history = training + validation steps.
  Users without a validation step (a single valid step) get val target -1;
  their test history is then empty (h = 0).
  """
  mask = np.asarray(seqs.mask, bool)
  val_step = np.asarray(split.val_step, np.int64)
  test_step = np.asarray(split.test_step, np.int64)
  if val_step.shape != test_step.shape or val_step.shape != mask.shape[:1]:
    raise ValueError(f"split steps {val_step.shape}/{test_step.shape} do not match U = {mask.shape[0]}")
  if np.any((val_step >= 0) & (val_step >= test_step)):
    raise ValueError("val_step must precede test_step")
  # The validation history is exactly the split's training steps; taking it
  # from train_mask (not recomputing) keeps one definition of "training step".
  train_mask = np.asarray(split.train_mask, bool) & (val_step[:, None] >= 0)
  val_task = make_task(seqs, val_step, embeddings, train_users, history_mask=train_mask)
  test_task = make_task(seqs, test_step, embeddings if test_embeddings is None else test_embeddings,
                        train_users)
  return val_task, test_task


def training_task(val_task: NextStepTask) -> NextStepTask:
  """The task a predictor trains on: training steps of training users, no targets.

  ``history_mask`` keeps the validation task's history (the training steps)
  of ``train_users`` only, and ``target_step`` is -1, so neither a target
  nor a held-out user's step can reach a training loss.
  """
  return val_task._replace(target_step=np.full_like(val_task.target_step, -1),
                           history_mask=val_task.history_mask & val_task.train_users[:, None])


def evaluated(task: NextStepTask) -> np.ndarray:
  """(U,) bool users with a target."""
  return np.asarray(task.target_step) >= 0


def history_length(task: NextStepTask) -> np.ndarray:
  """(U,) int number of history steps each user shows."""
  return np.asarray(task.history_mask).sum(1)


def target_strengths(task: NextStepTask) -> np.ndarray:
  """(U, C) strength vector of each user's target step (zeros when no target)."""
  tgt = np.asarray(task.target_step)
  out = np.zeros(task.strengths.shape[::2], np.float32)
  has = tgt >= 0
  out[has] = task.strengths[np.flatnonzero(has), tgt[has]]
  return out


def dominant_target(task: NextStepTask) -> np.ndarray:
  """(U,) int dominant category of the target step (argmax, lowest index on ties); -1 if none."""
  out = np.argmax(target_strengths(task), axis=1)
  return np.where(evaluated(task), out, -1)


def dominant_set(task: NextStepTask) -> np.ndarray:
  """(U, C) bool: the categories of maximal strength at the target step (all tied ones).

  Ties are common (on MovieLens a step of one three-genre film ties three
  genres: 25.4 % of test sessions and 3.1 % of test steps of whole 10-rating
  blocks tie, ``step_report.step_statistics``), so the metrics split a user's
  credit equally over the tied categories instead of picking one by index.
  """
  x = target_strengths(task)
  return (x >= x.max(1, keepdims=True) - TIE_TOLERANCE) & evaluated(task)[:, None]


def interacted_target(task: NextStepTask) -> np.ndarray:
  """(U, C) bool categories with strength > 0 at the target step (the paper's hit set)."""
  return (target_strengths(task) > 0) & evaluated(task)[:, None]


def last_steps(task: NextStepTask, h: int, idle_index=None) -> NextStepTask:
  """Keep only the last ``h`` history steps of every user (cold-user protocol).

  With ``idle_index`` (days without events, all mass on that category), the
  count is over *active* steps: the history starts at the h-th last active
  step and keeps the idle steps after it.  Users with fewer than ``h`` such
  steps keep all of them.
  """
  if h < 0:
    raise ValueError(f"h must be >= 0; got {h}")
  hist = np.asarray(task.history_mask)
  active = hist
  if idle_index is not None:
    active = hist & (task.strengths[..., idle_index] < 1.0 - TIE_TOLERANCE)
  # number of active history steps at or after each step (1 at the most recent one)
  from_end = np.cumsum(active[:, ::-1], axis=1)[:, ::-1]
  keep = (from_end < h) | (active & (from_end == h))
  return task._replace(history_mask=hist & keep)


def history_features(task: NextStepTask):
  """Padded history per user: ((U, H, C) strengths, (U, H) mask), H = max history length.

  History steps are gathered in time order and left-aligned, so sequence
  models see only what ``history_mask`` allows, whatever the target.
  """
  hist = np.asarray(task.history_mask)
  u, _, c = task.strengths.shape
  lengths = hist.sum(1)
  width = max(int(lengths.max(initial=0)), 1)
  out = np.zeros((u, width, c), np.float32)
  out_mask = np.arange(width)[None, :] < lengths[:, None]
  rows, cols = np.nonzero(hist)
  out[out_mask] = task.strengths[rows, cols]
  return out, out_mask
