"""Scaled recursions where the best-fitting state is unreachable, and impossible sequences.

Each step is scaled by the best log-likelihood among the states with positive
predicted mass (``dennl_jax._numerics.step_scaling``), so a state that fits
far better but cannot be reached no longer makes every ``pred * b`` underflow
(0/0 = NaN before).  A step that no reachable state can emit gives a
log-likelihood of -inf and finite posteriors: those of the sequence with that
step's observation dropped.  References: a float64 log-domain forward-backward
written here (logsumexp), and hmmlearn's value for the issue's reproduction.

The Hypothesis properties at the end run the public API (log_likelihood,
posterior, viterbi, em_step; HMM and HSMM; float32 and float64; batched,
padded) and the raw recursions on random models against float64 log-domain
references written here: forward-backward, max-product Viterbi, two-slice
counts, and for HSMMs the expansion over (state, remaining duration) and an
explicit-duration recursion over segments.
"""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from hypothesis import given, strategies as st

import dennl_jax as dj
from dennl_jax import oracles, time_parallel
from dennl_jax._numerics import MIN_STATE_MASS

KERNELS = ("per_sequence", "users_minor")


# --------------------------------------------------------------------------
# A float64 log-domain reference
# --------------------------------------------------------------------------


def _log(x):
  with np.errstate(divide="ignore"):
    return np.log(np.asarray(x, np.float64))


def _log_passes(initial, transition, log_likes, mask=None):
  """The log-domain forward-backward over the valid steps (float64).

  Returns ``(ll, valid, evidence, impossible, alphas, betas)``: ``valid`` the
  valid step indices, ``evidence`` the log-likelihoods with impossible steps'
  rows set to 0, ``alphas`` / ``betas`` the normalised log filtered
  distributions and the log backward messages at each valid step.
  """
  log_likes = np.asarray(log_likes, np.float64)
  num_steps, _ = log_likes.shape
  mask = np.ones(num_steps, bool) if mask is None else np.asarray(mask, bool)
  valid = np.flatnonzero(mask)
  log_a, log_init = _log(transition), _log(initial)
  ll, impossible = 0.0, np.zeros(num_steps, bool)
  evidence = log_likes.copy()
  alphas = []
  for n, t in enumerate(valid):
    pred = log_init if n == 0 else logsumexp(alphas[-1][:, None] + log_a, axis=0)
    joint = pred + evidence[t]
    norm = logsumexp(joint) if np.any(joint > -np.inf) else -np.inf
    if norm == -np.inf:
      impossible[t] = True
      evidence[t] = 0.0
      ll, alpha = -np.inf, pred - logsumexp(pred)
    else:
      ll, alpha = ll + norm, joint - norm
    alphas.append(alpha)
  betas = [np.zeros_like(alphas[-1])]
  for n in range(len(valid) - 1, 0, -1):
    t = valid[n]
    betas.append(logsumexp(log_a + (evidence[t] + betas[-1])[None], axis=1))
  return ll, valid, evidence, impossible, alphas, betas[::-1]


def reference(initial, transition, log_likes, mask=None):
  """(log-likelihood, smoothed (T, K), impossible steps (T,)) in float64, log domain.

  Masked steps are removed (the state does not move across them; they report
  the carried state's posterior, as the engine does).  An impossible step (no
  state with positive predicted probability can emit it) makes the
  log-likelihood -inf and is then treated as carrying no evidence -- the
  engine's documented convention -- so the smoothed marginals stay defined.
  The fourth value is the smallest finite log filtered probability (how far
  below a float's range the linear-domain filter must reach).
  """
  ll, valid, _, impossible, alphas, betas = _log_passes(initial, transition, log_likes, mask)
  num_steps = np.shape(log_likes)[0]
  mask = np.zeros(num_steps, bool)
  mask[valid] = True
  smoothed = np.zeros(np.shape(log_likes))
  for n, t in enumerate(valid):
    joint = alphas[n] + betas[n]
    smoothed[t] = np.exp(joint - logsumexp(joint))
  # Masked steps carry the state: the next valid step's posterior before the
  # first valid step, the previous valid step's after.
  for t in range(num_steps):
    if not mask[t]:
      before = valid[valid < t]
      smoothed[t] = smoothed[before[-1] if len(before) else valid[0]]
  underflow = min((a[np.isfinite(a)].min() for a in alphas), default=0.0)
  return ll, smoothed, impossible, underflow


def reference_two_slice(initial, transition, log_likes, mask=None):
  """(K, K) expected transition counts sum_t p(z_{t-1}=i, z_t=j | o) over
  consecutive valid steps, in float64 (impossible steps carry no evidence)."""
  _, valid, evidence, _, alphas, betas = _log_passes(initial, transition, log_likes, mask)
  log_a = _log(transition)
  counts = np.zeros(log_a.shape)
  for n in range(1, len(valid)):
    log_xi = alphas[n - 1][:, None] + log_a + (evidence[valid[n]] + betas[n])[None]
    counts += np.exp(log_xi - logsumexp(log_xi))
  return counts


def reference_viterbi(initial, transition, log_likes):
  """max over state paths of the HMM's joint log-probability (float64, log
  domain; every step valid)."""
  log_a = _log(transition)
  delta = _log(initial) + log_likes[0]
  for ll_t in log_likes[1:]:
    delta = np.max(delta[:, None] + log_a, axis=0) + ll_t
  return np.max(delta)


def hmm_path_score(initial, transition, log_likes, path):
  """The HMM's joint log-probability of ``path`` and the observations (float64)."""
  path = np.asarray(path)
  steps = np.arange(len(path))
  return (_log(initial)[path[0]] + log_likes[steps, path].sum()
          + _log(transition)[path[:-1], path[1:]].sum())


# --------------------------------------------------------------------------
# The issue's reproductions
# --------------------------------------------------------------------------


def issue_hmm(dtype, mean, kernels):
  return dj.HMM(np.array([1., 0.], dtype), np.array([[.9, .1], [0., 1.]], dtype),
                dj.DiagGaussian(np.array([[0.], [mean]], dtype), np.ones((2, 1), dtype)),
                kernels=kernels)


def both_paths(fn, model, obs, mask):
  """fn(model, obs, mask) per sequence, and under vmap (model.kernels decides what runs)."""
  model = jax.tree_util.tree_map(jnp.asarray, model)
  one = fn(model, obs, mask)
  batched = jax.vmap(fn, in_axes=(None, 0, 0))(model, obs[None], mask[None])
  return one, jax.tree_util.tree_map(lambda x: x[0], batched)


