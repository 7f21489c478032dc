r"""Config of experiments/spsa_training.py: does SPSA train DENNL on Table 1?

Run from the repository root:

  python -m experiments.spsa_training --quick --output_dir=/tmp/spsa_training
  python -m experiments.spsa_training --output_dir=/tmp/spsa_training_full
  python -m experiments.spsa_training --config=experiments/configs/spsa_training.py:tiny \
      --output_dir=/tmp/spsa_training_tiny

Variants: ``full`` (default; Table 1's full-scale data: 1,000 training users,
hidden 256, 3 stages), ``quick`` (``--quick``; Table 1's quick scale, T = 50,
a few minutes per training run on 2 CPU cores) and ``tiny`` (the smoke test;
its numbers mean nothing).  Training runs are strings ``"name:gradient:samples:batch:rate:b1"``
(``gradient`` exact, spsa or forward; ``b1`` Adam's first-moment decay: 0.9 is the
default, 0.99 averages about ten times as many noisy gradients).  Probes are
``"spsa:S:c"`` (S perturbations, step c) or ``"forward:S"``; an empty
``--config.probes="()"`` skips study (a).
"""
from ml_collections import config_dict

from experiments.configs import select_variant

_VARIANTS = {
    # probe_rate: Adam's rate of study (a)'s exact-gradient run (Table 1's rate).
    "quick": dict(table1="quick", setting="T50", probe_rate=3e-3, probe_steps=300, probe_every=50,
                  probes=("spsa:8:1e-3", "spsa:32:1e-3", "spsa:128:1e-3", "forward:32",
                          "spsa:32:1e-2", "spsa:32:1e-4"),
                  probe_batch_sizes=(16, 64), probe_repeats=3,
                  runs=("exact:exact:0:16:0.003:0.9", "spsa8:spsa:8:16:0.003:0.9",
                        "spsa8_slow:spsa:8:16:0.0003:0.99", "spsa32_b64:spsa:32:64:0.001:0.9"),
                  run_steps=300, eval_every=25),
    "full": dict(table1="full", setting="T50", probe_rate=1e-3, probe_steps=600, probe_every=100,
                 probes=("spsa:8:1e-3", "spsa:32:1e-3", "spsa:128:1e-3", "forward:32"),
                 probe_batch_sizes=(16, 64), probe_repeats=2,
                 runs=("exact:exact:0:16:0.001:0.9", "spsa8:spsa:8:16:0.001:0.9",
                       "spsa8_slow:spsa:8:16:0.0003:0.99", "spsa32_b64:spsa:32:64:0.001:0.9"),
                 run_steps=600, eval_every=50),
    "tiny": dict(table1="tiny", setting="noise20", probe_rate=1e-3, probe_steps=2, probe_every=1,
                 probes=("spsa:2:1e-3",), probe_batch_sizes=(4,), probe_repeats=1,
                 runs=("exact:exact:0:4:0.001:0.9", "spsa2:spsa:2:4:0.001:0.9"),
                 run_steps=2, eval_every=1),
}


def get_config(arg=None):
  variant = select_variant(_VARIANTS, arg)
  c = config_dict.ConfigDict(_VARIANTS[variant])
  c.preset = variant
  c.seed = 0
  # The data, network and EM settings: this variant of experiments/configs/synthetic_table1.py
  # (c.table1), at setting c.setting; the training loss of every run and probe.
  c.loss = "heldout"
  # SPSA's directions in every probe and run (step c = 1e-3, the layer's default).
  c.spsa_perturbation = "rademacher"

  return c
