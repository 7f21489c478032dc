"""The time-parallel smoother (dennl_jax.time_parallel) against the sequential one
and brute force: values and gradients, every
emission family, padding anywhere, T = 1 and odd T, extreme likelihoods.
(dynamax's parallel smoother is compared in benchmarks/bench_scaling.py: its
smoother differentiates an associative scan, a 10 s compilation.)

Nearly every case has T = PADDED_LEN: compiling an associative scan costs
seconds (it grows with log T), so all cases share one compilation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dennl_jax as dj
from helpers import (FAMILIES, BruteForce, pad_sequence, random_hmm, random_obs,
                     tree_allclose)
from dennl_jax import time_parallel
from dennl_jax._chain import masked_log_likelihoods
from dennl_jax.hmm import hmm_smoother

pytestmark = pytest.mark.x64

PADDED_LEN = 9
NUM_VALID = 5


_smoothers = jax.jit(lambda *args: (hmm_smoother(*args), time_parallel.hmm_smoother(*args)))


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_sequential_every_family(family):
  rng = np.random.default_rng([12, FAMILIES.index(family)])
  hmm = random_hmm(family, rng, 3)
  valid = random_obs(family, rng, NUM_VALID)
  padded, mask, _ = pad_sequence(valid, rng, PADDED_LEN, family)
  full = random_obs(family, rng, PADDED_LEN)
  results = []
  for obs, m in ((padded, mask), (full, np.ones(PADDED_LEN, bool))):
    # The smoothers see the family only through (T, K) log-likelihoods, so one
    # compilation serves every family.
    log_likes = masked_log_likelihoods(hmm.emission, obs, m)
    seq, par = _smoothers(hmm.initial, hmm.transition, log_likes, m)
    tree_allclose(par, seq, rtol=1e-10, atol=1e-12)
    results.append(par)
  # Padding anywhere equals the compressed sequence (checked against brute force).
  post = results[0]
  brute = BruteForce(hmm, valid)
  np.testing.assert_allclose(post.log_likelihood, brute.log_likelihood(), rtol=1e-10)
  np.testing.assert_allclose(post.smoothed_probs[mask], brute.smoothed(), atol=1e-10)
  np.testing.assert_allclose(post.transition_counts, brute.transition_counts(), atol=1e-10)


def _random_case(rng, num_steps, num_states=3, transition=None):
  initial = rng.dirichlet(np.ones(num_states))
  if transition is None:
    transition = rng.dirichlet(np.ones(num_states), num_states)
  return initial, transition, 3.0 * rng.normal(size=(num_steps, num_states))


@pytest.mark.parametrize("num_steps", [1, PADDED_LEN])
@pytest.mark.parametrize("pattern", ["full", "padded", "one_valid"])
def test_lengths_and_masks(num_steps, pattern):
  rng = np.random.default_rng([13, num_steps, len(pattern)])
  initial, transition, log_likes = _random_case(rng, num_steps)
  mask = np.ones(num_steps, bool)
  if pattern == "padded" and num_steps > 2:
    mask[[0, 3, 4, num_steps - 1]] = False
  elif pattern == "one_valid":
    mask[:] = False
    mask[num_steps // 2] = True
  log_likes = np.where(mask[:, None], log_likes, 0.0)
  expected, got = _smoothers(initial, transition, log_likes, mask)
  tree_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_no_valid_step_is_the_prior():
  # A padding user (sharding.shard_users) has no valid step: prior, zero counts, ll = 0.
  rng = np.random.default_rng(14)
  initial, transition, log_likes = _random_case(rng, PADDED_LEN)
  mask = np.zeros(PADDED_LEN, bool)
  expected, got = _smoothers(initial, transition, np.zeros_like(log_likes), mask)
  tree_allclose(got, expected, atol=1e-12)
  np.testing.assert_allclose(got.log_likelihood, 0.0, atol=1e-12)
  np.testing.assert_allclose(got.smoothed_probs, np.broadcast_to(initial, (PADDED_LEN, 3)), atol=1e-12)


def test_sparse_transition_left_right():
  # Zero transition entries make some rows of the step matrices massless.
  rng = np.random.default_rng(15)
  transition = np.array([[0.6, 0.4, 0.0], [0.0, 0.7, 0.3], [0.0, 0.0, 1.0]])
  initial, _, log_likes = _random_case(rng, PADDED_LEN, transition=transition)
  log_likes[4] = [0.0, -800.0, -900.0]   # exp underflows for states 1 and 2
  mask = np.ones(PADDED_LEN, bool)
  expected, got = _smoothers(initial, transition, log_likes, mask)
  assert all(np.all(np.isfinite(x)) for x in got)
  tree_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_gradients_match_sequential():
  # Differentiated through softmax, as every caller does (em_layer works on
  # unconstrained parameters): off the simplex the two smoothers are different
  # functions (the parallel one renormalises rows), on it they are one.
  rng = np.random.default_rng(16)
  initial, transition, log_likes = _random_case(rng, 4)
  mask = np.array([False, True, False, True])

  def objective(smoother):
    def f(args):
      logits_init, logits_trans, ll = args
      # Masked steps carry log-likelihood 0, as masked_log_likelihoods gives them.
      ll = jnp.where(mask[:, None], ll, 0.0)
      post = smoother(jax.nn.softmax(logits_init), jax.nn.softmax(logits_trans), ll, mask)
      return sum(jnp.sum(jnp.sin(x)) for x in post)
    return jax.grad(f)

  args = (np.log(initial), np.log(transition), log_likes)
  got, expected = jax.jit(lambda a: (objective(time_parallel.hmm_smoother)(a),
                                     objective(hmm_smoother)(a)))(args)
  tree_allclose(got, expected, rtol=1e-8, atol=1e-10)
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(got))


def test_float32_extreme_log_likelihoods_are_stable():
  # Per-step likelihood ratios of e^-3000: any product of raw likelihoods over- or
  # underflows float32 at once; the normalised elements must not.
  rng = np.random.default_rng(18)
  initial, transition, log_likes = _random_case(rng, PADDED_LEN)
  log_likes = 1000.0 * log_likes
  mask = np.ones(PADDED_LEN, bool)
  mask[2] = False
  log_likes[2] = 0.0
  expected = _smoothers(initial, transition, log_likes, mask)[0]
  with jax.enable_x64(False):
    got = jax.jit(time_parallel.hmm_smoother)(*(np.asarray(x, np.float32)
                                           for x in (initial, transition, log_likes)), mask)
  assert got.smoothed_probs.dtype == jnp.float32
  assert all(np.all(np.isfinite(x)) for x in got)
  np.testing.assert_allclose(got.log_likelihood, expected.log_likelihood, rtol=1e-5)
  np.testing.assert_allclose(got.smoothed_probs, expected.smoothed_probs, atol=1e-4)
  np.testing.assert_allclose(got.transition_counts, expected.transition_counts, atol=1e-4)


def test_em_step_option_and_rejects_hsmm():
  rng = np.random.default_rng(19)
  hmm = random_hmm("categorical", rng, 3)
  obs = random_obs("categorical", rng, PADDED_LEN)
  mask = np.ones(PADDED_LEN, bool)
  both = jax.jit(lambda p, o, m: (dj.em_step(p, o, m, time_parallel=True), dj.em_step(p, o, m)))
  tree_allclose(*both(hmm, obs, mask), rtol=1e-10, atol=1e-12)
  hsmm = dj.HSMM(hmm.initial, (1.0 - np.eye(3)) / 2, dj.PoissonDuration(np.full(3, 2.0), 4),
                 hmm.emission)
  with pytest.raises(ValueError, match="HMM parameters only"):
    dj.em_step(hsmm, obs, mask, time_parallel=True)
