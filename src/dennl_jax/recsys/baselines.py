"""Count-based practitioner baselines and GraphSAGE alone (numpy, host-side).

* ``popularity``: how often each category is the dominant one over the
  training steps of the training users (:func:`dominant_popularity`; the
  mean strength vector, :func:`popularity_vector`, is the prior that
  ``own_frequency`` shrinks to).
* ``last_step``: the user's most recent history step, repeated.
* ``own_frequency``: the user's mean history strength, shrunk towards
  popularity: ``(sum_t s_t + alpha * pop) / (h + alpha)``.
* ``markov``: first-order Markov chain over the dominant category of
  consecutive history steps of the training users, each row shrunk towards
  popularity: ``P[a] = (counts[a] + beta * pop) / (n_a + beta)``; a user is
  scored by the row of their last history step's dominant category (tied
  maxima share a step's count, and a tied last step averages its rows).
* ``graphsage``: the paper's GraphSAGE baseline as link prediction — the
  trained decoder's click probability summed over each category's items,
  ``sum_i w_ic sigmoid(s <z_u, z_i> + b)`` (``config``: ``item_embeddings``,
  ``item_categories``, ``link_scale``, ``link_bias`` from the same trained
  model).  No history is read.
* ``graphsage_dot``: a cruder variant — the user embedding dotted with each
  category embedding, a category's embedding being the category-weighted
  mean of its items' embeddings (``config["category_embeddings"]``).

Smoothing strengths (alpha, beta) are chosen on the validation targets by
mean reciprocal rank (``config["select_by"]``).  With idle steps (the
marketplace's "no action" days, ``config["idle_index"]``), ``last_step`` and
``markov`` skip them: a practitioner's chain runs over active days.  Every history method adds
``1e-9 * popularity`` so that ties fall to the more popular category.
"""
from __future__ import annotations

import numpy as np

from dennl_jax.recsys import metrics as rmetrics
from dennl_jax.recsys.registry import Predictor, register
from dennl_jax.recsys.task import TIE_TOLERANCE, NextStepTask, history_length

TIE_BREAK = 1e-9
DEFAULT_GRID = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 50.0)


def popularity_vector(task: NextStepTask) -> np.ndarray:
  """(C,) mean strength over the history steps of the training users."""
  sel = np.asarray(task.history_mask) & np.asarray(task.train_users)[:, None]
  if not sel.any():
    raise ValueError("no history steps of training users to estimate popularity from")
  pop = task.strengths[sel].mean(0).astype(np.float64)
  return pop / pop.sum()


def dominant_popularity(task: NextStepTask) -> np.ndarray:
  """(C,) how often each category is the dominant one over the training users' history steps.

  Tied maxima share a step's unit (as in the metrics): it ranks by what the
  primary target scores.  On MovieLens (whole blocks of 10 ratings, 5 role
  draws) it orders the top categories as the mean strength does (39.1 % top-1
  each, MRR 61.1 against 61.0 %); by session 35.4 % each, MRR 54.7 against
  54.5 % (``experiments/table2.py`` protocol, training users' training steps).
  """
  sel = np.asarray(task.history_mask) & np.asarray(task.train_users)[:, None]
  if not sel.any():
    raise ValueError("no history steps of training users to estimate popularity from")
  pop = dominant_fraction(task.strengths[sel]).mean(0)
  # categories that are never dominant still get a (smaller) mean-strength order
  return (pop + 1e-6 * popularity_vector(task)) / (1.0 + 1e-6)


def history_sum(task: NextStepTask) -> np.ndarray:
  """(U, C) sum of each user's history strength vectors."""
  return np.einsum("ut,utc->uc", task.history_mask.astype(np.float64), task.strengths)


def active_history(task: NextStepTask, idle_index=None) -> np.ndarray:
  """(U, T) history steps that are not pure idle steps (all mass on ``idle_index``)."""
  hist = np.asarray(task.history_mask)
  if idle_index is None:
    return hist
  return hist & (task.strengths[..., idle_index] < 1.0 - TIE_TOLERANCE)


def last_history_step(task: NextStepTask, idle_index=None) -> np.ndarray:
  """(U,) int index of each user's last (active) history step; -1 when there is none."""
  hist = active_history(task, idle_index)
  t = hist.shape[1]
  last = t - 1 - np.argmax(hist[:, ::-1], axis=1)
  return np.where(hist.any(1), last, -1)


