"""Gradients through the M-steps stay finite and correct.

The EM layer is differentiated end to end, so every M-step must have a
finite, correct derivative even when a state has (almost) no posterior
mass -- the common case with many states on short sequences.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dennl_jax as dj

pytestmark = pytest.mark.x64


def _central_jacobian(fn, x, eps=1e-6):
  x = np.asarray(x, np.float64)
  cols = []
  for idx in np.ndindex(x.shape):
    step = np.zeros_like(x)
    step[idx] = eps
    cols.append((np.asarray(fn(x + step)) - np.asarray(fn(x - step))) / (2 * eps))
  return np.stack(cols, axis=-1).reshape(np.shape(fn(x)) + x.shape)


@pytest.mark.parametrize("max_duration", [3, 12])
def test_poisson_duration_m_step_jacobian_matches_finite_differences(max_duration):
  rng = np.random.default_rng(max_duration)
  family = dj.PoissonDuration(jnp.array([2.0, 5.0, 0.5]), max_duration)
  counts = jnp.asarray(rng.gamma(1.0, 1.0, (3, max_duration)))
  # Jitted: eager dispatch recompiled the M-step's ops for each of the 2 x 3 x 12 probes.
  rate = jax.jit(lambda c: family.m_step(jnp.asarray(c)).rate)
  exact = jax.jit(jax.jacobian(rate))(counts)
  numeric = _central_jacobian(rate, counts)
  np.testing.assert_allclose(exact, numeric, atol=1e-7)


def _nearly_empty_state_hmm():
  # State 2 emits far from every observation, so its posterior mass is ~1e-30.
  emission = dj.Gaussian(jnp.array([[0.0], [3.0], [80.0]]), jnp.ones((3, 1, 1)),
                         min_covar=1e-3)
  return dj.HMM(jnp.array([0.5, 0.45, 0.05]), jnp.full((3, 3), 1 / 3), emission)


def _leaf_sum(tree):
  return sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(tree))


def _all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


def test_em_step_gradient_finite_with_nearly_empty_state():
  hmm = _nearly_empty_state_hmm()
  obs = jnp.array([[0.1], [2.9], [0.2], [3.1], [0.0]])
  mask = jnp.ones(5, bool)
  assert float(dj.posterior(hmm, obs, mask).smoothed_probs[:, 2].sum()) < 1e-20
  grads = jax.jit(jax.grad(lambda p: _leaf_sum(dj.em_step(p, obs, mask))))(hmm)
  assert _all_finite(grads)


def test_hsmm_em_step_gradient_finite_with_nearly_empty_state():
  hmm = _nearly_empty_state_hmm()
  transition = jnp.array([[0.0, 0.9, 0.1], [0.9, 0.0, 0.1], [0.5, 0.5, 0.0]])
  hsmm = dj.HSMM(hmm.initial, transition, dj.PoissonDuration(jnp.array([1.0, 2.0, 3.0]), 6),
                 hmm.emission)
  obs = jnp.array([[0.1], [0.0], [2.9], [3.1], [0.2], [0.1], [3.0]])
  mask = jnp.ones(7, bool)
  grads = jax.jit(jax.grad(lambda p: _leaf_sum(dj.em_step(p, obs, mask))))(hsmm)
  assert _all_finite(grads)
  layer_grads = jax.jit(jax.grad(lambda p: _leaf_sum(
      dj.em_layer(p, obs, mask, jax.random.PRNGKey(0), gradient="exact"))))(hsmm)
  assert _all_finite(layer_grads)


def _tiny_normaliser_models():
  # float32, state 1 has prior 1e-26 and is the only one likely to emit symbol 1:
  # the first step's normaliser is ~1e-26, whose square underflows to 0 (the
  # derivative of x / c in c is -x * c**-2 = inf * 0 = NaN) while the
  # log-likelihood is finite.
  f32 = jnp.float32
  emission = dj.Categorical(jnp.array([[1.0, 1e-30], [1e-30, 1.0]], f32))
  initial = jnp.array([1.0, 1e-26], f32)
  hmm = dj.HMM(initial, jnp.array([[1 - 1e-7, 1e-7], [1e-7, 1 - 1e-7]], f32), emission)
  hsmm = dj.HSMM(initial, jnp.array([[0.0, 1.0], [1.0, 0.0]], f32),
                 dj.PoissonDuration(jnp.array([50.0, 50.0], f32), 4), emission)
  return {"hmm": hmm, "hsmm": hsmm}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hmm", "hsmm"])
def test_gradient_finite_with_tiny_float32_normaliser(kind):
  params = _tiny_normaliser_models()[kind]
  obs = jnp.array([1, 1, 0])
  mask = jnp.ones(3, bool)
  ll = dj.log_likelihood(params, obs, mask)
  assert ll.dtype == jnp.float32 and np.isfinite(float(ll))
  grad = jax.jit(jax.grad(dj.log_likelihood))(params, obs, mask)
  assert _all_finite(grad)
  em_grad = jax.jit(jax.grad(lambda p: _leaf_sum(dj.em_step(p, obs, mask))))(params)
  assert _all_finite(em_grad)
  if kind == "hmm":
    parallel_grad = jax.jit(jax.grad(
        lambda p: _leaf_sum(dj.em_step(p, obs, mask, time_parallel=True))))(params)
    assert _all_finite(parallel_grad)
  # Under jax.vmap with the users-minor kernels, for values and the score VJP's
  # JVP (CPU's default for HMMs differentiates the per-sequence path).
  batch = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), params).replace(
      kernels="users_minor")
  obs_b, mask_b = jnp.stack([obs, obs]), jnp.stack([mask, mask])
  grad_b = jax.jit(jax.grad(
      lambda p: jnp.sum(jax.vmap(dj.log_likelihood)(p, obs_b, mask_b))))(batch)
  em_grad_b = jax.jit(jax.grad(
      lambda p: _leaf_sum(jax.vmap(dj.em_step)(p, obs_b, mask_b))))(batch)
  score_grad_b = jax.jit(jax.grad(lambda p: _leaf_sum(jax.vmap(
      lambda q, o, m: dj.em_step(q, o, m, score_vjp=True))(p, obs_b, mask_b))))(batch)
  assert _all_finite(grad_b)
  assert _all_finite(em_grad_b)
  assert _all_finite(score_grad_b)
  # The finite gradient is the right one: the float64 model's, to float32 accuracy.
  params64 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)
  grad64 = jax.grad(dj.log_likelihood)(params64, obs, mask)
  for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(grad64)):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b), rtol=1e-4, atol=1e-4)
