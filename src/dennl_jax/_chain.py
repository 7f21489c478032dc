"""What HMM and HSMM share: the model protocol and its model-independent parts.

Both models are parameter pytrees with ``initial: (K,)``, ``transition:
(K, K)`` and an ``emission`` family (the HSMM adds a ``duration`` family).
They differ only in their recursions (``posterior``, ``log_likelihood``,
``filtered_posteriors``, ``most_likely_states``), in how a state path is
drawn (``_sample_states``) and in model-specific M-step terms
(``_extra_m_step``); everything else lives here once: the EM iteration, the
initial/transition/emission M-step, the parameter checks and the emission
tail of ``sample``.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from dennl_jax import _checks, _dispatch
from dennl_jax._numerics import fill_masked, normalize_counts
from dennl_jax.families import Parameterised


def masked_log_likelihoods(emission, obs, mask):
  """(T, K) emission log-likelihoods with 0 on masked steps.

  Masked observations are replaced by zeros first so a garbage value there
  cannot produce NaN (which would poison gradients through ``where``).
  """
  mask = jnp.asarray(mask, bool)
  log_likes = emission.log_likelihoods(fill_masked(obs, mask))
  valid = mask[:, None].astype(log_likes.dtype)
  # = where(mask, log_likes, 0) as arithmetic: XLA:CPU runs a select on the
  # broadcast mask ~4x slower than the whole Categorical gather and log (3.4
  # vs 0.8 ms for 512 users x 100 steps x 10 states, measured).  log1p(-valid)
  # is -inf on valid steps and 0 on masked ones, for a -inf log-likelihood; a
  # NaN on a valid step stays NaN.
  return jnp.where(log_likes == -jnp.inf, jnp.log1p(-valid), log_likes * valid)


def _em_step_one(params, obs, mask, symmetric_vjp: bool):
  post = params._e_step(obs, mask, symmetric_vjp)
  return params.m_step(post, obs, mask), post.log_likelihood


# Under jax.vmap: blocks of users (the model's Kernels.block()).  Not with the
# symmetric VJP: the blocks' derivative is a JVP, which a custom_vjp cannot have.
# (custom_vmap binds every parameter, defaults included, as an array: hence the lambda.)
_em_step_in_user_blocks = _dispatch.in_user_blocks(
    lambda params, obs, mask: _em_step_one(params, obs, mask, False))


class ChainModel(Parameterised):
  """Base of :class:`~dennl_jax.HMM` and :class:`~dennl_jax.HSMM` (one sequence, no user axis).

  Model protocol (every public function in :mod:`dennl_jax.inference` and
  :mod:`dennl_jax.em` calls only these): ``posterior(obs, mask)``,
  ``log_likelihood(obs, mask)``, ``filtered_posteriors(obs, mask)``,
  ``most_likely_states(obs, mask)``, ``em_step(obs, mask)``,
  ``sample(key, num_steps)``, ``check_parameters()`` and the two bijections
  of :class:`~dennl_jax.families.Parameterised`.
  """

  # Whether a vmapped em_step runs in blocks of users (dennl_jax._dispatch.USERS_PER_BLOCK).
  # Measured faster for HMMs; not for HSMMs: blocks of 128-256 users of a T = 100 HSMM
  # were 0-5 % apart from one batch on one core and up to 40 % slower with two
  # threads, whose (D, K, U) steps keep both threads busy.
  em_step_in_user_blocks: ClassVar[bool] = False

  @property
  def kernel_options(self) -> _dispatch.Kernels:
    """The model's static ``kernels`` and ``users_per_block`` fields as a
    :class:`~dennl_jax.Kernels` (validated)."""
    return _dispatch.Kernels(self.kernels, self.users_per_block)

  @property
  def num_states(self) -> int:
    return self.initial.shape[-1]

  def families(self):
    """``(field name, family)`` for every family this model holds, in field order."""
    return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Parameterised)]

  def em_step(self, obs, mask, score_vjp: bool = False):
    """One EM iteration on one sequence.

    obs: (T, ...); mask: (T,) bool.  Returns ``(new_params,
    log_likelihood_before)``: the M-step of the posterior under ``self`` and
    the log-likelihood () of the valid steps under ``self``.
    score_vjp: take the E-step from the score with the symmetric VJP of
    :mod:`dennl_jax._score` (same values; faster reverse mode, no forward mode).
    """
    mask = jnp.asarray(mask, bool)
    if score_vjp:
      return _em_step_one(self, obs, mask, True)
    if self.em_step_in_user_blocks:
      return _em_step_in_user_blocks(self.kernel_options, self, obs, mask)
    return _em_step_one(self, obs, mask, False)

  def m_step(self, post, obs, mask):
    """New parameters from posterior summaries ``post`` of ``(obs, mask)``.

    Initial: the smoothed marginal at the first valid step (kept when there
    is none).  Transition: the expected transition counts, row-normalised
    (rows without mass keep theirs).  Emission: the family's M-step of
    statistics weighted by the smoothed marginals (zero on masked steps).
    """
    mask = jnp.asarray(mask, bool)
    weights = jnp.where(mask[:, None], post.smoothed_probs, 0.0)
    stats = self.emission.expected_statistics(fill_masked(obs, mask), weights)
    return self.replace(
        # A sequence with no valid step (a padding user, see sharding.py) keeps its initial.
        initial=normalize_counts(post.initial_probs, self.initial),
        transition=normalize_counts(post.transition_counts, self.transition),
        emission=self.emission.m_step(stats),
        **self._extra_m_step(post))

  def _extra_m_step(self, post) -> dict:
    """Model-specific M-step terms, as ``{field: new value}``."""
    return {}

  def _e_step(self, obs, mask, symmetric_vjp: bool):
    """What :meth:`m_step` reads of ``posterior(obs, mask)``, from the model's score
    function (``filtered_probs`` None, ``smoothed_probs`` zero on masked steps);
    ``symmetric_vjp`` as in ``hmm_score``."""
    raise NotImplementedError

  def _sample_states(self, key, num_steps: int):
    """(states: (T,) int32, key for the observations)."""
    raise NotImplementedError

  def sample(self, key, num_steps: int):
    """``(states: (T,) int32, obs: (T, ...))`` drawn from the model."""
    # numpy leaves cannot be indexed by the traced states below.
    self = jax.tree_util.tree_map(jnp.asarray, self)
    states, key_obs = self._sample_states(key, num_steps)
    obs = jax.vmap(self.emission.sample)(jax.random.split(key_obs, num_steps), states)
    return states, obs

  def _check_num_states(self, num_states: int) -> None:
    """Model-specific limits on K (raise ``ValueError``)."""

  def check_parameters(self) -> None:
    """Raise ``ValueError`` naming the first problem (shapes, state counts, domains)."""
    name = type(self).__name__
    num_states = self.initial.shape[-1]
    _checks.check_shape(f"{name}.initial", self.initial, (num_states,))
    _checks.check_shape(f"{name}.transition", self.transition, (num_states, num_states))
    self._check_num_states(num_states)
    families = self.families()
    for field, family in families:
      if family.num_states != num_states:
        raise ValueError(
            f"{field} has {family.num_states} states but {name}.initial has {num_states}")
    super().check_parameters()
    for _, family in families:
      family.check_parameters()
