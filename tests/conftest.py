"""Shared helpers: random models and observations for every emission family,
and a brute-force oracle that enumerates all state paths.

Imported by the test modules as ``from conftest import ...`` (pytest puts
this directory on ``sys.path``).  Everything here is plain numpy in float64;
the test modules enable ``jax_enable_x64`` themselves.
"""
from __future__ import annotations

import itertools

import jax
import numpy as np
from scipy import stats
from scipy.special import logsumexp

import dennl_jax as dj

FAMILIES = ("categorical", "gaussian", "diag_gaussian", "multinomial", "poisson")
NUM_SYMBOLS = 4      # Categorical V
NUM_FEATURES = 3     # Multinomial V
DIM = 2              # Gaussian D
NUM_TRIALS = 5       # Multinomial counts per step (integers, so hmmlearn can compare)


def random_emission(family: str, rng: np.random.Generator, num_states: int, min_covar=1e-6):
  if family == "categorical":
    return dj.Categorical(rng.dirichlet(np.ones(NUM_SYMBOLS), num_states))
  if family == "multinomial":
    return dj.Multinomial(rng.dirichlet(np.ones(NUM_FEATURES), num_states))
  if family == "poisson":
    return dj.Poisson(rng.uniform(0.5, 5.0, num_states))
  if family == "gaussian":
    mean = 2.0 * rng.normal(size=(num_states, DIM))
    factor = rng.normal(size=(num_states, DIM, DIM))
    cov = factor @ np.swapaxes(factor, 1, 2) + 0.5 * np.eye(DIM)
    return dj.Gaussian(mean, cov, min_covar=min_covar)
  if family == "diag_gaussian":
    return dj.DiagGaussian(2.0 * rng.normal(size=(num_states, DIM)),
                           rng.uniform(0.3, 2.0, (num_states, DIM)), min_covar=min_covar)
  raise ValueError(family)


def random_hmm(family: str, rng: np.random.Generator, num_states: int, min_covar=1e-6):
  """A random HMM with numpy float64 leaves (no zero probabilities)."""
  return dj.HMM(rng.dirichlet(np.ones(num_states)),
                rng.dirichlet(np.ones(num_states), num_states),
                random_emission(family, rng, num_states, min_covar))


def random_obs(family: str, rng: np.random.Generator, num_steps: int):
  """Valid observations (numpy) that need not come from the model."""
  if family == "categorical":
    return rng.integers(0, NUM_SYMBOLS, num_steps).astype(np.int32)
  if family == "multinomial":
    probs = rng.dirichlet(np.ones(NUM_FEATURES), num_steps)
    return np.stack([rng.multinomial(NUM_TRIALS, p) for p in probs]).astype(np.float64)
  if family == "poisson":
    return rng.poisson(2.5, num_steps).astype(np.float64)
  return 2.0 * rng.normal(size=(num_steps, DIM))


def garbage_like(family: str, rng: np.random.Generator, num_steps: int):
  """Values for padded slots that would be invalid on a valid step."""
  if family == "categorical":
    return rng.choice(np.array([-3, NUM_SYMBOLS, NUM_SYMBOLS + 7, 2**30]), num_steps).astype(np.int32)
  if family in ("multinomial",):
    out = np.full((num_steps, NUM_FEATURES), np.nan)
    out[::2] = -5.0
    return out
  if family == "poisson":
    out = np.full(num_steps, np.nan)
    out[::2] = -2.5
    return out
  out = np.full((num_steps, DIM), np.nan)
  out[::3] = np.inf
  return out


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
  """(T, K) log b_k(o_t) computed with scipy, independently of the engine."""
  if isinstance(emission, dj.Categorical):
    return np.log(np.asarray(emission.probs))[:, obs].T
  if isinstance(emission, dj.Multinomial):
    # No multinomial coefficient (see Multinomial docstring).
    return obs @ np.log(np.asarray(emission.probs)).T
  if isinstance(emission, dj.Poisson):
    return np.stack([stats.poisson.logpmf(obs, r) for r in np.asarray(emission.rate)], -1)
  if isinstance(emission, dj.Gaussian):
    return np.stack([np.reshape(stats.multivariate_normal.logpdf(obs, m, c), -1)
                     for m, c in zip(np.asarray(emission.mean), np.asarray(emission.cov))], -1)
  if isinstance(emission, dj.DiagGaussian):
    return np.stack([stats.norm.logpdf(obs, m, np.sqrt(v)).sum(-1)
                     for m, v in zip(np.asarray(emission.mean), np.asarray(emission.var))], -1)
  raise TypeError(type(emission))


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
