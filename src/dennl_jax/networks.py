"""DENNL and the network baselines as Flax NNX modules (paper section 3, 6, Figs. 1-2).

Every network maps a batch of users -- embeddings ``e: (B, E)``,
observations ``obs: (B, T, O)`` and masks ``mask: (B, T)`` -- and a PRNG key
(last: its randomness only drives the SPSA estimates) to a batch of HMM/HSMM
parameters (the model pytree with a leading user axis):

* :class:`DENNL` -- ``lambda0 = g(e)``, then ``num_stages`` times: an EM layer
  on the user's own sequence, followed by one MLP shared across stages and
  users that maps (lambda after EM, latent ``h_k``, ``e``) to (a correction of
  lambda, ``h_{k+1}``).  The correction is *residual*: it is added to the EM
  output in pre-activation space (:mod:`dennl_jax.codec`), and its output
  layer starts at zero, so an untrained DENNL is plain EM from ``lambda0``.
* :class:`InitialFusion` -- ``lambda0 = g(e)``, then plain EM layers.
* :class:`EmbeddingMapper` -- ``lambda = g(e)`` only.  Trained on the
  likelihood it is the "MLP Mapper" baseline; trained by squared error on
  per-user EM fits it is "EM Mapping" (Table 1's "Direct Mapping").

``lambda0 = g(e)`` comes from the embedding through an MLP whose output bias
is initialised at a shared start (e.g. :func:`dennl_jax.starts.pooled_start`)
and whose output weights start at zero.  Two reasons: a common starting point
aligns state labels across users (state ``k`` means "the same" for everyone,
which the shared stage MLP needs), and the embedding can then move each
user's start toward its own parameters.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dennl_jax.codec import ParamCodec
from dennl_jax.layer import EMLayer

# Pre-activations fed to an MLP are clipped to this range (a probability of
# 1e-6 is about -13.8); the residual path itself is never clipped.
INPUT_CLIP = 10.0


def _em_layers(params, obs, mask, key, layer: EMLayer):
  """``layer`` (an :class:`~dennl_jax.EMLayer`) for every user of a batch.

  params: batched model (leading axis B); obs: (B, T, ...); mask: (B, T);
  key: one PRNG key, split into one key per user (independent SPSA draws).
  """
  keys = jax.random.split(key, mask.shape[0])
  return jax.vmap(layer)(params, obs, mask, keys)


def _check_layer(layer) -> None:
  if not isinstance(layer, EMLayer):
    raise TypeError(f"layer must be a dennl_jax.EMLayer (the EM layer's settings), got "
                    f"{type(layer).__name__}")


class MLP(nnx.Module):
  """Dense layers with a nonlinearity between them (none after the last)."""

  def __init__(self, sizes: Sequence[int], *, rngs: nnx.Rngs, activation=jax.nn.gelu):
    if len(sizes) < 2:
      raise ValueError(f"an MLP needs at least input and output sizes, got {sizes}")
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.activation = activation

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = self.activation(x)
    return x


def _zero_output(linear: nnx.Linear, bias=None):
  linear.kernel[...] = jnp.zeros_like(linear.kernel[...])
  linear.bias[...] = (jnp.zeros_like(linear.bias[...]) if bias is None
                      else jnp.asarray(bias, linear.bias[...].dtype))


class StartNetwork(nnx.Module):
  """``e -> lambda0``: MLP to a pre-activation vector, starting at ``start``."""

  def __init__(self, codec: ParamCodec, start, embed_dim: int, hidden: Sequence[int], *,
               rngs: nnx.Rngs):
    self.codec = codec
    self.net = MLP([embed_dim, *hidden, codec.size], rngs=rngs)
    _zero_output(self.net.layers[-1], codec.encode(start))

  def preactivation(self, embedding):
    """(B, E) -> (B, P)."""
    return self.net(embedding)

  def __call__(self, embedding):
    return self.codec.decode_batch(self.preactivation(embedding))


class EmbeddingMapper(nnx.Module):
  """``lambda = g(e)``: the MLP Mapper / EM Mapping baselines (no EM)."""

  def __init__(self, codec: ParamCodec, start, embed_dim: int, *,
               hidden: Sequence[int] = (128, 128), rngs: nnx.Rngs):
    self.start = StartNetwork(codec, start, embed_dim, hidden, rngs=rngs)

  def __call__(self, embedding, obs=None, mask=None, key=None):
    del obs, mask, key
    return self.start(embedding)


class InitialFusion(nnx.Module):
  """``lambda0 = g(e)`` then ``num_stages`` plain EM layers (Fig. 2 right)."""

  def __init__(self, codec: ParamCodec, start, embed_dim: int, *, num_stages: int = 3,
               hidden: Sequence[int] = (128, 128), layer: EMLayer = EMLayer(),
               rngs: nnx.Rngs):
    _check_layer(layer)
    self.start = StartNetwork(codec, start, embed_dim, hidden, rngs=rngs)
    self.num_stages = num_stages
    self.layer = layer

  def __call__(self, embedding, obs, mask, key):
    def stage(params, key_k):
      return _em_layers(params, obs, mask, key_k, self.layer), None

    # A scan over stages compiles the EM layer once, not num_stages times.
    params, _ = jax.lax.scan(stage, self.start(embedding),
                             jax.random.split(key, self.num_stages))
    return params


class DENNL(nnx.Module):
  """Differentiable EM as a network layer (paper Fig. 1).

  lambda0 = g(e) and h_0 = tanh(W e); then for k = 0..num_stages-1:
    lambda' = EM(lambda_k; obs)                          (em_layer per user)
    (delta, h_{k+1}) = MLP(z(lambda'), h_k, e)           (shared across k and users)
    lambda_{k+1} = decode(z(lambda') + delta)
  where z is the codec's pre-activation vector.  Returns lambda_K.

  Ablation switches (defaults = the network above):
    residual=False      -- the paper's direct output, lambda_{k+1} = decode(MLP(...));
                           its output bias starts at the shared start's pre-activations.
    use_latent=False    -- no latent h (zeros in place of h_k).
    embed_in_stage=False -- e does not enter the stage MLP (zeros in its place).
    user_start          -- ``(key, obs, mask) -> params`` of one user: lambda0 from the
                           user's own data (e.g. :func:`dennl_jax.starts.user_start`)
                           instead of g(e); state labels are then not aligned across users.
  """

  def __init__(self, codec: ParamCodec, start, embed_dim: int, *, num_stages: int = 3,
               hidden: Sequence[int] = (256, 256), start_hidden: Sequence[int] = (128, 128),
               latent_dim: int = 32, correction_scale: float = 0.1,
               layer: EMLayer = EMLayer(), residual: bool = True, use_latent: bool = True,
               embed_in_stage: bool = True, user_start=None, rngs: nnx.Rngs):
    _check_layer(layer)
    self.codec = codec
    self.start = StartNetwork(codec, start, embed_dim, start_hidden, rngs=rngs)
    self.context = nnx.Linear(embed_dim, latent_dim, rngs=rngs)
    num_features = codec.size + latent_dim + embed_dim
    # Pre-activations, latents and embeddings have different scales; a
    # LayerNorm keeps the trunk's activations O(1) so one optimiser step
    # cannot move the parameters far.
    self.input_norm = nnx.LayerNorm(num_features, rngs=rngs)
    self.trunk = MLP([num_features, *hidden], rngs=rngs)
    self.correction = nnx.Linear(hidden[-1], codec.size, rngs=rngs)
    # Direct output starts at the shared start (an untrained direct stage
    # outputs it whatever EM did); residual starts at "no correction".
    _zero_output(self.correction, None if residual else codec.encode(start))
    self.next_latent = nnx.Linear(hidden[-1], latent_dim, rngs=rngs)
    self.num_stages = num_stages
    self.correction_scale = correction_scale
    self.layer = layer
    self.residual, self.use_latent, self.embed_in_stage = residual, use_latent, embed_in_stage
    self.user_start = user_start

  def _scan(self, embedding, obs, mask, key):
    def stage(carry, key_k):
      params, latent = carry
      after_em = _em_layers(params, obs, mask, key_k, self.layer)
      pre = self.codec.encode_batch(after_em)
      stage_embedding = embedding if self.embed_in_stage else jnp.zeros_like(embedding)
      features = jnp.concatenate(
          [jnp.clip(pre, -INPUT_CLIP, INPUT_CLIP), latent, stage_embedding], axis=-1)
      hidden = jax.nn.gelu(self.trunk(self.input_norm(features)))
      out = self.correction(hidden)
      params = self.codec.decode_batch(pre + self.correction_scale * out if self.residual
                                       else out)
      latent = jnp.tanh(self.next_latent(hidden))
      if not self.use_latent:
        latent = jnp.zeros_like(latent)
      return (params, latent), params

    if self.user_start is None:
      start = self.start(embedding)
    else:
      keys = jax.random.split(jax.random.fold_in(key, 1), mask.shape[0])
      start = jax.lax.stop_gradient(self.codec.decode_batch(self.codec.encode_batch(
          jax.vmap(self.user_start)(keys, obs, mask))))
    latent0 = jnp.tanh(self.context(embedding))
    carry = (start, latent0 if self.use_latent else jnp.zeros_like(latent0))
    # A scan over stages compiles the stage once, not num_stages times; the
    # stage MLP's weights are shared across stages by construction.
    (final, _), history = jax.lax.scan(stage, carry, jax.random.split(key, self.num_stages))
    return start, final, history

  def stages(self, embedding, obs, mask, key):
    """Batched parameters after every stage: the model pytree with leading
    axes (num_stages + 1, B); index 0 is lambda_0, index -1 the output."""
    start, _, history = self._scan(embedding, obs, mask, key)
    return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b], 0), start, history)

  def __call__(self, embedding, obs, mask, key):
    return self._scan(embedding, obs, mask, key)[1]
