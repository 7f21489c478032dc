"""Converters to and from hmmlearn and dynamax (dennl_jax.interop).

Both directions for every registered emission family: the converted model
scores random sequences exactly as ``dj.log_likelihood`` does (hmmlearn's
``score``, dynamax's ``marginal_log_prob``; Multinomial after removing the
multinomial coefficient, which ours omits), round trips are exact, and models
whose parameters were made by the other library (hmmlearn ``fit``, dynamax
``initialize``) convert to ours with equal log-likelihoods.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dennl_jax as dj
from helpers import FAMILIES, NUM_TRIALS, random_hmm, random_obs, stack_trees
from dennl_jax import interop
from test_inference import multinomial_log_coefficient

pytestmark = pytest.mark.x64

TOL = dict(rtol=1e-10, atol=1e-10)
NUM_STEPS = 25
_log_likelihood = jax.jit(dj.log_likelihood)


def ours(hmm, obs):
  """Our log-likelihood on the scale of hmmlearn/dynamax (multinomial coefficient added)."""
  offset = multinomial_log_coefficient(obs) if isinstance(hmm.emission, dj.Multinomial) else 0.0
  return float(_log_likelihood(hmm, obs, np.ones(len(obs), bool))) + offset


def hmmlearn_obs(family, obs):
  if family in ("categorical", "poisson"):
    return obs[:, None].astype(np.int64)
  return obs.astype(np.int64) if family == "multinomial" else obs


def dynamax_obs(family, obs):
  if family in ("categorical", "poisson"):
    return obs[:, None]
  return obs[:, None, :] if family == "multinomial" else obs


def trials(family, name):
  return {name: NUM_TRIALS} if family == "multinomial" else {}


def assert_identical(a, b, **tol):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    if tol:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------
# hmmlearn
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_hmmlearn_round_trip_and_log_likelihood(family):
  rng = np.random.default_rng([30, FAMILIES.index(family)])
  hmm = random_hmm(family, rng, 3)
  obs = random_obs(family, rng, NUM_STEPS)
  model = interop.to_hmmlearn(hmm, **trials(family, "n_trials"))
  np.testing.assert_allclose(model.score(hmmlearn_obs(family, obs)), ours(hmm, obs), **TOL)
  back = interop.from_hmmlearn(model)
  assert type(back.emission) is type(hmm.emission)
  assert_identical(back, hmm)
  if family in ("gaussian", "diag_gaussian"):
    assert interop.from_hmmlearn(model, min_covar=0.5).emission.min_covar == 0.5
  model.startprob_[0] += 1.0                      # the converted arrays are copies
  assert_identical(back, hmm)


@pytest.mark.parametrize("family", FAMILIES)
def test_from_hmmlearn_fitted_model(family):
  """Parameters produced by hmmlearn itself (its initialisation and EM)."""
  from hmmlearn import hmm as hl
  rng = np.random.default_rng([31, FAMILIES.index(family)])
  obs = random_obs(family, rng, NUM_STEPS)
  common = dict(n_components=3, n_iter=3, random_state=0)
  model = {"categorical": lambda: hl.CategoricalHMM(**common),
           "multinomial": lambda: hl.MultinomialHMM(n_trials=NUM_TRIALS, **common),
           "poisson": lambda: hl.PoissonHMM(**common),
           "gaussian": lambda: hl.GaussianHMM(covariance_type="full", **common),
           "diag_gaussian": lambda: hl.GaussianHMM(covariance_type="diag", **common)}[family]()
  x = hmmlearn_obs(family, obs)
  model.fit(x)
  hmm = interop.from_hmmlearn(model)
  np.testing.assert_allclose(ours(hmm, obs), model.score(x), **TOL)


@pytest.mark.parametrize("covariance_type,family", [("spherical", dj.DiagGaussian),
                                                    ("tied", dj.Gaussian)])
def test_from_hmmlearn_other_covariance_types(covariance_type, family):
  from hmmlearn import hmm as hl
  rng = np.random.default_rng(32)
  obs = random_obs("gaussian", rng, NUM_STEPS)
  model = hl.GaussianHMM(3, covariance_type=covariance_type, n_iter=3, random_state=0).fit(obs)
  hmm = interop.from_hmmlearn(model)
  assert type(hmm.emission) is family
  np.testing.assert_allclose(ours(hmm, obs), model.score(obs), **TOL)


def test_hmmlearn_errors():
  from hmmlearn import hmm as hl
  rng = np.random.default_rng(33)
  hmm = random_hmm("categorical", rng, 3)
  hsmm = dj.HSMM(hmm.initial, np.full((3, 3), 0.5) * (1 - np.eye(3)),
                 dj.PoissonDuration(np.ones(3), max_duration=4), hmm.emission)
  with pytest.raises(ValueError, match=r"no explicit-duration HSMM\); got HSMM"):
    interop.to_hmmlearn(hsmm)
  with pytest.raises(ValueError, match="converts one model"):
    interop.to_hmmlearn(stack_trees([hmm, hmm]))
  with pytest.raises(ValueError, match="need n_trials"):
    interop.to_hmmlearn(random_hmm("multinomial", rng, 3))
  with pytest.raises(ValueError, match="Multinomial emissions only"):
    interop.to_hmmlearn(hmm, n_trials=5)
  with pytest.raises(ValueError, match="HMM.initial"):           # invalid parameters
    interop.to_hmmlearn(hmm.replace(initial=np.array([0.5, 0.5, 0.5])))
  with pytest.raises(ValueError, match="fit or initialise"):
    interop.from_hmmlearn(hl.CategoricalHMM(3))
  poisson = hl.PoissonHMM(2, init_params="")
  poisson.startprob_, poisson.transmat_ = np.full(2, 0.5), np.full((2, 2), 0.5)
  poisson.lambdas_ = np.ones((2, 2))
  with pytest.raises(ValueError, match="n_features must be 1"):
    interop.from_hmmlearn(poisson)
  gmm = hl.GMMHMM(2, n_mix=2)
  gmm.startprob_, gmm.transmat_ = np.full(2, 0.5), np.full((2, 2), 0.5)
  with pytest.raises(ValueError, match="no dennl_jax counterpart for hmmlearn GMMHMM"):
    interop.from_hmmlearn(gmm)


# ---------------------------------------------------------------------------
# dynamax
# ---------------------------------------------------------------------------

_JITTED = {}


def _marginal_log_prob(family, model, params, obs):
  # One compile per family for the whole file (eager dynamax compiles each of
  # its many small ops; every test here uses the same K, T and dimensions, so
  # the first model's jitted method serves the equal models of later tests).
  if family not in _JITTED:
    _JITTED[family] = jax.jit(model.marginal_log_prob)
  return float(_JITTED[family](params, obs))


@pytest.mark.parametrize("family", FAMILIES)
def test_dynamax_round_trip_and_log_likelihood(family):
  rng = np.random.default_rng([40, FAMILIES.index(family)])
  hmm = random_hmm(family, rng, 3)
  obs = random_obs(family, rng, NUM_STEPS)
  model, params = interop.to_dynamax(hmm, **trials(family, "num_trials"))
  np.testing.assert_allclose(_marginal_log_prob(family, model, params, dynamax_obs(family, obs)),
                             ours(hmm, obs), **TOL)
  back = interop.from_dynamax(params)
  assert type(back.emission) is type(hmm.emission)
  # DiagGaussian goes through scale_diags = sqrt(var): exact up to one rounding.
  assert_identical(back, hmm, **({"rtol": 1e-15} if family == "diag_gaussian" else {}))


def dynamax_params(family, rng, batch):
  """Random parameters built with dynamax's own NamedTuples (not by to_dynamax)."""
  import dynamax.hidden_markov_model as dm
  from dynamax.hidden_markov_model.models import (categorical_hmm, gaussian_hmm,
                                                  multinomial_hmm, poisson_hmm)
  from dynamax.hidden_markov_model.models.initial import ParamsStandardHMMInitialState
  from dynamax.hidden_markov_model.models.transitions import ParamsStandardHMMTransitions
  k = 3
  initial = ParamsStandardHMMInitialState(rng.dirichlet(np.ones(k), batch))
  transitions = ParamsStandardHMMTransitions(rng.dirichlet(np.ones(k), (batch, k)))
  if family in ("categorical", "multinomial"):
    v = 4 if family == "categorical" else 3
    probs = rng.dirichlet(np.ones(v), (batch, k, 1))
    if family == "categorical":
      return dm.CategoricalHMM(k, 1, v), categorical_hmm.ParamsCategoricalHMM(
          initial, transitions, categorical_hmm.ParamsCategoricalHMMEmissions(probs))
    return dm.MultinomialHMM(k, 1, v, NUM_TRIALS), multinomial_hmm.ParamsMultinomialHMM(
        initial, transitions, multinomial_hmm.ParamsMultinomialHMMEmissions(probs))
  if family == "poisson":
    return dm.PoissonHMM(k, 1), poisson_hmm.ParamsPoissonHMM(
        initial, transitions, poisson_hmm.ParamsPoissonHMMEmissions(
            rng.uniform(0.5, 5.0, (batch, k, 1))))
  means = rng.normal(size=(batch, k, 2))
  if family == "gaussian":
    factor = rng.normal(size=(batch, k, 2, 2))
    covs = factor @ np.swapaxes(factor, -1, -2) + 0.5 * np.eye(2)
    return dm.GaussianHMM(k, 2), gaussian_hmm.ParamsGaussianHMM(
        initial, transitions, gaussian_hmm.ParamsGaussianHMMEmissions(means, covs))
  return dm.DiagonalGaussianHMM(k, 2), gaussian_hmm.ParamsDiagonalGaussianHMM(
      initial, transitions, gaussian_hmm.ParamsDiagonalGaussianHMMEmissions(
          means, rng.uniform(0.5, 1.5, (batch, k, 2))))


