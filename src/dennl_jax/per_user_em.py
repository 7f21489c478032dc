"""Conventional EM: every user fitted on its own sequence, no sharing (Table 1's baseline).

As practitioners run it: several restarts per user -- ``kmeans_restarts``
k-means++ starts (:func:`dennl_jax.starts.user_start`) and
``random_restarts`` random ones (:func:`dennl_jax.starts.random_user_start`)
-- each run through :func:`dennl_jax.fit_em`; each user keeps the restart
with the highest final log-likelihood (its own data only: no labels, no
other users).  Users go through in chunks
(:func:`dennl_jax.chunking.chunked_map`) to bound memory.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from dennl_jax.chunking import chunked_map
from dennl_jax.em import fit_em
from dennl_jax.starts import random_user_start, user_start


# Restarts closer than this (relative, in units of the dtype's epsilon) tie.
# A user whose likelihood is flat in some parameter (one valid step: any
# initial distribution fits it) reaches the same optimum from every restart,
# and float rounding -- which changes with the padded length -- must not
# decide which one is kept.
TIE_EPS = 100


def best_restart(final):
  """Index of each user's kept restart: the first within rounding of the best.

  final: (B, R) log-likelihoods.  Returns (B,) int; NaN never wins (a row of
  NaN keeps restart 0).  Restarts within ``TIE_EPS`` epsilons (relative)
  of the row's maximum tie, and the earliest of them is kept, so the choice
  does not depend on rounding.
  """
  final = jnp.where(jnp.isnan(final), -jnp.inf, final)
  top = jnp.max(final, axis=1, keepdims=True)
  tol = TIE_EPS * jnp.finfo(final.dtype).eps * (1.0 + jnp.abs(top))
  return jnp.argmax(final >= top - tol, axis=1)


def best_of_restarts(starts, obs, mask, num_iters: int):
  """EM from every restart of every user; keeps each user's best (:func:`best_restart`).

  starts: batched model with leading axes (B, R); obs: (B, T, ...); mask: (B, T).
  Returns ``(params (leading B), trace (B, num_iters + 1) of the kept
  restart, final log-likelihoods (B, R))``; a NaN log-likelihood never wins.
  """
  size, restarts = mask.shape[0], jax.tree_util.tree_leaves(starts)[0].shape[1]
  flat = jax.tree_util.tree_map(lambda x: x.reshape((size * restarts,) + x.shape[2:]), starts)
  repeat = lambda x: jnp.repeat(x, restarts, axis=0)
  params, trace = fit_em(flat, repeat(obs), repeat(mask), num_iters)
  final = trace[:, -1].reshape(size, restarts)
  best = best_restart(final)
  pick = jnp.arange(size) * restarts + best
  return jax.tree_util.tree_map(lambda x: x[pick], params), trace[pick], final


def user_restarts(key, obs, mask, *, num_states: int, max_duration: int, min_covar: float,
                  kmeans_restarts: int = 1, random_restarts: int = 0):
  """One user's starts, stacked on a leading restart axis R (k-means++ first).

  With a single k-means++ restart the key is used as is (the historical
  one-start Conventional EM).
  """
  total = kmeans_restarts + random_restarts
  if kmeans_restarts < 0 or random_restarts < 0 or total < 1:
    raise ValueError(f"need at least one restart, got kmeans_restarts={kmeans_restarts}, "
                     f"random_restarts={random_restarts}")
  keys = [key] if total == 1 else list(jax.random.split(key, total))
  settings = dict(num_states=num_states, max_duration=max_duration, min_covar=min_covar)
  starts = ([user_start(k, obs, mask, **settings) for k in keys[:kmeans_restarts]]
            + [random_user_start(k, obs, mask, **settings) for k in keys[kmeans_restarts:]])
  return jax.tree_util.tree_map(lambda *x: jnp.stack(x), *starts)


@partial(jax.jit, static_argnames=("num_states", "max_duration", "min_covar", "num_iters",
                                   "kmeans_restarts", "random_restarts"))
def _fit_chunk(chunk, index, *, num_iters, **settings):
  del index
  keys, obs, mask = chunk
  starts = jax.vmap(lambda k, o, m: user_restarts(k, o, m, **settings))(keys, obs, mask)
  return best_of_restarts(starts, obs, mask, num_iters)


def conventional_em(key, obs, mask, *, num_states: int, max_duration: int, num_iters: int = 50,
                    min_covar: float = 1e-3, chunk_size: int = 256, kmeans_restarts: int = 1,
                    random_restarts: int = 0, return_restarts: bool = False,
                    workdir: str | None = None):
  """Per-user EM with no sharing, best of several restarts per user.

  Args:
    key: PRNG key (first: it draws every user's starts).
    obs: (U, T, O) real observations; mask: (U, T) bool.
    num_states, max_duration, min_covar: the HSMM (Poisson durations,
      full-covariance Gaussian emissions).
    num_iters: EM iterations per restart.
    chunk_size: users per compiled call.
    kmeans_restarts, random_restarts: starts per user of each kind
      (``1, 0``: one k-means++ start, the historical baseline).
    return_restarts: also return every restart's final log-likelihood.
    workdir: each finished chunk's results are kept there
      (:func:`dennl_jax.checkpoint.cached_chunks`), so a rerun after a kill
      fits only the unfinished chunks; other settings or data raise
      :class:`~dennl_jax.checkpoint.CheckpointError`.

  Returns:
    ``(fitted batched HSMM, log-likelihood trace (U, num_iters))``: the kept
    restart's log-likelihood before each iteration; with
    ``return_restarts``, a third entry ``(U, R)``: each restart's
    log-likelihood after the last iteration (the kept one is the largest).
  """
  obs = jnp.asarray(obs)
  mask = jnp.asarray(mask, bool)
  keys = jax.random.split(key, obs.shape[0])
  fit = partial(_fit_chunk, num_states=num_states, max_duration=max_duration,
                min_covar=float(min_covar), num_iters=num_iters,
                kmeans_restarts=kmeans_restarts, random_restarts=random_restarts)
  if workdir:
    from dennl_jax.checkpoint import cached_chunks
    fit = cached_chunks(fit, workdir, dict(
        fit="dennl_jax.conventional_em", num_states=num_states, max_duration=max_duration,
        num_iters=num_iters, min_covar=float(min_covar), chunk_size=chunk_size,
        kmeans_restarts=kmeans_restarts, random_restarts=random_restarts))
  fitted, trace, final = chunked_map(fit, (keys, obs, mask), chunk_size)
  if return_restarts:
    return fitted, trace[:, :num_iters], final
  return fitted, trace[:, :num_iters]
