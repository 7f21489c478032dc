"""Ranking metrics on hand-made cases with known rankings."""
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from dennl_jax.recsys import metrics as rm
from dennl_jax.recsys.task import make_task

# float64, as these tests ran in the full suite before x64 became a per-test
# marker (modules collected before them switched it on at import).
pytestmark = pytest.mark.x64


def _task(target_vectors):
  """One history step + one target step per user; target_vectors (U, C)."""
  tv = np.asarray(target_vectors, np.float32)
  u, c = tv.shape
  s = np.stack([np.full((u, c), 1.0 / c, np.float32), tv], axis=1)
  seqs = SimpleNamespace(strengths=s, mask=np.ones((u, 2), bool),
                         category_names=tuple(map(str, range(c))))
  return make_task(seqs, np.ones(u, int), np.zeros((u, 1)), np.ones(u, bool))


def test_known_rankings():
  # 4 categories.  Targets: dominant = 2 for user 0; user 1 dominant 0 with 3 also touched;
  # user 2: 1 and 3 tie for dominant (0.5/0.5) -> credit split half/half.
  targets = [[0.0, 0.1, 0.9, 0.0],
             [0.6, 0.0, 0.0, 0.4],
             [0.0, 0.5, 0.0, 0.5]]
  scores = [[0.4, 0.3, 0.2, 0.1],     # ranking 0,1,2,3 -> dominant 2 at rank 3
            [0.1, 0.1, 0.1, 0.7],     # ranking 3,0,1,2 (tie 0,1,2 -> index order) -> rank 2
            [5.0, 1.0, 1.0, 1.0]]     # ranking 0,1,2,3 -> tied dominants 1, 3 at ranks 2, 4
  pu = rm.per_user_metrics(np.array(scores), _task(targets))
  np.testing.assert_array_equal(pu["top1"], [0, 0, 0])
  np.testing.assert_array_equal(pu["top3"], [1, 1, 0.5])
  np.testing.assert_array_equal(pu["top5"], [1, 1, 1])
  np.testing.assert_allclose(pu["mrr"], [1 / 3, 1 / 2, (1 / 2 + 1 / 4) / 2])
  np.testing.assert_allclose(pu["ndcg5"], [0.5, 1 / np.log2(3), (1 / np.log2(3) + 1 / np.log2(5)) / 2])
  # interacted: user 0 touches {1,2}: first category 0 misses, top-3 hits;
  # user 1 touches {0,3}: top category 3 is a hit; user 2 touches {1,3}: 0 misses.
  np.testing.assert_array_equal(pu["hit1"], [0, 1, 0])
  np.testing.assert_array_equal(pu["hit3"], [1, 1, 1])


def test_rank_matches_brute_force_with_ties():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 3, (50, 6)).astype(float)   # many ties
  target = rng.integers(0, 6, 50)
  ranks = rm.rank_of(scores, target)
  for s, t, r in zip(scores, target, ranks):
    better = np.sum(s > s[t]) + np.sum((s == s[t]) & (np.arange(6) < t))
    assert r == better + 1


def test_tied_dominants_match_uniform_tie_breaking_by_enumeration():
  rng = np.random.default_rng(3)
  targets = rng.integers(0, 3, (40, 5)).astype(float)     # many ties at the maximum
  targets[targets.sum(1) == 0, 0] = 1.0
  targets /= targets.sum(1, keepdims=True)
  scores = rng.normal(size=(40, 5))
  pu = rm.per_user_metrics(scores, _task(targets))
  for u in range(40):
    tied = np.flatnonzero(np.isclose(targets[u], targets[u].max()))
    ranks = rm.rank_of(np.repeat(scores[u:u + 1], len(tied), 0), tied)
    assert np.isclose(pu["top3"][u], np.mean(ranks <= 3))
    assert np.isclose(pu["mrr"][u], np.mean(1.0 / ranks))


def test_users_without_target_are_skipped():
  task = _task([[1.0, 0.0], [0.0, 1.0]])
  task = task._replace(target_step=np.array([1, -1]))
  pu = rm.per_user_metrics(np.array([[0.0, 1.0], [1.0, 0.0]]), task)
  assert pu["top1"].shape == (1,) and pu["top1"][0] == 0.0
  with pytest.raises(ValueError, match="NaN"):
    rm.per_user_metrics(np.array([[np.nan, 1.0], [1.0, 0.0]]), task)


