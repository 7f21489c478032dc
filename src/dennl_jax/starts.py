"""Starting points for EM and for the networks: k-means++ per user and pooled.

* :func:`user_start` -- Conventional EM's start for one user from that
  user's data only (k-means++ then Lloyd).
* :func:`pooled_start` -- one shared start from all training users' pooled
  observations (the networks' output bias; aligns state labels across users).
* :func:`random_start` -- an emission drawn by the family (Multinomial:
  Dirichlet rows), for restarts that do not depend on k-means.

Both take the emission ``family`` (a class, default Gaussian); the family
turns the k-means clusters into its emission through its ``cluster_start``
classmethod (Gaussian: centres as means, cluster covariances; Multinomial:
normalised, smoothed centres as emission rows), so a new family needs no
branch here.  Durations are Poisson, transitions uniform off the diagonal.
* :func:`align_to_reference` -- permute per-user fits onto a reference's
  state labels.

Randomness is the purpose of a start, so the key comes first.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dennl_jax.durations import PoissonDuration
from dennl_jax.emissions import Gaussian
from dennl_jax.hsmm import HSMM


def kmeans(key, points, mask, num_clusters: int, num_iters: int = 10):
  """k-means++ seeding then Lloyd iterations on the valid points of one set.

  points: (N, O); mask: (N,) bool.  Returns ``(centers: (C, O), labels: (N,))``.
  An empty cluster keeps its center.
  """
  num_points = points.shape[0]
  keys = jax.random.split(key, num_clusters)
  valid = jnp.asarray(mask, bool)
  first = jax.random.categorical(keys[0], jnp.where(valid, 0.0, -jnp.inf))
  centers = jnp.zeros((num_clusters, points.shape[1]), points.dtype).at[0].set(points[first])

  def seed(c, centers):
    d2 = jnp.sum((points[:, None, :] - centers[None, :, :]) ** 2, -1)
    d2 = jnp.where(jnp.arange(num_clusters)[None, :] < c, d2, jnp.inf).min(1)
    logits = jnp.where(valid & (d2 > 0), jnp.log(jnp.maximum(d2, 1e-30)), -jnp.inf)
    # All valid points coincide with centers: fall back to any valid point.
    logits = jnp.where(jnp.any(jnp.isfinite(logits)), logits, jnp.where(valid, 0.0, -jnp.inf))
    pick = jax.random.categorical(keys[c], logits)
    return centers.at[c].set(points[pick])

  centers = jax.lax.fori_loop(1, num_clusters, seed, centers)

  def lloyd(_, centers):
    d2 = jnp.sum((points[:, None, :] - centers[None, :, :]) ** 2, -1)
    onehot = jax.nn.one_hot(jnp.argmin(d2, 1), num_clusters, dtype=points.dtype) * valid[:, None]
    count = onehot.sum(0)
    new = (onehot.T @ points) / jnp.maximum(count, 1.0)[:, None]
    return jnp.where(count[:, None] > 0, new, centers)

  centers = jax.lax.fori_loop(0, num_iters, lloyd, centers)
  labels = jnp.argmin(jnp.sum((points[:, None, :] - centers[None, :, :]) ** 2, -1), 1)
  del num_points
  return centers, labels


def _within_cluster_covariance(points, mask, centers, labels, min_covar):
  """Pooled within-cluster covariance (O, O) of the valid points."""
  return Gaussian.cluster_start(points, mask, centers, labels, per_cluster=False,
                                min_covar=min_covar).cov[0]


def _cluster_emission(family, points, mask, centers, labels, per_cluster, options):
  hook = getattr(family, "cluster_start", None)
  if hook is None:
    raise ValueError(f"emission family {getattr(family, '__name__', family)!r} has no "
                     f"cluster_start classmethod: k-means starts cannot build it")
  return hook(points, mask, centers, labels, per_cluster=per_cluster, **options)


def _start_hsmm(emission, num_states: int, duration_rate: float, max_duration: int, dtype):
  """Uniform initial distribution and off-diagonal transitions, Poisson(``duration_rate``)."""
  return HSMM(jnp.full((num_states,), 1.0 / num_states, dtype),
              _uniform_off_diagonal(num_states, dtype),
              PoissonDuration(jnp.full((num_states,), duration_rate, dtype),
                              max_duration=max_duration), emission)


def make_hsmm(initial, transition, rate, mean, cov, max_duration: int, min_covar: float):
  """An HSMM with Poisson durations and full-covariance Gaussian emissions."""
  return HSMM(initial, transition, PoissonDuration(rate, max_duration=max_duration),
              Gaussian(mean, cov, min_covar=min_covar))


def _uniform_off_diagonal(num_states, dtype=jnp.float32):
  off = 1.0 - jnp.eye(num_states, dtype=dtype)
  return off / (num_states - 1)


def user_start(key, obs, mask, *, num_states: int, max_duration: int,
               duration_rate: float = 4.0, kmeans_iters: int = 10, family=Gaussian,
               **family_options):
  """Conventional EM's start for one user, from that user's data only.

  obs: (T, O); mask: (T,) bool.  k-means++ then Lloyd on the user's valid
  observations; ``family.cluster_start(..., per_cluster=False,
  **family_options)`` makes the emission (Gaussian: the pooled
  within-cluster covariance for every state, ``min_covar``; Multinomial:
  ``smoothing``).  Transitions and the initial distribution: uniform.
  Durations: Poisson with a fixed moderate rate (mean duration 1 + rate).
  """
  mask = jnp.asarray(mask, bool)
  centers, labels = kmeans(key, obs, mask, num_states, kmeans_iters)
  emission = _cluster_emission(family, obs, mask, centers, labels, False, family_options)
  return _start_hsmm(emission, num_states, duration_rate, max_duration, obs.dtype)


def random_user_start(key, obs, mask, *, num_states: int, max_duration: int, min_covar: float,
                      duration_rate: float = 4.0, concentration: float = 1.0):
  """A random start for one user (the other half of Conventional EM's restarts).

  Means: ``num_states`` distinct valid observations drawn uniformly (no
  k-means); covariances: the user's whole-sequence covariance for every
  state; transition rows ~ Dirichlet(``concentration``) off the diagonal;
  uniform initial distribution; Poisson rate ``duration_rate``.
  obs: (T, O); mask: (T,) bool with at least ``num_states`` valid steps for
  distinct means (fewer: some means repeat).
  """
  mask = jnp.asarray(mask, bool)
  key_mean, key_trans = jax.random.split(key)
  # Gumbel top-k: num_states distinct valid steps, uniformly.
  scores = jax.random.gumbel(key_mean, mask.shape) + jnp.where(mask, 0.0, -jnp.inf)
  centers = obs[jax.lax.top_k(scores, num_states)[1]]
  mean = jnp.sum(obs * mask[:, None], 0) / jnp.maximum(jnp.sum(mask), 1.0)
  cov = _within_cluster_covariance(obs, mask, mean[None], jnp.zeros(mask.shape, jnp.int32),
                                   min_covar)
  dtype = obs.dtype
  off = 1.0 - jnp.eye(num_states, dtype=dtype)
  rows = jax.random.gamma(key_trans, concentration, (num_states, num_states), dtype) * off
  transition = rows / jnp.maximum(rows.sum(1, keepdims=True), 1e-30)
  return make_hsmm(jnp.full((num_states,), 1.0 / num_states, dtype), transition,
                   jnp.full((num_states,), duration_rate, dtype), centers,
                   jnp.broadcast_to(cov, (num_states,) + cov.shape), max_duration, min_covar)


def random_start(key, obs, mask, *, num_states: int, max_duration: int,
                 duration_rate: float = 4.0, family, **family_options):
  """A start whose emission the family draws at random: ``family.random_start``.

  obs: (T, O); mask: (T,) bool.  Multinomial: every row ~
  Dirichlet(``concentration``), smoothed.  Transitions, initial
  distribution and durations as in :func:`user_start`.
  """
  hook = getattr(family, "random_start", None)
  if hook is None:
    raise ValueError(f"emission family {getattr(family, '__name__', family)!r} has no "
                     f"random_start classmethod")
  emission = hook(key, obs, jnp.asarray(mask, bool), num_states, **family_options)
  return _start_hsmm(emission, num_states, duration_rate, max_duration, obs.dtype)


def pooled_start(key, obs, mask, *, num_states: int, max_duration: int,
                 duration_rate: float = 4.0, max_points: int = 20000, kmeans_iters: int = 25,
                 family=Gaussian, **family_options):
  """One shared start from all training users' observations pooled together.

  obs: (U, T, ...) or (N, ...); mask: the matching boolean array.  k-means++
  on (a random subset of at most ``max_points``) pooled valid observations;
  ``family.cluster_start(..., per_cluster=True, **family_options)`` makes
  the emission (Gaussian: each state's own cluster covariance, ``min_covar``
  default 1e-3; Multinomial: the normalised centres mixed with
  ``smoothing``); uniform transitions and initial distribution; Poisson rate
  ``duration_rate``.  Returns a single-user HSMM.  ValueError when no step
  is valid.
  """
  obs = np.asarray(obs)
  mask = np.asarray(mask, bool)
  if mask.shape != obs.shape[:mask.ndim]:
    raise ValueError(f"mask shape {mask.shape} does not match obs shape {obs.shape}")
  points = obs[mask]
  if points.shape[0] == 0:
    raise ValueError("pooled_start needs at least one valid step")
  if not np.all(np.isfinite(points)):
    raise ValueError("pooled_start: obs contain NaN or inf on valid steps")
  key_sub, key_km = jax.random.split(key)
  if points.shape[0] > max_points:
    pick = np.asarray(jax.random.choice(key_sub, points.shape[0], (max_points,), replace=False))
    points = points[pick]
  points = jnp.asarray(points)
  valid = jnp.ones(points.shape[0], bool)
  centers, labels = jax.jit(kmeans, static_argnums=(3, 4))(key_km, points, valid, num_states,
                                                           kmeans_iters)
  emission = _cluster_emission(family, points, valid, centers, labels, True, family_options)
  return _start_hsmm(emission, num_states, duration_rate, max_duration, points.dtype)


def align_to_reference(params, reference_mean):
  """Permute each user's states so its means best match ``reference_mean``.

  params: batched model with Gaussian-type emissions (leading U);
  reference_mean: (K, O).  Solves one
  assignment problem per user (Hungarian, squared distances) and applies the
  permutation to every state-indexed parameter.  Used to give EM Mapping
  consistent regression targets (per-user EM labels are arbitrary).
  """
  from scipy.optimize import linear_sum_assignment
  means = np.asarray(params.emission.mean)
  ref = np.asarray(reference_mean)
  perms = []
  for m in means:
    cost = ((ref[:, None, :] - m[None, :, :]) ** 2).sum(-1)
    _, cols = linear_sum_assignment(cost)
    perms.append(cols)
  perms = jnp.asarray(np.stack(perms))

  def permute(p, perm):
    families = {name: jax.tree_util.tree_map(lambda x: x[perm], family)
                for name, family in p.families()}
    return p.replace(initial=p.initial[perm], transition=p.transition[perm][:, perm],
                     **families)

  return jax.vmap(permute)(params, perms)