def expected_reproduction(dtype, mean):
  log_likes = np.stack([-0.5 * (mean - np.array([0., mean])) ** 2] * 3) - 0.5 * np.log(2 * np.pi)
  return reference([1., 0.], [[.9, .1], [0., 1.]], log_likes)


@pytest.mark.parametrize("kernels", KERNELS)
def test_issue_reproduction_float32(kernels):
  f = np.float32
  model = issue_hmm(f, 14.0, kernels)
  obs, mask = np.full((3, 1), 14., f), np.ones(3, bool)
  for ll in both_paths(dj.log_likelihood, model, obs, mask):
    np.testing.assert_allclose(ll, -103.0594, rtol=1e-6)   # hmmlearn: -103.0594
  ref_ll, ref_smoothed, _, _ = expected_reproduction(np.float64, 14.0)
  np.testing.assert_allclose(ref_ll, -103.0594, rtol=1e-6)
  for post in both_paths(dj.posterior, model, obs, mask):
    np.testing.assert_allclose(post.smoothed_probs, ref_smoothed, atol=1e-6)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(post))
  for new in both_paths(dj.em_step, model, obs, mask):
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(new))
  parallel = time_parallel.posterior(model, obs, mask)
  np.testing.assert_allclose(parallel.log_likelihood, -103.0594, rtol=1e-6)
  np.testing.assert_allclose(parallel.smoothed_probs, ref_smoothed, atol=1e-6)


@pytest.mark.x64
@pytest.mark.parametrize("kernels", KERNELS)
def test_issue_reproduction_float64(kernels):
  # A gap of 800 nats: beyond float64's ~745.
  model = issue_hmm(np.float64, 40.0, kernels)
  obs, mask = np.full((3, 1), 40.), np.ones(3, bool)
  ref_ll, ref_smoothed, _, _ = expected_reproduction(np.float64, 40.0)
  assert np.isfinite(ref_ll)
  for post in both_paths(dj.posterior, model, obs, mask) + (
      time_parallel.posterior(model, obs, mask),):
    np.testing.assert_allclose(post.log_likelihood, ref_ll, rtol=1e-12)
    np.testing.assert_allclose(post.smoothed_probs, ref_smoothed, atol=1e-12)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(post))


def issue_hsmm(dtype, kernels):
  """2 states, one ~141 nats better per step: every segment of it must end within D."""
  return dj.HSMM(np.array([.5, .5], dtype), np.array([[0., 1.], [1., 0.]], dtype),
                 dj.PoissonDuration(np.array([5., 5.], dtype), 12),
                 dj.DiagGaussian(np.array([[0.], [np.sqrt(282.)]], dtype),
                                 np.ones((2, 1), dtype)), kernels=kernels)


@pytest.mark.x64
@pytest.mark.parametrize("kernels", KERNELS)
def test_hsmm_reproduction(kernels):
  num_steps = 200
  mask = np.ones(num_steps, bool)
  model64 = issue_hsmm(np.float64, kernels)
  obs = np.full((num_steps, 1), np.sqrt(282.))
  dense = oracles.expand_to_hmm(model64)
  log_likes = np.asarray(dense.emission.log_likelihoods(jnp.asarray(obs)))
  ref_ll, _, _, _ = reference(dense.initial, dense.transition, log_likes)
  for post in both_paths(dj.posterior, model64, obs, mask):
    np.testing.assert_allclose(post.log_likelihood, ref_ll, rtol=1e-12)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(post))
  # float32 (NaN before): finite everywhere.  Paths whose relative mass is
  # e^-141 per step underflow in float32's linear domain, so the value is a
  # lower bound (here ~13 nats below), never NaN.
  f = np.float32
  model32 = issue_hsmm(f, kernels)
  for post in both_paths(dj.posterior, model32, obs.astype(f), mask):
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(post))
    assert ref_ll - 20 < post.log_likelihood <= ref_ll + 1e-3 * abs(ref_ll)
  for new in both_paths(dj.em_step, model32, obs.astype(f), mask):
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(new))


# --------------------------------------------------------------------------
# Impossible sequences
# --------------------------------------------------------------------------

# Categorical emissions: state 0 emits symbols {0, 1}, state 1 emits {1, 2}.
PROBS = np.array([[.5, .5, 0.], [0., .5, .5]])
# (initial, transition, observations): the impossible step is marked by the case name.
IMPOSSIBLE = {
    # State 0 never leaves, so symbol 2 is impossible at step 2 (middle) / 3 (last).
    "transition_middle": ([1., 0.], [[1., 0.], [.5, .5]], [0, 1, 2, 1]),
    "transition_last": ([1., 0.], [[1., 0.], [.5, .5]], [0, 1, 1, 2]),
    # Symbol 3 has probability 0 in every state.
    "emission_middle": ([.5, .5], [[.5, .5], [.5, .5]], [0, 3, 1, 2]),
    "emission_last": ([.5, .5], [[.5, .5], [.5, .5]], [0, 1, 2, 3]),
    # Only state 1 emits symbol 2, and the chain starts in state 0.
    "initial": ([1., 0.], [[.5, .5], [.5, .5]], [2, 1, 0, 1]),
}


def impossible_hmm(case, dtype, kernels):
  initial, transition, obs = IMPOSSIBLE[case]
  probs = np.concatenate([PROBS, np.zeros((2, 1))], axis=1)   # symbol 3
  return (dj.HMM(np.array(initial, dtype), np.array(transition, dtype),
                 dj.Categorical(probs.astype(dtype)), kernels=kernels),
          np.array(obs, np.int32))


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("case", sorted(IMPOSSIBLE))
def test_impossible_sequence(case, kernels):
  model, obs = impossible_hmm(case, np.float32, kernels)
  mask = np.ones(len(obs), bool)
  log_likes = np.asarray(model.emission.log_likelihoods(jnp.asarray(obs)))
  _, ref_smoothed, impossible, _ = reference(model.initial, model.transition, log_likes)
  assert impossible.any()
  for ll in both_paths(dj.log_likelihood, model, obs, mask):
    assert ll == -np.inf
  posts = both_paths(dj.posterior, model, obs, mask)
  for post in posts:
    assert post.log_likelihood == -np.inf
    leaves = jax.tree_util.tree_leaves(post._replace(log_likelihood=0.0))
    assert all(np.isfinite(x).all() for x in leaves)
    np.testing.assert_allclose(post.smoothed_probs, ref_smoothed, atol=1e-6)
  tree_close = functools.partial(jax.tree_util.tree_map,
                                 functools.partial(np.testing.assert_allclose, atol=1e-6))
  tree_close(posts[0], posts[1])
  # Time-parallel smoothing follows the same convention (one impossible step here).
  tree_close(time_parallel.posterior(model, obs, mask), posts[0])
  news = both_paths(dj.em_step, model, obs, mask)
  for new in news:
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(new))
  tree_close(news[0], news[1])


