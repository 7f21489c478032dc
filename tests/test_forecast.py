"""Tests of dj.forecast against brute-force enumeration of future state paths."""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FAMILIES, pad_sequence, random_hmm, random_obs, reference_log_likelihoods
from scipy import stats
from scipy.special import logsumexp

import dennl_jax as dj
from dennl_jax.oracles import expand_to_hmm

pytestmark = pytest.mark.x64

# One compiled forecast per (model structure, shapes); the eager public call
# is exercised separately for validation.
_forecast = jax.jit(dj.forecast, static_argnames="num_steps")


@functools.partial(jax.jit, static_argnames="num_steps")
def _forecast_and_log_likelihood(model, obs, mask, num_steps):
  return dj.forecast(model, obs, mask, num_steps), dj.log_likelihood(model, obs, mask)


# ---------------------------------------------------------------- models


def random_hsmm(rng, num_states, max_duration, duration="poisson", family="categorical"):
  raw = rng.dirichlet(np.ones(num_states - 1), num_states)
  transition = np.stack([np.insert(raw[k], k, 0.0) for k in range(num_states)])
  if duration == "poisson":
    durations = dj.PoissonDuration(rng.uniform(0.3, 3.0, num_states), max_duration)
  else:
    durations = dj.CategoricalDuration(rng.dirichlet(np.ones(max_duration), num_states))
  emission = random_hmm(family, rng, num_states).emission
  return dj.HSMM(rng.dirichlet(np.ones(num_states)), transition, durations, emission)


# ---------------------------------------------------------------- brute force


def hmm_brute_force(hmm, obs, num_future):
  """p(z_{T+h} | o_{1:T}) by enumerating all K^(T+H) paths; returns (ll, (H, K))."""
  log_b = reference_log_likelihoods(hmm.emission, obs)
  num_steps, num_states = log_b.shape
  total = num_steps + num_future
  paths = np.array(list(itertools.product(range(num_states), repeat=total)))
  log_a = np.log(np.asarray(hmm.transition))
  score = np.log(np.asarray(hmm.initial))[paths[:, 0]]
  score = score + log_a[paths[:, :-1], paths[:, 1:]].sum(-1)
  score = score + log_b[np.arange(num_steps), paths[:, :num_steps]].sum(-1)
  return _marginals(score, paths[:, num_steps:], num_states)


def hsmm_segmentations(hsmm, total):
  """Every (state path, log-probability) of the first ``total`` steps.

  Enumerates the explicit-duration generative process literally: segment
  states (first from ``initial``, then through ``transition``) and their
  drawn durations d in 1..D, until the segments cover ``total`` steps; the
  last segment's drawn duration may run past the window (it is cut there).
  No survivor function appears: censoring arises from summing over d.
  """
  log_pi = np.log(np.asarray(hsmm.initial))
  with np.errstate(divide="ignore"):
    log_a = np.log(np.asarray(hsmm.transition))
  log_dur = np.asarray(hsmm.duration.log_probs())
  num_states, max_duration = log_dur.shape
  out = {}

  def extend(path, score, prev):
    for k in range(num_states):
      entry = log_pi[k] if prev is None else log_a[prev, k]
      if not np.isfinite(entry):
        continue
      for d in range(1, max_duration + 1):
        seg_score = score + entry + log_dur[k, d - 1]
        new_path = path + (k,) * min(d, total - len(path))
        if len(new_path) == total:
          out[new_path] = np.logaddexp(out.get(new_path, -np.inf), seg_score)
        else:
          extend(new_path, seg_score, k)

  extend((), 0.0, None)
  paths = np.array(list(out.keys()))
  return paths, np.array(list(out.values()))


def hsmm_brute_force(hsmm, obs, num_future):
  log_b = reference_log_likelihoods(hsmm.emission, obs)
  num_steps, num_states = log_b.shape
  paths, score = hsmm_segmentations(hsmm, num_steps + num_future)
  # The process is a distribution over cut paths: the scores sum to one.
  np.testing.assert_allclose(logsumexp(score), 0.0, atol=1e-12)
  score = score + log_b[np.arange(num_steps), paths[:, :num_steps]].sum(-1)
  return _marginals(score, paths[:, num_steps:], num_states)


def _marginals(score, future, num_states):
  ll = logsumexp(score)
  weight = np.exp(score - ll)
  probs = np.stack([np.bincount(future[:, h], weight, minlength=num_states)
                    for h in range(future.shape[1])])
  return ll, probs


