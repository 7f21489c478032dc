"""Conventional EM: likelihood increases, starts come from each user's own data."""
import jax
import numpy as np
import pytest

from dennl_jax.baselines import conventional_em
from dennl_jax.starts import user_start
from models_common import B, D, E, K, O, T, assert_valid_batch, small_batch, small_hsmm

jax.config.update("jax_enable_x64", True)


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