@pytest.mark.parametrize("kernels", KERNELS)
def test_impossible_hsmm_sequence(kernels):
  # Durations of 1 or 2 steps: state 0 cannot last 3 steps.
  f = np.float32
  model = dj.HSMM(np.array([1., 0.], f), np.array([[0., 1.], [1., 0.]], f),
                  dj.CategoricalDuration(np.array([[.5, .5, 0.], [.5, .5, 0.]], f)),
                  dj.Categorical(np.array([[1., 0.], [0., 1.]], f)), kernels=kernels)
  mask = np.ones(5, bool)
  for obs, possible in (([0, 0, 0, 1, 1], False), ([0, 0, 1, 1, 0], True)):
    obs = np.array(obs, np.int32)
    for post in both_paths(dj.posterior, model, obs, mask):
      assert np.isfinite(post.log_likelihood) == possible
      leaves = jax.tree_util.tree_leaves(post._replace(log_likelihood=0.0))
      assert all(np.isfinite(x).all() for x in leaves)
    for new in both_paths(dj.em_step, model, obs, mask):
      assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(new))


def test_viterbi_of_impossible_sequences():
  # No path has positive probability; the documented path is the most likely
  # one of the sequence with the impossible steps' observations dropped (all
  # zeros before: a path of probability 0 even without those steps).
  f = np.float32
  hsmm = dj.HSMM(np.array([1., 0.], f), np.array([[0., 1.], [1., 0.]], f),
                 dj.CategoricalDuration(np.array([[.5, .5, 0.], [.5, .5, 0.]], f)),
                 dj.Categorical(np.array([[1., 0.], [0., 1.]], f)))
  # Step 2: state 0 cannot last 3 steps, state 1 cannot emit 0; step 4: likewise.
  obs = np.array([0, 0, 0, 1, 1], np.int32)
  assert dj.log_likelihood(hsmm, obs, np.ones(5, bool)) == -np.inf
  np.testing.assert_array_equal(dj.viterbi(hsmm, obs, np.ones(5, bool)), [0, 0, 1, 1, 0])
  hmm, obs = impossible_hmm("emission_middle", f, "auto")
  hmm = hmm.replace(transition=np.array([[.2, .8], [.3, .7]], f))
  # Symbol 3 at step 1 is dropped; of the paths 0 ? ? 1 for symbols 0 _ 1 2,
  # 0 1 1 1 is the most likely (.8 * .7 * .7).
  np.testing.assert_array_equal(dj.viterbi(hmm, obs, np.ones(4, bool)), [0, 1, 1, 1])


# --------------------------------------------------------------------------
# float32 accuracy of the batched log-likelihood at T = 100,000
# --------------------------------------------------------------------------


def test_float32_batched_log_likelihood_long_sequence():
  num_steps, num_users = 100_000, 2
  rng = np.random.default_rng(0)
  f = np.float32
  model = dj.HMM(np.array([.6, .3, .1], f),
                 np.array([[.90, .05, .05], [.10, .80, .10], [.05, .15, .80]], f),
                 dj.Categorical(np.array([[.7, .2, .1], [.1, .6, .3], [.2, .2, .6]], f)))
  obs = rng.integers(0, 3, (num_users, num_steps)).astype(np.int32)
  mask = np.ones((num_users, num_steps), bool)
  # float64 scaled forward in numpy.
  a64, b64 = np.asarray(model.transition, np.float64), np.asarray(model.emission.probs,
                                                                    np.float64)
  exact = []
  for u in range(num_users):
    alpha, ll = np.asarray(model.initial, np.float64), 0.0
    for t in range(num_steps):
      alpha = (alpha if t == 0 else alpha @ a64) * b64[:, obs[u, t]]
      norm = alpha.sum()
      ll, alpha = ll + np.log(norm), alpha / norm
    exact.append(ll)
  exact = np.array(exact)
  ll_fn = jax.jit(jax.vmap(dj.log_likelihood, in_axes=(None, 0, 0)))
  kernel = ll_fn(model.replace(kernels="users_minor"), obs, mask)
  per_sequence = jax.jit(dj.log_likelihood)
  one = np.array([per_sequence(model, obs[u], mask[u]) for u in range(num_users)])
  error_one = np.abs(one - exact)
  error_kernel = np.abs(np.asarray(kernel) - exact)
  # The kernel's running sum drifted by 1-2 nats here; summing after the scan
  # matches the per-sequence path (whose error is ~1e-2 nats or less).
  assert np.all(error_kernel <= np.maximum(2 * error_one, 0.05)), (error_kernel, error_one)


# --------------------------------------------------------------------------
# Property: random small HMMs with exact zeros and huge gaps
# --------------------------------------------------------------------------

NUM_STATES, NUM_STEPS = 3, 6


@functools.lru_cache(maxsize=None)
def _compiled():
  def run(initial, transition, log_likes, mask, kernels):
    return dj.hmm_smoother(initial, transition, log_likes, mask, kernels=kernels)

  one = jax.jit(functools.partial(run, kernels="per_sequence"))
  batched = jax.jit(jax.vmap(functools.partial(run, kernels="users_minor")))
  return one, batched, jax.jit(time_parallel.hmm_smoother)


def _random_case(seed, gap, zero_prob):
  rng = np.random.default_rng(seed)

  def simplex(shape):
    x = rng.dirichlet(np.ones(shape[-1]), shape[:-1]) if len(shape) > 1 else rng.dirichlet(
        np.ones(shape[0]))
    zeros = rng.random(shape) < zero_prob
    x = np.where(zeros, 0.0, x)
    # Keep one positive entry per row.
    keep = rng.integers(0, shape[-1], shape[:-1])
    x = np.where(np.arange(shape[-1]) == np.expand_dims(keep, -1), x + 0.1, x)
    return x / x.sum(-1, keepdims=True)

  initial = simplex((NUM_STATES,))
  transition = simplex((NUM_STATES, NUM_STATES))
  log_likes = rng.uniform(-3.0, 0.0, (NUM_STEPS, NUM_STATES))
  log_likes -= gap * (rng.random((NUM_STEPS, NUM_STATES)) < 0.5) * rng.uniform(0.5, 1.0, (
      NUM_STEPS, NUM_STATES))
  log_likes[rng.random((NUM_STEPS, NUM_STATES)) < zero_prob / 2] = -np.inf
  mask = rng.random(NUM_STEPS) < 0.85
  mask[rng.integers(NUM_STEPS)] = True
  return initial, transition, log_likes, mask


