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
float32).  Viterbi uses the equivalent *elapsed-time* representation (state,
steps spent so far) in log space, where the censored last segment's survivor
term falls out of the product of continuation probabilities, so it returns
the exact most likely state path (= segmentation) of the right-censored model.

Masks behave exactly as for HMMs: a masked step is removed from the sequence
(identity step: it neither emits nor consumes duration), so padding anywhere
equals the compressed sequence.

:func:`expand_to_hmm` builds the dense (K D)-state HMM of the same model; it
is the oracle for the tests and the baseline of the benchmark.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.scipy.special import gammaln, xlogy

from dennl_jax import _checks
from dennl_jax.emissions import MIN_STATE_MASS, floored_log
from dennl_jax.hmm import (HMM, append_blank_steps, hmm_smoother, masked_log_likelihoods,
                           normalize_counts, step_structure)

# Number of damped Newton iterations of the truncated-Poisson M-step.  The
# objective is concave in the log-rate and the start is the untruncated
# estimate, so a handful suffices; 30 reaches float64 round-off for D >= 2.
_POISSON_NEWTON_ITERS = 30


# --------------------------------------------------------------------------
# Duration families
# --------------------------------------------------------------------------


@struct.dataclass
class PoissonDuration:
  """Shifted, truncated Poisson durations: ``p_k(d) ∝ Poisson(d - 1; rate[k])``.

  rate: (K,) positive.  Support ``d = 1 ... max_duration`` (shifted by one so
  every stay lasts at least one step), renormalised over that truncated
  support.  ``max_duration`` (D) is static: it fixes array shapes.  Choose D
  well above the largest expected duration (e.g. ``rate + 5 sqrt(rate)``);
  otherwise a long stay is forced to split into segments of other states.

  M-step: the exact maximum-likelihood rate of the *truncated* distribution
  given expected duration counts (corrected for truncation): the truncated
  Poisson is an exponential family in ``log rate``, so we solve
  ``E_rate[d - 1 | d <= D] = mean of (d - 1) under the counts`` by damped
  Newton steps on ``log rate`` started at the untruncated estimate (the plain
  moment estimate, which is already the answer when truncation is
  negligible).  Exactness keeps EM monotone.
  """
  rate: jax.Array
  max_duration: int = struct.field(pytree_node=False)

  @property
  def num_states(self) -> int:
    return self.rate.shape[-1]

  def log_probs(self):
    """(K, D) ``log p_k(d)`` for ``d = 1 ... D`` (column d-1)."""
    rate = jnp.asarray(self.rate)
    shifted = jnp.arange(self.max_duration, dtype=rate.dtype)
    unnorm = xlogy(shifted, rate[:, None]) - gammaln(shifted + 1.0)
    return unnorm - jax.nn.logsumexp(unnorm, axis=-1, keepdims=True)

  def m_step(self, duration_counts):
    """New family from expected counts ``duration_counts: (K, D)``."""
    counts = jnp.asarray(duration_counts, jnp.asarray(self.rate).dtype)
    shifted = jnp.arange(self.max_duration, dtype=counts.dtype)
    mass = counts.sum(-1)
    has_mass = mass > MIN_STATE_MASS
    target = jnp.sum(counts * shifted, -1) / jnp.where(has_mass, mass, 1.0)
    tiny = jnp.finfo(counts.dtype).tiny
    # A mean at the upper end of the support has an infinite MLE; a cap on
    # log-rate keeps it finite (the fitted distribution is then all mass at D).
    max_log_rate = jnp.log(jnp.asarray(1e3 * self.max_duration + 1e3, counts.dtype))
    log_tiny = jnp.log(jnp.asarray(tiny, counts.dtype))
    # The solve sees a gradient-free copy of the target: even with its
    # output stop-gradiented, a scan that reads a differentiated input is
    # transposed with instantiated zero cotangents under vmap, and 0 * inf
    # from the tiny floors below would give NaN.
    fixed_target = jax.lax.stop_gradient(target)
    log_rate = jnp.clip(jnp.log(jnp.maximum(fixed_target, tiny)), log_tiny, max_log_rate)
    base = -gammaln(shifted + 1.0)

    def newton(log_rate, _):
      probs = jax.nn.softmax(shifted * log_rate[:, None] + base, axis=-1)
      mean = probs @ shifted
      var = probs @ (shifted * shifted) - mean * mean
      step = (fixed_target - mean) / jnp.maximum(var, tiny)
      step = jnp.clip(step, -1.0, 1.0)
      return jnp.clip(log_rate + step, log_tiny, max_log_rate), None

    # The Newton iterations are not differentiated through (their clips and
    # tiny floors give inf * 0 = NaN gradients).  The derivative is supplied
    # by the implicit function theorem instead: at the fixed point
    # mean(log_rate) = target, so d log_rate / d target = 1 / Var(d - 1).
    # `correction - stop_gradient(correction)` is zero in value and carries
    # exactly that derivative.
    log_rate, _ = jax.lax.scan(newton, log_rate, None, length=_POISSON_NEWTON_ITERS)
    probs = jax.nn.softmax(shifted * log_rate[:, None] + base, axis=-1)
    mean = probs @ shifted
    var = probs @ (shifted * shifted) - mean * mean
    # Where the rate sits on a clip bound the variance vanishes; no gradient there.
    inv_var = jnp.where(var > 1e-6, 1.0 / jnp.maximum(var, 1e-6), 0.0)
    correction = (target - mean) * inv_var
    log_rate = log_rate + correction - jax.lax.stop_gradient(correction)
    # A zero mean has MLE rate 0; the floor keeps log-probabilities finite.
    has_target = target > MIN_STATE_MASS
    rate = jnp.where(has_target, jnp.exp(jnp.where(has_target, log_rate, 0.0)), tiny)
    # States with no expected segment, or D == 1 (rate unidentifiable), keep theirs.
    keep = ~has_mass | (self.max_duration == 1)
    return PoissonDuration(jnp.where(keep, self.rate, rate), self.max_duration)

  def check_parameters(self):
    if not isinstance(self.max_duration, (int, np.integer)) or self.max_duration < 1:
      raise ValueError(
          f"PoissonDuration.max_duration must be a positive int, got {self.max_duration!r}")
    _checks.check_shape("PoissonDuration.rate", self.rate, (None,))
    _checks.check_positive("PoissonDuration.rate", self.rate)

  def to_unconstrained(self):
    return PoissonDuration(floored_log(self.rate), self.max_duration)

  @staticmethod
  def from_unconstrained(theta: "PoissonDuration"):
    return PoissonDuration(jnp.exp(theta.rate), theta.max_duration)


