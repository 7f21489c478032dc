"""Emission families: per-state observation distributions of an HMM/HSMM.

Every family is a ``flax.struct.dataclass`` whose array fields have a leading
state axis ``K``.  A family implements one small protocol, so a new family is
one new class:

* ``log_likelihoods(obs) -> (T, K)``: ``log b_k(o_t)`` for one sequence.
* ``expected_statistics(obs, weights) -> stats``: sufficient statistics
  weighted by ``weights: (T, K)`` (posterior marginals, zero on padded steps).
* ``m_step(stats) -> family``: the maximum-likelihood update; states that
  received no posterior mass keep their current parameters (never 0/0 = NaN).
* ``sample(key, state) -> obs``: one observation from state ``state``.
* ``check_observations(obs, mask)`` / ``check_parameters()``: concrete-input
  validation raising ``ValueError`` that names the problem.
* ``to_unconstrained()`` / ``from_unconstrained(theta)``: a bijection onto an
  unconstrained space, used to perturb parameters (SPSA) and to build
  parameters from network outputs without leaving the valid domain.
* ``observation_shape(num_steps)`` and ``observation_dtype``: what ``obs`` is.
* ``observation_mean() -> (K, ...)``: the expected observation per state
  (not ``mean``: the Gaussians already have a ``mean`` field).

Observations on padded steps may hold any value; callers replace them with
zeros (valid for every family here) before computing likelihoods so that no
NaN can reach a gradient through a masked branch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.scipy.special import gammaln

from dennl_jax import _checks


def floored_log(x):
  """log with a floor at the smallest normal number, so the result is finite.

  Used for unconstrained coordinates: a probability that is exactly 0 (e.g.
  an EM output for a symbol the user never emitted) must not give -inf,
  whose gradient is NaN.
  """
  return jnp.log(jnp.maximum(x, jnp.finfo(jnp.asarray(x).dtype).tiny))


# States whose expected occupancy is below this many time steps are treated
# as empty and keep their parameters.  Testing `mass > 0` is not enough for
# gradients: the backward pass of counts / mass has a 1 / mass**2 term that
# overflows for masses like 1e-30 (common with many states on short
# sequences), and inf * 0 = NaN then poisons every gradient of the layer.
MIN_STATE_MASS = 1e-6


def _keep_where_empty(mass, new, old):
  """Per-state fallback: states with (almost) no posterior mass keep old values."""
  has_mass = mass > MIN_STATE_MASS
  shape = has_mass.shape + (1,) * (new.ndim - has_mass.ndim)
  return jnp.where(has_mass.reshape(shape), new, old)


def _safe_div(num, den):
  """num / den, with den at or below MIN_STATE_MASS replaced by 1.

  The caller discards those entries with ``_keep_where_empty``; replacing
  the denominator (not just the result) keeps the gradient finite there.
  """
  den_ok = den > MIN_STATE_MASS
  shape = den.shape + (1,) * (num.ndim - den.ndim)
  den_safe = jnp.where(den_ok, den, 1.0).reshape(shape)
  return num / den_safe


def _normalize_rows(x):
  return x / jnp.sum(x, axis=-1, keepdims=True)


@struct.dataclass
class Categorical:
  """Discrete observations ``obs: (T,) int`` in ``{0, ..., V-1}``.

  probs: (K, V), rows sum to one.
  """
  probs: jax.Array

  observation_dtype = jnp.int32

  @property
  def num_states(self) -> int:
    return self.probs.shape[0]

  @property
  def num_symbols(self) -> int:
    return self.probs.shape[1]

  def observation_shape(self, num_steps: int) -> tuple:
    return (num_steps,)

  def observation_mean(self):
    """(K, V): the symbol distribution, i.e. the mean of the one-hot observation."""
    return self.probs

  def log_likelihoods(self, obs):
    # Taking the log of the gathered column (not the whole table) keeps the
    # cost O(T K) and lets probabilities be exactly zero elsewhere.
    gathered = self.probs[:, obs].T
    # Safe log: a zero probability gives -inf with a zero (not NaN) gradient,
    # so a masked step whose filler symbol has probability 0 (a symbol the
    # user never emitted) cannot poison gradients through the mask's where.
    positive = gathered > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, gathered, 1.0)), -jnp.inf)

  def expected_statistics(self, obs, weights):
    # A scatter-add of the (T, K) weights into symbol rows: O(T K) work, and
    # several times faster under vmap on CPU than the equivalent one-hot
    # (K, T) x (T, V) matmul, which lowers to a slow batched dot.
    counts = jnp.zeros((self.num_symbols, weights.shape[-1]), weights.dtype)
    return {"counts": counts.at[obs].add(weights).T}

  def m_step(self, stats):
    counts = stats["counts"]
    mass = counts.sum(-1)
    new = _safe_div(counts, mass)
    return Categorical(_keep_where_empty(mass, new, self.probs))

  def sample(self, key, state):
    return jax.random.categorical(key, jnp.log(self.probs[state])).astype(jnp.int32)

  def check_observations(self, obs, mask):
    obs = np.asarray(obs)
    if obs.ndim != 1:
      raise ValueError(f"Categorical obs must have shape (T,), got {obs.shape}")
    if not np.issubdtype(obs.dtype, np.integer):
      raise ValueError(f"Categorical obs must be integers, got dtype {obs.dtype}")
    valid = obs[np.asarray(mask)]
    bad = (valid < 0) | (valid >= self.num_symbols)
    if np.any(bad):
      raise ValueError(
          f"Categorical obs out of range: value {valid[bad][0]} is not in "
          f"[0, {self.num_symbols - 1}]")

  def check_parameters(self):
    _checks.check_distribution("Categorical.probs", self.probs, axis=-1)

  def to_unconstrained(self):
    return Categorical(floored_log(self.probs))

  @staticmethod
  def from_unconstrained(theta: "Categorical"):
    return Categorical(jax.nn.softmax(theta.probs, axis=-1))


@struct.dataclass
class Multinomial:
  """Non-negative strength vectors ``obs: (T, V)`` (e.g. normalised clicks).

  probs: (K, V), rows sum to one.  ``log b_k(s) = sum_h s_h log probs[k, h]``
  (no multinomial coefficient: strengths need not be integers, and the
  coefficient does not depend on the parameters), so soft counts enter the
  M-step directly.
  """
  probs: jax.Array

  observation_dtype = jnp.float32

  @property
  def num_states(self) -> int:
    return self.probs.shape[0]

  def observation_shape(self, num_steps: int) -> tuple:
    return (num_steps, self.probs.shape[1])

  def observation_mean(self):
    """(K, V): the expected strength vector of a unit-total observation."""
    return self.probs

  def log_likelihoods(self, obs):
    # xlogy-style: a zero strength contributes 0 even where probs is 0.
    logp = jnp.log(self.probs)
    safe = jnp.where(self.probs > 0, logp, 0.0)
    return obs @ safe.T + jnp.where(
        (obs > 0) @ (self.probs <= 0).T.astype(obs.dtype) > 0, -jnp.inf, 0.0)

  def expected_statistics(self, obs, weights):
    return {"counts": weights.T @ obs}

  def m_step(self, stats):
    counts = stats["counts"]
    mass = counts.sum(-1)
    new = _safe_div(counts, mass)
    return Multinomial(_keep_where_empty(mass, new, self.probs))

  def sample(self, key, state, total: float = 1.0):
    """A strength vector: 20 draws from the state's distribution, normalised."""
    draws = jax.random.categorical(key, jnp.log(self.probs[state]), shape=(20,))
    counts = jnp.zeros(self.probs.shape[1]).at[draws].add(1.0)
    return total * counts / 20.0

  def check_observations(self, obs, mask):
    obs = np.asarray(obs)
    if obs.ndim != 2 or obs.shape[1] != self.probs.shape[1]:
      raise ValueError(
          f"Multinomial obs must have shape (T, {self.probs.shape[1]}), got {obs.shape}")
    valid = obs[np.asarray(mask)]
    if not np.all(np.isfinite(valid)):
      raise ValueError("Multinomial obs contain NaN or inf on valid steps")
    if np.any(valid < 0):
      raise ValueError("Multinomial obs have negative counts on valid steps")

  def check_parameters(self):
    _checks.check_distribution("Multinomial.probs", self.probs, axis=-1)

  def to_unconstrained(self):
    return Multinomial(floored_log(self.probs))

  @staticmethod
  def from_unconstrained(theta: "Multinomial"):
    return Multinomial(jax.nn.softmax(theta.probs, axis=-1))


