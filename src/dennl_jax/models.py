"""DENNL and its baselines as Flax NNX modules (paper section 3, 6, Figs. 1-2).

Every trained model maps a batch of users -- embeddings ``e: (B, E)``,
observations ``obs: (B, T, O)`` and masks ``mask: (B, T)`` -- to a batch of
HMM/HSMM parameters (the model pytree with a leading user axis):

* :class:`DENNL` -- ``lambda0 = g(e)``, then ``num_stages`` times: an EM layer
  on the user's own sequence, followed by one MLP shared across stages and
  users that maps (lambda after EM, latent ``h_k``, ``e``) to (a correction of
  lambda, ``h_{k+1}``).  The correction is *residual*: it is added to the EM
  output in pre-activation space (see "Parameter codec"), and its output
  layer starts at zero, so an untrained DENNL is plain EM from ``lambda0``.
* :class:`InitialFusion` -- ``lambda0 = g(e)``, then plain EM layers.
* :class:`EmbeddingMapper` -- ``lambda = g(e)`` only.  Trained on the
  likelihood it is the "MLP Mapper" baseline; trained by squared error on
  per-user EM fits it is "EM Mapping" (Table 1's "Direct Mapping").
* :func:`conventional_em` -- per-user EM, no sharing (not a module).

``lambda0 = g(e)`` comes from the embedding through an MLP whose output bias
is initialised at a *pooled start* (one model fitted to all training users'
observations, :func:`pooled_start`) and whose output weights start at zero.
Two reasons: a common starting point aligns state labels across users (state
``k`` means "the same" for everyone, which the shared stage MLP needs), and
the embedding can then move each user's start toward its own parameters.

Parameter codec.  The networks see and produce parameters as one flat vector
in a *pre-activation* space, decoded with the paper's output functions:
probabilities (initial, transition rows, categorical tables) are
``softplus(z)`` followed by L1 normalisation -- for an HSMM the transition's
diagonal is masked to exactly zero before normalising; rates and variances
are ``softplus(z) + floor``; Gaussian means are free; a full covariance is
``L L^T + (min_covar / 2) I`` with ``L`` lower triangular, free below the
diagonal and ``softplus(.) + floor`` on it.  ``encode`` is the exact inverse on valid
parameters (probabilities floored at 1e-6), so ``decode(encode(p)) = p``.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

from dennl_jax import emissions as em_families
from dennl_jax.hmm import HMM

from dennl_jax.hsmm import HSMM, CategoricalDuration, PoissonDuration
from dennl_jax.spsa import GRADIENT_MODES
from dennl_jax.spsa import em_layer as _em_layer

PROB_FLOOR = 1e-6
RATE_FLOOR = 1e-3
CHOL_FLOOR = 1e-4
# Pre-activations fed to an MLP are clipped to this range (a probability of
# 1e-6 is about -13.8); the residual path itself is never clipped.
INPUT_CLIP = 10.0


# --------------------------------------------------------------------------
# Parameter codec: model pytree <-> flat pre-activation vector.


def inv_softplus(y):
  """The inverse of softplus for y > 0: ``log(expm1(y))``, stable for all y."""
  return y + jnp.log(-jnp.expm1(-y))


def _encode_probs(p):
  return inv_softplus(jnp.maximum(p, PROB_FLOOR))


def _decode_probs(z, mask=None):
  weights = jax.nn.softplus(z) + 1e-12
  if mask is not None:
    weights = jnp.where(mask, weights, 0.0)
  return weights / jnp.sum(weights, axis=-1, keepdims=True)


def _encode_positive(x, floor):
  return inv_softplus(jnp.maximum(x - floor, 1e-6))


def _decode_positive(z, floor):
  return jax.nn.softplus(z) + floor


def _cov_floor(gaussian):
  # A decoded covariance is L L^T + (min_covar / 2) I: its eigenvalues stay
  # >= min_covar / 2 whatever the network outputs, which keeps the float32
  # Cholesky factorisations in the next EM layer well conditioned (a floor on
  # diag(L) alone does not bound the smallest eigenvalue).  Encoding needs
  # eigenvalues > min_covar / 2, which every EM output has (its M-step adds
  # min_covar to the diagonal).
  return 0.5 * gaussian.min_covar


def _encode_family(family):
  if isinstance(family, em_families.Gaussian):
    dim = family.cov.shape[-1]
    chol = jnp.linalg.cholesky(family.cov - _cov_floor(family) * jnp.eye(dim))
    eye = jnp.eye(dim, dtype=bool)
    diag = _encode_positive(jnp.diagonal(chol, axis1=-2, axis2=-1), CHOL_FLOOR)
    pre = jnp.where(eye, diag[..., None] * jnp.eye(dim), jnp.tril(chol, -1))
    return family.replace(cov=pre)
  if isinstance(family, em_families.DiagGaussian):
    return family.replace(var=_encode_positive(family.var, family.min_covar))
  if isinstance(family, (em_families.Categorical, em_families.Multinomial, CategoricalDuration)):
    return family.replace(probs=_encode_probs(family.probs))
  if isinstance(family, (em_families.Poisson, PoissonDuration)):
    return family.replace(rate=_encode_positive(family.rate, RATE_FLOOR))
  raise ValueError(f"no parameter codec for {type(family).__name__}")


def _decode_family(pre):
  if isinstance(pre, em_families.Gaussian):
    dim = pre.cov.shape[-1]
    eye = jnp.eye(dim, dtype=pre.cov.dtype)
    diag = _decode_positive(jnp.diagonal(pre.cov, axis1=-2, axis2=-1), CHOL_FLOOR)
    chol = jnp.tril(pre.cov, -1) + diag[..., None] * eye
    return pre.replace(cov=chol @ jnp.swapaxes(chol, -1, -2) + _cov_floor(pre) * eye)
  if isinstance(pre, em_families.DiagGaussian):
    return pre.replace(var=_decode_positive(pre.var, pre.min_covar))
  if isinstance(pre, (em_families.Categorical, em_families.Multinomial, CategoricalDuration)):
    return pre.replace(probs=_decode_probs(pre.probs))
  if isinstance(pre, (em_families.Poisson, PoissonDuration)):
    return pre.replace(rate=_decode_positive(pre.rate, RATE_FLOOR))
  raise ValueError(f"no parameter codec for {type(pre).__name__}")


def to_preactivation(params):
  """Pre-activation pytree (same type) of one model's parameters."""
  if isinstance(params, HSMM):
    off = ~jnp.eye(params.num_states, dtype=bool)
    return HSMM(_encode_probs(params.initial),
                jnp.where(off, _encode_probs(params.transition), 0.0),
                _encode_family(params.duration), _encode_family(params.emission))
  if isinstance(params, HMM):
    return HMM(_encode_probs(params.initial), _encode_probs(params.transition),
               _encode_family(params.emission))
  raise ValueError(f"no parameter codec for {type(params).__name__}")