def per_state_mean(emission):
  """E[o | z = k], (K, ...), from scipy's distributions where they exist."""
  if isinstance(emission, dj.Categorical):
    return np.asarray(emission.probs)              # mean of the one-hot symbol
  if isinstance(emission, dj.Multinomial):
    return np.stack([stats.multinomial(1, p).mean() for p in np.asarray(emission.probs)])
  if isinstance(emission, dj.Poisson):
    return np.array([stats.poisson(r).mean() for r in np.asarray(emission.rate)])
  if isinstance(emission, dj.Gaussian):
    return np.stack([stats.multivariate_normal(m, c).mean
                     for m, c in zip(np.asarray(emission.mean), np.asarray(emission.cov))])
  return np.stack([stats.norm(m, np.sqrt(v)).mean()
                   for m, v in zip(np.asarray(emission.mean), np.asarray(emission.var))])


# ---------------------------------------------------------------- brute force


# Every brute-force case uses these shapes, so they share compiled forecasts.
SLOTS, HORIZON, STATES = 7, 3, 3


def _padded(rng, obs):
  """obs in SLOTS slots: as is when it fills them, else with leading, interior
  and trailing padding holding invalid garbage."""
  if obs.shape[0] == SLOTS:
    return obs, np.ones(SLOTS, bool)
  padded_obs, mask, _ = pad_sequence(obs, rng, SLOTS, "categorical")
  return padded_obs, mask


@pytest.mark.parametrize("num_steps", [SLOTS, 4, 1])
def test_hmm_matches_brute_force(num_steps):
  rng = np.random.default_rng(num_steps)
  model = random_hmm("categorical", rng, STATES)
  obs = random_obs("categorical", rng, num_steps)
  ll, expect = hmm_brute_force(model, obs, HORIZON)
  seq, mask = _padded(rng, obs)
  dj.validate(model, seq, mask)   # the garbage in the padding is ignored
  got, got_ll = _forecast_and_log_likelihood(model, seq, mask, num_steps=HORIZON)
  np.testing.assert_allclose(got_ll, ll, rtol=1e-10)
  assert got.state_probs.shape == (HORIZON, STATES)
  np.testing.assert_allclose(got.state_probs, expect, atol=1e-8)


@pytest.mark.parametrize("num_steps,duration", [
    (4, "categorical"), (5, "poisson"),
    (1, "poisson"),                   # T = 1: the first segment is the censored one
])
def test_hsmm_matches_brute_force(num_steps, duration):
  rng = np.random.default_rng(num_steps)
  model = random_hsmm(rng, STATES, 3, duration)
  obs = random_obs("categorical", rng, num_steps)
  ll, expect = hsmm_brute_force(model, obs, HORIZON)
  seq, mask = _padded(rng, obs)
  seq_copy, mask_copy = seq.copy(), mask.copy()
  dj.validate(model, seq, mask)
  got, got_ll = _forecast_and_log_likelihood(model, seq, mask, num_steps=HORIZON)
  # Summing the (T+H)-step process over its futures gives the engine's
  # right-censored likelihood of the T observed steps.
  np.testing.assert_allclose(got_ll, ll, rtol=1e-10)
  np.testing.assert_allclose(got.state_probs, expect, atol=1e-8)
  np.testing.assert_array_equal(seq, seq_copy)           # inputs never modified
  np.testing.assert_array_equal(mask, mask_copy)


def test_hsmm_forecast_knows_elapsed_time():
  """Deterministic durations of 3, emissions that reveal the state.

  Observed 0,0,0,1: state 1 started at step 4, so it lasts two more steps and
  then state 0 returns for three.  An HMM has no memory of elapsed time.
  """
  model = dj.HSMM(jnp.array([0.5, 0.5]), jnp.array([[0.0, 1.0], [1.0, 0.0]]),
                  dj.CategoricalDuration(jnp.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])),
                  dj.Categorical(jnp.eye(2)))
  got = _forecast(model, jnp.array([0, 0, 0, 1]), jnp.ones(4, bool), num_steps=5)
  np.testing.assert_allclose(got.state_probs, np.eye(2)[[1, 1, 0, 0, 0]], atol=1e-12)
  np.testing.assert_allclose(got.observation_mean, np.eye(2)[[1, 1, 0, 0, 0]], atol=1e-12)


# ---------------------------------------------------------------- dense oracle


