"""Aggregation, markdown and plots of experiments/table2.py (no training here)."""
from __future__ import annotations

import os

import jax
import numpy as np

from dennl_jax.recsys import metrics as rm
from experiments import common

# Paper Table 2 (top-1/3/5 %, their private Home Decoration data).
PAPER = {"conventional_em": ("Conventional EM", 10.3, 23.9, 50.5),
         "graphsage": ("GraphSage", 17.7, 37.4, 65.5),
         "mlp_mapper": ("MLP Mapper", 7.4, 19.6, 35.1),
         "initial_fusion": ("Initial Fusion", 11.5, 21.6, 48.2),
         "dennl": ("DENNL", 21.8, 48.5, 75.2)}
HEADLINE = ("mrr", "top1", "top3", "top5", "ndcg5")
PRIMARY = ("mrr", "top1")
PAIRED = ("mrr", "top1", "top3", "top5")
BEST_CONSTANT = "best_constant"
LABELS = {BEST_CONSTANT: "best constant ranking (chosen on the test targets; ceiling of popularity)"}


def _summary(rows, key, config):
  s = rm.summarize(rows["values"], key, config.bootstrap, clusters=rows["users"])
  out = {m: s[m]["mean"] for m in rm.METRICS}
  out["interval"] = {m: [s[m]["low"], s[m]["high"]] for m in rm.METRICS}
  out["n"] = s["n"]
  out["users"] = int(np.unique(rows["users"]).size)
  out["draw_spread"] = rm.draw_spread(rows["per_draw"])
  return out


def _paired(a, b, key, config):
  keys = jax.random.split(key, len(PAIRED))
  return {m: rm.paired_difference(a["values"][m], b["values"][m], k, config.bootstrap,
                                  clusters=a["users"]) for m, k in zip(PAIRED, keys)}


def _compare(pooled, methods, key, config):
  """Per method: summary + paired difference vs popularity and reference - method."""
  out = {}
  for j, name in enumerate(methods):
    k = jax.random.fold_in(key, j)
    row = _summary(pooled[name], jax.random.fold_in(k, 0), config)
    if name != BEST_CONSTANT and "popularity" in pooled and name != "popularity":
      row["vs_popularity"] = _paired(pooled[name], pooled["popularity"], jax.random.fold_in(k, 1),
                                     config)
    if name != BEST_CONSTANT and config.reference in pooled and name != config.reference:
      row["reference_minus"] = _paired(pooled[config.reference], pooled[name],
                                       jax.random.fold_in(k, 2), config)
    out[name] = row
  return out


def pool_draws(runs_by_draw, method, pick, users):
  """One method's rows over role draws: per draw the per-user metrics averaged over seeds.

  pick(run) -> {metric: (n_d,)}; users(draw_runs) -> (n_d,) user index of each row.
  Returns {"values": {metric: (sum n_d,)}, "users": (sum n_d,), "draw": (sum n_d,),
  "per_draw": [{metric: (n_d,)}]}: the rows of every draw, each draw weighing
  its users (every draw has the same number of users: roles are stratified).
  """
  per_draw = [rm.average_over_seeds([pick(r[method]) for r in draw]) for draw in runs_by_draw]
  ids = [np.asarray(users(draw)) for draw in runs_by_draw]
  return {"values": {k: np.concatenate([d[k] for d in per_draw]) for k in per_draw[0]},
          "users": np.concatenate(ids),
          "draw": np.concatenate([np.full(len(u), j) for j, u in enumerate(ids)]),
          "per_draw": per_draw}


