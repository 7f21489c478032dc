r"""Config of experiments/demo_hsmm.py: fit explicit-duration HSMMs with EM.

Run from the repository root:

  python -m experiments.demo_hsmm
  python -m experiments.demo_hsmm --config=experiments/configs/demo_hsmm.py \
      --config.num_users=200 --config.num_steps=150 --output_dir=/tmp/demo_hsmm

Variants: ``full`` (default) and ``tiny`` (the smoke test).  The number of
states is ``len(true_rates)``.
"""
from ml_collections import config_dict

from experiments.configs import select_variant

_VARIANTS = {
    "full": dict(num_users=200, num_steps=150, max_duration=40, num_iters=30,
                 true_rates=(2.0, 5.0, 9.0, 14.0)),   # mean durations 3, 6, 10, 15 steps
    "tiny": dict(num_users=4, num_steps=10, max_duration=4, num_iters=2, true_rates=(1.0, 2.0)),
}


def get_config(arg=None):
  variant = select_variant(_VARIANTS, arg)
  config = config_dict.ConfigDict()
  config.preset = variant
  config.seed = 0
  config.num_users = 0       # sequences, one per user
  config.num_steps = 0       # length of each sequence
  config.max_duration = 0    # maximum segment duration D
  config.num_iters = 0       # EM iterations
  config.true_rates = ()     # true Poisson duration rates (mean duration = rate + 1)
  config.start_rate = 6.0    # every state's duration rate in the start
  config.update(_VARIANTS[variant])
  return config
