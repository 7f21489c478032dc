"""DENNL and the network baselines: validity, shapes, residual start, padding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dennl_jax as dj
from dennl_jax.codec import ParamCodec
from dennl_jax.networks import DENNL, EmbeddingMapper, InitialFusion
from models_common import B, D, E, K, O, T, assert_valid_batch, small_batch, small_hsmm

jax.config.update("jax_enable_x64", True)


@pytest.fixture(scope="module")
def batch():
  return small_batch()


def _models(start, gradient="exact"):
  codec = ParamCodec(start)
  return {
      "mapper": EmbeddingMapper(codec, start, E, hidden=(8,), rngs=nnx.Rngs(0)),
      "fusion": InitialFusion(codec, start, E, num_stages=2, hidden=(8,), gradient=gradient,
                                rngs=nnx.Rngs(0)),
      "dennl": DENNL(codec, start, E, num_stages=2, hidden=(16,), start_hidden=(8,),
                       latent_dim=4, gradient=gradient, rngs=nnx.Rngs(0)),
  }


def test_models_output_valid_batched_parameters(batch):
  start, obs, mask, emb = batch
  for name, model in _models(start).items():
    params = model(emb, obs, mask, jax.random.PRNGKey(0))
    assert isinstance(params, dj.HSMM), name
    assert params.initial.shape == (B, K) and params.emission.cov.shape == (B, K, O, O), name
    assert_valid_batch(params)


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
    DENNL(ParamCodec(start), start, E, gradient="magic", rngs=nnx.Rngs(0))
