"""HMM inference against exact oracles.

Oracles: brute-force enumeration of all state paths (every family), hmmlearn
(log-likelihood, smoothed posteriors, Viterbi) and dynamax (filter, smoother,
posterior mode).  Also padding invariance, long-sequence float32 stability,
sampling, the stationary distribution and jit/vmap of every public function.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import gammaln

import dennl_jax as dj
from helpers import (FAMILIES, NUM_TRIALS, PUBLIC_SEQUENCE_FUNCTIONS, BruteForce, pad_sequence,
                     random_hmm, random_obs, reference_log_likelihoods, slow_except,
                     stack_trees, tree_allclose)

pytestmark = pytest.mark.x64

TOL = dict(rtol=1e-7, atol=1e-9)


def _seed(*parts) -> int:
  return abs(hash(parts)) % (2**31)


@jax.jit
def _all_summaries(hmm, obs, mask):
  # One compilation per shape for all four public functions (eager calls
  # would compile each separately); eager calls are covered further down.
  return (dj.log_likelihood(hmm, obs, mask), dj.posterior(hmm, obs, mask),
          dj.filtered_posteriors(hmm, obs, mask), dj.viterbi(hmm, obs, mask))


# ---------------------------------------------------------------------------
# Brute force: every family, tiny models, T = 1 .. 6 (odd and even).
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_states,num_steps", [(2, 1), (3, 1), (2, 6), (3, 5)])
def test_matches_brute_force(family, num_states, num_steps):
  rng = np.random.default_rng([FAMILIES.index(family), num_states, num_steps])
  hmm = random_hmm(family, rng, num_states)
  obs = random_obs(family, rng, num_steps)
  mask = np.ones(num_steps, bool)
  oracle = BruteForce(hmm, obs)
  ll, post, filtered, path = _all_summaries(hmm, obs, mask)

  np.testing.assert_allclose(ll, oracle.log_likelihood(), **TOL)
  np.testing.assert_allclose(post.log_likelihood, oracle.log_likelihood(), **TOL)
  np.testing.assert_allclose(post.smoothed_probs, oracle.smoothed(), **TOL)
  np.testing.assert_allclose(post.transition_counts, oracle.transition_counts(), **TOL)
  np.testing.assert_allclose(post.initial_probs, oracle.smoothed()[0], **TOL)
  np.testing.assert_allclose(filtered, oracle.filtered(), **TOL)
  np.testing.assert_array_equal(path, oracle.viterbi())


def test_public_wrappers_agree_with_posterior():
  rng = np.random.default_rng(1)
  hmm = random_hmm("categorical", rng, 3)
  obs = random_obs("categorical", rng, 5)
  mask = np.ones(5, bool)
  oracle = BruteForce(hmm, obs)
  np.testing.assert_allclose(dj.smoothed_posteriors(hmm, obs, mask), oracle.smoothed(), **TOL)
  np.testing.assert_allclose(dj.expected_transition_counts(hmm, obs, mask),
                             oracle.transition_counts(), **TOL)


def test_brute_force_oracle_can_fail():
  """The comparison is sensitive: a perturbed transition matrix is detected."""
  rng = np.random.default_rng(2)
  hmm = random_hmm("categorical", rng, 3)
  obs = random_obs("categorical", rng, 5)
  other = hmm.replace(transition=0.9 * hmm.transition + 0.1 / 3)
  oracle = BruteForce(other, obs)
  assert abs(float(dj.log_likelihood(hmm, obs, np.ones(5, bool))) - oracle.log_likelihood()) > 1e-4


# ---------------------------------------------------------------------------
# hmmlearn and dynamax on random models.
# ---------------------------------------------------------------------------

def to_hmmlearn(hmm, family):
  """hmmlearn's model of ``hmm``, set up for one plain EM iteration (``model.fit``)."""
  # Priors switched off: hmmlearn's M-step is then the plain ML update.
  priors_off = (dict(means_prior=0.0, means_weight=0.0, covars_prior=0.0, covars_weight=1.0)
                if family in ("gaussian", "diag_gaussian") else {})
  return dj.interop.to_hmmlearn(hmm, n_trials=NUM_TRIALS if family == "multinomial" else None,
                                n_iter=1, tol=0.0, implementation="log", **priors_off)


