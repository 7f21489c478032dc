"""The hidden Markov model: parameters and masked inference on one sequence.

Masking semantics.  ``mask: (T,) bool`` marks valid steps.  A masked step is
*removed* from the sequence: it emits nothing and the hidden state does not
move across it (identity transition), so padding anywhere -- trailing,
leading or in between -- gives exactly the result of the compressed
sequence.  Posteriors reported on masked steps are those of the carried state
and carry no weight in any expected statistic.

Numerics.  The forward/backward recursions run in the *linear* domain with a
per-step normaliser (Rabiner's scaling): emission likelihoods are
exponentiated after subtracting ``m_t``, the maximum log-likelihood over the
states with positive *predicted* probability at that step (``log b_t - m_t``,
chosen inside the forward step), the filtered vector is renormalised every
step, and the log-likelihood is the sum of ``log c_t + m_t``.  The maximum over
reachable states (not over all states) makes ``c_t`` at least the predicted
mass of the best reachable state, so it cannot underflow to 0 when an
unreachable state fits far better; the forward pass hands its ``b_t`` and
``c_t`` to the backward pass, whose messages are capped at the largest finite
float (those of unreachable states may be astronomically large and only meet
zero weights).  A step that no reachable state can emit makes the
log-likelihood ``-inf`` and is treated as carrying no evidence, so posteriors
stay finite: they are those of the sequence with the impossible steps'
observations dropped (:func:`dennl_jax._numerics.scaled_step`).  Nothing is
ever multiplied across more than one step, so there is no underflow at any T
(tested at T = 100,000 in float32), and each step is a K x K matrix-vector
product instead of a log-sum-exp, which is several times faster on CPU and
keeps the EM map a rational function of the parameters (useful for the SPSA
layer).  Viterbi works in log space with per-step max subtraction.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import struct

from dennl_jax import _dispatch, _kernel_hmm, _score
from dennl_jax._chain import ChainModel, masked_log_likelihoods
from dennl_jax._numerics import (append_blank_steps, clamp_finite, normalize_capped,
                                 scaled_step,
                                 step_scaling, step_structure)
from dennl_jax.families import EmissionFamily, Simplex, param


class HMMPosterior(NamedTuple):
  """Posterior summaries of one sequence.

  log_likelihood: () marginal log-likelihood of the valid steps.
  filtered_probs: (T, K) p(z_t | o_{1:t}).
  smoothed_probs: (T, K) p(z_t | o_{1:T}).
  transition_counts: (K, K) sum_t p(z_{t-1}=i, z_t=j | o) over consecutive
    valid steps (the two-slice marginals summed over time).
  initial_probs: (K,) smoothed marginal at the first valid step.
  """
  log_likelihood: jax.Array
  filtered_probs: jax.Array
  smoothed_probs: jax.Array
  transition_counts: jax.Array
  initial_probs: jax.Array


def _forward(initial, transition, log_likes, moves, mask):
  """Scaled forward pass: filtered (T, K), the emission factors b_t (T, K) and
  normalisers c_t (T,) the backward pass must use, and the log-likelihood.

  Each step is scaled by the best log-likelihood among the states with positive
  predicted mass (:func:`dennl_jax._numerics.step_scaling`), chosen inside the
  step; impossible steps give ``-inf`` and finite messages
  (:func:`dennl_jax._numerics.scaled_step`).
  """

  def step(alpha_prev, inputs):
    ll_t, moves_t, valid_t = inputs
    pred = jnp.where(moves_t, alpha_prev @ transition, alpha_prev)
    b_t, shift, possible = step_scaling(pred > 0, ll_t)
    alpha, b_used, norm, term, _ = scaled_step(pred, b_t, shift, possible, valid_t)
    return alpha, (alpha, b_used, norm, term)

  _, (filtered, likes, norms, terms) = jax.lax.scan(step, initial, (log_likes, moves, mask))
  return filtered, likes, norms, jnp.sum(terms)


def _backward(transition, likes, norms, moves):
  """Scaled backward messages beta_t (T, K) matching ``_forward``'s scaling.

  Messages are capped at the largest finite float (:func:`clamp_finite`): a
  state no path reaches may have an astronomically large message, which only
  ever meets a zero forward or transition weight.
  """

  def step(beta_next, inputs):
    b_next, norm_next, moves_next = inputs
    msg = normalize_capped(b_next * beta_next, norm_next)
    # A masked next step has b = 1 and c = 1, so msg = beta_next passes
    # through; the first valid step (no transition into it) contributes its
    # emission, so leading padded steps report the carried state's posterior.
    beta = jnp.where(moves_next, clamp_finite(transition @ msg), msg)
    return beta, beta

  ones = jnp.ones_like(likes[0])
  _, betas = jax.lax.scan(step, ones, (likes[1:], norms[1:], moves[1:]), reverse=True)
  return jnp.concatenate([betas, ones[None]], axis=0)


def _hmm_filter_one(initial, transition, log_likes, mask):
  moves, _ = step_structure(mask)
  filtered, _, _, ll = _forward(initial, transition, log_likes, moves, mask)
  return ll, filtered


def _forward_backward(initial, transition, log_likes, mask):
  """(log-likelihood, filtered (T, K), smoothed (T, K), d ll / d initial (K,),
  d ll / d transition (K, K))."""
  moves, is_first = step_structure(mask)
  filtered, likes, norms, ll = _forward(initial, transition, log_likes, moves, mask)
  betas = _backward(transition, likes, norms, moves)
  # msg_t = b_t beta_t / c_t: d ll / d initial is msg at the first valid step, and
  # d ll / d transition sums alpha_{t-1}(i) msg_t(j) -- one (K,T)x(T,K) product
  # rather than T outer products.  (Capped: see _backward.)
  msgs = normalize_capped(likes * betas, norms[:, None])
  d_initial = jnp.sum(jnp.where(is_first[:, None], msgs, 0.0), axis=0)
  d_transition = clamp_finite(filtered[:-1].T @ jnp.where(moves[1:, None], msgs[1:], 0.0))
  return ll, filtered, filtered * betas, d_initial, d_transition


def _hmm_smoother_one(initial, transition, log_likes, mask) -> HMMPosterior:
  ll, filtered, smoothed, d_initial, d_transition = _forward_backward(
      initial, transition, log_likes, mask)
  return HMMPosterior(ll, filtered, smoothed, transition * d_transition, initial * d_initial)


def _hmm_score_one(initial, transition, log_likes, mask):
  ll, _, smoothed, d_initial, d_transition = _forward_backward(
      initial, transition, log_likes, mask)
  return ll, (d_initial, d_transition, jnp.where(mask[:, None], smoothed, 0.0))


# Under jax.vmap these run the users-minor kernels of dennl_jax._kernel_hmm
# (values equal; derivatives are the per-sequence code's, see dennl_jax._dispatch).
_hmm_filter = _dispatch.Dispatch(
    _hmm_filter_one, _kernel_hmm.hmm_filter_batched, num_diff=3, user_blocks=True)
_hmm_smoother = _dispatch.Dispatch(
    _hmm_smoother_one, lambda *args: HMMPosterior(*_kernel_hmm.hmm_smoother_batched(*args)),
    num_diff=3, user_blocks=True)
_hmm_score = _dispatch.Dispatch(
    _hmm_score_one, _kernel_hmm.hmm_score_batched, num_diff=3, user_blocks=True,
    jvp_backends=_dispatch.HMM_KERNEL_JVP_BACKENDS)


# kernels -> (symmetric-VJP score, log-likelihood through the score).
_score_functions = functools.lru_cache(maxsize=None)(
    functools.partial(_score.score_functions, _hmm_filter, _hmm_score, 3))
_as_kernels = _dispatch.Kernels.of


def hmm_filter(initial, transition, log_likes, mask, kernels="auto"):
  """Filtered marginals and log-likelihood.

  initial: (K,), transition: (K, K), log_likes: (T, K), mask: (T,) bool.
  kernels: what ``jax.vmap`` of this runs (a :class:`~dennl_jax.Kernels` or its name).
  Returns (log_likelihood: (), filtered_probs: (T, K)).
  """
  return _hmm_filter(_as_kernels(kernels), initial, transition, log_likes,
                     jnp.asarray(mask, bool))


def hmm_smoother(initial, transition, log_likes, mask, kernels="auto") -> HMMPosterior:
  """Forward-backward on one masked sequence; see :class:`HMMPosterior`."""
  return _hmm_smoother(_as_kernels(kernels), initial, transition, log_likes,
                       jnp.asarray(mask, bool))


def hmm_score(initial, transition, log_likes, mask, symmetric_vjp: bool = False,
              kernels="auto"):
  """The log-likelihood and its gradient (the score): what an EM step needs of the E-step.

  Shapes as in :func:`hmm_filter`.  Returns ``(log_likelihood, (d_initial: (K,),
  d_transition: (K, K), d_log_likes: (T, K)))``, the derivatives of the
  log-likelihood (zero on masked steps).  Times ``initial`` / ``transition``
  they are the initial probabilities and transition counts of
  :func:`hmm_smoother`, and ``d_log_likes`` is its smoothed marginals on valid
  steps.  ``symmetric_vjp``: reverse mode runs one forward-mode pass
  (:mod:`dennl_jax._score`); forward mode (``jax.jvp``) is then not available.
  """
  kernels = _as_kernels(kernels)
  mask = jnp.asarray(mask, bool)
  if symmetric_vjp:
    return _score_functions(kernels)[0](initial, transition, log_likes, mask)
  return _hmm_score(kernels, initial, transition, log_likes, mask)


def hmm_viterbi(initial, transition, log_likes, mask):
  """Most likely state path (T,) int32; masked steps repeat the carried state.

  ``log_likes`` on masked steps are ignored, as by :func:`hmm_smoother`.  An
  impossible sequence (log-likelihood ``-inf``: some valid step that no state
  reachable along a possible path can emit) has no most likely path; the path
  returned is then that of the sequence with the impossible steps'
  observations dropped (each such step carries no evidence, the state still
  moves across it), the convention of the posteriors.
  """
  mask = jnp.asarray(mask, bool)
  moves, _ = step_structure(mask)
  log_likes = jnp.where(mask[:, None], log_likes, 0.0)
  log_trans = jnp.log(transition)
  num_states = transition.shape[0]
  identity_ptr = jnp.arange(num_states)

  def forward(delta_prev, inputs):
    ll_t, moves_t = inputs
    scores = delta_prev[:, None] + log_trans
    best = jnp.where(moves_t, jnp.max(scores, axis=0), delta_prev)
    ptr = jnp.where(moves_t, jnp.argmax(scores, axis=0), identity_ptr)
    delta = best + ll_t
    # An impossible step (every state's score -inf) carries no evidence.
    delta = jnp.where(jnp.max(delta) > -jnp.inf, delta, best)
    # Subtracting the max keeps float32 precise at any T without changing argmax.
    return delta - jnp.max(delta), ptr

  delta, ptrs = jax.lax.scan(forward, jnp.log(initial), (log_likes, moves))
  last = jnp.argmax(delta)

  def backtrack(state, ptr_t):
    prev = ptr_t[state]
    return prev, state

  first, path = jax.lax.scan(backtrack, last, ptrs[1:], reverse=True)
  return jnp.concatenate([first[None], path]).astype(jnp.int32)


@struct.dataclass
class HMM(ChainModel):
  """Hidden Markov model parameters (a pytree).

  initial: (K,) initial state distribution.
  transition: (K, K) row-stochastic, ``transition[i, j] = p(z_t=j | z_{t-1}=i)``.
  emission: an :class:`~dennl_jax.families.EmissionFamily` with K states.
  kernels, users_per_block: static; what ``jax.vmap`` of this model's
  inference runs (:class:`~dennl_jax.Kernels`: ``"auto"``, the backend's
  default; ``"users_minor"``; ``"per_sequence"``).  Results are the same.
  A batch of per-user models is the same pytree with a leading user axis.
  The EM step, M-step, checks and bijections come from
  :class:`~dennl_jax._chain.ChainModel`.
  """
  initial: jax.Array = param(Simplex())
  transition: jax.Array = param(Simplex())
  emission: EmissionFamily
  kernels: str = struct.field(pytree_node=False, default="auto")
  users_per_block: Optional[int] = struct.field(pytree_node=False, default=None)
  em_step_in_user_blocks = True

  def _log_likelihoods(self, obs, mask):
    return masked_log_likelihoods(self.emission, obs, mask)

  def posterior(self, obs, mask) -> HMMPosterior:
    return hmm_smoother(self.initial, self.transition, self._log_likelihoods(obs, mask), mask,
                        self.kernel_options)

  def _e_step(self, obs, mask, symmetric_vjp: bool) -> HMMPosterior:
    ll, (d_initial, d_transition, d_log_likes) = hmm_score(
        self.initial, self.transition, self._log_likelihoods(obs, mask), mask, symmetric_vjp,
        self.kernel_options)
    return HMMPosterior(ll, None, d_log_likes, self.transition * d_transition,
                        self.initial * d_initial)

  def log_likelihood(self, obs, mask):
    # Differentiated through the score (dennl_jax._score.with_score_jvp).
    log_likelihood = _score_functions(self.kernel_options)[1]
    return log_likelihood(self.initial, self.transition, self._log_likelihoods(obs, mask),
                          jnp.asarray(mask, bool))

  def filtered_posteriors(self, obs, mask):
    return hmm_filter(self.initial, self.transition, self._log_likelihoods(obs, mask), mask,
                      self.kernel_options)[1]

  def most_likely_states(self, obs, mask):
    return hmm_viterbi(self.initial, self.transition, self._log_likelihoods(obs, mask), mask)

  def forecast_states(self, obs, mask, num_steps: int):
    """(num_steps, K) p(z_{t*+h} | valid obs), h = 1 ... num_steps, t* the last valid step."""
    log_likes, mask = append_blank_steps(self._log_likelihoods(obs, mask), mask, num_steps)
    return hmm_filter(self.initial, self.transition, log_likes, mask,
                      self.kernel_options)[1][-num_steps:]

  def _sample_states(self, key, num_steps: int):
    key_init, key_trans, key_obs = jax.random.split(key, 3)
    first = jax.random.categorical(key_init, jnp.log(self.initial))
    log_trans = jnp.log(self.transition)

    def step(state, key_t):
      nxt = jax.random.categorical(key_t, log_trans[state])
      return nxt, nxt

    _, rest = jax.lax.scan(step, first, jax.random.split(key_trans, num_steps - 1))
    return jnp.concatenate([first[None], rest]).astype(jnp.int32), key_obs
