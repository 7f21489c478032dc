"""experiments/table1_pool.py on hand-made run directories (known answers)."""
import json

import jax
import numpy as np
import pytest

from experiments import table1_pool as tp
from experiments import table1_report as report

PROTOCOL = {"gradient": "exact", "preset": "full", "losses": ["likelihood", "heldout"],
            "select_learning_rates": [0.001, 0.003], "select_by": "accuracy",
            "bootstrap_seed": 0, "num_users": 1000}


def _run(tmp_path, name, seeds, per_user, **changes):
  d = tmp_path / name
  d.mkdir()
  config = dict(PROTOCOL, seed=seeds[0], num_seeds=len(seeds), seeds=seeds,
                methods=sorted({r for seed in per_user for r in seed}), settings=["noise20"],
                **changes)
  (d / "config.json").write_text(json.dumps(config))
  (d / "per_user.json").write_text(json.dumps(per_user))
  (d / "timings.json").write_text(json.dumps(
      {"seconds": {"dennl": {"noise20": [10.0 * (s + 1) for s in seeds]}}}))
  return str(d)


def _users(rng, p):
  return (rng.random(7) < p).astype(float).tolist()


def test_pieces_pool_into_the_single_run_summary(tmp_path):
  rng = np.random.default_rng(0)
  seeds = [{r: {"noise20": _users(rng, p)} for r, p in
            [("oracle", 0.9), ("conventional_em", 0.6), ("dennl", 0.7)]} for _ in range(3)]
  a = _run(tmp_path, "s0", [0], seeds[:1])
  b = _run(tmp_path, "s12", [1, 2], seeds[1:])
  # Seed 0 again with Initial Fusion only (the oracle is recomputed, identically).
  fusion = {"oracle": seeds[0]["oracle"], "initial_fusion": {"noise20": _users(rng, 0.65)}}
  c = _run(tmp_path, "s0_if", [0], [fusion])
  per_user, times, protocol = tp.read_runs([a, b, c])
  assert sorted(per_user) == [0, 1, 2] and protocol["gradient"] == "exact"
  assert times["dennl"]["noise20"] == [10.0, 20.0, 30.0, 10.0]
  summary, left_out = tp.pool(per_user, jax.random.PRNGKey(0), 200)
  assert left_out == {"noise20": ["initial_fusion"]}      # only seed 0 has it
  single = report.summarize(seeds, jax.random.fold_in(jax.random.PRNGKey(0), 3), 200)
  for row in ("oracle", "conventional_em", "dennl"):
    assert summary["rows"][row]["noise20"] == single["rows"][row]["noise20"]
  assert summary["paired"]["conventional_em"]["noise20"] == single["paired"]["conventional_em"]["noise20"]
  np.testing.assert_allclose(summary["rows"]["dennl"]["noise20"]["mean"],
                             np.mean([np.mean(s["dennl"]["noise20"]) for s in seeds]))
  text = "\n".join(tp.markdown(summary, times, left_out, [a, b, c], protocol))
  assert "noise20: 3" in text and "Left out" in text and "initial_fusion" in text


def test_refuses_disagreeing_seeds_and_protocols(tmp_path):
  rng = np.random.default_rng(1)
  seed = {"oracle": {"noise20": _users(rng, 0.9)}, "dennl": {"noise20": _users(rng, 0.7)}}
  a = _run(tmp_path, "a", [0], [seed])
  other = {"oracle": {"noise20": [1.0 - x for x in seed["oracle"]["noise20"]]}}
  b = _run(tmp_path, "b", [0], [other])
  with pytest.raises(tp.PoolError, match="seed 0, noise20, oracle: two runs disagree"):
    tp.read_runs([a, b])
  c = _run(tmp_path, "c", [1], [seed], gradient="spsa")
  with pytest.raises(tp.PoolError, match=r"\['gradient'\] differ"):
    tp.read_runs([a, c])
  # The preset's name may differ (the ablations variant is the full protocol).
  d = _run(tmp_path, "d", [1], [seed], preset="ablations")
  assert sorted(tp.read_runs([a, d])[0]) == [0, 1]
  # Fields declared equivalent may differ, and the report says how.
  e = _run(tmp_path, "e", [2], [seed], patience=1000)
  f = _run(tmp_path, "f", [3], [seed], patience_fraction=0.25)
  with pytest.raises(tp.PoolError, match="patience"):
    tp.read_runs([e, f])
  per_user, times, protocol = tp.read_runs([e, f], ("patience", "patience_fraction"))
  assert sorted(per_user) == [2, 3]
  assert protocol["differing"] == {"patience": [1000, None], "patience_fraction": [None, 0.25]}
  summary, left_out = tp.pool(per_user, jax.random.PRNGKey(0), 50)
  assert "`patience` [1000, None]" in "\n".join(tp.markdown(summary, times, left_out, [e, f],
                                                            protocol))


def _curve(values, stopped_early, skipped=None):
  return {"step": [0], "loss": [1.0], "best_step": 100 * int(np.argmin(values)),
          **({} if skipped is None else {"skipped": skipped}),
          "steps_run": 100 * (len(values) - 1), "stopped_early": stopped_early,
          "validation": [[100 * i, v, None] for i, v in enumerate(values)]}


def test_curves_pool_into_a_convergence_table_and_figure(tmp_path):
  rng = np.random.default_rng(2)
  seed = {"oracle": {"noise20": _users(rng, 0.9)}, "dennl": {"noise20": _users(rng, 0.7)}}
  a = _run(tmp_path, "a", [0], [seed])
  b = _run(tmp_path, "b", [1], [seed])
  dennl = "dennl[heldout,lr=0.001]"
  (tmp_path / "a" / "curves.json").write_text(json.dumps(
      {"0": {"noise20": {dennl: _curve([7.0, 6.5, 6.4, 6.6], True, skipped=120)}}}))
  (tmp_path / "b" / "curves.json").write_text(json.dumps(
      {"1": {"noise20": {dennl: _curve([7.1, 6.9, 6.8], False)}}}))
  curves = tp.read_curves([a, b])
  assert sorted(curves) == ["0", "1"]
  rows = report.convergence_rows(curves, ["noise20"])
  assert rows == [["noise20", 0, dennl, 7.0, 6.4, 200, 300, "patience", 120],
                  ["noise20", 1, dennl, 7.1, 6.8, 200, 200, "budget", None]]
  per_user, times, protocol = tp.read_runs([a, b])
  summary, left_out = tp.pool(per_user, jax.random.PRNGKey(0), 50)
  text = "\n".join(tp.markdown(summary, times, left_out, [a, b], protocol, curves))
  assert "| noise20 | 0 | `dennl[heldout,lr=0.001]` | 7.000 | 6.400 | 200 | 300 | patience | 120 |" in text
  assert "| 200 | 200 | budget | — |" in text
  report.plot_validation_curves(tmp_path / "v.png", curves, ["noise20"], lambda n: "DENNL")
  assert (tmp_path / "v.png").stat().st_size > 1000
  # The same candidate of a seed must have the same curve in every run.
  c = _run(tmp_path, "c", [0], [seed])
  (tmp_path / "c" / "curves.json").write_text(json.dumps(
      {"0": {"noise20": {dennl: _curve([7.0, 6.0, 6.4, 6.6], True)}}}))
  with pytest.raises(tp.PoolError, match="different validation curves"):
    tp.read_curves([a, c])
