"""The family contracts and the one place each parameter's constraint is declared.

A model is a tree of *parameterised* pytrees: ``HMM``/``HSMM`` hold arrays
(``initial``, ``transition``) and families (an :class:`EmissionFamily`, a
:class:`DurationFamily`), and every family holds arrays.  Each array field
declares its constraint once, as field metadata::

    @struct.dataclass
    class Categorical(EmissionFamily):
      probs: jax.Array = param(Simplex())        # (K, V), rows sum to one

and everything that depends on the constraint is derived from that one
declaration by :class:`Parameterised`:

* ``to_unconstrained()`` / ``from_unconstrained(theta)`` -- the bijection onto
  an unconstrained space that the EM layer perturbs (SPSA) and
  differentiates: floored log + softmax for simplices, log + exp for
  positive arrays, log-Cholesky for covariances, identity for free arrays.
* ``to_preactivation()`` / ``from_preactivation(z)`` -- the networks' output
  space (paper section 3): ``softplus(z)`` + L1 normalisation for
  simplices, ``softplus(z) + floor`` for positive arrays, ``L L^T + floor I``
  with a softplus-floored diagonal of ``L`` for covariances.  Encoding is the
  exact inverse on valid parameters (probabilities floored at ``PROB_FLOOR``).
* ``check_parameters()`` -- concrete-input validation (``ValueError`` naming
  the field).

Constraint kinds: :class:`Real`, :class:`Positive`, :class:`Simplex`
(``zero_diagonal=True`` for the HSMM transition) and
:class:`PositiveDefinite`.  A new kind is a subclass of :class:`Constraint`
(see docs/extending.md).
"""
from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dennl_jax import _checks
# The M-step toolkit of a family author (states without mass keep their
# parameters; see EmissionFamily.m_step), re-exported from the private module.
from dennl_jax._numerics import (MIN_STATE_MASS, floored_log, keep_where_empty,  # noqa: F401
                                 normalize_counts, safe_div)

# Pre-activation floors.  A decoded probability is at least about 1e-12 and
# an encoded one is floored at PROB_FLOOR (about -13.8 after inv_softplus);
# rates never go below RATE_FLOOR, Cholesky diagonals never below CHOL_FLOOR.
PROB_FLOOR = 1e-6
RATE_FLOOR = 1e-3
CHOL_FLOOR = 1e-4


def inv_softplus(y):
  """The inverse of softplus for y > 0: ``log(expm1(y))``, stable for all y."""
  return y + jnp.log(-jnp.expm1(-y))


def _encode_positive(x, floor):
  return inv_softplus(jnp.maximum(x - floor, 1e-6))


def _decode_positive(z, floor):
  return jax.nn.softplus(z) + floor


def _static(family, value):
  """A number, or the name of a static field of ``family`` holding it."""
  return getattr(family, value) if isinstance(value, str) else value


class Constraint(abc.ABC):
  """The domain of one parameter array, and everything derived from it.

  ``family`` is the pytree holding the array (for static settings such as
  ``min_covar``).  All four maps act on one model (no user axis).
  """

  @abc.abstractmethod
  def to_unconstrained(self, x, family):
    """Valid array -> finite real array of the same shape."""

  @abc.abstractmethod
  def from_unconstrained(self, z, family):
    """Any real array -> valid array (inverse of :meth:`to_unconstrained`)."""

  @abc.abstractmethod
  def to_preactivation(self, x, family):
    """Valid array -> the network output that decodes to it."""

  @abc.abstractmethod
  def from_preactivation(self, z, family):
    """Any real array -> valid array (the networks' output head)."""

  @abc.abstractmethod
  def check(self, name: str, x, family) -> None:
    """Raise ``ValueError`` naming ``name`` if the concrete ``x`` is invalid."""


class Real(Constraint):
  """Free real entries (e.g. Gaussian means): identity maps."""

  def to_unconstrained(self, x, family):
    return x

  def from_unconstrained(self, z, family):
    return z

  def to_preactivation(self, x, family):
    return x

  def from_preactivation(self, z, family):
    return z

  def check(self, name, x, family):
    _checks.check_finite(name, x)


