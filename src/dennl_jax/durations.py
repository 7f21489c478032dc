"""Duration families of the explicit-duration HSMM: ``p_k(d)`` for ``d = 1 ... D``.

Each is a :class:`~dennl_jax.families.DurationFamily` (the contract, with
shapes): ``log_probs() -> (K, D)`` and ``m_step(duration_counts: (K, D))``,
with its arrays' constraints declared once (both bijections and the
parameter check are derived).  ``D`` (``max_duration``) is static: it fixes
array shapes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.scipy.special import gammaln, xlogy

from dennl_jax import _checks
from dennl_jax._numerics import MIN_STATE_MASS, normalize_counts
from dennl_jax.families import DurationFamily, Positive, Simplex, param

# Damped Newton iterations of the truncated-Poisson M-step.  The objective is
# concave in the log-rate and the start is the untruncated estimate, so a
# handful suffices.  The loop stops once every step is below the tolerance
# (or after the cap), then takes two more: Newton converges quadratically, so a
# step of 1e-4 is followed by ~1e-8 and ~1e-16.  Typical counts need 1-3
# iterations; all mass at d = D (the rate climbs to its cap by clipped unit
# steps) needs 11 at D = 60.  A fixed 30 cost 12-18 % of a vmapped HSMM em_step
# on CPU (BUILD_NOTES "The engine": Poisson duration M-step).
_POISSON_NEWTON_ITERS = 30
_POISSON_NEWTON_TOL = 1e-4


@struct.dataclass
class PoissonDuration(DurationFamily):
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
  rate: jax.Array = param(Positive())
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

    def newton(log_rate):
      probs = jax.nn.softmax(shifted * log_rate[:, None] + base, axis=-1)
      mean = probs @ shifted
      var = probs @ (shifted * shifted) - mean * mean
      step = (fixed_target - mean) / jnp.maximum(var, tiny)
      step = jnp.clip(step, -1.0, 1.0)
      return jnp.clip(log_rate + step, log_tiny, max_log_rate)

    def not_converged(state):
      iters, log_rate, previous = state
      return (iters < _POISSON_NEWTON_ITERS) & jnp.any(
          jnp.abs(log_rate - previous) > _POISSON_NEWTON_TOL)

    def iterate(state):
      iters, log_rate, _ = state
      return iters + 1, newton(log_rate), log_rate

    # The Newton iterations are not differentiated through (their clips and
    # tiny floors give inf * 0 = NaN gradients).  The derivative is supplied
    # by the implicit function theorem instead: at the fixed point
    # mean(log_rate) = target, so d log_rate / d target = 1 / Var(d - 1).
    # `correction - stop_gradient(correction)` is zero in value and carries
    # exactly that derivative.
    _, log_rate, _ = jax.lax.while_loop(not_converged, iterate, (1, newton(log_rate), log_rate))
    log_rate = newton(newton(log_rate))
    probs = jax.nn.softmax(shifted * log_rate[:, None] + base, axis=-1)
    mean = probs @ shifted
    var = probs @ (shifted * shifted) - mean * mean
    # Where the rate sits on a clip bound the variance vanishes; no gradient there.
    inv_var = jnp.where(var > 1e-6, 1.0 / jnp.maximum(var, 1e-6), 0.0)
    correction = (target - mean) * inv_var
    log_rate = log_rate + correction - jax.lax.stop_gradient(correction)
    # A zero mean has MLE rate 0; the floor keeps log-probabilities finite.
    has_target = target > MIN_STATE_MASS
    # (max: exp of a log-rate clipped at log(tiny) may round to a flushed subnormal.)
    rate = jnp.where(has_target, jnp.maximum(jnp.exp(jnp.where(has_target, log_rate, 0.0)), tiny),
                     tiny)
    # States with no expected segment, or D == 1 (rate unidentifiable), keep theirs.
    keep = ~has_mass | (self.max_duration == 1)
    return PoissonDuration(jnp.where(keep, self.rate, rate), self.max_duration)

  def check_parameters(self):
    if not isinstance(self.max_duration, (int, np.integer)) or self.max_duration < 1:
      raise ValueError(
          f"PoissonDuration.max_duration must be a positive int, got {self.max_duration!r}")
    _checks.check_shape("PoissonDuration.rate", self.rate, (None,))
    super().check_parameters()


@struct.dataclass
class CategoricalDuration(DurationFamily):
  """Non-parametric durations: ``probs[k, d - 1] = p_k(d)``, d = 1 ... D.

  probs: (K, D), rows sum to one; D = ``probs.shape[1]``.  The M-step
  normalises the expected duration counts (states without mass keep theirs).
  """
  probs: jax.Array = param(Simplex())

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
    super().check_parameters()


DURATION_FAMILIES = (PoissonDuration, CategoricalDuration)