def hmmlearn_obs(family, obs):
  if family == "categorical":
    return obs[:, None].astype(np.int64)
  if family == "multinomial":
    return obs.astype(np.int64)
  if family == "poisson":
    return obs[:, None].astype(np.int64)
  return obs


def multinomial_log_coefficient(obs):
  """Our Multinomial likelihood omits log(n! / prod x!); hmmlearn includes it."""
  return float(np.sum(gammaln(obs.sum(-1) + 1.0) - gammaln(obs + 1.0).sum(-1)))


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_hmmlearn(family):
  rng = np.random.default_rng([10, FAMILIES.index(family)])
  hmm = random_hmm(family, rng, 3)
  obs = random_obs(family, rng, 40)
  mask = np.ones(40, bool)
  model = to_hmmlearn(hmm, family)
  x = hmmlearn_obs(family, obs)
  offset = multinomial_log_coefficient(obs) if family == "multinomial" else 0.0

  ref_ll, ref_post = model.score_samples(x)
  post = dj.posterior(hmm, obs, mask)
  np.testing.assert_allclose(float(post.log_likelihood) + offset, ref_ll, rtol=1e-10)
  np.testing.assert_allclose(post.smoothed_probs, ref_post, atol=1e-8)
  _, ref_path = model.decode(x, algorithm="viterbi")
  np.testing.assert_array_equal(dj.viterbi(hmm, obs, mask), ref_path)


@pytest.mark.parametrize("family", ["categorical", "gaussian"])
def test_matches_dynamax(family):
  from dynamax.hidden_markov_model import hmm_filter, hmm_posterior_mode, hmm_smoother
  rng = np.random.default_rng([11, FAMILIES.index(family)])
  hmm = random_hmm(family, rng, 4)
  obs = random_obs(family, rng, 30)
  mask = np.ones(30, bool)
  log_b = jnp.asarray(reference_log_likelihoods(hmm.emission, obs))
  initial, transition = jnp.asarray(hmm.initial), jnp.asarray(hmm.transition)

  ref_filter = hmm_filter(initial, transition, log_b)
  ref_smooth = hmm_smoother(initial, transition, log_b)
  post = dj.posterior(hmm, obs, mask)
  np.testing.assert_allclose(post.log_likelihood, ref_filter.marginal_loglik, rtol=1e-10)
  np.testing.assert_allclose(dj.filtered_posteriors(hmm, obs, mask), ref_filter.filtered_probs,
                             atol=1e-9)
  np.testing.assert_allclose(post.smoothed_probs, ref_smooth.smoothed_probs, atol=1e-9)
  ref_counts = np.asarray(ref_smooth.trans_probs)
  if ref_counts.ndim == 3:
    ref_counts = ref_counts.sum(0)
  np.testing.assert_allclose(post.transition_counts, ref_counts, atol=1e-8)
  np.testing.assert_array_equal(dj.viterbi(hmm, obs, mask),
                                hmm_posterior_mode(initial, transition, log_b))


# ---------------------------------------------------------------------------
# Padding: T valid steps scattered into 3T slots with garbage in the gaps.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", slow_except(FAMILIES, "categorical", "gaussian"))
@pytest.mark.parametrize("num_steps", [1, 5])
def test_padding_equals_compressed(family, num_steps):
  rng = np.random.default_rng([20, FAMILIES.index(family), num_steps])
  hmm = random_hmm(family, rng, 3)
  obs = random_obs(family, rng, num_steps)
  padded, mask, valid = pad_sequence(obs, rng, 3 * num_steps + 2, family)
  full = np.ones(num_steps, bool)

  np.testing.assert_allclose(dj.log_likelihood(hmm, padded, mask),
                             dj.log_likelihood(hmm, obs, full), **TOL)
  post_pad = dj.posterior(hmm, padded, mask)
  post = dj.posterior(hmm, obs, full)
  np.testing.assert_allclose(post_pad.smoothed_probs[valid], post.smoothed_probs, **TOL)
  np.testing.assert_allclose(post_pad.filtered_probs[valid], post.filtered_probs, **TOL)
  np.testing.assert_allclose(post_pad.transition_counts, post.transition_counts, **TOL)
  np.testing.assert_allclose(post_pad.initial_probs, post.initial_probs, **TOL)
  path_pad = np.asarray(dj.viterbi(hmm, padded, mask))
  np.testing.assert_array_equal(path_pad[valid], dj.viterbi(hmm, obs, full))
  # Masked steps report the carried state: its posterior and its decoded value.
  carried = np.maximum(np.cumsum(mask) - 1, 0)
  np.testing.assert_allclose(post_pad.smoothed_probs, post.smoothed_probs[carried], **TOL)
  np.testing.assert_array_equal(path_pad, np.asarray(dj.viterbi(hmm, obs, full))[carried])
  assert np.all(np.isfinite(np.asarray(post_pad.smoothed_probs)))


