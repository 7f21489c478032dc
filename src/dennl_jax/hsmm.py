"""The explicit-duration hidden semi-Markov model (HSMM).

Generative model.  A sequence is a run of *segments*.  The first segment's
state is drawn from ``initial``; every segment of state ``k`` draws its
duration ``d`` in ``1 ... D`` from the duration family, emits ``d``
observations from state ``k``'s emission distribution, and then jumps to a
*different* state ``j`` with probability ``transition[k, j]`` (the diagonal is
zero: a state never jumps to itself, so a run of equal states is exactly one
segment).  The sequence starts at a segment boundary.  ``D`` -- the maximum
duration -- is a static setting of the duration family.

Right-censoring.  A sequence of length T is the first T steps of this process,
so the last segment is usually cut off by the end of the observation window:
having lasted ``l`` steps so far, it contributes the survivor function
``P(d >= l)`` to the likelihood rather than ``p(d = l)``.  We use this
(right-censored) reading consistently: the likelihood, the state marginals,
Viterbi, ``sample`` (which draws the process and cuts it at T) and the
M-step, where the censored segment's duration is a hidden variable whose
posterior ``p(d | d >= l, o)`` enters the expected duration counts, so EM
stays exact and monotone.  Forcing the last segment to end exactly at T would
bias every fitted duration toward the short, cut-off segments at the end of
each window.

Inference.  The HSMM is an HMM over (state, remaining duration) pairs: at
time t the state is ``(k, r)`` meaning "``r`` steps of this segment remain,
including this one".  ``r > 1`` counts down deterministically (a shift along
the duration axis); ``r == 1`` jumps through ``transition`` and draws a fresh
duration.  Written as a dense matrix that is (K D)^2 per step; the recursions
below apply its structure directly -- one K x K product plus O(K D)
elementwise work per step -- so a forward-backward pass costs
O(T K (K + D)).  The recursions are in the linear domain with per-step
normalisers exactly as :mod:`dennl_jax.hmm` (no underflow at any T in
float32), each step scaled by its best *reachable* state's likelihood (the
state marginal of the predicted joint decides what is reachable; see
"Numerics" in :mod:`dennl_jax.hmm`, impossible sequences included).  Viterbi uses the equivalent *elapsed-time* representation (state,
steps spent so far) in log space, where the censored last segment's survivor
term falls out of the product of continuation probabilities, so it returns
the exact most likely state path (= segmentation) of the right-censored model.
Under ``jax.vmap`` the smoother and the filter run the same recursions with
the user axis minor (:mod:`dennl_jax._kernel_hsmm`; equal values and derivatives).

Masks behave exactly as for HMMs: a masked step is removed from the sequence
(identity step: it neither emits nor consumes duration), so padding anywhere
equals the compressed sequence.

Duration families live in :mod:`dennl_jax.durations`; the dense
(K D)-state HMM of the same model, the oracle of the tests and the baseline
of the benchmark, in :mod:`dennl_jax.oracles`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import struct

from dennl_jax import _dispatch, _kernel_hsmm, _score
from dennl_jax._chain import ChainModel, masked_log_likelihoods
from dennl_jax._numerics import (append_blank_steps, clamp_finite, fill_leading, filled_like,
                                 normalize, normalize_capped, scaled_step, step_scaling,
                                 step_structure)
from dennl_jax.families import DurationFamily, EmissionFamily, Simplex, param


class HSMMPosterior(NamedTuple):
  """Posterior summaries of one sequence under an HSMM.

  log_likelihood: () marginal log-likelihood of the valid steps
    (right-censored last segment).
  filtered_probs: (T, K) p(z_t | o_{1:t}).
  smoothed_probs: (T, K) p(z_t | o_{1:T}).
  transition_counts: (K, K) expected number of segment-to-segment jumps i -> j
    (zero diagonal).
  initial_probs: (K,) smoothed marginal at the first valid step.
  duration_counts: (K, D) expected number of segments of state k whose drawn
    duration is d (column d-1); the censored last segment counts with its
    posterior over the full drawn duration ``d >= l``.  Row sums are the
    expected numbers of segments.
  """
  log_likelihood: jax.Array
  filtered_probs: jax.Array
  smoothed_probs: jax.Array
  transition_counts: jax.Array
  initial_probs: jax.Array
  duration_counts: jax.Array


def _count_down(joint):
  """(K, D) -> (K, D): mass at remaining r+1 moves to r; nothing enters r = D."""
  return jnp.concatenate([joint[:, 1:], jnp.zeros_like(joint[:, :1])], axis=1)


def _forward(initial, transition, dur_probs, log_likes, moves, mask, keep_joint=True):
  """Scaled forward pass over (state, remaining).

  Returns filtered (T, K, D) -- or, with ``keep_joint=False``, only its state
  marginals (T, K), which saves the dominant memory traffic -- the emission
  factors b_t (T, K) and normalisers (T,) the backward pass uses, and the
  log-likelihood.  Each step is scaled by the best log-likelihood among the
  states with positive predicted mass (summed over remaining durations), as
  in :mod:`dennl_jax.hmm`; impossible steps give ``-inf`` and finite messages.
  """

  def step(alpha_prev, inputs):
    ll_t, moves_t, valid_t = inputs
    # Only segments with one step left can jump; the jump draws a new duration.
    jump_in = alpha_prev[:, 0] @ transition
    pred = jnp.where(moves_t, _count_down(alpha_prev) + jump_in[:, None] * dur_probs,
                     alpha_prev)
    pred_mass = jnp.sum(pred, axis=-1)
    b_t, shift, possible = step_scaling(pred_mass > 0, ll_t)
    marginal, b_used, norm, term, ok = scaled_step(pred_mass, b_t, shift, possible, valid_t)
    alpha = jnp.where(ok, normalize(pred * b_t[:, None], norm), pred)
    return alpha, (alpha if keep_joint else marginal, b_used, norm, term)

  start = initial[:, None] * dur_probs
  _, (filtered, likes, norms, terms) = jax.lax.scan(step, start, (log_likes, moves, mask))
  return filtered, likes, norms, jnp.sum(terms)


def _backward(transition, dur_probs, alphas, likes, norms, moves, is_first):
  """Scaled backward pass fused with every expectation the M-step needs.

  Consumes the stored forward messages ``alphas: (T, K, D)`` and returns only
  reductions -- smoothed state marginals (T, K), duration counts (K, D), the
  jump sums (K, K) (d ll / d transition; times the transition, the transition
  counts), the initial probabilities (K,) and d ll / d initial (K,) -- so no
  other (T, K, D) array is materialised (on CPU the cost of the pass is
  memory traffic, not arithmetic).  beta_T = 1 for every
  (k, r): the last segment may continue past T with any remaining duration,
  which is what makes it right-censored.  Messages and the sums over them are
  capped at the largest finite float (``clamp_finite``, see hmm._backward).
  """

  def step(carry, inputs):
    beta_next, entered, jumps, first, first_entry = carry
    alpha_t, b_next, norm_next, moves_next, is_first_t, is_first_next = inputs
    # msg(j, d) = b_{t+1}(j) beta_{t+1}(j, d) / c_{t+1}: backward weight of
    # being in (j, d) at t+1.  A jump i -> j at t+1 with duration d has
    # posterior mass alpha_t(i, 1) A_ij p_j(d) msg(j, d).
    msg = normalize_capped(b_next[:, None] * beta_next, norm_next)
    entry = clamp_finite(jnp.sum(dur_probs * msg, axis=1))       # (K,)
    moved = jnp.concatenate([clamp_finite(transition @ entry)[:, None], msg[:, :-1]], axis=1)
    beta = jnp.where(moves_next, moved, beta_next)
    ending = alpha_t[:, 0] * moves_next
    entered = entered + (ending @ transition)[:, None] * msg
    jumps = jumps + ending[:, None] * entry[None, :]
    joint = alpha_t * beta
    first = first + is_first_t * joint
    first_entry = jnp.where(is_first_next > 0, entry, first_entry)
    return (beta, entered, jumps, first, first_entry), joint.sum(-1)

  num_states, max_duration = dur_probs.shape
  dtype = alphas.dtype
  refs = (transition, dur_probs, alphas, likes, norms, moves, is_first)
  init = (filled_like(1, (num_states, max_duration), dtype, *refs),
          filled_like(0, (num_states, max_duration), dtype, *refs),
          filled_like(0, (num_states, num_states), dtype, *refs),
          is_first[-1] * alphas[-1],
          filled_like(0, num_states, dtype, *refs))
  (beta_0, entered, jumps, first, first_entry), smoothed = jax.lax.scan(
      step, init,
      (alphas[:-1], likes[1:], norms[1:], moves[1:], is_first[:-1], is_first[1:]),
      reverse=True)
  smoothed = jnp.concatenate([smoothed, alphas[-1].sum(-1)[None]], axis=0)
  # The sums only grow: capped once here (inf becomes finfo.max).
  duration_counts = first + dur_probs * clamp_finite(entered)
  jumps = clamp_finite(jumps)
  # The entry weight sum_d p(d) msg_f(d) at the first valid step f is d ll / d initial;
  # the scan forms it for f >= 1, step 0 here.
  msg_0 = normalize_capped(likes[0][:, None] * beta_0, norms[0])
  entry_0 = clamp_finite(jnp.sum(dur_probs * msg_0, axis=1))
  d_initial = jnp.where(is_first[0] > 0, entry_0, first_entry)
  return smoothed, duration_counts, jumps, first.sum(-1), d_initial


def _hsmm_filter_one(initial, transition, dur_log_probs, log_likes, mask):
  moves, _ = step_structure(mask)
  filtered, _, _, ll = _forward(initial, transition, jnp.exp(dur_log_probs), log_likes,
                                moves, mask, keep_joint=False)
  return ll, filtered


def _forward_backward(initial, transition, dur_log_probs, log_likes, mask):
  """(log-likelihood, alphas (T, K, D), the outputs of :func:`_backward`)."""
  moves, is_first = step_structure(mask)
  dur_probs = jnp.exp(dur_log_probs)
  alphas, likes, norms, ll = _forward(initial, transition, dur_probs, log_likes, moves, mask)
  return ll, alphas, _backward(transition, dur_probs, alphas, likes, norms, moves,
                               is_first.astype(alphas.dtype))


def _hsmm_smoother_one(initial, transition, dur_log_probs, log_likes, mask) -> HSMMPosterior:
  ll, alphas, (smoothed, duration_counts, jumps, initial_probs, _) = _forward_backward(
      initial, transition, dur_log_probs, log_likes, mask)
  return HSMMPosterior(ll, alphas.sum(-1), fill_leading(smoothed, mask), transition * jumps,
                       initial_probs, duration_counts)


def _hsmm_score_one(initial, transition, dur_log_probs, log_likes, mask):
  ll, _, (smoothed, duration_counts, jumps, _, d_initial) = _forward_backward(
      initial, transition, dur_log_probs, log_likes, mask)
  return ll, (d_initial, jumps, duration_counts, jnp.where(mask[:, None], smoothed, 0.0))


# Under jax.vmap these run the users-minor kernels of dennl_jax._kernel_hsmm
# (values equal; derivatives are the per-sequence code's, see dennl_jax._dispatch).
_hsmm_dispatch = functools.partial(_dispatch.Dispatch, num_diff=4,
                                   jvp_backends=_dispatch.HSMM_KERNEL_JVP_BACKENDS)
_hsmm_filter = _hsmm_dispatch(_hsmm_filter_one, _kernel_hsmm.hsmm_filter_batched)
_hsmm_smoother = _hsmm_dispatch(
    _hsmm_smoother_one, lambda *args: HSMMPosterior(*_kernel_hsmm.hsmm_smoother_batched(*args)))
_hsmm_score = _hsmm_dispatch(_hsmm_score_one, _kernel_hsmm.hsmm_score_batched)


# kernels -> (symmetric-VJP score, log-likelihood through the score).
_score_functions = functools.lru_cache(maxsize=None)(
    functools.partial(_score.score_functions, _hsmm_filter, _hsmm_score, 4))
_as_kernels = _dispatch.Kernels.of


def hsmm_filter(initial, transition, dur_log_probs, log_likes, mask, kernels="auto"):
  """Filtered state marginals and log-likelihood.

  initial: (K,), transition: (K, K), dur_log_probs: (K, D), log_likes: (T, K),
  mask: (T,) bool.  kernels: what ``jax.vmap`` of this runs (a
  :class:`~dennl_jax.Kernels` or its name).  Returns (log_likelihood: (),
  filtered_probs: (T, K)).
  """
  return _hsmm_filter(_as_kernels(kernels), initial, transition, dur_log_probs, log_likes,
                      jnp.asarray(mask, bool))


def hsmm_smoother(initial, transition, dur_log_probs, log_likes, mask,
                  kernels="auto") -> HSMMPosterior:
  """Forward-backward on one masked sequence; see :class:`HSMMPosterior`.

  Shapes as in :func:`hsmm_filter`.  Cost O(T K (K + D)).
  """
  return _hsmm_smoother(_as_kernels(kernels), initial, transition, dur_log_probs, log_likes,
                        jnp.asarray(mask, bool))


def hsmm_score(initial, transition, dur_log_probs, log_likes, mask, symmetric_vjp: bool = False,
               kernels="auto"):
  """The log-likelihood and its gradient (the score): what an EM step needs of the E-step.

  Shapes as in :func:`hsmm_filter`.  Returns ``(log_likelihood, (d_initial: (K,),
  d_transition: (K, K), d_dur_log_probs: (K, D), d_log_likes: (T, K)))``, the
  derivatives of the log-likelihood (zero on masked steps).  Times ``initial``
  / ``transition`` the first two are the initial probabilities and transition
  counts of :func:`hsmm_smoother`; the others are its duration counts and its
  smoothed marginals on valid steps.  ``symmetric_vjp``: reverse mode runs one
  forward-mode pass (:mod:`dennl_jax._score`); forward mode (``jax.jvp``) is then
  not available.
  """
  kernels = _as_kernels(kernels)
  args = (initial, transition, dur_log_probs, log_likes, jnp.asarray(mask, bool))
  if symmetric_vjp:
    return _score_functions(kernels)[0](*args)
  return _hsmm_score(kernels, *args)


def hsmm_viterbi(initial, transition, dur_log_probs, log_likes, mask):
  """Most likely state path (T,) int32 of the right-censored model.

  Runs over (state, elapsed time in segment) pairs: staying one more step
  costs ``log S(e+1) - log S(e)`` and ending a segment after ``e`` steps costs
  ``log p(e) - log S(e)`` (S the survivor function), so a path's score is its
  exact joint log-probability, including ``log S(l)`` for the censored last
  segment.  With a zero-diagonal transition a state path determines its
  segmentation, so this is also the most likely segmentation.  Masked steps
  repeat the carried state; ``log_likes`` on masked steps are ignored, as by
  :func:`hsmm_smoother`.  An impossible sequence (log-likelihood ``-inf``) has
  no most likely path; the path returned is then that of the sequence with
  the impossible steps' observations dropped (each such step carries no
  evidence but still consumes duration), the convention of the posteriors.
  """
  mask = jnp.asarray(mask, bool)
  moves, _ = step_structure(mask)
  log_likes = jnp.where(mask[:, None], log_likes, 0.0)
  num_states, max_duration = dur_log_probs.shape
  # log S(e) = log P(d >= e), e = 1..D+1.
  log_surv = jax.lax.cumlogsumexp(dur_log_probs, axis=1, reverse=True)
  log_surv = jnp.concatenate([log_surv, jnp.full((num_states, 1), -jnp.inf,
                                                 log_surv.dtype)], axis=1)
  reachable = jnp.isfinite(log_surv[:, :-1])
  log_stay = jnp.where(reachable, log_surv[:, 1:] - log_surv[:, :-1], -jnp.inf)
  log_end = jnp.where(reachable, dur_log_probs - log_surv[:, :-1], -jnp.inf)
  log_trans = jnp.log(transition)
  neg_inf = jnp.asarray(-jnp.inf, log_likes.dtype)

  def forward(delta_prev, inputs):
    ll_t, moves_t = inputs
    ended = delta_prev + log_end                                 # (K, D)
    best_elapsed = jnp.argmax(ended, axis=1)                     # (K,)
    ended_best = jnp.max(ended, axis=1)
    scores = ended_best[:, None] + log_trans
    jumped = jnp.max(scores, axis=0)
    from_state = jnp.argmax(scores, axis=0)
    stayed = delta_prev[:, :-1] + log_stay[:, :-1]
    moved = jnp.concatenate([jumped[:, None], stayed], axis=1)
    carried = jnp.where(moves_t, moved, delta_prev)
    delta = carried + ll_t[:, None]
    # An impossible step (every score -inf) carries no evidence.
    delta = jnp.where(jnp.max(delta) > -jnp.inf, delta, carried)
    # Subtracting the max keeps float32 precise at any T without changing argmax.
    top = jnp.max(delta)
    delta = delta - jnp.where(jnp.isfinite(top), top, 0.0)
    return delta, (from_state, best_elapsed)

  start = jnp.full((num_states, max_duration), neg_inf).at[:, 0].set(jnp.log(initial))
  delta, (from_state, best_elapsed) = jax.lax.scan(forward, start, (log_likes, moves))
  last = jnp.argmax(delta.reshape(-1))
  last_state, last_elapsed = last // max_duration, last % max_duration

  def backtrack(carry, inputs):
    state, elapsed = carry
    from_state_t, best_elapsed_t, moves_t = inputs
    prev_state = jnp.where(elapsed == 0, from_state_t[state], state)
    prev_elapsed = jnp.where(elapsed == 0, best_elapsed_t[from_state_t[state]], elapsed - 1)
    prev = (jnp.where(moves_t, prev_state, state), jnp.where(moves_t, prev_elapsed, elapsed))
    return prev, state

  (first, _), path = jax.lax.scan(
      backtrack, (last_state, last_elapsed), (from_state[1:], best_elapsed[1:], moves[1:]),
      reverse=True)
  return jnp.concatenate([first[None], path]).astype(jnp.int32)


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------


def _inverse_cdf(probs, uniform):
  """Index drawn from ``probs: (..., N)`` given ``uniform: (...)`` in [0, 1).

  The CDF is divided by its last entry so it ends at exactly 1: a zero-
  probability entry (such as the transition diagonal) can never be drawn,
  whatever the rounding.
  """
  cdf = jnp.cumsum(probs, axis=-1)
  cdf = cdf / cdf[..., -1:]
  return jnp.sum(uniform[..., None] >= cdf[..., :-1], axis=-1).astype(jnp.int32)


@struct.dataclass
class HSMM(ChainModel):
  """Explicit-duration hidden semi-Markov model parameters (a pytree).

  initial: (K,) distribution of the first segment's state.
  transition: (K, K) row-stochastic with a zero diagonal:
    ``transition[i, j] = p(next segment is j | segment i ended)``.
  duration: a :class:`~dennl_jax.families.DurationFamily` with K states and
    maximum duration D (e.g. :class:`~dennl_jax.durations.PoissonDuration`).
  emission: an :class:`~dennl_jax.families.EmissionFamily` with K states.

  Implements the model protocol of :class:`dennl_jax.HMM`, so every public
  function (``log_likelihood``, ``smoothed_posteriors``, ``viterbi``,
  ``sample``, ``em_step``, ``fit_em``, ``validate``) accepts it.
  kernels, users_per_block: static; what ``jax.vmap`` of its inference runs
  (:class:`~dennl_jax.Kernels`), as for :class:`~dennl_jax.HMM`.  A batch of
  per-user models is the same pytree with a leading user axis.
  """
  initial: jax.Array = param(Simplex())
  transition: jax.Array = param(Simplex(zero_diagonal=True))
  duration: DurationFamily
  emission: EmissionFamily
  kernels: str = struct.field(pytree_node=False, default="auto")
  users_per_block: Optional[int] = struct.field(pytree_node=False, default=None)

  @property
  def max_duration(self) -> int:
    return self.duration.max_duration

  def _inputs(self, obs, mask):
    log_likes = masked_log_likelihoods(self.emission, obs, mask)
    return self.initial, self.transition, self.duration.log_probs(), log_likes, mask

  def posterior(self, obs, mask) -> HSMMPosterior:
    return hsmm_smoother(*self._inputs(obs, mask), self.kernel_options)

  def _e_step(self, obs, mask, symmetric_vjp: bool) -> HSMMPosterior:
    ll, (d_initial, d_transition, duration_counts, d_log_likes) = hsmm_score(
        *self._inputs(obs, mask), symmetric_vjp, self.kernel_options)
    return HSMMPosterior(ll, None, d_log_likes, self.transition * d_transition,
                         self.initial * d_initial, duration_counts)

  def log_likelihood(self, obs, mask):
    # Differentiated through the score (dennl_jax._score.with_score_jvp).
    *inputs, mask = self._inputs(obs, mask)
    return _score_functions(self.kernel_options)[1](*inputs, jnp.asarray(mask, bool))

  def filtered_posteriors(self, obs, mask):
    return hsmm_filter(*self._inputs(obs, mask), self.kernel_options)[1]

  def most_likely_states(self, obs, mask):
    return hsmm_viterbi(*self._inputs(obs, mask))

  def forecast_states(self, obs, mask, num_steps: int):
    """(num_steps, K) p(z_{t*+h} | valid obs), h = 1 ... num_steps, t* the last valid step.

    Duration-aware: the filter's joint over (state, remaining duration) at t*
    is the posterior of the censored last segment's remaining duration
    (its total is only known to be >= the steps seen), and the blank steps
    propagate it through the semi-Markov dynamics.
    """
    initial, transition, dur_log_probs, log_likes, mask = self._inputs(obs, mask)
    log_likes, mask = append_blank_steps(log_likes, mask, num_steps)
    return hsmm_filter(initial, transition, dur_log_probs, log_likes, mask,
                       self.kernel_options)[1][-num_steps:]

  def _extra_m_step(self, post) -> dict:
    return {"duration": self.duration.m_step(post.duration_counts)}

  def _sample_states(self, key, num_steps: int):
    """The process cut off after T steps (right-censored last segment)."""
    key_path, key_obs = jax.random.split(key)
    num_states = self.num_states
    # One uniform draw for the whole path, turned into categorical draws by
    # inverse CDF: every jax.random call compiles its own hash kernel, which
    # dominates compile time here.  For every step and every possible state
    # we draw where a segment ending there would jump and how long a segment
    # starting there would last; the scan then only selects.
    uniforms = jax.random.uniform(key_path, (num_steps + 1, 2, num_states),
                                  self.transition.dtype)
    first = _inverse_cdf(self.initial, uniforms[-1, 0, 0])
    jump_to = _inverse_cdf(self.transition, uniforms[:-1, 0])         # (T, K)
    lengths = _inverse_cdf(jnp.exp(self.duration.log_probs()), uniforms[:-1, 1]) + 1

    def step(carry, draws_t):
      state, left = carry
      jump_to_t, lengths_t = draws_t
      jumped = jump_to_t[state]
      ends = left == 1
      nxt = (jnp.where(ends, jumped, state), jnp.where(ends, lengths_t[jumped], left - 1))
      return nxt, nxt[0]

    _, rest = jax.lax.scan(step, (first, lengths[0, first]), (jump_to[1:], lengths[1:]))
    return jnp.concatenate([first[None], rest]).astype(jnp.int32), key_obs

  def _check_num_states(self, num_states: int) -> None:
    if num_states < 2:
      raise ValueError("HSMM needs at least 2 states (a state never jumps to itself)")
