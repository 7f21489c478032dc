"""Conventional EM: every user fitted on its own sequence, no sharing (Table 1's baseline).

Each user starts from its own k-means++ (:func:`dennl_jax.starts.user_start`)
and runs :func:`dennl_jax.fit_em`; users go through in chunks
(:func:`dennl_jax.batching.chunked_map`) to bound memory.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from dennl_jax.batching import chunked_map
from dennl_jax.em import fit_em
from dennl_jax.starts import user_start


@partial(jax.jit, static_argnames=("num_states", "max_duration", "min_covar", "num_iters"))
def _fit_chunk(chunk, index, *, num_states, max_duration, min_covar, num_iters):
  del index
  keys, obs, mask = chunk
  starts = jax.vmap(lambda k, o, m: user_start(
      k, o, m, num_states=num_states, max_duration=max_duration, min_covar=min_covar))(
          keys, obs, mask)
  return fit_em(starts, obs, mask, num_iters)


def conventional_em(key, obs, mask, *, num_states: int, max_duration: int, num_iters: int = 50,
                    min_covar: float = 1e-3, chunk_size: int = 256, workdir: str | None = None):
  """Per-user EM with no sharing: each user starts from its own k-means++.

  Args:
    key: PRNG key (first: it draws every user's k-means++ start).
    obs: (U, T, O) real observations; mask: (U, T) bool.
    num_states, max_duration, min_covar: the HSMM (Poisson durations,
      full-covariance Gaussian emissions).
    num_iters: EM iterations per user.
    chunk_size: users per compiled call.
    workdir: each finished chunk's results are kept there
      (:func:`dennl_jax.checkpoint.cached_chunks`), so a rerun after a kill
      fits only the unfinished chunks; other settings or data raise
      :class:`~dennl_jax.checkpoint.CheckpointError`.

  Returns:
    ``(fitted batched HSMM, log-likelihood trace (U, num_iters))``: the
    log-likelihood before each iteration.
  """
  obs = jnp.asarray(obs)
  mask = jnp.asarray(mask, bool)
  keys = jax.random.split(key, obs.shape[0])
  fit = partial(_fit_chunk, num_states=num_states, max_duration=max_duration,
                min_covar=float(min_covar), num_iters=num_iters)
  if workdir:
    from dennl_jax.checkpoint import cached_chunks
    fit = cached_chunks(fit, workdir, dict(
        fit="dennl_jax.conventional_em", num_states=num_states, max_duration=max_duration,
        num_iters=num_iters, min_covar=float(min_covar), chunk_size=chunk_size))
  fitted, trace = chunked_map(fit, (keys, obs, mask), chunk_size)
  return fitted, trace[:, :num_iters]
