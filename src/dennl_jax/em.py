"""One EM iteration as a plain function, and conventional per-user EM.

``em_step`` is one Baum-Welch iteration (paper eq. 5-7, extended to every
emission family and to HSMMs): a pure JAX function of the parameters with no
Python control flow on values, so it can be wrapped as a network layer
(:func:`dennl_jax.em_layer`), vmapped over users and differentiated.  Each
model implements it as the method ``params.em_step(obs, mask) -> (new_params,
log_likelihood_before)``.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Real

from dennl_jax import _checks, inference
from dennl_jax.time_parallel import em_step as time_parallel_em_step


def em_step(params, obs: Real[Array, "num_timesteps ..."], mask: Bool[Array, "num_timesteps"], *,
            time_parallel: bool = False, score_vjp: bool = False):
  """One EM iteration on one sequence.

  Args:
    params: ``HMM`` or ``HSMM`` for one sequence (no user axis), K states.
    obs: (T, ...) observations (the emission family's shape; anything on
      masked steps).
    mask: (T,) bool, True on valid steps (at least one).
    time_parallel: HMMs only: smooth with associative scans over time
      (:mod:`dennl_jax.time_parallel`; same result, O(log T) depth) instead of
      the sequential scan.  For long sequences on wide devices.
    score_vjp: reverse mode (``jax.grad``, ``jax.vjp``) through the E-step as
      one forward-mode pass, by the symmetry of the log-likelihood's Hessian
      (:mod:`dennl_jax._score`): same values and gradients, reverse mode
      1.4-2.2x faster through a T = 400 HSMM (docs/performance.md).  Forward mode (``jax.jvp``,
      ``jax.jacfwd``) is then unavailable.  Used by ``em_layer(gradient="exact")``.

  Returns:
    The updated parameters, same pytree type and shapes as ``params``.

  Example::

    new = dj.em_step(hmm, obs, mask)
    batched = jax.vmap(dj.em_step)(hmms, obs_batch, mask_batch)   # (U, ...) leaves
  """
  inference.validate_if_concrete(params, obs, mask)
  if time_parallel and score_vjp:
    raise ValueError("time_parallel and score_vjp cannot be combined")
  if time_parallel:
    return time_parallel_em_step(params, obs, mask)[0]
  try:
    return params.em_step(obs, jnp.asarray(mask, bool), score_vjp=score_vjp)[0]
  except TypeError as err:
    raise _checks.reverse_mode_only(err, "em_step(..., score_vjp=True)",
                                    "em_step(..., score_vjp=False)") from err


def em_step_with_log_likelihood(params, obs: Real[Array, "num_timesteps ..."],
                                mask: Bool[Array, "num_timesteps"]
                                ) -> tuple[Any, Float[Array, ""]]:
  """``(em_step(params, obs, mask), log_likelihood(params, obs, mask))`` in one pass.

  The log-likelihood () is the one *before* the update (a by-product of the E-step).
  """
  inference.validate_if_concrete(params, obs, mask)
  return params.em_step(obs, jnp.asarray(mask, bool))


@partial(jax.jit, static_argnames="num_iters")
def _fit_em_batch(params, obs, mask, num_iters):
  batched_step = jax.vmap(lambda p, o, m: p.em_step(o, m))

  def body(p, _):
    new, ll = batched_step(p, obs, mask)
    return new, ll

  fitted, trace = jax.lax.scan(body, params, None, length=num_iters)
  final_ll = jax.vmap(lambda p, o, m: p.log_likelihood(o, m))(fitted, obs, mask)
  return fitted, jnp.concatenate([trace, final_ll[None]], axis=0).T


def fit_em(params, obs: Real[Array, "num_users num_timesteps ..."],
           mask: Bool[Array, "num_users num_timesteps"],
           num_iters: int) -> tuple[Any, Float[Array, "num_users num_iters_plus_1"]]:
  """Conventional EM for a batch of users, each with its own model.

  Args:
    params: model pytree with a leading user axis U (one start per user).
    obs: (U, T, ...) observations.
    mask: (U, T) bool.
    num_iters: number of EM iterations (a non-negative Python int).

  Returns:
    ``(fitted_params, log_likelihoods)``: the fitted models (leading axis U)
    and ``log_likelihoods: (U, num_iters + 1)``, each user's log-likelihood
    under the initial parameters and after every iteration (non-decreasing
    up to float rounding).  Jitted and vmapped over users.

  Example::

    starts = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (U,) + x.shape), hmm)
    fitted, trace = dj.fit_em(starts, obs, mask, num_iters=20)
  """
  if np.ndim(mask) != 2:
    raise ValueError(f"mask must have shape (U, T) (a batch of users), got {np.shape(mask)}")
  if np.shape(obs)[:2] != np.shape(mask):
    raise ValueError(f"obs has shape {np.shape(obs)}; its leading axes must be the mask's "
                     f"(U, T) = {np.shape(mask)}")
  if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 0:
    raise ValueError(f"num_iters must be a non-negative int, got {num_iters!r}")
  inference.validate_if_concrete(params, obs, mask)
  mask = jnp.asarray(mask, bool)
  return _fit_em_batch(params, obs, mask, num_iters)
