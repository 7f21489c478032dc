r"""One Table 1 from several ``experiments.synthetic_table1`` runs of the same protocol.

Full-scale Table 1 costs hours on 2 CPU cores, so it is run in pieces: seeds
in separate processes, a method added to a seed later, a setting at a time.
This pools the pieces by (seed, setting, method) and writes the same report
files a single run writes (``table1.json``, ``table1_stats.json``,
``table1.md``), each setting summarised over the seeds that have it, plus
every trained candidate's validation curve (``curves.json``,
``validation_curves.png``) and a convergence table in ``table1.md`` (start,
best, best step, steps run, ended by patience or budget, skipped updates).

  python -m experiments.table1_pool --output_dir=/tmp/t1_noise20 \
      --runs=/work/results/t1_s12/noise20_exact_s12,/work/results/t1_noise20_s11/exact_fixed

Refuses, naming the problem: runs whose protocols differ (any config field
besides seeds, methods and settings: the gradient mode, the grid, the user
counts, ...; ``--equivalent_fields`` names fields whose different values mean
the same protocol, and the report lists them), and a (seed, setting, method)
present in two runs with different per-user accuracies (the same seed must
give the same result;
rows computed in both, such as the oracle, are checked, not trusted).
Within a setting, a method missing from some of its seeds is left out of
that setting's summary and named in the output.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from experiments import common
from experiments import table1_report as report
from experiments.synthetic_table1 import SETTINGS, row_label

# Fields that may differ between pooled runs: which pieces each run computed,
# and the preset's name (the ablations variant is the full protocol).
PIECE_FIELDS = ("seed", "num_seeds", "seeds", "methods", "settings", "log_every", "workers")
NAME_FIELDS = ("preset",)


class PoolError(ValueError):
  """Runs that cannot be pooled into one table."""


def _protocol(config: dict) -> dict:
  return {k: v for k, v in config.items() if k not in PIECE_FIELDS}


def read_curves(directories) -> dict:
  """Training curves pooled over run directories: ``{seed: {setting: {candidate:
  curve}}}`` from each run's ``curves.json`` (runs without one add nothing).
  The same candidate of a seed and setting in two runs must have the same
  validation curve."""
  pooled = {}
  for directory in directories:
    path = os.path.join(directory, "curves.json")
    if not os.path.exists(path):
      continue
    for seed, cells in common.read_json(path).items():
      for setting, candidates in cells.items():
        slot = pooled.setdefault(seed, {}).setdefault(setting, {})
        for name, curve in candidates.items():
          old = slot.get(name)
          if old is not None and not _same_curve(old, curve):
            raise PoolError(f"seed {seed}, {setting}, {name}: two runs have different "
                            f"validation curves (second in {directory})")
          slot[name] = curve
  return pooled


def _same_curve(a: dict, b: dict) -> bool:
  va, vb = a.get("validation") or [], b.get("validation") or []
  return len(va) == len(vb) and all(x[0] == y[0] and np.isclose(x[1], y[1], rtol=1e-6)
                                    for x, y in zip(va, vb))


def read_runs(directories, equivalent=()) -> tuple[dict, dict, dict]:
  """(per_user, times, config) pooled over run directories.

  per_user: ``{seed: {setting: {row: (U,) accuracies}}}``; times:
  ``{method: {setting: [wall s per seed]}}``; config: the shared protocol,
  with ``config["differing"] = {field: [value per run]}`` for the fields of
  ``equivalent`` that differ (config fields the caller declares equivalent,
  e.g. an absolute ``patience`` and the ``patience_fraction`` that gives the
  same number of steps; the report lists them).
  """
  per_user, times, protocol, first = {}, {}, None, None
  differing = {}
  for directory in directories:
    config = common.read_json(os.path.join(directory, "config.json"))
    for k in equivalent:
      differing.setdefault(k, []).append(config.get(k))
    if protocol is None:
      protocol, first = _protocol(config), directory
    else:
      diff = sorted(k for k in set(protocol) | set(_protocol(config))
                    if k not in NAME_FIELDS and k not in equivalent
                    and protocol.get(k) != config.get(k))
      if diff:
        raise PoolError(f"{directory} ran a different protocol from {first}: config field(s) "
                        f"{diff} differ ({[(protocol.get(k), config.get(k)) for k in diff]})")
    seeds = config.get("seeds") or list(range(config["seed"], config["seed"] + config["num_seeds"]))
    # A run stopped early holds fewer seeds than it planned; zip keeps the finished ones.
    for seed, rows in zip(seeds, common.read_json(os.path.join(directory, "per_user.json"))):
      for row, cells in rows.items():
        for setting, acc in cells.items():
          acc = np.asarray(acc, np.float64)
          slot = per_user.setdefault(seed, {}).setdefault(setting, {})
          if row in slot and (slot[row].shape != acc.shape or not np.allclose(slot[row], acc)):
            raise PoolError(f"seed {seed}, {setting}, {row}: two runs disagree (mean accuracy "
                            f"{slot[row].mean():.4f} vs {acc.mean():.4f} in {directory}); the "
                            "same seed must give the same result")
          slot[row] = acc
    timing = os.path.join(directory, "timings.json")
    if os.path.exists(timing):
      for method, cells in common.read_json(timing)["seconds"].items():
        for setting, secs in cells.items():
          times.setdefault(method, {}).setdefault(setting, []).extend(secs)
  if protocol is None:
    raise PoolError("no runs given")
  protocol = dict(protocol, differing={k: v for k, v in differing.items() if len(set(map(
      json.dumps, v))) > 1})
  return per_user, times, protocol


def pool(per_user: dict, key, num_bootstrap: int = 2000) -> tuple[dict, dict]:
  """(summary, left_out): ``table1_report.summarize`` per setting over the seeds
  that have it, merged into one ``{"rows", "paired"}``; left_out:
  ``{setting: [rows missing from some of its seeds]}``."""
  settings = sorted({s for cells in per_user.values() for s in cells}, key=SETTINGS.index)
  summary, left_out = {"rows": {}, "paired": {}}, {}
  for setting in settings:
    seeds = sorted(s for s in per_user if setting in per_user[s])
    rows = set.intersection(*(set(per_user[s][setting]) for s in seeds))
    missing = sorted(set.union(*(set(per_user[s][setting]) for s in seeds)) - rows)
    if missing:
      left_out[setting] = missing
    order = [r for r in per_user[seeds[0]][setting] if r in rows]
    part = report.summarize([{r: {setting: per_user[s][setting][r]} for r in order}
                             for s in seeds],
                            jax.random.fold_in(key, SETTINGS.index(setting)), num_bootstrap)
    for kind in ("rows", "paired"):
      for row, cells in part[kind].items():
        summary[kind].setdefault(row, {}).update(cells)
  return summary, left_out


def markdown(summary: dict, times: dict, left_out: dict, directories, protocol: dict,
             curves: dict | None = None) -> list:
  settings = sorted({s for cells in summary["rows"].values() for s in cells}, key=SETTINGS.index)
  seeds = {s: next(iter(summary["rows"].values()))[s]["n_seeds"] for s in settings
           if s in next(iter(summary["rows"].values()))}
  shown = report.reported(summary, len(protocol.get("losses") or ()))
  labels = {r: row_label(r) for r in shown["rows"]}
  methods = [m for m in times if m in summary["rows"]]
  timing = common.markdown_table(
      ["Method", *settings],
      [[row_label(m), *[f"{np.mean(times[m][s]):.0f}" if s in times[m] else "—"
                        for s in settings]] for m in methods])
  gradient = protocol.get("gradient")
  if gradient != "exact":
    gradient = f"{gradient} (S = {protocol.get('spsa_samples')}, {protocol.get('spsa_perturbation')})"
  lines = ["# Table 1 pooled from several runs", "",
           f"Runs: {', '.join(f'`{d}`' for d in directories)}.", "",
           f"Gradient mode `{gradient}`, preset `{protocol.get('preset')}`, select by "
           f"`{protocol.get('select_by')}`, losses {protocol.get('losses')} x learning rates "
           f"{protocol.get('select_learning_rates')}; seeds per setting: "
           + ", ".join(f"{s}: {n}" for s, n in seeds.items()) + ".", ""]
  if protocol.get("differing"):
    lines += ["Config fields declared equivalent that differ between the runs (value per run, "
              "in the order above): " + "; ".join(
                  f"`{k}` {v}" for k, v in protocol["differing"].items()) + ".", ""]
  lines += report.markdown(shown, settings, labels, report.PAPER)
  if left_out:
    lines += ["", "Left out (missing from some seeds of the setting): "
              + "; ".join(f"{s}: {', '.join(r)}" for s, r in left_out.items())]
  convergence = report.convergence_rows(curves or {}, settings)
  if convergence:
    lines += ["", "Convergence of every trained candidate (validation held-out NLL per step; "
              "the selected step is the best one; a run ends by patience or at its budget):", "",
              *common.markdown_table(
                  ["setting", "seed", "candidate", "start", "best", "best step", "steps run",
                   "ended by", "skipped"],
                  [[s, seed, f"`{name}`", f"{start:.3f}", f"{best:.3f}", step, run, end,
                    "—" if skipped is None else skipped]
                   for s, seed, name, start, best, step, run, end, skipped in convergence])]
  lines += ["", "Wall seconds to fit (mean over the pooled seeds):", "", *timing, "",
            "Headline:", "", *[f"- {line}" for line in report.headline(
                summary, settings, select_by=protocol.get("select_by", "unknown"))]]
  return lines


def main():
  from absl import app, flags
  runs = flags.DEFINE_list("runs", None, "output directories of synthetic_table1 to pool")
  output_dir = flags.DEFINE_string("output_dir", None, "where the pooled report goes")
  bootstrap = flags.DEFINE_integer("bootstrap", 2000, "resamples of the paired intervals")
  equivalent = flags.DEFINE_list(
      "equivalent_fields", [], "config fields allowed to differ between the runs because "
      "their values mean the same protocol (listed in table1.md), e.g. patience,patience_fraction")
  flags.mark_flags_as_required(["runs", "output_dir"])

  def _main(argv):
    del argv
    per_user, times, protocol = read_runs(runs.value, tuple(equivalent.value))
    summary, left_out = pool(per_user, jax.random.PRNGKey(protocol.get("bootstrap_seed", 0)),
                             bootstrap.value)
    curves = read_curves(runs.value)
    os.makedirs(output_dir.value, exist_ok=True)
    common.write_json(os.path.join(output_dir.value, "table1.json"), report.means_table(summary))
    common.write_json(os.path.join(output_dir.value, "table1_stats.json"),
                      dict(summary, left_out=left_out, runs=list(runs.value)))
    text = common.write_markdown(os.path.join(output_dir.value, "table1.md"),
                                 markdown(summary, times, left_out, runs.value, protocol,
                                          curves))
    if curves:
      common.write_json(os.path.join(output_dir.value, "curves.json"), curves, indent=None)
      settings = sorted({s for cells in curves.values() for s in cells}, key=SETTINGS.index)
      report.plot_validation_curves(os.path.join(output_dir.value, "validation_curves.png"),
                                    curves, settings,
                                    lambda name: row_label(name.partition("[")[0]))
    print(text)

  app.run(_main)


if __name__ == "__main__":
  main()
