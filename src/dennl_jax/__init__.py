"""dennl_jax: Expectation-Maximisation of HMMs/HSMMs as a neural-network layer.

The data path: parameters (:class:`HMM`, :class:`HSMM` holding an
emission family and, for the HSMM, a duration family) -> emission
log-likelihoods -> inference (:func:`posterior`, :func:`viterbi`, ...) ->
one EM iteration (:func:`em_step`) -> the differentiable EM layer
(:func:`em_layer`) -> networks (:class:`DENNL`, ...) -> training
(:func:`train`) -> metrics (:func:`labelling_accuracy`).

Conventions.

* One sequence per function: ``obs: (T, ...)`` and ``mask: (T,) bool`` (a
  masked step is removed from the sequence, so padding never changes a
  result); batch users with ``jax.vmap`` (batched functions say so and take a
  leading user axis U).
* Every random thing takes an explicit PRNG key.  Functions whose purpose is
  to draw randomness take the key FIRST: :func:`sample`, the starts
  (:func:`pooled_start`, ``starts.user_start``, ``starts.kmeans``),
  :func:`conventional_em`, the :mod:`dennl_jax.synthetic` generators.  Functions
  whose randomness is incidental to a deterministic value take it LAST:
  ``em_layer(params, obs, mask, key)``, a network's ``__call__(embedding,
  obs, mask, key)``, losses ``loss_fn(model, batch, key)``, the train step
  ``step(state, opt_state, batch, key)`` and the function returned by
  ``spsa(fn)``, ``wrapped(x, *aux, key)``.
* One EM iteration: :func:`em_step` (function) = ``params.em_step(obs,
  mask) -> (new_params, log_likelihood_before)`` (model method);
  :func:`em_layer` is the same map with a chosen backward pass.
* Families: subclasses of :class:`EmissionFamily` / :class:`DurationFamily`
  declaring each array's constraint once with :func:`param` (see
  :mod:`dennl_jax.families`); both bijections follow from it.

Parameters in and out: :func:`save_params` / :func:`load_params` (the rest of
``io``: ``read_metadata``, ``save_state``/``load_state`` for NNX modules) and
the hmmlearn/dynamax converters in ``interop`` (``dj.interop.to_hmmlearn``, ...).

Submodules not flattened here: ``oracles`` (brute-force oracles), ``chunking``,
``starts``, ``codec``, ``networks``, ``per_user_em``, ``estimators``, ``layer``,
``loop``, ``sharding``, ``time_parallel``, ``checkpoint``, ``tracking``,
``synthetic`` (the synthetic HSMM worlds).  The paper's recommender application
(event logs, MovieLens, the simulated marketplace, GraphSAGE, the next-step
predictors) is the subpackage :mod:`dennl_jax.recsys`, built on this public API;
``import dennl_jax`` does not load it.
"""
from dennl_jax._version import __version__
from dennl_jax.families import (Constraint, DurationFamily, EmissionFamily, Parameterised,
                                Positive, PositiveDefinite, Real, Simplex, param)
from dennl_jax.emissions import Categorical, DiagGaussian, Gaussian, Multinomial, Poisson
from dennl_jax.durations import CategoricalDuration, PoissonDuration
from dennl_jax._dispatch import Kernels
from dennl_jax.hmm import HMM, HMMPosterior, hmm_filter, hmm_smoother, hmm_viterbi
from dennl_jax.hsmm import HSMM, HSMMPosterior, hsmm_filter, hsmm_smoother, hsmm_viterbi
from dennl_jax.inference import (checked, decode_states, expected_transition_counts,
                                 filtered_posteriors, log_likelihood, posterior, sample,
                                 smoothed_posteriors, stationary_distribution, validate, viterbi)
from dennl_jax.em import em_step, em_step_with_log_likelihood, fit_em
from dennl_jax.forecast import Forecast, forecast
from dennl_jax.estimators import PERTURBATIONS, forward_gradient, perturbation_directions, spsa
from dennl_jax.layer import GRADIENT_MODES, EMLayer, em_layer
from dennl_jax.chunking import chunked_map
from dennl_jax.codec import ParamCodec
from dennl_jax.networks import DENNL, EmbeddingMapper, InitialFusion
from dennl_jax.starts import pooled_start
from dennl_jax.per_user_em import conventional_em
from dennl_jax.labelling import confusion_matrix, labelling_accuracy, per_user_accuracy
from dennl_jax.training import (Batch, heldout_step_loss, likelihood_loss, make_optimizer,
                                make_train_step, predict, regression_loss, train, TrainResult)
from dennl_jax import synthetic
from dennl_jax import interop, io
from dennl_jax.io import load_params, save_params
from dennl_jax.memory import keep_freed_memory

__all__ = [
    # families and their contracts
    "EmissionFamily", "DurationFamily", "Parameterised", "Constraint", "param", "Real",
    "Positive", "Simplex", "PositiveDefinite",
    "Categorical", "Multinomial", "Poisson", "Gaussian", "DiagGaussian",
    "PoissonDuration", "CategoricalDuration",
    # models and their recursions
    "Kernels", "HMM", "HMMPosterior", "hmm_filter", "hmm_smoother", "hmm_viterbi",
    "HSMM", "HSMMPosterior", "hsmm_filter", "hsmm_smoother", "hsmm_viterbi",
    # inference on one sequence
    "validate", "checked", "log_likelihood", "posterior", "filtered_posteriors",
    "smoothed_posteriors", "expected_transition_counts", "viterbi", "sample",
    "stationary_distribution", "decode_states", "forecast", "Forecast",
    # EM, the layer and its estimators
    "em_step", "em_step_with_log_likelihood", "fit_em", "em_layer", "EMLayer", "GRADIENT_MODES",
    "spsa", "forward_gradient", "perturbation_directions", "PERTURBATIONS",
    # networks, baselines and training
    "ParamCodec", "DENNL", "InitialFusion", "EmbeddingMapper", "pooled_start",
    "conventional_em", "chunked_map", "Batch", "train", "TrainResult", "predict", "make_optimizer",
    "make_train_step", "likelihood_loss", "heldout_step_loss", "regression_loss",
    # labelling metrics and the synthetic worlds
    "labelling_accuracy", "per_user_accuracy", "confusion_matrix", "synthetic",
    # parameters in and out (converters: dj.interop.to_hmmlearn, ...)
    "save_params", "load_params", "io", "interop",
    # process settings (glibc malloc: XLA:CPU temporaries on reused pages)
    "keep_freed_memory",
]

