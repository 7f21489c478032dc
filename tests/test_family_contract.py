"""The family contract, and proof that it is open.

Part 1 defines a family the library does not know -- ``Bernoulli``, binary
feature vectors, with a constraint kind of its own (``UnitInterval``) --
in this file only, and runs it through every layer of the library: brute-force
likelihoods and posteriors, ``em_step``, ``fit_em``, ``em_layer`` in all three
gradient modes, and a DENNL forward and backward pass.  No library file names
it.  README, "Adding an emission or duration family", walks through it.

Part 2 is the contract every registered family must meet (the library's own,
registered in helpers.py, and the Bernoulli one): both bijections round
trip and map any real input to valid parameters, the M-step of exact
statistics recovers the parameters, states without mass keep theirs, and
samples pass the family's own observation checks.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, struct
from scipy import stats

import dennl_jax as dj
from helpers import (DURATIONS, EMISSIONS, BruteForce, EmissionSpec, pad_sequence,
                     register_emission, stack_trees, tree_allclose)
from dennl_jax.codec import ParamCodec
from dennl_jax.families import keep_where_empty, safe_div
from dennl_jax.networks import DENNL

pytestmark = pytest.mark.x64

# ----------------------------------------------------------------------------
# Part 1: a family defined here only.


@dataclasses.dataclass(frozen=True)
class UnitInterval(dj.Constraint):
  """Entries strictly inside (0, 1): logit / sigmoid for both bijections."""

  def to_unconstrained(self, x, family):
    return jnp.log(x) - jnp.log1p(-x)

  def from_unconstrained(self, z, family):
    return jax.nn.sigmoid(z)

  def to_preactivation(self, x, family):
    return self.to_unconstrained(jnp.clip(x, 1e-6, 1.0 - 1e-6), family)

  def from_preactivation(self, z, family):
    return jax.nn.sigmoid(z)

  def check(self, name, x, family):
    x = np.asarray(x)
    if not np.all(np.isfinite(x)) or np.any((x <= 0) | (x >= 1)):
      raise ValueError(f"{name} must lie strictly between 0 and 1")


@struct.dataclass
class Bernoulli(dj.EmissionFamily):
  """Binary feature vectors ``obs: (T, F)`` in {0, 1}; probs: (K, F) in (0, 1)."""
  probs: jax.Array = dj.param(UnitInterval())

  def observation_shape(self, num_steps):
    return (num_steps, self.probs.shape[1])

  def log_likelihoods(self, obs):
    return obs @ jnp.log(self.probs).T + (1.0 - obs) @ jnp.log1p(-self.probs).T

  def expected_statistics(self, obs, weights):
    return {"mass": weights.sum(0), "ones": weights.T @ obs}

  def m_step(self, stats):
    # A feature never (or always) seen would give probability 0 (1), whose
    # logit is infinite; the clip keeps EM and its gradients finite.
    new = jnp.clip(safe_div(stats["ones"], stats["mass"]), 1e-6, 1.0 - 1e-6)
    return Bernoulli(keep_where_empty(stats["mass"], new, self.probs))

  def sample(self, key, state):
    return jax.random.bernoulli(key, self.probs[state]).astype(self.probs.dtype)

  def observation_mean(self):
    return self.probs

  def check_observations(self, obs, mask):
    obs = np.asarray(obs)
    if obs.ndim != 2 or obs.shape[1] != self.probs.shape[1]:
      raise ValueError(f"Bernoulli obs must have shape (T, {self.probs.shape[1]}), got {obs.shape}")
    valid = obs[np.asarray(mask)]
    if np.any((valid != 0) & (valid != 1)):
      raise ValueError("Bernoulli obs must be 0 or 1 on valid steps")


NUM_BITS = 3


def _all_binary_vectors():
  return np.array(np.meshgrid(*[[0.0, 1.0]] * NUM_BITS, indexing="ij")).reshape(NUM_BITS, -1).T


def _bernoulli_support(family):
  # Every binary vector, weighted by its probability under each state.
  obs = _all_binary_vectors()
  probs = np.asarray(family.probs)
  weights = np.prod(np.where(obs[:, None, :] == 1, probs[None], 1 - probs[None]), axis=-1)
  return obs, weights


BERNOULLI = register_emission(EmissionSpec(
    "bernoulli", Bernoulli,
    make=lambda rng, k, min_covar: Bernoulli(rng.uniform(0.1, 0.9, (k, NUM_BITS))),
    observations=lambda rng, t: rng.integers(0, 2, (t, NUM_BITS)).astype(np.float64),
    garbage=lambda rng, t: np.full((t, NUM_BITS), 7.0),
    reference_log_likelihoods=lambda e, obs: np.stack(
        [stats.bernoulli.logpmf(obs, p).sum(-1) for p in np.asarray(e.probs)], -1),
    exact_support=_bernoulli_support))


def _bernoulli_hmm(rng, num_states=2):
  return dj.HMM(rng.dirichlet(np.ones(num_states)), rng.dirichlet(np.ones(num_states), num_states),
                BERNOULLI.make(rng, num_states, 0.0))


@jax.jit
def _summaries(hmm, obs, mask):
  return dj.log_likelihood(hmm, obs, mask), dj.posterior(hmm, obs, mask), dj.viterbi(hmm, obs, mask)


@pytest.mark.parametrize("num_steps", [1, 5])
def test_bernoulli_matches_brute_force_with_padding(num_steps):
  rng = np.random.default_rng([90, num_steps])
  hmm = _bernoulli_hmm(rng, 3)
  obs = BERNOULLI.observations(rng, num_steps)
  oracle = BruteForce(hmm, obs)
  padded, mask, valid = pad_sequence(obs, rng, num_steps + 4, "bernoulli")
  dj.validate(hmm, padded, mask)
  ll, post, path = _summaries(hmm, padded, mask)
  np.testing.assert_allclose(ll, oracle.log_likelihood(), rtol=1e-10)
  np.testing.assert_allclose(post.smoothed_probs[valid], oracle.smoothed(), atol=1e-10)
  np.testing.assert_allclose(post.transition_counts, oracle.transition_counts(), atol=1e-10)
  np.testing.assert_array_equal(np.asarray(path)[valid], oracle.viterbi())
  with pytest.raises(ValueError, match="0 or 1"):
    dj.validate(hmm, np.where(mask[:, None], 7.0, padded), mask)


def test_bernoulli_em_step_and_fit_em():
  rng = np.random.default_rng(91)
  truth = _bernoulli_hmm(rng)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  _, obs = jax.vmap(lambda k: dj.sample(k, truth, 12))(keys)
  obs = np.asarray(obs)
  mask = np.ones((3, 12), bool)
  mask[1, 9:] = False
  # em_step: the M-step of brute-force posterior counts (2^12 paths).
  new = dj.em_step(truth, obs[0], mask[0])
  oracle = BruteForce(truth, obs[0])
  np.testing.assert_allclose(new.initial, oracle.smoothed()[0], atol=1e-10)
  counts = oracle.transition_counts()
  np.testing.assert_allclose(new.transition, counts / counts.sum(-1, keepdims=True), atol=1e-10)
  weights = oracle.smoothed()
  np.testing.assert_allclose(new.emission.probs, weights.T @ obs[0] / weights.sum(0)[:, None],
                             atol=1e-10)
  # fit_em: monotone from per-user random starts.
  starts = stack_trees([_bernoulli_hmm(rng) for _ in range(3)])
  _, trace = dj.fit_em(starts, obs, mask, 5)
  trace = np.asarray(trace)
  assert np.all(np.diff(trace, axis=1) >= -1e-9 * np.abs(trace[:, 1:]))
  assert np.all(trace[:, -1] > trace[:, 0])


@pytest.mark.slow
def test_bernoulli_em_layer_in_every_gradient_mode():
  rng = np.random.default_rng(92)
  hmm = jax.tree_util.tree_map(jnp.asarray, _bernoulli_hmm(rng))
  obs = jnp.asarray(BERNOULLI.observations(rng, 12))
  mask = jnp.ones(12, bool).at[4].set(False)
  expected = dj.em_step(hmm, obs, mask)

  @jax.jit
  def value_and_grads(hmm, key):
    out = {}
    for mode in dj.GRADIENT_MODES:
      loss = lambda p: dj.em_layer(p, obs, mask, key, gradient=mode,
                                   num_samples=4).log_likelihood(obs, mask)
      out[mode] = (dj.em_layer(hmm, obs, mask, key, gradient=mode), jax.grad(loss)(hmm))
    return out

  results = value_and_grads(hmm, jax.random.PRNGKey(1))
  for mode, (value, grad) in results.items():
    tree_allclose(value, expected, atol=1e-10)
    leaves = jax.tree_util.tree_leaves(grad)
    assert all(np.all(np.isfinite(g)) for g in leaves), mode
    assert any(np.any(np.asarray(g) != 0) for g in leaves), mode


@pytest.mark.slow
def test_bernoulli_dennl_forward_and_backward():
  rng = np.random.default_rng(93)
  start = jax.tree_util.tree_map(jnp.asarray, _bernoulli_hmm(rng))
  _, obs = jax.vmap(lambda k: dj.sample(k, start, 6))(jax.random.split(jax.random.PRNGKey(0), 2))
  data = dj.Batch(jnp.asarray(rng.normal(size=(2, 4))), obs, jnp.ones((2, 6), bool))
  model = DENNL(ParamCodec(start), start, 4, num_stages=1, hidden=(8,), start_hidden=(8,),
                latent_dim=2, layer=dj.EMLayer(gradient="exact"), rngs=nnx.Rngs(0))

  @nnx.jit
  def run(model):
    loss, grads = nnx.value_and_grad(
        lambda m: dj.likelihood_loss(m, data, jax.random.PRNGKey(1)))(model)
    return loss, grads, model(data.embedding, data.obs, data.mask, jax.random.PRNGKey(1))

  loss, grads, params = run(model)
  assert np.isfinite(float(loss))
  leaves = jax.tree_util.tree_leaves(nnx.state(grads))
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert any(np.any(np.asarray(g) != 0) for g in leaves)
  assert isinstance(params.emission, Bernoulli)
  jax.tree_util.tree_map(lambda x: x[0], params).check_parameters()


# ----------------------------------------------------------------------------
# Part 2: the contract, over every registered family.

SPECS = list(EMISSIONS.values())


def _family(spec, seed, min_covar=1e-6):
  rng = np.random.default_rng([95, seed])
  return jax.tree_util.tree_map(jnp.asarray, spec.make(rng, 3, min_covar)), rng


def _random_like(tree, rng, scale=3.0):
  return jax.tree_util.tree_map(lambda x: jnp.asarray(scale * rng.normal(size=x.shape)), tree)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_bijections_round_trip_and_cover_the_domain(spec):
  family, rng = _family(spec, 0, min_covar=1e-3)
  for encode, decode in (("to_unconstrained", "from_unconstrained"),
                         ("to_preactivation", "from_preactivation")):
    coded = getattr(family, encode)()
    assert type(coded) is type(family)
    tree_allclose(getattr(type(family), decode)(coded), family, rtol=1e-8, atol=1e-10)
    # Any real input decodes to valid parameters.
    getattr(type(family), decode)(_random_like(coded, rng)).check_parameters()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_m_step_of_exact_statistics_recovers_parameters(spec):
  family, _ = _family(spec, 1, min_covar=0.0)
  other, _ = _family(spec, 2, min_covar=0.0)
  obs, weights = spec.exact_support(family)
  stats = other.expected_statistics(jnp.asarray(obs), jnp.asarray(weights))
  tree_allclose(other.m_step(stats), family, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_states_without_mass_keep_parameters(spec):
  family, rng = _family(spec, 3)
  obs = jnp.asarray(spec.observations(rng, 5))
  weights = jnp.zeros((5, 3)).at[:, 0].set(1.0)
  updated = family.m_step(family.expected_statistics(obs, weights))
  for new, old in zip(jax.tree_util.tree_leaves(updated), jax.tree_util.tree_leaves(family)):
    assert np.all(np.isfinite(np.asarray(new)))
    np.testing.assert_array_equal(new[1:], old[1:])


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_samples_validate(spec):
  family, _ = _family(spec, 4)
  family.check_parameters()
  states = jnp.array([0, 1, 2, 1, 0, 2])
  obs = jax.vmap(family.sample)(jax.random.split(jax.random.PRNGKey(0), 6), states)
  assert obs.shape == family.observation_shape(6)
  assert jnp.issubdtype(obs.dtype, jnp.integer) == jnp.issubdtype(family.observation_dtype,
                                                                   jnp.integer)
  family.check_observations(np.asarray(obs), np.ones(6, bool))
  assert family.observation_mean().shape[0] == family.num_states == 3


@pytest.mark.parametrize("name", list(DURATIONS))
def test_duration_contract(name):
  rng = np.random.default_rng([96, len(name)])
  family = jax.tree_util.tree_map(jnp.asarray, DURATIONS[name].make(rng, 3, 6))
  other = jax.tree_util.tree_map(jnp.asarray, DURATIONS[name].make(rng, 3, 6))
  family.check_parameters()
  assert family.log_probs().shape == (family.num_states, family.max_duration) == (3, 6)
  for encode, decode in (("to_unconstrained", "from_unconstrained"),
                         ("to_preactivation", "from_preactivation")):
    coded = getattr(family, encode)()
    tree_allclose(getattr(type(family), decode)(coded), family, rtol=1e-8, atol=1e-10)
    getattr(type(family), decode)(_random_like(coded, rng)).check_parameters()
  # Exact expected counts: 40 segments per state, spread as the distribution.
  counts = 40.0 * jnp.exp(family.log_probs())
  tree_allclose(other.m_step(counts), family, rtol=1e-8, atol=1e-10)
  empty = other.m_step(counts.at[1:].set(0.0))
  for new, old in zip(jax.tree_util.tree_leaves(empty), jax.tree_util.tree_leaves(other)):
    np.testing.assert_array_equal(new[1:], old[1:])


def test_floored_positive_parameters_stay_valid_in_float32():
  """A rate EM floors at the smallest normal number (a state whose segments all last
  one step) survives the unconstrained round trip of the EM layer: exp(log(tiny))
  rounds to a subnormal, which XLA:CPU flushes to 0, an invalid rate."""
  tiny = np.finfo(np.float32).tiny
  duration = dj.PoissonDuration(jnp.array([tiny, 2.0], jnp.float32), 4)
  back = jax.jit(lambda d: type(d).from_unconstrained(d.to_unconstrained()))(duration)
  assert np.all(np.asarray(back.rate) > 0)
  back.check_parameters()
  fitted = jax.jit(duration.m_step)(jnp.array([[3.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]]))
  assert np.all(np.asarray(fitted.rate) > 0) and float(fitted.rate[0]) <= 1e-30
