"""Tests of the explicit-duration HSMM against brute force and the dense HMM."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp

import dennl_jax as dj
from dennl_jax import _dispatch
from dennl_jax.durations import CategoricalDuration, PoissonDuration
from dennl_jax.hsmm import HSMM
from dennl_jax.oracles import expand_to_hmm, expanded_em_update, expanded_posterior

pytestmark = pytest.mark.x64


# ---------------------------------------------------------------- helpers


# Models and observations are drawn with numpy: eager jax.random calls each
# compile, which dominates a small test's runtime.


def random_transition(rng, num_states):
  raw = rng.dirichlet(np.ones(num_states - 1), num_states)
  return jnp.asarray(np.stack([np.insert(raw[k], k, 0.0) for k in range(num_states)]))


def random_duration(rng, family, num_states, max_duration):
  if family == "poisson":
    return PoissonDuration(jnp.asarray(rng.uniform(0.3, 3.0, num_states)), max_duration)
  return CategoricalDuration(jnp.asarray(rng.dirichlet(np.ones(max_duration), num_states)))


def random_emission(rng, family, num_states):
  if family == "categorical":
    return dj.Categorical(jnp.asarray(rng.dirichlet(np.ones(4), num_states)))
  half = 0.3 * rng.normal(size=(num_states, 2, 2))
  cov = half @ np.swapaxes(half, 1, 2) + np.eye(2)
  return dj.Gaussian(jnp.asarray(2.0 * rng.normal(size=(num_states, 2))), jnp.asarray(cov))


def random_hsmm(seed, num_states, max_duration, duration="poisson", emission="categorical"):
  rng = np.random.RandomState(seed)
  return HSMM(jnp.asarray(rng.dirichlet(np.ones(num_states))),
              random_transition(rng, num_states),
              random_duration(rng, duration, num_states, max_duration),
              random_emission(rng, emission, num_states))


def random_obs(seed, model, num_steps):
  rng = np.random.RandomState(seed)
  if isinstance(model.emission, dj.Categorical):
    return jnp.asarray(rng.randint(0, model.emission.num_symbols, num_steps))
  return jnp.asarray(rng.normal(size=(num_steps, 2)) * 2.0)


def brute_force(hsmm, obs, mask):
  """Enumerate every state path of the compressed sequence.

  A maximal run of equal states is one segment (zero diagonal); non-final
  segments of length l contribute p(l), the final (right-censored) one the
  survivor P(d >= l).  Returns log-likelihood, marginals (T', K), MAP path,
  and expected initial / transition / duration counts.
  """
  mask = np.asarray(mask)
  valid_obs = np.asarray(obs)[mask]
  num_steps = valid_obs.shape[0]
  num_states, max_duration = hsmm.num_states, hsmm.max_duration
  log_b = np.asarray(hsmm.emission.log_likelihoods(jnp.asarray(valid_obs)))
  dur = np.exp(np.asarray(hsmm.duration.log_probs()))
  surv = np.cumsum(dur[:, ::-1], axis=1)[:, ::-1]
  with np.errstate(divide="ignore"):
    log_pi, log_a = np.log(np.asarray(hsmm.initial)), np.log(np.asarray(hsmm.transition))
    log_dur, log_surv = np.log(dur), np.log(surv)
  paths, scores, runs_of = [], [], []
  for path in itertools.product(range(num_states), repeat=num_steps):
    runs = [[k, len(list(g))] for k, g in itertools.groupby(path)]
    if any(length > max_duration for _, length in runs):
      continue
    score = log_pi[path[0]] + sum(log_b[t, s] for t, s in enumerate(path))
    for (k, length), (j, _) in zip(runs[:-1], runs[1:]):
      score += log_dur[k, length - 1] + log_a[k, j]
    k_last, l_last = runs[-1]
    score += log_surv[k_last, l_last - 1]
    paths.append(path)
    scores.append(score)
    runs_of.append(runs)
  scores = np.array(scores)
  ll = logsumexp(scores)
  post = np.exp(scores - ll)
  marginals = np.zeros((num_steps, num_states))
  init = np.zeros(num_states)
  trans = np.zeros((num_states, num_states))
  dur_counts = np.zeros((num_states, max_duration))
  for path, runs, w in zip(paths, runs_of, post):
    marginals[np.arange(num_steps), path] += w
    init[path[0]] += w
    for (k, length), (j, _) in zip(runs[:-1], runs[1:]):
      trans[k, j] += w
      dur_counts[k, length - 1] += w
    k_last, l_last = runs[-1]
    # The censored segment's drawn duration d >= l has posterior p(d) / S(l).
    tail = dur[k_last, l_last - 1:] / surv[k_last, l_last - 1]
    dur_counts[k_last, l_last - 1:] += w * tail
  best = np.array(paths[int(np.argmax(scores))])
  return dict(ll=ll, marginals=marginals, viterbi=best, initial=init, transition=trans,
              duration=dur_counts)


@jax.jit
def _all_outputs(model, obs, mask):
  return (dj.posterior(model, obs, mask), dj.viterbi(model, obs, mask),
          dj.log_likelihood(model, obs, mask))


def _leaves_close(a, b, atol):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


# ---------------------------------------------------------------- brute force


@pytest.mark.parametrize("num_states,max_duration,num_steps,duration,masked", [
    (2, 3, 7, "poisson", False),
    (2, 4, 7, "categorical", True),
    (3, 4, 6, "categorical", False),
    (3, 2, 7, "poisson", True),
])
def test_brute_force(num_states, max_duration, num_steps, duration, masked):
  model = random_hsmm(num_states * 10 + max_duration, num_states, max_duration, duration)
  obs = random_obs(7, model, num_steps)
  mask = np.ones(num_steps, bool)
  if masked:
    mask[[0, 3]] = False
  mask = jnp.asarray(mask)
  expect = brute_force(model, obs, mask)
  post, path, ll = _all_outputs(model, obs, mask)
  np.testing.assert_allclose(ll, expect["ll"], rtol=1e-10)
  np.testing.assert_allclose(post.log_likelihood, expect["ll"], rtol=1e-10)
  valid = np.asarray(mask)
  np.testing.assert_allclose(post.smoothed_probs[valid], expect["marginals"], atol=1e-10)
  np.testing.assert_array_equal(np.asarray(path)[valid], expect["viterbi"])
  np.testing.assert_allclose(post.initial_probs, expect["initial"], atol=1e-10)
  np.testing.assert_allclose(post.transition_counts, expect["transition"], atol=1e-10)
  np.testing.assert_allclose(post.duration_counts, expect["duration"], atol=1e-10)
  # Filtered marginal at the last valid step equals the smoothed one there.
  last = np.nonzero(valid)[0][-1]
  np.testing.assert_allclose(post.filtered_probs[last], expect["marginals"][-1], atol=1e-10)


def test_viterbi_uses_censored_survivor():
  """A case where max over remaining duration and the survivor disagree.

  State 0 has durations {1: .5, 3: .5}; state 1 has {2: .4, 3: .3, 4: .3}.
  Uninformative emissions, 2 steps: the censored path 1,1 scores S_1(2) = 1
  while the countdown-Viterbi score max_d p_1(d >= 2) = .4 would lose to 0,0.
  """
  initial = jnp.array([0.5, 0.5])
  transition = jnp.array([[0.0, 1.0], [1.0, 0.0]])
  durations = CategoricalDuration(jnp.array([[0.5, 0.0, 0.5, 0.0], [0.0, 0.4, 0.3, 0.3]]))
  model = HSMM(initial, transition, durations, dj.Categorical(jnp.full((2, 2), 0.5)))
  obs, mask = jnp.array([0, 1]), jnp.ones(2, bool)
  expect = brute_force(model, obs, mask)
  np.testing.assert_array_equal(dj.viterbi(model, obs, mask), expect["viterbi"])
  np.testing.assert_array_equal(expect["viterbi"], [1, 1])


# ---------------------------------------------------------------- dense oracle


@jax.jit
def _dense_comparison(model, obs, mask):
  dense = expand_to_hmm(model)
  num_steps, num_states, max_duration = obs.shape[0], model.num_states, model.max_duration
  dense_marg = dj.smoothed_posteriors(dense, obs, mask).reshape(
      num_steps, num_states, max_duration).sum(-1)
  return (dj.posterior(model, obs, mask), expanded_posterior(model, obs, mask),
          dj.log_likelihood(dense, obs, mask), dense_marg,
          dj.em_step_with_log_likelihood(model, obs, mask),
          expanded_em_update(model, obs, mask))


@pytest.mark.parametrize("duration,emission", [
    ("categorical", "categorical"), ("poisson", "gaussian")])
def test_matches_expanded_hmm(duration, emission):
  model = random_hsmm(3, 3, 5, duration, emission)
  obs = random_obs(4, model, 20)
  mask = jnp.ones(20, bool).at[jnp.array([0, 6, 7, 19])].set(False)
  dj.validate(expand_to_hmm(model), obs, mask)
  (post, dense_post, dense_ll_public, dense_marg, (new, ll),
   (dense_new, dense_ll)) = _dense_comparison(model, obs, mask)
  for name in post._fields:
    np.testing.assert_allclose(getattr(post, name), getattr(dense_post, name), atol=1e-6,
                               err_msg=name)
  # The engine's public HMM functions on the explicitly expanded model.
  np.testing.assert_allclose(dense_ll_public, post.log_likelihood, rtol=1e-10)
  valid = np.asarray(mask)
  np.testing.assert_allclose(dense_marg[valid], post.smoothed_probs[valid], atol=1e-6)
  # One EM step of every parameter, the dense HMM's counts mapped back.
  np.testing.assert_allclose(ll, dense_ll, rtol=1e-10)
  _leaves_close(new, dense_new, atol=1e-6)
  assert not np.allclose(new.duration.log_probs(), model.duration.log_probs(), atol=1e-3)


# ---------------------------------------------------------------- masks


@jax.jit
def _padding_outputs(model, obs, mask):
  return _all_outputs(model, obs, mask) + (dj.em_step(model, obs, mask),)


def test_padding_anywhere_equals_compressed():
  model = random_hsmm(11, 3, 6, "poisson", "gaussian")
  obs = random_obs(12, model, 12)
  compact_mask = jnp.ones(12, bool)
  padded_mask = np.zeros(20, bool)
  positions = np.array([2, 3, 4, 7, 8, 9, 10, 13, 15, 16, 17, 18])   # leading, inner, trailing
  padded_mask[positions] = True
  # Garbage in padding must not matter (not even NaN).
  padded_obs = jnp.full((20, 2), jnp.nan).at[positions].set(obs)
  padded_mask = jnp.asarray(padded_mask)
  dj.validate(model, padded_obs, padded_mask)
  post_c, path_c, ll_c, em_c = _padding_outputs(model, obs, compact_mask)
  post_p, path_p, ll_p, em_p = _padding_outputs(model, padded_obs, padded_mask)
  np.testing.assert_allclose(ll_p, ll_c, rtol=1e-12)
  np.testing.assert_allclose(post_p.smoothed_probs[positions], post_c.smoothed_probs,
                             atol=1e-12)
  np.testing.assert_allclose(post_p.filtered_probs[positions], post_c.filtered_probs,
                             atol=1e-12)
  for name in ("transition_counts", "initial_probs", "duration_counts"):
    np.testing.assert_allclose(getattr(post_p, name), getattr(post_c, name), atol=1e-12)
  np.testing.assert_array_equal(np.asarray(path_p)[positions], path_c)
  # Masked steps carry the state: the previous valid step's (or, before the
  # first valid step, the first valid step's) posterior and decoded state.
  carried = np.maximum(np.cumsum(np.asarray(padded_mask)) - 1, 0)
  np.testing.assert_allclose(post_p.smoothed_probs, post_c.smoothed_probs[carried],
                             atol=1e-12)
  np.testing.assert_array_equal(path_p, np.asarray(path_c)[carried])
  _leaves_close(em_p, em_c, 1e-12)


# ---------------------------------------------------------------- duration families


def test_poisson_m_step_is_truncated_mle():
  rate = jnp.array([0.5, 4.0, 9.0])
  family = PoissonDuration(jnp.ones(3), 8)        # truncation matters for rate 9
  counts = 50.0 * jnp.exp(PoissonDuration(rate, 8).log_probs())
  np.testing.assert_allclose(family.m_step(counts).rate, rate, rtol=1e-8)
  # The plain moment estimate would be biased low where the tail is cut.
  moment = (counts * jnp.arange(8)).sum(-1) / counts.sum(-1)
  assert moment[2] < 0.9 * rate[2]
  # Untouched rows keep their rate; a zero mean gives a (floored) zero rate.
  empty = family.m_step(jnp.zeros((3, 8)).at[1, 0].set(2.0))
  np.testing.assert_allclose(empty.rate[jnp.array([0, 2])], 1.0)
  assert 0 < empty.rate[1] < 1e-300


@pytest.mark.parametrize("start", [1.0, 300.0])
def test_poisson_m_step_converges_to_round_off(start):
  """The Newton loop stops on a tolerance and then takes two more steps: the fitted
  truncated mean equals the counts' mean to float64 round-off, also where the start
  is far off (heavy truncation, rates 55 and 200 on D = 60, need ~10 clipped steps)."""
  max_duration = 60
  rate = jnp.array([0.3, 20.0, 55.0, 200.0])
  counts = 7.0 * jnp.exp(PoissonDuration(rate, max_duration).log_probs())
  fitted = PoissonDuration(jnp.full(4, start), max_duration).m_step(counts)
  shifted = jnp.arange(max_duration)
  fitted_mean = jnp.exp(fitted.log_probs()) @ shifted
  target = (counts @ shifted) / counts.sum(-1)
  np.testing.assert_allclose(fitted_mean, target, rtol=1e-13)
  np.testing.assert_allclose(fitted.rate, rate, rtol=1e-9)


def test_poisson_log_probs():
  family = PoissonDuration(jnp.array([2.0, 0.7]), 50)
  d = np.arange(1, 51)
  from scipy.stats import poisson
  np.testing.assert_allclose(np.exp(family.log_probs()),
                             [poisson.pmf(d - 1, 2.0), poisson.pmf(d - 1, 0.7)], atol=1e-12)


def test_categorical_duration_m_step():
  family = CategoricalDuration(jnp.full((2, 3), 1 / 3))
  new = family.m_step(jnp.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]]))
  np.testing.assert_allclose(new.probs, [[0.25, 0.75, 0.0], [1 / 3, 1 / 3, 1 / 3]])


# ---------------------------------------------------------------- sampling


def test_sample_deterministic_and_valid():
  model = HSMM(jnp.array([0.2, 0.3, 0.5]), random_transition(np.random.RandomState(0), 3),
               PoissonDuration(jnp.array([1.0, 4.0, 8.0]), 12),
               dj.Categorical(jnp.array([[0.5, 0.5], [0.1, 0.9], [0.9, 0.1]])))
  model.check_parameters()
  draw = jax.jit(lambda key: dj.sample(key, model, 3000))
  s1, o1 = draw(jax.random.PRNGKey(5))
  s2, o2 = draw(jax.random.PRNGKey(5))
  s3, _ = draw(jax.random.PRNGKey(6))
  np.testing.assert_array_equal(s1, s2)
  np.testing.assert_array_equal(o1, o2)
  assert not np.array_equal(s1, s3)
  assert s1.dtype == jnp.int32 and s1.shape == (3000,)
  runs = [(k, len(list(g))) for k, g in itertools.groupby(np.asarray(s1))][:-1]
  assert max(length for _, length in runs) <= 12
  dur = np.exp(np.asarray(model.duration.log_probs()))
  for k in range(3):
    lengths = np.array([length for s, length in runs if s == k])
    expected = dur[k] @ np.arange(1, 13)
    std = np.sqrt(dur[k] @ (np.arange(1, 13) - expected)**2)
    assert abs(lengths.mean() - expected) < 4 * std / np.sqrt(len(lengths))


# ---------------------------------------------------------------- validation


def _valid_model():
  return HSMM(jnp.array([0.5, 0.5]), jnp.array([[0.0, 1.0], [1.0, 0.0]]),
              PoissonDuration(jnp.array([1.0, 2.0]), 5),
              dj.Categorical(jnp.array([[0.9, 0.1], [0.2, 0.8]])))


@pytest.mark.parametrize("change,message", [
    (lambda m: m.replace(transition=jnp.array([[0.1, 0.9], [1.0, 0.0]])), "zero diagonal"),
    (lambda m: m.replace(transition=jnp.array([[0.0, 0.8], [1.0, 0.0]])), "sum to 1"),
    (lambda m: m.replace(initial=jnp.array([0.7, 0.7])), "HSMM.initial"),
    (lambda m: m.replace(duration=PoissonDuration(jnp.array([1.0, -2.0]), 5)), "rate"),
    (lambda m: m.replace(duration=PoissonDuration(jnp.array([1.0, 2.0]), 0)), "max_duration"),
    (lambda m: m.replace(duration=PoissonDuration(jnp.array([1.0, 2.0, 3.0]), 5)),
     "duration has 3 states"),
    (lambda m: m.replace(duration=CategoricalDuration(jnp.array([[0.5, 0.6], [1.0, 0.0]]))),
     "CategoricalDuration.probs"),
    (lambda m: m.replace(emission=dj.Categorical(jnp.array([[0.9, 0.2], [0.2, 0.8]]))),
     "Categorical.probs"),
])
def test_validation_errors(change, message):
  model = _valid_model()
  obs, mask = jnp.array([0, 1, 1]), jnp.ones(3, bool)
  dj.validate(model, obs, mask)
  with pytest.raises(ValueError, match=message):
    dj.validate(change(model), obs, mask)


def test_validation_of_observations_and_mask():
  model = _valid_model()
  bad_diagonal = model.replace(transition=jnp.array([[0.5, 0.5], [1.0, 0.0]]))
  with pytest.raises(ValueError, match="zero diagonal"):
    dj.log_likelihood(bad_diagonal, jnp.array([0, 1, 1]), jnp.ones(3, bool))
  with pytest.raises(ValueError, match="out of range"):
    dj.em_step(model, jnp.array([0, 2, 1]), jnp.ones(3, bool))
  with pytest.raises(ValueError, match="no valid step"):
    dj.viterbi(model, jnp.array([0, 1, 1]), jnp.zeros(3, bool))


def test_unconstrained_round_trip():
  model = random_hsmm(2, 3, 4, "poisson", "gaussian")
  model = model.replace(transition=model.transition.at[0, 1].set(0.0).at[0, 2].set(1.0))
  for m in (model, model.replace(duration=random_duration(np.random.RandomState(1),
                                                          "categorical", 3, 4))):
    theta = m.to_unconstrained()
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(theta))
    back = m.from_unconstrained(theta)
    _leaves_close(back, m, atol=1e-10)
    noisy = m.from_unconstrained(jax.tree_util.tree_map(lambda x: x + 0.3, theta))
    assert np.all(np.diagonal(np.asarray(noisy.transition)) == 0.0)
    noisy.check_parameters()


# ---------------------------------------------------------------- EM


@pytest.mark.slow
def test_fit_em_monotone_and_recovers_durations():
  true_rates = np.array([3.0, 6.0, 10.0])
  true = HSMM(jnp.full(3, 1 / 3), jnp.array([[0.0, 0.6, 0.4], [0.5, 0.0, 0.5],
                                             [0.7, 0.3, 0.0]]),
              PoissonDuration(jnp.asarray(true_rates), 30),
              dj.DiagGaussian(jnp.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]]),
                              jnp.ones((3, 2))))
  num_users, num_steps = 200, 100
  states, obs = jax.jit(jax.vmap(lambda k: true.sample(k, num_steps)))(
      jax.random.split(jax.random.PRNGKey(0), num_users))
  mask = jnp.ones((num_users, num_steps), bool)
  start = HSMM(jnp.array([0.4, 0.3, 0.3]), jnp.array([[0.0, 0.5, 0.5], [0.5, 0.0, 0.5],
                                                      [0.5, 0.5, 0.0]]),
               PoissonDuration(jnp.array([5.0, 5.0, 5.0]), 30),
               dj.DiagGaussian(jnp.array([[0.5, -0.5], [2.0, 0.5], [-0.5, 2.0]]),
                               2.0 * jnp.ones((3, 2))))
  starts = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (num_users,) + x.shape), start)
  fitted, trace = dj.fit_em(starts, obs, mask, 30)
  trace = np.asarray(trace)
  assert np.all(np.diff(trace, axis=1) >= -1e-9 * np.abs(trace[:, 1:])), \
      np.diff(trace, axis=1).min()
  decoded = np.asarray(jax.jit(jax.vmap(dj.viterbi))(fitted, obs, mask))
  states = np.asarray(states)
  rates = np.asarray(fitted.duration.rate)
  matched_rates, correct = [], 0
  for u in range(num_users):
    confusion = np.zeros((3, 3))
    np.add.at(confusion, (states[u], decoded[u]), 1)
    rows, cols = linear_sum_assignment(-confusion)
    correct += confusion[rows, cols].sum()
    matched_rates.append(rates[u][cols])
  accuracy = correct / states.size
  # Each user is fitted separately (fit_em); the rate estimate is the mean
  # over users of the label-matched per-user rates.
  mean_rates = np.mean(matched_rates, axis=0)
  print(f"accuracy {accuracy:.4f}, mean fitted rates {mean_rates}")
  assert accuracy >= 0.95, accuracy
  np.testing.assert_allclose(mean_rates, true_rates, rtol=0.10)


def test_float32_long_sequence_is_stable():
  model = random_hsmm(8, 3, 6, "poisson", "categorical")
  obs = random_obs(9, model, 20000)
  mask = jnp.ones(20000, bool)
  loglik = jax.jit(lambda m, o, k: m.log_likelihood(o, k))
  ll64 = loglik(model, obs, mask)
  model32 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), model)
  ll32 = loglik(model32, obs, mask)
  assert np.isfinite(ll32)
  np.testing.assert_allclose(ll32, ll64, rtol=1e-4)


def test_fit_em_monotone_categorical_durations_with_padding():
  num_users, num_steps = 8, 40
  models = [random_hsmm(100 + u, 3, 6, "categorical", "categorical") for u in range(num_users)]
  batch = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *models)
  obs = jnp.stack([random_obs(200 + u, models[0], num_steps) for u in range(num_users)])
  lengths = np.random.RandomState(0).randint(10, num_steps + 1, num_users)
  mask = jnp.asarray(np.arange(num_steps)[None, :] < lengths[:, None])
  fitted, trace = dj.fit_em(batch, obs, mask, 15)
  trace = np.asarray(trace)
  assert np.all(np.diff(trace, axis=1) >= -1e-10 * np.abs(trace[:, 1:])), \
      np.diff(trace, axis=1).min()
  assert np.all(trace[:, -1] > trace[:, 0])
  fitted_u0 = jax.tree_util.tree_map(lambda x: x[0], fitted)
  fitted_u0.check_parameters()


@pytest.mark.parametrize("kernels", ["users_minor", "auto"])
def test_score_vjp_of_vmapped_hsmms_takes_the_kernel_jvp_where_chosen(kernels):
  """The backward pass of the score VJP (``em_step(score_vjp=True)``, the exact EM
  layer) of a vmapped HSMM runs the users-minor kernel's JVP where the model's
  ``kernels`` choice says so (``"users_minor"``; ``"auto"``: the backend's table):
  the gradient's jaxpr then holds more of its (D, K, U) carries than the values'
  jaxpr.  Plain derivatives (``grad`` of ``posterior``) differentiate the
  per-sequence code, values included: no kernel carry in their jaxpr."""
  num_states, max_duration, num_users, num_steps = 3, 4, 5, 6
  models = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[
      random_hsmm(seed, num_states, max_duration) for seed in range(num_users)])
  obs = jnp.stack([random_obs(seed, models, num_steps) for seed in range(num_users)])
  mask = jnp.ones((num_users, num_steps), bool)
  models = models.replace(kernels=kernels)
  kernel_jvp = dj.Kernels(kernels).users_minor() and dj.Kernels(kernels).kernel_jvp(
      _dispatch.HSMM_KERNEL_JVP_BACKENDS)
  carry = f"f64[{max_duration},{num_states},{num_users}]"
  step = jax.vmap(lambda m, o, k: dj.em_step(m, o, k, score_vjp=True))
  score_loss = lambda m: jnp.sum(step(m, obs, mask).transition ** 2)
  values = str(jax.make_jaxpr(score_loss)(models)).count(carry)
  gradient = str(jax.make_jaxpr(jax.grad(score_loss))(models)).count(carry)
  assert values > 0 and (gradient > values if kernel_jvp else gradient == values)
  plain_loss = lambda m: jnp.sum(jax.vmap(dj.posterior)(m, obs, mask).smoothed_probs ** 2)
  assert str(jax.make_jaxpr(plain_loss)(models)).count(carry) > 0
  assert str(jax.make_jaxpr(jax.grad(plain_loss))(models)).count(carry) == 0
