"""Table 1 over seeds: means, spreads, intervals, paired differences, markdown.

Inputs are per-user labelling accuracies, ``per_user[seed][row][setting] ->
(U,)`` (every user has the same number of valid steps in Table 1, so the
mean over users is the pooled accuracy).  Two kinds of interval, both 95 %:

* ``ci95`` of a row's accuracy: Student t over seeds of the per-seed means
  (each seed draws its own world, users and training keys, so this covers
  all of that randomness; with 2 seeds t = 12.7 and the interval is wide).
* paired differences DENNL - method: the per-user difference within each
  seed (same held-out users), pooled over seeds x users, percentile
  bootstrap over those pairs (:func:`dennl_jax.recsys.metrics.paired_difference`);
  this conditions on the seeds' worlds.  ``t_low``/``t_high`` beside it is
  the t interval over the per-seed mean differences.
"""
from __future__ import annotations

import jax
import numpy as np
from scipy import stats

from dennl_jax.recsys.metrics import paired_difference

REFERENCE = "dennl"
# The suffix of oracle-selection rows, ``method@oracle``: chosen by validation accuracy,
# which needs the true states (reported beside the label-free headline, never as it).
ORACLE_SELECTION = "oracle"
UNTRAINED = "untrained"        # ``method@untrained``: the network before training
SELECTION_TEXT = {"heldout_nll": "selected without labels (validation held-out NLL)",
                  "accuracy": "ORACLE selection (validation labelling accuracy)",
                  "unknown": "selected by a criterion the run did not record"}


def t_interval(values, level: float = 0.95):
  """(low, high) Student-t interval of the mean of ``values`` (n,); NaNs for n < 2."""
  values = np.asarray(values, np.float64)
  if values.size < 2:
    return float("nan"), float("nan")
  half = stats.t.ppf(0.5 + level / 2, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size)
  return float(values.mean() - half), float(values.mean() + half)


def row_stats(per_seed_means) -> dict:
  """{mean, std, n_seeds, ci95: [low, high]} of per-seed accuracies (fractions)."""
  v = np.asarray(per_seed_means, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
          "n_seeds": int(v.size), "ci95": list(t_interval(v))}


def summarize(per_user: list, key, num_bootstrap: int = 2000) -> dict:
  """``{"rows": {row: {setting: row_stats}}, "paired": {method: {setting: diff}}}``.

  per_user: one ``{row: {setting: (U,)}}`` per seed.  Paired differences
  are DENNL - method in percentage points (see the module docstring).
  """
  rows = {}
  for row in per_user[0]:
    for setting in per_user[0][row]:
      means = [np.mean(seed[row][setting]) for seed in per_user]
      rows.setdefault(row, {})[setting] = row_stats(means)
  paired = {}
  if REFERENCE in per_user[0]:
    for row in per_user[0]:
      if row == REFERENCE:
        continue
      for i, setting in enumerate(per_user[0][REFERENCE]):
        if setting not in per_user[0][row]:
          continue
        a = np.concatenate([seed[REFERENCE][setting] for seed in per_user])
        b = np.concatenate([seed[row][setting] for seed in per_user])
        diff = paired_difference(a, b, jax.random.fold_in(key, i), num_bootstrap)
        low, high = t_interval([100 * (np.mean(s[REFERENCE][setting]) - np.mean(s[row][setting]))
                                for s in per_user])
        diff.update(t_low=low, t_high=high, n_pairs=int(a.size), n_seeds=len(per_user))
        paired.setdefault(row, {})[setting] = diff
  return {"rows": rows, "paired": paired}


def means_table(summary: dict) -> dict:
  """{row: {setting: mean accuracy}} (what table1.json holds): the selected
  rows only; the per-loss rows ``method@loss`` stay in table1_stats.json."""
  return {row: {s: v["mean"] for s, v in cells.items()}
          for row, cells in summary["rows"].items() if "@" not in row}


def _pm(cell) -> str:
  return "—" if cell is None else f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}"


def _diff(d) -> str:
  if d is None:
    return "—"
  return f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"


def markdown(summary: dict, settings, labels: dict, paper: dict) -> list:
  """Lines: accuracy mean ± std (paper beside), then paired differences."""
  from experiments import common
  rows = summary["rows"]
  acc = common.markdown_table(
      ["Method", *[f"{s} ours / paper" for s in settings]],
      [[labels.get(r, r), *[f"{_pm(rows[r].get(s))} / "
                            f"{paper.get(r, {}).get(s, '—')}" for s in settings]]
       for r in rows])
  diff = common.markdown_table(
      ["DENNL − method (points)", *settings],
      [[labels.get(m, m), *[_diff(cells.get(s)) for s in settings]]
       for m, cells in summary["paired"].items()])
  n = next(iter(next(iter(rows.values())).values()))["n_seeds"]
  return ["Labelling accuracy (%), mean ± std over "
          f"{n} seed(s) (world, users and training keys from each seed):", "", *acc, "",
          "Paired difference DENNL − method, mean [95 % bootstrap over seeds × held-out users]:",
          "", *diff]