def from_preactivation(pre):
  """Model parameters from a pre-activation pytree (inverse of to_preactivation)."""
  if isinstance(pre, HSMM):
    off = ~jnp.eye(pre.initial.shape[-1], dtype=bool)
    return HSMM(_decode_probs(pre.initial), _decode_probs(pre.transition, off),
                _decode_family(pre.duration), _decode_family(pre.emission))
  if isinstance(pre, HMM):
    return HMM(_decode_probs(pre.initial), _decode_probs(pre.transition),
               _decode_family(pre.emission))
  raise ValueError(f"no parameter codec for {type(pre).__name__}")


class ParamCodec:
  """Flat pre-activation vectors ``(P,)`` <-> one model's parameters.

  Built from a single-user template (its shapes, family types and static
  fields such as ``min_covar``/``max_duration``); holds no arrays.
  ``encode``/``decode`` act on one user; ``encode_batch``/``decode_batch``
  on a leading user axis.
  """

  def __init__(self, template):
    flat, self._unravel = ravel_pytree(to_preactivation(template))
    self.size = int(flat.shape[0])
    self.num_states = int(template.num_states)

  def encode(self, params):
    return ravel_pytree(to_preactivation(params))[0]

  def decode(self, vector):
    chex.assert_shape(vector, (self.size,))
    return from_preactivation(self._unravel(vector))

  def encode_batch(self, params):
    return jax.vmap(self.encode)(params)

  def decode_batch(self, vectors):
    return jax.vmap(self.decode)(vectors)


# --------------------------------------------------------------------------
# The EM layer (one EM iteration per user, batched).


def em_stage(params, obs, mask, key, *, gradient: str = "spsa", num_samples: int = 16,
             step: float = 1e-3):
  """One EM iteration for every user in a batch, with the chosen backward.

  params: batched model (leading axis B); obs: (B, T, ...); mask: (B, T);
  key: one PRNG key, split into one key per user (independent SPSA draws).
  gradient: "spsa" (paper), "forward" (random-direction forward-mode
  estimate) or "exact" (reverse-mode autodiff through the recursions).
  """
  if gradient not in GRADIENT_MODES:
    raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {gradient!r}")
  num_users = mask.shape[0]
  keys = jax.random.split(key, num_users)
  layer = partial(_em_layer, gradient=gradient, num_samples=num_samples, step=step)
  return jax.vmap(layer)(params, obs, mask, keys)