@struct.dataclass
class CategoricalDuration:
  """Non-parametric durations: ``probs[k, d - 1] = p_k(d)``, d = 1 ... D.

  probs: (K, D), rows sum to one; D = ``probs.shape[1]``.  The M-step
  normalises the expected duration counts (states without mass keep theirs).
  """
  probs: jax.Array

  @property
  def num_states(self) -> int:
    return self.probs.shape[-2]

  @property
  def max_duration(self) -> int:
    return self.probs.shape[-1]

  def log_probs(self):
    return jnp.log(self.probs)

  def m_step(self, duration_counts):
    return CategoricalDuration(normalize_counts(
        jnp.asarray(duration_counts, self.probs.dtype), self.probs))

  def check_parameters(self):
    _checks.check_shape("CategoricalDuration.probs", self.probs, (None, None))
    _checks.check_distribution("CategoricalDuration.probs", self.probs, axis=-1)

  def to_unconstrained(self):
    return CategoricalDuration(floored_log(self.probs))

  @staticmethod
  def from_unconstrained(theta: "CategoricalDuration"):
    return CategoricalDuration(jax.nn.softmax(theta.probs, axis=-1))


DURATION_FAMILIES = (PoissonDuration, CategoricalDuration)


# --------------------------------------------------------------------------
# Structured recursions
# --------------------------------------------------------------------------


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


def _scaled_likelihoods(log_likes):
  shift = jnp.max(log_likes, axis=-1)
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  return jnp.exp(log_likes - shift[:, None]), shift


