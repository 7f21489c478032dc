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
HEADLINE = ("top1", "top3", "top5", "ndcg5", "mrr")
PAIRED = ("top1", "top3", "top5", "mrr")


def _summary(per_user, key, config):
  s = rm.summarize(per_user, key, config.bootstrap)
  out = {m: s[m]["mean"] for m in rm.METRICS}
  out["interval"] = {m: [s[m]["low"], s[m]["high"]] for m in rm.METRICS}
  out["n"] = s["n"]
  return out


def _paired(a, b, key, config):
  keys = jax.random.split(key, len(PAIRED))
  return {m: rm.paired_difference(a[m], b[m], k, config.bootstrap) for m, k in zip(PAIRED, keys)}


def _compare(avg, methods, key, config):
  """Per method: summary + paired difference vs popularity and reference - method."""
  out = {}
  for j, name in enumerate(methods):
    k = jax.random.fold_in(key, j)
    row = _summary(avg[name], jax.random.fold_in(k, 0), config)
    if "popularity" in avg and name != "popularity":
      row["vs_popularity"] = _paired(avg[name], avg["popularity"], jax.random.fold_in(k, 1), config)
    if config.reference in avg and name != config.reference:
      row["reference_minus"] = _paired(avg[config.reference], avg[name], jax.random.fold_in(k, 2),
                                       config)
    out[name] = row
  return out


def aggregate(runs, methods, key, config, meta):
  """(table, buckets, cold) dicts from the per-seed runs of experiments.table2.run_seed."""
  avg = {m: rm.average_over_seeds([r[m]["main"] for r in runs]) for m in methods}
  table = _compare(avg, methods, jax.random.fold_in(key, 0), config)
  buckets = {}
  for name in methods:
    table[name]["seed_std"] = rm.seed_spread([r[name]["main"] for r in runs])
    table[name]["lift_pct"] = rm.lift({m: {"mean": table[name][m]} for m in HEADLINE},
                                      {m: {"mean": table["popularity"][m]} for m in HEADLINE}
                                      ) if "popularity" in table else {}
    table[name]["fit_seconds"] = float(np.mean([r[name]["fit_seconds"] for r in runs]))
    table[name]["predict_seconds"] = float(np.mean([r[name]["predict_seconds"] for r in runs]))
    table[name]["fell_back"] = runs[0][name]["fell_back"]
    table[name]["selected"] = [r[name]["selected"] for r in runs]
    if "phase_accuracy" in runs[0][name]:
      table[name]["phase_accuracy"] = float(np.mean([r[name]["phase_accuracy"] for r in runs]))
  hist = np.asarray(runs[0]["_history_length"])
  for name in methods:
    buckets[name] = rm.by_bucket(avg[name], hist)
  cold = {}
  hs = sorted(runs[0][methods[0]]["cold"]) if methods else []
  for h in hs:
    cavg = {m: rm.average_over_seeds([r[m]["cold"][h] for r in runs]) for m in methods}
    cold[h] = _compare(cavg, methods, jax.random.fold_in(key, 100 + h), config)
    for name in methods:
      cold[h][name]["fell_back"] = runs[0][name]["cold_fell_back"][h]
  table["_meta"] = meta
  per_user = dict(avg)
  per_user["_history_length"] = {"active_steps": hist.astype(np.float64)}
  return {"table": table, "buckets": buckets, "cold": cold, "per_user": per_user}


def _ci(row, m):
  lo, hi = row["interval"][m]
  return f"{row[m]:.1f} [{lo:.1f}, {hi:.1f}]"


def _diff(d):
  star = "*" if d["low"] > 0 or d["high"] < 0 else ""
  return f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]{star}"


def markdown(results, config) -> str:
  table, meta = results["table"], results["table"]["_meta"]
  methods = [m for m in table if not m.startswith("_")]
  blocks = [f"# Table 2 — {meta['dataset']} ({meta['preset']})",
            f"Unit: {meta['unit']}"
            + (f" of {meta['events_per_step']}" if meta["events_per_step"] else "")
            + f"; split: {meta['split']}; users per role: "
            f"{meta['users_per_role']}; evaluated (main): {meta['num_users_evaluated']}; "
            f"seeds: {meta['seeds']}; categories: {meta['num_categories']}.  Target: "
            f"{meta['target']}.  Intervals: 95% bootstrap over users ({config.bootstrap} "
            f"resamples) of the per-user metric averaged over seeds; * = interval excludes 0."]
  if meta.get("failed_methods"):
    blocks.append("Left out (failed): " + "; ".join(f"{m}: {e}" for m, e in
                                                    meta["failed_methods"].items()))
  rows = [[m] + [_ci(table[m], k) for k in HEADLINE]
          + [f"{table[m]['hit1']:.1f}/{table[m]['hit3']:.1f}/{table[m]['hit5']:.1f}",
             _diff(table[m]["vs_popularity"]["top1"]) if "vs_popularity" in table[m] else "—",
             f"{table[m]['fit_seconds']:.1f} + {table[m]['predict_seconds']:.1f}"] for m in methods]
  blocks.append(["## Main table (dominant-category target, %)", ""] + common.markdown_table(
      ["method", "top-1", "top-3", "top-5", "NDCG@5", "MRR", "hit@1/3/5 (paper's)",
       "top-1 − popularity (pts)", "fit + predict s"], rows))
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
                  + common.markdown_table(["method", "top-1", "top-3", "top-5", "MRR"], rows))
  buckets = results["buckets"]
  names = [rm.bucket_name(lo, hi) for lo, hi in rm.BUCKETS]
  present = [b for b in names if any(b in buckets[m] for m in methods)]
  rows = [[m] + [f"{buckets[m][b]['top1']:.1f}" if b in buckets[m] else "—" for b in present]
              for m in methods]
  counts = [str(next((buckets[m][b]["n"] for m in methods if b in buckets[m]), 0)) for b in present]
  blocks.append(["## Top-1 by history length (active steps before the test step)", ""]
                + common.markdown_table(["method"] + [f"h={b}" for b in present],
                                        [["users"] + counts] + rows))
  for h, ctab in results["cold"].items():
    rows = [[m, _ci(ctab[m], "top1"), _ci(ctab[m], "top3"), f"{ctab[m]['mrr']:.1f}",
             _diff(ctab[m]["vs_popularity"]["top1"]) if "vs_popularity" in ctab[m] else "—",
             str(ctab[m]["fell_back"])] for m in methods]
    n = ctab[methods[0]]["n"]
    blocks.append([f"## Cold users shown h = {h} steps ({n} users; embedding: "
                   f"{meta['cold_embedding']})", ""] + common.markdown_table(
        ["method", "top-1", "top-3", "MRR", "top-1 − popularity", "fell back to popularity"], rows))
  return "\n\n".join(b if isinstance(b, str) else "\n".join(b) for b in blocks) + "\n"


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
