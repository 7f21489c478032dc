"""Synthetic collection of related HSMMs (paper section 6.1).

Every user has its own 10-state explicit-duration HSMM with 5-dimensional
full-covariance Gaussian emissions and Poisson durations, ``p(d) ∝
Poisson(d - 1; rate)`` on ``d = 1..max_duration``.  Users differ but are
related: every parameter is a *shared* base value plus a user-specific
deviation driven by a few latent factors ``z_u ~ N(0, I_r)``::

  mean_u[k]   = base_mean[k] + mean_scale * (W_mean z_u)[k]
  cov_u[k]    = exp(2 * cov_scale * (w_cov z_u)[k]) * base_cov[k]
  logit_u     = base_logit + trans_scale * (W_trans z_u)      (diagonal -inf)
  rate_u[k]   = base_rate[k] * exp(rate_scale * (w_rate z_u)[k])
  initial_u   = softmax(init_scale * (W_init z_u))

plus an *idiosyncratic* part of each user's means, transition logits and
rates (``idio_* * N(0, 1)`` per entry) that no low-dimensional factor
explains.  The population has structure a shared network can learn (the
base values and the factors, which the embedding reveals), but the
idiosyncratic part is only weakly visible through the embedding's
bottleneck, so the user's own sequence is still needed -- and one sequence
alone says little about its model when it is short or noisy.

The *feature embedding* is ``e_u = ReLU(A x_u + b)`` where ``x_u`` is the
serialised true parameter vector (means, log-Cholesky covariances, log
transition probabilities off the diagonal, log rates, log initial
probabilities), ``A: (embed_dim, dim_x)`` is a fixed full-rank matrix and
``b`` a fixed vector.  With ``embed_dim < dim_x`` and the ReLU, ``x_u``
cannot be recovered from ``e_u``, but ``e_u`` is a (non-linear) function of
``z_u`` and therefore informative about every parameter.

The "world" (base parameters, factor loadings, ``A``, ``b``) is drawn from
``world_key``; users from separate keys, so training and held-out users come
from the same world and are disjoint.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from dennl_jax.durations import PoissonDuration
from dennl_jax.emissions import Gaussian
from dennl_jax.hsmm import HSMM


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Shape and spread of the synthetic population (defaults: paper 6.1)."""
  num_states: int = 10
  obs_dim: int = 5
  max_duration: int = 30
  num_factors: int = 3
  embed_dim: int = 32
  # Shared structure.
  mean_spread: float = 2.5      # std of base means per coordinate
  emission_scale: float = 0.6   # typical std of the emission noise per coordinate
  min_base_rate: float = 2.0    # base Poisson rates ~ U(min, max): mean duration 1 + rate
  max_base_rate: float = 6.0
  logit_spread: float = 1.0     # std of the base transition logits
  # User-specific variation (multiplies the unit-variance factor effects).
  mean_scale: float = 1.0
  cov_scale: float = 0.15
  trans_scale: float = 1.0
  rate_scale: float = 0.3
  init_scale: float = 1.0
  # Idiosyncratic variation (independent per user and entry).
  idio_mean: float = 1.5
  idio_trans: float = 0.5
  idio_rate: float = 0.2


class World(NamedTuple):
  """Everything shared by all users (fixed by the world key)."""
  base_mean: jax.Array     # (K, O)
  base_chol: jax.Array     # (K, O, O) lower Cholesky factors of base covariances
  base_logit: jax.Array    # (K, K)
  base_rate: jax.Array     # (K,)
  w_mean: jax.Array        # (K, O, r)
  w_cov: jax.Array         # (K, r)
  w_trans: jax.Array       # (K, K, r)
  w_rate: jax.Array        # (K, r)
  w_init: jax.Array        # (K, r)
  embed_matrix: jax.Array  # (E, dim_x)  the full-rank A
  embed_bias: jax.Array    # (E,)        b


