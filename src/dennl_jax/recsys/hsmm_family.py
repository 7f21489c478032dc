"""Multinomial-emission / Poisson-duration HSMMs for next-step prediction (Table 2).

The pieces every HSMM predictor of :mod:`dennl_jax.recsys.hsmm_predictors`
shares: building the family, its starts (per-user restarts and the pooled
start -- the counterparts of :mod:`dennl_jax.starts`' Gaussian ones), the
emission floor, the next-step forecast, the predictive loss, and the idle
("no action") category of the marketplace.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import dennl_jax as dj
from dennl_jax import training as Tr
from dennl_jax.recsys.task import NextStepTask
from dennl_jax.starts import kmeans


def multinomial_hsmm(initial, transition, probs, rate, max_duration: int) -> dj.HSMM:
  """HSMM with Multinomial emissions ``probs: (K, C)`` and Poisson durations ``rate: (K,)``."""
  return dj.HSMM(initial, transition, dj.PoissonDuration(rate, max_duration=max_duration),
                 dj.Multinomial(probs))


def _generic_start(probs, rate: float, max_duration: int) -> dj.HSMM:
  """Uniform initial and off-diagonal transitions, a moderate Poisson rate."""
  k = probs.shape[0]
  off = (1.0 - jnp.eye(k, dtype=probs.dtype)) / (k - 1)
  return multinomial_hsmm(jnp.full((k,), 1.0 / k, probs.dtype), off, probs,
                          jnp.full((k,), rate, probs.dtype), max_duration)


def _smooth(probs, amount: float):
  """Rows of ``probs`` mixed with ``amount`` of the uniform distribution."""
  probs = probs / jnp.maximum(jnp.sum(probs, -1, keepdims=True), 1e-30)
  return (1.0 - amount) * probs + amount / probs.shape[-1]


def kmeans_emission(key, strengths, mask, num_states: int, *, num_iters: int = 10,
                    smoothing: float = 0.05):
  """(K, C) emission table: k-means++ centres of the valid strength vectors, normalised.

  strengths: (N, C); mask: (N,) bool.  A centre is a mean of strength
  vectors; mixing it with ``smoothing`` of the uniform distribution keeps
  every category reachable (EM never revives an exact zero).
  """
  centers, _ = kmeans(key, strengths, mask, num_states, num_iters)
  return _smooth(jnp.maximum(centers, 0.0), smoothing)


def user_starts(key, strengths, mask, *, num_states: int, max_duration: int,
                duration_rate: float = 2.0, kmeans_restarts: int = 2, dirichlet_restarts: int = 2,
                dirichlet_concentration: float = 1.0, kmeans_iters: int = 10,
                smoothing: float = 0.05) -> dj.HSMM:
  """Conventional EM's restarts for one user: an HSMM batch with leading axis R.

  strengths: (T, C); mask: (T,) bool.  The first ``kmeans_restarts`` come
  from k-means++ on the user's own valid strength vectors (different seeds),
  the other ``dirichlet_restarts`` draw every emission row from
  Dirichlet(concentration).  Transitions/initial/durations as in
  :func:`pooled_start`.
  """
  if kmeans_restarts + dirichlet_restarts < 1:
    raise ValueError("conventional EM needs at least one restart")
  num_categories = strengths.shape[-1]
  keys = jax.random.split(key, kmeans_restarts + dirichlet_restarts)
  tables = [kmeans_emission(k, strengths, mask, num_states, num_iters=kmeans_iters,
                            smoothing=smoothing) for k in keys[:kmeans_restarts]]
  alpha = jnp.full((num_categories,), dirichlet_concentration, strengths.dtype)
  tables += [_smooth(jax.random.dirichlet(k, alpha, (num_states,)), smoothing)
             for k in keys[kmeans_restarts:]]
  starts = [_generic_start(t.astype(strengths.dtype), duration_rate, max_duration)
            for t in tables]
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *starts)


def pooled_start(key, strengths, mask, *, num_states: int, max_duration: int,
                 duration_rate: float = 2.0, smoothing: float = 0.05, max_points: int = 20000,
                 kmeans_iters: int = 25) -> dj.HSMM:
  """One shared Multinomial/Poisson HSMM from all training users' steps pooled.

  strengths: (U, T, C); mask: (U, T) bool.  Emissions: k-means++ on (a
  random subset of at most ``max_points``) pooled valid strength vectors,
  centres normalised and smoothed; uniform initial distribution and
  off-diagonal transitions; Poisson rate ``duration_rate`` (mean stay
  ``1 + rate`` steps).  The family-appropriate counterpart of
  :func:`dennl_jax.models.pooled_start` (Gaussian means).
  """
  points = np.asarray(strengths, np.float32)[np.asarray(mask, bool)]
  if points.shape[0] == 0:
    raise ValueError("pooled_start needs at least one valid step")
  key_sub, key_km = jax.random.split(key)
  if points.shape[0] > max_points:
    points = points[np.asarray(jax.random.choice(key_sub, points.shape[0], (max_points,),
                                                 replace=False))]
  probs = jax.jit(kmeans_emission, static_argnums=3, static_argnames="num_iters")(
      key_km, jnp.asarray(points), jnp.ones(points.shape[0], bool), num_states,
      num_iters=kmeans_iters, smoothing=smoothing)
  return _generic_start(probs, duration_rate, max_duration)


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


def predictive_loss(model, batch: Tr.Batch, key, num_targets: int = 1, floor: float = 1e-6,
                    idle_index: int | None = None):
  """Soft cross-entropy of each user's last ``num_targets`` active steps under their forecasts.

  Active steps are valid steps not on the idle ("no action") category
  ``idle_index`` (all valid steps when None) -- the evaluation's targets.
  The model sees the valid steps before the first hidden one; hidden step j
  is forecast from every valid step before it, and its forecast is
  renormalised over the active categories.  Users with at most
  ``num_targets`` active steps, or nothing before them, score nothing.
  Mean over hidden steps of ``-sum_c s_c log(p_c + floor)``.
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
  for t_j in at:
    hidden = position == t_j[:, None]
    target = jnp.einsum("ut,utc->uc", hidden.astype(obs.dtype), obs) * weights
    probs = next_step_distribution(params, obs, keep_one(mask & (position < t_j[:, None])))
    probs = probs * weights / jnp.sum(probs * weights, axis=-1, keepdims=True)
    ce = -jnp.sum(target * jnp.log(probs + floor), axis=-1)
    has = jnp.any(hidden, axis=1) & has_visible
    total = total + jnp.sum(jnp.where(has, ce, 0.0))
    count = count + jnp.sum(has)
  return total / jnp.maximum(count, 1.0)


def idle_index(task: NextStepTask, config=None):
  """Index of the idle ("no action") category: ``config["idle_index"]``, else by name."""
  if config and config.get("idle_index") is not None:
    return int(config["idle_index"])
  from dennl_jax.data.marketplace import IDLE_CATEGORY
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


def map_users(fn, batched, chunk_size: int):
  """:func:`dennl_jax.chunked_map` with the batch first padded to a power of two.

  Tasks evaluate varying subsets of users; padding to one of a few sizes
  bounds the number of compiled shapes.  ``fn(chunk, index)`` as there;
  numpy in, numpy out (leading axis = the number of users given).
  """
  num = jax.tree_util.tree_leaves(batched)[0].shape[0]
  size = _bucket(num, chunk_size)
  pad = lambda x: np.concatenate([x, np.repeat(x[:1], size - num, 0)]) if num < size else x
  out = dj.chunked_map(fn, jax.tree_util.tree_map(lambda x: jnp.asarray(pad(np.asarray(x))),
                                                  batched), size)
  return jax.tree_util.tree_map(lambda x: np.asarray(x)[:num], out)