def test_bootstrap_is_keyed_and_covers_mean():
  v = np.random.default_rng(1).random(200) < 0.3
  key = jax.random.key(3)
  a = rm.bootstrap_interval(v, key)
  assert a == rm.bootstrap_interval(v, key)
  assert a != rm.bootstrap_interval(v, jax.random.key(4))
  assert a[0] < v.mean() < a[1]
  half = (a[1] - a[0]) / 2
  assert abs(half - 1.96 * np.sqrt(v.mean() * (1 - v.mean()) / 200)) < 0.01
  assert rm.bootstrap_interval(np.ones(10), key) == (1.0, 1.0)


def test_paired_difference_and_lift():
  rng = np.random.default_rng(2)
  b = (rng.random(300) < 0.4).astype(float)
  a = np.maximum(b, rng.random(300) < 0.2)    # a never worse than b
  d = rm.paired_difference(a, b, jax.random.key(0))
  assert d["low"] > 0 and d["p"] == 0.0
  assert abs(d["mean"] - 100 * (a - b).mean()) < 1e-9
  same = rm.paired_difference(b, b, jax.random.key(0))
  assert same["mean"] == same["low"] == same["high"] == 0.0
  s_a = rm.summarize({"top1": a}, jax.random.key(1))
  s_b = rm.summarize({"top1": b}, jax.random.key(1))
  assert s_a["n"] == 300
  assert abs(rm.lift(s_a, s_b)["top1"] - 100 * (a.mean() / b.mean() - 1)) < 1e-9


def test_seeds_and_buckets():
  runs = [{"top1": np.array([1.0, 0.0, 1.0])}, {"top1": np.array([0.0, 0.0, 1.0])}]
  np.testing.assert_allclose(rm.average_over_seeds(runs)["top1"], [0.5, 0.0, 1.0])
  assert abs(rm.seed_spread(runs)["top1"] - 100 * np.std([2 / 3, 1 / 3])) < 1e-9
  b = rm.by_bucket({"top1": np.array([1.0, 0.0, 1.0, 1.0, 0.0])}, [1, 2, 3, 12, 40])
  assert b == {"1": {"top1": 100.0, "n": 1}, "2-3": {"top1": 50.0, "n": 2},
               ">10": {"top1": 50.0, "n": 2}}


def test_cluster_bootstrap_resamples_users_not_rows():
  rng = np.random.default_rng(0)
  v = rng.random(200)
  key = jax.random.key(3)
  # one row per user: the plain bootstrap over users
  np.testing.assert_allclose(rm.bootstrap_interval(v, key, 500, clusters=np.arange(200)),
                             rm.bootstrap_interval(v, key, 500), rtol=1e-12)
  # every user scored in 3 draws with the same values: rows of a user move together,
  # so the interval is the one-draw interval, not one sqrt(3) narrower
  three = np.tile(v, 3)
  users = np.tile(np.arange(200), 3)
  lo, hi = rm.bootstrap_interval(three, key, 500, clusters=users)
  np.testing.assert_allclose([lo, hi], rm.bootstrap_interval(v, key, 500), rtol=1e-12)
  naive = rm.bootstrap_interval(three, key, 500)
  assert naive[1] - naive[0] < 0.75 * (hi - lo)
  d = rm.paired_difference(three, three - 0.1, key, 500, clusters=users)
  assert d["low"] == pytest.approx(10.0) and d["high"] == pytest.approx(10.0)
  s = rm.summarize({"top1": three}, key, 500, clusters=users)
  assert s["n"] == 600 and s["top1"]["mean"] == pytest.approx(100 * v.mean())
  with pytest.raises(ValueError, match="clusters"):
    rm.bootstrap_interval(v, key, 10, clusters=np.arange(3))


def test_chance_and_draw_spread():
  ch = rm.chance(4)
  assert ch["top1"] == 25.0 and ch["top3"] == 75.0 and ch["top5"] == 100.0
  assert ch["mrr"] == pytest.approx(100 * (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
  spread = rm.draw_spread([{"top1": np.array([1.0, 0.0])}, {"top1": np.array([0.0, 0.0])}])
  assert spread["top1"]["min"] == 0.0 and spread["top1"]["max"] == 50.0
  assert spread["top1"]["per_draw"] == [50.0, 0.0]