# --------------------------------------------------------------------------
# Networks.


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
               hidden: Sequence[int] = (128, 128), gradient: str = "spsa",
               spsa_samples: int = 16, spsa_step: float = 1e-3, rngs: nnx.Rngs):
    if gradient not in GRADIENT_MODES:
      raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {gradient!r}")
    self.start = StartNetwork(codec, start, embed_dim, hidden, rngs=rngs)
    self.num_stages = num_stages
    self.layer_settings = (gradient, spsa_samples, spsa_step)

  def __call__(self, embedding, obs, mask, key):
    gradient, samples, step = self.layer_settings

    def stage(params, key_k):
      return em_stage(params, obs, mask, key_k, gradient=gradient, num_samples=samples,
                      step=step), None

    # A scan over stages compiles the EM layer once, not num_stages times.
    params, _ = jax.lax.scan(stage, self.start(embedding),
                             jax.random.split(key, self.num_stages))
    return params


class DENNL(nnx.Module):
  """Differentiable EM as a network layer (paper Fig. 1).

  lambda0 = g(e) and h_0 = tanh(W e); then for k = 0..num_stages-1:
    lambda' = EM(lambda_k; obs)                          (em_stage)
    (delta, h_{k+1}) = MLP(z(lambda'), h_k, e)           (shared across k and users)
    lambda_{k+1} = decode(z(lambda') + delta)
  where z is the codec's pre-activation vector.  Returns lambda_K.
  """

  def __init__(self, codec: ParamCodec, start, embed_dim: int, *, num_stages: int = 3,
               hidden: Sequence[int] = (256, 256), start_hidden: Sequence[int] = (128, 128),
               latent_dim: int = 32, correction_scale: float = 0.1, gradient: str = "spsa",
               spsa_samples: int = 16, spsa_step: float = 1e-3, rngs: nnx.Rngs):
    if gradient not in GRADIENT_MODES:
      raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {gradient!r}")
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
    _zero_output(self.correction)
    self.next_latent = nnx.Linear(hidden[-1], latent_dim, rngs=rngs)
    self.num_stages = num_stages
    self.correction_scale = correction_scale
    self.layer_settings = (gradient, spsa_samples, spsa_step)

  def _scan(self, embedding, obs, mask, key):
    gradient, samples, step = self.layer_settings

    def stage(carry, key_k):
      params, latent = carry
      after_em = em_stage(params, obs, mask, key_k, gradient=gradient, num_samples=samples,
                          step=step)
      pre = self.codec.encode_batch(after_em)
      features = jnp.concatenate(
          [jnp.clip(pre, -INPUT_CLIP, INPUT_CLIP), latent, embedding], axis=-1)
      hidden = jax.nn.gelu(self.trunk(self.input_norm(features)))
      params = self.codec.decode_batch(pre + self.correction_scale * self.correction(hidden))
      latent = jnp.tanh(self.next_latent(hidden))
      return (params, latent), params

    start = self.start(embedding)
    carry = (start, jnp.tanh(self.context(embedding)))
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


# --------------------------------------------------------------------------
# Starts: per-user k-means++ (Conventional EM) and the pooled start.


def kmeans(key, points, mask, num_clusters: int, num_iters: int = 10):
  """k-means++ seeding then Lloyd iterations on the valid points of one set.

  points: (N, O); mask: (N,) bool.  Returns ``(centers: (C, O), labels: (N,))``.
  An empty cluster keeps its center.
  """
  num_points = points.shape[0]
  keys = jax.random.split(key, num_clusters)
  valid = jnp.asarray(mask, bool)
  first = jax.random.categorical(keys[0], jnp.where(valid, 0.0, -jnp.inf))
  centers = jnp.zeros((num_clusters, points.shape[1]), points.dtype).at[0].set(points[first])

  def seed(c, centers):
    d2 = jnp.sum((points[:, None, :] - centers[None, :, :]) ** 2, -1)
    d2 = jnp.where(jnp.arange(num_clusters)[None, :] < c, d2, jnp.inf).min(1)
    logits = jnp.where(valid & (d2 > 0), jnp.log(jnp.maximum(d2, 1e-30)), -jnp.inf)
    # All valid points coincide with centers: fall back to any valid point.
    logits = jnp.where(jnp.any(jnp.isfinite(logits)), logits, jnp.where(valid, 0.0, -jnp.inf))
    pick = jax.random.categorical(keys[c], logits)
    return centers.at[c].set(points[pick])

  centers = jax.lax.fori_loop(1, num_clusters, seed, centers)

  def lloyd(_, centers):
    d2 = jnp.sum((points[:, None, :] - centers[None, :, :]) ** 2, -1)
    onehot = jax.nn.one_hot(jnp.argmin(d2, 1), num_clusters) * valid[:, None]
    count = onehot.sum(0)
    new = (onehot.T @ points) / jnp.maximum(count, 1.0)[:, None]
    return jnp.where(count[:, None] > 0, new, centers)

  centers = jax.lax.fori_loop(0, num_iters, lloyd, centers)
  labels = jnp.argmin(jnp.sum((points[:, None, :] - centers[None, :, :]) ** 2, -1), 1)
  del num_points
  return centers, labels


