"""Shared by test_codec, test_networks, test_starts, test_per_user_em: a small
Poisson-duration, full-Gaussian HSMM, a batch of its sequences, and the
validity check of a batch of parameters."""
import jax
import jax.numpy as jnp
import numpy as np

import dennl_jax as dj

K, O, D, T, E, B = 3, 2, 5, 12, 4, 3


def small_hsmm(key, min_covar=1e-3):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  off = ~np.eye(K, dtype=bool)
  trans = jnp.where(off, jax.random.uniform(k1, (K, K), minval=0.2, maxval=1.0), 0.0)
  trans = trans / trans.sum(-1, keepdims=True)
  a = jax.random.normal(k2, (K, O, O))
  cov = a @ jnp.swapaxes(a, -1, -2) + 0.5 * jnp.eye(O)
  return dj.HSMM(jnp.array([0.2, 0.5, 0.3]), trans,
              dj.PoissonDuration(jax.random.uniform(k3, (K,), minval=1.0, maxval=3.0), max_duration=D),
              dj.Gaussian(3.0 * jax.random.normal(k4, (K, O)), cov, min_covar=min_covar))


def small_batch():
  """(start, obs (B, T, O), mask (B, T), embeddings (B, E))."""
  start = small_hsmm(jax.random.PRNGKey(0))
  keys = jax.random.split(jax.random.PRNGKey(1), B)
  _, obs = jax.vmap(lambda k: start.sample(k, T))(keys)
  emb = jax.random.normal(jax.random.PRNGKey(2), (B, E))
  return start, obs, jnp.ones((B, T), bool), emb


def assert_valid_batch(params):
  for u in range(params.initial.shape[0]):
    user = jax.tree_util.tree_map(lambda x: x[u], params)
    user.check_parameters()           # raises ValueError if invalid
    np.testing.assert_array_equal(np.diagonal(np.asarray(user.transition)), 0.0)
    assert np.all(np.linalg.eigvalsh(np.asarray(user.emission.cov)) >= 0.5e-3 * 0.999)