def _fill_leading(per_step, mask):
  """Steps before the first valid one report the first valid step's value.

  A masked step carries the state of the sequence; before the first valid
  step that is the state *at* the first valid step, so its smoothed
  posterior is copied back (the raw alpha * beta there is not normalised).
  """
  before_first = jnp.cumsum(mask) == 0
  first_value = per_step[jnp.argmax(mask)]
  shape = before_first.shape + (1,) * (per_step.ndim - 1)
  return jnp.where(before_first.reshape(shape), first_value[None], per_step)


def _count_down(joint):
  """(K, D) -> (K, D): mass at remaining r+1 moves to r; nothing enters r = D."""
  return jnp.concatenate([joint[:, 1:], jnp.zeros_like(joint[:, :1])], axis=1)


def _forward(initial, transition, dur_probs, likes, shift, moves, mask, keep_joint=True):
  """Scaled forward pass over (state, remaining).

  Returns filtered (T, K, D) -- or, with ``keep_joint=False``, only its state
  marginals (T, K), which saves the dominant memory traffic -- the per-step
  normalisers (T,) and the log-likelihood.
  """

  def step(alpha_prev, inputs):
    b_t, moves_t, valid_t = inputs
    # Only segments with one step left can jump; the jump draws a new duration.
    jump_in = alpha_prev[:, 0] @ transition
    pred = jnp.where(moves_t, _count_down(alpha_prev) + jump_in[:, None] * dur_probs,
                     alpha_prev)
    unnorm = pred * b_t[:, None]
    norm = jnp.sum(unnorm)
    alpha = jnp.where(valid_t, unnorm / norm, pred)
    return alpha, (alpha if keep_joint else alpha.sum(-1), jnp.where(valid_t, norm, 1.0))

  start = initial[:, None] * dur_probs
  _, (filtered, norms) = jax.lax.scan(step, start, (likes, moves, mask))
  log_likelihood = jnp.sum(jnp.where(mask, jnp.log(norms) + shift, 0.0))
  return filtered, norms, log_likelihood


def _backward(transition, dur_probs, alphas, likes, norms, moves, is_first):
  """Scaled backward pass fused with every expectation the M-step needs.

  Consumes the stored forward messages ``alphas: (T, K, D)`` and returns only
  reductions -- smoothed state marginals (T, K) and (K, D)/(K, K) count
  accumulators -- so no other (T, K, D) array is materialised (on CPU the
  cost of the pass is memory traffic, not arithmetic).  beta_T = 1 for every
  (k, r): the last segment may continue past T with any remaining duration,
  which is what makes it right-censored.
  """

  def step(carry, inputs):
    beta_next, entered, jumps, first = carry
    alpha_t, b_next, norm_next, moves_next, is_first_t = inputs
    # msg(j, d) = b_{t+1}(j) beta_{t+1}(j, d) / c_{t+1}: backward weight of
    # being in (j, d) at t+1.  A jump i -> j at t+1 with duration d has
    # posterior mass alpha_t(i, 1) A_ij p_j(d) msg(j, d).
    msg = b_next[:, None] * beta_next / norm_next
    entry = jnp.sum(dur_probs * msg, axis=1)                     # (K,)
    moved = jnp.concatenate([(transition @ entry)[:, None], msg[:, :-1]], axis=1)
    beta = jnp.where(moves_next, moved, beta_next)
    ending = alpha_t[:, 0] * moves_next
    entered = entered + (ending @ transition)[:, None] * msg
    jumps = jumps + ending[:, None] * entry[None, :]
    joint = alpha_t * beta
    first = first + is_first_t * joint
    return (beta, entered, jumps, first), joint.sum(-1)

  num_states, max_duration = dur_probs.shape
  dtype = alphas.dtype
  init = (jnp.ones((num_states, max_duration), dtype),
          jnp.zeros((num_states, max_duration), dtype),
          jnp.zeros((num_states, num_states), dtype),
          is_first[-1] * alphas[-1])
  (_, entered, jumps, first), smoothed = jax.lax.scan(
      step, init, (alphas[:-1], likes[1:], norms[1:], moves[1:], is_first[:-1]),
      reverse=True)
  smoothed = jnp.concatenate([smoothed, alphas[-1].sum(-1)[None]], axis=0)
  duration_counts = first + dur_probs * entered
  return smoothed, duration_counts, transition * jumps, first.sum(-1)