def _within_cluster_covariance(points, mask, centers, labels, min_covar):
  """Pooled within-cluster covariance (O, O) of the valid points."""
  diff = (points - centers[labels]) * mask[:, None]
  count = jnp.maximum(jnp.sum(mask), 2.0)
  cov = diff.T @ diff / (count - 1.0)
  return cov + min_covar * jnp.eye(points.shape[1], dtype=points.dtype)


def make_hsmm(initial, transition, rate, mean, cov, max_duration: int, min_covar: float):
  """An HSMM with Poisson durations and full-covariance Gaussian emissions."""
  return HSMM(initial, transition, PoissonDuration(rate, max_duration=max_duration),
              em_families.Gaussian(mean, cov, min_covar=min_covar))


def _uniform_off_diagonal(num_states, dtype=jnp.float32):
  off = 1.0 - jnp.eye(num_states, dtype=dtype)
  return off / (num_states - 1)


def user_start(key, obs, mask, *, num_states: int, max_duration: int, min_covar: float,
               duration_rate: float = 4.0, kmeans_iters: int = 10):
  """Conventional EM's start for one user, from that user's data only.

  Means: k-means++ then Lloyd on the user's observations.  Covariances: the
  pooled within-cluster covariance of those clusters (the same for every
  state: a per-cluster one is singular with a handful of points).
  Transitions and the initial distribution: uniform.  Durations: Poisson
  with a fixed moderate rate (mean duration 1 + rate).
  """
  mask = jnp.asarray(mask, bool)
  centers, labels = kmeans(key, obs, mask, num_states, kmeans_iters)
  cov = _within_cluster_covariance(obs, mask, centers, labels, min_covar)
  dtype = obs.dtype
  return make_hsmm(jnp.full((num_states,), 1.0 / num_states, dtype),
                   _uniform_off_diagonal(num_states, dtype),
                   jnp.full((num_states,), duration_rate, dtype), centers,
                   jnp.broadcast_to(cov, (num_states,) + cov.shape), max_duration, min_covar)


@partial(jax.jit, static_argnames=("num_states", "max_duration", "min_covar", "num_iters"))
def _conventional_em(keys, obs, mask, num_states, max_duration, min_covar, num_iters):
  starts = jax.vmap(lambda k, o, m: user_start(
      k, o, m, num_states=num_states, max_duration=max_duration, min_covar=min_covar))(
          keys, obs, mask)

  def body(params, _):
    new, ll = jax.vmap(lambda p, o, m: p.em_update(o, m))(params, obs, mask)
    return new, ll

  fitted, trace = jax.lax.scan(body, starts, None, length=num_iters)
  return fitted, trace.T


def conventional_em(key, obs, mask, *, num_states: int, max_duration: int, num_iters: int = 50,
                    min_covar: float = 1e-3, chunk_size: int = 256):
  """Per-user EM with no sharing: each user starts from its own k-means++.

  obs: (U, T, O); mask: (U, T).  Returns ``(fitted batched HSMM,
  log-likelihood trace (U, num_iters))`` (the log-likelihood before each
  iteration).  Users are processed in chunks to bound memory.
  """
  obs = jnp.asarray(obs)
  mask = jnp.asarray(mask, bool)
  num_users = obs.shape[0]
  keys = jax.random.split(key, num_users)
  fitted, traces = [], []
  for lo in range(0, num_users, chunk_size):
    hi = min(lo + chunk_size, num_users)
    # Pad a short chunk to chunk_size: one compiled function for any U.
    size = chunk_size if num_users > chunk_size else num_users
    chunk = _pad_users((keys[lo:hi], obs[lo:hi], mask[lo:hi]), size)
    f, t = _conventional_em(*chunk, num_states, max_duration, float(min_covar), num_iters)
    fitted.append(jax.tree_util.tree_map(lambda x: x[:hi - lo], f))
    traces.append(t[:hi - lo])
  cat = lambda *xs: jnp.concatenate(xs, axis=0)
  return jax.tree_util.tree_map(cat, *fitted), jnp.concatenate(traces, 0)


