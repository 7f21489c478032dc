"""DENNL and baselines: codec round trip, validity, shapes, residual start, padding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dennl_jax as dj
from dennl_jax import models as M
from dennl_jax.hsmm import HSMM, PoissonDuration

jax.config.update("jax_enable_x64", True)

K, O, D, T, E, B = 3, 2, 5, 12, 4, 3


def _hsmm(key, min_covar=1e-3):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  off = ~np.eye(K, dtype=bool)
  trans = jnp.where(off, jax.random.uniform(k1, (K, K), minval=0.2, maxval=1.0), 0.0)
  trans = trans / trans.sum(-1, keepdims=True)
  a = jax.random.normal(k2, (K, O, O))
  cov = a @ jnp.swapaxes(a, -1, -2) + 0.5 * jnp.eye(O)
  return HSMM(jnp.array([0.2, 0.5, 0.3]), trans,
              PoissonDuration(jax.random.uniform(k3, (K,), minval=1.0, maxval=3.0), max_duration=D),
              dj.Gaussian(3.0 * jax.random.normal(k4, (K, O)), cov, min_covar=min_covar))


@pytest.fixture(scope="module")
def batch():
  start = _hsmm(jax.random.PRNGKey(0))
  keys = jax.random.split(jax.random.PRNGKey(1), B)
  _, obs = jax.vmap(lambda k: start.sample(k, T))(keys)
  emb = jax.random.normal(jax.random.PRNGKey(2), (B, E))
  return start, obs, jnp.ones((B, T), bool), emb


def _assert_valid_batch(params):
  for u in range(params.initial.shape[0]):
    user = jax.tree_util.tree_map(lambda x: x[u], params)
    user.check_parameters()           # raises ValueError if invalid
    np.testing.assert_array_equal(np.diagonal(np.asarray(user.transition)), 0.0)
    assert np.all(np.linalg.eigvalsh(np.asarray(user.emission.cov)) >= 0.5e-3 * 0.999)


def test_codec_round_trip_hsmm_and_hmm():
  start = _hsmm(jax.random.PRNGKey(3))
  codec = M.ParamCodec(start)
  back = codec.decode(codec.encode(start))
  for a, b in zip(jax.tree_util.tree_leaves(start), jax.tree_util.tree_leaves(back)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  hmm = dj.HMM(jnp.array([0.3, 0.7]), jnp.array([[0.9, 0.1], [0.4, 0.6]]),
               dj.DiagGaussian(jnp.zeros((2, 2)), jnp.array([[1.0, 2.0], [0.5, 3.0]])))
  hcodec = M.ParamCodec(hmm)
  for a, b in zip(jax.tree_util.tree_leaves(hmm),
                  jax.tree_util.tree_leaves(hcodec.decode(hcodec.encode(hmm)))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_decoding_any_vector_gives_valid_parameters():
  codec = M.ParamCodec(_hsmm(jax.random.PRNGKey(4)))
  vectors = 5.0 * jax.random.normal(jax.random.PRNGKey(5), (20, codec.size))
  _assert_valid_batch(codec.decode_batch(vectors))


def _models(start, gradient="exact"):
  codec = M.ParamCodec(start)
  return {
      "mapper": M.EmbeddingMapper(codec, start, E, hidden=(8,), rngs=nnx.Rngs(0)),
      "fusion": M.InitialFusion(codec, start, E, num_stages=2, hidden=(8,), gradient=gradient,
                                rngs=nnx.Rngs(0)),
      "dennl": M.DENNL(codec, start, E, num_stages=2, hidden=(16,), start_hidden=(8,),
                       latent_dim=4, gradient=gradient, rngs=nnx.Rngs(0)),
  }


def test_models_output_valid_batched_parameters(batch):
  start, obs, mask, emb = batch
  for name, model in _models(start).items():
    params = model(emb, obs, mask, jax.random.PRNGKey(0))
    assert isinstance(params, HSMM), name
    assert params.initial.shape == (B, K) and params.emission.cov.shape == (B, K, O, O), name
    _assert_valid_batch(params)


def test_untrained_dennl_is_plain_em_from_its_start(batch):
  """Zero-initialised residual heads: DENNL(e) == EM^K(lambda0(e))."""
  start, obs, mask, emb = batch
  models = _models(start)
  dennl = models["dennl"]
  params = dennl(emb, obs, mask, jax.random.PRNGKey(0))
  codec = dennl.codec
  expected = dennl.start(emb)
  for _ in range(2):
    # The codec floors probabilities at 1e-6 (its only departure from identity).
    expected = codec.decode_batch(codec.encode_batch(jax.vmap(dj.em_step)(expected, obs, mask)))
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # lambda0 starts at the shared start for every user.
  lam0 = dennl.start(emb)
  np.testing.assert_allclose(lam0.emission.mean, jnp.broadcast_to(start.emission.mean,
                                                                  (B, K, O)), atol=1e-9)
  # stages() exposes every stage; its last entry is the output.
  history = dennl.stages(emb, obs, mask, jax.random.PRNGKey(0))
  assert history.initial.shape == (3, B, K)
  np.testing.assert_allclose(history.emission.mean[-1], params.emission.mean, atol=1e-12)


def test_dennl_forward_is_padding_invariant(batch):
  start, obs, mask, emb = batch
  dennl = _models(start)["dennl"]
  # Perturb the residual head so the test also covers a trained-looking network.
  dennl.correction.kernel[...] = 0.05 * jax.random.normal(jax.random.PRNGKey(9),
                                                          dennl.correction.kernel.shape)
  ref = dennl(emb, obs, mask, jax.random.PRNGKey(0))
  pad = 4
  # Padding at the end and in the middle (garbage values on padded steps).
  padded_obs = jnp.concatenate([obs[:, :5], 99.0 * jnp.ones((B, pad, O)), obs[:, 5:]], axis=1)
  padded_mask = jnp.concatenate([mask[:, :5], jnp.zeros((B, pad), bool), mask[:, 5:]], axis=1)
  out = dennl(emb, padded_obs, padded_mask, jax.random.PRNGKey(0))
  for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(out)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_dennl_rejects_unknown_gradient_mode(batch):
  start = batch[0]
  with pytest.raises(ValueError, match="gradient"):
    M.DENNL(M.ParamCodec(start), start, E, gradient="magic", rngs=nnx.Rngs(0))


def test_conventional_em_increases_likelihood_and_start_uses_own_data(batch):
  start, obs, mask, _ = batch
  fitted, trace = M.conventional_em(jax.random.PRNGKey(0), obs, mask, num_states=K,
                                    max_duration=D, num_iters=6)
  assert trace.shape == (B, 6)
  assert np.all(np.diff(np.asarray(trace), axis=1) > -1e-6)
  _assert_valid_batch(fitted)
  own = M.user_start(jax.random.PRNGKey(0), obs[0], mask[0], num_states=K, max_duration=D,
                     min_covar=1e-3)
  # Every k-means center is a mean of some of the user's own observations.
  lo, hi = np.asarray(obs[0]).min(0), np.asarray(obs[0]).max(0)
  assert np.all((np.asarray(own.emission.mean) >= lo - 1e-9) &
                (np.asarray(own.emission.mean) <= hi + 1e-9))


def test_kmeans_finds_separated_clusters():
  centers = jnp.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  pts = jnp.repeat(centers, 10, 0) + 0.1 * jax.random.normal(jax.random.PRNGKey(0), (30, 2))
  found, labels = M.kmeans(jax.random.PRNGKey(1), pts, jnp.ones(30, bool), 3)
  dist = np.linalg.norm(np.asarray(found)[:, None] - np.asarray(centers)[None], axis=-1)
  assert np.all(dist.min(0) < 0.2)


def test_align_to_reference_undoes_a_permutation():
  model = _hsmm(jax.random.PRNGKey(6))
  perm = jnp.array([2, 0, 1])
  permuted = HSMM(model.initial[perm], model.transition[perm][:, perm],
                  PoissonDuration(model.duration.rate[perm], max_duration=D),
                  dj.Gaussian(model.emission.mean[perm], model.emission.cov[perm], 1e-3))
  batched = jax.tree_util.tree_map(lambda x: x[None], permuted)
  aligned = M.align_to_reference(batched, model.emission.mean)
  for a, b in zip(jax.tree_util.tree_leaves(aligned), jax.tree_util.tree_leaves(model)):
    np.testing.assert_allclose(a[0], b, atol=1e-12)