@pytest.mark.parametrize("family", FAMILIES)
def test_from_dynamax_batched_params(family):
  """Parameters made as dynamax's NamedTuples, with a leading axis of two users."""
  rng = np.random.default_rng([41, FAMILIES.index(family)])
  model, params = dynamax_params(family, rng, batch=2)
  hmms = interop.from_dynamax(params)
  assert np.shape(hmms.initial) == (2, 3)
  for user in range(2):
    obs = random_obs(family, rng, NUM_STEPS)
    theirs = _marginal_log_prob(family, model, jax.tree_util.tree_map(lambda x: x[user], params),
                                dynamax_obs(family, obs))
    np.testing.assert_allclose(ours(jax.tree_util.tree_map(lambda x: x[user], hmms), obs),
                               theirs, **TOL)
  _, again = interop.to_dynamax(hmms, **trials(family, "num_trials"))
  assert_identical(again, params, rtol=1e-15)


def test_dynamax_errors():
  from dynamax.hidden_markov_model.models import bernoulli_hmm
  rng = np.random.default_rng(42)
  hmm = random_hmm("poisson", rng, 3)
  hsmm = dj.HSMM(hmm.initial, np.full((3, 3), 0.5) * (1 - np.eye(3)),
                 dj.PoissonDuration(np.ones(3), max_duration=4), hmm.emission)
  with pytest.raises(ValueError, match="no explicit-duration HSMM"):
    interop.to_dynamax(hsmm)
  with pytest.raises(ValueError, match="need num_trials"):
    interop.to_dynamax(random_hmm("multinomial", rng, 3))
  with pytest.raises(ValueError, match="Multinomial emissions only"):
    interop.to_dynamax(hmm, num_trials=3)
  bad = stack_trees([hmm, hmm.replace(transition=np.full((3, 3), 0.5))])
  with pytest.raises(ValueError, match=r"user \(1,\).*transition"):
    interop.to_dynamax(bad)
  _, params = dynamax_params("categorical", rng, batch=1)
  wide = params._replace(emissions=params.emissions._replace(
      probs=np.repeat(params.emissions.probs, 2, axis=-2)))
  with pytest.raises(ValueError, match="emission_dim 2"):
    interop.from_dynamax(wide)
  bernoulli = bernoulli_hmm.ParamsBernoulliHMM(
      params.initial, params.transitions, bernoulli_hmm.ParamsBernoulliHMMEmissions(
          np.full((1, 3, 2), 0.5)))
  with pytest.raises(ValueError, match="no dennl_jax counterpart for dynamax"):
    interop.from_dynamax(bernoulli)
  with pytest.raises(ValueError, match="expected dynamax HMM parameters"):
    interop.from_dynamax(hmm)