class UserParams(NamedTuple):
  """True HSMM parameters of a batch of users (leading axis U)."""
  initial: jax.Array     # (U, K)
  transition: jax.Array  # (U, K, K), zero diagonal
  rate: jax.Array        # (U, K) Poisson duration rates
  mean: jax.Array        # (U, K, O)
  cov: jax.Array         # (U, K, O, O)


class Population(NamedTuple):
  """Users with their true parameters, latent factors and embeddings."""
  params: UserParams
  factors: jax.Array     # (U, r)
  embedding: jax.Array   # (U, E)


def serialized_dim(config: SyntheticConfig) -> int:
  k, o = config.num_states, config.obs_dim
  return k * o + k * o * (o + 1) // 2 + k * (k - 1) + k + k


def make_world(world_key, config: SyntheticConfig = SyntheticConfig()) -> World:
  """Draw the shared structure and the embedding map ``(A, b)``."""
  k, o, r = config.num_states, config.obs_dim, config.num_factors
  keys = jax.random.split(world_key, 11)
  base_mean = config.mean_spread * jax.random.normal(keys[0], (k, o))
  # Random correlated covariances with a typical per-coordinate std of
  # emission_scale: chol = scale * (I + 0.3 * strictly-lower noise), diag jittered.
  lower = jnp.tril(jax.random.normal(keys[1], (k, o, o)), -1) * 0.3
  diag = jnp.exp(0.2 * jax.random.normal(keys[2], (k, o)))
  base_chol = config.emission_scale * (lower + jax.vmap(jnp.diag)(diag))
  base_logit = config.logit_spread * jax.random.normal(keys[3], (k, k))
  base_rate = jax.random.uniform(keys[4], (k,), minval=config.min_base_rate,
                                 maxval=config.max_base_rate)
  scale = 1.0 / np.sqrt(r)
  w_mean = scale * jax.random.normal(keys[5], (k, o, r))
  w_cov = scale * jax.random.normal(keys[6], (k, r))
  w_trans = scale * jax.random.normal(keys[7], (k, k, r))
  w_rate = scale * jax.random.normal(keys[8], (k, r))
  w_init = scale * jax.random.normal(keys[9], (k, r))
  dim_x = serialized_dim(config)
  if config.embed_dim > dim_x:
    raise ValueError(f"embed_dim {config.embed_dim} must not exceed the serialised size {dim_x}")
  key_a, key_b = jax.random.split(keys[10])
  embed_matrix = jax.random.normal(key_a, (config.embed_dim, dim_x)) / np.sqrt(dim_x)
  # A Gaussian matrix is full rank with probability one; check it anyway.
  if np.linalg.matrix_rank(np.asarray(embed_matrix, np.float64)) != config.embed_dim:
    raise ValueError("embedding matrix A is not full rank; use another world key")
  embed_bias = 0.1 * jax.random.normal(key_b, (config.embed_dim,))
  return World(base_mean, base_chol, base_logit, base_rate, w_mean, w_cov, w_trans, w_rate,
               w_init, embed_matrix, embed_bias)


def user_params_from_factors(world: World, factors, config: SyntheticConfig) -> UserParams:
  """Map latent factors ``(U, r)`` to true HSMM parameters (see module doc)."""
  k = config.num_states
  mean = world.base_mean + config.mean_scale * jnp.einsum("kor,ur->uko", world.w_mean, factors)
  cov_log_scale = config.cov_scale * factors @ world.w_cov.T                    # (U, K)
  chol = jnp.exp(cov_log_scale)[..., None, None] * world.base_chol
  cov = chol @ jnp.swapaxes(chol, -1, -2)
  logit = world.base_logit + config.trans_scale * jnp.einsum("ijr,ur->uij", world.w_trans, factors)
  logit = jnp.where(jnp.eye(k, dtype=bool), -jnp.inf, logit)
  transition = jax.nn.softmax(logit, axis=-1)
  rate = world.base_rate * jnp.exp(config.rate_scale * factors @ world.w_rate.T)
  initial = jax.nn.softmax(config.init_scale * factors @ world.w_init.T, axis=-1)
  return UserParams(initial, transition, rate, mean, cov)