def pooled_start(key, obs, mask, *, num_states: int, max_duration: int, min_covar: float = 1e-3,
                 duration_rate: float = 4.0, max_points: int = 20000, kmeans_iters: int = 25):
  """One shared start from all training users' observations pooled together.

  k-means++ on (a random subset of) the pooled valid observations; each
  state's covariance is its own cluster's covariance (plenty of points when
  pooled); uniform transitions and initial distribution; Poisson rate
  ``duration_rate``.  Returns a single-user HSMM.
  """
  obs = np.asarray(obs)
  mask = np.asarray(mask, bool)
  points = obs[mask]
  key_sub, key_km = jax.random.split(key)
  if points.shape[0] > max_points:
    pick = np.asarray(jax.random.choice(key_sub, points.shape[0], (max_points,), replace=False))
    points = points[pick]
  points = jnp.asarray(points)
  valid = jnp.ones(points.shape[0], bool)
  centers, labels = jax.jit(kmeans, static_argnums=(3, 4))(key_km, points, valid, num_states,
                                                           kmeans_iters)
  onehot = jax.nn.one_hot(labels, num_states)
  count = jnp.maximum(onehot.sum(0), 2.0)
  diff = points[:, None, :] - centers[None, :, :]
  cov = jnp.einsum("nk,nki,nkj->kij", onehot, diff, diff) / (count - 1.0)[:, None, None]
  cov = cov + min_covar * jnp.eye(points.shape[1])
  dtype = points.dtype
  return make_hsmm(jnp.full((num_states,), 1.0 / num_states, dtype),
                   _uniform_off_diagonal(num_states, dtype),
                   jnp.full((num_states,), duration_rate, dtype), centers, cov.astype(dtype),
                   max_duration, min_covar)


def align_to_reference(params, reference_mean):
  """Permute each user's states so its means best match ``reference_mean``.

  params: batched HSMM (leading U); reference_mean: (K, O).  Solves one
  assignment problem per user (Hungarian, squared distances) and applies the
  permutation to every state-indexed parameter.  Used to give EM Mapping
  consistent regression targets (per-user EM labels are arbitrary).
  """
  from scipy.optimize import linear_sum_assignment
  means = np.asarray(params.emission.mean)
  ref = np.asarray(reference_mean)
  perms = []
  for m in means:
    cost = ((ref[:, None, :] - m[None, :, :]) ** 2).sum(-1)
    _, cols = linear_sum_assignment(cost)
    perms.append(cols)
  perms = jnp.asarray(np.stack(perms))

  def permute(p, perm):
    return HSMM(p.initial[perm], p.transition[perm][:, perm],
                p.duration.replace(rate=p.duration.rate[perm]),
                p.emission.replace(mean=p.emission.mean[perm], cov=p.emission.cov[perm]))

  return jax.vmap(permute)(params, perms)


@jax.jit
def _batched_viterbi(params, obs, mask):
  return jax.vmap(lambda p, o, m: p.most_likely_states(o, m))(params, obs, mask)


def _pad_users(tree, size):
  """Pad the leading (user) axis of every leaf to ``size`` by repeating user 0."""
  def pad(x):
    extra = size - x.shape[0]
    return x if extra == 0 else jnp.concatenate([x, jnp.repeat(x[:1], extra, 0)], 0)
  return jax.tree_util.tree_map(pad, tree)


def decode_states(params, obs, mask, chunk_size: int = 256):
  """Viterbi paths of a batch: (U, T) int32.

  Users go through in chunks of ``chunk_size`` (the last one padded), so
  every call with the same T reuses one compiled function.
  """
  num_users = obs.shape[0]
  out = []
  for lo in range(0, num_users, chunk_size):
    hi = min(lo + chunk_size, num_users)
    chunk = _pad_users((jax.tree_util.tree_map(lambda x: x[lo:hi], params), obs[lo:hi],
                        mask[lo:hi]), min(chunk_size, num_users) if lo == 0 else chunk_size)
    out.append(_batched_viterbi(*chunk)[:hi - lo])
  return jnp.concatenate(out, 0)
