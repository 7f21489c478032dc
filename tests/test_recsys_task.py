"""The Table 2 task builders: targets, histories and the leakage rule."""
from types import SimpleNamespace

import numpy as np
import pytest

from dennl_jax.recsys import task as tk


def _seqs(lengths, num_categories=3, seed=0):
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths)
  u, t = len(lengths), int(lengths.max())
  mask = np.arange(t)[None, :] < lengths[:, None]
  s = rng.dirichlet(np.ones(num_categories), (u, t)).astype(np.float32) * mask[..., None]
  return SimpleNamespace(strengths=s, mask=mask, lengths=lengths,
                         category_names=tuple(f"c{i}" for i in range(num_categories)))


def _split(seqs):
  lengths = seqs.lengths
  test = np.where(lengths >= 1, lengths - 1, -1)
  val = np.where(lengths >= 2, lengths - 2, -1)
  before = np.where(val >= 0, val, test)
  train = seqs.mask & (np.arange(seqs.mask.shape[1])[None, :] < before[:, None])
  return SimpleNamespace(test_step=test, val_step=val, train_mask=train)


def test_make_tasks_targets_and_histories():
  seqs = _seqs([1, 2, 5, 3])
  split = _split(seqs)
  emb = np.zeros((4, 2), np.float32)
  val, test = tk.make_tasks(seqs, split, emb, np.ones(4, bool))
  np.testing.assert_array_equal(val.target_step, [-1, 0, 3, 1])
  np.testing.assert_array_equal(test.target_step, [0, 1, 4, 2])
  np.testing.assert_array_equal(tk.history_length(val), [0, 0, 3, 1])
  np.testing.assert_array_equal(tk.history_length(test), [0, 1, 4, 2])
  np.testing.assert_array_equal(test.history_mask[2], [1, 1, 1, 1, 0])
  assert tk.dominant_target(test)[2] == np.argmax(seqs.strengths[2, 4])
  assert tk.interacted_target(val)[0].sum() == 0
  train = tk.training_task(val)
  assert np.all(train.target_step == -1) and np.array_equal(train.history_mask, val.history_mask)
  held_out = tk.training_task(val._replace(train_users=np.array([1, 1, 0, 1], bool)))
  assert not held_out.history_mask[2].any()
  np.testing.assert_array_equal(held_out.history_mask[3], val.history_mask[3])


def test_leaky_history_rejected():
  seqs = _seqs([3, 3])
  split = _split(seqs)
  _, test = tk.make_tasks(seqs, split, np.zeros((2, 1)), np.ones(2, bool))
  leaky = test.history_mask.copy()
  leaky[0, 2] = True
  with pytest.raises(ValueError, match="leakage"):
    tk.check_task(test._replace(history_mask=leaky))
  with pytest.raises(ValueError, match="padding"):
    tk.check_task(test._replace(mask=np.array([[1, 1, 0], [1, 1, 1]], bool)))


def test_last_steps_and_history_features():
  seqs = _seqs([5, 2, 4])
  _, test = tk.make_tasks(seqs, _split(seqs), np.zeros((3, 1)), np.ones(3, bool))
  cold = tk.last_steps(test, 2)
  np.testing.assert_array_equal(cold.history_mask[0], [0, 0, 1, 1, 0])
  np.testing.assert_array_equal(tk.history_length(cold), [2, 1, 2])
  assert tk.history_length(tk.last_steps(test, 0)).sum() == 0
  feats, fmask = tk.history_features(cold)
  np.testing.assert_allclose(feats[0, :2], seqs.strengths[0, 2:4])
  np.testing.assert_array_equal(fmask, [[1, 1], [1, 0], [1, 1]])


def test_last_steps_counts_active_steps_with_idle_days():
  # categories (a, idle); user 0: a, idle, a, idle, idle, [test a]
  a, idle = [1, 0], [0, 1]
  s = np.array([[a, idle, a, idle, idle, a]], np.float32)
  seqs = SimpleNamespace(strengths=s, mask=np.ones((1, 6), bool), category_names=("a", "idle"))
  _, test = tk.make_tasks(seqs, _split(SimpleNamespace(lengths=np.array([6]), mask=seqs.mask)),
                          np.zeros((1, 1)), np.ones(1, bool))
  np.testing.assert_array_equal(tk.last_steps(test, 1, 1).history_mask[0], [0, 0, 1, 1, 1, 0])
  np.testing.assert_array_equal(tk.last_steps(test, 2, 1).history_mask[0], [1, 1, 1, 1, 1, 0])
  assert not tk.last_steps(test, 0, 1).history_mask.any()
  np.testing.assert_array_equal(tk.last_steps(test, 1).history_mask[0], [0, 0, 0, 0, 1, 0])
