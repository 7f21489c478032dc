"""Stochastic Jacobians: SPSA (paper section 4) as a ``jax.custom_vjp``, and the EM layer.

Two generic wrappers turn ``fn(x, *aux) -> y`` (pytrees of float arrays) into
``g(x, key, *aux)`` whose forward value is ``fn(x, *aux)`` and whose backward
pass returns a *random, unbiased-up-to-O(c^2)* estimate of the vector-Jacobian
product ``v^T J`` (``J = dy/dx``) instead of the exact one:

* :func:`spsa` -- simultaneous perturbation (paper eq. 11-14).  With ``S``
  independent perturbations ``Delta_s`` (every coordinate of ``x`` perturbed
  at once, entries i.i.d. zero-mean) and step ``c``::

      d_s = < v, fn(x + c Delta_s) - fn(x - c Delta_s) > / (2 c)
      (v^T J)_j  ~=  mean_s  d_s / Delta_{s,j}

  which is exactly ``v^T J_hat`` with ``J_hat`` of eq. 14 averaged over the
  ``S`` draws.  ``E[J_hat] - J = O(c^2)`` (Theorem 1).  Cost: ``2 S``
  evaluations of ``fn``, batched with ``jax.vmap`` (one call, not a loop).

* :func:`forward_gradient` -- the same estimator with the finite difference
  replaced by the exact directional derivative ``J Delta_s`` (``jax.jvp``)::

      (v^T J)_j  ~=  mean_s  <v, J Delta_s> Delta_{s,j} / E[Delta^2]

  Unbiased for any zero-mean i.i.d. ``Delta`` because ``E[Delta Delta^T] =
  E[Delta^2] I`` (for Rademacher ``E[Delta^2] = 1`` and ``1/Delta = Delta``,
  so with the same key it is the ``c -> 0`` limit of :func:`spsa`).

Perturbation distributions (entries i.i.d., zero mean, bounded, with bounded
``E|1/Delta|`` as Theorem 1 requires):

* ``"rademacher"`` -- ``+-1`` with probability 1/2 (default; minimises the
  variance of ``d_s / Delta_j`` among such distributions).
* ``"segment"`` -- ``sign * U(0.5, 1.5)``, a continuous alternative.

The PRNG key is an ordinary argument that receives no gradient; the auxiliary
arguments (observations, masks, ...) are treated as constants (zero
cotangent).  Under ``jax.vmap`` pass one key per batch element (``split``) so
every user draws independent perturbations; a broadcast key gives every user
the same directions, which correlates their errors in a batch-summed gradient.

:func:`em_layer` applies these to one EM iteration (``em_step``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dennl_jax import inference

PERTURBATIONS = ("rademacher", "segment")
GRADIENT_MODES = ("spsa", "forward", "exact")


def _check_settings(num_samples, step, perturbation):
  if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
    raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
  if step is not None and not (isinstance(step, (int, float)) and step > 0):
    raise ValueError(f"step must be a positive number, got {step!r}")
  if perturbation not in PERTURBATIONS:
    raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")


def _second_moment(perturbation):
  # E[Delta^2]: 1 for +-1; for sign * U(0.5, 1.5) it is (1.5^3 - 0.5^3) / 3.
  return 1.0 if perturbation == "rademacher" else 13.0 / 12.0


def _draw(key, shape, dtype, perturbation):
  if perturbation == "rademacher":
    return jax.random.rademacher(key, shape, dtype)
  key_sign, key_size = jax.random.split(key)
  size = jax.random.uniform(key_size, shape, dtype, minval=0.5, maxval=1.5)
  return jax.random.rademacher(key_sign, shape, dtype) * size


def perturbation_directions(key, x, num_samples: int, perturbation: str = "rademacher"):
  """``num_samples`` random directions shaped like ``x``.

  Returns a pytree with the structure of ``x`` whose leaves have shape
  ``(num_samples,) + leaf.shape``; every coordinate is drawn independently.
  """
  _check_settings(num_samples, None, perturbation)
  leaves, treedef = jax.tree_util.tree_flatten(x)
  for leaf in leaves:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      raise ValueError(
          f"can only perturb floating-point leaves; got dtype {jnp.result_type(leaf)}")
  keys = jax.random.split(key, max(len(leaves), 1))
  drawn = [_draw(k, (num_samples,) + jnp.shape(leaf), jnp.result_type(leaf), perturbation)
           for k, leaf in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(treedef, drawn)


def _per_sample_dot(cotangent, batched):
  """<v, y_s> for each sample s: (S,).  Integer outputs (float0 cotangents) are skipped."""
  total = 0.0
  for v, y in zip(jax.tree_util.tree_leaves(cotangent), jax.tree_util.tree_leaves(batched)):
    if v.dtype == jax.dtypes.float0:
      continue
    total = total + jnp.sum((v[None] * y).reshape(y.shape[0], -1), axis=1)
  return total


def _weighted_mean(weights, directions, transform):
  """mean_s weights_s * transform(Delta_s), leaf by leaf."""
  def leaf(delta):
    w = weights.reshape(weights.shape + (1,) * (delta.ndim - 1)).astype(delta.dtype)
    return jnp.mean(w * transform(delta), axis=0)
  return jax.tree_util.tree_map(leaf, directions)


def _wrap(fn, estimate_vjp):
  """custom_vjp of fn(x, *aux) with signature g(x, key, *aux)."""

  @jax.custom_vjp
  def wrapped(x, key, *aux):
    return fn(x, *aux)

  def forward(x, key, *aux):
    return fn(x, *aux), (x, key, aux)

  def backward(residuals, cotangent):
    x, key, aux = residuals
    estimate = estimate_vjp(x, key, aux, cotangent)
    return (estimate, None) + (None,) * len(aux)

  wrapped.defvjp(forward, backward)
  return wrapped


def spsa(fn, *, num_samples: int = 16, step: float = 1e-3,
         perturbation: str = "rademacher"):
  """Wrap ``fn(x, *aux)`` so its VJP is the SPSA estimate (paper eq. 14).

  Returns ``g(x, key, *aux)`` with ``g(x, key, *aux) == fn(x, *aux)``; the
  backward pass draws ``num_samples`` perturbations from ``key``, evaluates
  ``fn`` at ``x +- step * Delta`` (2 * num_samples evaluations in one vmapped
  call) and returns ``mean_s <v, fn(x+c D_s) - fn(x-c D_s)> / (2c) / D_s``.
  ``key`` and ``aux`` get no gradient.  Composes with jit, vmap, scan, grad.
  """
  _check_settings(num_samples, step, perturbation)

  def estimate_vjp(x, key, aux, cotangent):
    directions = perturbation_directions(key, x, num_samples, perturbation)
    # Both signs in one batch of 2S evaluations.
    points = jax.tree_util.tree_map(
        lambda xi, d: jnp.concatenate([xi[None] + step * d, xi[None] - step * d]),
        x, directions)
    outputs = jax.vmap(lambda p: fn(p, *aux))(points)
    differences = jax.tree_util.tree_map(
        lambda y: y[:num_samples] - y[num_samples:], outputs)
    slopes = _per_sample_dot(cotangent, differences) / (2.0 * step)
    return _weighted_mean(slopes, directions, lambda d: 1.0 / d)

  return _wrap(fn, estimate_vjp)


def forward_gradient(fn, *, num_samples: int = 16, perturbation: str = "rademacher"):
  """Wrap ``fn(x, *aux)`` so its VJP is ``mean_s <v, J D_s> D_s / E[D^2]``.

  The SPSA estimator without finite-difference error: ``J D_s`` is the exact
  directional derivative (``jax.linearize`` once, then the linear map vmapped
  over the ``num_samples`` directions).  Unbiased; same signature as
  :func:`spsa`.
  """
  _check_settings(num_samples, None, perturbation)
  second_moment = _second_moment(perturbation)

  def estimate_vjp(x, key, aux, cotangent):
    directions = perturbation_directions(key, x, num_samples, perturbation)
    _, directional = jax.linearize(lambda p: fn(p, *aux), x)
    tangents = jax.vmap(directional)(directions)
    slopes = _per_sample_dot(cotangent, tangents) / second_moment
    return _weighted_mean(slopes, directions, lambda d: d)

  return _wrap(fn, estimate_vjp)


# --------------------------------------------------------------------------
# The EM layer.


def _em_of_unconstrained(theta, template, obs, mask):
  """em_step(template.from_unconstrained(theta)): the map every mode differentiates.

  Perturbing ``theta`` (log-probabilities, log-rates, log-Cholesky
  covariances, free means) keeps every perturbed model a valid distribution.
  """
  return template.from_unconstrained(theta).em_update(obs, mask)[0]


@functools.lru_cache(maxsize=None)
def _layer_function(gradient, num_samples, step, perturbation):
  if gradient == "spsa":
    return spsa(_em_of_unconstrained, num_samples=num_samples, step=step,
                perturbation=perturbation)
  if gradient == "forward":
    return forward_gradient(_em_of_unconstrained, num_samples=num_samples,
                            perturbation=perturbation)
  checkpointed = jax.checkpoint(_em_of_unconstrained)
  return lambda theta, key, *aux: checkpointed(theta, *aux)


def em_layer(params, obs, mask, key=None, *, gradient: str = "spsa", num_samples: int = 16,
             step: float = 1e-3, perturbation: str = "rademacher"):
  """One EM iteration as a differentiable network layer (paper section 3-4).

  params: ``HMM`` or ``HSMM`` for one sequence; obs: (T, ...); mask: (T,) bool;
  key: PRNG key (typed or raw uint32) for the gradient estimate, unused (may
  be None) when ``gradient="exact"``.  Returns the updated parameters, equal
  to ``em_step(params, obs, mask)`` (up to float rounding of the round trip
  through the unconstrained space).

  gradient:
    ``"spsa"``    -- SPSA estimate of the VJP (paper), ``2 * num_samples``
                    batched em_step evaluations, perturbation ``+- step * Delta``.
    ``"forward"`` -- same random directions, exact directional derivatives
                    (jax.linearize); no finite-difference error, unbiased.
    ``"exact"``   -- reverse-mode autodiff through the scans; the layer is
                    wrapped in ``jax.checkpoint`` so only its inputs are kept
                    between forward and backward (memory O(T K) per user while
                    one layer's backward runs, whatever the depth of the stack).

  All modes differentiate the same function, ``em_step`` composed with the
  round trip ``from_unconstrained(to_unconstrained(params))`` (which
  renormalises probabilities), and perturbations act on the unconstrained
  parameters, so a perturbed model is always a valid distribution.  Gradients
  reach ``params`` by the chain rule through ``to_unconstrained``; a
  probability that is exactly 0 has log = -inf there and gives NaN gradients,
  so feed strictly positive probabilities (softplus + L1 normalisation does).
  obs and mask get no gradient.  Batch users with ``jax.vmap`` and one key per
  user.
  """
  if gradient not in GRADIENT_MODES:
    raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {gradient!r}")
  _check_settings(num_samples, step, perturbation)
  if key is None and gradient != "exact":
    raise ValueError(f"gradient={gradient!r} needs a PRNG key; got key=None")
  mask = jnp.asarray(mask, bool)
  inference._validate_if_concrete(params, obs, mask)
  theta = params.to_unconstrained()
  template = jax.lax.stop_gradient(params)
  layer = _layer_function(gradient, num_samples, float(step), perturbation)
  return layer(theta, key, template, obs, mask)
