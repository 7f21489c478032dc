"""Emission families: likelihoods against scipy and the M-step as the weighted
maximum-likelihood estimate (zero gradient of the expected log-likelihood).
The contract shared by every family (bijections, exact statistics, empty
states, samples) is in test_family_contract.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dennl_jax as dj
from dennl_jax import emissions
from helpers import FAMILIES, random_emission, random_obs, reference_log_likelihoods

pytestmark = pytest.mark.x64


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


def test_multinomial_zero_probability():
  emission = dj.Multinomial(jnp.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]))
  ll = emission.log_likelihoods(jnp.array([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]]))
  np.testing.assert_allclose(ll[0], [3 * np.log(0.5), np.log(0.2) + 2 * np.log(0.3)])
  assert ll[1, 0] == -np.inf and np.isfinite(ll[1, 1])


@pytest.mark.parametrize("dim", [1, 2, 5, emissions.MAX_SUBSTITUTION_DIM + 1])
def test_gaussian_triangular_solve_matches_lapack(dim):
  # Forward substitution up to MAX_SUBSTITUTION_DIM (it avoids a jaxlib trsm
  # thread-pool deadlock), LAPACK beyond it; both against numpy's solver.
  rng = np.random.default_rng([70, dim])
  a = rng.normal(size=(3, dim, dim))
  chol = np.linalg.cholesky(a @ np.swapaxes(a, 1, 2) + dim * np.eye(dim))
  rhs = rng.normal(size=(3, dim, 7))
  z = jax.jit(emissions._solve_lower)(jnp.asarray(chol), jnp.asarray(rhs))
  np.testing.assert_allclose(z, np.linalg.solve(chol, rhs), rtol=1e-10, atol=1e-12)