def _property(seed, gap, zero_prob):
  initial, transition, log_likes, mask = _random_case(seed, gap, zero_prob)
  ref_ll, ref_smoothed, impossible, underflow = reference(initial, transition, log_likes, mask)
  one, batched, parallel = _compiled()
  post = one(initial, transition, log_likes, mask)
  post_b = jax.tree_util.tree_map(lambda x: x[0], batched(
      initial[None], transition[None], log_likes[None], mask[None]))
  # Time-parallel smoothing keeps the convention up to the first impossible step.
  post_p = parallel(initial, transition, log_likes, mask)
  for p in (post, post_b) + ((post_p,) if impossible.sum() <= 1 else ()):
    assert not np.isnan(p.log_likelihood)
    leaves = jax.tree_util.tree_leaves(p._replace(log_likelihood=0.0))
    assert all(np.isfinite(x).all() for x in leaves)
    if ref_ll == -np.inf:
      assert p.log_likelihood == -np.inf
    # Exact unless some filtered probability is below float64's normal range
    # (then it flushes to 0 in the linear domain: a lower bound, never NaN).
    if underflow > np.log(np.finfo(np.float64).tiny) + 20:
      if np.isfinite(ref_ll):
        np.testing.assert_allclose(p.log_likelihood, ref_ll, rtol=1e-9, atol=1e-9)
      np.testing.assert_allclose(p.smoothed_probs, ref_smoothed, atol=1e-7)
    elif np.isfinite(ref_ll):
      assert p.log_likelihood <= ref_ll + 1e-6 * abs(ref_ll)
  assert not np.isnan(post_p.log_likelihood)
  assert all(np.isfinite(x).all()
             for x in jax.tree_util.tree_leaves(post_p._replace(log_likelihood=0.0)))
  np.testing.assert_allclose(post.log_likelihood, post_b.log_likelihood, rtol=1e-12)
  np.testing.assert_allclose(post.smoothed_probs, post_b.smoothed_probs, atol=1e-12)


# Examples and seed come from the Hypothesis profile (tests/conftest.py): a fixed
# derandomised set in the fast tier, a deeper one in CI.
@pytest.mark.x64
@given(seed=st.integers(0, 2**32 - 1), gap=st.sampled_from([0.0, 120.0, 800.0, 3000.0]),
       zero_prob=st.sampled_from([0.0, 0.3, 0.6]))
def test_property_against_log_domain_reference(seed, gap, zero_prob):
  _property(seed, gap, zero_prob)


def test_gradients_finite_where_the_best_state_is_unreachable():
  # Capped backward messages have zero derivative (normalize_capped), so the
  # gradients of the log-likelihood and of an EM layer stay finite.  (Derivatives
  # are the per-sequence code's on either kernel path, see _kernel_hmm.)
  f, kernels = np.float32, "users_minor"
  model = jax.tree_util.tree_map(jnp.asarray, issue_hmm(f, 14.0, kernels))
  obs, mask = jnp.full((2, 3, 1), 14., f), jnp.ones((2, 3), bool)
  impossible, impossible_obs = impossible_hmm("transition_middle", f, kernels)
  impossible = jax.tree_util.tree_map(jnp.asarray, impossible)

  def layer_loss(params, obs, mask, gradient):
    return jax.vmap(lambda o, m: sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(
        dj.em_layer(params, o, m, gradient=gradient))))(obs, mask).sum()

  # d ll / d initial[1] is e^98-ish here: capped at finfo.max, one user only
  # (two would sum to inf -- an overflow, not a NaN).
  grads = [jax.grad(lambda p: jax.vmap(dj.log_likelihood, in_axes=(None, 0, 0))(
      p, obs[:1], mask[:1]).sum())(model)]
  for gradient in ("exact", "exact_autodiff"):
    grads.append(jax.grad(layer_loss)(model, obs, mask, gradient))
    grads.append(jax.grad(layer_loss)(impossible, jnp.asarray(impossible_obs)[None],
                                      jnp.ones((1, 4), bool), gradient))
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(grads))


# --------------------------------------------------------------------------
# HSMM references (float64, log domain)
# --------------------------------------------------------------------------


def expand_hsmm(initial, transition, dur_probs):
  """The HSMM as a float64 HMM over (state, remaining duration): ``(initial, transition)``.

  Expanded state ``k * D + r - 1`` is "state k with r steps left, this one
  included": ``(k, r) -> (k, r - 1)`` for r > 1, ``(k, 1) -> (j, d)`` with
  ``transition[k, j] p_j(d)``; the first segment starts at step 0.  Every
  expanded state may be the last one (the final segment is right-censored),
  which is what the reference's ``beta_T = 1`` gives.  It emits as state k:
  repeat the emission log-likelihoods D times along the state axis.
  """
  dur_probs = np.asarray(dur_probs, np.float64)
  num_states, max_duration = dur_probs.shape
  dense = np.zeros((num_states, max_duration, num_states, max_duration))
  states = np.arange(num_states)
  for r in range(1, max_duration):
    dense[states, r, states, r - 1] = 1.0
  dense[:, 0] = np.asarray(transition, np.float64)[:, :, None] * dur_probs[None]
  size = num_states * max_duration
  return ((np.asarray(initial, np.float64)[:, None] * dur_probs).reshape(size),
          dense.reshape(size, size))


def reference_hsmm_segments(initial, transition, dur_probs, log_likes, reduce=np.max):
  """The HSMM by explicit-duration recursion over segments (float64, every step valid).

  ``reduce=np.max``: the most likely state path's joint log-probability (the
  Viterbi score); ``reduce=logsumexp``: the log-likelihood.  A segment of
  state k lasting d steps scores ``log p_k(d)``, the last one, cut off at T,
  ``log P(d_k >= d)`` (right-censored); segments jump through ``transition``.
  """
  num_steps, _ = log_likes.shape
  max_duration = dur_probs.shape[1]
  log_p, log_a = _log(dur_probs), _log(transition)
  log_surv = _log(np.cumsum(dur_probs[:, ::-1], axis=1)[:, ::-1])   # P(d >= e), e = 1..D
  ends = {}   # b -> (K,): best (or total) score of steps < b with a segment ending at b - 1

  def scores(b, log_dur):
    out = []
    for d in range(1, min(max_duration, b) + 1):
      a = b - d
      start = _log(initial) if a == 0 else reduce(ends[a][:, None] + log_a, axis=0)
      out.append(start + log_likes[a:b].sum(0) + log_dur[:, d - 1])
    return np.stack(out)

  with np.errstate(divide="ignore", invalid="ignore"):
    for b in range(1, num_steps + 1):
      ends[b] = reduce(scores(b, log_p), axis=0)
    return reduce(scores(num_steps, log_surv), axis=None)