def serialize(params: UserParams) -> jax.Array:
  """Serialised true parameters ``x_u: (U, dim_x)`` (the embedding's input)."""
  num_users, k = params.initial.shape
  chol = jnp.linalg.cholesky(params.cov)
  rows, cols = np.tril_indices(params.mean.shape[-1])
  chol_entries = chol[:, :, rows, cols]
  log_diag_fix = jnp.where(rows == cols, jnp.log(chol_entries), chol_entries)
  off = ~np.eye(k, dtype=bool)
  log_trans = jnp.log(params.transition[:, off])
  return jnp.concatenate([
      params.mean.reshape(num_users, -1),
      log_diag_fix.reshape(num_users, -1),
      log_trans.reshape(num_users, -1),
      jnp.log(params.rate),
      jnp.log(params.initial),
  ], axis=-1)


def embed(world: World, params: UserParams) -> jax.Array:
  """Feature embedding ``e_u = ReLU(A x_u + b)``, ``(U, E)``."""
  return jax.nn.relu(serialize(params) @ world.embed_matrix.T + world.embed_bias)


def make_population(key, world: World, num_users: int,
                    config: SyntheticConfig = SyntheticConfig()) -> Population:
  """Draw ``num_users`` users: latent factors, true parameters, embeddings."""
  key_factors, key_mean, key_trans, key_rate = jax.random.split(key, 4)
  factors = jax.random.normal(key_factors, (num_users, config.num_factors))
  params = user_params_from_factors(world, factors, config)
  k = config.num_states
  mean = params.mean + config.idio_mean * jax.random.normal(key_mean, params.mean.shape)
  off = ~jnp.eye(k, dtype=bool)
  logit = jnp.log(jnp.where(off, params.transition, 1.0)) + config.idio_trans * jax.random.normal(
      key_trans, params.transition.shape)
  transition = jax.nn.softmax(jnp.where(off, logit, -jnp.inf), axis=-1)
  rate = params.rate * jnp.exp(config.idio_rate * jax.random.normal(key_rate, params.rate.shape))
  params = params._replace(mean=mean, transition=transition, rate=rate)
  return Population(params, factors, embed(world, params))


def duration_log_probs(rate, max_duration: int):
  """log p(d) for d = 1..max_duration, ``p(d) ∝ Poisson(d - 1; rate)``; (..., D)."""
  d_minus_1 = jnp.arange(max_duration, dtype=jnp.float32)
  rate = jnp.asarray(rate)[..., None]
  logp = d_minus_1 * jnp.log(rate) - rate - jax.scipy.special.gammaln(d_minus_1 + 1.0)
  return logp - jax.scipy.special.logsumexp(logp, axis=-1, keepdims=True)


def sample_user(key, params: UserParams, num_steps: int, max_duration: int):
  """One user's sequence from its HSMM (unbatched ``params``).

  Returns ``(states: (T,) int32, obs: (T, O) float32)``.  A segment's
  duration is drawn when it starts; when it ends the next state is drawn
  from the transition row (never the same state: zero diagonal).
  """
  key_first, key_steps, key_obs = jax.random.split(key, 3)
  log_dur = duration_log_probs(params.rate, max_duration)        # (K, D)
  log_trans = jnp.log(params.transition)
  k_state, k_dur = jax.random.split(key_first)
  first = jax.random.categorical(k_state, jnp.log(params.initial))
  first_left = jax.random.categorical(k_dur, log_dur[first]) + 1

  def step(carry, key_t):
    state, left = carry
    k_next, k_d = jax.random.split(key_t)
    nxt = jax.random.categorical(k_next, log_trans[state])
    new_d = jax.random.categorical(k_d, log_dur[nxt]) + 1
    switch = left <= 1
    state = jnp.where(switch, nxt, state)
    left = jnp.where(switch, new_d, left - 1)
    return (state, left), state

  _, rest = jax.lax.scan(step, (first, first_left), jax.random.split(key_steps, num_steps - 1))
  states = jnp.concatenate([first[None], rest]).astype(jnp.int32)
  chol = jnp.linalg.cholesky(params.cov)                           # (K, O, O)
  noise = jax.random.normal(key_obs, (num_steps, params.mean.shape[-1]))
  obs = params.mean[states] + jnp.einsum("tij,tj->ti", chol[states], noise)
  return states, obs.astype(jnp.float32)


