r"""Config of benchmarks/bench_scaling.py: time-parallel smoothing and data parallelism.

Run from the repository root:

  python -m benchmarks.bench_scaling --output_dir=/tmp/bench_scaling
  python -m benchmarks.bench_scaling --config=benchmarks/configs/bench_scaling.py:quick

Variants: ``full`` (default: T up to 10^5, 1/2/4 devices), ``quick`` (under
two minutes on 2 cores: T = 10^3 and 10^4, 1/2/4 devices on a small batch)
and ``tiny`` (a smoke test; its timings mean nothing).  Override any field,
e.g. ``--config.time_lengths='(1000, 100000)' --config.repeats=3``.
"""
from ml_collections import config_dict

from experiments.configs import select_variant

_VARIANTS = {
    "full": dict(time_lengths=(1_000, 10_000, 100_000), repeats=5, device_counts=(1, 2, 4),
                 num_users=512, num_steps=200, em_iters=10, train_users=64, train_steps=100),
    "quick": dict(time_lengths=(1_000, 10_000), repeats=3, device_counts=(1, 2, 4),
                  num_users=128, num_steps=100, em_iters=5, train_users=32, train_steps=50),
    "tiny": dict(time_lengths=(64,), repeats=1, device_counts=(1, 2), num_users=8,
                 num_steps=10, em_iters=1, train_users=4, train_steps=8),
}


def get_config(arg=None):
  variant = select_variant(_VARIANTS, arg)
  config = config_dict.ConfigDict()
  config.preset = variant
  config.seed = 0
  # (a) one sequence, sequential vs associative-scan smoother (and dynamax's)
  config.time_lengths = ()        # sequence lengths T
  config.num_states = 8           # K (the parallel smoother does O(T K^3) work)
  config.num_symbols = 17         # Categorical V
  config.repeats = 0              # timed repeats, interleaved; the median is reported
  config.dynamax = True           # also time dynamax's parallel smoother
  # (b) fit_em and DENNL training steps on 1/2/4 forced host devices (subprocesses)
  config.device_counts = ()
  config.num_users = 0            # fit_em users (U), one HMM each
  config.num_steps = 0            # their sequence length
  config.em_iters = 0             # EM iterations per fit_em call
  config.train_users = 0          # DENNL batch size
  config.train_steps = 0          # DENNL sequence length T
  config.update(_VARIANTS[variant])
  return config