@pytest.mark.parametrize("family", slow_except(FAMILIES, "gaussian"))
def test_gradients_with_padding(family):
  rng = np.random.default_rng([21, FAMILIES.index(family)])
  hmm = jax.tree_util.tree_map(jnp.asarray, random_hmm(family, rng, 3))
  obs = random_obs(family, rng, 4)
  padded, mask, _ = pad_sequence(obs, rng, 12, family)
  grad = jax.grad(dj.log_likelihood)
  g_pad = grad(hmm, jnp.asarray(padded), jnp.asarray(mask))
  g = grad(hmm, jnp.asarray(obs), jnp.ones(4, bool))
  for leaf in jax.tree_util.tree_leaves(g_pad):
    assert np.all(np.isfinite(np.asarray(leaf)))
  tree_allclose(g_pad, g, rtol=1e-7, atol=1e-9)


def test_gradient_matches_finite_differences():
  rng = np.random.default_rng(22)
  hmm = jax.tree_util.tree_map(jnp.asarray, random_hmm("diag_gaussian", rng, 3))
  obs = jnp.asarray(random_obs("diag_gaussian", rng, 6))
  mask = jnp.ones(6, bool)
  grad = jax.grad(dj.log_likelihood)(hmm, obs, mask)
  direction = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape)), hmm)
  eps = 1e-6
  plus = jax.tree_util.tree_map(lambda x, d: x + eps * d, hmm, direction)
  minus = jax.tree_util.tree_map(lambda x, d: x - eps * d, hmm, direction)
  numeric = (dj.log_likelihood(plus, obs, mask) - dj.log_likelihood(minus, obs, mask)) / (2 * eps)
  analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree_util.tree_leaves(grad),
                                                jax.tree_util.tree_leaves(direction)))
  np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


# ---------------------------------------------------------------------------
# Long sequences in float32.
# ---------------------------------------------------------------------------

def test_long_sequence_float32_is_stable():
  num_steps = 100_000
  rng = np.random.default_rng(30)
  hmm64 = jax.tree_util.tree_map(jnp.asarray, random_hmm("categorical", rng, 3))
  hmm32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), hmm64)
  states, obs = dj.sample(jax.random.PRNGKey(0), hmm64, num_steps)
  mask = jnp.asarray(rng.random(num_steps) < 0.9)

  @jax.jit
  def summary(hmm, obs, mask):
    post = hmm.posterior(obs, mask)
    return post.log_likelihood, jnp.sum(post.smoothed_probs, -1), post.transition_counts

  ll64, _, counts64 = summary(hmm64, obs, mask)
  ll32, sums32, counts32 = summary(hmm32, obs, mask)
  assert ll32.dtype == jnp.float32
  assert np.isfinite(float(ll32))
  np.testing.assert_allclose(float(ll32), float(ll64), rtol=1e-4)
  np.testing.assert_allclose(sums32, 1.0, atol=1e-4)
  np.testing.assert_allclose(counts32.sum(), int(mask.sum()) - 1, rtol=1e-3)
  np.testing.assert_allclose(counts32, counts64, rtol=1e-2, atol=1.0)


