"""Numerics shared by the emission families, the duration families and both models.

Every kernel here exists once; HMM and HSMM code calls it rather than
repeating it (no twin code).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# States whose expected occupancy is below this many time steps are treated
# as empty and keep their parameters.  Testing `mass > 0` is not enough for
# gradients: the backward pass of counts / mass has a 1 / mass**2 term that
# overflows for masses like 1e-30 (common with many states on short
# sequences), and inf * 0 = NaN then poisons every gradient of the layer.
MIN_STATE_MASS = 1e-6


def floored_log(x):
  """log with a floor at the smallest normal number, so the result is finite.

  Used for unconstrained coordinates: a probability that is exactly 0 (e.g.
  an EM output for a symbol the user never emitted) must not give -inf,
  whose gradient is NaN.
  """
  return jnp.log(jnp.maximum(x, jnp.finfo(jnp.asarray(x).dtype).tiny))


def keep_where_empty(mass, new, old):
  """Per-state fallback: states with (almost) no posterior mass keep old values.

  mass: (K,); new, old: (K, ...).
  """
  has_mass = mass > MIN_STATE_MASS
  shape = has_mass.shape + (1,) * (new.ndim - has_mass.ndim)
  return jnp.where(has_mass.reshape(shape), new, old)


def safe_div(num, den):
  """num / den, with den at or below MIN_STATE_MASS replaced by 1.

  The caller discards those entries with :func:`keep_where_empty`; replacing
  the denominator (not just the result) keeps the gradient finite there.
  num: (K, ...); den: (K,).
  """
  den_ok = den > MIN_STATE_MASS
  shape = den.shape + (1,) * (num.ndim - den.ndim)
  den_safe = jnp.where(den_ok, den, 1.0).reshape(shape)
  return num / den_safe


def normalize_counts(counts, fallback):
  """Row-normalise expected counts ``(K, N)``; rows with (almost) no mass keep ``fallback``.

  The threshold is ``MIN_STATE_MASS`` (see above for why it is not 0).
  """
  mass = counts.sum(-1, keepdims=True)
  has_mass = mass > MIN_STATE_MASS
  return jnp.where(has_mass, counts / jnp.where(has_mass, mass, 1.0), fallback)


def scaled_likelihoods(log_likes):
  """``(exp(log_likes - m_t), m_t)`` with ``m_t`` the per-step max: (T, K), (T,).

  A step where every state has likelihood 0 keeps shift 0, so no NaN appears.
  Every user of the pair adds ``m_t`` back (or normalises it away), so it
  carries no gradient: differentiating the max would divide by the number of
  entries equal to it, and XLA may recompute the fused operand with other
  rounding (at -O0 on CPU none matched: 0/0 = NaN gradients).
  """
  shift = jax.lax.stop_gradient(jnp.max(log_likes, axis=-1))
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  return jnp.exp(log_likes - shift[:, None]), shift


def log_max(dtype):
  """``floor(log(finfo(dtype).max))`` (88 in float32, 709 in float64): ``exp`` of it is
  finite after rounding, which ``exp(log(max))`` itself is not always."""
  return float(np.floor(np.log(np.finfo(dtype).max)))


def clamp_finite(x):
  """``x`` with values above the largest finite float (``+inf``) replaced by it.

  The backward messages of a state that no path reaches may be astronomically
  large (its future fits far better than the reachable states'); they only
  ever meet a zero forward or transition weight, but ``inf * 0`` is NaN while
  ``finfo.max * 0`` is 0.  A ``where`` (not ``minimum``): its JVP selects, so a
  non-finite tangent of a clamped entry is dropped rather than multiplied by 0.
  NaN stays NaN.
  """
  big = jnp.finfo(jnp.asarray(x).dtype).max
  return jnp.where(x > big, big, x)


def step_scaling(reachable, log_likes_t, max_over_states=None):
  """Per-step emission scaling relative to the best *reachable* state.

  reachable: (K, ...) bool, the states with positive predicted mass at this
  step; log_likes_t: (K, ...) their emission log-likelihoods.  Returns
  ``(b, shift, possible)``: ``b = exp(min(log_likes_t - shift, log_max))``
  (K, ...), ``shift`` (...) the maximum log-likelihood over reachable states
  (0 where there is none), and ``possible`` (...) whether some reachable state
  can emit the observation.

  Why not the maximum over all states (:func:`scaled_likelihoods`): if the
  state that fits best is unreachable and every reachable state fits worse by
  more than ~87 nats (float32; ~745 in float64), every ``pred * b`` underflows
  to 0 and the normaliser is 0/0.  Relative to the best reachable state its
  ``b`` is 1, so the normaliser is at least that state's predicted mass.  An
  unreachable state that fits far better gets a huge but finite ``b`` (capped
  at ``finfo.max``), and ``pred * b = 0 * b = 0`` for it.  The shift carries no
  gradient (see :func:`scaled_likelihoods`); every user adds it back.
  ``max_over_states``: the reduction over the leading axis (default
  ``jnp.max(x, axis=0)``; the users-minor kernels pass an unrolled one).
  """
  max_over_states = max_over_states or (lambda x: jnp.max(x, axis=0))
  shift = jax.lax.stop_gradient(max_over_states(jnp.where(reachable, log_likes_t, -jnp.inf)))
  possible = shift > -jnp.inf
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  diff = log_likes_t - shift
  diff = jnp.where(diff > log_max(diff.dtype), log_max(diff.dtype), diff)
  return jnp.exp(diff), shift, possible


def scaled_step(pred, b, shift, possible, valid, state_sum=jnp.sum):
  """One valid-or-masked step of a scaled forward pass.

  pred: the predicted state probabilities (K, ...) (for an HSMM, the state
  marginal of the predicted joint); b, shift, possible from
  :func:`step_scaling`; valid: whether the step is valid; state_sum: the sum
  over the leading axis.  Returns ``(alpha, b_used, norm, term, ok)``: the
  filtered state probabilities, the emission factor and normaliser the
  backward pass must use (ones on masked and impossible steps), the step's
  log-likelihood term ``log c_t + shift`` (0 on masked steps, ``-inf`` on
  impossible ones), and whether the step is valid and possible (an HSMM
  normalises its joint with ``norm`` where ``ok``).

  Impossible step (no reachable state can emit the observation): the
  log-likelihood is ``-inf`` from there on; the step is treated as carrying
  no evidence (``alpha_t = pred``, ``b = 1``, ``c = 1``), so every output stays
  finite and the posteriors are those of the sequence with the impossible
  steps' observations dropped (the state still moves across them).
  """
  unnorm = pred * b
  norm = state_sum(unnorm)
  ok = valid & possible & (norm > 0)
  norm = jnp.where(ok, norm, 1.0)
  alpha = jnp.where(ok, normalize(unnorm, norm), pred)
  term = jnp.where(valid, jnp.where(ok, jnp.log(norm) + shift, -jnp.inf), 0.0)
  return alpha, jnp.where(ok, b, 1.0), norm, term, ok


@jax.custom_jvp
def normalize(unnorm, norm):
  """``unnorm / norm`` whose derivative never squares the normaliser.

  The scaled forward-backward recursions divide by per-step normalisers that
  can be tiny (2.5e-25 was seen in float32 training) while every value stays
  finite.  JAX differentiates ``x / y`` in ``y`` as ``-x * y**-2``: ``y**2``
  underflows to 0, ``y**-2`` is inf and ``inf * 0`` is NaN -- a NaN gradient
  with a finite loss.  The JVP here is ``(d_unnorm - p * d_norm) / norm`` with
  ``p = unnorm / norm``: the same derivative, divided by ``norm`` once, and
  linear in the tangents, so reverse mode transposes it.  ``norm`` broadcasts
  against ``unnorm``; the value is exactly ``unnorm / norm``.
  """
  return unnorm / norm


@normalize.defjvp
def _normalize_jvp(primals, tangents):
  unnorm, norm = primals
  d_unnorm, d_norm = tangents
  out = unnorm / norm
  return out, (d_unnorm - out * d_norm) / norm


@jax.custom_jvp
def normalize_capped(unnorm, norm):
  """``min(unnorm / norm, finfo.max)``: :func:`normalize` for backward messages.

  ``unnorm`` may overflow to inf (a capped message times a huge emission
  factor of an unreachable state).  Capping after :func:`normalize` would keep
  the value finite but not its derivatives: the transposed JVP multiplies the
  (infinite) quotient by the zero cotangent of the capped entry, NaN.  Here
  the JVP is zero on capped entries and uses the capped quotient elsewhere,
  so every derivative is finite where the inputs are.
  """
  return clamp_finite(unnorm / norm)


@normalize_capped.defjvp
def _normalize_capped_jvp(primals, tangents):
  unnorm, norm = primals
  d_unnorm, d_norm = tangents
  raw = unnorm / norm
  big = jnp.finfo(raw.dtype).max
  capped = raw > big
  out = jnp.where(capped, big, raw)
  return out, jnp.where(capped, 0.0, (d_unnorm - out * d_norm) / norm)


def fill_masked(obs, mask):
  """``obs: (T, ...)`` with masked steps replaced by zeros.

  A garbage value on a padded step (NaN, out of range) must not reach a
  likelihood or a statistic: even multiplied by a zero weight or discarded
  by ``where`` it would poison gradients.  Zero is a valid observation of
  every family in this package.
  """
  mask = jnp.asarray(mask, bool)
  obs = jnp.asarray(obs)
  return jnp.where(mask.reshape(mask.shape + (1,) * (obs.ndim - 1)), obs, jnp.zeros_like(obs))


def step_structure(mask):
  """Which steps apply the transition, and which step comes first.

  mask: (T,) bool -> (moves: (T,) bool, is_first: (T,) bool).  ``moves[t]``
  is true when step t is valid and some earlier step was valid: a masked
  step is removed from the sequence (identity transition), which is what
  makes padding anywhere equal the compressed sequence.
  """
  mask = jnp.asarray(mask, bool)
  seen_before = (jnp.cumsum(mask) - mask) > 0
  return mask & seen_before, mask & ~seen_before


def append_blank_steps(log_likes, mask, num_steps: int):
  """Append ``num_steps`` valid steps that carry no evidence (log b = 0).

  log_likes: (T, K), mask: (T,) bool -> ((T + H, K), (T + H,)).  Masked steps
  are removed from the sequence, so the first appended step directly follows
  the last valid one; a filter run over the result reports, on the appended
  steps, the predictive p(z_{t*+h} | valid observations).  Forecasting this
  way reuses each model's own filter instead of a second copy of its dynamics.
  """
  blank = jnp.zeros((num_steps, log_likes.shape[-1]), log_likes.dtype)
  return (jnp.concatenate([log_likes, blank]),
          jnp.concatenate([jnp.asarray(mask, bool), jnp.ones(num_steps, bool)]))


def fill_leading(per_step, mask):
  """Steps before the first valid one report the first valid step's value.

  A masked step carries the state of the sequence; before the first valid
  step that is the state *at* the first valid step, so its smoothed
  posterior is copied back (the raw alpha * beta there is not normalised).
  """
  before_first = jnp.cumsum(mask) == 0
  first_value = per_step[jnp.argmax(mask)]
  shape = before_first.shape + (1,) * (per_step.ndim - 1)
  return jnp.where(before_first.reshape(shape), first_value[None], per_step)


def filled_like(value, shape, dtype, *refs):
  """``jnp.full(shape, value, dtype)`` that varies over whatever ``refs`` vary over.

  A scan's initial carry must have the type of its output, and inside
  ``jax.shard_map`` (with its default checks) an array computed from inputs
  that differ across devices is typed as varying; a constant initial carry
  is not.  ``zeros_like``/``full_like`` of the inputs carry their type, and
  their sum is the same constant, so values are unchanged.
  """
  out = jnp.full_like(refs[0], value, dtype=dtype, shape=shape)
  for ref in refs[1:]:
    out = out + jnp.zeros_like(ref, dtype=dtype, shape=shape)
  return out
