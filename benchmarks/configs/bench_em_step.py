r"""Config of benchmarks/bench_em_step.py: one EM step vs dynamax and hmmlearn.

Run from the repository root:

  python -m benchmarks.bench_em_step --output_dir=/tmp/bench
  python -m benchmarks.bench_em_step --config=benchmarks/configs/bench_em_step.py:tiny \
      --output_dir=/tmp/bench_tiny

Variants: ``full`` (default; the README's figures), ``quick`` (every section
in a few minutes: the one the build notes quote) and ``tiny`` (the smoke
test: a handful of users, T = 10, one repeat -- its timings mean nothing).
Override any field, e.g. ``--config.num_users=500 --config.repeats=3``.
"""
from ml_collections import config_dict

from experiments.configs import select_variant

_GROWTH = ((500, 100, 10), (2000, 400, 10), (2000, 100, 5), (2000, 100, 20))
_VARIANTS = {
    "full": dict(num_users=2000, num_steps=100, repeats=15, hmmlearn_users=100, dennl_users=512,
                 growth=_GROWTH + ((8000, 100, 10), (2000, 100, 40)), memory_steps=10_000),
    "quick": dict(num_users=2000, num_steps=100, repeats=7, hmmlearn_users=20, dennl_users=256,
                  growth=_GROWTH, memory_steps=10_000),
    "tiny": dict(num_users=4, num_steps=10, repeats=1, hmmlearn_users=2, dennl_users=0,
                 growth=(), memory_steps=0),
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
  config.dennl_users = 0        # users of the DENNL exact-gradient training step (0: skip)
  config.dennl_embed_dim = 16
  config.dennl_stages = 3
  config.growth = ()            # (U, T, K) rows of the cost-growth table
  config.memory_steps = 0       # T of the exact-gradient memory figure (0: skip)
  config.memory_users = 16
  config.update(_VARIANTS[variant])
  return config