def hsmm_filter(initial, transition, dur_log_probs, log_likes, mask):
  """Filtered state marginals and log-likelihood.

  initial: (K,), transition: (K, K), dur_log_probs: (K, D), log_likes: (T, K),
  mask: (T,) bool.  Returns (log_likelihood: (), filtered_probs: (T, K)).
  """
  mask = jnp.asarray(mask, bool)
  moves, _ = step_structure(mask)
  likes, shift = _scaled_likelihoods(log_likes)
  filtered, _, ll = _forward(initial, transition, jnp.exp(dur_log_probs), likes, shift,
                             moves, mask, keep_joint=False)
  return ll, filtered


def hsmm_smoother(initial, transition, dur_log_probs, log_likes, mask) -> HSMMPosterior:
  """Forward-backward on one masked sequence; see :class:`HSMMPosterior`.

  Shapes as in :func:`hsmm_filter`.  Cost O(T K (K + D)).
  """
  mask = jnp.asarray(mask, bool)
  moves, is_first = step_structure(mask)
  likes, shift = _scaled_likelihoods(log_likes)
  dur_probs = jnp.exp(dur_log_probs)
  alphas, norms, ll = _forward(initial, transition, dur_probs, likes, shift, moves, mask)
  smoothed, duration_counts, transition_counts, initial_probs = _backward(
      transition, dur_probs, alphas, likes, norms, moves,
      is_first.astype(alphas.dtype))
  return HSMMPosterior(ll, alphas.sum(-1), _fill_leading(smoothed, mask), transition_counts,
                       initial_probs, duration_counts)


def hsmm_viterbi(initial, transition, dur_log_probs, log_likes, mask):
  """Most likely state path (T,) int32 of the right-censored model.

  Runs over (state, elapsed time in segment) pairs: staying one more step
  costs ``log S(e+1) - log S(e)`` and ending a segment after ``e`` steps costs
  ``log p(e) - log S(e)`` (S the survivor function), so a path's score is its
  exact joint log-probability, including ``log S(l)`` for the censored last
  segment.  With a zero-diagonal transition a state path determines its
  segmentation, so this is also the most likely segmentation.  Masked steps
  repeat the carried state.
  """
  mask = jnp.asarray(mask, bool)
  moves, _ = step_structure(mask)
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
    delta = jnp.where(moves_t, moved, delta_prev) + ll_t[:, None]
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


def _off_diagonal_softmax(logits):
  """Row softmax over the off-diagonal entries; the diagonal is exactly 0."""
  num_states = logits.shape[-1]
  off = ~jnp.eye(num_states, dtype=bool)
  top = jnp.max(jnp.where(off, logits, -jnp.inf), axis=-1, keepdims=True)
  weights = jnp.where(off, jnp.exp(jnp.where(off, logits - top, 0.0)), 0.0)
  return weights / jnp.sum(weights, axis=-1, keepdims=True)