def hsmm_path_score(initial, transition, dur_probs, log_likes, path):
  """The HSMM's joint log-probability of ``path`` (valid steps) and the observations."""
  path = np.asarray(path)
  max_duration = dur_probs.shape[1]
  log_p, log_a = _log(dur_probs), _log(transition)
  log_surv = _log(np.cumsum(dur_probs[:, ::-1], axis=1)[:, ::-1])
  starts = np.flatnonzero(np.r_[True, path[1:] != path[:-1]])
  lengths = np.diff(np.r_[starts, len(path)])
  states = path[starts]
  score = _log(initial)[states[0]] + log_likes[np.arange(len(path)), path].sum()
  for i, (state, length) in enumerate(zip(states, lengths)):
    if length > max_duration:
      return -np.inf
    last = i == len(states) - 1
    score += (log_surv if last else log_p)[state, length - 1]
    if not last:
      score += log_a[state, states[i + 1]]
  return score


@pytest.mark.x64
def test_hsmm_references_agree():
  # The expansion (through `reference`) and the segment recursion give the
  # same log-likelihood; the expansion is the library's oracle's matrix; the
  # segment Viterbi equals brute-force enumeration of the state paths.
  rng = np.random.default_rng(3)
  num_states, max_duration, num_steps = 3, 3, 5
  initial = rng.dirichlet(np.ones(num_states))
  transition = rng.dirichlet(np.ones(num_states - 1), num_states)
  transition = np.stack([np.insert(row, k, 0.0) for k, row in enumerate(transition)])
  dur_probs = rng.dirichlet(np.ones(max_duration), num_states)
  dur_probs[0, 2] = 0.0
  dur_probs[0] /= dur_probs[0].sum()
  log_likes = rng.normal(size=(num_steps, num_states))
  model = dj.HSMM(initial, transition, dj.CategoricalDuration(dur_probs),
                  dj.Categorical(np.full((num_states, 2), .5)))
  dense = oracles.expand_to_hmm(model)
  exp_initial, exp_transition = expand_hsmm(initial, transition, dur_probs)
  np.testing.assert_allclose(exp_initial, dense.initial, atol=1e-15)
  np.testing.assert_allclose(exp_transition, dense.transition, atol=1e-15)
  ll, _, _, _ = reference(exp_initial, exp_transition, np.repeat(log_likes, max_duration, 1))
  np.testing.assert_allclose(
      reference_hsmm_segments(initial, transition, dur_probs, log_likes, logsumexp), ll,
      rtol=1e-12)
  paths = itertools.product(range(num_states), repeat=num_steps)
  scores = [hsmm_path_score(initial, transition, dur_probs, log_likes, p) for p in paths]
  np.testing.assert_allclose(logsumexp(scores), ll, rtol=1e-12)
  np.testing.assert_allclose(
      reference_hsmm_segments(initial, transition, dur_probs, log_likes), max(scores),
      rtol=1e-12)


# --------------------------------------------------------------------------
# Property: the public API on random HMMs and HSMMs, both dtypes
# --------------------------------------------------------------------------
#
# Each example draws NUM_USERS models (K = 3 states, V = 4 symbols, HSMM
# durations 1..3) with exact zeros in the initial, transition, duration and
# emission tables and emission probabilities up to e^-gap apart, and one
# sequence per user (1..6 valid steps, drawn from the model with 30 % uniformly
# random symbols, so some sequences are impossible).  Each sequence is laid
# out twice: valid steps first with trailing padding (length NUM_VALID), and
# scattered among random padding (length NUM_PADDED); padded steps hold
# out-of-range symbols.  Shapes are fixed, so each jitted function below
# compiles once per model kind and dtype.

NUM_SYMBOLS, MAX_DURATION, NUM_VALID, NUM_PADDED, NUM_USERS = 4, 3, 6, 10, 3
# Per-step emission gaps (nats) drawn for each dtype.  float32 holds
# probabilities down to ~1e-38 (e^-87), so its gaps stay below that; float64's
# reach e^-700 (its range ends near e^-708).
GAPS = {"float32": (0.0, 30.0, 80.0), "float64": (0.0, 120.0, 700.0)}
# Reference comparisons, and one engine path against another.
TOL = {"float32": {"rtol": 2e-5, "atol": 2e-5}, "float64": {"rtol": 1e-9, "atol": 1e-9}}
SAME = {"float32": {"rtol": 1e-5, "atol": 1e-6}, "float64": {"rtol": 1e-12, "atol": 1e-12}}
DTYPES = [pytest.param("float32"), pytest.param("float64", marks=pytest.mark.x64)]


def _public_api(model, obs, mask):
  return (dj.log_likelihood(model, obs, mask), dj.posterior(model, obs, mask),
          dj.viterbi(model, obs, mask), dj.em_step(model, obs, mask))


_public_one = jax.jit(_public_api)
_public_batched = jax.jit(jax.vmap(_public_api))


def _random_table(rng, shape, zero_prob, zero_diagonal=False, gap=0.0):
  """Rows on the simplex with exact zeros (probability ``zero_prob``) and entries
  up to e^-gap apart; one positive entry per row (off the diagonal if zero)."""
  num = shape[-1]
  x = rng.uniform(0.2, 1.0, shape) * np.exp(
      -gap * rng.uniform(0.5, 1.0, shape) * (rng.random(shape) < 0.5))
  x = np.where(rng.random(shape) < zero_prob, 0.0, x)
  keep = np.asarray(rng.integers(0, num - 1 if zero_diagonal else num, shape[:-1]))
  if zero_diagonal:
    x = x * (1.0 - np.eye(num))
    keep = keep + (keep >= np.arange(num))
  x = np.where(np.arange(num) == keep[..., None], x + 0.5, x)
  return x / x.sum(-1, keepdims=True)