def aggregate(runs_by_draw, methods, key, config, meta):
  """(table, buckets, cold) dicts from experiments.table2.run_seed's results.

  runs_by_draw: one list of per-seed results per role draw.  Means are over
  draws x users; intervals resample users (a user's rows of every draw
  together); ``draw_spread`` is the spread of the per-draw means.
  """
  flat = [r for draw in runs_by_draw for r in draw]
  pooled = {m: pool_draws(runs_by_draw, m, lambda r: r["main"], lambda d: d[0]["_users"])
            for m in methods}
  table = _compare(pooled, methods, jax.random.fold_in(key, 0), config)
  buckets = {}
  for name in methods:
    # Spread of top-1 over training seeds, averaged over draws (0 with one seed).
    table[name]["seed_std_top1"] = float(np.mean(
        [rm.seed_spread([r[name]["main"] for r in draw])["top1"] for draw in runs_by_draw]))
    table[name]["lift_pct"] = rm.lift({m: {"mean": table[name][m]} for m in HEADLINE},
                                      {m: {"mean": table["popularity"][m]} for m in HEADLINE}
                                      ) if "popularity" in table else {}
    table[name]["fit_seconds"] = float(np.mean([r[name]["fit_seconds"] for r in flat]))
    table[name]["predict_seconds"] = float(np.mean([r[name]["predict_seconds"] for r in flat]))
    table[name]["fell_back"] = float(np.mean([d[0][name]["fell_back"] for d in runs_by_draw]))
    table[name]["selected"] = [r[name]["selected"] for r in flat]
    if "phase_accuracy" in flat[0][name]:
      table[name]["phase_accuracy"] = float(np.mean([r[name]["phase_accuracy"] for r in flat]))
  hist = np.concatenate([np.asarray(d[0]["_history_length"]) for d in runs_by_draw])
  for name in methods:
    buckets[name] = rm.by_bucket(pooled[name]["values"], hist)
  cold = {}
  hs = sorted(flat[0][methods[0]]["cold"]) if methods else []
  for h in hs:
    cpooled = {m: pool_draws(runs_by_draw, m, lambda r, h=h: r["cold"][h],
                             lambda d, h=h: d[0]["_cold_users"][h]) for m in methods}
    cold[h] = _compare(cpooled, methods, jax.random.fold_in(key, 100 + h), config)
    for name in methods:
      cold[h][name]["fell_back"] = float(np.mean([d[0][name]["cold_fell_back"][h]
                                                  for d in runs_by_draw]))
  table["_meta"] = meta
  per_user = {m: pooled[m]["values"] for m in methods}
  first = pooled[methods[0]]
  per_user["_rows"] = {"user": first["users"].astype(np.float64),
                       "draw": first["draw"].astype(np.float64),
                       "active_steps": hist.astype(np.float64)}
  return {"table": table, "buckets": buckets, "cold": cold, "per_user": per_user}


def _ci(row, m):
  lo, hi = row["interval"][m]
  return f"{row[m]:.1f} [{lo:.1f}, {hi:.1f}]"


def _diff(d):
  star = "*" if d["low"] > 0 or d["high"] < 0 else ""
  return f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]{star}"


def _spread(row, m="top1"):
  d = row["draw_spread"][m]
  return f"{d['min']:.1f}–{d['max']:.1f}"


def _steps_line(meta) -> str:
  st = meta.get("steps") or {}
  if not st:
    return ""
  q = lambda k: st[k]
  line = (f"Steps ({st['users_with_val_and_test']} users with validation and test steps): "
          f"steps per user median {q('steps_per_user')['median']:.0f} "
          f"(p10 {q('steps_per_user')['p10']:.0f}, p90 {q('steps_per_user')['p90']:.0f}); "
          f"events per step median {q('events_per_step')['median']:.0f} "
          f"(mean {q('events_per_step')['mean']:.1f}, p10–p90 {q('events_per_step')['p10']:.0f}–"
          f"{q('events_per_step')['p90']:.0f}); test step median {q('events_per_test_step')['median']:.0f}"
          f" events (mean {q('events_per_test_step')['mean']:.1f}), validation step median "
          f"{q('events_per_val_step')['median']:.0f}; {st['test_steps_of_one_event']} test steps of "
          f"one event; {st['test_steps_tied_pct']:.1f} % of test steps tied at the maximum; "
          f"validation -> test gap median {q('val_to_test_seconds')['median']:.0f} s, "
          f"{st['test_within_60s_of_val']} within 60 s, {st['test_same_second_as_val']} in the "
          "same second")
  if "partial_test_steps" in st:
    line += (f"; partial steps: {st['partial_val_steps']} validation, "
             f"{st['partial_test_steps']} test")
  return line + "."


def _unit(meta) -> str:
  if meta["unit"] == "events":
    return (f"blocks of {meta['events_per_step']} events (trailing partial block: "
            f"{meta.get('partial')}; same-second order: {meta.get('tie_order')})")
  if meta["unit"] == "session":
    return f"sessions (new step after {meta['session_gap']} s without an event)"
  return "calendar days"


