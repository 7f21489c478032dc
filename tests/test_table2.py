"""End-to-end smoke test of experiments/table2.py on a tiny simulated marketplace,
and the leakage guard: no test-step event reaches the graph or any training loss."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("dennl_jax.recsys.marketplace")

from dennl_jax.recsys import registry  # noqa: E402
from experiments import common  # noqa: E402
from experiments import table2  # noqa: E402

# float64, as these tests ran in the full suite before x64 became a per-test
# marker (modules collected before them switched it on at import).
pytestmark = pytest.mark.x64


def _tiny(methods=("popularity", "markov", "graphsage")):
  config = common.get_config("table2", "tiny")
  config.dataset = "marketplace"
  config.methods = methods
  return config


@pytest.mark.slow
def test_tiny_marketplace_end_to_end(tmp_path, monkeypatch):
  seen = {"graph_masks": [], "fits": []}
  original_graph = table2.graphsage.graph_from_events

  def spy_graph(log, seqs, event_mask, user_features=None):
    seen["graph_masks"].append((np.asarray(seqs.event_user), np.asarray(seqs.event_step),
                                np.asarray(event_mask).copy()))
    return original_graph(log, seqs, event_mask, user_features)

  original_get = registry.get

  def spy_get(name):
    p = original_get(name)

    def fit(key, train_task, val_task, config):
      seen["fits"].append((train_task, val_task))
      return p.fit(key, train_task, val_task, config)
    return p._replace(fit=fit)

  monkeypatch.setattr(table2.graphsage, "graph_from_events", spy_graph)
  monkeypatch.setattr(table2.registry, "get", spy_get)
  results = table2.run(_tiny(), str(tmp_path))

  # files and their layout
  for name in ("table2.json", "table2.md", "table2_buckets.json", "table2_cold.json",
               "table2_bars.png", "table2_history.png", "table2_per_user.npz", "config.json"):
    assert os.path.exists(tmp_path / name), name
  table = json.loads((tmp_path / "table2.json").read_text())
  meta = table["_meta"]
  assert meta["num_users_evaluated"] == meta["users_per_role"]["train"] > 0
  assert meta["seeds"] == [0] and meta["unit"] == "day"
  for m in ("popularity", "markov", "graphsage", "true_hsmm"):
    assert set(("top1", "top3", "top5", "ndcg5", "mrr")) <= set(table[m])
    assert 0 <= table[m]["top1"] <= table[m]["top3"] <= table[m]["top5"] <= 100
  assert "GraphSage" in (tmp_path / "table2.md").read_text()

  # leakage guard: no graph (training, test-time or cold-user) holds a test-step event
  assert seen["graph_masks"]
  for user, step, mask in seen["graph_masks"]:
    last = np.full(user.max() + 1, -1)      # each user's test step = their last step
    np.maximum.at(last, user[user >= 0], step[user >= 0])
    assert not np.any(mask & (user >= 0) & (step == last[np.maximum(user, 0)]))
  # training losses: train tasks show no target, histories end before the validation step
  for train_task, val_task in seen["fits"]:
    assert np.all(train_task.target_step == -1)
    t = np.arange(train_task.mask.shape[1])[None]
    val = val_task.target_step
    assert not np.any(train_task.history_mask & (val[:, None] >= 0) & (t >= val[:, None]))
    assert not np.any(train_task.history_mask & ~train_task.train_users[:, None])
    # users with a validation target are training users only
    assert np.all(val_task.train_users[val >= 0])
  assert results["table"]["popularity"]["n"] == meta["num_users_evaluated"]

  # resume: a rerun into the same directory trains nothing (GraphSAGE and every
  # method come from the per-seed cache) and reproduces the table
  def no_training(*args, **kwargs):
    raise AssertionError("a cached result was recomputed")
  monkeypatch.setattr(table2, "embeddings_for_seed", no_training)
  monkeypatch.setattr(table2, "_run_method", no_training)
  again = table2.run(_tiny(), str(tmp_path))
  for m in ("popularity", "markov", "graphsage", "true_hsmm"):
    assert again["table"][m]["top1"] == results["table"][m]["top1"]
    assert again["table"][m]["interval"] == results["table"][m]["interval"]
  # cached_only reports what is on disk and leaves out what is not
  config = _tiny(methods=("popularity", "last_step"))
  config.cached_only = True
  partial = table2.run(config, str(tmp_path))
  assert "last_step" in partial["table"]["_meta"]["failed_methods"]


def test_phase_accuracy_scores_relabelled_truth_as_perfect():
  import jax
  from dennl_jax.recsys import marketplace
  from dennl_jax.recsys.task import make_tasks
  config = _tiny()
  log, seqs, split, extra = table2.load_data(config, jax.random.key(0))
  truth = extra["truth"]
  phases = marketplace.phases_of_steps(truth, seqs)
  _, test = make_tasks(seqs, split, np.zeros((len(seqs.user_ids), 2)),
                       np.ones(len(seqs.user_ids), bool))
  relabel = np.array([3, 0, 4, 1, 2])
  oracle = registry.Predictor(None, None, False, False,
                              decode=lambda fitted, task: np.where(phases >= 0, relabel[phases], -1))
  assert table2.phase_accuracy(oracle, None, test, seqs, truth) == 100.0
  noisy = registry.Predictor(None, None, False, False,
                             decode=lambda fitted, task: np.zeros_like(phases))
  assert table2.phase_accuracy(noisy, None, test, seqs, truth) < 100.0


def test_network_losses_become_grid_entries():
  config = common.get_config("table2", "full")
  cfg = table2.method_config(config, "dennl", {}, {})
  assert cfg["grid"] == [{"loss": "likelihood", "cold_weight": 0.0},
                         {"loss": "heldout", "cold_weight": 0.0},
                         {"loss": "predictive", "cold_weight": 0.0},
                         {"loss": "predictive", "cold_weight": 1.0}]
  assert "losses" not in cfg
  with pytest.raises(common.ConfigError, match="predictive loss only"):
    table2.loss_setting("heldout+cold")


@pytest.mark.slow
def test_role_draws_change_only_the_split(tmp_path, monkeypatch):
  """Every draw shares data, split and training keys; only the roles differ, every
  method is scored on every draw, and the table pools draws x users."""
  import jax
  calls = []
  original = table2.run_seed

  def spy(seed_key, seed, log, seqs, split, roles, config, extra, methods, cache=None, **kw):
    out = original(seed_key, seed, log, seqs, split, roles, config, extra, methods, cache, **kw)
    calls.append(dict(key=np.asarray(jax.random.key_data(seed_key)), seed=seed, seqs=seqs,
                      split=split, roles=np.asarray(roles).copy(), draw=kw["draw"], out=out))
    return out

  monkeypatch.setattr(table2, "run_seed", spy)
  config = _tiny(methods=("popularity", "markov"))
  config.draws = 3
  results = table2.run(config, str(tmp_path))
  assert [c["draw"] for c in calls] == [0, 1, 2]
  first = calls[0]
  for c in calls[1:]:
    assert c["seqs"] is first["seqs"] and c["split"] is first["split"]
    np.testing.assert_array_equal(c["key"], first["key"])
    from dennl_jax.recsys import protocol
    assert protocol.role_counts(c["roles"]) == protocol.role_counts(first["roles"])
    np.testing.assert_array_equal(c["roles"] == protocol.TOO_SHORT,
                                  first["roles"] == protocol.TOO_SHORT)
  assert len({c["roles"].tobytes() for c in calls}) == 3        # the cold set moves
  # draw 0 is the single-draw run's split
  lengths = np.asarray(first["seqs"].mask).sum(1)
  k_roles = jax.random.split(jax.random.key(config.seed), 4)[1]
  np.testing.assert_array_equal(first["roles"], table2.draw_roles(config, k_roles, lengths, 0))
  table = results["table"]
  n = table["_meta"]["users_per_role"]["train"]
  for m in ("popularity", "markov", "best_constant", "true_hsmm"):
    assert table[m]["n"] == 3 * n
    per_draw = [100 * c["out"][m]["main"]["top1"].mean() for c in calls]
    assert table[m]["top1"] == pytest.approx(np.mean(per_draw))
    assert table[m]["draw_spread"]["top1"]["per_draw"] == pytest.approx(per_draw)
  # no constant ranking beats the best one on its own targets
  for k in ("top1", "top3", "mrr"):
    assert table["best_constant"][k] >= table["popularity"][k] - 1e-9
  assert "random ranking (expected)" in (tmp_path / "table2.md").read_text()


def test_movielens_default_protocol_has_no_partial_validation_or_test_step():
  import jax
  from dennl_jax.recsys import step_report
  from dennl_jax.recsys.movielens import DEFAULT_DATA_DIR, resolve_data_dir
  try:
    resolve_data_dir(DEFAULT_DATA_DIR)
  except ValueError:
    pytest.skip(f"MovieLens not found at {DEFAULT_DATA_DIR}")
  for unit in ("auto", "session"):
    config = common.get_config("table2", "quick")
    config.unit = unit
    log, seqs, split, _ = table2.load_data(config, jax.random.key(0))
    stats = step_report.step_statistics(log, seqs, split)
    sizes = step_report.step_sizes(seqs)
    users = np.flatnonzero(split.val_step >= 0)
    val, test = sizes[users, split.val_step[users]], sizes[users, split.test_step[users]]
    if unit == "auto":      # whole blocks of 10: every validation and test step holds 10 ratings
      assert np.all(val == 10) and np.all(test == 10)
      assert stats["partial_val_steps"] == stats["partial_test_steps"] == 0
      assert seqs.report["dropped_events"] > 0
    else:                   # sessions: more than 30 min between validation and test steps
      assert stats["val_to_test_seconds"]["min"] > config.session_gap
      assert stats["test_same_second_as_val"] == 0