def _random_models(rng, kind, dtype, gap, zero_prob):
  """NUM_USERS models stacked along a leading user axis (leaves of ``dtype``)."""
  users = []
  for _ in range(NUM_USERS):
    initial = _random_table(rng, (NUM_STATES,), zero_prob)
    emission = dj.Categorical(_random_table(rng, (NUM_STATES, NUM_SYMBOLS), zero_prob,
                                            gap=gap))
    if kind == "hmm":
      users.append(dj.HMM(initial, _random_table(rng, (NUM_STATES,) * 2, zero_prob), emission))
    else:
      users.append(dj.HSMM(
          initial, _random_table(rng, (NUM_STATES,) * 2, zero_prob, zero_diagonal=True),
          dj.CategoricalDuration(_random_table(rng, (NUM_STATES, MAX_DURATION), zero_prob)),
          emission))
  return jax.tree_util.tree_map(lambda *x: np.stack(x).astype(dtype), *users)


def _user(models, u):
  return jax.tree_util.tree_map(lambda x: x[u], models)


def _dense_chain(model):
  """(initial, transition, emission probs) of the model as a float64 HMM: the
  HMM itself, or the HSMM expanded over (state, remaining duration)."""
  model = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), model)
  probs = model.emission.probs
  if isinstance(model, dj.HMM):
    return model.initial, model.transition, probs
  initial, transition = expand_hsmm(model.initial, model.transition, model.duration.probs)
  return initial, transition, np.repeat(probs, MAX_DURATION, axis=0)


def _random_sequences(rng, models):
  """Per user: (valid symbols (n,), compressed obs/mask (NUM_VALID,), padded
  obs/mask (NUM_PADDED,)); garbage symbols on padded steps."""
  out = []
  for u in range(NUM_USERS):
    initial, transition, probs = _dense_chain(_user(models, u))
    num = rng.integers(1, NUM_VALID + 1)
    symbols, state = [], rng.choice(len(initial), p=initial / initial.sum())
    for _ in range(num):
      row = probs[state] / probs[state].sum()
      symbols.append(rng.integers(NUM_SYMBOLS) if rng.random() < 0.3
                     else rng.choice(NUM_SYMBOLS, p=row))
      state = rng.choice(len(initial), p=transition[state] / transition[state].sum())
    symbols = np.array(symbols, np.int32)
    garbage = lambda n: rng.choice(np.array([-7, -1, NUM_SYMBOLS, 99], np.int32), n)
    compressed, padded = garbage(NUM_VALID), garbage(NUM_PADDED)
    compressed[:num] = symbols
    where = np.sort(rng.choice(NUM_PADDED, num, replace=False))
    padded[where] = symbols
    out.append((symbols, (compressed, np.arange(NUM_VALID) < num),
                (padded, np.isin(np.arange(NUM_PADDED), where))))
  return out


def _normalize_rows(counts, fallback):
  """The M-step's row normalisation (rows with mass <= MIN_STATE_MASS keep
  ``fallback``), and which rows are clear of that threshold (comparable)."""
  mass = counts.sum(-1, keepdims=True)
  new = np.where(mass > MIN_STATE_MASS, counts / np.where(mass > 0, mass, 1.0), fallback)
  return new, np.abs(np.log(np.maximum(mass[..., 0], 1e-300) / MIN_STATE_MASS)) > 1.0


def _reference_user(model, symbols):
  """float64 references for one user: log-likelihood, smoothed (n, K), Viterbi
  score (on the sequence with impossible steps dropped), the evidence so
  dropped, and the EM update as {field path: (rows, comparable rows)}."""
  initial, transition, probs = _dense_chain(model)
  log_b = _log(probs)[:, symbols].T                             # (n, K) or (n, K D)
  ll, smoothed, impossible, underflow = reference(initial, transition, log_b)
  counts = reference_two_slice(initial, transition, log_b)
  m64 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), model)
  num_steps = len(symbols)
  if isinstance(model, dj.HMM):
    evidence = np.where(impossible[:, None], 0.0, log_b)
    score = reference_viterbi(initial, transition, evidence)
    first, state_probs, jumps = smoothed[0], smoothed, counts
    extra = {}
  else:
    shape = (NUM_STATES, MAX_DURATION)
    evidence = np.where(impossible[:, None], 0.0, log_b[:, ::MAX_DURATION])
    score = reference_hsmm_segments(m64.initial, m64.transition, m64.duration.probs, evidence)
    joint = smoothed.reshape((num_steps,) + shape)
    state_probs, first = joint.sum(-1), joint[0].sum(-1)
    entered = counts.reshape(shape + shape)[:, 0]                # (K from, K to, D)
    jumps = entered.sum(-1)
    extra = {"duration": _normalize_rows(joint[0] + entered.sum(0), m64.duration.probs)}
  emission_counts = np.stack([state_probs[symbols == v].sum(0)
                              for v in range(NUM_SYMBOLS)], axis=1)
  em = {"initial": _normalize_rows(first[None], m64.initial[None]),
        "transition": _normalize_rows(jumps, m64.transition),
        "emission": _normalize_rows(emission_counts, m64.emission.probs), **extra}
  return {"ll": ll, "smoothed": state_probs, "underflow": underflow, "score": score,
          "evidence": evidence, "em": em, "impossible": impossible.any()}


def _em_rows(new):
  rows = {"initial": np.asarray(new.initial)[None], "transition": np.asarray(new.transition),
          "emission": np.asarray(new.emission.probs)}
  if isinstance(new, dj.HSMM):
    rows["duration"] = np.asarray(new.duration.probs)
  return rows


def _finite_outputs(out):
  """No NaN anywhere; every output finite except a -inf log-likelihood."""
  ll, post, path, new = out
  for value in (ll, post.log_likelihood):
    assert not np.isnan(value) and value < np.inf
  leaves = jax.tree_util.tree_leaves((post._replace(log_likelihood=0.0), new))
  assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
  assert np.all((np.asarray(path) >= 0) & (np.asarray(path) < NUM_STATES))


def _same(a, b, where_a, where_b, tol):
  """Two engine results for the same valid steps (positions where_a / where_b)."""
  (ll_a, post_a, path_a, new_a), (ll_b, post_b, path_b, new_b) = a, b
  np.testing.assert_allclose(ll_a, ll_b, **tol)
  np.testing.assert_allclose(post_a.log_likelihood, post_b.log_likelihood, **tol)
  np.testing.assert_allclose(np.asarray(post_a.smoothed_probs)[where_a],
                             np.asarray(post_b.smoothed_probs)[where_b], **tol)
  np.testing.assert_array_equal(np.asarray(path_a)[where_a], np.asarray(path_b)[where_b])
  for name, rows in _em_rows(new_a).items():
    np.testing.assert_allclose(rows, _em_rows(new_b)[name], err_msg=name, **tol)