@dataclasses.dataclass(frozen=True)
class Positive(Constraint):
  """Strictly positive entries (rates, variances).

  ``floor``: the smallest value the pre-activation head produces, a number
  or the name of a static field of the family (``"min_covar"``).
  """
  floor: float | str = RATE_FLOOR

  def to_unconstrained(self, x, family):
    return floored_log(x)

  def from_unconstrained(self, z, family):
    # exp(log(tiny)) rounds below the smallest normal number, which XLA:CPU
    # flushes to 0: an EM output's floored rate would come back as an invalid 0.
    return jnp.maximum(jnp.exp(z), jnp.finfo(jnp.result_type(z, float)).tiny)

  def to_preactivation(self, x, family):
    return _encode_positive(x, _static(family, self.floor))

  def from_preactivation(self, z, family):
    return _decode_positive(z, _static(family, self.floor))

  def check(self, name, x, family):
    _checks.check_positive(name, x)


def _off_diagonal(x):
  return ~jnp.eye(x.shape[-1], dtype=bool)


def _off_diagonal_softmax(logits):
  """Row softmax over the off-diagonal entries; the diagonal is exactly 0."""
  off = _off_diagonal(logits)
  # The shift cancels; no gradient through the max (see _numerics.scaled_likelihoods).
  top = jax.lax.stop_gradient(jnp.max(jnp.where(off, logits, -jnp.inf), axis=-1, keepdims=True))
  weights = jnp.where(off, jnp.exp(jnp.where(off, logits - top, 0.0)), 0.0)
  return weights / jnp.sum(weights, axis=-1, keepdims=True)


def _encode_probs(p):
  return inv_softplus(jnp.maximum(p, PROB_FLOOR))


