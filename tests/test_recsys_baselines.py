"""Practitioner baselines on hand-made data, the GRU on a cyclic pattern, and no peeking at targets."""
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from dennl_jax.recsys import baselines as bl
from dennl_jax.recsys import metrics as rm
from dennl_jax.recsys import registry
from dennl_jax.recsys import sequence_models as sm
from dennl_jax.recsys import task as tk

# float64, as these tests ran in the full suite before x64 became a per-test
# marker (modules collected before them switched it on at import).
pytestmark = pytest.mark.x64

SMALL = {"num_steps": 60, "eval_every": 30, "max_len": 6, "hidden": 16, "batch_size": 32}


def _split(mask):
  lengths = mask.sum(1)
  test, val = lengths - 1, np.where(lengths >= 2, lengths - 2, -1)
  train = mask & (np.arange(mask.shape[1])[None] < np.where(val >= 0, val, test)[:, None])
  return SimpleNamespace(test_step=test, val_step=val, train_mask=train)


def _tasks(strengths, mask, emb=None, train_users=None):
  u = strengths.shape[0]
  seqs = SimpleNamespace(strengths=np.asarray(strengths, np.float32), mask=np.asarray(mask, bool),
                         category_names=tuple(map(str, range(strengths.shape[2]))))
  emb = np.zeros((u, 2), np.float32) if emb is None else emb
  train_users = np.ones(u, bool) if train_users is None else train_users
  val, test = tk.make_tasks(seqs, _split(seqs.mask), emb, train_users)
  return tk.training_task(val), val, test


def _onehot(idx, c):
  return np.eye(c, dtype=np.float32)[np.asarray(idx)]


def _cyclic(num_users=48, t=9, c=4, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(4, t + 1, num_users)
  mask = np.arange(t)[None] < lengths[:, None]
  dom = (rng.integers(0, c, num_users)[:, None] + np.arange(t)[None]) % c
  s = 0.7 * _onehot(dom, c) + 0.3 / c
  return s * mask[..., None], mask


def test_popularity_and_frequency_known_answers():
  # user 0: steps a, a, b, [val a], [test b]; user 1: c, [val c], [test a]; user 2 (not a training user)
  s = _onehot([[0, 0, 1, 0, 1], [2, 2, 0, 0, 0], [1, 1, 1, 1, 0]], 3)
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], bool)
  train, val, test = _tasks(s * mask[..., None], mask, train_users=np.array([True, True, False]))
  fitted = bl.fit_popularity(None, train, val)
  np.testing.assert_allclose(fitted["popularity"], [2 / 4, 1 / 4, 1 / 4], atol=1e-5)
  np.testing.assert_allclose(bl.popularity_vector(train), [2 / 4, 1 / 4, 1 / 4])  # 4 steps
  scores = bl._frequency_scores(bl.popularity_vector(train), 1.0, test)
  # user 0 history a, a, b, a  -> (3 + .5, 1 + .25, 0 + .25) / 5
  np.testing.assert_allclose(scores[0], np.array([3.5, 1.25, 0.25]) / 5, atol=1e-8)
  fitted = bl.fit_own_frequency(None, train, val, {"grid": (0.5, 2.0)})
  assert fitted["alpha"] in (0.5, 2.0) and set(fitted["validation"]) == {0.5, 2.0}


def test_dominant_popularity_differs_from_mean_strength():
  # b is never dominant but has the most mass: popularity must rank a, c first
  s = np.array([[[0.6, 0.4, 0.0], [0.0, 0.4, 0.6], [0.6, 0.4, 0.0], [0.6, 0.4, 0.0]]], np.float32)
  train, _, _ = _tasks(np.concatenate([s, s]), np.ones((2, 4), bool))
  dom = bl.dominant_popularity(train)
  assert np.argmax(bl.popularity_vector(train)) == 1
  np.testing.assert_allclose(dom, [0.5, 0.0, 0.5], atol=1e-5)
  assert dom[1] > 0            # never-dominant categories keep a tiny mean-strength order


def test_markov_known_transitions():
  # a->b always, b->a always: the chain must predict the alternation
  s = _onehot([[0, 1, 0, 1, 0, 1], [1, 0, 1, 0, 1, 0]], 2)
  mask = np.ones((2, 6), bool)
  train, val, test = _tasks(s, mask)
  counts = bl.transition_counts(train)
  np.testing.assert_array_equal(counts, [[0, 3], [3, 0]])   # 4 training steps each -> 3 pairs
  fitted = bl.fit_markov(None, train, val)
  pred = bl.predict_markov(fitted, test)
  # test step of user 0 is index 5 (b), last history step index 4 (a)
  assert np.argmax(pred[0]) == 1 and np.argmax(pred[1]) == 0
  assert rm.per_user_metrics(pred, test)["top1"].mean() == 1.0
  # a tied step (a and b equal) spreads its count.  Training steps a, (a|b), a:
  # a -> (a|b) adds 1/2 to a->a and a->b; (a|b) -> a adds 1/2 to a->a and b->a.
  tied = np.array([[[1, 0], [0.5, 0.5], [1, 0], [1, 0], [0, 1]]], np.float32)
  counts = bl.transition_counts(_tasks(tied, np.ones((1, 5), bool))[0])
  np.testing.assert_allclose(counts, [[1.0, 0.5], [0.5, 0.0]])
  # idle steps (category 2) are skipped: a, idle, b, idle, [val a], [test b] -> a->b only
  s3 = _onehot([[0, 2, 1, 2, 0, 1]], 3)
  train, val, test = _tasks(s3, np.ones((1, 6), bool))
  np.testing.assert_array_equal(bl.transition_counts(train, 2), [[0, 1, 0], [0, 0, 0], [0, 0, 0]])
  assert bl.last_history_step(test, 2)[0] == 4 and bl.last_history_step(train, 2)[0] == 2
  assert bl.transition_counts(train).sum() == 3


