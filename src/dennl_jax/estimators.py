"""Stochastic Jacobians: SPSA (paper section 4) and forward gradients as ``jax.custom_vjp``.

Two generic wrappers turn ``fn(x, *aux) -> y`` (pytrees of float arrays) into
``wrapped(x, *aux, key)`` whose forward value is ``fn(x, *aux)`` and whose backward
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
* ``"orthogonal"`` -- variance reduction: the ``S`` directions are
  orthogonal to each other (columns of a Haar-random orthogonal matrix over
  all of ``x``'s coordinates, scaled to norm ``sqrt(M)``; blocks of ``M``
  when ``S > M``).  Each direction still has ``E[Delta Delta^T] = I``, so the
  estimate ``mean_s d_s Delta_s`` (used in place of ``d_s / Delta_s``, which
  is undefined for these continuous entries) stays unbiased up to O(c^2);
  but the directions cannot repeat or nearly cancel, and with ``S = M`` it
  recovers ``v^T J`` exactly (up to O(c^2)).  i.i.d. draws reach that only
  as ``S -> infinity``.

The PRNG key is an ordinary argument that receives no gradient; the auxiliary
arguments (observations, masks, ...) are treated as constants (zero
cotangent).  Under ``jax.vmap`` pass one key per batch element (``split``) so
every user draws independent perturbations; a broadcast key gives every user
the same directions, which correlates their errors in a batch-summed gradient.

:func:`dennl_jax.layer.em_layer` applies these to one EM iteration (``em_step``).
The key comes last, as for every function whose randomness is incidental to
a deterministic value (see the package docstring).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

PERTURBATIONS = ("rademacher", "segment", "orthogonal")


def check_settings(num_samples, step, perturbation):
  if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
    raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
  if step is not None and not (isinstance(step, (int, float)) and step > 0):
    raise ValueError(f"step must be a positive number, got {step!r}")
  if perturbation not in PERTURBATIONS:
    raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")


def _second_moment(perturbation):
  # E[Delta^2]: 1 for +-1 and for orthogonal rows of norm sqrt(M); for
  # sign * U(0.5, 1.5) it is (1.5^3 - 0.5^3) / 3.
  return 13.0 / 12.0 if perturbation == "segment" else 1.0


def _orthogonal(key, num_samples, dim, dtype):
  """(S, M) rows: blocks of orthogonal rows of norm sqrt(M), Haar within a block."""
  num_blocks = -(-num_samples // dim)
  width = min(num_samples, dim)
  gauss = jax.random.normal(key, (num_blocks, dim, width), dtype)
  q, r = jnp.linalg.qr(gauss)
  # Sign fix: makes q Haar-distributed (QR alone is biased toward +diag(r)).
  q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
  rows = jnp.swapaxes(q, -1, -2).reshape(num_blocks * width, dim)[:num_samples]
  return jnp.sqrt(jnp.asarray(dim, dtype)) * rows


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
  check_settings(num_samples, None, perturbation)
  leaves, treedef = jax.tree_util.tree_flatten(x)
  for leaf in leaves:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      raise ValueError(
          f"can only perturb floating-point leaves; got dtype {jnp.result_type(leaf)}")
  if perturbation == "orthogonal":
    flat, unravel = ravel_pytree(x)
    rows = _orthogonal(key, num_samples, flat.shape[0], flat.dtype)
    return jax.vmap(unravel)(rows)
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
  """custom_vjp of fn(x, *aux) with signature wrapped(x, *aux, key)."""

  @jax.custom_vjp
  def wrapped(x, *aux_and_key):
    return fn(x, *aux_and_key[:-1])

  def forward(x, *aux_and_key):
    aux, key = aux_and_key[:-1], aux_and_key[-1]
    return fn(x, *aux), (x, key, aux)

  def backward(residuals, cotangent):
    x, key, aux = residuals
    estimate = estimate_vjp(x, key, aux, cotangent)
    return (estimate,) + (None,) * len(aux) + (None,)

  wrapped.defvjp(forward, backward)
  return wrapped


def spsa(fn, *, num_samples: int = 16, step: float = 1e-3,
         perturbation: str = "rademacher"):
  """Wrap ``fn(x, *aux)`` so its VJP is the SPSA estimate (paper eq. 14).

  Args:
    fn: ``fn(x, *aux) -> y``; ``x`` and ``y`` pytrees of float arrays.
    num_samples: S, the number of simultaneous perturbations averaged.
    step: c, the finite-difference step (``x +- c * Delta``).
    perturbation: ``"rademacher"`` or ``"segment"`` (see module docstring).

  Returns:
    ``wrapped(x, *aux, key)`` with ``wrapped(x, *aux, key) == fn(x, *aux)``;
    the backward pass draws ``num_samples`` perturbations from ``key``,
    evaluates ``fn`` at ``x +- step * Delta`` (2 * num_samples evaluations in
    one vmapped call) and returns
    ``mean_s <v, fn(x+c D_s) - fn(x-c D_s)> / (2c) / D_s``.  ``key`` and
    ``aux`` get no gradient.  Composes with jit, vmap, scan, grad.

  Example::

    g = dj.spsa(lambda x, a: jnp.sin(x * a), num_samples=8)
    grad = jax.grad(lambda x: g(x, a, key).sum())(x)   # an SPSA estimate
  """
  check_settings(num_samples, step, perturbation)

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
    if perturbation == "orthogonal":
      return _weighted_mean(slopes, directions, lambda d: d)
    return _weighted_mean(slopes, directions, lambda d: 1.0 / d)

  return _wrap(fn, estimate_vjp)


def forward_gradient(fn, *, num_samples: int = 16, perturbation: str = "rademacher"):
  """Wrap ``fn(x, *aux)`` so its VJP is ``mean_s <v, J D_s> D_s / E[D^2]``.

  The SPSA estimator without finite-difference error: ``J D_s`` is the exact
  directional derivative (``jax.linearize`` once, then the linear map vmapped
  over the ``num_samples`` directions).  Unbiased; same signature as
  :func:`spsa`.
  """
  check_settings(num_samples, None, perturbation)
  second_moment = _second_moment(perturbation)

  def estimate_vjp(x, key, aux, cotangent):
    directions = perturbation_directions(key, x, num_samples, perturbation)
    _, directional = jax.linearize(lambda p: fn(p, *aux), x)
    tangents = jax.vmap(directional)(directions)
    slopes = _per_sample_dot(cotangent, tangents) / second_moment
    return _weighted_mean(slopes, directions, lambda d: d)

  return _wrap(fn, estimate_vjp)