def _carries_state(path, mask):
  """Masked steps repeat the carried state: the previous valid step's, or the
  first valid step's before it."""
  path, valid = np.asarray(path), np.flatnonzero(mask)
  carried = path[valid[np.maximum(np.searchsorted(valid, np.arange(len(mask)), "right") - 1, 0)]]
  np.testing.assert_array_equal(path, carried)


def _check_public_api(kind, dtype, seed, gap_index, zero_prob):
  rng = np.random.default_rng(seed)
  models = _random_models(rng, kind, dtype, GAPS[dtype][gap_index], zero_prob)
  sequences = _random_sequences(rng, models)
  per_sequence = models.replace(kernels="per_sequence")
  users_minor = models.replace(kernels="users_minor")
  stacked = [np.stack([seq[i][j] for seq in sequences]) for i in (1, 2) for j in (0, 1)]
  batched = _public_batched(users_minor, *stacked[:2])
  batched_padded = _public_batched(users_minor, *stacked[2:])
  # The smallest filtered probability the linear-domain filter holds exactly.
  dtype_range = np.log(np.finfo(dtype).tiny) + 5
  for u, (symbols, (obs, mask), (obs_p, mask_p)) in enumerate(sequences):
    num = len(symbols)
    model = _user(per_sequence, u)
    one = _public_one(model, obs, mask)
    ref = _reference_user(model, symbols)
    _finite_outputs(one)
    ll, post, path, new = one
    for value in (ll, post.log_likelihood):
      if ref["ll"] == -np.inf:
        assert value == -np.inf
    # Exact, and finite where the reference is, unless the linear-domain filter
    # must hold a probability below the dtype's range (the documented limit:
    # then a lower bound, -inf if all the mass that explains a later step
    # flushed to 0; never NaN).
    if ref["underflow"] > dtype_range:
      assert np.isfinite(ll) == np.isfinite(ref["ll"])
      assert np.isfinite(post.log_likelihood) == np.isfinite(ref["ll"])
      if np.isfinite(ref["ll"]):
        np.testing.assert_allclose(ll, ref["ll"], **TOL[dtype])
        np.testing.assert_allclose(post.log_likelihood, ref["ll"], **TOL[dtype])
      np.testing.assert_allclose(post.smoothed_probs[:num], ref["smoothed"], **TOL[dtype])
      for name, (rows, comparable) in ref["em"].items():
        np.testing.assert_allclose(_em_rows(new)[name][comparable], rows[comparable],
                                   err_msg=name, **TOL[dtype])
    elif np.isfinite(ref["ll"]):
      assert ll <= ref["ll"] + 1e-5 * abs(ref["ll"])
    # Viterbi: the path's joint log-probability (float64) is the maximum; on an
    # impossible sequence, that of the sequence with the impossible steps dropped.
    m64 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), model)
    if kind == "hmm":
      score = hmm_path_score(m64.initial, m64.transition, ref["evidence"], path[:num])
    else:
      score = hsmm_path_score(m64.initial, m64.transition, m64.duration.probs,
                              ref["evidence"], path[:num])
    assert np.isfinite(ref["score"])
    np.testing.assert_allclose(score, ref["score"], **TOL[dtype])
    _carries_state(path, mask)
    # Batched (users-minor kernels) == per sequence; padding anywhere changes nothing.
    padded = _public_one(model, obs_p, mask_p)
    _finite_outputs(padded)
    _carries_state(padded[2], mask_p)
    _same(one, padded, mask, mask_p, SAME[dtype])
    for out, where in ((batched, mask), (batched_padded, mask_p)):
      mine = _user(out, u)
      _finite_outputs(mine)
      _same(one, mine, mask, where, SAME[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=st.integers(0, 2**32 - 1), gap_index=st.integers(0, 2),
       zero_prob=st.sampled_from([0.0, 0.3, 0.6]))
def test_property_hmm_public_api(dtype, seed, gap_index, zero_prob):
  """log_likelihood, posterior, viterbi and em_step of random HMMs against the
  float64 log-domain references, batched against per sequence, padded against
  compressed; no NaN.  float32 gaps stay below e^-87 per step; where the exact
  answer needs a filtered probability below float32's range, float32 must give
  a lower bound (never NaN)."""
  _check_public_api("hmm", dtype, seed, gap_index, zero_prob)


@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=st.integers(0, 2**32 - 1), gap_index=st.integers(0, 2),
       zero_prob=st.sampled_from([0.0, 0.3, 0.6]))
def test_property_hsmm_public_api(dtype, seed, gap_index, zero_prob):
  """As test_property_hmm_public_api for HSMMs (CategoricalDuration, D = 3, with
  zeros): the reference is the expanded (state, remaining duration) HMM, the
  Viterbi score the segment recursion, the EM update's duration rows the
  expanded chain's expected segment counts.  float32: gaps below e^-87 per
  step; mass below ~1e-38 flushes (docs/robustness.md), so where the exact
  answer needs it only a lower bound and finiteness are required."""
  _check_public_api("hsmm", dtype, seed, gap_index, zero_prob)


# --------------------------------------------------------------------------
# Property: the recursions on raw log-likelihoods far beyond a float's range
# --------------------------------------------------------------------------

LOW_LEVEL_STEPS = 8
# Per-step log-likelihood gaps (nats) beyond the dtype's range (float32: e^-87,
# float64: e^-745), where the reachable-state scaling matters.
RAW_GAPS = {"float32": (0.0, 30.0, 120.0, 800.0), "float64": (0.0, 120.0, 800.0, 3000.0)}


@functools.cache
def _low_level(kind):
  def run(initial, transition, dur_probs, log_likes, mask, kernels):
    if kind == "hmm":
      return (dj.hmm_smoother(initial, transition, log_likes, mask, kernels=kernels),
              dj.hmm_viterbi(initial, transition, log_likes, mask))
    dur_log_probs = jnp.log(dur_probs)
    return (dj.hsmm_smoother(initial, transition, dur_log_probs, log_likes, mask,
                             kernels=kernels),
            dj.hsmm_viterbi(initial, transition, dur_log_probs, log_likes, mask))

  return (jax.jit(functools.partial(run, kernels="per_sequence")),
          jax.jit(jax.vmap(functools.partial(run, kernels="users_minor"))))