@struct.dataclass
class Poisson:
  """Count observations ``obs: (T,)`` (non-negative integers, any dtype).

  rate: (K,), positive.
  """
  rate: jax.Array

  observation_dtype = jnp.float32

  @property
  def num_states(self) -> int:
    return self.rate.shape[0]

  def observation_shape(self, num_steps: int) -> tuple:
    return (num_steps,)

  def observation_mean(self):
    """(K,): the expected count."""
    return self.rate

  def log_likelihoods(self, obs):
    x = jnp.asarray(obs, self.rate.dtype)[:, None]
    return x * jnp.log(self.rate) - self.rate - gammaln(x + 1.0)

  def expected_statistics(self, obs, weights):
    x = jnp.asarray(obs, weights.dtype)
    return {"mass": weights.sum(0), "sum": weights.T @ x}

  def m_step(self, stats):
    new = _safe_div(stats["sum"], stats["mass"])
    # A state whose expected count is 0 would get rate 0 and log 0 = -inf on
    # any later positive count; a tiny floor keeps EM finite.
    new = jnp.maximum(new, jnp.finfo(self.rate.dtype).tiny)
    return Poisson(_keep_where_empty(stats["mass"], new, self.rate))

  def sample(self, key, state):
    return jax.random.poisson(key, self.rate[state]).astype(jnp.float32)

  def check_observations(self, obs, mask):
    obs = np.asarray(obs)
    if obs.ndim != 1:
      raise ValueError(f"Poisson obs must have shape (T,), got {obs.shape}")
    valid = obs[np.asarray(mask)]
    if not np.all(np.isfinite(valid)):
      raise ValueError("Poisson obs contain NaN or inf on valid steps")
    if np.any(valid < 0):
      raise ValueError("Poisson obs have negative counts on valid steps")
    if np.any(valid != np.round(valid)):
      raise ValueError("Poisson obs must be whole numbers")

  def check_parameters(self):
    _checks.check_positive("Poisson.rate", self.rate)

  def to_unconstrained(self):
    return Poisson(floored_log(self.rate))

  @staticmethod
  def from_unconstrained(theta: "Poisson"):
    return Poisson(jnp.exp(theta.rate))


