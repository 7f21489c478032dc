"""Converters between dennl_jax HMMs and hmmlearn models / dynamax parameters.

hmmlearn (``to_hmmlearn`` / ``from_hmmlearn``), one model at a time:

=====================  ==============================================  ====================
dennl_jax emission     hmmlearn model                                  fields
=====================  ==============================================  ====================
Categorical (K, V)     ``CategoricalHMM`` (obs ``(T, 1)`` int)         ``emissionprob_``
Multinomial (K, V)     ``MultinomialHMM(n_trials=n)`` (obs ``(T, V)``)  ``emissionprob_``
Poisson (K,)           ``PoissonHMM`` with one feature (obs ``(T, 1)``) ``lambdas_[:, 0]``
Gaussian (K, D[, D])   ``GaussianHMM(covariance_type="full")``         ``means_, covars_``
DiagGaussian (K, D)    ``GaussianHMM(covariance_type="diag")``         ``means_, covars_``
=====================  ==============================================  ====================

``from_hmmlearn`` also accepts ``covariance_type="spherical"`` (as a
DiagGaussian) and ``"tied"`` (as a Gaussian with the shared covariance
repeated): the same distributions, so ``to_hmmlearn`` of the result gives
``"diag"`` / ``"full"``.

dynamax (``to_dynamax`` / ``from_dynamax``; single or batched with leading
user axes): ``CategoricalHMM`` (``emission_dim=1``: probs ``(K, 1, V)``, obs
``(T, 1)``), ``MultinomialHMM`` (``emission_dim=1``: probs ``(K, 1, V)``, obs
``(T, 1, V)``), ``PoissonHMM`` (``emission_dim=1``: rates ``(K, 1)``, obs
``(T, 1)``), ``GaussianHMM`` (means, covs) and ``DiagonalGaussianHMM`` (means,
``scale_diags = sqrt(var)``).  Initial and transition are
``params.initial.probs`` and ``params.transitions.transition_matrix``.

Multinomial semantics.  Ours: ``log b_k(s) = sum_h s_h log p_kh`` for any
non-negative strength vector ``s`` (no multinomial coefficient).  hmmlearn's
``MultinomialHMM`` (>= 0.3) and dynamax's ``MultinomialHMM`` are the proper
multinomial over integer counts summing to ``n_trials``.  The parameters are
the same (``probs == emissionprob_``) and, on integer counts with that total,
the log-likelihoods differ by ``sum_t log(n! / prod_h s_th!)``, a constant
that does not depend on the parameters: posteriors, Viterbi paths and EM
updates are identical.  Non-integer strengths (normalised clicks) have no
hmmlearn/dynamax counterpart.  hmmlearn's old (< 0.3) ``MultinomialHMM`` was
a categorical HMM; that corresponds to our ``Categorical``.

Not convertible: an HSMM (neither library has explicit durations), Poisson
emissions with several features, other emission models (``ValueError``
naming what is unsupported).  hmmlearn and dynamax are imported only when a
converter runs (they are test extras, not dependencies).
"""
from __future__ import annotations

import numpy as np

from dennl_jax.emissions import Categorical, DiagGaussian, Gaussian, Multinomial, Poisson
from dennl_jax.hmm import HMM


def _hmm_only(hmm, target: str):
  if not isinstance(hmm, HMM):
    raise ValueError(f"only dennl_jax.HMM converts to {target} ({target} has no "
                     f"explicit-duration HSMM); got {type(hmm).__name__}")


def _check_each_user(hmm):
  """check_parameters on every model of a (possibly batched) HMM."""
  batch_shape = np.shape(hmm.initial)[:-1]
  for index in np.ndindex(*batch_shape):
    one = hmm if not batch_shape else _tree_index(hmm, index)
    try:
      one.check_parameters()
    except ValueError as err:
      raise ValueError(f"user {index}: {err}" if batch_shape else str(err)) from None


def _tree_index(tree, index):
  import jax
  return jax.tree_util.tree_map(lambda x: np.asarray(x)[index], tree)


# ---------------------------------------------------------------------------
# hmmlearn
# ---------------------------------------------------------------------------

