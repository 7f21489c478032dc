"""Starts: k-means++ finds separated clusters; alignment undoes a permutation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dennl_jax as dj
from dennl_jax.starts import align_to_reference, kmeans
from models_common import B, D, E, K, O, T, assert_valid_batch, small_batch, small_hsmm

pytestmark = pytest.mark.x64


def test_kmeans_finds_separated_clusters():
  centers = jnp.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  pts = jnp.repeat(centers, 10, 0) + 0.1 * jax.random.normal(jax.random.PRNGKey(0), (30, 2))
  found, labels = kmeans(jax.random.PRNGKey(1), pts, jnp.ones(30, bool), 3)
  dist = np.linalg.norm(np.asarray(found)[:, None] - np.asarray(centers)[None], axis=-1)
  assert np.all(dist.min(0) < 0.2)


def test_align_to_reference_undoes_a_permutation():
  model = small_hsmm(jax.random.PRNGKey(6))
  perm = jnp.array([2, 0, 1])
  permuted = dj.HSMM(model.initial[perm], model.transition[perm][:, perm],
                  dj.PoissonDuration(model.duration.rate[perm], max_duration=D),
                  dj.Gaussian(model.emission.mean[perm], model.emission.cov[perm], 1e-3))
  batched = jax.tree_util.tree_map(lambda x: x[None], permuted)
  aligned = align_to_reference(batched, model.emission.mean)
  for a, b in zip(jax.tree_util.tree_leaves(aligned), jax.tree_util.tree_leaves(model)):
    np.testing.assert_allclose(a[0], b, atol=1e-12)
