"""Users-minor batched chain recursions, reached from ``jax.vmap`` of the per-sequence API.

They are reached through :mod:`dennl_jax._dispatch`, which decides when
``jax.vmap`` runs them.

Why.  ``jax.vmap`` of a per-sequence scan puts the user axis first: every
step of the recursion is a batch of tiny K x K mat-vecs with K minor, which
XLA:CPU runs as many small kernels.  With the user axis *minor* -- carry
``(K, U)``, transition ``(K, K, U)`` -- the K-sum of a mat-vec is K fused
multiply-adds over ``(K, U)`` rows that vectorise over users; written as
``jnp.sum(..., axis=0)`` instead, XLA:CPU's reduction over a non-minor axis
is an order of magnitude slower, hence :func:`mix` and :func:`sum_rows`.
Expected counts are accumulated inside the backward scan (a reduction over T
of ``(T, K, U)`` arrays afterwards costs more than both scans together).
The HSMM kernels (:mod:`dennl_jax._kernel_hsmm`) carry the joint over
(remaining duration, state) as ``(D, K, U)``: the countdown is a slice of
whole ``(K, U)`` slabs and the D-sums are ones-vector products.  They keep
no joint per step: the smoothed marginals come from segment starts and ends.

Every batched function takes and returns arrays with a leading user axis U
(the layout ``jax.vmap`` uses) and transposes internally.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dennl_jax import _numerics
from dennl_jax._numerics import clamp_finite, filled_like

# --------------------------------------------------------------------------
# Users-minor helpers
# --------------------------------------------------------------------------


def mix(weights, matrix):
  """``sum_i weights[i] * matrix[i]``: weights (K, U), matrix (K, N, U) -> (N, U)."""
  out = weights[0][None] * matrix[0]
  for i in range(1, weights.shape[0]):
    out = out + weights[i][None] * matrix[i]
  return out


def sum_rows(x):
  """``sum_i x[i]`` over the leading axis of (K, U), as K - 1 adds."""
  out = x[0]
  for i in range(1, x.shape[0]):
    out = out + x[i]
  return out


def users_minor(x):
  """(U, ...) -> (..., U), as one rank-2 transpose (U, rest) -> (rest, U).

  XLA:CPU runs the rank-2 transpose about 3x faster than the equivalent rank-3
  permutation (0.8 vs 2.2 ms for (2000, 100, 10) float32, measured).
  """
  return x.reshape(x.shape[0], -1).T.reshape(x.shape[1:] + x.shape[:1])


def users_first(x):
  """(..., U) -> (U, ...), the inverse of :func:`users_minor`."""
  return x.reshape(-1, x.shape[-1]).T.reshape(x.shape[-1:] + x.shape[:-1])


def chain_inputs(log_likes, mask):
  """Log-likelihoods time-major with users minor.

  log_likes: (U, T, K), mask: (U, T) -> log_likes (T, K, U), mask (T, U).
  The emission factors are exponentiated inside the forward scan
  (:func:`step_scaling`): the shift of each step is the best log-likelihood
  over the states with positive predicted mass, which only the forward step
  knows (see :mod:`dennl_jax.hmm`, "Numerics").
  """
  return users_minor(log_likes), mask.T


def step_scaling(reachable, log_likes_t):
  """:func:`dennl_jax._numerics.step_scaling` on (K, U).

  The K-maximum is one reduce (``jnp.max(axis=0)``), not K - 1 unrolled maxima
  as :func:`sum_rows` does for sums: XLA fused the unrolled chain (which reads
  the prediction) into every consumer of the factors, K times the work -- the
  forward pass was 6.5 ms instead of 0.9 (U = 256, T = 100, K = 10, measured).
  """
  return _numerics.step_scaling(reachable, log_likes_t)


def _hmm_forward(initial, trans, log_likes, mask):
  """Scaled forward pass (hmm._forward with users minor).

  initial (K, U), trans (K, K, U), log_likes (T, K, U), mask (T, U).
  Returns filtered (T, K, U), the emission factors b_t (T, K, U) and
  normalisers (T, U) the backward pass uses, the log-likelihood (U,) and the
  step structure of ``_numerics.step_structure``, moves and is_first (T, U)
  -- tracked here with a "seen a valid step" flag rather than a cumulative
  sum over T, which costs as much as the whole scan on CPU.  The per-step
  log-likelihood terms are summed after the scan, as per sequence: a float32
  running sum in the carry drifted by 1-2 nats at T = 100,000.
  """

  def step(carry, inputs):
    alpha_prev, moved, seen = carry
    ll_t, valid_t = inputs
    moves_t = valid_t & seen
    pred = jnp.where(moves_t, moved, alpha_prev)
    b_t, shift_t, possible = step_scaling(pred > 0, ll_t)
    alpha, b_used, norm, term, _ = _numerics.scaled_step(pred, b_t, shift_t, possible, valid_t,
                                                      state_sum=sum_rows)
    # The next step's prediction alpha A is computed here and carried, so it is
    # materialised once: inside the next step XLA fuses the K-term mat-vec into
    # every consumer of the prediction, and its JVP into every consumer of the
    # tangent (the kernel's JVP was 10x slower, an unblocked em_step 1.6x; the
    # blocked CPU em_step is within 1-4 %, measured).
    return ((alpha, mix(alpha, trans), seen | valid_t),
            (alpha, b_used, norm, term, moves_t, valid_t & ~seen))

  users = initial.shape[1:]
  refs = (initial, trans, log_likes, mask)
  init = (initial, mix(initial, trans), filled_like(False, users, bool, *refs))
  _, (filtered, likes, norms, terms, moves, is_first) = jax.lax.scan(
      step, init, (log_likes, mask))
  return filtered, likes, norms, users_first(terms).sum(-1), moves, is_first


def _hmm_backward(trans, alphas, likes, norms, moves, is_first):
  """Scaled backward pass fused with the expected counts (hmm._backward, users minor).

  alphas and likes (T, K, U) as from :func:`_hmm_forward`.  Returns smoothed
  (T, K, U), two-slice sums sum_t alpha_t(i) msg_{t+1}(j) (K, K, U) (times the
  transition they are the transition counts; they are d ll / d transition) and
  the message at the first valid step f, msg_f = b_f beta_f / c_f (K, U) (times
  the initial distribution it is the smoothed marginal at f; it is d ll / d
  initial).  The carry is the message
  ``msg_{t+1} = b_{t+1} beta_{t+1} / c_{t+1}`` rather than beta: the K-sum
  then reads a materialised carry, as in the forward pass, instead of
  recomputing the message from sliced inputs K times per element (25 % of the
  pass, measured).  The scan runs over all T steps from a message of ones
  with "no move" after the last step (beta_T = 1): slicing the (T, K, U)
  inputs to T - 1 steps and concatenating the last marginal copies them.
  (Overwriting the filtered marginals in place with a fori_loop would save a
  buffer, but XLA:CPU then copies the whole buffer twice per step: 2x slower,
  measured.)  Messages, beta and the two-slice sums are capped at the largest
  finite float (``_numerics.clamp_finite``, as in hmm._backward).
  """
  trans_by_target = jnp.swapaxes(trans, 0, 1)          # [j, i, u] = A[i, j, u]

  def step(carry, inputs):
    msg_next, pairs, first_msg = carry
    alpha_t, b_t, norm_t, moves_next, is_first_t = inputs
    # A masked next step has b = 1 and c = 1, so its message passes through.
    beta = jnp.where(moves_next, clamp_finite(mix(msg_next, trans_by_target)), msg_next)
    pairs = pairs + alpha_t[:, None] * jnp.where(moves_next, msg_next, 0.0)[None]
    msg = _numerics.normalize_capped(b_t * beta, norm_t)
    first_msg = jnp.where(is_first_t, msg, first_msg)
    return (msg, pairs, first_msg), alpha_t * beta

  num_states, num_users = alphas.shape[1:]
  dtype = alphas.dtype
  refs = (trans, alphas, likes, norms, moves, is_first)
  init = (filled_like(1, (num_states, num_users), dtype, *refs),
          filled_like(0, (num_states, num_states, num_users), dtype, *refs),
          filled_like(0, (num_states, num_users), dtype, *refs))
  moves_next = jnp.concatenate([moves[1:], jnp.zeros_like(moves[:1])])
  (_, pairs, first_msg), smoothed = jax.lax.scan(
      step, init, (alphas, likes, norms, moves_next, is_first), reverse=True)
  # Capped once after the scan: the sum only grows, so inf becomes finfo.max.
  return smoothed, clamp_finite(pairs), first_msg


def hmm_filter_batched(initial, transition, log_likes, mask):
  """:func:`dennl_jax.hmm.hmm_filter` for U sequences: leading U on every input and output."""
  log_likes_t, mask_t = chain_inputs(log_likes, mask)
  filtered, _, _, ll, _, _ = _hmm_forward(users_minor(initial), users_minor(transition),
                                          log_likes_t, mask_t)
  return ll, users_first(filtered)


def _hmm_forward_backward(initial, transition, log_likes, mask):
  """Both passes on leading-U inputs: log-likelihood (U,), then users-minor filtered and
  smoothed marginals (T, K, U), jump sums (K, K, U), first messages (K, U) and mask (T, U)."""
  log_likes_t, mask_t = chain_inputs(log_likes, mask)
  trans = users_minor(transition)
  filtered, likes, norms, ll, moves, is_first = _hmm_forward(users_minor(initial), trans,
                                                             log_likes_t, mask_t)
  smoothed, pairs, first_msg = _hmm_backward(trans, filtered, likes, norms, moves, is_first)
  return ll, filtered, smoothed, pairs, first_msg, mask_t


def hmm_smoother_batched(initial, transition, log_likes, mask):
  """:func:`dennl_jax.hmm.hmm_smoother` for U sequences: the ``HMMPosterior`` fields
  (log-likelihood, filtered, smoothed, transition counts, initial), each with leading U."""
  ll, filtered, smoothed, pairs, first_msg, _ = _hmm_forward_backward(
      initial, transition, log_likes, mask)
  return (ll, users_first(filtered), users_first(smoothed), transition * users_first(pairs),
          initial * users_first(first_msg))


def hmm_score_batched(initial, transition, log_likes, mask):
  """:func:`dennl_jax.hmm.hmm_score` for U sequences: leading U on every input and output."""
  ll, _, smoothed, pairs, first_msg, mask_t = _hmm_forward_backward(
      initial, transition, log_likes, mask)
  d_log_likes = jnp.where(mask_t[:, None], smoothed, 0.0)
  return ll, (users_first(first_msg), users_first(pairs), users_first(d_log_likes))
