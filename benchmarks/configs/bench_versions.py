r"""Config of benchmarks/bench_versions.py: this code's speed against an earlier commit.

Run from the repository root (a git checkout):

  python -m benchmarks.bench_versions --output_dir=/tmp/bench_versions
  python -m benchmarks.bench_versions --config.baseline=64ab4e1 \
      --config.probes="('hsmm_em_step',)" --config.durations="(60,)" --config.pin_one_core=True \
      --output_dir=/tmp/bench_versions_d60

Variants: ``full`` (default; the performance targets against a reference commit,
``REFERENCE_COMMIT``, overridable with ``--config.baseline``: HMM and HSMM
em_step, both DENNL training steps, three process pairs)
and ``tiny`` (the smoke test: HEAD against this checkout, tiny shapes, one
pair -- timings mean nothing).
"""
from ml_collections import config_dict

from experiments.configs import select_variant

# The default baseline: a reference commit, the engine without the users-minor
# batched kernels (any commit can be given with --config.baseline).
REFERENCE_COMMIT = "4881312"

_VARIANTS = {
    "full": dict(baseline=REFERENCE_COMMIT, pairs=3, repeats=11,
                 probes=("hmm_em_step", "hsmm_em_step", "dennl_step_hmm", "dennl_step_hsmm"),
                 em_users=1000, em_steps=100, hmm_em_users=2000, states=10, symbols=17,
                 durations=(20, 60), dennl_hmm_users=256, dennl_hmm_steps=100,
                 dennl_hsmm_users=16, dennl_hsmm_steps=400, dennl_max_duration=20,
                 dennl_hsmm_hidden=(256, 256), dennl_hmm_hidden=(128, 128), dennl_stages=3),
    "tiny": dict(baseline="HEAD", pairs=1, repeats=1,
                 probes=("hmm_em_step", "hsmm_em_step", "dennl_step_hsmm"),
                 em_users=3, em_steps=7, hmm_em_users=3, states=2, symbols=3, durations=(3,),
                 dennl_hmm_users=2, dennl_hmm_steps=5, dennl_hsmm_users=2, dennl_hsmm_steps=6,
                 dennl_max_duration=3, dennl_hsmm_hidden=(8,), dennl_hmm_hidden=(8,),
                 dennl_stages=1),
}


def get_config(arg=None):
  variant = select_variant(_VARIANTS, arg)
  config = config_dict.ConfigDict()
  config.preset = variant
  # Commits (anything `git rev-parse` takes).  current '' = this checkout's src/,
  # uncommitted changes included.
  config.baseline = ""
  config.current = ""
  config.probes = ()               # names in benchmarks.version_probes.PROBES
  config.pairs = 0                 # process pairs per case, the order flipped each pair
  config.repeats = 0               # timed calls per process; its median is kept
  # One pinned core, XLA:CPU single-threaded (less noise than two threads; the
  # two-thread figure is the default run).
  config.pin_one_core = False
  # Every process starts with dennl_jax.memory's glibc malloc settings, as our
  # binaries run (False: glibc's defaults, where temporaries above 32 MiB
  # page-fault on every call).  The same for both codes either way.
  config.keep_freed_memory = True
  # em_step probes: Categorical emissions, users x steps, one row per D for HSMMs.
  config.em_users = 0              # HSMM users
  config.hmm_em_users = 0          # HMM users (the dynamax comparison's shape)
  config.em_steps = 0
  config.states = 0
  config.symbols = 0
  config.durations = ()            # HSMM maximum durations D, one case each
  # DENNL training steps (exact gradient, likelihood loss): bench_em_step's HMM
  # step and Table 1's Gaussian HSMM step.
  config.dennl_hmm_users = 0
  config.dennl_hmm_steps = 0
  config.dennl_hmm_hidden = ()
  config.dennl_hsmm_users = 0
  config.dennl_hsmm_steps = 0
  config.dennl_hsmm_hidden = ()
  config.dennl_max_duration = 0
  config.dennl_stages = 0
  config.dennl_embed_dim = 16
  config.dennl_obs_dim = 5
  config.update(_VARIANTS[variant])
  return config
