r"""Gradient modes of the EM layer side by side: accuracy and time to accuracy.

Reads finished ``experiments.synthetic_table1`` output directories -- one per
gradient mode, same setting, seeds and grid -- and compares the DENNL
candidates: held-out accuracy (``per_user.json``), the validation-accuracy
curve against CPU seconds of the training process (``curves.json``; CPU,
not wall clock, so a shared machine's load does not distort the comparison),
and the CPU seconds each mode needs to first reach given validation accuracies.

  python -m experiments.table1_gradients --output_dir=/tmp/t1_gradients \
      --runs=exact=/work/results/t1_spsa/exact,spsa8=/work/results/t1_spsa/spsa8

Writes ``gradients.json``, ``gradients.md`` and ``gradients.png``.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from experiments import common
from experiments import table1_report as report

METHOD = "dennl"


def candidate_curves(curves: dict, setting: str, method: str = METHOD) -> dict:
  """{seed: [(updates, validation accuracy %, CPU s), ...]} of ``method``'s selected candidate.

  ``curves``: a run's curves.json (``{seed: {setting: {name: {...}}}}``,
  validation entries ``[step, score, cpu]`` with score = -accuracy).  With
  several candidates of ``method`` in the grid, the one with the best
  validation score is taken (the one model selection kept).
  """
  out = {}
  for seed, per_setting in curves.items():
    names = [n for n in per_setting.get(setting, {}) if n.split("[")[0] == method]
    best = None
    for name in names:
      val = per_setting[setting][name].get("validation") or []
      if val and val[0][2:] and (best is None or min(v[1] for v in val) < best[0]):
        best = (min(v[1] for v in val), [(v[0], -100.0 * v[1], v[2]) for v in val])
    if best is not None:
      out[seed] = best[1]
  return out


def first_reaching(curve, threshold: float):
  """CPU seconds at the first evaluation with validation accuracy >= threshold (None if never)."""
  for _, acc, cpu in curve:
    if cpu is not None and acc >= threshold:
      return cpu
  return None


def compare(runs: dict, setting: str, thresholds, num_bootstrap: int = 2000) -> dict:
  """Per mode: held-out accuracy (mean over seeds), best validation accuracy,
  CPU seconds to each threshold (median over seeds; None where a seed never got there),
  and the paired differences DENNL - each other row of the runs (table1_report).

  ``runs``: {label: directory}, or several directories joined by ``+`` (e.g.
  seed 0 and seeds 1-2 run separately): their seeds are pooled.
  """
  result = {}
  for label, directories in runs.items():
    curves, per_user = {}, []
    for i, directory in enumerate(directories.split("+")):
      part = candidate_curves(common.read_json(os.path.join(directory, "curves.json")), setting)
      curves.update({f"{i}:{seed}": c for seed, c in part.items()})
      per_user += common.read_json(os.path.join(directory, "per_user.json"))
    per_user = [{row: {setting: np.asarray(v[setting])} for row, v in seed.items()
                 if setting in v} for seed in per_user]
    paired = report.summarize(per_user, jax.random.PRNGKey(0), num_bootstrap)["paired"]
    heldout = [100.0 * float(np.mean(seed[METHOD][setting])) for seed in per_user]
    reach = {}
    for thr in thresholds:
      times = [first_reaching(c, thr) for c in curves.values()]
      reach[f"{thr:g}"] = (None if any(t is None for t in times) or not times
                           else float(np.median(times)))
    result[label] = {"heldout_accuracy": float(np.mean(heldout)), "n_seeds": len(heldout),
                     "best_validation": float(np.mean([max(a for _, a, _ in c)
                                                       for c in curves.values()])),
                     # None where a resumed run lost the CPU count of earlier evaluations
                     "cpu_seconds_last": (None if any(c[-1][2] is None for c in curves.values())
                                          else float(np.mean([c[-1][2]
                                                              for c in curves.values()]))),
                     "cpu_seconds_to": reach, "curves": curves,
                     "paired": {row: d[setting] for row, d in paired.items()}}
  return result


def _versus(r: dict, row: str) -> str:
  d = r["paired"].get(row)
  return "—" if d is None else f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"


def markdown(result: dict, setting: str, thresholds) -> list:
  header = (["mode", "seeds", "held-out acc. %", "DENNL − Conventional EM", "best validation %",
             "CPU s at last evaluation"] + [f"CPU s to val. ≥ {t:g} %" for t in thresholds])
  rows = [[label, str(r["n_seeds"]), f"{r['heldout_accuracy']:.1f}",
           _versus(r, "conventional_em"), f"{r['best_validation']:.1f}",
           "—" if r["cpu_seconds_last"] is None else f"{r['cpu_seconds_last']:.0f}"]
          + ["—" if r["cpu_seconds_to"][f"{t:g}"] is None else f"{r['cpu_seconds_to'][f'{t:g}']:.0f}"
             for t in thresholds] for label, r in result.items()]
  return [f"# DENNL gradient modes on {setting}", "",
          "CPU seconds of the training process (all threads, compilation included) when each "
          "validation evaluation started; medians over seeds; — = not reached. DENNL − "
          "Conventional EM: held-out accuracy points, 95 % bootstrap over seeds x users.", "",
          *common.markdown_table(header, rows)]


def plot(path: str, result: dict, setting: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for i, (label, r) in enumerate(result.items()):
    for j, curve in enumerate(r["curves"].values()):
      pts = [(cpu, acc) for _, acc, cpu in curve if cpu is not None]
      ax.plot(*zip(*pts), marker="o", ms=3, color=f"C{i}", label=label if j == 0 else None)
  ax.set(xlabel="CPU seconds of training", ylabel="validation accuracy %",
         title=f"DENNL on {setting}: time to accuracy")
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)


def main():
  from absl import app, flags
  runs = flags.DEFINE_list("runs", None, "label=output_dir of synthetic_table1, one per mode")
  setting = flags.DEFINE_string("setting", "T50", "Table 1 setting to compare")
  thresholds = flags.DEFINE_list("thresholds", ["88", "89", "90"],
                                 "validation accuracies (%) to time")
  output_dir = flags.DEFINE_string("output_dir", None, "where the report goes")
  flags.mark_flags_as_required(["runs", "output_dir"])

  def _main(argv):
    del argv
    pairs = dict(r.split("=", 1) for r in runs.value)
    thr = [float(t) for t in thresholds.value]
    result = compare(pairs, setting.value, thr)
    os.makedirs(output_dir.value, exist_ok=True)
    common.write_json(os.path.join(output_dir.value, "gradients.json"), result)
    common.write_markdown(os.path.join(output_dir.value, "gradients.md"),
                          markdown(result, setting.value, thr))
    plot(os.path.join(output_dir.value, "gradients.png"), result, setting.value)
    print("\n".join(markdown(result, setting.value, thr)))

  app.run(_main)


if __name__ == "__main__":
  main()
