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

pytestmark = pytest.mark.x64


@pytest.fixture(scope="module")
def batch():
  return small_batch()


# Jitted calls: eager module calls re-traced and recompiled the stage scan on
# every call (the file took 65 s).  Modules of one structure share a program.
_apply = nnx.jit(lambda model, emb, obs, mask, key: model(emb, obs, mask, key))
_stages = nnx.jit(lambda model, emb, obs, mask, key: model.stages(emb, obs, mask, key))


def _models(start, gradient="exact"):
  codec = ParamCodec(start)
  return {
      "mapper": EmbeddingMapper(codec, start, E, hidden=(8,), rngs=nnx.Rngs(0)),
      "fusion": InitialFusion(codec, start, E, num_stages=2, hidden=(8,), layer=dj.EMLayer(gradient=gradient),
                                rngs=nnx.Rngs(0)),
      "dennl": DENNL(codec, start, E, num_stages=2, hidden=(16,), start_hidden=(8,),
                       latent_dim=4, layer=dj.EMLayer(gradient=gradient), rngs=nnx.Rngs(0)),
  }


def test_models_output_valid_batched_parameters(batch):
  start, obs, mask, emb = batch
  for name, model in _models(start).items():
    params = _apply(model, emb, obs, mask, jax.random.PRNGKey(0))
    assert isinstance(params, dj.HSMM), name
    assert params.initial.shape == (B, K) and params.emission.cov.shape == (B, K, O, O), name
    assert_valid_batch(params)


def test_untrained_dennl_is_plain_em_from_its_start(batch):
  """Zero-initialised residual heads: DENNL(e) == EM^K(lambda0(e))."""
  start, obs, mask, emb = batch
  models = _models(start)
  dennl = models["dennl"]
  params = _apply(dennl, emb, obs, mask, jax.random.PRNGKey(0))
  codec = dennl.codec

  @jax.jit
  def plain_em(expected):
    for _ in range(2):
      # The codec floors probabilities at 1e-6 (its only departure from identity).
      expected = codec.decode_batch(codec.encode_batch(jax.vmap(dj.em_step)(expected, obs, mask)))
    return expected

  expected = plain_em(dennl.start(emb))
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # lambda0 starts at the shared start for every user.
  lam0 = dennl.start(emb)
  np.testing.assert_allclose(lam0.emission.mean, jnp.broadcast_to(start.emission.mean,
                                                                  (B, K, O)), atol=1e-9)
  # stages() exposes every stage; its last entry is the output.
  history = _stages(dennl, emb, obs, mask, jax.random.PRNGKey(0))
  assert history.initial.shape == (3, B, K)
  np.testing.assert_allclose(history.emission.mean[-1], params.emission.mean, atol=1e-12)


def test_dennl_forward_is_padding_invariant(batch):
  start, obs, mask, emb = batch
  dennl = _models(start)["dennl"]
  # Perturb the residual head so the test also covers a trained-looking network.
  # float32 kernels: draw in their dtype (a float64 value would be an implicit,
  # deprecated downcast in the scatter; the values are the same).
  kernel = dennl.correction.kernel
  kernel[...] = (0.05 * jax.random.normal(jax.random.PRNGKey(9), kernel.shape)).astype(kernel.dtype)
  ref = _apply(dennl, emb, obs, mask, jax.random.PRNGKey(0))
  pad = 4
  # Padding at the end and in the middle (garbage values on padded steps).
  padded_obs = jnp.concatenate([obs[:, :5], 99.0 * jnp.ones((B, pad, O)), obs[:, 5:]], axis=1)
  padded_mask = jnp.concatenate([mask[:, :5], jnp.zeros((B, pad), bool), mask[:, 5:]], axis=1)
  out = _apply(dennl, emb, padded_obs, padded_mask, jax.random.PRNGKey(0))
  for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(out)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_dennl_rejects_unknown_gradient_mode(batch):
  start = batch[0]
  with pytest.raises(ValueError, match="gradient"):
    DENNL(ParamCodec(start), start, E, layer=dj.EMLayer(gradient="magic"), rngs=nnx.Rngs(0))


def _perturbed(dennl):
  """Non-zero stage heads, so the switches have something to switch."""
  key = jax.random.PRNGKey(9)
  correction, next_latent = dennl.correction.kernel, dennl.next_latent.kernel
  correction[...] = (0.05 * jax.random.normal(key, correction.shape)).astype(correction.dtype)
  next_latent[...] = jax.random.normal(jax.random.fold_in(key, 1),
                                       next_latent.shape).astype(next_latent.dtype)
  return dennl


def _dennl(start, **switches):
  return DENNL(ParamCodec(start), start, E, num_stages=2, hidden=(16,), start_hidden=(8,),
               latent_dim=4, layer=dj.EMLayer(gradient="exact"), rngs=nnx.Rngs(0), **switches)


def test_direct_output_dennl_starts_at_the_shared_start(batch):
  start, obs, mask, emb = batch
  params = _apply(_dennl(start, residual=False), emb, obs, mask, jax.random.PRNGKey(0))
  expected = ParamCodec(start).decode(ParamCodec(start).encode(start))
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, jnp.broadcast_to(b, a.shape), rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_without_latent_and_stage_embedding_the_embedding_is_ignored(batch):
  """lambda0 = g(e) has a zero output kernel at initialisation, so with neither
  the latent h nor e in the stage MLP the output cannot depend on e."""
  start, obs, mask, emb = batch
  other = emb[::-1] + 1.0
  key = jax.random.PRNGKey(0)
  cut = _perturbed(_dennl(start, use_latent=False, embed_in_stage=False))
  for a, b in zip(jax.tree_util.tree_leaves(_apply(cut, emb, obs, mask, key)),
                  jax.tree_util.tree_leaves(_apply(cut, other, obs, mask, key))):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  for switches in (dict(use_latent=False), dict(embed_in_stage=False)):
    full = _perturbed(_dennl(start, **switches))
    assert not np.allclose(_apply(full, emb, obs, mask, key).emission.mean,
                           _apply(full, other, obs, mask, key).emission.mean), switches


@pytest.mark.slow
def test_user_start_comes_from_each_users_own_data(batch):
  start, obs, mask, emb = batch
  from functools import partial
  from dennl_jax.starts import user_start
  make = partial(user_start, num_states=K, max_duration=D, min_covar=1e-3)
  key = jax.random.PRNGKey(0)
  history = _stages(_dennl(start, user_start=make), emb, obs, mask, key)
  codec = ParamCodec(start)
  keys = jax.random.split(jax.random.fold_in(key, 1), B)
  for u in range(B):
    own = codec.decode(codec.encode(make(keys[u], obs[u], mask[u])))
    np.testing.assert_allclose(history.emission.mean[0, u], own.emission.mean, atol=1e-9)
