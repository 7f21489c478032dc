r"""Config of benchmarks/bench_hsmm.py: HSMM EM step, structured vs expanded HMM.

Run from the repository root:

  python -m benchmarks.bench_hsmm --output_dir=/tmp/bench_hsmm
  python -m benchmarks.bench_hsmm --config=benchmarks/configs/bench_hsmm.py \
      --config.durations="(10, 30, 60, 120)" --config.num_users=300 --output_dir=/tmp/bench_hsmm

Variants: ``full`` (default; the README's figures, the batched-kernel table at
U = 1000, K = 10, D = 20 and 60, and the exact-gradient table at U = 16, T = 400) and ``tiny`` (the smoke
test: a handful of users, T = 10, one D, one repeat -- timings mean nothing).
"""
from ml_collections import config_dict

from experiments.configs import select_variant

_VARIANTS = {
    "full": dict(num_users=300, expanded_users=40, num_steps=100, num_states=10, num_symbols=17,
                 durations=(10, 30, 60, 120), repeats=5, kernel_users=1000, kernel_states=10,
                 kernel_durations=(20, 60), gradient_users=16, gradient_steps=400,
                 gradient_states=10, gradient_stages=3, gradient_durations=(20, 60)),
    "tiny": dict(num_users=4, expanded_users=2, num_steps=10, num_states=2, num_symbols=3,
                 durations=(3,), repeats=1, kernel_users=4, kernel_states=2,
                 kernel_durations=(3,), gradient_users=2, gradient_steps=10,
                 gradient_states=2, gradient_stages=2, gradient_durations=(3,)),
}


def get_config(arg=None):
  variant = select_variant(_VARIANTS, arg)
  config = config_dict.ConfigDict()
  config.preset = variant
  config.seed = 0
  config.num_users = 0             # users of the structured HSMM
  config.expanded_users = 0        # users of the dense expanded HMM (memory: (K D)^2 each)
  config.num_steps = 0             # sequence length T
  config.num_states = 0            # hidden states K
  config.num_symbols = 0           # Categorical symbols V
  config.durations = ()            # maximum durations D, one row each
  config.max_expanded_states = 1200  # skip the expanded HMM when K * D exceeds this
  config.repeats = 0               # timed repeats; the median is reported
  # Batched users-minor kernel vs per-sequence vmap (em_step, same data, interleaved):
  config.kernel_users = 0          # users
  config.kernel_states = 0         # hidden states K
  config.kernel_durations = ()     # maximum durations D, one row each
  # Exact gradient of stacked EM layers, score VJP vs autodiff (0 users: skip):
  config.gradient_users = 0        # users
  config.gradient_steps = 0        # sequence length T
  config.gradient_states = 0       # hidden states K
  config.gradient_stages = 0       # stacked em_layers
  config.gradient_durations = ()   # maximum durations D, one row each
  config.update(_VARIANTS[variant])
  return config
