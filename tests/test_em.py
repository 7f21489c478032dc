"""The EM step against hmmlearn's Baum-Welch update, padding invariance, and
monotonicity of conventional EM (``fit_em``) for every emission family."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dennl_jax as dj
from helpers import (FAMILIES, pad_sequence, random_hmm, random_obs, slow_except, stack_trees,
                     tree_allclose)
from test_inference import hmmlearn_obs, to_hmmlearn

pytestmark = pytest.mark.x64


def hmmlearn_params(model, family):
  if family in ("categorical", "multinomial"):
    emission = (model.emissionprob_,)
  elif family == "poisson":
    emission = (model.lambdas_[:, 0],)
  elif family == "gaussian":
    emission = (model.means_, model.covars_)
  else:
    emission = (model.means_, model._covars_)
  return model.startprob_, model.transmat_, emission


def emission_leaves(emission):
  return tuple(jax.tree_util.tree_leaves(emission))


@pytest.mark.parametrize("family", FAMILIES)
def test_em_step_matches_hmmlearn(family):
  rng = np.random.default_rng([60, FAMILIES.index(family)])
  # min_covar = 0: hmmlearn's update (priors off) adds nothing to the covariance.
  hmm = random_hmm(family, rng, 3, min_covar=0.0)
  obs = random_obs(family, rng, 50)
  new, ll = dj.em_step_with_log_likelihood(hmm, obs, np.ones(50, bool))

  model = to_hmmlearn(hmm, family)
  model.fit(hmmlearn_obs(family, obs))
  initial, transition, emission = hmmlearn_params(model, family)
  np.testing.assert_allclose(new.initial, initial, rtol=1e-7, atol=1e-10)
  np.testing.assert_allclose(new.transition, transition, rtol=1e-7, atol=1e-10)
  for ours, ref in zip(emission_leaves(new.emission), emission):
    np.testing.assert_allclose(ours, ref, rtol=1e-7, atol=1e-10)
  np.testing.assert_allclose(ll, dj.log_likelihood(hmm, obs, np.ones(50, bool)), rtol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_em_step_padding_equals_compressed(family):
  rng = np.random.default_rng([61, FAMILIES.index(family)])
  hmm = random_hmm(family, rng, 3)
  obs = random_obs(family, rng, 6)
  padded, mask, _ = pad_sequence(obs, rng, 20, family)
  tree_allclose(dj.em_step(hmm, padded, mask), dj.em_step(hmm, obs, np.ones(6, bool)),
                rtol=1e-9, atol=1e-12)


def test_em_step_keeps_parameters_of_unvisited_states():
  rng = np.random.default_rng(62)
  hmm = random_hmm("categorical", rng, 3)
  # State 2 can never be reached: no initial mass and no transition into it.
  transition = np.asarray(hmm.transition).copy()
  transition[:, 2] = 0.0
  transition /= transition.sum(-1, keepdims=True)
  hmm = hmm.replace(initial=np.array([0.5, 0.5, 0.0]), transition=transition)
  new = dj.em_step(hmm, random_obs("categorical", rng, 8), np.ones(8, bool))
  for leaf in jax.tree_util.tree_leaves(new):
    assert np.all(np.isfinite(np.asarray(leaf)))
  np.testing.assert_array_equal(new.emission.probs[2], hmm.emission.probs[2])
  np.testing.assert_array_equal(new.transition[2], hmm.transition[2])
  assert float(new.initial[2]) == 0.0


@pytest.mark.parametrize("family", slow_except(FAMILIES, "categorical", "gaussian"))
def test_fit_em_log_likelihood_never_decreases(family):
  rng = np.random.default_rng([63, FAMILIES.index(family)])
  num_users, num_steps, num_iters = 3, 24, 12
  truth = random_hmm(family, rng, 2)
  keys = jax.random.split(jax.random.PRNGKey(FAMILIES.index(family)), num_users)
  _, obs = jax.vmap(lambda k: dj.sample(k, truth, num_steps))(keys)
  obs = np.asarray(obs)
  masks = np.ones((num_users, num_steps), bool)
  masks[0, 18:] = False          # trailing padding
  masks[1, :5] = False           # leading padding
  masks[2, 3:9] = False          # a gap
  starts = stack_trees([random_hmm(family, rng, 2) for _ in range(num_users)])

  fitted, trace = dj.fit_em(starts, obs, masks, num_iters)
  trace = np.asarray(trace)
  assert trace.shape == (num_users, num_iters + 1)
  assert np.all(np.isfinite(trace))
  steps = np.diff(trace, axis=1)
  assert np.all(steps >= -1e-8 * np.abs(trace[:, 1:])), steps.min()
  assert np.all(trace[:, -1] > trace[:, 0])  # EM made progress for every user
  # The trace starts at the initial log-likelihood and ends at the fitted one.
  log_likelihood = jax.jit(dj.log_likelihood)
  for u in range(num_users):
    start_u = jax.tree_util.tree_map(lambda x: x[u], starts)
    fitted_u = jax.tree_util.tree_map(lambda x: x[u], fitted)
    np.testing.assert_allclose(trace[u, 0], log_likelihood(start_u, obs[u], masks[u]), rtol=1e-10)
    np.testing.assert_allclose(trace[u, -1], log_likelihood(fitted_u, obs[u], masks[u]),
                               rtol=1e-10)


def test_fit_em_equals_repeated_em_step():
  rng = np.random.default_rng(64)
  starts = stack_trees([random_hmm("poisson", rng, 2) for _ in range(2)])
  obs = np.stack([random_obs("poisson", rng, 10) for _ in range(2)])
  masks = np.ones((2, 10), bool)
  masks[1, 7:] = False
  fitted, _ = dj.fit_em(starts, obs, masks, 3)
  step = jax.jit(jax.vmap(dj.em_step))
  params = starts
  for _ in range(3):
    params = step(params, obs, masks)
  tree_allclose(fitted, params, rtol=1e-10, atol=1e-12)


def test_fit_em_rejects_bad_num_iters():
  rng = np.random.default_rng(65)
  starts = stack_trees([random_hmm("poisson", rng, 2)])
  with pytest.raises(ValueError, match="num_iters"):
    dj.fit_em(starts, np.ones((1, 4)), np.ones((1, 4), bool), -1)
