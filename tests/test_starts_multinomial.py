"""Family-dispatched starts (dennl_jax.starts with family=...): the Multinomial/Poisson
starts of Table 2's HSMM predictors and the Gaussian ones, against numpy brute force."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dennl_jax as dj
from dennl_jax import starts

pytestmark = pytest.mark.x64

K, C, D = 2, 6, 4


def _planted(key, num_users=12, num_steps=9):
  """Strength vectors of two phases: categories {0, 1, 2} vs {3, 4, 5}; ragged masks."""
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
  phase = rng.integers(0, 2, size=(num_users, num_steps))
  probs = np.where(np.arange(C)[None, None] // 3 == phase[..., None], 1.0, 0.0)
  strengths = rng.dirichlet(np.full(3, 20.0), size=(num_users, num_steps))
  obs = np.zeros((num_users, num_steps, C))
  obs[probs > 0] = strengths.reshape(-1)
  lengths = rng.integers(1, num_steps + 1, size=num_users)
  mask = np.arange(num_steps)[None] < lengths[:, None]
  return obs, mask


def _smoothed(rows, smoothing):
  rows = np.maximum(np.asarray(rows), 0.0)
  rows = rows / rows.sum(-1, keepdims=True)
  return (1 - smoothing) * rows + smoothing / rows.shape[-1]


def test_cluster_start_hooks_match_brute_force():
  rng = np.random.default_rng(0)
  points = rng.normal(size=(11, 3))
  mask = rng.random(11) > 0.3
  labels = rng.integers(0, K, size=11)
  centers = rng.normal(size=(K, 3))
  # Multinomial: the centres, clipped at 0, normalised, mixed with the uniform distribution.
  got = dj.Multinomial.cluster_start(points, mask, centers, labels, smoothing=0.1)
  np.testing.assert_allclose(got.probs, _smoothed(centers, 0.1), atol=1e-12)
  # Gaussian: per-cluster covariance of the valid points about the centre, or one pooled
  # within-cluster covariance for every state; min_covar on the diagonal.
  per = dj.Gaussian.cluster_start(points, mask, centers, labels, per_cluster=True, min_covar=0.01)
  shared = dj.Gaussian.cluster_start(points, mask, centers, labels, per_cluster=False,
                                     min_covar=0.01)
  pooled_diff = (points - centers[labels])[mask]
  expect_shared = pooled_diff.T @ pooled_diff / (max(mask.sum(), 2) - 1) + 0.01 * np.eye(3)
  for k in range(K):
    d = points[mask & (labels == k)] - centers[k]
    expect = d.T @ d / (max(len(d), 2) - 1) + 0.01 * np.eye(3)
    np.testing.assert_allclose(per.cov[k], expect, atol=1e-12)
    np.testing.assert_allclose(shared.cov[k], expect_shared, atol=1e-12)
  np.testing.assert_array_equal(per.mean, centers)
  assert per.min_covar == shared.min_covar == 0.01


def test_pooled_multinomial_start_finds_the_planted_phases():
  obs, mask = _planted(jax.random.key(0))
  start = starts.pooled_start(jax.random.key(4), obs, mask, num_states=K, max_duration=D,
                              duration_rate=2.0, family=dj.Multinomial, smoothing=0.05)
  dj.validate(start, obs[0], mask[0])
  np.testing.assert_array_equal(np.diagonal(start.transition), 0.0)
  np.testing.assert_allclose(start.initial, 0.5)
  np.testing.assert_allclose(start.duration.rate, 2.0)
  assert start.duration.max_duration == D
  # Smoothed centres: every category reachable; each row is one planted phase, whose mean
  # strength is uniform over its three categories.
  probs = np.asarray(start.emission.probs)
  assert probs.min() >= 0.05 / C - 1e-12
  assert sorted(np.argmax(probs, 1) // 3) == [0, 1]
  for row in probs:
    phase = np.argmax(row) // 3
    np.testing.assert_allclose(row[3 * phase:3 * phase + 3], (1 - 0.05) / 3 + 0.05 / C, atol=0.05)
  codec = dj.ParamCodec(start)
  np.testing.assert_allclose(codec.decode(codec.encode(start)).emission.probs, probs, atol=1e-8)


@pytest.mark.parametrize("family,options", [(dj.Multinomial, {"smoothing": 0.05}),
                                            (dj.Gaussian, {"min_covar": 1e-3})])
def test_user_start_ignores_padding_and_is_keyed(family, options):
  obs, mask = _planted(jax.random.key(1), num_users=1, num_steps=7)
  obs, mask = obs[0], mask[0] | (np.arange(7) < 5)
  start = lambda o, m, key=jax.random.key(2): starts.user_start(
      key, jnp.asarray(o), jnp.asarray(m), num_states=K, max_duration=D, family=family, **options)
  base = start(obs, mask)
  # Garbage on masked steps, and extra padded steps, change nothing.
  garbage = np.where(mask[:, None], obs, 7.0)
  padded_obs = np.concatenate([garbage, np.full((5, C), 3.0)])
  padded_mask = np.concatenate([mask, np.zeros(5, bool)])
  for o, m in ((garbage, mask), (padded_obs, padded_mask)):
    for a, b in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(start(o, m))):
      np.testing.assert_allclose(a, b, atol=1e-12)
  assert isinstance(base.emission, family)
  np.testing.assert_allclose(base.duration.rate, 4.0)


def test_random_start_draws_smoothed_dirichlet_rows():
  obs = jnp.zeros((3, C))
  draw = lambda key, k=400: starts.random_start(key, obs, jnp.ones(3, bool), num_states=k,
                                                max_duration=D, family=dj.Multinomial,
                                                concentration=1.0, smoothing=0.1).emission.probs
  probs = np.asarray(draw(jax.random.key(5)))
  np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-12)
  assert probs.min() >= 0.1 / C - 1e-12
  np.testing.assert_array_equal(probs, draw(jax.random.key(5)))
  assert not np.allclose(probs, draw(jax.random.key(6)))
  # Dirichlet(1) rows: mean 1/C per category; smoothing keeps it.  Standard error
  # of a row entry's mean over 400 rows: sqrt((C - 1) / (C^2 (C + 1))) / 20 ~ 0.0070.
  np.testing.assert_allclose(probs.mean(0), 1.0 / C, atol=0.03)


def test_starts_reject_bad_input():
  obs, mask = _planted(jax.random.key(3))
  with pytest.raises(ValueError, match="no cluster_start"):
    starts.pooled_start(jax.random.key(0), obs, mask, num_states=K, max_duration=D,
                        family=dj.Poisson)
  with pytest.raises(ValueError, match="no random_start"):
    starts.random_start(jax.random.key(0), obs[0], mask[0], num_states=K, max_duration=D,
                        family=dj.Gaussian)
  with pytest.raises(ValueError, match="at least one valid step"):
    starts.pooled_start(jax.random.key(0), obs, np.zeros_like(mask), num_states=K,
                        max_duration=D, family=dj.Multinomial)
  with pytest.raises(ValueError, match="does not match"):
    starts.pooled_start(jax.random.key(0), obs, mask[:, :3], num_states=K, max_duration=D,
                        family=dj.Multinomial)
