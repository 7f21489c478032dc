r"""Config of experiments/demo_em.py: fit sampled HMM sequences with EM, decode states.

Run from the repository root:

  python -m experiments.demo_em
  python -m experiments.demo_em --config=experiments/configs/demo_em.py \
      --config.num_users=200 --config.num_steps=100 --output_dir=/tmp/demo_em

Variants: ``full`` (default) and ``tiny`` (the smoke test).
"""
from ml_collections import config_dict

from experiments.configs import select_variant

_VARIANTS = {
    "full": dict(num_users=200, num_steps=100, num_states=4, num_iters=50),
    "tiny": dict(num_users=4, num_steps=10, num_states=2, num_iters=2),
}


def get_config(arg=None):
  variant = select_variant(_VARIANTS, arg)
  config = config_dict.ConfigDict()
  config.preset = variant
  config.seed = 0
  config.num_users = 0      # sequences, one per user
  config.num_steps = 0      # length of each sequence
  config.num_states = 0     # hidden states
  config.num_iters = 0      # EM iterations
  config.update(_VARIANTS[variant])
  return config
