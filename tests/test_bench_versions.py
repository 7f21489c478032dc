"""benchmarks/bench_versions.py: timing this code against a commit in fresh processes.

The tiny run times HEAD's exported ``src/`` against this checkout (equal code
on a clean clone, so equal outputs); the probe's import check is tested with
a directory that holds no ``dennl_jax``.
"""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from benchmarks import bench_versions
from experiments import common
from benchmarks.configs import bench_versions as bench_versions_config


def _git_checkout() -> bool:
  try:
    return subprocess.run(["git", "-C", bench_versions.ROOT, "rev-parse", "HEAD"],
                          capture_output=True).returncode == 0
  except FileNotFoundError:
    return False


needs_git = pytest.mark.skipif(not _git_checkout(), reason="not a git checkout")


def _src_modified() -> bool:
  return bool(subprocess.run(
      ["git", "-C", bench_versions.ROOT, "status", "--porcelain", "--untracked-files=no", "--",
       "src"], capture_output=True, text=True).stdout.strip())


@pytest.mark.slow
@needs_git
def test_tiny_run_times_both_codes_and_compares_outputs(tmp_path):
  config = common.get_config("bench_versions", "tiny")
  result = bench_versions.run(config, str(tmp_path))
  rows = result["rows"]
  assert [r["case"]["probe"] for r in rows] == ["hmm_em_step", "hsmm_em_step", "dennl_step_hsmm"]
  for row in rows:
    assert {k: len(v) for k, v in row["seconds"].items()} == {"baseline": 1, "current": 1}
    assert row["ratio"] > 0 and len(row["pair_ratios"]) == 1
    if not _src_modified():
      # The same code twice: the same outputs, to the bit.
      assert row["max_abs_output_difference"] == 0.0, row["name"]
  for name in ("config.json", "results.json", "results.md"):
    assert (tmp_path / name).stat().st_size > 0
  assert "baseline / current" in (tmp_path / "results.md").read_text()
  assert len(list((tmp_path / "logs").glob("*.log"))) == 2 * len(rows)


@pytest.mark.slow
def test_probe_must_import_the_code_it_was_given(tmp_path):
  case = bench_versions.cases(common.get_config("bench_versions", "tiny"))[0]
  # No dennl_jax under tmp_path: the installed one is imported instead.
  with pytest.raises(RuntimeError, match="imported .*not the code in"):
    bench_versions.run_probe(str(tmp_path), case, pin_one_core=False,
                             outputs_path=str(tmp_path / "out.npz"))


@needs_git
def test_unknown_commit_and_probe_are_config_errors():
  with pytest.raises(common.ConfigError, match="rev-parse"):
    bench_versions.resolve_commit("no-such-commit-xyz")
  config = common.get_config("bench_versions", "tiny")
  config.probes = ("hmm_em_step", "viterbi")
  with pytest.raises(common.ConfigError, match="config.probes"):
    bench_versions.cases(config)


def test_cases_cover_every_duration_and_probe():
  config = common.get_config("bench_versions")
  names = [(c["probe"], c.get("max_duration")) for c in bench_versions.cases(config)]
  assert names == [("hmm_em_step", None), ("hsmm_em_step", 20), ("hsmm_em_step", 60),
                   ("dennl_step_hmm", None), ("dennl_step_hsmm", 20)]
  assert config.baseline == bench_versions_config.REFERENCE_COMMIT


def test_output_difference(tmp_path):
  a, b, c = (str(tmp_path / f"{n}.npz") for n in "abc")
  np.savez(a, np.zeros(3), np.ones((2, 2), np.float32))
  np.savez(b, np.array([0.0, 0.5, -2.0]), np.ones((2, 2), np.float32))
  np.savez(c, np.zeros(3))
  assert bench_versions.output_difference(a, b) == 2.0
  assert bench_versions.output_difference(a, a) == 0.0
  assert bench_versions.output_difference(a, c) is None      # another output structure


def test_config_module():
  assert "python -m benchmarks.bench_versions" in bench_versions_config.__doc__
  full, tiny = common.get_config("bench_versions"), common.get_config("bench_versions", "tiny")
  assert full.to_dict().keys() == tiny.to_dict().keys()
  with pytest.raises(ValueError, match="unknown variant"):
    bench_versions_config.get_config("huge")
