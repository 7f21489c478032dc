"""Reverse mode through an E-step by the symmetry of the log-likelihood's Hessian.

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
(2.4x the time for a T = 400, K = 10, D = 20 HSMM, measured; BUILD_NOTES
"Stop 15").  The elementwise products and the M-step stay ordinary JAX, so
their derivatives are autodiff's.

The price: a ``jax.custom_vjp`` function has no forward mode (``jax.jvp`` of
it raises).  Hence it is an option (``em_step(..., score_vjp=True)``, used by
the exact EM layer), and the forward-gradient estimator and every other path
keep plain autodiff.
"""
from __future__ import annotations

import jax


def with_symmetric_vjp(score, num_diff: int):
  """``score(*args)`` with its VJP computed as a JVP.

  score: ``(*diff_args, *other) -> (log_likelihood, grads)``, where ``grads``
    is a tuple with ``grads[i] = d log_likelihood / d diff_args[i]`` (same
    shape) for each of the first ``num_diff`` arguments; the other arguments
    (masks) get no cotangent.  It must be the exact gradient of the returned
    log-likelihood as a function of every argument value, or the VJP is wrong.

  For a cotangent ``(c_ll, c)`` the VJP is ``c_ll * grads + H c``: the
  tangent output of ``jax.jvp(score)`` in the direction ``c``.  Only the
  arguments are kept between the forward and the backward pass.
  """

  @jax.custom_vjp
  def fn(*args):
    return score(*args)

  def fwd(*args):
    return score(*args), args

  def bwd(args, cotangent):
    cotangent_ll, cotangent_grads = cotangent
    diff_args, other = args[:num_diff], args[num_diff:]
    (_, grads), (_, hessian_c) = jax.jvp(lambda *p: score(*p, *other), diff_args,
                                         tuple(cotangent_grads))
    vjp = tuple(h + cotangent_ll * g for h, g in zip(hessian_c, grads))
    return vjp + (None,) * len(other)

  fn.defvjp(fwd, bwd)
  return fn