def _raw_case(rng, kind, dtype, gap, zero_prob):
  """A random chain with zeros and (T, K) log-likelihoods: at every step one
  state fits best and the others are worse by up to ``gap``; some entries
  are -inf.  Half the chains have a trap state that is never entered (zero
  initial probability and column, as in a left-to-right model) and fits best
  at every step, the others about equally worse: the case the reachable-state
  scaling exists for.  Masked steps hold garbage."""
  initial = _random_table(rng, (NUM_STATES,), zero_prob)
  transition = _random_table(rng, (NUM_STATES,) * 2, zero_prob, zero_diagonal=kind == "hsmm")
  dur_probs = _random_table(rng, (NUM_STATES, MAX_DURATION), zero_prob)
  shape = (LOW_LEVEL_STEPS, NUM_STATES)
  favoured = rng.integers(0, NUM_STATES, LOW_LEVEL_STEPS)
  # Per step, the other states are worse by about the same amount (within a
  # float's range of each other) or by independent amounts.
  same = rng.random((LOW_LEVEL_STEPS, 1)) < 0.5
  if rng.random() < 0.5:
    trap = rng.integers(NUM_STATES)
    others = np.arange(NUM_STATES) != trap
    initial = np.where(others, initial + 0.1, 0.0)
    transition = np.where(others[None] | np.eye(NUM_STATES, dtype=bool), transition, 0.0)
    # Rows left empty move to the next state (not the trap: then it would be entered).
    empty = transition.sum(-1) == 0
    successor = np.where((np.arange(NUM_STATES) + 1) % NUM_STATES == trap,
                         np.arange(NUM_STATES) + 2, np.arange(NUM_STATES) + 1) % NUM_STATES
    transition[empty, successor[empty]] = 1.0
    initial, transition = (x / x.sum(-1, keepdims=True) for x in (initial, transition))
    favoured[:], same[:] = trap, True
  favoured = favoured[:, None] == np.arange(NUM_STATES)
  worse = gap * np.where(same, rng.uniform(0.5, 1.0, (LOW_LEVEL_STEPS, 1)) * rng.uniform(
      0.99, 1.0, shape), rng.uniform(0.5, 1.0, shape) * (rng.random(shape) < 0.7))
  log_likes = rng.uniform(-3.0, 0.0, shape) - worse * ~favoured
  log_likes[rng.random(shape) < zero_prob / 2] = -np.inf
  mask = rng.random(LOW_LEVEL_STEPS) < 0.8
  mask[rng.integers(LOW_LEVEL_STEPS)] = True
  log_likes[~mask] = rng.choice([-1e4, -np.inf, 0.0, 60.0], (np.sum(~mask), NUM_STATES))
  cast = lambda x: np.asarray(x, dtype)
  return cast(initial), cast(transition), cast(dur_probs), cast(log_likes), mask


def _check_low_level(kind, dtype, seed, gap_index, zero_prob):
  rng = np.random.default_rng(seed)
  case = _raw_case(rng, kind, dtype, RAW_GAPS[dtype][gap_index], zero_prob)
  initial, transition, dur_probs, log_likes, mask = (np.asarray(x, np.float64) for x in case)
  valid = np.flatnonzero(mask)
  if kind == "hmm":
    ref_ll, ref_smoothed, impossible, underflow = reference(initial, transition, log_likes,
                                                            mask)
  else:
    ref_ll, joint, impossible, underflow = reference(
        *expand_hsmm(initial, transition, dur_probs),
        np.repeat(log_likes, MAX_DURATION, axis=1), mask)
    ref_smoothed = joint.reshape(-1, NUM_STATES, MAX_DURATION).sum(-1)
  one, batched = _low_level(kind)
  post, path = one(*case)
  clean = case[:3] + (np.where(mask[:, None], case[3], 0).astype(dtype), mask)
  post_b, path_b = jax.tree_util.tree_map(lambda x: x[0], batched(*(x[None] for x in clean)))
  for p in (post, post_b):
    assert not np.isnan(p.log_likelihood) and p.log_likelihood < np.inf
    leaves = jax.tree_util.tree_leaves(p._replace(log_likelihood=0.0))
    assert all(np.isfinite(x).all() for x in leaves)
    if ref_ll == -np.inf:
      assert p.log_likelihood == -np.inf
    if underflow > np.log(np.finfo(dtype).tiny) + 5:
      assert np.isfinite(p.log_likelihood) == np.isfinite(ref_ll)
      if np.isfinite(ref_ll):
        np.testing.assert_allclose(p.log_likelihood, ref_ll, **TOL[dtype])
      np.testing.assert_allclose(p.smoothed_probs, ref_smoothed, **TOL[dtype])
    elif np.isfinite(ref_ll):
      assert p.log_likelihood <= ref_ll + 1e-5 * abs(ref_ll)
  # Garbage on masked steps is ignored; the users-minor kernels equal the per-sequence code.
  tree_close = functools.partial(jax.tree_util.tree_map, functools.partial(
      np.testing.assert_allclose, **SAME[dtype]))
  tree_close(post, post_b)
  np.testing.assert_array_equal(path, path_b)
  np.testing.assert_array_equal(path, one(*clean)[1])
  # Viterbi (log domain, no underflow): the path's score is the maximum, of the
  # sequence with the impossible steps' observations dropped.
  evidence = np.where(impossible[:, None], 0.0, log_likes)[valid]
  if kind == "hmm":
    ref_score = reference_viterbi(initial, transition, evidence)
    score = hmm_path_score(initial, transition, evidence, np.asarray(path)[valid])
  else:
    ref_score = reference_hsmm_segments(initial, transition, dur_probs, evidence)
    score = hsmm_path_score(initial, transition, dur_probs, evidence, np.asarray(path)[valid])
  assert np.isfinite(ref_score)
  np.testing.assert_allclose(score, ref_score, **TOL[dtype])
  _carries_state(path, mask)


@pytest.mark.parametrize("kind", ["hmm", "hsmm"])
@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=st.integers(0, 2**32 - 1), gap_index=st.integers(0, 3),
       zero_prob=st.sampled_from([0.0, 0.3, 0.6]))
def test_property_recursions_beyond_float_range(kind, dtype, seed, gap_index, zero_prob):
  """hmm_/hsmm_smoother and hmm_/hsmm_viterbi on raw log-likelihoods whose
  best state is often unreachable and up to 3000 nats (float64) / 800 nats
  (float32) better than the rest, with exact zeros everywhere and garbage
  (-1e4, 60, -inf) on masked steps: against the float64 log-domain
  references, users-minor against per-sequence, never NaN.  Exactness (and
  finiteness where the reference is finite) is required where every
  filtered probability of the reference lies within the dtype's range
  (float32: above ~1e-38 -- the documented HSMM/HMM float32 limit); beyond it,
  a lower bound.  Viterbi runs in the log domain and is exact throughout."""
  _check_low_level(kind, dtype, seed, gap_index, zero_prob)
