"""The EM layer as a plain function, and conventional per-user EM.

``em_step`` is one Baum-Welch iteration (paper eq. 5-7, extended to every
emission family and to HSMMs): a pure JAX function of the parameters with no
Python control flow on values, so it can be wrapped as a network layer,
vmapped over users and differentiated.
"""
from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp

from dennl_jax import inference


def em_step(params, obs, mask):
  """One EM iteration on one sequence: returns the updated parameters.

  params: ``HMM`` or ``HSMM``; obs: (T, ...); mask: (T,) bool.
  """
  inference._validate_if_concrete(params, obs, mask)
  return params.em_update(obs, jnp.asarray(mask, bool))[0]


def em_step_with_log_likelihood(params, obs, mask):
  """``(em_step(params, ...), log_likelihood(params, ...))`` in one pass."""
  inference._validate_if_concrete(params, obs, mask)
  return params.em_update(obs, jnp.asarray(mask, bool))


@partial(jax.jit, static_argnames="num_iters")
def _fit_em_batch(params, obs, mask, num_iters):
  batched_step = jax.vmap(lambda p, o, m: p.em_update(o, m))

  def body(p, _):
    new, ll = batched_step(p, obs, mask)
    return new, ll

  fitted, trace = jax.lax.scan(body, params, None, length=num_iters)
  final_ll = jax.vmap(lambda p, o, m: p.log_likelihood(o, m))(fitted, obs, mask)
  return fitted, jnp.concatenate([trace, final_ll[None]], axis=0).T


def fit_em(params, obs, mask, num_iters: int):
  """Conventional EM for a batch of users, each with its own model.

  params: model pytree with a leading user axis U; obs: (U, T, ...);
  mask: (U, T) bool.  Returns ``(fitted_params, log_likelihoods)`` where
  ``log_likelihoods: (U, num_iters + 1)`` holds each user's log-likelihood
  under the initial parameters and after every iteration (non-decreasing up
  to float rounding).  Jitted and vmapped over users.
  """
  mask = jnp.asarray(mask, bool)
  chex.assert_rank(mask, 2)
  chex.assert_equal_shape_prefix([obs, mask], 2)
  if not isinstance(num_iters, int) or num_iters < 0:
    raise ValueError(f"num_iters must be a non-negative int, got {num_iters!r}")
  inference._validate_if_concrete(params, obs, mask)
  return _fit_em_batch(params, obs, mask, num_iters)
