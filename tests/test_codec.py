"""The parameter codec: round trip for HMMs and HSMMs, any vector decodes to valid parameters."""
import jax
import jax.numpy as jnp
import numpy as np

import dennl_jax as dj
from dennl_jax.codec import ParamCodec
from models_common import B, D, E, K, O, T, assert_valid_batch, small_batch, small_hsmm

jax.config.update("jax_enable_x64", True)


def test_codec_round_trip_hsmm_and_hmm():
  start = small_hsmm(jax.random.PRNGKey(3))
  codec = ParamCodec(start)
  back = codec.decode(codec.encode(start))
  for a, b in zip(jax.tree_util.tree_leaves(start), jax.tree_util.tree_leaves(back)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  hmm = dj.HMM(jnp.array([0.3, 0.7]), jnp.array([[0.9, 0.1], [0.4, 0.6]]),
               dj.DiagGaussian(jnp.zeros((2, 2)), jnp.array([[1.0, 2.0], [0.5, 3.0]])))
  hcodec = ParamCodec(hmm)
  for a, b in zip(jax.tree_util.tree_leaves(hmm),
                  jax.tree_util.tree_leaves(hcodec.decode(hcodec.encode(hmm)))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_decoding_any_vector_gives_valid_parameters():
  codec = ParamCodec(small_hsmm(jax.random.PRNGKey(4)))
  vectors = 5.0 * jax.random.normal(jax.random.PRNGKey(5), (20, codec.size))
  assert_valid_batch(codec.decode_batch(vectors))
