"""Emission families: per-state observation distributions of an HMM/HSMM.

Every family is a ``flax.struct.dataclass`` subclass of
:class:`~dennl_jax.families.EmissionFamily` (the contract, with shapes) whose
array fields have a leading state axis ``K`` and declare their constraint
once with :func:`~dennl_jax.families.param`; both bijections (unconstrained
for the EM layer, pre-activation for the networks) and ``check_parameters``
follow from those declarations.  A new family is one new class (see
docs/extending.md).

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

from dennl_jax._numerics import keep_where_empty, normalize_counts, safe_div
from dennl_jax.families import (EmissionFamily, Positive, PositiveDefinite, Real, Simplex,
                                param)


def _on_valid_steps(bad, mask):
  """Whether ``bad`` (..., T) holds on some valid step of ``mask`` (..., T)."""
  return jnp.any(bad & jnp.asarray(mask, bool))


@struct.dataclass
class Categorical(EmissionFamily):
  """Discrete observations ``obs: (T,) int`` in ``{0, ..., V-1}``.

  probs: (K, V), rows sum to one.
  """
  probs: jax.Array = param(Simplex())

  observation_dtype = jnp.int32

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
    return Categorical(normalize_counts(stats["counts"], self.probs))

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

  def observation_errors(self, obs, mask):
    num_symbols = self.probs.shape[-1]
    return [(f"Categorical obs out of range: a valid step is not in [0, {num_symbols - 1}]",
             _on_valid_steps((obs < 0) | (obs >= num_symbols), mask))]



@struct.dataclass
class Multinomial(EmissionFamily):
  """Non-negative strength vectors ``obs: (T, V)`` (e.g. normalised clicks).

  probs: (K, V), rows sum to one.  ``log b_k(s) = sum_h s_h log probs[k, h]``
  (no multinomial coefficient: strengths need not be integers, and the
  coefficient does not depend on the parameters), so soft counts enter the
  M-step directly.
  """
  probs: jax.Array = param(Simplex())

  def observation_shape(self, num_steps: int) -> tuple:
    return (num_steps, self.probs.shape[1])

  def observation_mean(self):
    """(K, V): the expected strength vector of a unit-total observation."""
    return self.probs

  def log_likelihoods(self, obs):
    # xlogy-style: a zero strength contributes 0 even where probs is 0.
    # log(1), not log(0), where probs is 0: d log(p) = inf there, and inf * 0 = NaN.
    safe = jnp.where(self.probs > 0, jnp.log(jnp.where(self.probs > 0, self.probs, 1.0)), 0.0)
    return obs @ safe.T + jnp.where(
        (obs > 0) @ (self.probs <= 0).T.astype(obs.dtype) > 0, -jnp.inf, 0.0)

  def expected_statistics(self, obs, weights):
    return {"counts": weights.T @ obs}

  def m_step(self, stats):
    return Multinomial(normalize_counts(stats["counts"], self.probs))

  @classmethod
  def cluster_start(cls, points, mask, centers, labels, *, per_cluster: bool = True,
                    smoothing: float = 0.05) -> "Multinomial":
    """Start hook of :mod:`dennl_jax.starts`: each cluster centre, normalised, as a state's row.

    points: (N, V); mask: (N,) bool; centers: (K, V); labels: (N,).  Rows
    are mixed with ``smoothing`` of the uniform distribution: EM never
    revives a category whose probability is exactly 0.  (``per_cluster``
    changes nothing here: a centre is already its cluster's own.)
    """
    del points, mask, labels, per_cluster
    probs = jnp.maximum(centers, 0.0)
    probs = probs / jnp.maximum(jnp.sum(probs, -1, keepdims=True), 1e-30)
    return cls((1.0 - smoothing) * probs + smoothing / probs.shape[-1])

  @classmethod
  def random_start(cls, key, points, mask, num_states: int, *, concentration: float = 1.0,
                   smoothing: float = 0.05) -> "Multinomial":
    """Start hook of :func:`dennl_jax.starts.random_start`: rows ~ Dirichlet(``concentration``).

    points: (N, V) (only V and the dtype are used); mask: (N,).  Rows mixed
    with ``smoothing`` of the uniform distribution, as in :meth:`cluster_start`.
    """
    del mask
    alpha = jnp.full((points.shape[-1],), concentration, points.dtype)
    rows = jax.random.dirichlet(key, alpha, (num_states,))
    return cls.cluster_start(None, None, rows, None, smoothing=smoothing)

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

  def observation_errors(self, obs, mask):
    return [("Multinomial obs contain NaN or inf on valid steps",
             _on_valid_steps(jnp.any(~jnp.isfinite(obs), axis=-1), mask)),
            ("Multinomial obs have negative counts on valid steps",
             _on_valid_steps(jnp.any(obs < 0, axis=-1), mask))]



@struct.dataclass
class Poisson(EmissionFamily):
  """Count observations ``obs: (T,)`` (non-negative integers, any dtype).

  rate: (K,), positive.
  """
  rate: jax.Array = param(Positive())

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
    new = safe_div(stats["sum"], stats["mass"])
    # A state whose expected count is 0 would get rate 0 and log 0 = -inf on
    # any later positive count; a tiny floor keeps EM finite.
    new = jnp.maximum(new, jnp.finfo(self.rate.dtype).tiny)
    return Poisson(keep_where_empty(stats["mass"], new, self.rate))

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

  def observation_errors(self, obs, mask):
    return [("Poisson obs contain NaN or inf on valid steps",
             _on_valid_steps(~jnp.isfinite(obs), mask)),
            ("Poisson obs have negative counts on valid steps", _on_valid_steps(obs < 0, mask)),
            ("Poisson obs must be whole numbers", _on_valid_steps(obs != jnp.round(obs), mask))]



class _RealVectorFamily(EmissionFamily):
  """What Gaussian and DiagGaussian share: real vectors ``obs: (T, D)``, a
  ``mean: (K, D)`` field, and sufficient statistics centred on the current
  means (subclasses supply the second moment, full or diagonal)."""

  def observation_shape(self, num_steps: int) -> tuple:
    return (num_steps, self.mean.shape[1])

  def observation_mean(self):
    """(K, D): the state means (named apart from the ``mean`` field)."""
    return self.mean

  def check_observations(self, obs, mask):
    name, dim = type(self).__name__, self.mean.shape[1]
    obs = np.asarray(obs)
    if obs.ndim != 2 or obs.shape[1] != dim:
      raise ValueError(f"{name} obs must have shape (T, {dim}), got {obs.shape}")
    if not np.all(np.isfinite(obs[np.asarray(mask)])):
      raise ValueError(f"{name} obs contain NaN or inf on valid steps")

  def check_parameters(self) -> None:
    if not (np.isfinite(self.min_covar) and self.min_covar >= 0):
      raise ValueError(f"{type(self).__name__}.min_covar must be a finite number >= 0 (a floor "
                       f"added to the covariance diagonal), got {self.min_covar!r}")
    super().check_parameters()

  def observation_errors(self, obs, mask):
    return [(f"{type(self).__name__} obs contain NaN or inf on valid steps",
             _on_valid_steps(jnp.any(~jnp.isfinite(obs), axis=-1), mask))]

  def _second_moment(self, weights, diff):
    """(T, K) weights, (T, K, D) centred observations -> the second-moment statistic."""
    raise NotImplementedError

  def expected_statistics(self, obs, weights):
    # Moments are taken about the current means: algebraically the same
    # update, but without the catastrophic cancellation of E[xx^T] - mm^T in
    # float32 (which can make a covariance indefinite).
    diff = obs[:, None, :] - self.mean[None, :, :]           # (T, K, D)
    return {"mass": weights.sum(0),
            "sum": jnp.einsum("tk,tkd->kd", weights, diff),
            "second": self._second_moment(weights, diff)}

  def _centred_moments(self, stats):
    """(mass (K,), shift (K, D), new mean (K, D), second moment / mass about old means)."""
    mass = stats["mass"]
    shift = safe_div(stats["sum"], mass)
    return mass, shift, self.mean + shift, safe_div(stats["second"], mass)


# Up to this dimension the triangular solve of the Gaussian log-density is written
# as forward substitution in plain ops instead of LAPACK's trsm.  Why: jaxlib's
# CPU trsm splits a large batch into tasks on XLA's intra-op thread pool and
# blocks its own pool thread until they finish.  When two such solves run at
# once (the held-out loss evaluates two log-likelihoods of every user) and the
# pool has two threads (2 cores), both block on tasks no thread is free to run:
# the process hangs at 0 % CPU (gdb stacks in BUILD_NOTES "Parameters and
# families").  D^2 / 2 fused multiply-adds are cheap for the small D of HMMs.
MAX_SUBSTITUTION_DIM = 16


def _solve_lower(chol, rhs):
  """``chol^{-1} rhs`` for lower-triangular ``chol: (..., D, D)``, ``rhs: (..., D, N)``."""
  dim = chol.shape[-1]
  if dim > MAX_SUBSTITUTION_DIM:
    return jax.scipy.linalg.solve_triangular(chol, rhs, lower=True)
  rows = []
  for i in range(dim):
    acc = rhs[..., i, :]
    for j in range(i):
      acc = acc - chol[..., i, j, None] * rows[j]
    rows.append(acc / chol[..., i, i, None])
  return jnp.stack(rows, axis=-2)


@struct.dataclass
class Gaussian(_RealVectorFamily):
  """Real vectors ``obs: (T, D)`` with a full covariance per state.

  mean: (K, D); cov: (K, D, D) symmetric positive definite.
  ``min_covar`` (static) is added to the diagonal in the M-step so a state
  that sees fewer than D points keeps a usable covariance.
  """
  mean: jax.Array = param(Real())
  cov: jax.Array = param(PositiveDefinite("min_covar"))
  min_covar: float = struct.field(pytree_node=False, default=1e-6)

  def log_likelihoods(self, obs):
    chol = jnp.linalg.cholesky(self.cov)                      # (K, D, D)
    diff = obs[None, :, :] - self.mean[:, None, :]            # (K, T, D)
    z = _solve_lower(chol, jnp.swapaxes(diff, 1, 2))          # (K, D, T)
    maha = jnp.sum(z * z, axis=1)                              # (K, T)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=1, axis2=2)), -1)
    dim = self.mean.shape[1]
    ll = -0.5 * (maha + logdet[:, None] + dim * jnp.log(2.0 * jnp.pi))
    return ll.T

  def _second_moment(self, weights, diff):
    return jnp.einsum("tk,tki,tkj->kij", weights, diff, diff)

  @classmethod
  def cluster_start(cls, points, mask, centers, labels, *, per_cluster: bool = True,
                    min_covar: float = 1e-3) -> "Gaussian":
    """Start hook of :mod:`dennl_jax.starts`: means = the cluster centres.

    points: (N, D); mask: (N,) bool; centers: (K, D); labels: (N,).
    Covariances: each cluster's own (``per_cluster``; needs many points, as
    when pooled over users), else the pooled within-cluster covariance for
    every state (a per-cluster one is singular with a handful of points);
    ``min_covar`` on the diagonal.
    """
    num_states, dim = centers.shape
    valid = jnp.asarray(mask, points.dtype)
    eye = min_covar * jnp.eye(dim, dtype=points.dtype)
    if per_cluster:
      onehot = jax.nn.one_hot(labels, num_states, dtype=points.dtype) * valid[:, None]
      count = jnp.maximum(onehot.sum(0), 2.0)
      diff = points[:, None, :] - centers[None, :, :]
      cov = jnp.einsum("nk,nki,nkj->kij", onehot, diff, diff) / (count - 1.0)[:, None, None]
      cov = cov + eye
    else:
      diff = (points - centers[labels]) * valid[:, None]
      cov = diff.T @ diff / (jnp.maximum(jnp.sum(valid), 2.0) - 1.0) + eye
      cov = jnp.broadcast_to(cov, (num_states, dim, dim))
    return cls(centers, cov, min_covar)

  def m_step(self, stats):
    mass, shift, mean, second = self._centred_moments(stats)
    cov = second - shift[:, :, None] * shift[:, None, :]
    cov = 0.5 * (cov + jnp.swapaxes(cov, 1, 2))
    cov = cov + self.min_covar * jnp.eye(self.mean.shape[1], dtype=cov.dtype)
    return Gaussian(keep_where_empty(mass, mean, self.mean),
                    keep_where_empty(mass, cov, self.cov), self.min_covar)

  def sample(self, key, state):
    chol = jnp.linalg.cholesky(self.cov[state])
    z = jax.random.normal(key, self.mean.shape[1:], self.mean.dtype)
    return self.mean[state] + chol @ z


@struct.dataclass
class DiagGaussian(_RealVectorFamily):
  """Real vectors ``obs: (T, D)`` with a diagonal covariance per state.

  mean: (K, D); var: (K, D) positive.
  """
  mean: jax.Array = param(Real())
  var: jax.Array = param(Positive("min_covar"))
  min_covar: float = struct.field(pytree_node=False, default=1e-6)

  def log_likelihoods(self, obs):
    inv = 1.0 / self.var
    # Expanded square: (x-m)^2/v = x^2/v - 2 x m/v + m^2/v, all matmuls.
    maha = (obs * obs) @ inv.T - 2.0 * obs @ (self.mean * inv).T + jnp.sum(
        self.mean * self.mean * inv, -1)
    logdet = jnp.sum(jnp.log(self.var), -1)
    dim = self.mean.shape[1]
    return -0.5 * (maha + logdet + dim * jnp.log(2.0 * jnp.pi))

  def _second_moment(self, weights, diff):
    return jnp.einsum("tk,tkd->kd", weights, diff * diff)

  def m_step(self, stats):
    mass, shift, mean, second = self._centred_moments(stats)
    var = jnp.maximum(second - shift * shift, 0.0) + self.min_covar
    return DiagGaussian(keep_where_empty(mass, mean, self.mean),
                        keep_where_empty(mass, var, self.var), self.min_covar)

  def sample(self, key, state):
    z = jax.random.normal(key, self.mean.shape[1:], self.mean.dtype)
    return self.mean[state] + jnp.sqrt(self.var[state]) * z


EMISSION_FAMILIES = (Categorical, Multinomial, Poisson, Gaussian, DiagGaussian)
