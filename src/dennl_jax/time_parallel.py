"""Parallel-in-time HMM smoothing: forward and backward messages as associative scans.

The sequential smoother (:func:`dennl_jax.hmm.hmm_smoother`) walks the T
steps one after the other.  Here both message passes are prefix products of
per-step K x K matrices, computed by ``jax.lax.associative_scan`` in
O(log T) sequential depth and O(T K^3) work (Särkkä & García-Fernández,
"Temporal parallelization of inference in hidden Markov models", IEEE TSP
2021; dynamax's ``parallel_inference`` uses the same elements for its filter
and gets the smoother by autodiff -- here the backward pass is a second
scan, so the smoother itself stays differentiable once, not twice).

Elements.  An element ``(P, l)`` with ``P: (K, K)`` row-stochastic and
``l: (K,)`` stands for the matrix ``M = diag(exp l) P``.  For a step that
moves, ``M[i, j] = A[i, j] b_t(j)``: ``P`` is the transition conditioned on
the observation and ``l[i] = log p(o_t | z_{t-1} = i)``.  Composition
multiplies the matrices and renormalises each row into ``l`` (:func:`_combine`),
so nothing over- or underflows at any T.  Masks follow the engine's
semantics (a masked step is removed from the sequence): a masked step after
the first valid one is the identity element ``(I, 0)``; in the forward pass
the steps up to the first valid one have every row equal to the initial
distribution (conditioned on the first observation at the first valid step),
in the backward pass they are ``(I, log b_t)`` -- which reproduces the
sequential smoother's convention that leading padded steps report the
posterior of the state at the first valid step.

Use it through ``dj.em_step(params, obs, mask, time_parallel=True)`` or
:func:`posterior` / :func:`em_step` here (HMMs only).  It pays off only where
the device has idle parallel width for one long sequence (a GPU, or many CPU
cores with few users); on a 2-core CPU the sequential scan is faster -- see
``benchmarks/bench_scaling.py``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dennl_jax import _numerics
from dennl_jax._numerics import clamp_finite, normalize, normalize_capped, step_structure
from dennl_jax.hmm import HMM, HMMPosterior


def _condition(base, log_likes):
  """``(P, l)`` of ``M = base * exp(log_likes)[..., None, :]``, rows normalised into ``l``.

  base: (..., K, K) row-stochastic; log_likes: (..., K).  Each row is scaled
  by the best log-likelihood among the states it reaches (``base > 0``), as the
  sequential recursions scale each step (:func:`dennl_jax._numerics.step_scaling`):
  a state the row cannot reach may fit far better without the row's mass
  underflowing to 0.  A row with no mass (every reachable state has likelihood
  0) gets ``l = -inf`` and keeps its base row, so no NaN appears in values or
  gradients.
  """
  weights, shift = _scaled_exp(jnp.broadcast_to(log_likes[..., None, :], base.shape), base > 0)
  weighted = base * weights
  norm = jnp.sum(weighted, axis=-1)
  ok = norm > 0
  safe = jnp.where(ok, norm, 1.0)
  probs = jnp.where(ok[..., None], normalize(weighted, safe[..., None]), base)
  return probs, jnp.where(ok, jnp.log(safe) + shift, -jnp.inf)


def _scaled_exp(log_x, support):
  """``(exp(log_x - shift), shift)`` over the last axis, the shift the maximum of
  ``log_x`` where ``support`` (0 where there is none), so the supported entries
  cannot all underflow; exponents capped at ``log_max`` so an unsupported entry
  gets a huge finite weight, never inf (``_numerics.step_scaling``, last axis).
  The shift carries no gradient."""
  shift = jax.lax.stop_gradient(
      jnp.max(jnp.where(support, log_x, -jnp.inf), axis=-1, keepdims=True))
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  diff = log_x - shift
  cap = _numerics.log_max(diff.dtype)
  return jnp.exp(jnp.where(diff > cap, cap, diff)), shift[..., 0]


def _exp_relative(log_x, support):
  return _scaled_exp(log_x, support)[0]


def _combine(earlier, later):
  """The element of ``M_earlier @ M_later`` (both (..., K, K) with their scales)."""
  p_a, l_a = earlier
  p_b, l_b = later
  probs, log_norm = _condition(p_a, l_b)
  return probs @ p_b, l_a + log_norm


def _elements(initial, transition, log_likes, mask):
  """Forward and backward elements ``((P, l), (P, l))``, each (T, K, K), (T, K)."""
  num_states = transition.shape[0]
  moves, is_first = step_structure(mask)
  started = jnp.cumsum(mask) > 0
  eye = jnp.eye(num_states, dtype=transition.dtype)
  rows_initial = jnp.broadcast_to(initial, (num_states, num_states))
  log_likes = jnp.where(mask[:, None], log_likes, 0.0)
  forward_base = jnp.where(moves[:, None, None], transition,
                           jnp.where(started[:, None, None] & ~is_first[:, None, None],
                                     eye, rows_initial))
  backward_base = jnp.where(moves[:, None, None], transition, eye)

  def element(base):
    probs, log_scale = _condition(base, log_likes)
    # A step without evidence has scale exactly 1 (not sum(initial) rounded).
    return probs, jnp.where(mask[:, None], log_scale, 0.0)

  return element(forward_base), element(backward_base)


def hmm_smoother(initial, transition, log_likes, mask) -> HMMPosterior:
  """Forward-backward on one masked sequence by associative scans.

  Same arguments and result as :func:`dennl_jax.hmm.hmm_smoother`
  (initial: (K,), transition: (K, K), log_likes: (T, K), mask: (T,) bool ->
  :class:`~dennl_jax.hmm.HMMPosterior`), equal to it up to float rounding.
  """
  mask = jnp.asarray(mask, bool)
  moves, is_first = step_structure(mask)
  forward, _ = _elements(initial, transition, log_likes, mask)
  prefix_probs, prefix_log = jax.lax.associative_scan(_combine, forward)
  # Every row of a prefix is the same (its first element's rows are), so row 0
  # is p(z_t | o_{1:t}) and its scale the log-likelihood so far.
  filtered = prefix_probs[:, 0]
  log_likelihood = prefix_log[-1, 0]
  # Impossible steps (no state with predicted mass can emit them; the
  # log-likelihood is then -inf) carry no evidence in the backward pass, the
  # sequential smoother's convention (_numerics.scaled_step).  Exact up to the
  # first impossible step; after it the forward prefixes may drop more evidence
  # than the sequential filter (still finite).
  carried = jnp.concatenate([initial[None], filtered[:-1]])
  predicted_all = jnp.where(moves[:, None], carried @ transition, initial)
  impossible = mask & ~jnp.any((predicted_all > 0) & (log_likes > -jnp.inf), axis=-1)
  log_likes = jnp.where(impossible[:, None], 0.0, log_likes)
  _, backward = _elements(initial, transition, log_likes, mask)
  # reverse=True hands fn (later, earlier); suffix t is M_t ... M_{T-1}.
  _, suffix_log = jax.lax.associative_scan(lambda b, a: _combine(a, b), backward, reverse=True)
  log_beta = jnp.concatenate([suffix_log[1:], jnp.zeros_like(suffix_log[:1])], axis=0)
  # Shifted by the best log beta among states with filtered mass (an unreachable
  # state's may be far larger); a step without any (impossible sequence) keeps
  # its filtered marginal.
  smoothed = filtered * _exp_relative(log_beta, filtered > 0)
  total = jnp.sum(smoothed, axis=-1, keepdims=True)
  smoothed = jnp.where(total > 0, normalize(smoothed, jnp.where(total > 0, total, 1.0)), filtered)
  # Two-slice marginals summed over t, as one (K, T) x (T, K) product:
  # xi_t(i, j) = alpha_{t-1}(i) A_ij w_t(j) with w_t = b_t beta_t / Z_t.
  log_w = jnp.where(mask[:, None], log_likes, 0.0) + log_beta
  predicted = filtered[:-1] @ transition
  w = _exp_relative(log_w[1:], predicted > 0)
  z = jnp.sum(predicted * w, axis=-1, keepdims=True)
  ok = moves[1:, None] & (z > 0)
  # Capped at the largest finite float: an unreachable state's weight may be
  # astronomically large and only meets zero transition entries (0 * inf = NaN).
  weights = jnp.where(ok, normalize_capped(w, jnp.where(ok, z, 1.0)), 0.0)
  counts = transition * clamp_finite(filtered[:-1].T @ weights)
  initial_probs = jnp.sum(jnp.where(is_first[:, None], smoothed, 0.0), axis=0)
  return HMMPosterior(log_likelihood, filtered, smoothed, counts, initial_probs)


def _check_hmm(params) -> None:
  if not isinstance(params, HMM):
    raise ValueError(
        f"time-parallel smoothing supports HMM parameters only, got {type(params).__name__}")


def posterior(params, obs, mask) -> HMMPosterior:
  """``params.posterior(obs, mask)`` of an :class:`~dennl_jax.HMM`, smoothed in parallel over time."""
  _check_hmm(params)
  mask = jnp.asarray(mask, bool)
  return hmm_smoother(params.initial, params.transition, params._log_likelihoods(obs, mask), mask)


def em_step(params, obs, mask):
  """``params.em_step(obs, mask)`` (``(new_params, log_likelihood_before)``) with :func:`posterior`."""
  mask = jnp.asarray(mask, bool)
  post = posterior(params, obs, mask)
  return params.m_step(post, obs, mask), post.log_likelihood
