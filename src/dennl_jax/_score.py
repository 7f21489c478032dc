"""Derivatives of the E-step and the log-likelihood through the score.

Every expected count an E-step returns is a derivative of the log-likelihood
``ll`` of the sequence: with linear-domain ``initial`` and ``transition`` and
log-domain duration and emission terms,

  initial_probs     = initial    * d ll / d initial
  transition_counts = transition * d ll / d transition
  duration_counts   =              d ll / d dur_log_probs
  smoothed_probs    =              d ll / d log_likes     (on valid steps)

so the E-step is, up to those elementwise products, the *score*
``g = grad ll``, which forward-backward computes exactly.  The Jacobian of
the score is the Hessian H of ``ll``, which is symmetric: the vector-Jacobian
product of the score with a cotangent c is ``H c``, its Jacobian-vector
product in the direction c.  :func:`with_symmetric_vjp` gives a score
function that custom VJP: one forward-mode pass through the two scans
(``jax.jvp``, no stored residuals) instead of reverse mode through them,
which stores every step's intermediates and runs the transposed recursions
(2.4x the time of the JVP for a T = 400, K = 10, D = 20 HSMM, measured;
BUILD_NOTES "The score VJP and the EM layer").  The elementwise products and the M-step stay
ordinary JAX, so their derivatives are autodiff's.

The log-likelihood itself (:func:`with_score_jvp`) needs no such trade: its
JVP is the inner product of the score with the tangents, a linear map whose
transpose is a product, so reverse mode through it costs one forward-backward
pass in the primal computation and no reverse scan, and forward mode and
higher derivatives keep working.

The price of the symmetric VJP: a ``jax.custom_vjp`` function has no forward
mode (``jax.jvp`` of it raises).  Hence it is an option (``em_step(...,
score_vjp=True)``, used by the exact EM layer), and the forward-gradient
estimator and every other path keep plain autodiff.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def with_symmetric_vjp(score, num_diff: int, jvp=None):
  """``score(*args)`` with its VJP computed as a JVP.

  score: ``(*diff_args, *other) -> (log_likelihood, grads)``, where ``grads``
    is a tuple with ``grads[i] = d log_likelihood / d diff_args[i]`` (same
    shape) for each of the first ``num_diff`` arguments; the other arguments
    (masks) get no cotangent.  It must be the exact gradient of the returned
    log-likelihood as a function of every argument value, or the VJP is wrong.

  For a cotangent ``(c_ll, c)`` the VJP is ``c_ll * grads + H c``: the
  tangent output of ``jax.jvp(score)`` in the direction ``c``.  Only the
  arguments are kept between the forward and the backward pass.

  jvp: ``(primals, tangents, *other) -> jax.jvp`` of ``score`` in its first
  ``num_diff`` arguments (default ``jax.jvp``); the users-minor kernels pass
  their own (never transposed: it runs inside the backward pass).
  """
  if jvp is None:
    jvp = lambda primals, tangents, *other: jax.jvp(  # noqa: E731
        lambda *p: score(*p, *other), primals, tangents)

  @jax.custom_vjp
  def fn(*args):
    return score(*args)

  def fwd(*args):
    return score(*args), args

  def bwd(args, cotangent):
    cotangent_ll, cotangent_grads = cotangent
    diff_args, other = args[:num_diff], args[num_diff:]
    (_, grads), (_, hessian_c) = jvp(tuple(diff_args), tuple(cotangent_grads), *other)
    vjp = tuple(h + cotangent_ll * g for h, g in zip(hessian_c, grads))
    return vjp + (None,) * len(other)

  fn.defvjp(fwd, bwd)
  return fn


def with_score_jvp(log_likelihood, score, num_diff: int):
  """``log_likelihood(*args)`` whose JVP is ``sum_i <grads[i], tangents[i]>``.

  log_likelihood: ``(*diff_args, *other) -> ()``, the value (a forward filter).
  score: as for :func:`with_symmetric_vjp`, the same log-likelihood and its
    exact gradient in the first ``num_diff`` arguments.

  Values run ``log_likelihood`` alone; differentiated, the primal pass runs
  ``score`` (forward and backward recursions) and the tangent map is a sum of
  products, so reverse mode stores the gradient instead of every step of the
  filter and runs no transposed scan.  ``score`` is differentiable, so
  Hessians work.
  """

  @jax.custom_jvp
  def fn(*args):
    return log_likelihood(*args)

  @fn.defjvp
  def fn_jvp(primals, tangents):
    value, grads = score(*primals)
    tangent = sum(jnp.sum(g * t) for g, t in zip(grads, tangents[:num_diff]))
    return value, tangent

  return fn


def score_functions(filter_dispatch, score_dispatch, num_diff: int, kernels):
  """``(symmetric-VJP score, log-likelihood differentiated through the score)`` of a
  model family's dispatched filter and score (``dennl_jax._dispatch.Dispatch``)
  for one static kernel choice; models cache it per choice."""
  score = functools.partial(score_dispatch, kernels)
  symmetric = with_symmetric_vjp(score, num_diff, jvp=functools.partial(score_dispatch.jvp,
                                                                          kernels))
  log_likelihood = with_score_jvp(lambda *args: filter_dispatch(kernels, *args)[0], score,
                                  num_diff)
  return symmetric, log_likelihood