def test_hsmm_matches_expanded_hmm():
  rng = np.random.default_rng(5)
  max_duration = 3
  model = random_hsmm(rng, STATES, max_duration, "poisson", "categorical")
  seq, mask = _padded(rng, random_obs("categorical", rng, 5))
  got, got_ll = _forecast_and_log_likelihood(model, seq, mask, num_steps=HORIZON)
  want, want_ll = _forecast_and_log_likelihood(expand_to_hmm(model), seq, mask,
                                               num_steps=HORIZON)
  np.testing.assert_allclose(got_ll, want_ll, rtol=1e-10)
  np.testing.assert_allclose(
      got.state_probs, want.state_probs.reshape(HORIZON, STATES, max_duration).sum(-1),
      atol=1e-10)
  np.testing.assert_allclose(got.observation_mean, want.observation_mean, atol=1e-10)


# ---------------------------------------------------------------- families


@pytest.mark.parametrize("family", FAMILIES)
def test_observation_mean_every_family(family):
  rng = np.random.default_rng(FAMILIES.index(family))
  model = random_hmm(family, rng, STATES)
  obs = random_obs(family, rng, SLOTS)
  got, _ = _forecast_and_log_likelihood(model, obs, np.ones(SLOTS, bool), num_steps=HORIZON)
  means = per_state_mean(model.emission)
  assert got.observation_mean.shape == (HORIZON,) + means.shape[1:]
  np.testing.assert_allclose(got.observation_mean, np.tensordot(got.state_probs, means, 1),
                             atol=1e-12)
  np.testing.assert_allclose(got.state_probs, hmm_brute_force(model, obs, HORIZON)[1],
                             atol=1e-8)


# ---------------------------------------------------------------- jit / vmap / float32


def test_jit_vmap_over_padded_batch_matches_single_sequences():
  rng = np.random.default_rng(3)
  models, seqs, masks = [], [], []
  for num_valid in (1, 4, 5):
    models.append(random_hsmm(rng, STATES, 3, "poisson", "categorical"))
    seq, mask = _padded(rng, random_obs("categorical", rng, num_valid))
    seqs.append(seq)
    masks.append(mask)
  batch = jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *models)
  batched = jax.jit(jax.vmap(functools.partial(dj.forecast, num_steps=HORIZON)))(
      batch, np.stack(seqs), np.stack(masks))
  for u in range(3):
    single, _ = _forecast_and_log_likelihood(models[u], seqs[u], masks[u], num_steps=HORIZON)
    for name in dj.Forecast._fields:
      np.testing.assert_allclose(getattr(batched, name)[u], getattr(single, name), atol=1e-12)


@jax.jit
def _forecast_loss_and_grad(model, obs, mask, target):
  """Cross-entropy of ``target`` under the one-step forecast, and its gradient."""

  def loss(model):
    got = dj.forecast(model, obs, mask, 5)
    return -jnp.sum(target * jnp.log(got.observation_mean[0])), got

  return jax.value_and_grad(loss, has_aux=True)(model)


def test_float32_long_sequence_is_stable_and_differentiable():
  rng = np.random.default_rng(8)
  model = random_hsmm(rng, 3, 6, "poisson", "multinomial")
  obs = random_obs("multinomial", rng, 400)
  obs = obs / obs.sum(-1, keepdims=True)          # strength vectors, as in the application
  mask = np.ones(400, bool)
  model32 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), model)
  (_, got), grads = _forecast_loss_and_grad(model32, obs.astype(np.float32), mask, obs[-1])
  want = _forecast(model, obs, mask, num_steps=5)
  assert got.state_probs.dtype == got.observation_mean.dtype == jnp.float32
  np.testing.assert_allclose(got.state_probs.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(got.state_probs, want.state_probs, atol=1e-4)
  np.testing.assert_allclose(got.observation_mean, want.observation_mean, atol=1e-4)
  # Networks are trained through forecasts (Table 2): every gradient is finite.
  for leaf in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(leaf))
  assert np.any(np.asarray(grads.duration.rate) != 0)


# ---------------------------------------------------------------- bad input


# The jax array is built in the test (int64 under x64), not at import.
@pytest.mark.parametrize("num_steps", [0, -2, 2.0, True, lambda: jnp.array(3)])
def test_bad_num_steps(num_steps):
  num_steps = num_steps() if callable(num_steps) else num_steps
  model = random_hmm("categorical", np.random.default_rng(0), 2)
  with pytest.raises(ValueError, match="num_steps"):
    dj.forecast(model, np.array([0, 1]), np.ones(2, bool), num_steps)


def test_bad_sequence_inputs():
  rng = np.random.default_rng(0)
  model = random_hsmm(rng, 2, 3)
  with pytest.raises(ValueError, match="no valid step"):
    dj.forecast(model, np.array([0, 1]), np.zeros(2, bool), 2)
  with pytest.raises(ValueError, match="out of range"):
    dj.forecast(model, np.array([0, 9]), np.ones(2, bool), 2)
