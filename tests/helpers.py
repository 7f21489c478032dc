"""Shared test helpers: random models and observations for every emission
family, a brute-force oracle that enumerates all state paths, and the family
registries the contract tests run over.

Imported by the test modules as ``from helpers import ...`` (pytest puts this
directory on ``sys.path``; ``conftest.py`` holds only pytest configuration).
Everything here is plain numpy in float64; tests that need float64 in JAX carry
the ``x64`` marker (see ``conftest.py``).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import jax
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

import dennl_jax as dj

NUM_SYMBOLS = 4      # Categorical V
NUM_FEATURES = 3     # Multinomial V
DIM = 2              # Gaussian D
NUM_TRIALS = 5       # Multinomial counts per step (integers, so hmmlearn can compare)


@dataclasses.dataclass(frozen=True)
class EmissionSpec:
  """Everything the tests need to know about one emission family.

  make(rng, num_states, min_covar) -> a random family with numpy leaves (no
    zero probabilities);
  observations(rng, num_steps) -> valid observations (need not come from a model);
  garbage(rng, num_steps) -> values for padded slots that would be invalid on
    a valid step (NaN, out of range, ...);
  reference_log_likelihoods(family, obs) -> (T, K) log b_k(o_t) computed
    independently of the engine (scipy or closed form);
  exact_support(family) -> (obs (N, ...), weights (N, K)): a weighted set of
    observations whose weighted sufficient statistics equal each state's
    expectations exactly, so the M-step of its statistics recovers the family.
  """
  name: str
  family_type: type
  make: Callable
  observations: Callable
  garbage: Callable
  reference_log_likelihoods: Callable
  exact_support: Callable


EMISSIONS: dict[str, EmissionSpec] = {}


def register_emission(spec: EmissionSpec) -> EmissionSpec:
  """Add a family to the registry every contract test runs over."""
  EMISSIONS[spec.name] = spec
  return spec


def spec_of(family) -> EmissionSpec:
  for spec in EMISSIONS.values():
    if type(family) is spec.family_type:
      return spec
  raise TypeError(f"no test spec registered for {type(family).__name__}")


def _nan_garbage(shape_tail):
  def garbage(rng, num_steps):
    out = np.full((num_steps,) + shape_tail, np.nan)
    out[::2] = -5.0 if shape_tail else -2.5
    return out
  return garbage


def _gaussian_garbage(rng, num_steps):
  out = np.full((num_steps, DIM), np.nan)
  out[::3] = np.inf
  return out


def _categorical_support(family):
  # Every symbol, weighted by each state's probability of it.
  return np.arange(family.probs.shape[1], dtype=np.int32), np.asarray(family.probs).T


def _multinomial_support(family):
  # Unit vectors: weighted counts are exactly the probabilities.
  return np.eye(family.probs.shape[1]), np.asarray(family.probs).T


def _poisson_support(family):
  # State k: the two integers around its rate, weighted so their mean is the rate.
  rate = np.asarray(family.rate)
  lo = np.floor(rate)
  obs = np.concatenate([lo, lo + 1.0])
  num_states = rate.shape[0]
  weights = np.zeros((2 * num_states, num_states))
  weights[np.arange(num_states), np.arange(num_states)] = lo + 1.0 - rate
  weights[num_states + np.arange(num_states), np.arange(num_states)] = rate - lo
  return obs, weights


def _sigma_points(means, factors):
  """mean +- sqrt(D) * factor column: equal weights give the exact mean and covariance."""
  num_states, dim = means.shape
  obs, weights = [], np.zeros((2 * dim * num_states, num_states))
  for k in range(num_states):
    for d in range(dim):
      for sign in (1.0, -1.0):
        weights[len(obs), k] = 1.0 / (2 * dim)
        obs.append(means[k] + sign * np.sqrt(dim) * factors[k][:, d])
  return np.stack(obs), weights


def _random_gaussian(rng, num_states, min_covar):
  mean = 2.0 * rng.normal(size=(num_states, DIM))
  factor = rng.normal(size=(num_states, DIM, DIM))
  cov = factor @ np.swapaxes(factor, 1, 2) + 0.5 * np.eye(DIM)
  return dj.Gaussian(mean, cov, min_covar=min_covar)


def _gaussian_reference(emission, obs):
  return np.stack([np.reshape(stats.multivariate_normal.logpdf(obs, m, c), -1)
                   for m, c in zip(np.asarray(emission.mean), np.asarray(emission.cov))], -1)


def _diag_reference(emission, obs):
  return np.stack([stats.norm.logpdf(obs, m, np.sqrt(v)).sum(-1)
                   for m, v in zip(np.asarray(emission.mean), np.asarray(emission.var))], -1)


def _random_multinomial_obs(rng, num_steps):
  probs = rng.dirichlet(np.ones(NUM_FEATURES), num_steps)
  return np.stack([rng.multinomial(NUM_TRIALS, p) for p in probs]).astype(np.float64)


def _categorical_garbage(rng, num_steps):
  return rng.choice(np.array([-3, NUM_SYMBOLS, NUM_SYMBOLS + 7, 2**30]), num_steps).astype(np.int32)


register_emission(EmissionSpec(
    "categorical", dj.Categorical,
    make=lambda rng, k, min_covar: dj.Categorical(rng.dirichlet(np.ones(NUM_SYMBOLS), k)),
    observations=lambda rng, t: rng.integers(0, NUM_SYMBOLS, t).astype(np.int32),
    garbage=_categorical_garbage,
    reference_log_likelihoods=lambda e, obs: np.log(np.asarray(e.probs))[:, obs].T,
    exact_support=_categorical_support))
register_emission(EmissionSpec(
    "gaussian", dj.Gaussian, make=_random_gaussian,
    observations=lambda rng, t: 2.0 * rng.normal(size=(t, DIM)),
    garbage=_gaussian_garbage, reference_log_likelihoods=_gaussian_reference,
    exact_support=lambda e: _sigma_points(np.asarray(e.mean), np.linalg.cholesky(e.cov))))
register_emission(EmissionSpec(
    "diag_gaussian", dj.DiagGaussian,
    make=lambda rng, k, min_covar: dj.DiagGaussian(
        2.0 * rng.normal(size=(k, DIM)), rng.uniform(0.3, 2.0, (k, DIM)), min_covar=min_covar),
    observations=lambda rng, t: 2.0 * rng.normal(size=(t, DIM)),
    garbage=_gaussian_garbage, reference_log_likelihoods=_diag_reference,
    exact_support=lambda e: _sigma_points(
        np.asarray(e.mean), [np.diag(np.sqrt(v)) for v in np.asarray(e.var)])))
register_emission(EmissionSpec(
    "multinomial", dj.Multinomial,
    make=lambda rng, k, min_covar: dj.Multinomial(rng.dirichlet(np.ones(NUM_FEATURES), k)),
    observations=_random_multinomial_obs, garbage=_nan_garbage((NUM_FEATURES,)),
    # No multinomial coefficient (see Multinomial docstring).
    reference_log_likelihoods=lambda e, obs: obs @ np.log(np.asarray(e.probs)).T,
    exact_support=_multinomial_support))
register_emission(EmissionSpec(
    "poisson", dj.Poisson,
    make=lambda rng, k, min_covar: dj.Poisson(rng.uniform(0.5, 5.0, k)),
    observations=lambda rng, t: rng.poisson(2.5, t).astype(np.float64),
    garbage=_nan_garbage(()),
    reference_log_likelihoods=lambda e, obs: np.stack(
        [stats.poisson.logpmf(obs, r) for r in np.asarray(e.rate)], -1),
    exact_support=_poisson_support))

# The library's own families (a test file may register more, see
# test_family_contract.py); parametrised tests use these names.
FAMILIES = tuple(EMISSIONS)


def random_emission(family: str, rng: np.random.Generator, num_states: int, min_covar=1e-6):
  return EMISSIONS[family].make(rng, num_states, min_covar)


def random_hmm(family: str, rng: np.random.Generator, num_states: int, min_covar=1e-6):
  """A random HMM with numpy float64 leaves (no zero probabilities)."""
  return dj.HMM(rng.dirichlet(np.ones(num_states)),
                rng.dirichlet(np.ones(num_states), num_states),
                random_emission(family, rng, num_states, min_covar))


def random_obs(family: str, rng: np.random.Generator, num_steps: int):
  """Valid observations (numpy) that need not come from the model."""
  return EMISSIONS[family].observations(rng, num_steps)


def garbage_like(family: str, rng: np.random.Generator, num_steps: int):
  """Values for padded slots that would be invalid on a valid step."""
  return EMISSIONS[family].garbage(rng, num_steps)


def pad_sequence(obs, rng: np.random.Generator, padded_len: int, family: str):
  """Scatter ``obs`` into ``padded_len`` slots at random positions.

  The first and last slots are always padding (leading and trailing), the
  rest are random (interleaved).  Returns (padded_obs, mask, valid_index).
  """
  num_steps = obs.shape[0]
  inner = rng.choice(np.arange(1, padded_len - 1), num_steps, replace=False)
  valid_index = np.sort(inner)
  mask = np.zeros(padded_len, bool)
  mask[valid_index] = True
  padded = garbage_like(family, rng, padded_len)
  padded[valid_index] = obs
  return padded, mask, valid_index


def reference_log_likelihoods(emission, obs) -> np.ndarray:
  """(T, K) log b_k(o_t) computed independently of the engine (the family's spec)."""
  return spec_of(emission).reference_log_likelihoods(emission, obs)


class BruteForce:
  """Exact posterior quantities by enumerating all K^T state paths."""

  def __init__(self, hmm, obs):
    initial = np.asarray(hmm.initial)
    transition = np.asarray(hmm.transition)
    self.log_b = reference_log_likelihoods(hmm.emission, obs)
    num_steps, num_states = self.log_b.shape
    self.paths = np.array(list(itertools.product(range(num_states), repeat=num_steps)))
    log_joint = np.log(initial)[self.paths[:, 0]]
    log_joint = log_joint + self.log_b[np.arange(num_steps), self.paths].sum(-1)
    if num_steps > 1:
      log_joint = log_joint + np.log(transition)[self.paths[:, :-1], self.paths[:, 1:]].sum(-1)
    self.log_joint = log_joint
    self.num_states = num_states
    self.num_steps = num_steps
    self.initial, self.transition = initial, transition

  def log_likelihood(self):
    return logsumexp(self.log_joint)

  def smoothed(self):
    weight = np.exp(self.log_joint - self.log_likelihood())
    onehot = np.eye(self.num_states)[self.paths]            # (P, T, K)
    return np.einsum("p,ptk->tk", weight, onehot)

  def filtered(self):
    out = np.zeros((self.num_steps, self.num_states))
    for t in range(self.num_steps):
      # p(z_t | o_{0:t}): marginalise the future by enumerating prefixes.
      prefix = self.paths[:, :t + 1]
      log_prefix = np.log(self.initial)[prefix[:, 0]] + self.log_b[np.arange(t + 1), prefix].sum(-1)
      if t > 0:
        log_prefix = log_prefix + np.log(self.transition)[prefix[:, :-1], prefix[:, 1:]].sum(-1)
      # Every prefix appears K^(T-1-t) times in the enumeration; weights cancel.
      weight = np.exp(log_prefix - logsumexp(log_prefix))
      out[t] = np.bincount(prefix[:, -1], weight, minlength=self.num_states)
    return out

  def transition_counts(self):
    weight = np.exp(self.log_joint - self.log_likelihood())
    counts = np.zeros((self.num_states, self.num_states))
    for t in range(1, self.num_steps):
      np.add.at(counts, (self.paths[:, t - 1], self.paths[:, t]), weight)
    return counts

  def viterbi(self):
    return self.paths[np.argmax(self.log_joint)]


def tree_allclose(a, b, **kwargs) -> None:
  leaves_a, tree_a = jax.tree_util.tree_flatten(a)
  leaves_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b, (tree_a, tree_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kwargs)


def stack_trees(trees):
  return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


# Every public function that takes (params, obs, mask) for one sequence.
PUBLIC_SEQUENCE_FUNCTIONS = {
    "log_likelihood": dj.log_likelihood,
    "posterior": dj.posterior,
    "filtered_posteriors": dj.filtered_posteriors,
    "smoothed_posteriors": dj.smoothed_posteriors,
    "expected_transition_counts": dj.expected_transition_counts,
    "viterbi": dj.viterbi,
    "em_step": dj.em_step,
    "em_step_with_log_likelihood": dj.em_step_with_log_likelihood,
}


@dataclasses.dataclass(frozen=True)
class DurationSpec:
  """A duration family for the contract tests: make(rng, num_states, max_duration)."""
  name: str
  make: Callable


DURATIONS = {
    "poisson": DurationSpec("poisson", lambda rng, k, d: dj.PoissonDuration(
        rng.uniform(0.5, 4.0, k), max_duration=d)),
    "categorical": DurationSpec("categorical", lambda rng, k, d: dj.CategoricalDuration(
        rng.dirichlet(np.ones(d), k))),
}


def slow_except(values, *fast):
  """Parametrize ``values`` for the two tiers: those in ``fast`` run in the fast
  tier (``-m "not slow"``), the others are marked ``slow``; the full suite runs all."""
  return [v if v in fast else pytest.param(v, marks=pytest.mark.slow) for v in values]
