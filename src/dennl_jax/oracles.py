"""Test oracles: the HSMM as a dense HMM over (state, remaining duration) pairs.

Not part of the top-level API (``from dennl_jax import oracles``): these run
the plain HMM code on a (K D)-state matrix at O((K D)^2) per step, the
independent check of the structured O(K (K + D)) HSMM recursions and the
baseline of the HSMM benchmark.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dennl_jax._chain import masked_log_likelihoods
from dennl_jax.hmm import HMM, hmm_smoother
from dennl_jax._numerics import fill_leading
from dennl_jax.hsmm import HSMM, HSMMPosterior


def expand_to_hmm(hsmm: HSMM) -> HMM:
  """The equivalent :class:`HMM` over K * D (state, remaining-duration) pairs.

  Expanded state ``k * D + (r - 1)`` means "state k with r steps left
  (including this one)".  Its transition matrix is dense (K D, K D):
  ``(k, r) -> (k, r - 1)`` with probability 1 for r > 1 and
  ``(k, 1) -> (j, d)`` with ``transition[k, j] p_j(d)``; its emission repeats
  each state's parameters D times.  Running the plain HMM code on it gives the
  HSMM's likelihood and (summed over r) its state marginals at O((K D)^2) per
  step: the oracle for the tests and the baseline of the benchmark.
  """
  num_states, max_duration = hsmm.num_states, hsmm.max_duration
  dur_probs = jnp.exp(hsmm.duration.log_probs())
  countdown = jnp.eye(max_duration, k=-1, dtype=dur_probs.dtype)  # r -> r - 1
  dense = jnp.einsum("kj,rs->krjs", jnp.eye(num_states, dtype=dur_probs.dtype), countdown)
  dense = dense.at[:, 0].set(hsmm.transition[:, :, None] * dur_probs[None])
  size = num_states * max_duration
  emission = jax.tree_util.tree_map(lambda x: jnp.repeat(x, max_duration, axis=0),
                                    hsmm.emission)
  return HMM((hsmm.initial[:, None] * dur_probs).reshape(size), dense.reshape(size, size),
             emission)


def expanded_posterior(hsmm: HSMM, obs, mask) -> HSMMPosterior:
  """:class:`HSMMPosterior` computed by the engine's dense HMM smoother.

  Runs :func:`dennl_jax.hmm.hmm_smoother` on :func:`expand_to_hmm`'s (K D)-state
  matrix and maps its expected counts back: jumps are the transitions out of
  ``(i, 1)``; a segment of duration d starts wherever ``(j, d)`` is entered by a
  jump or occupied at the first valid step.  O((K D)^2) per step.
  """
  mask = jnp.asarray(mask, bool)
  num_states, max_duration = hsmm.num_states, hsmm.max_duration
  dense = expand_to_hmm(hsmm)
  # Emission log-likelihoods repeated per remaining duration: the same numbers
  # the repeated emission gives, without evaluating it D times.
  log_likes = jnp.repeat(masked_log_likelihoods(hsmm.emission, obs, mask), max_duration,
                         axis=1)
  post = hmm_smoother(dense.initial, dense.transition, log_likes, mask)
  num_steps = log_likes.shape[0]
  joint = fill_leading(post.smoothed_probs, mask).reshape(num_steps, num_states,
                                                           max_duration)
  counts = post.transition_counts.reshape(num_states, max_duration, num_states,
                                          max_duration)
  jumps = counts[:, 0]                                           # (K, K, D)
  first = post.initial_probs.reshape(num_states, max_duration)
  return HSMMPosterior(
      log_likelihood=post.log_likelihood,
      filtered_probs=post.filtered_probs.reshape(num_steps, num_states, max_duration).sum(-1),
      smoothed_probs=joint.sum(-1),
      transition_counts=jumps.sum(-1),
      initial_probs=first.sum(-1),
      duration_counts=first + jumps.sum(0))


def expanded_em_update(hsmm: HSMM, obs, mask):
  """``hsmm.em_step`` computed through the dense (K D)-state HMM smoother."""
  mask = jnp.asarray(mask, bool)
  post = expanded_posterior(hsmm, obs, mask)
  return hsmm.m_step(post, obs, mask), post.log_likelihood
