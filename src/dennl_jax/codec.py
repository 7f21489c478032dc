"""Parameter codec: one model's parameters <-> a flat pre-activation vector.

The networks see and produce parameters as one flat vector in the
*pre-activation* space of the paper's output heads (section 3):
probabilities (initial, transition rows, categorical tables) are
``softplus(z)`` followed by L1 normalisation -- for an HSMM the transition's
diagonal is masked to exactly zero before normalising; rates and variances
are ``softplus(z) + floor``; Gaussian means are free; a full covariance is
``L L^T + (min_covar / 2) I`` with ``L`` lower triangular, free below the
diagonal and ``softplus(.) + floor`` on it.  Each map is derived from the
constraint a family declares for each of its arrays
(:mod:`dennl_jax.families`), so the codec works for any family without
naming it.  ``encode`` is the exact inverse on valid parameters
(probabilities floored at ``PROB_FLOOR``), so ``decode(encode(p)) = p``.
"""
from __future__ import annotations

import chex
import jax
from jax.flatten_util import ravel_pytree


class ParamCodec:
  """Flat pre-activation vectors ``(P,)`` <-> one model's parameters.

  Built from a single-user template (its shapes, family types and static
  fields such as ``min_covar``/``max_duration``); holds no arrays.
  ``encode``/``decode`` act on one user; ``encode_batch``/``decode_batch``
  on a leading user axis.
  """

  def __init__(self, template):
    flat, self._unravel = ravel_pytree(template.to_preactivation())
    self.size = int(flat.shape[0])
    self.num_states = int(template.num_states)

  def encode(self, params):
    """(P,) pre-activation vector of one model."""
    return ravel_pytree(params.to_preactivation())[0]

  def decode(self, vector):
    """One model from any (P,) vector (always valid parameters)."""
    chex.assert_shape(vector, (self.size,))
    pre = self._unravel(vector)
    return type(pre).from_preactivation(pre)

  def encode_batch(self, params):
    return jax.vmap(self.encode)(params)

  def decode_batch(self, vectors):
    return jax.vmap(self.decode)(vectors)
