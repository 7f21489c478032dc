"""Users-minor batched HSMM recursions (the HSMM half of :mod:`dennl_jax._kernel_hmm`).

Reached from ``jax.vmap`` of :func:`dennl_jax.hsmm.hsmm_smoother` /
``hsmm_filter`` through :class:`dennl_jax._dispatch.Dispatch`, exactly as
the HMM kernels are; the users-minor helpers (K-sums, transposes, scaled
likelihoods) are the HMM kernels' own.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dennl_jax import _numerics
from dennl_jax._kernel_hmm import (chain_inputs, mix, step_scaling, sum_rows, users_first,
                                   users_minor)
from dennl_jax._numerics import clamp_finite, filled_like, normalize


# --------------------------------------------------------------------------
# HSMM: (remaining duration, state) with users minor
# --------------------------------------------------------------------------
#
# The per-sequence joint over (state k, remaining duration r) is (K, D); here
# it is (D, K, U), r - 1 leading: the countdown r + 1 -> r is a slice of whole
# (K, U) slabs, the "one step left" slab the jump reads is ``x[0]``, and every
# D-sum (:func:`_sum_leading`) adds whole slabs over users.


def _sum_leading(x):
  """``sum_i x[i]`` over the leading axis of (N, ..., U), as a ones-vector product.

  XLA:CPU runs it as one matrix-vector product (N x rest) reading ``x`` once:
  1.4x faster for the whole smoother at D = 60 than ``jnp.sum(x, 0)``, a
  halving tree of slab adds or N - 1 unrolled adds (measured, K = 10, U = 1000).
  """
  return jnp.tensordot(jnp.ones(x.shape[0], x.dtype), x, axes=1)


def _hsmm_inputs(initial, transition, dur_log_probs, log_likes, mask):
  """Users-minor inputs: initial (K, U), transition (K, K, U), duration probs (D, K, U),
  log_likes (T, K, U), mask (T, U), from the leading-U arguments of hsmm_smoother."""
  log_likes_t, mask_t = chain_inputs(log_likes, mask)
  return (users_minor(initial), users_minor(transition),
          jnp.transpose(jnp.exp(dur_log_probs), (2, 1, 0)), log_likes_t, mask_t)


def _hsmm_forward(initial, trans, dur, log_likes, mask, keep_segments=True):
  """Scaled forward pass over (remaining, state) (hsmm._forward with users minor).

  initial (K, U), trans (K, K, U), dur (D, K, U), log_likes (T, K, U), mask (T, U).
  Returns the log-likelihood (U,), whether any step is valid (U,), filtered
  state marginals (T, K, U), the emission factors b_t (T, K, U) and normalisers
  (T, U) the backward pass uses and the step structure moves /
  is_first / before_first (T, U) (tracked with a "seen a valid step" flag, as
  in _hmm_forward).  With ``keep_segments`` also what the backward pass reads:
  the mass that jumps out of a segment into step t, ``alpha_{t-1}[0]`` on moving
  steps (T, K, U), and the weight with which a segment is entered at t,
  ``(alpha_{t-1}[0] A)`` on moving steps and ``initial`` at the first valid step
  (T, K, U).  The joints alpha_t (D, K, U) are not kept: the backward pass gets
  the smoothed marginals from segment starts and ends, so a user's memory is
  O(T K + D K), not O(T D K).
  """

  def step(carry, inputs):
    alpha_prev, jump_in, filtered_prev, seen = carry
    ll_t, valid_t = inputs
    moves_t = valid_t & seen
    is_first_t = valid_t & ~seen
    # Segments with one step left jump (jump_in = alpha_prev[0] A, carried) and
    # draw a new duration; the others count down.
    counted = jnp.concatenate([alpha_prev[1:], jnp.zeros_like(alpha_prev[:1])])
    pred = jnp.where(moves_t, counted + jump_in[None] * dur, alpha_prev)
    # b is per state, so the state marginal of pred * b is (marginal of pred) * b:
    # one D-sum serves reachability and the normaliser.
    pred_mass = _sum_leading(pred)                            # (K, U)
    b_t, shift_t, possible = step_scaling(pred_mass > 0, ll_t)
    marginal, b_used, norm, term, ok = _numerics.scaled_step(
        pred_mass, b_t, shift_t, possible, valid_t, state_sum=sum_rows)
    alpha = jnp.where(ok, normalize(pred * b_t[None], norm), pred)
    # A masked step keeps the joint, so its marginal is the previous one.
    filtered = jnp.where(valid_t, marginal, filtered_prev)
    seen_now = seen | valid_t
    # The next step's jump mass is computed here: a carry is materialised once,
    # whereas the K-term mat-vec written inside the next step's (D, K, U)
    # prediction is fused into it and recomputed D times (2x slower, measured).
    jump_next = mix(alpha[0], trans)
    carry = (alpha, jump_next, filtered, seen_now)
    out = (filtered, b_used, norm, term, moves_t, is_first_t, ~seen_now)
    if keep_segments:
      # What the backward pass reads is emitted from this step's new values and
      # shifted by one step after the scan: an output read from the incoming
      # carry (alpha_prev[0]) kept that (D, K, U) buffer alive past its update,
      # so XLA copied the whole carry every step (seen in the compiled loop body;
      # the smoother 1.15-1.35x slower at D = 20-60).
      out = out + (alpha[0], jump_next)
    return carry, out

  start = initial[None] * dur
  init = (start, mix(start[0], trans), _sum_leading(start),
          filled_like(False, initial.shape[1:], bool, initial, trans, dur, log_likes, mask))
  (_, _, _, any_valid), outs = jax.lax.scan(step, init, (log_likes, mask))
  # Summed after the scan, as per sequence: a float32 running sum in the carry
  # loses ten times more (measured at T = 2000).
  ll = users_first(outs[3]).sum(-1)
  outs = outs[:3] + outs[4:]
  if keep_segments:
    moves, is_first = outs[3], outs[4]
    # Step t reads the one-step-left mass and the jump mass of step t - 1.
    one_left_before = jnp.concatenate([start[None, 0], outs[6][:-1]])
    jump_before = jnp.concatenate([init[1][None], outs[7][:-1]])
    endings = jnp.where(moves[:, None], one_left_before, 0.0)
    entering = jnp.where(moves[:, None], jump_before,
                         jnp.where(is_first[:, None], initial[None], 0.0))
    outs = outs[:6] + (endings, entering)
  return (ll, any_valid) + tuple(outs)


def _hsmm_backward(trans, dur, endings, entering, last_filtered, likes, norms, moves, is_first):
  """Scaled backward pass fused with the expected counts (hsmm._backward, users minor).

  One reverse scan over all T steps whose carry is beta_t (D, K, U); at step t
  it forms msg_t = b_t beta_t / c_t, the entry weight sum_d p(d) msg_t and
  beta_{t-1}.  Inputs from :func:`_hsmm_forward`, and the filtered marginal at
  the last step (K, U).  Returns smoothed state marginals (T, K, U) (not yet
  filled before the first valid step), the duration counts (D, K, U), the
  two-slice jump sums (K, K, U) (times the transition they are the transition
  counts) and the entry weight at the first valid step (K, U).

  The first valid step f is folded into the entry sums: its joint is
  alpha_f beta_f = initial p(d) msg_f, a segment entered with weight
  ``initial`` -- so the per-sequence ``first`` accumulator (a (K, D) select
  and add every step) is not needed, and initial_probs = initial * entry_f.

  The smoothed marginals need no joints: across a moving step t, the mass in
  state k at t-1 is that at t less the segments of k that start at t, plus
  those that end at t-1,
  gamma_{t-1} = gamma_t - entering_t entry_t + alpha_{t-1}[0] (A entry_t),
  from gamma at the last step, which is its filtered marginal.
  """
  trans_by_target = jnp.swapaxes(trans, 0, 1)          # [j, i, u] = A[i, j, u]

  def step(carry, inputs):
    beta, smoothed, entered, jumps, first_entry = carry
    ending_t, entering_t, b_t, norm_t, moves_t, is_first_t = inputs
    # A masked step has b = 1 and c = 1: msg = beta passes through.
    # Capped at the largest finite float (_numerics.clamp_finite): the messages
    # of unreachable states may be astronomically large; they meet zero weights.
    msg = clamp_finite(beta * _numerics.normalize_capped(b_t, norm_t)[None])
    entry = clamp_finite(_sum_leading(dur * msg))             # (K, U)
    entered = entered + entering_t[None] * msg
    jumps = jumps + ending_t[:, None] * entry[None]
    first_entry = jnp.where(is_first_t, entry, first_entry)
    leaving = clamp_finite(mix(entry, trans_by_target))
    moved = jnp.concatenate([leaving[None], msg[:-1]])
    beta = jnp.where(moves_t, moved, beta)
    before = jnp.where(moves_t, smoothed - entering_t * entry + ending_t * leaving, smoothed)
    # The differences leave round-off of either sign where a marginal is ~0
    # (float32: down to -4e-6 at T = 10,000); a negative probability would reach
    # the M-step's logs, so the output is clipped, not the recursion.
    return (beta, before, entered, jumps, first_entry), jnp.maximum(smoothed, 0.0)

  max_duration = dur.shape[0]
  num_states, num_users = last_filtered.shape
  dtype = last_filtered.dtype
  refs = (trans, dur, endings, entering, last_filtered, likes, norms, moves, is_first)
  init = (filled_like(1, (max_duration, num_states, num_users), dtype, *refs),
          last_filtered,
          filled_like(0, (max_duration, num_states, num_users), dtype, *refs),
          filled_like(0, (num_states, num_states, num_users), dtype, *refs),
          filled_like(0, (num_states, num_users), dtype, *refs))
  (_, _, entered, jumps, first_entry), smoothed = jax.lax.scan(
      step, init, (endings, entering, likes, norms, moves, is_first), reverse=True)
  # The sums only grow: capped once after the scan (inf becomes finfo.max).
  return smoothed, dur * clamp_finite(entered), clamp_finite(jumps), first_entry


def hsmm_filter_batched(initial, transition, dur_log_probs, log_likes, mask):
  """:func:`dennl_jax.hsmm.hsmm_filter` for U sequences: leading U on every input and output."""
  initial, trans, dur, log_likes_t, mask_t = _hsmm_inputs(
      initial, transition, dur_log_probs, log_likes, mask)
  ll, _, filtered, *_ = _hsmm_forward(initial, trans, dur, log_likes_t, mask_t,
                                      keep_segments=False)
  return ll, users_first(filtered)


def _hsmm_forward_backward(initial, transition, dur_log_probs, log_likes, mask):
  """Both passes on leading-U inputs: the users-minor initial (K, U) and transition
  (K, K, U), the outputs of :func:`_hsmm_forward` without the joints, then those of
  :func:`_hsmm_backward`, and the mask (T, U)."""
  initial, trans, dur, log_likes_t, mask_t = _hsmm_inputs(
      initial, transition, dur_log_probs, log_likes, mask)
  *forward, endings, entering = _hsmm_forward(initial, trans, dur, log_likes_t, mask_t)
  _, _, filtered, likes, norms, moves, is_first, _ = forward
  backward = _hsmm_backward(trans, dur, endings, entering, filtered[-1], likes, norms, moves,
                            is_first)
  return initial, trans, forward, backward, mask_t


def hsmm_score_batched(initial, transition, dur_log_probs, log_likes, mask):
  """:func:`dennl_jax.hsmm.hsmm_score` for U sequences: leading U on every input and output."""
  _, _, (ll, *_), backward, mask_t = _hsmm_forward_backward(
      initial, transition, dur_log_probs, log_likes, mask)
  smoothed, duration_counts, jumps, first_entry = backward
  d_log_likes = jnp.where(mask_t[:, None], smoothed, 0.0)
  return ll, (users_first(first_entry), users_first(jumps),
              jnp.transpose(duration_counts, (2, 1, 0)), users_first(d_log_likes))


def hsmm_smoother_batched(initial, transition, dur_log_probs, log_likes, mask):
  """:func:`dennl_jax.hsmm.hsmm_smoother` for U sequences: the ``HSMMPosterior`` fields
  (log-likelihood, filtered, smoothed, transition counts, initial, duration counts),
  each with leading U."""
  initial, trans, forward, backward, _ = _hsmm_forward_backward(
      initial, transition, dur_log_probs, log_likes, mask)
  ll, any_valid, filtered, _, _, _, _, before_first = forward
  smoothed, duration_counts, jumps, first_entry = backward
  initial_probs = initial * first_entry
  # Steps before the first valid one report its posterior (_numerics.fill_leading;
  # without any valid step, that of step 0).
  fill = jnp.where(any_valid, initial_probs, smoothed[0])
  smoothed = jnp.where(before_first[:, None], fill[None], smoothed)
  return (ll, users_first(filtered), users_first(smoothed),
          users_first(trans * jumps), users_first(initial_probs),
          jnp.transpose(duration_counts, (2, 1, 0)))