def _check_real_observations(name, obs, mask, dim):
  obs = np.asarray(obs)
  if obs.ndim != 2 or obs.shape[1] != dim:
    raise ValueError(f"{name} obs must have shape (T, {dim}), got {obs.shape}")
  if not np.all(np.isfinite(obs[np.asarray(mask)])):
    raise ValueError(f"{name} obs contain NaN or inf on valid steps")


@struct.dataclass
class Gaussian:
  """Real vectors ``obs: (T, D)`` with a full covariance per state.

  mean: (K, D); cov: (K, D, D) symmetric positive definite.
  ``min_covar`` (static) is added to the diagonal in the M-step so a state
  that sees fewer than D points keeps a usable covariance.
  """
  mean: jax.Array
  cov: jax.Array
  min_covar: float = struct.field(pytree_node=False, default=1e-6)

  observation_dtype = jnp.float32

  @property
  def num_states(self) -> int:
    return self.mean.shape[0]

  def observation_shape(self, num_steps: int) -> tuple:
    return (num_steps, self.mean.shape[1])

  def observation_mean(self):
    """(K, D): the state means (named apart from the ``mean`` field)."""
    return self.mean

  def log_likelihoods(self, obs):
    chol = jnp.linalg.cholesky(self.cov)                      # (K, D, D)
    diff = obs[None, :, :] - self.mean[:, None, :]            # (K, T, D)
    z = jax.scipy.linalg.solve_triangular(
        chol, jnp.swapaxes(diff, 1, 2), lower=True)          # (K, D, T)
    maha = jnp.sum(z * z, axis=1)                              # (K, T)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=1, axis2=2)), -1)
    dim = self.mean.shape[1]
    ll = -0.5 * (maha + logdet[:, None] + dim * jnp.log(2.0 * jnp.pi))
    return ll.T

  def expected_statistics(self, obs, weights):
    # Moments are taken about the current means: algebraically the same
    # update, but without the catastrophic cancellation of E[xx^T] - mm^T in
    # float32 (which can make a covariance indefinite).
    diff = obs[:, None, :] - self.mean[None, :, :]           # (T, K, D)
    return {
        "mass": weights.sum(0),
        "sum": jnp.einsum("tk,tkd->kd", weights, diff),
        "outer": jnp.einsum("tk,tki,tkj->kij", weights, diff, diff),
    }

  def m_step(self, stats):
    mass = stats["mass"]
    shift = _safe_div(stats["sum"], mass)
    mean = self.mean + shift
    cov = _safe_div(stats["outer"], mass) - shift[:, :, None] * shift[:, None, :]
    cov = 0.5 * (cov + jnp.swapaxes(cov, 1, 2))
    cov = cov + self.min_covar * jnp.eye(self.mean.shape[1], dtype=cov.dtype)
    return Gaussian(_keep_where_empty(mass, mean, self.mean),
                    _keep_where_empty(mass, cov, self.cov), self.min_covar)

  def sample(self, key, state):
    chol = jnp.linalg.cholesky(self.cov[state])
    z = jax.random.normal(key, self.mean.shape[1:], self.mean.dtype)
    return self.mean[state] + chol @ z

  def check_observations(self, obs, mask):
    _check_real_observations("Gaussian", obs, mask, self.mean.shape[1])

  def check_parameters(self):
    _checks.check_finite("Gaussian.mean", self.mean)
    cov = np.asarray(self.cov)
    _checks.check_finite("Gaussian.cov", cov)
    if not np.allclose(cov, np.swapaxes(cov, 1, 2), atol=1e-6):
      raise ValueError("Gaussian.cov must be symmetric")
    if np.any(np.linalg.eigvalsh(cov) <= 0):
      raise ValueError("Gaussian.cov must be positive definite")

  def to_unconstrained(self):
    # Cholesky factor with log-diagonal: every real lower-triangular matrix
    # maps back to a positive definite covariance.
    chol = jnp.linalg.cholesky(self.cov)
    diag = jnp.diagonal(chol, axis1=1, axis2=2)
    eye = jnp.eye(chol.shape[-1], dtype=chol.dtype)
    return Gaussian(self.mean, jnp.tril(chol, -1) + eye * jnp.log(diag)[:, :, None],
                    self.min_covar)

  @staticmethod
  def from_unconstrained(theta: "Gaussian"):
    eye = jnp.eye(theta.cov.shape[-1], dtype=theta.cov.dtype)
    log_diag = jnp.diagonal(theta.cov, axis1=1, axis2=2)
    chol = jnp.tril(theta.cov, -1) + eye * jnp.exp(log_diag)[:, :, None]
    return Gaussian(theta.mean, chol @ jnp.swapaxes(chol, 1, 2), theta.min_covar)


