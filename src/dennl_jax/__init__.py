"""dennl_jax: Expectation-Maximisation of HMMs/HSMMs as a neural-network layer."""
from dennl_jax.emissions import Categorical, DiagGaussian, Gaussian, Multinomial, Poisson
from dennl_jax.hmm import HMM, HMMPosterior, hmm_filter, hmm_smoother, hmm_viterbi
from dennl_jax.hsmm import (HSMM, CategoricalDuration, HSMMPosterior, PoissonDuration,
                            expand_to_hmm, expanded_em_update, expanded_posterior, hsmm_filter,
                            hsmm_smoother, hsmm_viterbi)
from dennl_jax.inference import (checked, expected_transition_counts, filtered_posteriors,
                                 log_likelihood, posterior, sample, smoothed_posteriors,
                                 stationary_distribution, validate, viterbi)
from dennl_jax.em import em_step, em_step_with_log_likelihood, fit_em
from dennl_jax.forecast import Forecast, forecast
from dennl_jax.spsa import (GRADIENT_MODES, PERTURBATIONS, em_layer, forward_gradient,
                            perturbation_directions, spsa)
from dennl_jax import data
from dennl_jax.metrics import confusion_matrix, labelling_accuracy, per_user_accuracy
from dennl_jax.models import (DENNL, EmbeddingMapper, InitialFusion, ParamCodec, conventional_em,
                              pooled_start)
from dennl_jax.training import (Batch, heldout_step_loss, likelihood_loss, make_optimizer,
                                make_train_step, regression_loss, train)

__version__ = "0.1.0"