def markdown(results, config) -> str:
  table, meta = results["table"], results["table"]["_meta"]
  methods = [m for m in table if not m.startswith("_")]
  draws = meta.get("draws", 1)
  ranked = meta.get("ranked_categories", meta["num_categories"])
  blocks = [f"# Table 2 — {meta['dataset']} ({meta['preset']}, unit: {meta['unit']})",
            f"Unit: {_unit(meta)}; split: {meta['split']}; users per role: "
            f"{meta['users_per_role']}; evaluated (main) per draw: {meta['num_users_evaluated']}; "
            f"role draws: {draws}; training seeds: {meta['seeds']}; categories: "
            f"{meta['num_categories']}.  Target: {meta['target']}.  Means over draws × users; "
            f"intervals: 95% bootstrap over users ({config.bootstrap} resamples; a user's rows of "
            f"every draw resampled together) of the per-user metric averaged over seeds; * = "
            "interval excludes 0.  Primary: MRR and top-1.",
            _steps_line(meta)]
  if meta.get("failed_methods"):
    blocks.append("Left out (failed): " + "; ".join(f"{m}: {e}" for m, e in
                                                    meta["failed_methods"].items()))
  def diff(m, k):
    return _diff(table[m]["vs_popularity"][k]) if "vs_popularity" in table[m] else "—"
  rows = [[LABELS.get(m, m)] + [_ci(table[m], k) for k in PRIMARY]
          + [f"{table[m][k]:.1f}" for k in ("top3", "top5", "ndcg5")]
          + [f"{table[m]['hit1']:.1f}/{table[m]['hit3']:.1f}/{table[m]['hit5']:.1f}",
             _spread(table[m]), diff(m, "mrr"), diff(m, "top1"),
             f"{table[m]['fit_seconds']:.1f} + {table[m]['predict_seconds']:.1f}"] for m in methods]
  ch = rm.chance(ranked)
  rows.append(["random ranking (expected)", f"{ch['mrr']:.1f}", f"{ch['top1']:.1f}",
               f"{ch['top3']:.1f}", f"{ch['top5']:.1f}", f"{ch['ndcg5']:.1f}", "—", "—", "—", "—",
               "—"])
  blocks.append(["## Main table (dominant-category target, %)", ""] + common.markdown_table(
      ["method", "MRR", "top-1", "top-3", "top-5", "NDCG@5", "hit@1/3/5 (paper's)",
       f"top-1 over {draws} draws (min–max)", "MRR − popularity", "top-1 − popularity",
       "fit + predict s"], rows))
  decoded = [m for m in methods if "phase_accuracy" in table[m]]
  if decoded:
    blocks.append(["## Phase decoding on the history steps (labelling accuracy vs true phases, %)",
                   ""] + common.markdown_table(
        ["method", "accuracy"], [[m, f"{table[m]['phase_accuracy']:.1f}"] for m in decoded]))
  paper_rows = []
  ref = table.get("graphsage")
  for key, (label, *nums) in PAPER.items():
    ours = table.get(key)
    lift_paper = "/".join(f"{100 * (n / g - 1):+.0f}%" for n, g in zip(nums, PAPER["graphsage"][1:]))
    if ours is None:
      paper_rows.append([label, "/".join(map(str, nums)), lift_paper, "not run", "—", "—"])
      continue
    lift_ours = ("/".join(f"{100 * (ours[k] / ref[k] - 1):+.0f}%" for k in ("top1", "top3", "top5"))
                 if ref else "—")
    paper_rows.append([label, "/".join(map(str, nums)), lift_paper,
                       f"{ours['top1']:.1f}/{ours['top3']:.1f}/{ours['top5']:.1f}",
                       f"{ours['hit1']:.1f}/{ours['hit3']:.1f}/{ours['hit5']:.1f}", lift_ours])
  blocks.append(["## Beside the paper's Table 2 (top-1/3/5 %)", "",
                 "The paper's numbers are on private data; compare lifts (relative to GraphSAGE "
                 "alone), not absolute values.", ""] + common.markdown_table(
      ["method", "paper", "paper vs GraphSage", "ours (dominant)", "ours (hit, paper's def.)",
       "ours vs GraphSAGE (dominant)"], paper_rows))
  if config.reference in table:
    rows = [[m] + [_diff(table[m]["reference_minus"][k]) for k in PAIRED]
            for m in methods if "reference_minus" in table[m]]
    blocks.append([f"## Paired differences {config.reference} − method (points, 95% interval)", ""]
                  + common.markdown_table(["method", "MRR", "top-1", "top-3", "top-5"], rows))
  buckets = results["buckets"]
  names = [rm.bucket_name(lo, hi) for lo, hi in rm.BUCKETS]
  present = [b for b in names if any(b in buckets[m] for m in methods)]
  rows = [[m] + [f"{buckets[m][b]['top1']:.1f}" if b in buckets[m] else "—" for b in present]
              for m in methods]
  counts = [str(next((buckets[m][b]["n"] for m in methods if b in buckets[m]), 0)) for b in present]
  blocks.append(["## Top-1 by history length (active steps before the test step; rows of all draws)", ""]
                + common.markdown_table(["method"] + [f"h={b}" for b in present],
                                        [["users"] + counts] + rows))
  for h, ctab in results["cold"].items():
    rows = [[LABELS.get(m, m), _ci(ctab[m], "mrr"), _ci(ctab[m], "top1"), f"{ctab[m]['top3']:.1f}",
             _spread(ctab[m]),
             _diff(ctab[m]["vs_popularity"]["top1"]) if "vs_popularity" in ctab[m] else "—",
             f"{ctab[m]['fell_back']:.0f}"] for m in methods]
    n, users = ctab[methods[0]]["n"], ctab[methods[0]]["users"]
    blocks.append([f"## Cold users shown h = {h} steps ({n} rows over {draws} draws, {users} "
                   f"distinct users; embedding: {meta['cold_embedding']})", ""]
                  + common.markdown_table(
        ["method", "MRR", "top-1", "top-3", "top-1 over draws (min–max)", "top-1 − popularity",
         "fell back to popularity (per draw)"], rows))
  return "\n\n".join(b if isinstance(b, str) else "\n".join(b) for b in blocks if b) + "\n"


