"""SPSA / forward-gradient custom VJPs, alone and on the EM map.

Oracles: exact reverse-mode VJPs, central finite differences in float64, and
the statistics of the estimators (unbiasedness as a z-test over many keys,
error ~ 1/sqrt(N), finite-difference bias ~ c^2 as Theorem 1 states).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dennl_jax as dj
from dennl_jax import estimators as sp
from dennl_jax.layer import _em_of_unconstrained

pytestmark = pytest.mark.x64

K, V, T = 3, 4, 25


def _tree_vec(tree):
  return jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def _random_hmm(key, num_states=K, num_symbols=V):
  ka, kb, kc = jax.random.split(key, 3)
  return dj.HMM(jax.random.dirichlet(ka, jnp.ones(num_states)),
                jax.random.dirichlet(kb, jnp.ones(num_states) * 2.0, (num_states,)),
                dj.Categorical(jax.random.dirichlet(kc, jnp.ones(num_symbols), (num_states,))))


@functools.lru_cache(maxsize=None)
def _problem(seed=0):
  key = jax.random.PRNGKey(seed)
  k_model, k_data, k_cot = jax.random.split(key, 3)
  params = _random_hmm(k_model)
  _, obs = jax.jit(dj.sample, static_argnums=2)(k_data, params, T)
  mask = jnp.ones(T, bool).at[7].set(False).at[-3:].set(False)
  theta = params.to_unconstrained()
  out = jax.jit(_em_of_unconstrained)(theta, obs, mask)
  leaves, treedef = jax.tree_util.tree_flatten(out)
  cot_keys = jax.random.split(k_cot, len(leaves))
  cotangent = jax.tree_util.tree_unflatten(
      treedef, [jax.random.normal(k, x.shape) for k, x in zip(cot_keys, leaves)])
  return params, obs, mask, theta, cotangent


NUM_KEYS = 8192
REFERENCE_STEP = 1e-3


def _theta_vjp(layer, key, *args):
  params, obs, mask, theta, cotangent = _problem()
  _, vjp = jax.vjp(lambda th: layer(th, obs, mask, *args, key), theta)
  return _tree_vec(vjp(cotangent)[0])


@functools.lru_cache(maxsize=None)
def _per_sample_vjps(mode):
  """(NUM_KEYS, M) single-direction estimates of v^T J (theta space), the exact VJP, keys."""
  params, obs, mask, theta, cotangent = _problem()
  if mode == "spsa":
    layer = sp.spsa(_em_of_unconstrained, num_samples=1, step=REFERENCE_STEP)
  else:
    layer = sp.forward_gradient(_em_of_unconstrained, num_samples=1)
  keys = jax.random.split(jax.random.PRNGKey(1), NUM_KEYS)
  estimates = jax.jit(jax.vmap(functools.partial(_theta_vjp, layer)))(keys)
  _, vjp = jax.vjp(lambda th: _em_of_unconstrained(th, obs, mask), theta)
  return np.asarray(estimates), np.asarray(_tree_vec(vjp(cotangent)[0])), keys


# ----------------------------------------------------------------- generic tool


def test_spsa_of_scalar_input_is_central_difference():
  # With one coordinate and Rademacher Delta, d_s / Delta_s is the central
  # difference for either sign: the estimate is deterministic.
  fn = lambda x, a: {"y": jnp.sin(x * a), "z": x ** 3}
  g = sp.spsa(fn, num_samples=3, step=1e-4)
  x, a = jnp.asarray(0.7), jnp.asarray(1.3)
  loss = lambda x: jnp.sum(g(x, a, jax.random.PRNGKey(0))["y"] * 2.0 + g(
      x, a, jax.random.PRNGKey(1))["z"])
  exact = jax.grad(lambda x: 2.0 * jnp.sin(x * a) + x ** 3)(x)
  h = 1e-4
  fd = (2 * jnp.sin((x + h) * a) + (x + h) ** 3 - 2 * jnp.sin((x - h) * a) - (x - h) ** 3) / (2 * h)
  np.testing.assert_allclose(jax.grad(loss)(x), fd, rtol=1e-10)
  np.testing.assert_allclose(jax.grad(loss)(x), exact, rtol=1e-7)


@pytest.mark.parametrize("make, key", [
    (lambda f: sp.spsa(f, num_samples=4, perturbation="segment"), jax.random.key(0)),
    (lambda f: sp.forward_gradient(f, num_samples=4), jax.random.PRNGKey(0)),
])
def test_wrapper_value_key_aux_and_transformations(make, key):
  fn = lambda x, idx, w: {"out": jnp.tanh(x["a"] @ w)[idx] * jnp.exp(x["b"])}
  g = make(fn)
  x = {"a": jnp.arange(6.0).reshape(2, 3) / 6, "b": jnp.asarray(0.3)}
  w = jnp.ones((3, 4))
  idx = jnp.array([0, 2])  # integer aux gets no cotangent
  # Typed and raw uint32 keys both work and get no gradient.
  np.testing.assert_allclose(g(x, idx, w, key)["out"], fn(x, idx, w)["out"])
  grad = jax.jit(jax.grad(lambda x, w: g(x, idx, w, key)["out"].sum(), argnums=(0, 1)))(x, w)
  assert np.all(np.isfinite(_tree_vec(grad[0])))
  np.testing.assert_array_equal(grad[1], 0.0)  # aux treated as a constant
  loss = lambda x, key: g(x, idx, w, key)["out"].sum()
  keys = jax.random.split(key, 5)
  batched = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(x, keys)
  single = jax.grad(loss)(x, keys[2])
  np.testing.assert_allclose(batched["a"][2], single["a"], rtol=1e-12)
  # Independent keys give independent perturbations, hence different estimates.
  assert not np.allclose(batched["a"][0], batched["a"][1])

  def scanned(x):
    def body(carry, key):
      return carry + g(x, idx, w, key)["out"].sum(), None
    return jax.lax.scan(body, 0.0, keys)[0]
  scan_grad = jax.jit(jax.grad(scanned))(x)
  np.testing.assert_allclose(scan_grad["a"], batched["a"].sum(0), rtol=1e-10)


def test_invalid_settings_raise():
  with pytest.raises(ValueError, match="num_samples"):
    sp.spsa(jnp.sin, num_samples=0)
  with pytest.raises(ValueError, match="step"):
    sp.spsa(jnp.sin, step=-1.0)
  with pytest.raises(ValueError, match="perturbation"):
    sp.forward_gradient(jnp.sin, perturbation="gaussian")
  params, obs, mask, _, _ = _problem()
  with pytest.raises(ValueError, match="gradient"):
    dj.em_layer(params, obs, mask, jax.random.PRNGKey(0), gradient="adjoint")
  with pytest.raises(ValueError, match="key"):
    dj.em_layer(params, obs, mask, None, gradient="spsa")
  bad = params.replace(initial=params.initial.at[0].set(-0.1))
  with pytest.raises(ValueError, match="negative"):
    dj.em_layer(bad, obs, mask, jax.random.PRNGKey(0))


# ------------------------------------------------------- statistics on the EM map


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["spsa", "forward"])
def test_estimates_are_unbiased_and_error_falls_like_inverse_sqrt_n(mode):
  estimates, exact, _ = _per_sample_vjps(mode)
  num = estimates.shape[0]
  mean = estimates.mean(0)
  stderr = estimates.std(0) / np.sqrt(num)
  # z-test per coordinate (24 coordinates): a bias of a few standard errors fails.
  z = np.abs(mean - exact) / stderr
  assert z.max() < 4.5, (z.max(), mean, exact)
  sizes = np.array([4, 16, 64, 256])
  rms = []
  for n in sizes:
    chunks = estimates[: (num // n) * n].reshape(-1, n, estimates.shape[1]).mean(1)
    rms.append(np.sqrt(np.mean(np.sum((chunks - exact) ** 2, axis=1))))
  slope = np.polyfit(np.log(sizes), np.log(rms), 1)[0]
  assert -0.6 < slope < -0.4, (slope, rms)


@pytest.mark.slow
def test_finite_difference_bias_shrinks_like_step_squared():
  # Theorem 1 with common random numbers: for the same Delta, the SPSA and
  # forward-gradient estimates differ only by the finite-difference error,
  # so mean(spsa - forward) estimates E[J_hat - J]^T v with tiny variance.
  # Several steps c share one compilation: SPSA with step c0 applied to
  # y -> f(theta + (c / c0) (y - theta)) at y = theta perturbs theta by
  # c * Delta, and its VJP is (c / c0) times the step-c estimate.
  forward, exact, keys = _per_sample_vjps("forward")
  keys = keys[:512]
  params, obs, mask, theta, _ = _problem()

  def rescaled(y, theta, c, obs, mask):
    moved = jax.tree_util.tree_map(lambda a, b: a + (c / REFERENCE_STEP) * (b - a), theta, y)
    return _em_of_unconstrained(moved, obs, mask)

  layer = sp.spsa(rescaled, num_samples=1, step=REFERENCE_STEP)

  def estimate(key, c):
    return _theta_vjp(lambda th, o, m, k: layer(th, theta, c, o, m, k), key) * (
        REFERENCE_STEP / c)

  steps = jnp.array([0.2, 0.1, 0.05, 0.025, 1e-5])
  per_step = jax.jit(jax.vmap(jax.vmap(estimate, (0, None)), (None, 0)))(keys, steps)
  bias = np.linalg.norm((per_step - forward[:512]).mean(1), axis=-1)
  slope = np.polyfit(np.log(steps[:4]), np.log(bias[:4]), 1)[0]
  assert 1.8 < slope < 2.2, (slope, bias)
  # Forward mode is the c -> 0 limit of SPSA (same key, same directions)...
  np.testing.assert_allclose(per_step[-1], forward[:512], rtol=1e-6, atol=1e-7)
  # ...and equals the exact directional derivative along those directions.
  d = jax.vmap(lambda k: _tree_vec(sp.perturbation_directions(k, theta, 1)))(keys)
  np.testing.assert_allclose(forward[:512], (d @ exact)[:, None] * d, rtol=1e-10, atol=1e-12)


# ------------------------------------------------- variance reduction: orthogonal


def test_orthogonal_directions_are_orthogonal_and_isotropic():
  x = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}         # M = 7
  d = sp.perturbation_directions(jax.random.PRNGKey(0), x, 10, "orthogonal")
  assert d["a"].shape == (10, 3) and d["b"].shape == (10, 2, 2)
  rows = np.asarray(jax.vmap(_tree_vec)(d))
  # Blocks of M orthogonal rows of norm sqrt(M); S > M starts a new block.
  np.testing.assert_allclose(rows[:7] @ rows[:7].T, 7.0 * np.eye(7), atol=1e-9)
  np.testing.assert_allclose(rows[7:] @ rows[7:].T, 7.0 * np.eye(3), atol=1e-9)
  # E[Delta Delta^T] = I (what makes the estimate unbiased): a z-test.
  rows_of = lambda k: jax.vmap(_tree_vec)(sp.perturbation_directions(k, x, 2, "orthogonal"))
  many = np.asarray(jax.jit(jax.vmap(rows_of))(
      jax.random.split(jax.random.PRNGKey(1), 4000))).reshape(-1, 7)
  second = many.T @ many / many.shape[0]
  assert np.abs(second - np.eye(7)).max() < 0.15, second


def test_orthogonal_spsa_with_m_samples_is_exact():
  # S = M orthogonal directions span the space: v^T J up to the O(c^2) bias, any key.
  a = jnp.arange(35.0).reshape(5, 7) / 10
  fn = lambda x: jnp.sin(a @ x)
  x, v = jnp.linspace(0.0, 1.0, 7), jnp.linspace(-1.0, 1.0, 5)
  exact = jax.vjp(fn, x)[1](v)[0]
  g = sp.spsa(lambda x: fn(x), num_samples=7, step=1e-5, perturbation="orthogonal")
  for key in jax.random.split(jax.random.PRNGKey(3), 3):
    np.testing.assert_allclose(jax.vjp(lambda x: g(x, key), x)[1](v)[0], exact, atol=1e-7)
  # Rademacher with the same cost is not exact.
  r = sp.spsa(lambda x: fn(x), num_samples=7, step=1e-5)
  assert not np.allclose(jax.vjp(lambda x: r(x, key), x)[1](v)[0], exact, atol=1e-3)


@pytest.mark.slow
def test_orthogonal_spsa_beats_iid_at_equal_cost():
  """Against the exact VJP: at S = M/2 the mean squared error of orthogonal
  directions is below i.i.d. Rademacher's at equal cost (the same number of
  function evaluations).  (On the EM map itself: experiments/spsa_gradients.py
  table (e).)"""
  m = 24
  a = jax.random.normal(jax.random.PRNGKey(0), (10, m)) / np.sqrt(m)
  fn = lambda x: jnp.tanh(a @ x)
  x, v = jax.random.normal(jax.random.PRNGKey(1), (m,)), jnp.linspace(-1.0, 1.0, 10)
  exact = jax.vjp(fn, x)[1](v)[0]
  keys = jax.random.split(jax.random.PRNGKey(5), 400)

  def errors(perturbation):
    g = sp.spsa(lambda x: fn(x), num_samples=m // 2, step=1e-4, perturbation=perturbation)
    est = jax.jit(jax.vmap(lambda k: jax.vjp(lambda x: g(x, k), x)[1](v)[0]))(keys)
    return np.sum((np.asarray(est) - np.asarray(exact)) ** 2, axis=1)

  orth, iid = errors("orthogonal"), errors("rademacher")
  # Theory: about (M - S) / (M - 1) = 0.52 of i.i.d.'s; demand a clear reduction.
  assert orth.mean() < 0.8 * iid.mean(), (orth.mean(), iid.mean())