def test_graphsage_link_scores_by_hand():
  z_users = np.array([[1.0, 0.0], [0.0, 1.0]])
  z_items = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  w = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
  got = bl.link_category_scores(z_users, z_items, w, 3.0, -1.0, chunk_size=1)
  sig = lambda x: 1 / (1 + np.exp(-x))
  want = np.array([[sig(2.0) + 0.5 * sig(0.8), sig(-1.0) + 0.5 * sig(0.8)],
                   [sig(-1.0) + 0.5 * sig(1.4), sig(2.0) + 0.5 * sig(1.4)]])
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_history_methods_fall_back_to_popularity_at_h0():
  s, mask = _cyclic()
  train, val, test = _tasks(s, mask)
  cold = tk.last_steps(test, 0)
  for name in ("last_step", "own_frequency", "markov"):
    p = registry.get(name)
    fitted = p.fit(jax.random.key(0), train, val, {})
    scores, fell_back = registry.predict_with_fallback(p, fitted, cold, fitted["popularity"])
    assert fell_back.all()
    np.testing.assert_allclose(scores, np.broadcast_to(fitted["popularity"], scores.shape))


@pytest.mark.slow
def test_gru_learns_cyclic_pattern():
  s, mask = _cyclic()
  train, val, test = _tasks(s, mask)
  p = registry.get("gru")
  fitted = p.fit(jax.random.key(0), train, val, dict(SMALL, num_steps=150, eval_every=50))
  scores, _ = registry.predict_with_fallback(p, fitted, test, fitted["popularity"])
  assert rm.per_user_metrics(scores, test)["top1"].mean() > 0.9
  assert rm.per_user_metrics(bl.predict_popularity(fitted, test), test)["top1"].mean() < 0.5


@pytest.mark.parametrize("name", ["popularity", "last_step", "own_frequency", "markov",
                                  "graphsage", "graphsage_dot", "graphsage_linear", "gru"])
def test_no_method_reads_target_or_later_steps(name):
  # same shapes as the GRU test, so the compiled steps are reused
  s, mask = _cyclic(seed=1)
  u = s.shape[0]
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(u, 2)).astype(np.float32)
  config = dict(SMALL, category_embeddings=rng.normal(size=(4, 2)),
                item_embeddings=rng.normal(size=(5, 2)), item_categories=rng.dirichlet(np.ones(4), 5),
                link_scale=2.0, link_bias=-0.5)
  p = registry.get(name)
  train, val, test = _tasks(s, mask, emb)
  poisoned = s.copy()
  lengths = mask.sum(1)
  # a value no legal input has, on every test step (the last valid step) and on padding
  poisoned[np.arange(u), lengths - 1] = 1e3 * _onehot(np.full(u, 3), 4)
  poisoned[~mask] = 7.0
  ptrain, pval, ptest = _tasks(poisoned, mask, emb)
  a = p.predict(p.fit(jax.random.key(1), train, val, config), test)
  b = p.predict(p.fit(jax.random.key(1), ptrain, pval, config), ptest)
  np.testing.assert_array_equal(a, b)


def test_sasrec_prediction_ignores_target_and_padding():
  # The training path is shared with the GRU (tested above); what is specific
  # to SASRec is the causal attention, checked here without the costly
  # gradient compile.
  from flax import nnx
  s, mask = _cyclic(seed=2)
  _, _, test = _tasks(s, mask)
  poisoned = s.copy()
  poisoned[np.arange(s.shape[0]), mask.sum(1) - 1] = 1e3
  poisoned[~mask] = 7.0
  _, _, ptest = _tasks(poisoned, mask)
  cfg = dict(sm.DEFAULTS, hidden=16, max_len=6)
  graphdef, state = nnx.split(sm._build("sasrec", 4, 2, cfg, jax.random.key(0)))
  fitted = {"graphdef": graphdef, "state": state, "max_len": 6, "popularity": np.full(4, 0.25)}
  a, b = sm.predict_sequence_model(fitted, test), sm.predict_sequence_model(fitted, ptest)
  np.testing.assert_array_equal(a, b)
  # and it does read the history: changing a history step changes the scores
  changed = s.copy()
  changed[:, 0] = _onehot(np.zeros(s.shape[0], int), 4)
  _, _, ctest = _tasks(changed * mask[..., None], mask)
  assert not np.allclose(sm.predict_sequence_model(fitted, ctest), a)


def test_registry_rejects_unknown_and_bad_scores():
  with pytest.raises(ValueError, match="unknown method"):
    registry.get("no_such_method")
  s, mask = _cyclic()
  train, val, test = _tasks(s, mask)
  bad = registry.Predictor(bl.fit_popularity, lambda f, t: np.zeros((2, 2)), False, False)
  with pytest.raises(ValueError, match="shape"):
    registry.predict_with_fallback(bad, bl.fit_popularity(None, train, val), test, np.ones(4))
