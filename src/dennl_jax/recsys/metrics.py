"""Ranking metrics for next-step category prediction (numpy, host-side).

Scores ``(U, C)`` rank the C categories per user, higher first.  **Ties are
broken deterministically by the lower category index first** (a stable sort
of ``-scores``); predictors that want a different order among equal scores
must add their own tie-breaker (the baselines add a tiny popularity term).

Per user (evaluated users only, those with ``target_step >= 0``):

* ``top{k}`` (k = 1, 3, 5): the target step's dominant category (argmax of
  its strength vector) is among the first k — primary.
* ``hit{k}``: the paper's hit, any of the first k categories has strength > 0
  at the target step ("the user interacted with the predicted category").
* ``ndcg5``: 1 / log2(1 + rank) of the dominant category if rank <= 5, else 0
  (one relevant item, so the ideal DCG is 1).
* ``mrr``: 1 / rank of the dominant category over the full ranking.

When several categories tie for the maximal target strength
(:func:`~dennl_jax.recsys.task.dominant_set`), top-k, NDCG@5 and MRR are
averaged over the tied categories — the expected value when the dominant
category is drawn uniformly among them — rather than crediting the lowest
index, which would favour alphabetically early categories.

Intervals are percentile bootstraps over users; the resampling indices come
from a numpy generator seeded with the bits of an explicit ``jax.random``
key, so every interval is reproducible from its key.  With ``clusters``
(one id per value, e.g. the user of each (role draw, user) row) the
bootstrap resamples whole clusters: a user evaluated in several role draws
is one unit of the resampling, not several independent ones.
"""
from __future__ import annotations

import jax
import numpy as np

from dennl_jax.recsys.task import NextStepTask, dominant_set, evaluated, interacted_target

KS = (1, 3, 5)
METRICS = ("top1", "top3", "top5", "hit1", "hit3", "hit5", "ndcg5", "mrr")
BUCKETS = ((0, 0), (1, 1), (2, 3), (4, 10), (11, None))


def ranking(scores) -> np.ndarray:
  """(U, C) int: categories best first; ties -> lower index first."""
  scores = np.asarray(scores)
  if scores.ndim != 2:
    raise ValueError(f"scores must be (U, C); got shape {scores.shape}")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores contain NaN or inf")
  return np.argsort(-scores, axis=1, kind="stable")


def rank_of(scores, target) -> np.ndarray:
  """(U,) 1-based rank of ``target[u]`` under :func:`ranking` (ties broken as there)."""
  order = ranking(scores)
  target = np.asarray(target)
  return 1 + np.argmax(order == target[:, None], axis=1)


def per_user_metrics(scores, task: NextStepTask) -> dict:
  """{metric: (n,) float} over the n evaluated users of ``task`` (in user order).

  scores: (U, C) for all U users (rows of non-evaluated users are ignored).
  """
  scores = np.asarray(scores)
  if scores.shape != (task.strengths.shape[0], task.strengths.shape[2]):
    raise ValueError(f"scores must be (U, C) = {task.strengths.shape[::2]}; got {scores.shape}")
  keep = evaluated(task)
  s = scores[keep]
  order = ranking(s)
  # rank[u, c]: 1-based position of category c in user u's ranking
  rank = np.empty_like(order)
  np.put_along_axis(rank, order, np.arange(1, order.shape[1] + 1)[None, :], axis=1)
  dom = dominant_set(task)[keep]
  weight = dom / dom.sum(1, keepdims=True)
  touched = interacted_target(task)[keep]
  touched_in_order = np.take_along_axis(touched, order, axis=1)
  out = {}
  for k in KS:
    out[f"top{k}"] = np.sum(weight * (rank <= k), axis=1)
    out[f"hit{k}"] = touched_in_order[:, :k].any(1).astype(np.float64)
  out["ndcg5"] = np.sum(weight * np.where(rank <= 5, 1.0 / np.log2(1.0 + rank), 0.0), axis=1)
  out["mrr"] = np.sum(weight / rank, axis=1)
  return out


def _rng(key) -> np.random.Generator:
  return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().astype(np.uint32))


def _resampled_means(values, key, num_samples, clusters=None) -> np.ndarray:
  """(num_samples,) bootstrap means of ``values`` (n,), resampling rows or whole clusters."""
  rng = _rng(key)
  if clusters is None:
    idx = rng.integers(0, values.size, (num_samples, values.size))
    return values[idx].mean(1)
  clusters = np.asarray(clusters)
  if clusters.shape != values.shape:
    raise ValueError(f"clusters must have the values' shape {values.shape}; got {clusters.shape}")
  _, inv = np.unique(clusters, return_inverse=True)
  inv = inv.reshape(-1)
  sums = np.bincount(inv, weights=values)
  counts = np.bincount(inv).astype(np.float64)
  idx = rng.integers(0, sums.size, (num_samples, sums.size))
  return sums[idx].sum(1) / counts[idx].sum(1)


