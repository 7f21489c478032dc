"""The parameter codec: round trip for HMMs and HSMMs, any vector decodes to valid parameters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import dennl_jax as dj
from dennl_jax.codec import ParamCodec
from models_common import B, D, E, K, O, T, assert_valid_batch, small_batch, small_hsmm

pytestmark = pytest.mark.x64


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


@pytest.mark.slow
def test_encoding_a_decoded_near_singular_covariance_is_finite():
  # A network output with a small Cholesky diagonal under large off-diagonal
  # entries decodes to L L^T + floor I with L L^T (nearly) singular: a
  # covariance on the floor up to float32 rounding.  An EM layer passes it on
  # unchanged for a state without posterior mass, and DENNL's next stage
  # (codec.encode) or the held-out loss (training.floor_probabilities)
  # factors x - floor I: that must not be NaN (the held-out-step loss of
  # DENNL became NaN on every minibatch after a few Adam steps).
  num_users, dim = 4, 5
  with jax.enable_x64(False):   # float32, as in training
    base = small_hsmm(jax.random.PRNGKey(3))
    start = jax.tree_util.tree_map(jnp.asarray, base.replace(
        emission=dj.Gaussian(jnp.zeros((K, dim)), jnp.broadcast_to(jnp.eye(dim), (K, dim, dim)),
                             min_covar=0.1)))
    codec = ParamCodec(start)
    pre = start.to_preactivation()
    offdiag = 10.0 * jax.random.normal(jax.random.PRNGKey(6), (num_users, K, dim, dim))
    z_cov = jnp.where(jnp.eye(dim, dtype=bool), -12.0, offdiag)   # diag(L) ~ CHOL_FLOOR
    vectors = jax.vmap(lambda z: ravel_pytree(
        pre.replace(emission=pre.emission.replace(cov=z)))[0])(z_cov)
    params = codec.decode_batch(vectors)
    assert params.emission.cov.dtype == jnp.float32
    again = codec.encode_batch(params)
    assert np.all(np.isfinite(np.asarray(again)))
    back = codec.decode_batch(again)
    scale = np.max(np.abs(np.asarray(params.emission.cov)))
    np.testing.assert_allclose(back.emission.cov, params.emission.cov, atol=1e-5 * scale)
    grads = jax.grad(lambda p: jnp.sum(codec.encode_batch(p) ** 2))(params)
    assert np.all(np.isfinite(np.asarray(grads.emission.cov)))
    floored = dj.training.floor_probabilities(params)
    assert np.all(np.isfinite(np.asarray(floored.emission.cov)))
