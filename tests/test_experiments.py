"""Smoke tests of the experiment binaries (experiments/*.py).

Every binary's ``run(config, output_dir)`` (what ``python -m experiments.<name>``
calls after parsing its flags) runs on its config's ``tiny`` variant and its
output files must exist and parse; the flag handling shared by every binary
(experiments/common.py) is checked on its own, and the README's main command
line once end to end up to the point where it rejects a bad method.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx

from experiments import common

# Binaries run in float32; keep x64 switched on by other modules out.
pytestmark = pytest.mark.usefixtures("float32_default")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARIES = ("synthetic_table1", "bench_em_step", "bench_hsmm", "spsa_gradients", "spsa_training",
            "demo_em", "demo_hsmm")
# Files each binary writes besides config.json.
OUTPUTS = {
    "synthetic_table1": ("table1.json", "table1_stats.json", "table1.md", "timings.json",
                         "curves.json", "selection.json", "per_user.json",
                         "training_curves.png"),
    "bench_em_step": ("results.json", "results.md"),
    "bench_hsmm": ("results.json", "results.md"),
    "spsa_gradients": ("results.json", "tables.md"),
    "spsa_training": ("results.json", "tables.md", "curves.png"),
    "demo_em": ("results.json",),
    "demo_hsmm": ("results.json",),
}


def _numbers(tree):
  """Every float/int leaf of a JSON tree."""
  if isinstance(tree, dict):
    return [x for v in tree.values() for x in _numbers(v)]
  if isinstance(tree, list):
    return [x for v in tree for x in _numbers(v)]
  return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


# Table 1's tiny run trains one network of the likelihood-trained kind
# (_likelihood_trained is shared by all three); Initial Fusion and DENNL would
# add ~60 s of XLA compilation of their EM layers (trained in
# tests/test_models.py), so here their registry entries are only built
# (test_table1_networks_build).
TABLE1_SMOKE_METHODS = ("conventional_em", "em_mapping", "mlp_mapper")


def _package(name: str) -> str:
  """The paper's binaries live in experiments/, the performance lab in benchmarks/."""
  return "benchmarks" if name.startswith("bench") else "experiments"


@pytest.mark.slow
@pytest.mark.parametrize("name", BINARIES)
def test_binary_runs_on_tiny_config(name, tmp_path):
  config = common.get_config(name, "tiny")
  if name == "synthetic_table1":
    config.methods = TABLE1_SMOKE_METHODS
  module = importlib.import_module(f"{_package(name)}.{name}")
  module.run(config, str(tmp_path))
  for filename in ("config.json",) + OUTPUTS[name]:
    assert (tmp_path / filename).stat().st_size > 0, filename
  saved = common.read_json(tmp_path / "config.json")
  assert saved["preset"] == "tiny"
  assert saved["seed"] == 0
  for filename in OUTPUTS[name]:
    if filename.endswith(".json"):
      assert _numbers(common.read_json(tmp_path / filename)), filename
    elif filename.endswith(".md"):
      assert "|---" in (tmp_path / filename).read_text(), filename
  if name == "synthetic_table1":
    table = common.read_json(tmp_path / "table1.json")
    rows = ("oracle", "pooled_start") + tuple(config.methods)
    assert sorted(table) == sorted(rows)
    for row in rows:
      assert set(table[row]) == set(config.settings)
      assert all(0.0 <= acc <= 1.0 for acc in table[row].values()), row
    curves = common.read_json(tmp_path / "curves.json")["0"][config.settings[0]]
    assert set(curves) == {"em_mapping[regression,lr=0.001]", "mlp_mapper[likelihood,lr=0.001]"}
    assert len(curves["mlp_mapper[likelihood,lr=0.001]"]["loss"]) == config.train_steps
    stats = common.read_json(tmp_path / "table1_stats.json")
    cell = stats["rows"]["mlp_mapper"][config.settings[0]]
    assert cell["n_seeds"] == 1 and cell["mean"] == table["mlp_mapper"][config.settings[0]]
    # Every trained method was selected on validation users among its candidates.
    selection = common.read_json(tmp_path / "selection.json")["0"][config.settings[0]]
    assert sum(c["selected"] for c in selection["mlp_mapper"]) == 1
    # Label-free by default: the selected candidate has the lowest validation held-out
    # NLL; the oracle-selection row (validation accuracy) is reported beside it.
    chosen = min(selection["mlp_mapper"], key=lambda c: c["validation"])
    assert chosen["selected"] and config.select_by == "heldout_nll"
    assert all("oracle_accuracy" in c and "stopped_early" in c for c in selection["mlp_mapper"])
    assert "mlp_mapper@oracle" in stats["rows"]
    assert "oracle selection" in (tmp_path / "table1.md").read_text()
    assert "selected without labels" in (tmp_path / "table1.md").read_text()
  if name.startswith("demo"):
    assert 0.0 <= common.read_json(tmp_path / "results.json")["accuracy"] <= 1.0


