"""Multinomial-emission / Poisson-duration HSMMs for next-step prediction (Table 2).

The pieces every HSMM predictor of :mod:`dennl_jax.recsys.hsmm_predictors`
shares: building the family, Conventional EM's per-user restarts (from
:mod:`dennl_jax.starts` with ``family=Multinomial``; the networks' pooled
start is :func:`dennl_jax.starts.pooled_start` too), the emission floor,
the next-step forecast, the predictive loss, the idle ("no action") category
of the marketplace, and :func:`map_users` (chunks of users, cut to their
length).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import dennl_jax as dj
from dennl_jax import starts as dj_starts
from dennl_jax import training as Tr
from dennl_jax.recsys.task import NextStepTask


def multinomial_hsmm(initial, transition, probs, rate, max_duration: int) -> dj.HSMM:
  """HSMM with Multinomial emissions ``probs: (K, C)`` and Poisson durations ``rate: (K,)``."""
  return dj.HSMM(initial, transition, dj.PoissonDuration(rate, max_duration=max_duration),
                 dj.Multinomial(probs))


def user_starts(key, strengths, mask, *, num_states: int, max_duration: int,
                duration_rate: float = 2.0, kmeans_restarts: int = 2, dirichlet_restarts: int = 2,
                dirichlet_concentration: float = 1.0, kmeans_iters: int = 10,
                smoothing: float = 0.05) -> dj.HSMM:
  """Conventional EM's restarts for one user: an HSMM batch with leading axis R.

  strengths: (T, C); mask: (T,) bool.  The first ``kmeans_restarts`` are
  :func:`dennl_jax.starts.user_start` (k-means++ on the user's own valid
  strength vectors, different seeds), the other ``dirichlet_restarts``
  :func:`dennl_jax.starts.random_start` (every emission row from
  Dirichlet(concentration)); Multinomial emissions smoothed by
  ``smoothing``, Poisson(``duration_rate``) durations.
  """
  if kmeans_restarts + dirichlet_restarts < 1:
    raise ValueError("conventional EM needs at least one restart")
  keys = jax.random.split(key, kmeans_restarts + dirichlet_restarts)
  common = dict(num_states=num_states, max_duration=max_duration, duration_rate=duration_rate,
                family=dj.Multinomial, smoothing=smoothing)
  starts = [dj_starts.user_start(k, strengths, mask, kmeans_iters=kmeans_iters, **common)
            for k in keys[:kmeans_restarts]]
  starts += [dj_starts.random_start(k, strengths, mask, concentration=dirichlet_concentration,
                                    **common) for k in keys[kmeans_restarts:]]
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *starts)


def floor_emission(params: dj.HSMM, floor: float) -> dj.HSMM:
  """Emission rows mixed with ``floor`` of the uniform distribution (any batch shape)."""
  return params.replace(emission=params.emission.replace(
      probs=(1.0 - floor) * params.emission.probs + floor / params.emission.probs.shape[-1]))


# --------------------------------------------------------------------------
# Forecasts and the predictive loss.


def next_step_distribution(params, obs, mask):
  """(U, C) forecast category distribution of the step after each user's last valid step.

  params: batched HSMM (leading U); obs: (U, T, C); mask: (U, T) bool.
  """
  one = lambda p, o, m: dj.forecast(p, o, m, 1).observation_mean[0]
  return jax.vmap(one)(params, obs, mask)


def first_step_distribution(params):
  """(U, C) category distribution of the first step: ``initial @ emission means``.

  params: batched HSMM (leading U).  The forecast of a user with no history,
  e.g. ``lambda_0 = g(e)`` of a cold user.
  """
  means = jax.vmap(lambda e: e.observation_mean())(params.emission)
  return jnp.einsum("uk,ukc->uc", params.initial, means)


def predictive_loss(model, batch: Tr.Batch, key, num_targets: int = 1, floor: float = 1e-6,
                    idle_index: int | None = None, cold_weight: float = 0.0):
  """Soft cross-entropy of each user's last ``num_targets`` active steps under their forecasts.

  Active steps are valid steps not on the idle ("no action") category
  ``idle_index`` (all valid steps when None) -- the evaluation's targets.
  The model sees the valid steps before the first hidden one; hidden step j
  is forecast from every valid step before it, and its forecast is
  renormalised over the active categories.  Users with at most
  ``num_targets`` active steps, or nothing before them, score nothing.
  Mean over hidden steps of ``-sum_c s_c log(p_c + floor)``.

  ``cold_weight > 0`` adds ``cold_weight`` times the same mean with every
  hidden step forecast from no history at all -- the first-step
  distribution of ``model.start_params(embedding)`` (``lambda_0 = g(e)``).
  It asks the start the cold-user question (h = 0), which nothing else
  trains it for; users with no step before their targets count here.
  """
  mask = jnp.asarray(batch.mask, bool)
  obs = batch.obs
  active = mask if idle_index is None else mask & (obs[..., idle_index] < 0.5)
  weights = jnp.ones(obs.shape[-1], obs.dtype)
  if idle_index is not None:
    weights = weights.at[idle_index].set(0.0)
  from_end = jnp.cumsum(active[:, ::-1], axis=1)[:, ::-1] * active   # 1 = last active step
  position = jnp.arange(mask.shape[1])[None, :]
  # index of hidden step j (counted from the end): (U, J), T where a user has none
  at = [jnp.min(jnp.where(from_end == j, position, mask.shape[1]), axis=1)
        for j in range(1, num_targets + 1)]
  # A user with fewer than num_targets active steps hides nothing (and sees all).
  enough = at[-1] < mask.shape[1]
  visible = mask & (position < at[-1][:, None])
  has_visible = jnp.any(visible, axis=1) & enough

  def keep_one(m):
    # EM layers and forecasts need a valid step; a user left with none sees
    # its whole history instead and scores no target (``has`` below), so no
    # NaN from an empty sequence can reach the gradient through a `where`.
    return jnp.where(jnp.any(m, axis=1, keepdims=True), m, mask)

  params = model(batch.embedding, obs, keep_one(visible), key)
  total, count = 0.0, 0.0
  cold_total, cold_count = 0.0, 0.0
  if cold_weight:
    cold = first_step_distribution(model.start_params(batch.embedding))
    cold = cold * weights / jnp.sum(cold * weights, axis=-1, keepdims=True)
  for t_j in at:
    hidden = position == t_j[:, None]
    target = jnp.einsum("ut,utc->uc", hidden.astype(obs.dtype), obs) * weights
    probs = next_step_distribution(params, obs, keep_one(mask & (position < t_j[:, None])))
    probs = probs * weights / jnp.sum(probs * weights, axis=-1, keepdims=True)
    ce = -jnp.sum(target * jnp.log(probs + floor), axis=-1)
    has = jnp.any(hidden, axis=1) & has_visible
    total = total + jnp.sum(jnp.where(has, ce, 0.0))
    count = count + jnp.sum(has)
    if cold_weight:
      has_target = jnp.any(hidden, axis=1) & enough
      cold_ce = -jnp.sum(target * jnp.log(cold + floor), axis=-1)
      cold_total = cold_total + jnp.sum(jnp.where(has_target, cold_ce, 0.0))
      cold_count = cold_count + jnp.sum(has_target)
  loss = total / jnp.maximum(count, 1.0)
  if cold_weight:
    loss = loss + cold_weight * cold_total / jnp.maximum(cold_count, 1.0)
  return loss


def idle_index(task: NextStepTask, config=None):
  """Index of the idle ("no action") category: ``config["idle_index"]``, else by name."""
  if config and config.get("idle_index") is not None:
    return int(config["idle_index"])
  from dennl_jax.recsys.marketplace import IDLE_CATEGORY
  names = list(task.category_names)
  return names.index(IDLE_CATEGORY) if IDLE_CATEGORY in names else None


def rank_active(scores, idle):
  """Scores with the idle category ranked last (targets are active steps)."""
  if idle is None:
    return scores
  scores = np.array(scores, np.float64)
  scores[:, idle] = scores.min() - 1.0
  return scores


def history_inputs(task: NextStepTask):
  """(obs (U, T, C) with non-history steps zeroed, history mask (U, T))."""
  hist = np.asarray(task.history_mask, bool)
  return np.where(hist[..., None], task.strengths, 0.0).astype(np.float32), hist


def _bucket(num_users: int, chunk_size: int) -> int:
  """Batch size for ``num_users``: the next power of two, at most ``chunk_size``."""
  return min(chunk_size, 1 << max(num_users - 1, 0).bit_length())


# Time-axis lengths tried before the full one (see map_users).  MovieLens pads
# every user to 200 steps while the median user has 8; (16, 64) cut compiled
# conventional EM 3.6x (measured, Table 2 on MovieLens).  Cutting trailing padding
# changes float rounding only; restarts that tie up to rounding are resolved
# by order (dennl_jax.per_user_em.best_restart), so the fits are the same.
LENGTH_LEVELS = (16, 64)


def _map_padded(fn, batched, chunk_size: int):
  num = jax.tree_util.tree_leaves(batched)[0].shape[0]
  size = _bucket(num, chunk_size)
  pad = lambda x: np.concatenate([x, np.repeat(x[:1], size - num, 0)]) if num < size else x
  out = dj.chunked_map(fn, jax.tree_util.tree_map(lambda x: jnp.asarray(pad(np.asarray(x))),
                                                  batched), size)
  return jax.tree_util.tree_map(lambda x: np.asarray(x)[:num], out)


def map_users(fn, batched, chunk_size: int, by_length: bool = False):
  """:func:`dennl_jax.chunked_map` with the batch first padded to a power of two.

  Tasks evaluate varying subsets of users; padding to one of a few sizes
  bounds the number of compiled shapes.  ``fn(chunk, index)`` as there;
  numpy in, numpy out (leading axis = the number of users given).

  ``by_length``: ``batched = (*per_user, obs (U, T, ...), mask (U, T))``.
  Users are grouped by the first of ``LENGTH_LEVELS`` (then T) that holds
  their last valid step, and each group runs on ``obs[:, :level]``,
  ``mask[:, :level]``: only trailing padding is cut, so results equal the
  full-length run's (up to float rounding), provided ``fn``'s outputs have
  no time axis and ``fn`` treats users independently.
  """
  if not by_length:
    return _map_padded(fn, batched, chunk_size)
  *per_user, obs, mask = batched
  obs, mask = np.asarray(obs), np.asarray(mask, bool)
  num, num_steps = mask.shape
  length = np.where(mask.any(1), num_steps - np.argmax(mask[:, ::-1], axis=1), 0)
  levels = [t for t in LENGTH_LEVELS if t < num_steps] + [num_steps]
  level = np.searchsorted(levels, length)
  out = None
  for j, steps in enumerate(levels):
    rows = np.flatnonzero(level == j)
    if rows.size == 0:
      continue
    # One chunk shape per level whatever the number of users (tasks, cold
    # users and seeds share the compiled programs); about chunk_size x
    # levels[0] user-steps per chunk.
    size = max(1, 1 << ((chunk_size * levels[0] // steps).bit_length() - 1)) if j else chunk_size
    part = tuple(jax.tree_util.tree_map(lambda x: np.asarray(x)[rows], x) for x in per_user)
    part = part + (obs[rows, :steps], mask[rows, :steps])
    if rows.size < size:
      part = jax.tree_util.tree_map(
          lambda x: np.concatenate([x, np.repeat(x[:1], size - rows.size, 0)]), part)
    res = jax.tree_util.tree_map(lambda x: np.asarray(x)[:rows.size],
                                 dj.chunked_map(fn, jax.tree_util.tree_map(jnp.asarray, part),
                                                size))
    if out is None:
      out = jax.tree_util.tree_map(lambda r: np.zeros((num,) + r.shape[1:], r.dtype), res)
    for o, r in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(res)):
      o[rows] = r
  return out
