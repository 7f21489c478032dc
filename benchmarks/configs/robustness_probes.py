r"""Config of benchmarks/robustness_probes.py: numerical-robustness and bad-input probes.

Run from the repository root:

  python -m benchmarks.robustness_probes --output_dir=/tmp/probes

Variants: ``full`` (default) and ``tiny`` (the same probes: they take seconds).
"""
from ml_collections import config_dict

from experiments.configs import select_variant

_VARIANTS = {"full": {}, "tiny": {}}


def get_config(arg=None):
  variant = select_variant(_VARIANTS, arg)
  config = config_dict.ConfigDict()
  config.preset = variant
  config.seed = 0
  return config