# One jitted sampler for the module: a jit built inside sample_sequences would
# be a new function on every call and recompile every time.
_sample_users = jax.jit(jax.vmap(sample_user, in_axes=(0, 0, None, None)), static_argnums=(2, 3))


def sample_sequences(key, params: UserParams, num_steps: int, max_duration: int):
  """Sequences for every user: ``(states: (U, T) int32, obs: (U, T, O))``."""
  num_users = params.initial.shape[0]
  keys = jax.random.split(key, num_users)
  return _sample_users(keys, params, num_steps, max_duration)


def inject_noise(key, obs, fraction: float, mask=None):
  """Replace a fraction of each sequence's observations by other observations.

  For every sequence, ``round(fraction * n_valid)`` valid steps are chosen
  uniformly without replacement; each chosen step's value is replaced by the
  (original) value of another valid step of the same sequence, chosen
  uniformly among the other ``n_valid - 1`` steps (paper 6.1).  The input is
  not modified; the same key gives the same result.

  obs: (U, T, ...); mask: (U, T) bool or None (all valid).
  Returns ``(noisy_obs, replaced: (U, T) bool)``.
  """
  obs = jnp.asarray(obs)
  chex.assert_rank(obs, {2, 3})
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"fraction must be in [0, 1], got {fraction}")
  num_users, num_steps = obs.shape[:2]
  mask = jnp.ones((num_users, num_steps), bool) if mask is None else jnp.asarray(mask, bool)
  chex.assert_shape(mask, (num_users, num_steps))
  if np.any(np.asarray(mask).sum(1) < 2) and fraction > 0:
    raise ValueError("inject_noise needs at least two valid steps per sequence")

  def one(key_u, obs_u, mask_u):
    key_pick, key_src = jax.random.split(key_u)
    num_valid = jnp.sum(mask_u)
    num_noisy = jnp.round(fraction * num_valid).astype(jnp.int32)
    # Random priorities; masked steps go last so the first num_noisy are valid.
    priority = jnp.where(mask_u, jax.random.uniform(key_pick, (num_steps,)), 2.0)
    rank = jnp.argsort(jnp.argsort(priority))
    replaced = mask_u & (rank < num_noisy)
    # Valid positions in time order, then their order index for every step.
    valid_positions = jnp.argsort(~mask_u, stable=True)
    order = jnp.cumsum(mask_u) - 1
    draw = jax.random.randint(key_src, (num_steps,), 0, jnp.maximum(num_valid - 1, 1))
    draw = draw + (draw >= order)      # skip the step itself
    source = valid_positions[draw]
    expand = replaced.reshape(replaced.shape + (1,) * (obs_u.ndim - 1))
    return jnp.where(expand, obs_u[source], obs_u), replaced

  keys = jax.random.split(key, num_users)
  return jax.vmap(one)(keys, obs, mask)


def to_model(params: UserParams, max_duration: int, min_covar: float = 1e-3):
  """The batched ``dennl_jax.HSMM`` of these true parameters."""
  return HSMM(params.initial, params.transition,
              PoissonDuration(params.rate, max_duration=max_duration),
              Gaussian(params.mean, params.cov, min_covar=min_covar))