def write(results, text, output_dir):
  common.write_json(os.path.join(output_dir, "table2.json"), results["table"])
  common.write_json(os.path.join(output_dir, "table2_buckets.json"), results["buckets"])
  common.write_json(os.path.join(output_dir, "table2_cold.json"), results["cold"])
  common.write_markdown(os.path.join(output_dir, "table2.md"), text)
  # per-user metrics (averaged over seeds) for paired analyses across runs
  np.savez_compressed(os.path.join(output_dir, "table2_per_user.npz"),
                      **{f"{m}/{k}": v for m, per in results["per_user"].items()
                         for k, v in per.items()})
  plot(results, output_dir)


def plot(results, output_dir):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  table = results["table"]
  methods = [m for m in table if not m.startswith("_")]
  fig, ax = plt.subplots(figsize=(max(6, 1.0 * len(methods)), 4))
  width = 0.27
  x = np.arange(len(methods))
  for j, k in enumerate(("top1", "top3", "top5")):
    means = np.array([table[m][k] for m in methods])
    lo = means - np.array([table[m]["interval"][k][0] for m in methods])
    hi = np.array([table[m]["interval"][k][1] for m in methods]) - means
    ax.bar(x + (j - 1) * width, means, width, yerr=[lo, hi], capsize=2, label=k)
  ax.set_xticks(x, methods, rotation=30, ha="right")
  ax.set_ylabel("% (dominant category)")
  ax.set_title(f"Table 2 — {table['_meta']['dataset']}")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(output_dir, "table2_bars.png"), dpi=120)
  plt.close(fig)
  buckets = results["buckets"]
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for m in methods:
    names = list(buckets[m])
    labels = [f"{b}\n(n={buckets[m][b]['n']})" for b in names]
    axes[0].plot(labels, [buckets[m][b]["top1"] for b in names], marker="o", label=m)
    hs = sorted(results["cold"])
    if hs:
      axes[1].plot(hs, [results["cold"][h][m]["top1"] for h in hs], marker="o", label=m)
  axes[0].set_xlabel("history length (steps)")
  axes[0].set_ylabel("top-1 %")
  axes[0].set_title("training users by history length")
  if results["cold"]:
    axes[1].set_xticks(sorted(results["cold"]))
  axes[1].set_xlabel("cold users: steps shown (h)")
  axes[1].set_title("cold users")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(output_dir, "table2_history.png"), dpi=120)
  plt.close(fig)