def bootstrap_interval(values, key, num_samples: int = 1000, level: float = 0.95, clusters=None):
  """(low, high) percentile bootstrap interval of the mean of ``values`` (n,).

  clusters: optional (n,) ids; resamples whole clusters (the mean stays the
  mean over all n values).
  """
  values = np.asarray(values, np.float64)
  if values.ndim != 1 or values.size == 0:
    raise ValueError(f"values must be a non-empty (n,) array; got shape {values.shape}")
  means = _resampled_means(values, key, num_samples, clusters)
  a = (1.0 - level) / 2.0
  return float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a))


def summarize(per_user: dict, key, num_samples: int = 1000, clusters=None) -> dict:
  """{metric: {"mean", "low", "high"} in %} with bootstrap intervals over users, plus "n".

  clusters: optional (n,) id of each row (see :func:`bootstrap_interval`).
  """
  out = {}
  keys = jax.random.split(key, len(per_user))
  for k, (name, v) in zip(keys, sorted(per_user.items())):
    lo, hi = bootstrap_interval(v, k, num_samples, clusters=clusters)
    out[name] = {"mean": 100.0 * float(np.mean(v)), "low": 100.0 * lo, "high": 100.0 * hi}
  out["n"] = int(len(next(iter(per_user.values())))) if per_user else 0
  return out


def paired_difference(a, b, key, num_samples: int = 1000, clusters=None) -> dict:
  """Per-user paired difference a - b (same users, same order), in %.

  Returns mean, 95% bootstrap interval and ``p``: the two-sided bootstrap
  probability that the mean difference has the opposite sign (0.0 means no
  resample crossed zero).  clusters: optional (n,) id of each row.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"a and b must be equal (n,) arrays; got {a.shape}, {b.shape}")
  d = a - b
  means = _resampled_means(d, key, num_samples, clusters)
  p = 2.0 * min(np.mean(means <= 0.0), np.mean(means >= 0.0))
  return {"mean": 100.0 * float(d.mean()), "low": 100.0 * float(np.quantile(means, 0.025)),
          "high": 100.0 * float(np.quantile(means, 0.975)), "p": float(min(p, 1.0))}


def lift(method: dict, popularity: dict) -> dict:
  """{metric: relative lift in %} of summary means: 100 * (method / popularity - 1)."""
  out = {}
  for name, v in method.items():
    if isinstance(v, dict) and name in popularity and popularity[name]["mean"] > 0:
      out[name] = 100.0 * (v["mean"] / popularity[name]["mean"] - 1.0)
  return out


def average_over_seeds(per_user_by_seed: list) -> dict:
  """{metric: (n,)} per-user metrics averaged over seeds (same users each seed).

  Bootstrapping this average over users gives one interval that covers both
  the user sample and the seed variation's mean; the spread over seeds is
  reported separately by :func:`seed_spread`.
  """
  if not per_user_by_seed:
    raise ValueError("need at least one seed")
  names = per_user_by_seed[0].keys()
  return {n: np.mean([np.asarray(r[n], np.float64) for r in per_user_by_seed], axis=0)
          for n in names}


def seed_spread(per_user_by_seed: list) -> dict:
  """{metric: standard deviation over seeds of the per-seed mean, in %}."""
  names = per_user_by_seed[0].keys()
  return {n: 100.0 * float(np.std([np.mean(r[n]) for r in per_user_by_seed])) for n in names}


def draw_spread(per_draw_means: list) -> dict:
  """{metric: {"std", "min", "max", "per_draw"}} in % of per-draw mean metrics.

  per_draw_means: one {metric: (n_d,) per-user values} per role draw.
  """
  names = per_draw_means[0].keys()
  out = {}
  for n in names:
    m = np.array([100.0 * float(np.mean(d[n])) for d in per_draw_means])
    out[n] = {"std": float(m.std()), "min": float(m.min()), "max": float(m.max()),
              "per_draw": m.tolist()}
  return out


def chance(num_categories: int) -> dict:
  """{metric: %} expected under a uniformly random ranking of ``num_categories``.

  top-k = k / C; MRR = H_C / C; NDCG@5 = sum_{r<=5} 1 / (C log2(1 + r)).
  (The hit metrics depend on the target's support and are left out.)
  """
  c = int(num_categories)
  r = np.arange(1, c + 1)
  out = {f"top{k}": 100.0 * min(k, c) / c for k in KS}
  out["mrr"] = 100.0 * float(np.sum(1.0 / r) / c)
  out["ndcg5"] = 100.0 * float(np.sum(1.0 / np.log2(1.0 + r[:5])) / c)
  return out


def bucket_name(lo, hi) -> str:
  if hi is None:
    return f">{lo - 1}"
  return str(lo) if lo == hi else f"{lo}-{hi}"


def by_bucket(per_user: dict, history_length, buckets=BUCKETS) -> dict:
  """{bucket: {metric: mean %, "n": users}} by history length (empty buckets omitted)."""
  h = np.asarray(history_length)
  out = {}
  for lo, hi in buckets:
    sel = (h >= lo) & (h <= (np.inf if hi is None else hi))
    if sel.any():
      row = {name: 100.0 * float(np.mean(np.asarray(v)[sel])) for name, v in per_user.items()}
      row["n"] = int(sel.sum())
      out[bucket_name(lo, hi)] = row
  return out
