"""Forecasting: where a sequence goes after its last valid step.

``forecast(params, obs, mask, num_steps)`` returns, for h = 1 ... H,

* ``state_probs[h-1] = p(z_{t*+h} | valid observations)`` with t* the last
  valid step of ``mask`` (masked steps are removed from the sequence, as
  everywhere in the engine, so padding anywhere never changes the result);
* ``observation_mean[h-1] = E[o_{t*+h} | valid observations]
  = sum_k state_probs[h-1, k] * E[o | z = k]`` (the family's
  ``observation_mean()``: symbol probabilities for Categorical, the expected
  strength vector of a unit-total observation for Multinomial, the rate for
  Poisson, the mean for the Gaussians).

Each model supplies ``forecast_states(obs, mask, num_steps)``: its own filter
run over the sequence followed by H evidence-free steps.  For an HMM that is
the filtered marginal at t* pushed through the transition matrix h times; for
an HSMM it is the filtered joint over (state, remaining duration) at t* --
the right-censored last segment's posterior -- pushed through the
semi-Markov dynamics (see ``HSMM.forecast_states``).
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Real

from dennl_jax.inference import as_mask, validate_if_concrete


class Forecast(NamedTuple):
  """Predictive distribution of the next ``H`` (``num_steps``) steps of one sequence.

  state_probs: (H, K) p(z_{t*+h} | valid observations), rows sum to one.
  observation_mean: (H, ...) predictive mean of the observation at t*+h:
    (H, V) for Categorical and Multinomial, (H,) for Poisson, (H, D) for the
    Gaussians.
  """
  state_probs: Float[Array, "num_steps num_states"]
  observation_mean: Float[Array, "num_steps ..."]


def _check_num_steps(num_steps) -> int:
  # Under jit a traced num_steps would fix no output shape; it must be static.
  if isinstance(num_steps, (bool, np.bool_)) or not isinstance(num_steps, (int, np.integer)):
    raise ValueError(
        f"num_steps must be a Python int >= 1 (static under jit), got {num_steps!r}")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  return int(num_steps)


def forecast(params, obs: Real[Array, "num_timesteps ..."], mask: Bool[Array, "num_timesteps"],
             num_steps: int) -> Forecast:
  """Forecast ``num_steps`` steps past the last valid step of one sequence.

  params: ``HMM`` or ``HSMM``; obs: (T, ...); mask: (T,) bool with at least
  one valid step; num_steps: static int H >= 1 (under ``jax.jit`` pass it as
  a static argument).  Returns :class:`Forecast`.  Jits and vmaps over users;
  with concrete inputs, bad inputs raise ``ValueError``.
  """
  num_steps = _check_num_steps(num_steps)
  validate_if_concrete(params, obs, mask)
  state_probs = params.forecast_states(obs, as_mask(mask), num_steps)
  per_state = params.emission.observation_mean()
  observation_mean = jnp.tensordot(state_probs, per_state.astype(state_probs.dtype), axes=1)
  return Forecast(state_probs, observation_mean)