def to_hmmlearn(hmm: HMM, *, n_trials=None, **kwargs):
  """An hmmlearn model with the parameters of ``hmm`` (one model, no user axis).

  n_trials: required for Multinomial emissions (hmmlearn's
    ``MultinomialHMM`` checks that every observation sums to it).
  kwargs: passed to the hmmlearn constructor (``n_iter``, ``params``,
    ``implementation``, priors, ...).  ``init_params`` defaults to ``""`` so
    that ``fit`` starts from these parameters instead of re-initialising.
    hmmlearn's priors are its own defaults unless given; EM agrees with
    :func:`~dennl_jax.em_step` with priors off (``means_weight=0,
    covars_prior=0, covars_weight=1`` for Gaussians) and ``min_covar=0``.
  Parameter arrays are float64 copies.
  """
  from hmmlearn import hmm as hl
  _hmm_only(hmm, "hmmlearn")
  if np.ndim(hmm.initial) != 1:
    raise ValueError(f"to_hmmlearn converts one model; got a batch of shape "
                     f"{np.shape(hmm.initial)[:-1]} (index the user axis first)")
  hmm.check_parameters()
  emission = hmm.emission
  if n_trials is not None and not isinstance(emission, Multinomial):
    raise ValueError(f"n_trials applies to Multinomial emissions only, not "
                     f"{type(emission).__name__}")
  kwargs = {"n_components": hmm.num_states, "init_params": "", **kwargs}
  if isinstance(emission, Categorical):
    model = hl.CategoricalHMM(n_features=emission.num_symbols, **kwargs)
    model.emissionprob_ = _float64(emission.probs)
  elif isinstance(emission, Multinomial):
    if n_trials is None:
      raise ValueError("Multinomial emissions need n_trials (the total count of every "
                       "observation) for hmmlearn's MultinomialHMM")
    model = hl.MultinomialHMM(n_trials=n_trials, **kwargs)
    model.emissionprob_ = _float64(emission.probs)
    model.n_features = emission.probs.shape[1]
  elif isinstance(emission, Poisson):
    model = hl.PoissonHMM(**kwargs)
    model.lambdas_ = _float64(emission.rate)[:, None]
    model.n_features = 1
  elif isinstance(emission, (Gaussian, DiagGaussian)):
    full = isinstance(emission, Gaussian)
    model = hl.GaussianHMM(covariance_type="full" if full else "diag", **kwargs)
    model.means_ = _float64(emission.mean)
    model.covars_ = _float64(emission.cov if full else emission.var)
    model.n_features = emission.mean.shape[1]
  else:
    raise ValueError(f"no hmmlearn counterpart for {type(emission).__name__} emissions")
  model.startprob_ = _float64(hmm.initial)
  model.transmat_ = _float64(hmm.transition)
  return model


def _float64(x):
  return np.array(x, dtype=np.float64)


def from_hmmlearn(model, *, min_covar: float = 1e-6) -> HMM:
  """The :class:`~dennl_jax.HMM` of a fitted or initialised hmmlearn model.

  min_covar: the ``min_covar`` of a Gaussian/DiagGaussian result (ours is
    added to the covariance diagonal in every M-step; hmmlearn's is only an
    initialisation floor, so it is not carried over).
  Leaves are float64 numpy copies.  Raises ``ValueError`` for a model type
  without a counterpart, a model without parameters, or invalid parameters.
  """
  from hmmlearn import hmm as hl
  for name in ("startprob_", "transmat_"):
    if not hasattr(model, name):
      raise ValueError(f"the hmmlearn model has no {name}: fit or initialise it first")
  try:
    if isinstance(model, hl.CategoricalHMM):
      emission = Categorical(_float64(model.emissionprob_))
    elif isinstance(model, hl.MultinomialHMM):
      emission = Multinomial(_float64(model.emissionprob_))
    elif isinstance(model, hl.PoissonHMM):
      rates = _float64(model.lambdas_)
      if rates.ndim != 2 or rates.shape[1] != 1:
        raise ValueError(f"dennl_jax.Poisson has one count per step; this PoissonHMM has "
                         f"lambdas_ of shape {rates.shape} (n_features must be 1)")
      emission = Poisson(rates[:, 0])
    elif isinstance(model, hl.GaussianHMM):
      emission = _gaussian_from_hmmlearn(model, min_covar)
    else:
      raise ValueError(f"no dennl_jax counterpart for hmmlearn {type(model).__name__}")
  except AttributeError as err:
    raise ValueError(f"the hmmlearn model lacks emission parameters ({err}): fit or "
                     f"initialise it first") from None
  hmm = HMM(_float64(model.startprob_), _float64(model.transmat_), emission)
  hmm.check_parameters()
  return hmm