def test_table1_networks_build():
  """Every network of Table 1's registry builds from a setting's start and codec."""
  import dennl_jax as dj
  from experiments import synthetic_table1
  config = common.get_config("synthetic_table1", "tiny")
  synthetic = synthetic_table1.S.SyntheticConfig(**config.synthetic.to_dict())
  k, o = synthetic.num_states, synthetic.obs_dim
  start = dj.HSMM(jnp.full(k, 1.0 / k), (1.0 - jnp.eye(k)) / (k - 1),
                  dj.PoissonDuration(jnp.full(k, 2.0), synthetic.max_duration),
                  dj.Gaussian(jnp.ones((k, o)) * jnp.arange(k)[:, None],
                              jnp.stack([jnp.eye(o)] * k), min_covar=config.min_covar))
  setting = synthetic_table1.Setting(
      name="T50", config=config, synthetic=synthetic,
      keys=jax.random.split(jax.random.PRNGKey(0), 8), train=None, test=None, start=start,
      codec=dj.ParamCodec(start), curves={})
  # Abstract construction (shapes only): checks the wiring without compiling anything.
  built = {name: nnx.eval_shape(lambda build=method.build: build(setting, nnx.Rngs(0)))
           for name, method in synthetic_table1.METHODS.items() if method.build is not None}
  assert set(built) == {"mlp_mapper", "initial_fusion", "dennl"} | set(synthetic_table1.ABLATIONS)
  assert set(common.get_config("synthetic_table1", "ablations").methods) <= set(
      synthetic_table1.METHODS)
  assert isinstance(built["dennl"], dj.DENNL)
  assert not built["dennl_direct"].residual and not built["dennl_no_latent"].use_latent
  assert not built["dennl_no_embed"].embed_in_stage and built["dennl_user_start"].user_start
  assert built["dennl_5stage"].num_stages == 5
  assert isinstance(built["initial_fusion"], dj.InitialFusion)
  assert isinstance(built["mlp_mapper"], dj.EmbeddingMapper)


@pytest.mark.parametrize("name", BINARIES)
def test_config_modules(name):
  module = importlib.import_module(f"{_package(name)}.configs.{name}")
  assert f"python -m {_package(name)}.{name}" in module.__doc__
  full, tiny = common.get_config(name), common.get_config(name, "tiny")
  assert full.preset == "full" and tiny.preset == "tiny"
  assert full.to_dict().keys() == tiny.to_dict().keys()
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    module.get_config("huge")