@struct.dataclass
class DiagGaussian:
  """Real vectors ``obs: (T, D)`` with a diagonal covariance per state.

  mean: (K, D); var: (K, D) positive.
  """
  mean: jax.Array
  var: jax.Array
  min_covar: float = struct.field(pytree_node=False, default=1e-6)

  observation_dtype = jnp.float32

  @property
  def num_states(self) -> int:
    return self.mean.shape[0]

  def observation_shape(self, num_steps: int) -> tuple:
    return (num_steps, self.mean.shape[1])

  def observation_mean(self):
    """(K, D): the state means (named apart from the ``mean`` field)."""
    return self.mean

  def log_likelihoods(self, obs):
    inv = 1.0 / self.var
    # Expanded square: (x-m)^2/v = x^2/v - 2 x m/v + m^2/v, all matmuls.
    maha = (obs * obs) @ inv.T - 2.0 * obs @ (self.mean * inv).T + jnp.sum(
        self.mean * self.mean * inv, -1)
    logdet = jnp.sum(jnp.log(self.var), -1)
    dim = self.mean.shape[1]
    return -0.5 * (maha + logdet + dim * jnp.log(2.0 * jnp.pi))

  def expected_statistics(self, obs, weights):
    # Centred on the current means, as in Gaussian, to avoid cancellation.
    diff = obs[:, None, :] - self.mean[None, :, :]           # (T, K, D)
    return {"mass": weights.sum(0),
            "sum": jnp.einsum("tk,tkd->kd", weights, diff),
            "sumsq": jnp.einsum("tk,tkd->kd", weights, diff * diff)}

  def m_step(self, stats):
    mass = stats["mass"]
    shift = _safe_div(stats["sum"], mass)
    mean = self.mean + shift
    var = jnp.maximum(_safe_div(stats["sumsq"], mass) - shift * shift, 0.0) + self.min_covar
    return DiagGaussian(_keep_where_empty(mass, mean, self.mean),
                        _keep_where_empty(mass, var, self.var), self.min_covar)

  def sample(self, key, state):
    z = jax.random.normal(key, self.mean.shape[1:], self.mean.dtype)
    return self.mean[state] + jnp.sqrt(self.var[state]) * z

  def check_observations(self, obs, mask):
    _check_real_observations("DiagGaussian", obs, mask, self.mean.shape[1])

  def check_parameters(self):
    _checks.check_finite("DiagGaussian.mean", self.mean)
    _checks.check_positive("DiagGaussian.var", self.var)

  def to_unconstrained(self):
    return DiagGaussian(self.mean, jnp.log(self.var), self.min_covar)

  @staticmethod
  def from_unconstrained(theta: "DiagGaussian"):
    return DiagGaussian(theta.mean, jnp.exp(theta.var), theta.min_covar)


EMISSION_FAMILIES = (Categorical, Multinomial, Poisson, Gaussian, DiagGaussian)