def select_on_validation(grid, score_fn, val_task: NextStepTask, select_by: str = "mrr"):
  """(best value, {value: validation score}) for ``score_fn(value) -> (U, C)``."""
  results = {}
  for value in grid:
    results[float(value)] = float(np.mean(
        rmetrics.per_user_metrics(score_fn(value), val_task)[select_by]))
  best = max(results, key=lambda v: (results[v], -v))   # ties: the smaller value
  return best, results


def _config(config, name, default):
  return default if config is None or name not in config else config[name]


# --- popularity -------------------------------------------------------------

def fit_popularity(key, train_task, val_task, config=None):
  del key, val_task
  return {"popularity": dominant_popularity(train_task)}


def predict_popularity(fitted, task):
  return np.broadcast_to(fitted["popularity"], task.strengths.shape[::2]).copy()


# --- last step --------------------------------------------------------------

def _last_step_scores(popularity, task, idle_index=None):
  last = last_history_step(task, idle_index)
  scores = np.zeros(task.strengths.shape[::2])
  has = last >= 0
  scores[has] = task.strengths[np.flatnonzero(has), last[has]]
  return scores + TIE_BREAK * popularity


def fit_last_step(key, train_task, val_task, config=None):
  del key, val_task
  return {"popularity": popularity_vector(train_task), "idle_index": _config(config, "idle_index", None)}


def predict_last_step(fitted, task):
  return _last_step_scores(fitted["popularity"], task, fitted.get("idle_index"))


# --- own frequency ----------------------------------------------------------

def _frequency_scores(popularity, alpha, task):
  h = history_length(task)[:, None].astype(np.float64)
  return (history_sum(task) + alpha * popularity) / (h + alpha) + TIE_BREAK * popularity


def fit_own_frequency(key, train_task, val_task, config=None):
  del key
  pop = popularity_vector(train_task)
  alpha, scores = select_on_validation(
      _config(config, "grid", DEFAULT_GRID), lambda a: _frequency_scores(pop, a, val_task),
      val_task, _config(config, "select_by", "mrr"))
  return {"popularity": pop, "alpha": alpha, "validation": scores}


def predict_own_frequency(fitted, task):
  return _frequency_scores(fitted["popularity"], fitted["alpha"], task)


# --- first-order Markov -----------------------------------------------------

def dominant_fraction(strengths) -> np.ndarray:
  """(..., C): 1/n on each of the n categories tied for the maximal strength, 0 elsewhere."""
  x = np.asarray(strengths, np.float64)
  top = x >= x.max(-1, keepdims=True) - TIE_TOLERANCE
  return top / top.sum(-1, keepdims=True)


def transition_counts(task: NextStepTask, idle_index=None) -> np.ndarray:
  """(C, C) counts of dominant category a -> b over consecutive history steps of training users.

  A step whose maximum is tied spreads its unit count equally over the tied
  categories (the same convention as the metrics).  With ``idle_index``,
  pure idle steps are skipped: pairs are consecutive *active* steps.
  """
  active = active_history(task, idle_index) & np.asarray(task.train_users)[:, None]
  t = np.arange(active.shape[1])[None, :]
  # index of the previous active step of every step (-1: none)
  prev = np.maximum.accumulate(np.where(active, t, -1), axis=1)
  prev = np.concatenate([np.full((active.shape[0], 1), -1), prev[:, :-1]], axis=1)
  users, steps = np.nonzero(active & (prev >= 0))
  frac = dominant_fraction(task.strengths)
  return np.einsum("na,nb->ab", frac[users, prev[users, steps]], frac[users, steps])


def _markov_scores(popularity, counts, beta, task, idle_index=None):
  trans = (counts + beta * popularity[None, :]) / (counts.sum(1, keepdims=True) + beta)
  last = last_history_step(task, idle_index)
  has = last >= 0
  scores = np.broadcast_to(popularity, task.strengths.shape[::2]).copy()
  scores[has] = dominant_fraction(task.strengths[np.flatnonzero(has), last[has]]) @ trans
  return scores + TIE_BREAK * popularity


def fit_markov(key, train_task, val_task, config=None):
  del key
  pop = dominant_popularity(train_task)     # rows are dominant-category frequencies too
  idle = _config(config, "idle_index", None)
  counts = transition_counts(train_task, idle)
  beta, scores = select_on_validation(
      _config(config, "grid", DEFAULT_GRID),
      lambda b: _markov_scores(pop, counts, b, val_task, idle),
      val_task, _config(config, "select_by", "mrr"))
  return {"popularity": pop, "counts": counts, "beta": beta, "validation": scores,
          "idle_index": idle}


