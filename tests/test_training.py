"""The shared training loop: tiny end-to-end runs whose loss decreases."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import dennl_jax as dj
from dennl_jax import training as Tr
from dennl_jax.codec import ParamCodec
from dennl_jax.durations import PoissonDuration
from dennl_jax.hsmm import HSMM
from dennl_jax.networks import DENNL, EmbeddingMapper

K, O, D, T, E, U = 3, 2, 5, 16, 4, 8


# Train in float32, as the experiments do (see conftest.float32_default).
pytestmark = pytest.mark.usefixtures("float32_default")


@functools.lru_cache(maxsize=None)
def _problem():
  off = ~np.eye(K, dtype=bool)
  truth = HSMM(jnp.ones(K) / K, jnp.where(off, 0.5, 0.0),
               PoissonDuration(jnp.full((K,), 2.0), max_duration=D),
               dj.Gaussian(jnp.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]]),
                           jnp.broadcast_to(0.3 * jnp.eye(O), (K, O, O)), 1e-3))
  _, obs = jax.vmap(lambda k: truth.sample(k, T))(jax.random.split(jax.random.PRNGKey(0), U))
  mask = jnp.ones((U, T), bool)
  emb = jax.random.normal(jax.random.PRNGKey(1), (U, E))
  # A deliberately poor shared start so there is something to learn.
  start = HSMM(jnp.ones(K) / K, jnp.where(off, 0.5, 0.0),
               PoissonDuration(jnp.full((K,), 4.0), max_duration=D),
               dj.Gaussian(jnp.array([[1.0, 1.0], [2.0, 1.0], [1.0, 2.0]]),
                           jnp.broadcast_to(2.0 * jnp.eye(O), (K, O, O)), 1e-3))
  return start, Tr.Batch(emb, obs.astype(jnp.float32), mask)


def _run(model, data, steps=25, loss_fn=Tr.likelihood_loss, lr=3e-2):
  trained, history, _ = Tr.train(model, data, loss_fn=loss_fn, optimizer=Tr.make_optimizer(lr),
                              num_steps=steps, batch_size=U, key=jax.random.PRNGKey(2),
                              log_every=0)
  return trained, history


def _eval(model):
  """One jitted likelihood evaluation per model class (eager calls would
  recompile the stage scan every time)."""
  graphdef, _ = nnx.split(model)
  fn = Tr.make_eval_fn(graphdef, Tr.likelihood_loss)
  return lambda m: float(fn(nnx.split(m)[1], _problem()[1], jax.random.PRNGKey(3)))


@pytest.mark.slow
def test_dennl_and_mlp_mapper_losses_decrease():
  start, data = _problem()
  codec = ParamCodec(start)
  dennl = DENNL(codec, start, E, num_stages=2, hidden=(16,), start_hidden=(8,), latent_dim=4,
                  layer=dj.EMLayer(gradient="exact"), rngs=nnx.Rngs(0))
  loss = _eval(dennl)
  before = loss(dennl)
  trained, history = _run(dennl, data, steps=15)
  after = loss(trained)
  assert np.all(np.isfinite(history.loss))
  assert not history.skipped.any()
  assert after < before - 0.05, (before, after)
  assert history.loss[-3:].mean() < history.loss[:3].mean()
  # The module passed in is not modified.
  assert loss(dennl) == before

  mapper = EmbeddingMapper(codec, start, E, hidden=(8,), rngs=nnx.Rngs(0))
  m_loss = _eval(mapper)
  m_before = m_loss(mapper)
  m_trained, _ = _run(mapper, data)
  assert m_loss(m_trained) < m_before - 0.1


@pytest.mark.slow
def test_dennl_spsa_mode_trains():
  """SPSA backward (orthogonal directions, S = 16 < M = 33 parameters per user:
  a genuinely stochastic estimate) lowers the loss as the exact mode does."""
  start, data = _problem()
  codec = ParamCodec(start)
  dennl = DENNL(codec, start, E, num_stages=1, hidden=(16,), start_hidden=(8,), latent_dim=4,
                  layer=dj.EMLayer(gradient="spsa", num_samples=16, perturbation="orthogonal"),
                  rngs=nnx.Rngs(0))
  size = ravel_pytree(start.to_unconstrained())[0].size
  assert size > 16, size
  loss = _eval(dennl)
  before = loss(dennl)
  trained, history = _run(dennl, data, steps=15)
  assert np.all(np.isfinite(history.loss)) and not history.skipped.any()
  assert loss(trained) < before - 0.05, (before, loss(trained))


@pytest.mark.slow
def test_regression_loss_decreases_for_em_mapping():
  start, data = _problem()
  codec = ParamCodec(start)
  target = jnp.broadcast_to(codec.encode(start) + 0.5, (U, codec.size))
  mapper = EmbeddingMapper(codec, start, E, hidden=(8,), rngs=nnx.Rngs(0))
  data = data._replace(target=target)
  before = float(Tr.regression_loss(mapper, data, None))
  trained, _ = _run(mapper, data, steps=30, loss_fn=Tr.regression_loss)
  assert float(Tr.regression_loss(trained, data, None)) < 0.5 * before


def test_loss_is_mean_nll_per_valid_step():
  start, data = _problem()
  batched = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (U,) + x.shape), start)
  mask = data.mask.at[:, -4:].set(False)
  log_likelihood = jax.jit(dj.log_likelihood)
  expected = -sum(float(log_likelihood(start, data.obs[u], mask[u])) for u in range(U))
  got = float(Tr.mean_negative_log_likelihood(batched, data.obs, mask))
  np.testing.assert_allclose(got, expected / float(mask.sum()), rtol=1e-5)


def test_train_step_skips_non_finite_updates():
  start, data = _problem()
  mapper = EmbeddingMapper(ParamCodec(start), start, E, hidden=(8,), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(mapper)
  opt = Tr.make_optimizer()
  step = Tr.make_train_step(graphdef, lambda m, b, k: jnp.nan * Tr.likelihood_loss(m, b, k), opt)
  new_state, _, loss, skipped = step(state, opt.init(state), data, jax.random.PRNGKey(0))
  assert not np.isfinite(float(loss)) and bool(skipped)
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(new_state)):
    np.testing.assert_array_equal(a, b)


def test_heldout_step_loss_scores_hidden_steps_only():
  start, data = _problem()
  mapper = EmbeddingMapper(ParamCodec(start), start, E, hidden=(8,), rngs=nnx.Rngs(0))
  key = jax.random.PRNGKey(7)
  got = float(Tr.heldout_step_loss(mapper, data, key, holdout=0.25))
  held = data.mask & (jax.random.uniform(jax.random.fold_in(key, 1), data.mask.shape) < 0.25)
  assert 0 < int(held.sum()) < held.size
  params = mapper(data.embedding)
  total = 0.0
  log_likelihood = jax.jit(dj.log_likelihood)
  for u in range(U):
    user = jax.tree_util.tree_map(lambda x: x[u], params)
    total += float(log_likelihood(user, data.obs[u], data.mask[u]))
    total -= float(log_likelihood(user, data.obs[u], data.mask[u] & ~held[u]))
  np.testing.assert_allclose(got, -total / float(held.sum()), rtol=1e-4)


def test_heldout_loss_floor_makes_impossible_hidden_steps_finite():
  # A categorical HMM that gives symbol 2 probability exactly 0 (as plain EM
  # does for a symbol the visible steps never show), observed on a hidden step.
  hmm = dj.HMM(jnp.array([0.5, 0.5]), jnp.array([[0.9, 0.1], [0.2, 0.8]]),
               dj.Categorical(jnp.array([[0.7, 0.3, 0.0], [0.4, 0.6, 0.0]])))
  params = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (2,) + x.shape), hmm)
  obs = jnp.array([[0, 1, 2, 0], [1, 1, 0, 0]])
  mask = jnp.ones((2, 4), bool)
  visible = mask.at[0, 2].set(False).at[1, 0].set(False)
  heldout_nll = jax.jit(Tr.heldout_nll, static_argnames="floor")   # eager: 270 compilations
  assert not np.isfinite(float(heldout_nll(params, obs, mask, visible, floor=False)))
  assert np.isfinite(float(heldout_nll(params, obs, mask, visible)))
  first = jax.tree_util.tree_map(lambda x: x[:1], params)
  # User 0's one hidden step alone: -log(1e-6) ~ 13.8, heavily penalised but finite.
  assert 10.0 < float(heldout_nll(first, obs[:1], mask[:1], visible[:1])) < 20.0
  grad = jax.jit(jax.grad(lambda p: Tr.heldout_nll(p, obs, mask, visible)))(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grad))
  # Without zeros the floor changes nothing (user 1's hidden step is possible).
  np.testing.assert_allclose(
      float(heldout_nll(jax.tree_util.tree_map(lambda x: x[1:], params), obs[1:], mask[1:],
                           visible[1:], floor=False)),
      float(heldout_nll(jax.tree_util.tree_map(lambda x: x[1:], params), obs[1:], mask[1:],
                           visible[1:])), rtol=1e-5)


def test_rate_in_state_optimizer_matches_constant_rate():
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grads = {"w": jnp.array([0.5, 0.1, -0.3])}
  out = []
  for rate_in_state in (False, True):
    opt = Tr.make_optimizer(3e-2, rate_in_state=rate_in_state)
    state, p = opt.init(params), params
    for _ in range(3):
      updates, state = opt.update(grads, state, p)
      p = jax.tree_util.tree_map(lambda a, b: a + b, p, updates)
    out.append(p["w"])
  np.testing.assert_allclose(out[0], out[1], rtol=1e-6)


@pytest.mark.slow
def test_early_stopping_returns_the_best_validated_model():
  start, data = _problem()
  mapper = EmbeddingMapper(ParamCodec(start), start, E, hidden=(8,), rngs=nnx.Rngs(0))
  loss = _eval(mapper)
  seen = []

  def score(model):
    seen.append(loss(model))
    return seen[-1]

  common = dict(loss_fn=Tr.likelihood_loss, optimizer=Tr.make_optimizer(3e-2), num_steps=12,
                batch_size=U, key=jax.random.PRNGKey(2), log_every=0, eval_every=4,
                eval_fn=score)
  best, history, fit = Tr.train(mapper, data, mode="min", **common)
  assert len(seen) == 4 and [int(c[0]) for c in fit.curve] == [0, 4, 8, 12]
  assert loss(best) == min(seen) == fit.best_value
  assert fit.best_step == 4 * int(np.argmin(seen)) and len(history.loss) == 12
  # Scored to be maximised, a loss that training lowers keeps the untrained start.
  seen.clear()
  worst, _, fit = Tr.train(mapper, data, mode="max", **common)
  assert fit.best_step == 0 and seen[0] == max(seen) > min(seen)
  for a, b in zip(jax.tree_util.tree_leaves(nnx.state(worst)),
                  jax.tree_util.tree_leaves(nnx.state(mapper))):
    np.testing.assert_array_equal(a, b)


def test_make_optimizer_b1_is_adams_first_moment_decay():
  """The update after gradients +1 then -1 equals Adam's formula with the given b1
  (b2 = 0.999, eps = 1e-8, clipping inactive); an out-of-range b1 is refused."""
  params = {"w": jnp.zeros(())}
  for b1 in (0.9, 0.99):
    opt = Tr.make_optimizer(1.0, b1=b1, rate_in_state=True)
    state = opt.init(params)
    m = v = 0.0
    for t, g in enumerate((1.0, -1.0), start=1):
      updates, state = opt.update({"w": jnp.asarray(g)}, state, params)
      m, v = b1 * m + (1 - b1) * g, 0.999 * v + 0.001 * g * g
    want = -(m / (1 - b1 ** 2)) / (np.sqrt(v / (1 - 0.999 ** 2)) + 1e-8)
    np.testing.assert_allclose(float(updates["w"]), want, rtol=1e-5)
  with pytest.raises(ValueError, match="b1 must be in"):
    Tr.make_optimizer(1e-3, b1=1.0)