def headline(summary: dict, settings=("T50", "noise20"),
             methods=("conventional_em", "initial_fusion"), select_by: str = "heldout_nll") -> list:
  """The README's headline: DENNL vs Conventional EM and Initial Fusion, and how
  the trained models were selected."""
  lines = [f"models {SELECTION_TEXT.get(select_by, select_by)}"]
  for s in settings:
    d = summary["rows"].get(REFERENCE, {}).get(s)
    if d is None:
      continue
    parts = [f"{s}: DENNL {100 * d['mean']:.1f}%"]
    for m in methods:
      p = summary["paired"].get(m, {}).get(s)
      if p is not None:
        parts.append(f"vs {m} {p['mean']:+.1f} pts [{p['low']:+.1f}, {p['high']:+.1f}] "
                     f"(t over seeds [{p['t_low']:+.1f}, {p['t_high']:+.1f}])")
    oracle = summary["rows"].get(f"{REFERENCE}@{ORACLE_SELECTION}", {}).get(s)
    if oracle is not None:
      parts.append(f"(oracle-selected DENNL {100 * oracle['mean']:.1f}%)")
    lines.append("  ".join(parts))
  return lines


def plot_curves(path, curves, settings, label_of):
  """Training curves of every candidate, one panel per setting.

  curves: {setting: {name: {"step", "loss"}}} with names ``method[loss,lr=..]``;
  label_of(name) -> the method's label.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, len(settings), figsize=(4 * len(settings), 6.4), squeeze=False)
  for ax, s in zip(axes[1], settings):
    # Validation criterion at each evaluation: where each candidate plateaus.
    for name, curve in curves.get(s, {}).items():
      if curve.get("validation") and not name.startswith("em_mapping"):
        points = np.asarray([v[:2] for v in curve["validation"]], np.float64)
        ax.plot(points[:, 0], points[:, 1], marker=".", markersize=3,
                label=label_of(name) + f" [{name.partition('[')[2]}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation criterion (lower is better)")
  for ax, s in zip(axes[0], settings):
    for name, curve in curves.get(s, {}).items():
      if name.startswith("em_mapping"):
        continue  # a squared-error loss: a different scale
      loss = np.asarray(curve["loss"])
      window = max(1, len(loss) // 20)
      smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
      grid = name.partition("[")[2]
      ax.plot(np.asarray(curve["step"])[window - 1:], smooth,
              label=label_of(name) + (f" [{grid}" if grid else ""))
    ax.set_title(s)
    ax.set_xlabel("step")
    ax.set_ylabel("loss per time step")
  axes[0][0].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)



def convergence_rows(curves: dict, settings) -> list:
  """One row per (setting, seed, candidate) of the label-free criterion's curve.

  curves: ``{seed: {setting: {name: curve}}}`` (``curves.json``; a curve with a
  ``validation`` list of ``[step, criterion, ...]``).  Returns ``[setting,
  seed, name, criterion at the start, best, best step, steps run, how it
  ended, updates skipped]``: "patience" when the run stopped early, "budget"
  when it used every step; skipped: updates left out for a non-finite loss or
  gradient (None where the run did not record it).
  """
  rows = []
  for setting in settings:
    for seed in sorted(curves, key=int):
      for name, curve in curves[seed].get(setting, {}).items():
        points = curve.get("validation")
        if not points:
          continue
        values = np.asarray([v[1] for v in points], np.float64)
        rows.append([setting, int(seed), name, float(values[0]), float(values.min()),
                     curve.get("best_step"), curve.get("steps_run"),
                     "patience" if curve.get("stopped_early") else "budget",
                     curve.get("skipped")])
  return rows


def plot_validation_curves(path, curves: dict, settings, label_of):
  """The label-free criterion of every trained candidate and seed, one panel per
  setting (colour: candidate, line style: seed), a dot at each run's selected
  (best) step: where each run flattens.  The y axis ends 15 % above the
  highest starting value; a curve leaving the top has diverged."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.lines import Line2D
  fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.6), squeeze=False)
  names = sorted({n for seed in curves.values() for cells in seed.values() for n in cells
                  if not n.startswith("em_mapping")})
  seeds = sorted(curves, key=int)
  colours = {n: f"C{i}" for i, n in enumerate(names)}
  styles = {seed: ["-", "--", ":", "-."][i % 4] for i, seed in enumerate(seeds)}
  for ax, setting in zip(axes[0], settings):
    starts, lows = [], []
    for seed in seeds:
      for name, curve in curves[seed].get(setting, {}).items():
        if name not in colours or not curve.get("validation"):
          continue
        points = np.asarray([v[:2] for v in curve["validation"]], np.float64)
        ax.plot(points[:, 0], points[:, 1], styles[seed], color=colours[name], linewidth=1)
        best = int(np.nanargmin(points[:, 1]))
        ax.plot(points[best, 0], points[best, 1], "o", color=colours[name], markersize=4)
        starts.append(points[0, 1])
        lows.append(points[best, 1])
    if starts:
      low, high = min(lows), max(starts)
      ax.set_ylim(low - 0.05 * (high - low), high + 0.15 * (high - low))
    ax.set_title(setting)
    ax.set_xlabel("step")
  axes[0][0].set_ylabel("validation held-out NLL per step")
  handles = ([Line2D([], [], color=colours[n], label=f"{label_of(n)} [{n.partition('[')[2]}")
              for n in names]
             + [Line2D([], [], color="k", linestyle=styles[s], label=f"seed {s}") for s in seeds])
  axes[0][-1].legend(handles=handles, fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


PAPER = {  # Paper Table 1, labelling accuracy in %.
    "conventional_em": {"T50": 82.0, "T100": 85.5, "T400": 94.1, "noise20": 83.1, "noise10": 91.5},
    "em_mapping": {"T50": 71.4, "T100": 72.2, "T400": 73.0, "noise20": 67.9, "noise10": 71.4},
    "mlp_mapper": {"T50": 51.5, "T100": 50.3, "T400": 52.1, "noise20": 46.2, "noise10": 48.5},
    "initial_fusion": {"T50": 82.4, "T100": 83.7, "T400": 92.6, "noise20": 82.8, "noise10": 89.7},
    "dennl": {"T50": 88.3, "T100": 90.0, "T400": 93.5, "noise20": 88.1, "noise10": 92.3},
}


def reported(summary: dict, num_losses: int) -> dict:
  """The summary's rows a report shows: with one loss its ``method@loss`` rows
  repeat the selected ones and are left out (oracle-selection and untrained
  rows stay)."""
  keep = [r for r in summary["rows"] if "@" not in r or num_losses > 1
          or r.endswith(("@" + ORACLE_SELECTION, "@" + UNTRAINED))]
  return {"rows": {r: summary["rows"][r] for r in keep},
          "paired": {r: d for r, d in summary["paired"].items() if r in keep}}


def table_markdown(summary, times, config, settings, label):
  """Lines of table1.md: accuracies (mean ± std over seeds) beside the paper's,
  paired differences, then fitting times.  ``label(row) -> str`` names rows
  (``method`` or ``method@loss``)."""
  from experiments import common
  shown = reported(summary, len(config.losses))
  labels = {r: label(r) for r in shown["rows"]}
  timing = common.markdown_table(
      ["Method", *settings],
      [[label(m), *[f"{np.mean(times.get(m, {}).get(s, [np.nan])):.0f}"
                            for s in settings]] for m in config.methods])
  grid = (f"{len(config.losses)} loss(es) {tuple(config.losses)} x "
          f"{len(config.select_learning_rates)} learning rate(s) "
          f"{tuple(config.select_learning_rates)}, {config.train_steps} steps each "
          f"(EM Mapping: regression loss, {config.regression_steps} steps)")
  estimator = ("" if config.gradient == "exact"
               else f" (S = {config.spsa_samples}, {config.spsa_perturbation})")
  intro = (f"Gradient mode of the EM layers: `{config.gradient}`{estimator}"
           f"; {config.num_users} training, {config.num_val_users} validation and "
           f"{config.num_test_users} held-out users; noise settings at T = "
           f"{config.noise_length}; preset `{config.preset}`; seeds {tuple(config.seeds)}. "
           f"Models {SELECTION_TEXT.get(config.select_by, config.select_by)}, the same grid "
           f"for every trained method: {grid}, early stopping after "
           f"{config.patience_fraction:.0%} of a run's budget without an improvement over "
           f"{config.min_delta:g}, evaluated every "
           f"{config.eval_every}. Rows `[loss]`: the best learning rate within "
           f"that loss; rows `[oracle selection]`: candidate and step chosen by the validation "
           f"users' labelling accuracy (their true states), for comparison only. "
           f"Conventional EM: best of {config.em_kmeans_restarts} k-means++ + "
           f"{config.em_random_restarts} random restarts per user by likelihood, "
           f"{config.em_iters} iterations each.")
  lines = markdown(shown, settings, labels, PAPER)
  return ["# Table 1 (synthetic HSMMs): labelling accuracy, ours vs. paper", "", intro, "",
          *lines, "", "Time to fit each method and produce the held-out users' parameters "
          "(seconds, wall clock, including compilation and the selection grid; mean over "
          "seeds):", "", *timing, "", "Headline:", "",
          *[f"- {line}" for line in headline(summary, select_by=config.select_by)]]