# ---------------------------------------------------------------------------
# Sampling and the stationary distribution.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_sample_shapes_and_determinism(family):
  rng = np.random.default_rng([40, FAMILIES.index(family)])
  hmm = random_hmm(family, rng, 3)
  key = jax.random.PRNGKey(7)
  states, obs = dj.sample(key, hmm, 9)
  states2, obs2 = dj.sample(key, hmm, 9)
  _, obs3 = dj.sample(jax.random.PRNGKey(8), hmm, 9)
  assert states.shape == (9,) and states.dtype == jnp.int32
  assert obs.shape == hmm.emission.observation_shape(9)
  if family == "categorical":
    assert jnp.issubdtype(obs.dtype, jnp.integer)
  else:
    assert jnp.issubdtype(obs.dtype, jnp.floating)
  np.testing.assert_array_equal(states, states2)
  np.testing.assert_array_equal(obs, obs2)
  assert not np.array_equal(np.asarray(obs), np.asarray(obs3))
  # Samples are valid observations of the model.
  dj.validate(hmm, obs, np.ones(9, bool))


def test_sample_state_frequencies_match_stationary_distribution():
  rng = np.random.default_rng(41)
  hmm = random_hmm("poisson", rng, 3)
  states, _ = jax.jit(dj.sample, static_argnums=2)(jax.random.PRNGKey(0), hmm, 50_000)
  freq = np.bincount(np.asarray(states), minlength=3) / states.shape[0]
  np.testing.assert_allclose(freq, dj.stationary_distribution(hmm.transition), atol=0.02)


def test_stationary_distribution_matches_eigenvector():
  rng = np.random.default_rng(42)
  transition = rng.dirichlet(np.ones(5), 5)
  values, vectors = np.linalg.eig(transition.T)
  ref = np.real(vectors[:, np.argmin(np.abs(values - 1.0))])
  ref = ref / ref.sum()
  pi = dj.stationary_distribution(transition)
  np.testing.assert_allclose(pi, ref, atol=1e-12)
  np.testing.assert_allclose(pi @ transition, pi, atol=1e-12)


@pytest.mark.parametrize("transition", [
    np.eye(2),
    np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.5, 0.5]]),
    np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
])
def test_stationary_distribution_of_a_reducible_chain_is_one_of_its_solutions(transition):
  pi = np.asarray(dj.stationary_distribution(transition))
  assert np.all(np.isfinite(pi)) and np.all(pi >= -1e-12)
  np.testing.assert_allclose(pi.sum(), 1.0, atol=1e-12)
  np.testing.assert_allclose(pi @ transition, pi, atol=1e-12)


# ---------------------------------------------------------------------------
# jit + vmap over users for every public function.
# ---------------------------------------------------------------------------

PER_SEQUENCE = PUBLIC_SEQUENCE_FUNCTIONS


@pytest.mark.parametrize("family", slow_except(FAMILIES, "gaussian"))
def test_jit_vmap_over_users(family):
  rng = np.random.default_rng([50, FAMILIES.index(family)])
  num_users, num_steps = 3, 7
  models = [random_hmm(family, rng, 2) for _ in range(num_users)]
  obs = [random_obs(family, rng, num_steps) for _ in range(num_users)]
  masks = np.ones((num_users, num_steps), bool)
  masks[1, 4:] = False
  masks[2, :2] = False
  batch = stack_trees(models)
  # Every function for one family; the others share
  # the same code paths except for the emission, covered by posterior/em_step.
  names = PER_SEQUENCE if family == "categorical" else ["posterior", "em_step"]
  for name in names:
    fn = PER_SEQUENCE[name]
    batched = jax.jit(jax.vmap(fn))(batch, np.stack(obs), masks)
    one = jax.jit(fn)  # compiled once, reused for every user
    looped = stack_trees([one(m, o, k) for m, o, k in zip(models, obs, masks)])
    tree_allclose(batched, looped, rtol=1e-9, atol=1e-12)

  keys = jax.random.split(jax.random.PRNGKey(0), num_users)
  draw = lambda k, p: dj.sample(k, p, num_steps)
  states, sampled = jax.jit(jax.vmap(draw))(keys, batch)
  draw_one = jax.jit(draw)
  for u in range(num_users):
    s, o = draw_one(keys[u], models[u])
    np.testing.assert_array_equal(states[u], s)
    np.testing.assert_allclose(sampled[u], o, rtol=1e-12)


def test_jit_vmap_stationary_distribution():
  rng = np.random.default_rng(51)
  transitions = rng.dirichlet(np.ones(3), (4, 3))
  batched = jax.jit(jax.vmap(dj.stationary_distribution))(transitions)
  for u in range(4):
    np.testing.assert_allclose(batched[u], dj.stationary_distribution(transitions[u]), atol=1e-12)