def _decode_probs(z, mask=None):
  weights = jax.nn.softplus(z) + 1e-12
  if mask is not None:
    weights = jnp.where(mask, weights, 0.0)
  return weights / jnp.sum(weights, axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Simplex(Constraint):
  """Non-negative entries summing to one over the last axis.

  ``zero_diagonal``: a square matrix whose diagonal is exactly zero (the
  HSMM transition: a segment never jumps to its own state); the diagonal's
  unconstrained and pre-activation coordinates are stored as 0 and ignored.
  """
  zero_diagonal: bool = False

  def to_unconstrained(self, x, family):
    if self.zero_diagonal:
      return jnp.where(_off_diagonal(x), floored_log(x), 0.0)
    return floored_log(x)

  def from_unconstrained(self, z, family):
    if self.zero_diagonal:
      return _off_diagonal_softmax(z)
    return jax.nn.softmax(z, axis=-1)

  def to_preactivation(self, x, family):
    if self.zero_diagonal:
      return jnp.where(_off_diagonal(x), _encode_probs(x), 0.0)
    return _encode_probs(x)

  def from_preactivation(self, z, family):
    return _decode_probs(z, _off_diagonal(z) if self.zero_diagonal else None)

  def check(self, name, x, family):
    if self.zero_diagonal:
      diagonal = np.diagonal(np.asarray(x))
      if np.any(diagonal != 0):
        raise ValueError(
            f"{name} must have a zero diagonal (a segment never jumps to its own "
            f"state); found diagonal {diagonal}")
    _checks.check_distribution(name, x, axis=-1)


@dataclasses.dataclass(frozen=True)
class PositiveDefinite(Constraint):
  """Symmetric positive definite matrices ``(..., D, D)`` (full covariances).

  Unconstrained: the Cholesky factor with a log diagonal (every real
  lower-triangular matrix maps back to a valid covariance).  Pre-activation:
  ``L L^T + (jitter / 2) I`` with ``L`` free below the diagonal and
  ``softplus(.) + CHOL_FLOOR`` on it, ``jitter`` a number or the name of a
  static field (``"min_covar"``).  The ``jitter / 2`` term bounds the
  smallest eigenvalue, which keeps the float32 Cholesky factorisations of the
  next EM layer well conditioned (a floor on diag(L) alone does not).

  Encoding factors ``x - (jitter / 2) I``, whose smallest eigenvalue may be
  lost in rounding: a decoded ``x`` whose ``L L^T`` is (nearly) singular --
  a small diagonal of ``L`` under large off-diagonal entries -- sits on the
  floor up to the float rounding of ``x``, and an EM layer hands such a
  covariance on unchanged for a state without posterior mass (its M-step
  adds ``min_covar`` only to states it updates).  So the floor subtracted is
  smaller by ``dim * eps * max(diag x)`` (a few ulps of ``x``, above the
  backward error of a float Cholesky factorisation), the analogue of the
  floor :class:`Positive` applies before ``inv_softplus``: encoding any
  valid ``x`` is finite, and ``decode(encode(x)) = x`` up to that shift.
  """
  jitter: float | str = "min_covar"

  def to_unconstrained(self, x, family):
    chol = jnp.linalg.cholesky(x)
    diag = jnp.diagonal(chol, axis1=1, axis2=2)
    eye = jnp.eye(chol.shape[-1], dtype=chol.dtype)
    return jnp.tril(chol, -1) + eye * jnp.log(diag)[:, :, None]

  def from_unconstrained(self, z, family):
    eye = jnp.eye(z.shape[-1], dtype=z.dtype)
    log_diag = jnp.diagonal(z, axis1=1, axis2=2)
    chol = jnp.tril(z, -1) + eye * jnp.exp(log_diag)[:, :, None]
    return chol @ jnp.swapaxes(chol, 1, 2)

  def _floor(self, family):
    return 0.5 * _static(family, self.jitter)

  def to_preactivation(self, x, family):
    dim = x.shape[-1]
    # The floor less the rounding of x (see the class docstring): without it
    # an x on the floor gives an indefinite x - floor I and a NaN factor.
    rounding = dim * jnp.finfo(x.dtype).eps * jnp.max(
        jnp.diagonal(x, axis1=-2, axis2=-1), axis=-1)
    floor = self._floor(family) - rounding[..., None, None]
    chol = jnp.linalg.cholesky(x - floor * jnp.eye(dim, dtype=x.dtype))
    eye = jnp.eye(dim, dtype=bool)
    diag = _encode_positive(jnp.diagonal(chol, axis1=-2, axis2=-1), CHOL_FLOOR)
    return jnp.where(eye, diag[..., None] * jnp.eye(dim), jnp.tril(chol, -1))

  def from_preactivation(self, z, family):
    eye = jnp.eye(z.shape[-1], dtype=z.dtype)
    diag = _decode_positive(jnp.diagonal(z, axis1=-2, axis2=-1), CHOL_FLOOR)
    chol = jnp.tril(z, -1) + diag[..., None] * eye
    return chol @ jnp.swapaxes(chol, -1, -2) + self._floor(family) * eye

  def check(self, name, x, family):
    x = np.asarray(x)
    _checks.check_finite(name, x)
    if not np.allclose(x, np.swapaxes(x, -1, -2), atol=1e-6):
      raise ValueError(f"{name} must be symmetric")
    if np.any(np.linalg.eigvalsh(x) <= 0):
      raise ValueError(f"{name} must be positive definite")


def param(constraint: Constraint):
  """Declare an array field of a parameterised pytree and its constraint."""
  if not isinstance(constraint, Constraint):
    raise TypeError(f"param() needs a Constraint, got {constraint!r}")
  return struct.field(pytree_node=True, metadata={"constraint": constraint})


def _map_parameters(tree, method: str):
  """Apply ``constraint.<method>`` to every declared array, recursing into families."""
  changes = {}
  for field in dataclasses.fields(tree):
    value = getattr(tree, field.name)
    constraint = field.metadata.get("constraint")
    if constraint is not None:
      changes[field.name] = getattr(constraint, method)(value, tree)
    elif isinstance(value, Parameterised):
      changes[field.name] = _map_parameters(value, method)
  return tree.replace(**changes)


class Parameterised:
  """Base of every parameter pytree (families and models).

  Subclasses are ``flax.struct.dataclass``es whose array fields are declared
  with :func:`param`; fields holding other parameterised pytrees (a model's
  families) are recursed into.  Provides both bijections and the parameter
  check from those declarations.  All methods act on one model (no user axis).
  """

  def parameters(self):
    """``(name, constraint, value)`` for every declared array of this pytree."""
    return [(f.name, f.metadata["constraint"], getattr(self, f.name))
            for f in dataclasses.fields(self) if "constraint" in f.metadata]

  def to_unconstrained(self):
    """The same pytree type with finite unconstrained leaves (what SPSA perturbs)."""
    return _map_parameters(self, "to_unconstrained")

  @classmethod
  def from_unconstrained(cls, theta):
    """Inverse of :meth:`to_unconstrained`; any finite ``theta`` gives valid parameters."""
    return _map_parameters(theta, "from_unconstrained")

  def to_preactivation(self):
    """The same pytree type holding the networks' pre-activations."""
    return _map_parameters(self, "to_preactivation")

  @classmethod
  def from_preactivation(cls, pre):
    """Valid parameters from any finite pre-activation pytree (softplus + L1 heads)."""
    return _map_parameters(pre, "from_preactivation")

  def check_parameters(self) -> None:
    """Raise ``ValueError`` naming the first invalid declared array (concrete input)."""
    for name, constraint, value in self.parameters():
      dtype = np.asarray(value).dtype
      if dtype not in (np.float32, np.float64):
        raise ValueError(f"{type(self).__name__}.{name} has dtype {dtype}; parameters must be "
                         "float32 or float64 (cast them, e.g. with jnp.asarray(x, jnp.float32))")
      constraint.check(f"{type(self).__name__}.{name}", value, self)


class EmissionFamily(Parameterised, abc.ABC):
  """Per-state observation distributions ``b_k`` (a pytree with leading state axis K).

  A family is a ``flax.struct.dataclass`` subclass with its arrays declared
  by :func:`param`; it implements:

  * ``observation_shape(num_steps) -> tuple`` and the class attribute
    ``observation_dtype``: what ``obs: (T, ...)`` is.
  * ``log_likelihoods(obs) -> (T, K)``: ``log b_k(o_t)``.  Called on
    observations whose padded steps hold zeros, which must be a valid value.
  * ``expected_statistics(obs, weights) -> stats``: sufficient statistics
    (any pytree) weighted by ``weights: (T, K)`` (posterior marginals, zero
    on padded steps).
  * ``m_step(stats) -> family``: the weighted maximum-likelihood update;
    states with mass below ``MIN_STATE_MASS`` keep their parameters (never
    0/0 = NaN; use ``_numerics.safe_div`` and ``keep_where_empty``), and the
    update must be differentiable with finite gradients.
  * ``sample(key, state) -> obs_t``: one observation of state ``state``.
  * ``observation_mean() -> (K, ...)``: the expected observation per state.
  * ``check_observations(obs, mask)``: ``ValueError`` for invalid values on
    valid steps (concrete input).

  ``num_states``, both bijections and ``check_parameters`` are derived.
  """

  observation_dtype = jnp.float32

  @property
  def num_states(self) -> int:
    """K: the leading axis of the first declared array."""
    return self.parameters()[0][2].shape[0]

  @abc.abstractmethod
  def observation_shape(self, num_steps: int) -> tuple:
    """Shape of ``obs`` for a sequence of ``num_steps`` steps."""

  @abc.abstractmethod
  def log_likelihoods(self, obs):
    """(T, ...) observations -> (T, K) log-likelihoods."""

  @abc.abstractmethod
  def expected_statistics(self, obs, weights):
    """(T, ...) observations, (T, K) weights -> sufficient statistics pytree."""

  @abc.abstractmethod
  def m_step(self, stats):
    """Statistics -> updated family (empty states keep their parameters)."""

  @abc.abstractmethod
  def sample(self, key, state):
    """One observation (shape ``observation_shape(1)[1:]``) from state ``state``."""

  @abc.abstractmethod
  def observation_mean(self):
    """(K, ...) expected observation per state."""

  @abc.abstractmethod
  def check_observations(self, obs, mask) -> None:
    """Raise ``ValueError`` naming the problem with concrete ``obs`` on valid steps."""

  def observation_errors(self, obs, mask) -> list:
    """The traceable twin of :meth:`check_observations` (``dennl_jax.checked``).

    obs: (..., T, ...) and mask: (..., T) bool, traced or concrete, with any
    leading batch axes.  Returns ``[(message, flag)]``: ``flag`` a bool
    scalar, True when some valid step is outside the family's domain.  The
    default has none; families whose log-likelihoods are only defined on part
    of their observation space name it here.
    """
    del obs, mask
    return []


class DurationFamily(Parameterised, abc.ABC):
  """Per-state segment-duration distributions ``p_k(d)``, ``d = 1 ... D``, of an HSMM.

  Implements:

  * ``num_states`` (K) and ``max_duration`` (D, static: it fixes shapes; a
    property or a static field).
  * ``log_probs() -> (K, D)``: ``log p_k(d)`` in column ``d - 1``.
  * ``m_step(duration_counts: (K, D)) -> family``: the maximum-likelihood
    update from expected counts of segments of each duration; states without
    mass keep their parameters; differentiable with finite gradients.

  Both bijections and ``check_parameters`` are derived from the declared
  arrays.
  """

  @property
  @abc.abstractmethod
  def num_states(self) -> int:
    """K."""

  @abc.abstractmethod
  def log_probs(self):
    """(K, D) log-probabilities of durations 1 ... D."""

  @abc.abstractmethod
  def m_step(self, duration_counts):
    """(K, D) expected duration counts -> updated family."""
