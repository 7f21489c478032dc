r"""Config of benchmarks/profile_ops.py: where this checkout's time goes, per XLA operation.

Run from the repository root:

  python -m benchmarks.profile_ops --output_dir=/tmp/profile_ops
  python -m benchmarks.profile_ops --config.probes="('dennl_step_hmm',)" \
      --config.top=40 --output_dir=/tmp/profile_dennl_hmm

``--config.code=COMMIT`` profiles an earlier commit (e.g. bench_versions'
baseline, ``4881312``) for a side-by-side.  The probes and their shapes are
bench_versions' (``benchmarks/configs/bench_versions.py``: the same fields, the
same ``full`` and ``tiny`` variants), so a profile explains a ratio that
bench_versions measured; ``full`` adds ``dynamax_smoother`` beside ``hmm_em_step``.
"""
from benchmarks.configs import bench_versions


def get_config(arg=None):
  config = bench_versions.get_config(arg)
  # Only the probes' shapes and repeats apply here.
  for unused in ("baseline", "current", "pairs"):
    del config[unused]
  # A commit to profile instead of this checkout's src/ ('' = the checkout,
  # uncommitted changes included), e.g. bench_versions' baseline.
  config.code = ""
  if config.preset == "full":  # with the peer of the em_step target
    config.probes = ("hmm_em_step", "dynamax_smoother") + tuple(
        p for p in config.probes if p != "hmm_em_step")
  # One thread: an operation that XLA:CPU splits over threads is traced once per part.
  config.pin_one_core = True
  config.calls = 3                 # profiled calls per probe (after the timed repeats)
  config.top = 25                  # operations listed per probe
  return config