def predict_markov(fitted, task):
  return _markov_scores(fitted["popularity"], fitted["counts"], fitted["beta"], task,
                        fitted.get("idle_index"))


# --- GraphSAGE alone (dot product with category embeddings) -----------------

def category_embeddings(item_embeddings, item_categories) -> np.ndarray:
  """(C, d): each category's weighted mean of item embeddings.

  item_embeddings: (I, d); item_categories: (I, C) non-negative weights
  (the catalogue's split of each item over categories).
  """
  item_embeddings = np.asarray(item_embeddings, np.float64)
  w = np.asarray(item_categories, np.float64)
  if w.ndim != 2 or w.shape[0] != item_embeddings.shape[0]:
    raise ValueError(f"item_categories {w.shape} must be (I, C) with I = {item_embeddings.shape[0]}")
  mass = w.sum(0)
  return (w.T @ item_embeddings) / np.maximum(mass, 1e-12)[:, None]


def fit_graphsage_dot(key, train_task, val_task, config=None):
  del key, val_task
  if config is None or config.get("category_embeddings") is None:
    raise ValueError("graphsage_dot needs config['category_embeddings'] (C, d)")
  cat = np.asarray(config["category_embeddings"], np.float64)
  if cat.shape != (train_task.strengths.shape[2], train_task.embeddings.shape[1]):
    raise ValueError(f"category_embeddings must be (C, d) = "
                     f"{(train_task.strengths.shape[2], train_task.embeddings.shape[1])}; got {cat.shape}")
  return {"category_embeddings": cat, "popularity": popularity_vector(train_task)}


def predict_graphsage_dot(fitted, task):
  scores = np.asarray(task.embeddings, np.float64) @ fitted["category_embeddings"].T
  return scores + TIE_BREAK * fitted["popularity"]


# --- GraphSAGE alone (link prediction, the paper's baseline) ----------------

def link_category_scores(user_embeddings, item_embeddings, item_categories, scale, bias,
                         chunk_size: int = 1024) -> np.ndarray:
  """(U, C) expected category mass of a user's links: sum_i w_ic * sigmoid(s <z_u, z_i> + b).

  The trained GraphSAGE decoder gives P(user u clicks item i); summing it
  over each category's items (weighted by the item's category split) is
  the model's likelihood of the user interacting with the category.
  """
  z_items = np.asarray(item_embeddings, np.float64)
  w = np.asarray(item_categories, np.float64)
  if w.shape[0] != z_items.shape[0]:
    raise ValueError(f"item_categories has {w.shape[0]} rows for {z_items.shape[0]} items")
  users = np.asarray(user_embeddings, np.float64)
  out = np.empty((users.shape[0], w.shape[1]))
  for lo in range(0, users.shape[0], chunk_size):
    logits = scale * users[lo:lo + chunk_size] @ z_items.T + bias
    out[lo:lo + chunk_size] = (0.5 * (1.0 + np.tanh(0.5 * logits))) @ w
  return out


def fit_graphsage_link(key, train_task, val_task, config=None):
  del key, val_task
  need = ("item_embeddings", "item_categories", "link_scale", "link_bias")
  missing = [k for k in need if config is None or config.get(k) is None]
  if missing:
    raise ValueError(f"graphsage needs config entries {missing} (from the trained GraphSAGE model)")
  return {k: config[k] for k in need} | {"popularity": popularity_vector(train_task)}


def predict_graphsage_link(fitted, task):
  scores = link_category_scores(task.embeddings, fitted["item_embeddings"],
                                fitted["item_categories"], fitted["link_scale"],
                                fitted["link_bias"])
  return scores + TIE_BREAK * fitted["popularity"]


register("popularity", Predictor(fit_popularity, predict_popularity, False, False,
                                 "how often each category is dominant over training users' "
                                 "training steps"))
register("last_step", Predictor(fit_last_step, predict_last_step, False, True,
                                "repeat the last history step"))
register("own_frequency", Predictor(fit_own_frequency, predict_own_frequency, False, True,
                                    "user's mean history strength shrunk to popularity"))
register("markov", Predictor(fit_markov, predict_markov, False, True,
                             "first-order Markov chain over dominant categories"))
register("graphsage", Predictor(fit_graphsage_link, predict_graphsage_link, True, False,
                                "GraphSAGE link probabilities summed over each category's items"))
register("graphsage_dot", Predictor(fit_graphsage_dot, predict_graphsage_dot, True, False,
                                    "user embedding . category embedding (mean item embedding)"))
