"""Table 2 protocol: roles, the graph leakage guard, cold-user tasks."""
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from dennl_jax.recsys import protocol as pr
from dennl_jax.recsys import task as tk

# float64, as these tests ran in the full suite before x64 became a per-test
# marker (modules collected before them switched it on at import).
pytestmark = pytest.mark.x64


def _split(lengths, t):
  test = np.where(lengths >= 1, lengths - 1, -1)
  val = np.where(lengths >= 2, lengths - 2, -1)
  train = np.arange(t)[None] < np.where(val >= 0, val, test)[:, None]
  return SimpleNamespace(test_step=test, val_step=val, train_mask=train)


def test_roles_are_stratified_and_keyed():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 30, 500)
  roles = pr.assign_roles(jax.random.key(0), lengths, cold_fraction=0.2, cold_min_steps=3)
  assert np.all(roles[lengths < 2] == pr.TOO_SHORT)
  assert np.all(lengths[roles == pr.COLD] >= 3)
  assert np.all(roles[lengths >= 2] != pr.TOO_SHORT)
  eligible = lengths >= 3
  for lo, hi in ((2, 3), (4, 10), (11, 40)):
    sel = eligible & (lengths - 1 >= lo) & (lengths - 1 <= hi)
    assert abs(np.mean(roles[sel] == pr.COLD) - 0.2) < 0.5 / sel.sum() + 1e-9
  np.testing.assert_array_equal(roles, pr.assign_roles(jax.random.key(0), lengths))
  assert not np.array_equal(roles, pr.assign_roles(jax.random.key(1), lengths))
  assert pr.role_counts(roles)["too_short"] == np.sum(lengths < 2)
  with pytest.raises(ValueError, match="cold_fraction"):
    pr.assign_roles(jax.random.key(0), lengths, cold_fraction=1.5)


def test_no_test_step_event_reaches_any_graph():
  # 3 users: TRAIN with 5 steps, COLD with 4 steps, TOO_SHORT with 1 step; 2 events per step
  lengths = np.array([5, 4, 1])
  split = _split(lengths, 5)
  roles = np.array([pr.TRAIN, pr.COLD, pr.TOO_SHORT])
  user = np.repeat(np.arange(3), 2 * lengths)
  step = np.concatenate([np.repeat(np.arange(n), 2) for n in lengths])
  for include_val in (False, True):
    for shown in (None, 0, 1, 2):
      masks = pr.graph_event_masks(user, step, split, roles, include_val=include_val,
                                   cold_shown=shown)
      for m in masks:
        assert not np.any(m & (step == split.test_step[user]))     # never a test step
        assert not np.any(m & (user == 2))
      train, test, cold = masks
      np.testing.assert_array_equal(train, (user == 0) & (step < 3))
      np.testing.assert_array_equal(test, (user == 0) & (step < (4 if include_val else 3)))
      cold_steps = step[cold & (user == 1)]
      expected = np.arange(3) if shown is None else np.arange(3 - shown, 3)
      np.testing.assert_array_equal(np.unique(cold_steps), expected)


def test_cold_task_shows_last_h_steps_of_cold_users_only():
  lengths = np.array([6, 5, 3])
  t = 6
  mask = np.arange(t)[None] < lengths[:, None]
  seqs = SimpleNamespace(strengths=np.ones((3, t, 2), np.float32) / 2 * mask[..., None], mask=mask,
                         category_names=("a", "b"))
  _, test = tk.make_tasks(seqs, _split(lengths, t), np.zeros((3, 4)), np.array([1, 0, 0], bool))
  cold = pr.cold_task(test, np.array([False, True, True]), 2, np.ones((3, 4)))
  np.testing.assert_array_equal(cold.target_step, [-1, 4, 2])
  np.testing.assert_array_equal(tk.history_length(cold), [2, 2, 2])
  np.testing.assert_array_equal(cold.history_mask[1], [0, 0, 1, 1, 0, 0])
  assert not cold.train_users.any() and np.all(cold.embeddings == 1)
  tk.check_task(cold)



def test_dropped_trailing_events_reach_no_graph():
  # one TRAIN user with 4 whole steps, then 2 events of a dropped partial block
  # (events.DROPPED) and one event cut by max_steps before the first step (-1)
  from dennl_jax.recsys.events import DROPPED
  split = _split(np.array([4]), 4)
  step = np.array([-1, 0, 1, 2, 3, DROPPED, DROPPED])
  user = np.zeros_like(step)
  for shown in (None, 0, 2):
    train, test, cold = pr.graph_event_masks(user, step, split, np.array([pr.TRAIN]),
                                             include_val=True, cold_shown=shown)
    np.testing.assert_array_equal(train, [1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(test, [1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(cold, test)
  _, _, cold = pr.graph_event_masks(user, step, split, np.array([pr.COLD]), include_val=True)
  np.testing.assert_array_equal(cold, [0, 1, 1, 1, 0, 0, 0])   # cold users: kept steps only