def _gaussian_from_hmmlearn(model, min_covar):
  means = _float64(model.means_)
  kind = model.covariance_type
  if kind == "full":
    return Gaussian(means, _float64(model.covars_), min_covar=min_covar)
  if kind == "tied":
    # covars_ expands the shared matrix to (K, D, D).
    return Gaussian(means, _float64(model.covars_), min_covar=min_covar)
  if kind == "diag":
    return DiagGaussian(means, np.diagonal(_float64(model.covars_), axis1=1, axis2=2).copy(),
                        min_covar=min_covar)
  if kind == "spherical":
    # Not covars_: hmmlearn 0.3 stores spherical _covars_ as (K,) after its
    # initialisation but (K, D) after an M-step, and covars_ expands the
    # latter to K * D matrices.  Both forms broadcast to the (K, D) variances.
    var = np.reshape(_float64(model._covars_), (means.shape[0], -1))
    return DiagGaussian(means, np.broadcast_to(var, means.shape).copy(), min_covar=min_covar)
  raise ValueError(f"unsupported GaussianHMM covariance_type {kind!r}")


# ---------------------------------------------------------------------------
# dynamax
# ---------------------------------------------------------------------------

def to_dynamax(hmm: HMM, *, num_trials=None):
  """``(model, params)``: a dynamax HMM object and its parameter NamedTuple.

  ``hmm`` may carry leading user axes; ``params`` then has them on every
  leaf (vmap dynamax's functions over them); ``model`` is the same for all.
  num_trials: required for Multinomial emissions (dynamax's
    ``MultinomialHMM`` takes it as a model setting).
  Use e.g. ``model.marginal_log_prob(params, obs)``; observations are
  reshaped as in the module docstring (``emission_dim = 1`` for the
  categorical, multinomial and Poisson models).
  """
  import jax.numpy as jnp
  from dynamax.hidden_markov_model.models import (categorical_hmm, gaussian_hmm,
                                                  multinomial_hmm, poisson_hmm)
  from dynamax.hidden_markov_model.models.initial import ParamsStandardHMMInitialState
  from dynamax.hidden_markov_model.models.transitions import ParamsStandardHMMTransitions
  _hmm_only(hmm, "dynamax")
  _check_each_user(hmm)
  emission = hmm.emission
  num_states = hmm.num_states
  initial = ParamsStandardHMMInitialState(probs=jnp.asarray(hmm.initial))
  transitions = ParamsStandardHMMTransitions(transition_matrix=jnp.asarray(hmm.transition))
  if num_trials is not None and not isinstance(emission, Multinomial):
    raise ValueError(f"num_trials applies to Multinomial emissions only, not "
                     f"{type(emission).__name__}")
  if isinstance(emission, Categorical):
    num_symbols = np.shape(emission.probs)[-1]
    model = categorical_hmm.CategoricalHMM(num_states, 1, num_symbols)
    params = categorical_hmm.ParamsCategoricalHMM(
        initial, transitions, categorical_hmm.ParamsCategoricalHMMEmissions(
            probs=jnp.asarray(emission.probs)[..., None, :]))
  elif isinstance(emission, Multinomial):
    if num_trials is None:
      raise ValueError("Multinomial emissions need num_trials (the total count of every "
                       "observation) for dynamax's MultinomialHMM")
    model = multinomial_hmm.MultinomialHMM(num_states, 1, np.shape(emission.probs)[-1],
                                           num_trials)
    params = multinomial_hmm.ParamsMultinomialHMM(
        initial, transitions, multinomial_hmm.ParamsMultinomialHMMEmissions(
            probs=jnp.asarray(emission.probs)[..., None, :]))
  elif isinstance(emission, Poisson):
    model = poisson_hmm.PoissonHMM(num_states, 1)
    params = poisson_hmm.ParamsPoissonHMM(
        initial, transitions, poisson_hmm.ParamsPoissonHMMEmissions(
            rates=jnp.asarray(emission.rate)[..., None]))
  elif isinstance(emission, Gaussian):
    model = gaussian_hmm.GaussianHMM(num_states, np.shape(emission.mean)[-1])
    params = gaussian_hmm.ParamsGaussianHMM(
        initial, transitions, gaussian_hmm.ParamsGaussianHMMEmissions(
            means=jnp.asarray(emission.mean), covs=jnp.asarray(emission.cov)))
  elif isinstance(emission, DiagGaussian):
    model = gaussian_hmm.DiagonalGaussianHMM(num_states, np.shape(emission.mean)[-1])
    params = gaussian_hmm.ParamsDiagonalGaussianHMM(
        initial, transitions, gaussian_hmm.ParamsDiagonalGaussianHMMEmissions(
            means=jnp.asarray(emission.mean), scale_diags=jnp.sqrt(jnp.asarray(emission.var))))
  else:
    raise ValueError(f"no dynamax counterpart for {type(emission).__name__} emissions")
  return model, params


