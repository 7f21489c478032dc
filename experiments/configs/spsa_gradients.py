r"""Config of experiments/spsa_gradients.py: quality and cost of the EM layer's gradients.

Run from the repository root:

  python -m experiments.spsa_gradients --output_dir=/tmp/spsa_gradients
  python -m experiments.spsa_gradients --config=experiments/configs/spsa_gradients.py:tiny \
      --output_dir=/tmp/spsa_tiny

Variants: ``full`` (default; the BUILD_NOTES figures) and ``tiny`` (the smoke
test: every table at toy size, one repeat -- its numbers mean nothing).
Tuple fields take Python literals: ``--config.num_samples="(1, 16)"``,
``--config.timing_modes="('exact:1', 'spsa:16')"``.
"""
from ml_collections import config_dict

from experiments.configs import select_variant

_VARIANTS = {
    "full": dict(
        cosine=dict(num_users=64, num_steps=100, num_states=5, num_symbols=10,
                    num_samples=(1, 4, 16, 64, 256), repeats=3, modes=("spsa", "forward")),
        theorem1=dict(num_states=3, num_symbols=4, num_steps=50, num_draws=4096,
                      dtypes=("float64", "float32"),
                      steps=(1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7),
                      num_samples=(1, 4, 16, 64, 256, 1024, 4096)),
        timing=dict(num_users=256, num_steps=100, num_states=10, repeats=5,
                    modes=("exact:1", "no-checkpoint:1", "forward:16", "spsa:1", "spsa:16",
                           "spsa:64")),
        length=dict(num_users=32, num_states=10, lengths=(50, 100, 200, 400, 800, 1600),
                    repeats=3),
        variance=dict(num_users=32, num_steps=100, num_states=5, num_symbols=10,
                      num_samples=(4, 16, 40, 80), repeats=3,
                      perturbations=("rademacher", "orthogonal")),
    ),
    "tiny": dict(
        # One estimator, one dtype, one mode: every code path once, fewest compilations.
        cosine=dict(num_users=2, num_steps=10, num_states=2, num_symbols=4, num_samples=(1, 2),
                    repeats=1, modes=("spsa",)),
        theorem1=dict(num_states=2, num_symbols=3, num_steps=10, num_draws=8, steps=(1e-2, 1e-3),
                      num_samples=(1, 8), dtypes=("float64",)),
        timing=dict(num_users=2, num_steps=10, num_states=2, repeats=1, modes=("exact:1",)),
        length=dict(num_users=2, num_states=2, lengths=(10,), repeats=1),
        variance=dict(num_users=2, num_steps=10, num_states=2, num_symbols=3, num_samples=(2,),
                      repeats=1, perturbations=("orthogonal",)),
    ),
}


def get_config(arg=None):
  variant = select_variant(_VARIANTS, arg)
  config = config_dict.ConfigDict(_VARIANTS[variant])
  config.preset = variant
  config.seed = 0
  # SPSA step c of tables (a) and (c) (float32).
  config.step = 1e-3
  # (a) cosine of the estimates (cosine.modes: spsa, forward) with the exact gradient,
  #     per user and for the shared weights of a linear network, vs num_samples.
  # (b) Theorem 1 on the EM map (theorem1.dtypes; float64 first): bias of E[J_hat]
  #     vs the step c, Monte-Carlo error vs the number of perturbations.
  # (c) wall time and compiled temporary memory of each mode's VJP ("mode:num_samples";
  #     mode "no-checkpoint" = plain reverse mode through em_step).
  # (d) exact-mode gradient time and memory vs T.
  # (e) variance reduction: SPSA error with i.i.d. Rademacher vs orthogonal directions
  #     at the same num_samples (equal cost).
  return config
