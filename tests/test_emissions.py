"""Emission families: likelihoods against scipy, the M-step as the weighted
maximum-likelihood estimate (zero gradient of the expected log-likelihood),
and the unconstrained parameterisation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dennl_jax as dj
from conftest import FAMILIES, random_emission, random_obs, reference_log_likelihoods, tree_allclose

jax.config.update("jax_enable_x64", True)


@pytest.mark.parametrize("family", FAMILIES)
def test_log_likelihoods_match_scipy(family):
  rng = np.random.default_rng([80, FAMILIES.index(family)])
  emission = random_emission(family, rng, 3)
  obs = random_obs(family, rng, 7)
  np.testing.assert_allclose(emission.log_likelihoods(jnp.asarray(obs)),
                             reference_log_likelihoods(emission, obs), rtol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_m_step_maximises_expected_log_likelihood(family):
  rng = np.random.default_rng([81, FAMILIES.index(family)])
  emission = random_emission(family, rng, 3, min_covar=0.0)
  emission = jax.tree_util.tree_map(jnp.asarray, emission)
  obs = jnp.asarray(random_obs(family, rng, 40))
  weights = jnp.asarray(rng.dirichlet(np.ones(3), 40))
  updated = emission.m_step(emission.expected_statistics(obs, weights))

  def expected_log_likelihood(theta):
    return jnp.sum(weights * type(emission).from_unconstrained(theta).log_likelihoods(obs))

  theta = updated.to_unconstrained()
  grad = jax.grad(expected_log_likelihood)(theta)
  for g in jax.tree_util.tree_leaves(grad):
    np.testing.assert_allclose(g, 0.0, atol=1e-8)
  # ... and it is a maximum: a small perturbation lowers the objective.
  bumped = jax.tree_util.tree_map(lambda x: x + 1e-2 * jnp.asarray(rng.normal(size=x.shape)), theta)
  assert expected_log_likelihood(bumped) < expected_log_likelihood(theta)


@pytest.mark.parametrize("family", FAMILIES)
def test_unconstrained_round_trip(family):
  rng = np.random.default_rng([82, FAMILIES.index(family)])
  emission = jax.tree_util.tree_map(jnp.asarray, random_emission(family, rng, 3))
  tree_allclose(type(emission).from_unconstrained(emission.to_unconstrained()), emission,
                rtol=1e-10, atol=1e-12)
  # Any real theta maps to valid parameters.
  theta = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape)),
                                 emission.to_unconstrained())
  type(emission).from_unconstrained(theta).check_parameters()


def test_multinomial_zero_probability():
  emission = dj.Multinomial(jnp.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]))
  ll = emission.log_likelihoods(jnp.array([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]]))
  np.testing.assert_allclose(ll[0], [3 * np.log(0.5), np.log(0.2) + 2 * np.log(0.3)])
  assert ll[1, 0] == -np.inf and np.isfinite(ll[1, 1])


def test_states_without_mass_keep_parameters():
  rng = np.random.default_rng(83)
  for family in FAMILIES:
    emission = jax.tree_util.tree_map(jnp.asarray, random_emission(family, rng, 3))
    obs = jnp.asarray(random_obs(family, rng, 5))
    weights = jnp.zeros((5, 3)).at[:, 0].set(1.0)
    updated = emission.m_step(emission.expected_statistics(obs, weights))
    for new, old in zip(jax.tree_util.tree_leaves(updated), jax.tree_util.tree_leaves(emission)):
      assert np.all(np.isfinite(np.asarray(new)))
      np.testing.assert_array_equal(new[1:], old[1:])
