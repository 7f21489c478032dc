"""Conventional EM: likelihood increases, starts come from each user's own data."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dennl_jax.per_user_em import best_restart, conventional_em
from dennl_jax.starts import user_start
from models_common import B, D, E, K, O, T, assert_valid_batch, small_batch, small_hsmm

pytestmark = pytest.mark.x64


@pytest.fixture(scope="module")
def batch():
  return small_batch()


def test_conventional_em_increases_likelihood_and_start_uses_own_data(batch):
  start, obs, mask, _ = batch
  fitted, trace = conventional_em(jax.random.PRNGKey(0), obs, mask, num_states=K,
                                    max_duration=D, num_iters=6)
  assert trace.shape == (B, 6)
  assert np.all(np.diff(np.asarray(trace), axis=1) > -1e-6)
  assert_valid_batch(fitted)
  own = user_start(jax.random.PRNGKey(0), obs[0], mask[0], num_states=K, max_duration=D,
                     min_covar=1e-3)
  # Every k-means center is a mean of some of the user's own observations.
  lo, hi = np.asarray(obs[0]).min(0), np.asarray(obs[0]).max(0)
  assert np.all((np.asarray(own.emission.mean) >= lo - 1e-9) &
                (np.asarray(own.emission.mean) <= hi + 1e-9))


@pytest.mark.slow
def test_restarts_keep_each_users_best_final_likelihood(batch):
  """Brute force: every restart fitted on its own, the best by final
  log-likelihood kept -- conventional_em with restarts must return that fit."""
  import dennl_jax as dj
  from dennl_jax.per_user_em import user_restarts
  start, obs, mask, _ = batch
  key, iters = jax.random.PRNGKey(4), 3
  fitted, trace, finals = conventional_em(key, obs, mask, num_states=K, max_duration=D,
                                          num_iters=iters, kmeans_restarts=2,
                                          random_restarts=2, return_restarts=True)
  assert trace.shape == (B, iters) and finals.shape == (B, 4)

  def _first_within_rounding(lls):
    top = max(lls)
    return next(r for r, v in enumerate(lls)
                if v >= top - 100 * np.finfo(np.float64).eps * (1 + abs(top)))

  @jax.jit   # one compile for every user and restart (eager EM steps took ~100 s)
  def fit_alone(p, o, m):
    for _ in range(iters):
      p = dj.em_step(p, o, m)
    return p, dj.log_likelihood(p, o, m)

  for u, k in enumerate(jax.random.split(key, B)):
    starts = user_restarts(k, obs[u], mask[u], num_states=K, max_duration=D, min_covar=1e-3,
                           kmeans_restarts=2, random_restarts=2)
    lls, fits = [], []
    for r in range(4):
      p, ll = fit_alone(jax.tree_util.tree_map(lambda x: x[r], starts), obs[u], mask[u])
      fits.append(p)
      lls.append(float(ll))
    np.testing.assert_allclose(finals[u], lls, rtol=1e-6)
    # Restarts that converge to the same optimum (relabelled) tie up to rounding:
    # the kept one is the first within rounding of the (independently checked) best.
    best = fits[_first_within_rounding(lls)]
    np.testing.assert_allclose(max(lls), float(np.max(finals[u])), rtol=1e-9)
    np.testing.assert_allclose(fitted.emission.mean[u], best.emission.mean, rtol=1e-6, atol=1e-8)
    # Random starts: distinct observations of the user's own sequence as means.
    means = np.asarray(starts.emission.mean[2])
    assert len({tuple(m) for m in means}) == K
    assert all(np.any(np.all(np.isclose(np.asarray(obs[u]), m), axis=1)) for m in means)
  with pytest.raises(ValueError, match="restart"):
    conventional_em(key, obs, mask, num_states=K, max_duration=D, kmeans_restarts=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_best_restart_breaks_rounding_ties_by_order_and_never_keeps_nan(dtype):
  eps = np.finfo(dtype).eps
  top = dtype(-1.3272139)
  final = np.array([
      [top - 2 * eps, top, top - 1.0],        # rounding apart: the first is kept
      [top - 1.0, top, top - 2 * eps],        # the real best comes before its tie
      [np.nan, top, top - 1e-3],              # NaN never wins; 1e-3 is not rounding
      [np.nan, np.nan, np.nan],               # nothing finite: restart 0
      [-np.inf, top, np.nan],
  ], dtype)
  np.testing.assert_array_equal(best_restart(jnp.asarray(final)), [0, 1, 1, 0, 1])
  # The tie width scales with the dtype and the magnitude, not a fixed number.
  big = np.array([[-1e4 * (1 + 50 * eps), -1e4, -1e4 * (1 - 0.5)]], dtype)
  assert int(best_restart(jnp.asarray(big))[0]) == 2
  assert int(best_restart(jnp.asarray(np.array([[-1e4 - 1e4 * 50 * eps, -1e4]], dtype)))[0]) == 0
  assert int(best_restart(jnp.asarray(np.array([[-1e4 - 1e4 * 500 * eps, -1e4]], dtype)))[0]) == 1
