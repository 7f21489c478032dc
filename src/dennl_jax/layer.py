"""The EM layer: one EM iteration (``em_step``) as a differentiable network layer.

The forward value is ``em_step``; the backward pass is chosen by
``gradient`` (paper sections 3-4): an SPSA estimate, a forward-gradient
estimate (both from :mod:`dennl_jax.estimators`) or exact reverse-mode
autodiff.  Only the exact-autodiff mode has forward mode (``jax.jvp``); the others
define a custom VJP and say so when forward mode is tried.  All modes
differentiate the same map of the *unconstrained*
parameters (:meth:`~dennl_jax.families.Parameterised.to_unconstrained`), so
a perturbed model is always a valid distribution.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, PRNGKeyArray, Real

from dennl_jax import _checks, inference
from dennl_jax.estimators import check_settings, forward_gradient, spsa

GRADIENT_MODES = ("spsa", "forward", "exact", "exact_autodiff")
_KEYLESS_MODES = ("exact", "exact_autodiff")


def _em_of_unconstrained(theta, obs, mask, score_vjp=False):
  """em_step(from_unconstrained(theta)): the map every mode differentiates.

  Perturbing ``theta`` (log-probabilities, log-rates, log-Cholesky
  covariances, free means) keeps every perturbed model a valid distribution.
  """
  return type(theta).from_unconstrained(theta).em_step(obs, mask, score_vjp=score_vjp)[0]


@functools.lru_cache(maxsize=None)
def _layer_function(gradient, num_samples, step, perturbation):
  """``layer(theta, obs, mask, key)`` with the chosen backward pass."""
  if gradient == "spsa":
    return spsa(_em_of_unconstrained, num_samples=num_samples, step=step,
                perturbation=perturbation)
  if gradient == "forward":
    return forward_gradient(_em_of_unconstrained, num_samples=num_samples,
                            perturbation=perturbation)
  if gradient == "exact_autodiff":
    checkpointed = jax.checkpoint(_em_of_unconstrained)
    return lambda theta, obs, mask, key: checkpointed(theta, obs, mask)
  # No jax.checkpoint: the score VJP keeps only the E-step's inputs, so a stack of
  # layers needs less memory than checkpointed autodiff through the scans
  # (docs/performance.md), and nothing is computed twice.
  return lambda theta, obs, mask, key: _em_of_unconstrained(theta, obs, mask, score_vjp=True)


def check_gradient_mode(gradient: str) -> None:
  """Raise ``ValueError`` unless ``gradient`` is one of :data:`GRADIENT_MODES`."""
  if gradient not in GRADIENT_MODES:
    raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {gradient!r}")


@dataclasses.dataclass(frozen=True)
class EMLayer:
  """The EM layer's settings, callable as the layer: ``EMLayer(...)(params, obs,
  mask, key)`` is ``em_layer(params, obs, mask, key, **settings)``.

  Frozen and hashable, so a network keeps it as a static attribute.  Fields as
  in :func:`em_layer`: ``gradient`` (one of :data:`GRADIENT_MODES`),
  ``num_samples``, ``step`` and ``perturbation`` (the estimators' settings).
  """
  gradient: str = "exact"
  num_samples: int = 16
  step: float = 1e-3
  perturbation: str = "rademacher"

  def __post_init__(self):
    check_gradient_mode(self.gradient)
    check_settings(self.num_samples, self.step, self.perturbation)

  def __call__(self, params, obs: Real[Array, "num_timesteps ..."],
               mask: Bool[Array, "num_timesteps"], key: Optional[PRNGKeyArray] = None):
    return em_layer(params, obs, mask, key, gradient=self.gradient,
                    num_samples=self.num_samples, step=self.step,
                    perturbation=self.perturbation)


def em_layer(params, obs: Real[Array, "num_timesteps ..."], mask: Bool[Array, "num_timesteps"],
             key: Optional[PRNGKeyArray] = None, *, gradient: str = "exact",
             num_samples: int = 16, step: float = 1e-3, perturbation: str = "rademacher"):
  """One EM iteration as a differentiable network layer (paper sections 3-4).

  Args:
    params: ``HMM`` or ``HSMM`` for one sequence (no user axis).
    obs: (T, ...) observations; mask: (T,) bool.  Neither gets a gradient, in
      any mode: the estimators perturb parameters only, so the exact modes
      stop the gradient to ``obs`` too and every mode differentiates the same
      function of ``params``.
    key: PRNG key (typed or raw uint32) for the gradient estimate; unused
      (may be None) with the exact modes.
    gradient: ``"exact"`` by default: it is the mode that trains DENNL on the
      paper's synthetic benchmark; at the benchmark's size (M = 420
      unconstrained coordinates per user) SPSA with 8-128 perturbations
      estimates the network's gradient too noisily to train it
      (docs/results.md, "SPSA").
      ``"spsa"``    -- SPSA estimate of the VJP (paper), ``2 * num_samples``
                      batched em_step evaluations, perturbation ``+- step * Delta``.
      ``"forward"`` -- the forward-gradient estimate of the same VJP: same
                      random directions, exact directional derivatives
                      (jax.linearize); no finite-difference error, unbiased.
                      The layer itself still has reverse mode only.
      ``"exact"``   -- the exact gradient by reverse mode, with the E-step's
                      VJP computed as one forward-mode pass through the scans
                      (``em_step(..., score_vjp=True)``, :mod:`dennl_jax._score`);
                      forward mode (``jax.jvp``) through this mode is therefore
                      unavailable.  Between forward and backward a layer keeps
                      its inputs, log-likelihoods and M-step residuals, no
                      per-step recursion state (a 3-stage HSMM stack at
                      T = 10,000 needs 0.4 GiB of temporaries for 4 users, a
                      checkpointed autodiff one 1.0 GiB; docs/performance.md).
      ``"exact_autodiff"`` -- the same gradient by plain reverse-mode autodiff
                      through the scans, wrapped in ``jax.checkpoint`` (only the
                      layer's inputs are kept between forward and backward).
                      1.4-2.2x slower (T = 400 HSMMs) but forward mode works too
                      (``jax.jvp``, ``jax.jacfwd``, Hessians).
    num_samples, step, perturbation: settings of the estimators (see
      :func:`dennl_jax.spsa`).

  Returns:
    The updated parameters, equal to ``em_step(params, obs, mask)`` (up to
    float rounding of the round trip through the unconstrained space).

  All modes differentiate the same function, ``em_step`` composed with the
  round trip ``from_unconstrained(to_unconstrained(params))`` (which
  renormalises probabilities), and perturbations act on the unconstrained
  parameters.  Gradients reach ``params`` by the chain rule through
  ``to_unconstrained``; a probability that is exactly 0 has log = -inf there
  and gives NaN gradients, so feed strictly positive probabilities (softplus
  + L1 normalisation does).  Batch users with ``jax.vmap`` and one key per
  user.

  Example::

    keys = jax.random.split(key, num_users)
    layer = functools.partial(dj.em_layer, gradient="spsa", num_samples=16)
    new_params = jax.vmap(layer)(params, obs, mask, keys)   # leading axis U
  """
  check_gradient_mode(gradient)
  check_settings(num_samples, step, perturbation)
  if key is None and gradient not in _KEYLESS_MODES:
    raise ValueError(f"gradient={gradient!r} needs a PRNG key; got key=None")
  inference.validate_if_concrete(params, obs, mask)   # before the cast: a float mask is refused
  mask = jnp.asarray(mask, bool)
  layer = _layer_function(gradient, num_samples, float(step), perturbation)
  obs = jax.lax.stop_gradient(obs)
  try:
    return layer(params.to_unconstrained(), obs, mask, key)
  except TypeError as err:
    raise _checks.reverse_mode_only(err, f"em_layer(gradient={gradient!r})",
                            'em_layer(..., gradient="exact_autodiff")') from err

