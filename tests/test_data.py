"""Synthetic population, HSMM sampler and noise injection."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dennl_jax import synthetic as S

# float64, as these tests ran in the full suite before x64 became a per-test
# marker (modules collected before them switched it on at import).
pytestmark = pytest.mark.x64

CONFIG = dataclasses.replace(S.SyntheticConfig(), num_states=4, obs_dim=2, max_duration=6,
                             embed_dim=8, num_factors=2)


@pytest.fixture(scope="module")
def world():
  return S.make_world(jax.random.PRNGKey(0), CONFIG)


def test_population_shapes_validity_and_determinism(world):
  pop = S.make_population(jax.random.PRNGKey(1), world, 7, CONFIG)
  k, o = CONFIG.num_states, CONFIG.obs_dim
  assert pop.embedding.shape == (7, CONFIG.embed_dim)
  assert pop.params.mean.shape == (7, k, o) and pop.params.cov.shape == (7, k, o, o)
  assert np.all(np.asarray(pop.embedding) >= 0)
  np.testing.assert_allclose(np.diagonal(pop.params.transition, axis1=1, axis2=2), 0.0)
  np.testing.assert_allclose(pop.params.transition.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(pop.params.initial.sum(-1), 1.0, atol=1e-5)
  assert np.all(np.linalg.eigvalsh(np.asarray(pop.params.cov)) > 0)
  assert np.all(np.asarray(pop.params.rate) > 0)
  assert np.linalg.matrix_rank(np.asarray(world.embed_matrix, np.float64)) == CONFIG.embed_dim
  again = S.make_population(jax.random.PRNGKey(1), world, 7, CONFIG)
  np.testing.assert_array_equal(pop.embedding, again.embedding)
  other = S.make_population(jax.random.PRNGKey(2), world, 7, CONFIG)
  assert not np.allclose(pop.embedding, other.embedding)


def test_embedding_is_relu_of_affine_serialisation(world):
  pop = S.make_population(jax.random.PRNGKey(1), world, 3, CONFIG)
  x = np.asarray(S.serialize(pop.params), np.float64)
  assert x.shape == (3, S.serialized_dim(CONFIG))
  expected = np.maximum(x @ np.asarray(world.embed_matrix, np.float64).T
                        + np.asarray(world.embed_bias), 0.0)
  np.testing.assert_allclose(pop.embedding, expected, atol=1e-5)


def test_users_are_related_but_different(world):
  pop = S.make_population(jax.random.PRNGKey(3), world, 200, CONFIG)
  means = np.asarray(pop.params.mean)                       # (U, K, O)
  # The same state across users is closer than different states of one user.
  same_state = np.mean(np.linalg.norm(means[1:] - means[:1], axis=-1))
  diffs = means[:, :, None, :] - means[:, None, :, :]
  off = ~np.eye(CONFIG.num_states, dtype=bool)
  other_state = np.mean(np.linalg.norm(diffs, axis=-1)[:, off])
  assert same_state < other_state
  assert np.std(means, axis=0).min() > 0.5                  # users do differ
  # The population's average is the shared structure.
  np.testing.assert_allclose(means.mean(0), world.base_mean, atol=0.6)
  # A part of each user's deviation is explained by the few latent factors
  # (shared across states), the rest is idiosyncratic.
  dev = (means - means.mean(0)).reshape(means.shape[0], -1)
  factors = np.asarray(pop.factors, np.float64)
  coef, *_ = np.linalg.lstsq(factors, dev, rcond=None)
  r2 = 1.0 - np.sum((dev - factors @ coef) ** 2) / np.sum(dev ** 2)
  assert 0.15 < r2 < 0.7, r2
  # The embedding carries the latent factors (a linear read-out explains a good
  # part) without determining them: it is informative, not invertible.
  emb = np.asarray(pop.embedding, np.float64)
  design = np.concatenate([emb, np.ones((emb.shape[0], 1))], 1)
  coef, *_ = np.linalg.lstsq(design, np.asarray(pop.factors), rcond=None)
  resid = np.asarray(pop.factors) - design @ coef
  assert np.mean(resid ** 2) < 0.6 * np.var(np.asarray(pop.factors))


def test_sampler_respects_durations_and_zero_self_transitions(world):
  pop = S.make_population(jax.random.PRNGKey(4), world, 20, CONFIG)
  states, obs = S.sample_sequences(jax.random.PRNGKey(5), pop.params, 60, CONFIG.max_duration)
  assert states.shape == (20, 60) and obs.shape == (20, 60, CONFIG.obs_dim)
  states = np.asarray(states)
  assert states.min() >= 0 and states.max() < CONFIG.num_states
  for row in states:
    change = np.flatnonzero(np.diff(row) != 0)
    runs = np.diff(np.concatenate([[-1], change, [len(row) - 1]]))
    # A run of one state can be two back-to-back segments only if the state
    # jumped to itself, which the zero diagonal forbids: every run is one
    # segment, so no run exceeds D.
    assert runs.max() <= CONFIG.max_duration


def test_sampler_duration_distribution_matches_poisson():
  cfg = dataclasses.replace(CONFIG, max_duration=12)
  k = cfg.num_states
  params = S.UserParams(jnp.full((1, k), 1.0 / k),
                        jnp.broadcast_to((1 - jnp.eye(k)) / (k - 1), (1, k, k)),
                        jnp.full((1, k), 3.0), jnp.zeros((1, k, 2)),
                        jnp.broadcast_to(jnp.eye(2), (1, k, 2, 2)))
  params = params._replace(**{f: jnp.repeat(getattr(params, f), 60, 0) for f in params._fields})
  states, _ = S.sample_sequences(jax.random.PRNGKey(6), params, 400, cfg.max_duration)
  lengths = []
  for row in np.asarray(states):
    change = np.flatnonzero(np.diff(row) != 0)
    runs = np.diff(np.concatenate([[-1], change]))      # complete segments only
    lengths.extend(runs[1:].tolist())                    # the first one is complete too; drop for symmetry
  lengths = np.asarray(lengths)
  probs = np.exp(np.asarray(S.duration_log_probs(3.0, cfg.max_duration), np.float64))
  expected = probs @ np.arange(1, cfg.max_duration + 1)
  assert abs(lengths.mean() - expected) < 0.1


def test_inject_noise_replaces_fraction_from_same_sequence():
  rng = np.random.default_rng(0)
  obs = jnp.asarray(rng.normal(size=(5, 40, 3)), jnp.float32)
  original = np.array(obs)
  noisy, replaced = S.inject_noise(jax.random.PRNGKey(0), obs, 0.2)
  noisy, replaced = np.asarray(noisy), np.asarray(replaced)
  np.testing.assert_array_equal(np.asarray(obs), original)       # input untouched
  np.testing.assert_array_equal(replaced.sum(1), 8)
  np.testing.assert_array_equal(noisy[~replaced], original[~replaced])
  for u in range(5):
    for t in np.flatnonzero(replaced[u]):
      matches = np.flatnonzero(np.all(original[u] == noisy[u, t], axis=-1))
      assert matches.size > 0 and np.any(matches != t)             # another step's value
  again, _ = S.inject_noise(jax.random.PRNGKey(0), obs, 0.2)
  np.testing.assert_array_equal(noisy, again)
  other, _ = S.inject_noise(jax.random.PRNGKey(1), obs, 0.2)
  assert not np.array_equal(noisy, other)


def test_inject_noise_respects_mask_and_fraction_bounds():
  obs = jnp.arange(2 * 10, dtype=jnp.float32).reshape(2, 10)
  mask = jnp.asarray(np.arange(10)[None, :] < np.array([[10], [6]]))
  noisy, replaced = S.inject_noise(jax.random.PRNGKey(2), obs, 0.5, mask)
  noisy, replaced = np.asarray(noisy), np.asarray(replaced)
  np.testing.assert_array_equal(replaced.sum(1), [5, 3])
  assert not replaced[1, 6:].any()
  # Sources are valid steps of the same row: values 10..15 for row 1.
  assert np.all((noisy[1, :6] >= 10) & (noisy[1, :6] <= 15))
  np.testing.assert_array_equal(noisy[1, 6:], np.asarray(obs)[1, 6:])
  same, none = S.inject_noise(jax.random.PRNGKey(2), obs, 0.0, mask)
  np.testing.assert_array_equal(same, obs)
  assert not np.asarray(none).any()
  with pytest.raises(ValueError, match="fraction"):
    S.inject_noise(jax.random.PRNGKey(2), obs, 1.5)
