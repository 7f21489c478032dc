"""Public inference API: one padded sequence in, posteriors out.

Every function takes a model (``HMM`` or ``HSMM``), ``obs: (T, ...)`` and
``mask: (T,) bool`` for one sequence, is a pure JAX function that jits and
vmaps over users, and -- when called with concrete arrays -- validates its
inputs first, raising ``ValueError`` that names the problem.  Inside ``jit``
or ``vmap`` the value checks cannot run; call :func:`validate` on the
concrete batch beforehand (or wrap with ``jax.experimental.checkify``; see
:func:`checked`).

Signatures carry the shapes as jaxtyping annotations (``num_timesteps`` = T,
``num_states`` = K, ``num_users`` = U); they document, nothing checks them at
run time.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, Real, Shaped

from dennl_jax import _checks
from dennl_jax.chunking import chunked_map


def validate(params, obs: Real[Array, "..."],
             mask: Bool[Array, "*num_users num_timesteps"]) -> None:
  """Raise ``ValueError`` naming the first problem with (params, obs, mask).

  Works on one sequence (``obs: (T, ...)``, ``mask: (T,)``) or on a batch
  with a leading user axis on all three.  Checks: shapes, mask dtype and at
  least one valid step, observation domain (range, sign, finiteness on valid
  steps) and that parameters are valid distributions.
  """
  mask_np = np.asarray(mask)
  if mask_np.ndim == 2:
    num_users = mask_np.shape[0]
    for name, tree in (("obs", obs), ("params", params)):
      for leaf in jax.tree_util.tree_leaves(tree):
        if np.shape(leaf)[:1] != (num_users,):
          raise ValueError(
              f"{name} must have a leading user axis of size {num_users} to match mask "
              f"{mask_np.shape}; found a leaf of shape {np.shape(leaf)}")
    for u in range(num_users):
      try:
        validate(jax.tree_util.tree_map(lambda x: x[u], params),
                 np.asarray(obs)[u], mask_np[u])
      except ValueError as err:
        raise ValueError(f"user {u}: {err}") from None
    return
  if mask_np.ndim != 1:
    raise ValueError(f"mask must have shape (T,) or (U, T), got {mask_np.shape}")
  obs_np = np.asarray(obs)
  if obs_np.ndim == 0:
    raise ValueError("obs must have a time axis; got a scalar")
  mask_np = _checks.check_mask(mask_np, obs_np.shape[0])
  params.check_parameters()
  params.emission.check_observations(obs_np, mask_np)


def validate_if_concrete(params, obs: Real[Array, "..."],
                         mask: Bool[Array, "*num_users num_timesteps"]) -> None:
  if _checks.is_concrete(params, obs, mask):
    validate(params, obs, mask)


def as_mask(mask: Shaped[ArrayLike, "*shape"]) -> Bool[Array, "*shape"]:
  return jnp.asarray(mask, bool)


def log_likelihood(params, obs: Real[Array, "num_timesteps ..."],
                   mask: Bool[Array, "num_timesteps"]) -> Float[Array, ""]:
  """Marginal log-likelihood () of the valid steps of one sequence."""
  validate_if_concrete(params, obs, mask)
  return params.log_likelihood(obs, as_mask(mask))


def posterior(params, obs: Real[Array, "num_timesteps ..."], mask: Bool[Array, "num_timesteps"]):
  """All posterior summaries of one sequence as a NamedTuple.

  ``HMMPosterior`` for an HMM, ``HSMMPosterior`` for an HSMM; both carry
  ``log_likelihood``, ``smoothed_probs (T, K)`` and ``transition_counts (K, K)``.
  """
  validate_if_concrete(params, obs, mask)
  return params.posterior(obs, as_mask(mask))


def filtered_posteriors(
    params, obs: Real[Array, "num_timesteps ..."],
    mask: Bool[Array, "num_timesteps"]) -> Float[Array, "num_timesteps num_states"]:
  """p(z_t | o_{1:t}) for every step, (T, K)."""
  validate_if_concrete(params, obs, mask)
  return params.filtered_posteriors(obs, as_mask(mask))


def smoothed_posteriors(
    params, obs: Real[Array, "num_timesteps ..."],
    mask: Bool[Array, "num_timesteps"]) -> Float[Array, "num_timesteps num_states"]:
  """p(z_t | o_{1:T}) for every step, (T, K)."""
  return posterior(params, obs, mask).smoothed_probs


def expected_transition_counts(
    params, obs: Real[Array, "num_timesteps ..."],
    mask: Bool[Array, "num_timesteps"]) -> Float[Array, "num_states num_states"]:
  """sum_t p(z_{t-1}=i, z_t=j | o) over consecutive valid steps, (K, K).

  For an HSMM these are the expected counts of segment-to-segment jumps.
  """
  return posterior(params, obs, mask).transition_counts


def viterbi(params, obs: Real[Array, "num_timesteps ..."],
            mask: Bool[Array, "num_timesteps"]) -> Int[Array, "num_timesteps"]:
  """Most likely state path of one sequence.

  Args:
    params: ``HMM`` or ``HSMM`` (no user axis); obs: (T, ...); mask: (T,) bool.

  Returns:
    (T,) int32 state path; masked steps repeat the carried state.  For an
    HSMM this is the exact most likely path (= segmentation) of the
    right-censored model.  For an impossible sequence (log-likelihood
    ``-inf``) it is the most likely path of the sequence with the impossible
    steps' observations dropped, as for the posteriors.

  Example::

    path = dj.viterbi(hmm, obs, mask)
    paths = jax.jit(jax.vmap(dj.viterbi))(hmms, obs_batch, mask_batch)   # (U, T)
  """
  validate_if_concrete(params, obs, mask)
  return params.most_likely_states(obs, as_mask(mask))


def sample(key: PRNGKeyArray, params, num_steps: int
           ) -> tuple[Int[Array, "num_steps"], Real[Array, "num_steps ..."]]:
  """Draw one sequence from one model.

  Args:
    key: PRNG key (first: drawing is the function's purpose).
    params: ``HMM`` or ``HSMM`` (no user axis).
    num_steps: T, a static Python int.

  Returns:
    ``(states: (T,) int32, obs: (T, ...))``.  An HSMM's path is the process
    cut off after T steps (right-censored last segment).

  Example::

    states, obs = dj.sample(jax.random.key(0), hmm, 100)
    keys = jax.random.split(key, num_users)
    states, obs = jax.vmap(lambda k: dj.sample(k, hmm, 100))(keys)   # (U, T), (U, T, ...)
  """
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
  if _checks.is_concrete(params):
    params.check_parameters()
  return params.sample(key, int(num_steps))


@jax.jit
def _batched_viterbi(chunk, index):
  del index
  params, obs, mask = chunk
  return jax.vmap(lambda p, o, m: p.most_likely_states(o, m))(params, obs, mask)


def decode_states(params, obs: Real[Array, "num_users num_timesteps ..."],
                  mask: Bool[Array, "num_users num_timesteps"],
                  chunk_size: int = 256) -> Int[Array, "num_users num_timesteps"]:
  """Viterbi paths of a batch of users: (U, T) int32.

  params: batched model (leading U); obs: (U, T, ...); mask: (U, T) bool.
  Users go through in chunks of ``chunk_size`` (the last one padded), so
  every call with the same T reuses one compiled function.  Concrete inputs
  are validated as :func:`validate` does (the user axes must agree).
  """
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  if np.ndim(mask) != 2:
    raise ValueError(f"mask must have shape (U, T) (a batch of users), got {np.shape(mask)}")
  validate_if_concrete(params, obs, mask)
  return chunked_map(_batched_viterbi, (params, obs, mask), chunk_size)


def stationary_distribution(
    transition: Float[Array, "num_states num_states"]) -> Float[Array, "num_states"]:
  """Stationary distribution pi = pi A of an ergodic chain, (K,).

  Solves (A^T - I) pi = 0 together with sum(pi) = 1 by least squares.  For a
  reducible chain (several closed classes) the solutions form a set; the
  result is its minimum-norm member, itself a stationary distribution (for
  the identity, the uniform one).
  """
  transition = jnp.asarray(transition)
  if _checks.is_concrete(transition):
    _checks.check_distribution("transition", transition, axis=-1)
  num_states = transition.shape[-1]
  system = jnp.concatenate([transition.T - jnp.eye(num_states, dtype=transition.dtype),
                            jnp.ones((1, num_states), transition.dtype)])
  rhs = jnp.zeros(num_states + 1, transition.dtype).at[-1].set(1.0)
  return jnp.linalg.lstsq(system, rhs)[0]


def checked(fn):
  """Wrap a public function ``fn(params, obs, mask, ...)`` so its value checks
  also run under ``jit`` and ``vmap``.

  Uses ``jax.experimental.checkify``: ``err, out = dj.checked(dj.log_likelihood)(
  params, obs, mask)``, then ``err.throw()``.  It flags, by name:

  * a sequence whose mask has no valid step;
  * observations outside the emission family's domain on valid steps (the
    family's ``observation_errors``: a category out of range, a negative,
    non-finite or fractional Poisson count, non-finite or negative
    Multinomial counts, non-finite Gaussian observations);
  * a NaN anywhere in the result.

  ``fn`` may be batched (``dj.checked(jax.vmap(dj.em_step))``: the checks see
  the leading user axis) or batched around (``jax.vmap(dj.checked(fn))``: the
  error names the user).  The checks are a ``checkify`` function of the
  inputs and the result, beside ``fn`` rather than around it: checkify
  cannot transform a batched while loop (the Poisson-duration M-step's
  Newton iterations) nor look inside the users-minor kernels, so it checks
  what goes in and what comes out.  A ``-inf`` log-likelihood (an impossible
  sequence) is a value, not an error.
  """
  name = getattr(fn, "__name__", "the function")

  def checks(params, obs, mask, out):
    valid = jnp.asarray(mask, bool)
    checkify.check(jnp.all(jnp.any(valid, axis=-1)),
                   "mask has no valid step; a sequence needs at least one observation")
    for message, bad in params.emission.observation_errors(jnp.asarray(obs), valid):
      checkify.check(~bad, message)
    floats = [x for x in jax.tree_util.tree_leaves(out)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if floats:
      checkify.check(~jnp.any(jnp.stack([jnp.any(jnp.isnan(x)) for x in floats])),
                     f"{name} returned NaN")

  checkified = checkify.checkify(checks, errors=checkify.user_checks)

  def with_checks(params, obs, mask, *args, **kwargs):
    out = fn(params, obs, mask, *args, **kwargs)
    err, _ = checkified(params, obs, mask, out)
    return err, out

  return with_checks
