r"""Config of experiments/bench_em_step.py: one EM step vs dynamax and hmmlearn.

Run from the repository root:

  python -m experiments.bench_em_step --output_dir=/tmp/bench
  python -m experiments.bench_em_step --config=experiments/configs/bench_em_step.py:tiny \
      --output_dir=/tmp/bench_tiny

Variants: ``full`` (default; the README's figures) and ``tiny`` (the smoke
test: a handful of users, T = 10, one repeat -- its timings mean nothing).
Override any field, e.g. ``--config.num_users=500 --config.repeats=3``.
"""
from ml_collections import config_dict

from experiments.configs import select_variant

_VARIANTS = {
    "full": dict(num_users=2000, num_steps=100, repeats=7, hmmlearn_users=100),
    "tiny": dict(num_users=4, num_steps=10, repeats=1, hmmlearn_users=2),
}


def get_config(arg=None):
  variant = select_variant(_VARIANTS, arg)
  config = config_dict.ConfigDict()
  config.preset = variant
  config.seed = 0
  config.num_users = 0          # users, one sequence and one HMM each
  config.num_steps = 0          # sequence length T
  config.num_states = 10        # hidden states K
  config.num_symbols = 17       # Categorical symbols V
  config.repeats = 0            # timed repeats; the median is reported
  config.hmmlearn_users = 0     # users timed with hmmlearn (Python loop), scaled to all users
  config.update(_VARIANTS[variant])
  return config