def _parse(argv, name="synthetic_table1"):
  flag_values = flags.FlagValues()
  binary = common.BinaryFlags(name, output_dir="/tmp/default", variants={"quick": "quick"},
                              flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return binary


def test_quick_shorthand_and_overrides():
  binary = _parse(["prog", "--quick", "--config.seed=3", "--config.synthetic.max_duration=5",
                   "--output_dir=/tmp/out"])
  config = binary.config()
  quick = common.get_config("synthetic_table1", "quick")
  assert config.preset == "quick" and config.num_users == quick.num_users
  assert config.seed == 3 and config.synthetic.max_duration == 5   # explicit overrides win
  assert binary.output_dir == "/tmp/out"
  same = _parse(["prog", f"--config={common.config_path('synthetic_table1')}:quick",
                 "--config.seed=3", "--config.synthetic.max_duration=5"]).config()
  assert same.to_dict() == config.to_dict()
  default = _parse(["prog"]).config()
  assert default.to_dict() == common.get_config("synthetic_table1").to_dict()
  assert default.preset == "full"
  with pytest.raises(common.ConfigError, match="both pick a config"):
    _parse(["prog", "--quick", f"--config={common.config_path('synthetic_table1')}:full"]).config()


def test_table1_rejects_unknown_names():
  from experiments import synthetic_table1
  config = common.get_config("synthetic_table1", "tiny")
  config.methods = ("dennl, em_mapping",)    # --config.methods=dennl,em_mapping
  assert synthetic_table1.prepare_config(config).methods == ("dennl", "em_mapping")
  config.methods = ("dennl", "hmmlearn")
  with pytest.raises(common.ConfigError, match="unknown method 'hmmlearn'"):
    synthetic_table1.prepare_config(config)
  config.methods = ("dennl",)
  config.settings = ("T7",)
  with pytest.raises(common.ConfigError, match="unknown setting 'T7'"):
    synthetic_table1.prepare_config(config)
  assert tuple(m for m in synthetic_table1.METHODS if m not in synthetic_table1.ABLATIONS) == (
      common.get_config("synthetic_table1").methods)


@pytest.mark.slow
def test_readme_command_line_reaches_the_config():
  """The README's main job parses --quick and overrides (stopped by a bad method)."""
  result = subprocess.run(
      [sys.executable, "-m", "experiments.synthetic_table1", "--quick", "--output_dir=/dev/null",
       "--config.methods=dennl,nonsense", "--config.seed=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "unknown method 'nonsense'" in result.stderr


def test_results_writers(tmp_path):
  obj = {"a": np.float32(0.5), "b": jnp.arange(3), "c": (1, np.int64(2)), "d": np.ones((2, 2))}
  path = common.write_json(str(tmp_path / "sub" / "x.json"), obj)
  assert json.load(open(path)) == {"a": 0.5, "b": [0, 1, 2], "c": [1, 2],
                                   "d": [[1.0, 1.0], [1.0, 1.0]]}
  lines = common.markdown_table(["m", "v"], [("x", 1), ("y", 2.5)], align=["left", "right"])
  assert lines == ["| m | v |", "|---|---:|", "| x | 1 |", "| y | 2.5 |"]
  with pytest.raises(ValueError, match="2 cells for 3 columns"):
    common.markdown_table(["a", "b", "c"], [("x", 1)])
  text = common.write_markdown_table(str(tmp_path / "t.md"), ["m"], [("x",)], title="# T")
  assert text == "# T\n\n| m |\n|---|\n| x |\n"
  config = common.get_config("demo_em", "tiny")
  common.save_config(config, str(tmp_path))
  assert common.read_json(tmp_path / "config.json") == config.to_dict()
  assert common.names(("a, b", "c")) == ("a", "b", "c")


def test_timing_helpers():
  calls = []
  fn = lambda x: calls.append(x) or jnp.asarray(x)
  median, all_seconds = common.median_seconds(fn, 1.0, repeats=3)
  assert len(calls) == 4 and len(all_seconds) == 3   # one warm-up call
  assert median == float(np.median(all_seconds)) and all(s >= 0 for s in all_seconds)
  (m1, t1), (m2, t2) = common.interleaved_median_seconds([(fn, (1,)), (fn, (2,))], 2,
                                                         warmup=False)
  assert calls[4:] == [1, 2, 1, 2]                    # alternating
  out, seconds = common.timed(fn)(5)
  assert int(out) == 5 and seconds >= 0
  with common.timer() as t:
    pass
  assert 0 <= t.seconds < 1 and not math.isnan(t.seconds)
  with pytest.raises(ValueError, match="repeats"):
    common.median_seconds(fn, 1, repeats=0)


def test_table1_stats_over_seeds_and_paired_differences():
  from scipy import stats
  from experiments import table1_report as report
  rng = np.random.default_rng(0)
  per_user = [{"dennl": {"T50": rng.uniform(0.7, 1.0, 20)},
               "conventional_em": {"T50": rng.uniform(0.5, 0.9, 20)}} for _ in range(3)]
  summary = report.summarize(per_user, jax.random.PRNGKey(0), 500)
  means = [p["dennl"]["T50"].mean() for p in per_user]
  cell = summary["rows"]["dennl"]["T50"]
  np.testing.assert_allclose(cell["mean"], np.mean(means))
  np.testing.assert_allclose(cell["std"], np.std(means, ddof=1))
  np.testing.assert_allclose(cell["ci95"], stats.t.interval(0.95, 2, np.mean(means),
                                                            stats.sem(means)))
  diff = summary["paired"]["conventional_em"]["T50"]
  pooled = np.concatenate([p["dennl"]["T50"] - p["conventional_em"]["T50"] for p in per_user])
  np.testing.assert_allclose(diff["mean"], 100 * pooled.mean())
  assert diff["low"] < diff["mean"] < diff["high"] and diff["n_pairs"] == 60
  assert report.means_table(summary)["dennl"]["T50"] == cell["mean"]
  assert any("DENNL" in line and "conventional_em" in line for line in report.headline(summary))


@pytest.mark.slow
def test_bench_hsmm_runs_any_subset_of_its_tables(tmp_path):
  """Each of bench_hsmm's three tables can be switched off (an empty list of D)."""
  from benchmarks import bench_hsmm
  config = common.get_config("bench_hsmm", "tiny")
  config.durations = ()
  config.gradient_users = 0
  result = bench_hsmm.run(config, str(tmp_path))
  assert result["rows"] == [] and result["gradient_rows"] == []
  assert len(result["batched_kernel_rows"]) == len(config.kernel_durations)
  assert "|---" in (tmp_path / "results.md").read_text()


def test_label_free_selection_never_reads_the_true_states(tmp_path, monkeypatch):
  """With select_by=heldout_nll and no oracle row, no validation label is ever read:
  the accuracy criterion raises if called, and the run still trains and selects."""
  from experiments import synthetic_table1, table1_selection

  def no_labels(s, model):
    raise AssertionError("label-free selection read the validation users' true states")

  monkeypatch.setattr(table1_selection, "validation_accuracy", no_labels)
  config = common.get_config("synthetic_table1", "tiny")
  config.methods = ("mlp_mapper",)
  config.oracle_selection = False
  config.select_learning_rates = (1e-3, 1e-2)
  assert config.select_by == "heldout_nll"
  synthetic_table1.run(config, str(tmp_path))
  selection = common.read_json(tmp_path / "selection.json")["0"][config.settings[0]]
  candidates = selection["mlp_mapper"]
  assert len(candidates) == 2 and sum(c["selected"] for c in candidates) == 1
  assert min(candidates, key=lambda c: c["validation"])["selected"]
  assert all(c["skipped_steps"] == 0 for c in candidates)     # recorded per candidate
  stats = common.read_json(tmp_path / "table1_stats.json")
  assert "mlp_mapper@oracle" not in stats["rows"]
  assert "mlp_mapper@untrained" in stats["rows"]      # what training adds, beside it