@struct.dataclass
class HSMM:
  """Explicit-duration hidden semi-Markov model parameters (a pytree).

  initial: (K,) distribution of the first segment's state.
  transition: (K, K) row-stochastic with a zero diagonal:
    ``transition[i, j] = p(next segment is j | segment i ended)``.
  duration: a duration family (:class:`PoissonDuration` or
    :class:`CategoricalDuration`) with K states and maximum duration D.
  emission: any emission family of :mod:`dennl_jax.emissions`.

  Implements the model protocol of :class:`dennl_jax.HMM`, so every public
  function (``log_likelihood``, ``smoothed_posteriors``, ``viterbi``,
  ``sample``, ``em_step``, ``fit_em``, ``validate``) accepts it.  A batch of
  per-user models is the same pytree with a leading user axis.
  """
  initial: jax.Array
  transition: jax.Array
  duration: object
  emission: object

  @property
  def num_states(self) -> int:
    return self.initial.shape[-1]

  @property
  def max_duration(self) -> int:
    return self.duration.max_duration

  def _inputs(self, obs, mask):
    log_likes = masked_log_likelihoods(self.emission, obs, mask)
    return self.initial, self.transition, self.duration.log_probs(), log_likes, mask

  def posterior(self, obs, mask) -> HSMMPosterior:
    return hsmm_smoother(*self._inputs(obs, mask))

  def log_likelihood(self, obs, mask):
    return hsmm_filter(*self._inputs(obs, mask))[0]

  def filtered_posteriors(self, obs, mask):
    return hsmm_filter(*self._inputs(obs, mask))[1]

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
    return hsmm_filter(initial, transition, dur_log_probs, log_likes, mask)[1][-num_steps:]

  def em_update_from_posterior(self, post, obs, mask):
    """The M-step given posterior summaries (shared with the dense oracle)."""
    mask = jnp.asarray(mask, bool)
    weights = jnp.where(mask[:, None], post.smoothed_probs, 0.0)
    obs = jnp.where(mask.reshape(mask.shape + (1,) * (jnp.ndim(obs) - 1)), obs,
                    jnp.zeros_like(obs))
    stats = self.emission.expected_statistics(obs, weights)
    return HSMM(
        initial=post.initial_probs / jnp.sum(post.initial_probs),
        transition=normalize_counts(post.transition_counts, self.transition),
        duration=self.duration.m_step(post.duration_counts),
        emission=self.emission.m_step(stats),
    )

  def em_update(self, obs, mask):
    """One EM iteration; returns (new params, log-likelihood before)."""
    mask = jnp.asarray(mask, bool)
    post = self.posterior(obs, mask)
    return self.em_update_from_posterior(post, obs, mask), post.log_likelihood

  def sample(self, key, num_steps: int):
    """(states: (T,) int32, obs: (T, ...)): the process cut off after T steps."""
    # numpy leaves cannot be indexed by the traced states below.
    self = jax.tree_util.tree_map(jnp.asarray, self)
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
    states = jnp.concatenate([first[None], rest]).astype(jnp.int32)
    obs = jax.vmap(self.emission.sample)(jax.random.split(key_obs, num_steps), states)
    return states, obs

  def check_parameters(self):
    num_states = self.initial.shape[-1]
    _checks.check_shape("HSMM.initial", self.initial, (num_states,))
    _checks.check_shape("HSMM.transition", self.transition, (num_states, num_states))
    if num_states < 2:
      raise ValueError("HSMM needs at least 2 states (a state never jumps to itself)")
    for name, family in (("duration", self.duration), ("emission", self.emission)):
      if family.num_states != num_states:
        raise ValueError(
            f"{name} has {family.num_states} states but HSMM.initial has {num_states}")
    _checks.check_distribution("HSMM.initial", self.initial)
    diagonal = np.diagonal(np.asarray(self.transition))
    if np.any(diagonal != 0):
      raise ValueError(
          "HSMM.transition must have a zero diagonal (a segment never jumps to its own "
          f"state); found diagonal {diagonal}")
    _checks.check_distribution("HSMM.transition", self.transition, axis=-1)
    self.duration.check_parameters()
    self.emission.check_parameters()

  def to_unconstrained(self):
    """Finite unconstrained leaves; the transition's diagonal is stored as 0."""
    off = ~jnp.eye(self.num_states, dtype=bool)
    return HSMM(floored_log(self.initial),
                jnp.where(off, floored_log(self.transition), 0.0),
                self.duration.to_unconstrained(),
                self.emission.to_unconstrained())

  def from_unconstrained(self, theta: "HSMM"):
    """Inverse of :meth:`to_unconstrained`; theta's diagonal is ignored."""
    return HSMM(jax.nn.softmax(theta.initial, axis=-1),
                _off_diagonal_softmax(theta.transition),
                type(self.duration).from_unconstrained(theta.duration),
                type(self.emission).from_unconstrained(theta.emission))


# --------------------------------------------------------------------------
# The dense oracle: the same model as an HMM over K * D states
# --------------------------------------------------------------------------


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
  joint = _fill_leading(post.smoothed_probs, mask).reshape(num_steps, num_states,
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
  """``hsmm.em_update`` computed through the dense (K D)-state HMM smoother."""
  mask = jnp.asarray(mask, bool)
  post = expanded_posterior(hsmm, obs, mask)
  return hsmm.em_update_from_posterior(post, obs, mask), post.log_likelihood