def from_dynamax(params, *, min_covar: float = 1e-6) -> HMM:
  """The :class:`~dennl_jax.HMM` of a dynamax parameter NamedTuple (single or batched).

  Accepts the params of dynamax's ``CategoricalHMM``, ``MultinomialHMM``,
  ``PoissonHMM`` (each with ``emission_dim = 1``), ``GaussianHMM`` and
  ``DiagonalGaussianHMM``.  min_covar: that of a Gaussian/DiagGaussian
  result (dynamax has none).  Raises ``ValueError`` for other emission
  models, ``emission_dim > 1`` or invalid parameters.
  """
  import jax.numpy as jnp
  from dynamax.hidden_markov_model.models import (categorical_hmm, gaussian_hmm,
                                                  multinomial_hmm, poisson_hmm)
  emissions = getattr(params, "emissions", None)
  if emissions is None or not hasattr(params, "initial") or not hasattr(params, "transitions"):
    raise ValueError(f"expected dynamax HMM parameters (initial, transitions, emissions); "
                     f"got {type(params).__name__}")
  if isinstance(emissions, (categorical_hmm.ParamsCategoricalHMMEmissions,
                            multinomial_hmm.ParamsMultinomialHMMEmissions)):
    probs = _single_emission_dim(emissions.probs, -2, type(emissions).__name__)
    family = (Categorical if isinstance(emissions, categorical_hmm.ParamsCategoricalHMMEmissions)
              else Multinomial)
    emission = family(probs)
  elif isinstance(emissions, poisson_hmm.ParamsPoissonHMMEmissions):
    emission = Poisson(_single_emission_dim(emissions.rates, -1, "ParamsPoissonHMMEmissions"))
  elif isinstance(emissions, gaussian_hmm.ParamsGaussianHMMEmissions):
    emission = Gaussian(jnp.asarray(emissions.means), jnp.asarray(emissions.covs),
                        min_covar=min_covar)
  elif isinstance(emissions, gaussian_hmm.ParamsDiagonalGaussianHMMEmissions):
    emission = DiagGaussian(jnp.asarray(emissions.means),
                            jnp.square(jnp.asarray(emissions.scale_diags)), min_covar=min_covar)
  else:
    raise ValueError(f"no dennl_jax counterpart for dynamax {type(emissions).__name__}")
  hmm = HMM(jnp.asarray(params.initial.probs),
            jnp.asarray(params.transitions.transition_matrix), emission)
  _check_each_user(hmm)
  return hmm


def _single_emission_dim(x, axis: int, name: str):
  import jax.numpy as jnp
  x = jnp.asarray(x)
  if x.shape[axis] != 1:
    raise ValueError(f"{name} has emission_dim {x.shape[axis]}; dennl_jax converts "
                     f"emission_dim = 1 only (one symbol / count vector / count per step)")
  return jnp.squeeze(x, axis)
