r"""This code's speed against an earlier commit, on the same machine, data and shapes.

  python -m benchmarks.bench_versions --output_dir=/tmp/bench_versions
  python -m benchmarks.bench_versions --config.baseline=64ab4e1 --config.pin_one_core=True \
      --config.probes="('hsmm_em_step',)" --config.durations="(60,)" --output_dir=/tmp/bv

Why.  A speed-up claimed against old code is only a figure when both codes
ran on the same machine, in the same session, on the same inputs.  The
performance targets (HSMM em_step >= 3x, DENNL exact training step >= 2x) are
ratios against the default baseline, a reference commit
(``configs/bench_versions.REFERENCE_COMMIT``; any other with ``--config.baseline``).

How.  The baseline's ``src/`` is exported with ``git archive`` into a
temporary directory (nothing in the checkout changes); the current code is
this checkout's ``src/`` (uncommitted changes included) or ``config.current``.
Each case (a probe of :mod:`benchmarks.version_probes` at one shape) runs in
fresh processes with the code under test first on ``PYTHONPATH`` -- the probe
reports which ``dennl_jax`` it imported, and a mismatch is an error --
``config.pairs`` times per code, alternating, the order flipped every pair so
a drift in machine speed hits both.  A process compiles, calls once, then
times ``config.repeats`` calls (median kept).  The ratio is baseline / current
(> 1: the current code is faster), per pair and of the medians over pairs.
The first call's outputs of both codes are compared (max |difference|): a
speed-up of a different computation would show there.

``config.pin_one_core`` pins each process to one core with XLA:CPU
single-threaded (steadier figures; the default run uses every core, as users
do).  With --output_dir: results.json, results.md, config.json and each
process's log.
"""
from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

from dennl_jax import memory
from experiments import common
from benchmarks.version_probes import PROBES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SINGLE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _git(*args: str) -> str:
  try:
    out = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, check=True)
  except FileNotFoundError as e:
    raise common.ConfigError("bench_versions needs git on PATH") from e
  except subprocess.CalledProcessError as e:
    raise common.ConfigError(f"git {' '.join(args)} failed in {ROOT}: "
                             f"{e.stderr.decode(errors='replace').strip()}") from e
  return out.stdout.decode()


def resolve_commit(ref: str) -> str:
  """The full hash of ``ref``; ConfigError when this is no git checkout or ``ref`` is unknown."""
  if not ref:
    raise common.ConfigError("config.baseline must name a commit")
  return _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").strip()


def export_source(commit: str, dest: str) -> str:
  """``src/`` of ``commit`` extracted under ``dest``; returns the path of that ``src``."""
  archive = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", commit, "src"],
                           capture_output=True, check=True).stdout
  with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
    tar.extractall(dest, filter="data")
  return os.path.join(dest, "src")


def cases(config) -> list[dict]:
  """One dict per (probe, shape), as :func:`benchmarks.version_probes.run_case` takes."""
  unknown = [p for p in config.probes if p not in PROBES]
  if unknown or not config.probes:
    raise common.ConfigError(f"config.probes must name some of {PROBES}, got {config.probes}")
  if config.repeats < 1:
    raise common.ConfigError("config.repeats must be >= 1")
  em = dict(steps=config.em_steps, states=config.states, symbols=config.symbols,
            repeats=config.repeats)
  dennl = dict(states=config.states, stages=config.dennl_stages,
               embed_dim=config.dennl_embed_dim, repeats=config.repeats)
  out = []
  for probe in config.probes:
    if probe in ("hmm_em_step", "dynamax_smoother"):
      out.append(dict(em, probe=probe, users=config.hmm_em_users))
    elif probe == "hsmm_em_step":
      out += [dict(em, probe=probe, users=config.em_users, max_duration=int(d))
              for d in config.durations]
    elif probe == "dennl_step_hmm":
      out.append(dict(dennl, probe=probe, users=config.dennl_hmm_users,
                      steps=config.dennl_hmm_steps, symbols=config.symbols,
                      hidden=list(config.dennl_hmm_hidden)))
    else:
      out.append(dict(dennl, probe=probe, users=config.dennl_hsmm_users,
                      steps=config.dennl_hsmm_steps, max_duration=config.dennl_max_duration,
                      obs_dim=config.dennl_obs_dim, hidden=list(config.dennl_hsmm_hidden)))
  return out


def case_stem(case: dict) -> str:
  """The start of a case's file names (logs, outputs)."""
  return f"{case['probe']}_{case.get('max_duration', '')}"


def case_name(case: dict) -> str:
  shape = ", ".join(f"{k}={case[k]}" for k in ("users", "steps", "states", "max_duration")
                    if k in case)
  return f"{case['probe']} ({shape})"


def run_probe(src: str, case: dict, *, pin_one_core: bool, outputs_path: str,
              log_path: str | None = None, profile_calls: int = 0,
              keep_freed_memory: bool = True) -> dict:
  """One fresh process timing ``case`` on the code in ``src``; its parsed result.

  ``profile_calls``: also profile that many calls per operation (the result's
  ``ops``, :func:`benchmarks.op_profile.profile`).  ``keep_freed_memory``: the
  process starts with glibc's malloc settings of :mod:`dennl_jax.memory` (as our
  binaries run) or with glibc's defaults; either way the same for every code.
  """
  env = dict(os.environ)
  for name, value in memory.malloc_environment().items():
    if keep_freed_memory:
      env[name] = value
    else:
      env.pop(name, None)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (src, ROOT, env.get("PYTHONPATH", "")) if p)
  flags = [env.get("XLA_FLAGS", "")]
  if pin_one_core:
    flags.append(_SINGLE_THREAD_FLAGS)
    core = min(os.sched_getaffinity(0))
    preexec = lambda: os.sched_setaffinity(0, {core})
  else:
    preexec = None
  env["XLA_FLAGS"] = " ".join(f for f in flags if f)
  process = subprocess.run(
      [sys.executable, "-m", "benchmarks.version_probes", json.dumps(case), outputs_path,
       str(profile_calls)],
      cwd=ROOT, env=env, capture_output=True, text=True, preexec_fn=preexec)
  text = process.stdout + process.stderr
  if log_path:
    with open(log_path, "w") as f:
      f.write(text)
  lines = [l for l in process.stdout.splitlines() if l.startswith("PROBE_RESULT ")]
  if process.returncode != 0 or not lines:
    tail = "\n".join(text.splitlines()[-15:])
    raise RuntimeError(f"probe {case_name(case)} failed on {src} "
                       f"(exit {process.returncode}):\n{tail}")
  result = json.loads(lines[-1][len("PROBE_RESULT "):])
  if not os.path.realpath(result["dennl_jax_file"]).startswith(os.path.realpath(src) + os.sep):
    raise RuntimeError(f"the probe imported {result['dennl_jax_file']}, not the code in {src} "
                       f"(is another dennl_jax first on the path?)")
  result["median_seconds"] = float(np.median(result["seconds"]))
  return result


def output_difference(path_a: str, path_b: str) -> float | None:
  """Largest |a - b| over the first call's outputs of two codes (None when their
  output structures differ, e.g. a changed optimiser state)."""
  with np.load(path_a) as a, np.load(path_b) as b:
    if len(a.files) != len(b.files):
      return None
    diffs = []
    for name in a.files:
      x, y = a[name], b[name]
      if x.shape != y.shape:
        return None
      if x.size and np.issubdtype(x.dtype, np.number):
        diffs.append(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))))
  return max(diffs, default=0.0)


def time_case(case: dict, codes: dict[str, str], config, workdir: str,
              log_dir: str | None) -> dict:
  """``config.pairs`` alternating process pairs of ``case`` on ``codes`` (label -> src)."""
  labels = list(codes)
  runs = {label: [] for label in labels}
  load_before = os.getloadavg()[0]
  stem = case_stem(case)
  outputs = lambda label, pair: os.path.join(workdir, f"{stem}_{label}_{pair}.npz")
  for pair in range(config.pairs):
    for label in (labels if pair % 2 == 0 else labels[::-1]):
      result = run_probe(codes[label], case, pin_one_core=config.pin_one_core,
                         keep_freed_memory=config.keep_freed_memory,
                         outputs_path=outputs(label, pair),
                         log_path=log_dir and os.path.join(log_dir, f"{stem}_{label}_{pair}.log"))
      runs[label].append(result["median_seconds"])
      common.log(f"[{case_name(case)}] pair {pair} {label}: "
                 f"{1e3 * result['median_seconds']:.1f} ms "
                 f"(compile {result['compile_seconds']:.1f} s)")
  base, current = (np.asarray(runs[label]) for label in labels)
  return {"case": case, "name": case_name(case), "seconds": runs,
          "baseline_median_seconds": float(np.median(base)),
          "current_median_seconds": float(np.median(current)),
          "ratio": float(np.median(base) / np.median(current)),
          "pair_ratios": (base / current).tolist(),
          "max_abs_output_difference": output_difference(outputs(labels[0], 0),
                                                         outputs(labels[1], 0)),
          "load_average_before": load_before, "load_average_after": os.getloadavg()[0]}


def format_table(rows: list[dict]) -> list[str]:
  return common.markdown_table(
      ["case", "baseline ms", "current ms", "baseline / current", "pairs (min-max)",
       "max abs output diff", "load before / after"],
      [[r["name"], f"{1e3 * r['baseline_median_seconds']:.1f}",
        f"{1e3 * r['current_median_seconds']:.1f}", f"**{r['ratio']:.2f}x**",
        f"{min(r['pair_ratios']):.2f}-{max(r['pair_ratios']):.2f}",
        "n/a" if r["max_abs_output_difference"] is None
        else f"{r['max_abs_output_difference']:.1e}",
        f"{r['load_average_before']:.1f} / {r['load_average_after']:.1f}"] for r in rows],
      align=["left"] + ["right"] * 6)


def cpu_model() -> str:
  """The CPU's model name (Linux), else the platform's machine type."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.machine()


def run(config, output_dir: str | None = None) -> dict:
  """Every case on both codes; prints the table, writes it with ``output_dir``."""
  todo = cases(config)
  if config.pairs < 1:
    raise common.ConfigError("config.pairs must be >= 1")
  baseline = resolve_commit(config.baseline)
  head = resolve_commit("HEAD")
  dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", "src").strip())
  current = resolve_commit(config.current) if config.current else None
  current_label = (current[:10] if current else
                   f"{head[:10]} checkout{' with uncommitted src/ changes' if dirty else ''}")
  log_dir = output_dir and os.path.join(output_dir, "logs")
  if log_dir:
    os.makedirs(log_dir, exist_ok=True)
  rows = []
  with tempfile.TemporaryDirectory(prefix="bench_versions_") as workdir:
    codes = {"baseline": export_source(baseline, os.path.join(workdir, "baseline")),
             "current": (export_source(current, os.path.join(workdir, "current")) if current
                         else os.path.join(ROOT, "src"))}
    for case in todo:
      rows.append(time_case(case, codes, config, workdir, log_dir))
      common.log(f"[{rows[-1]['name']}] baseline / current {rows[-1]['ratio']:.2f}x "
                 f"(pairs {', '.join(f'{r:.2f}' for r in rows[-1]['pair_ratios'])})")
  threads = ("one pinned core, XLA:CPU single-threaded" if config.pin_one_core
             else f"all {len(os.sched_getaffinity(0))} cores")
  malloc = ("glibc malloc keeping freed memory (dennl_jax.memory)" if config.keep_freed_memory
            else "glibc malloc defaults")
  header = (f"Baseline {baseline[:10]} vs current {current_label}: median over "
            f"{config.pairs} alternating process pairs of each process's median "
            f"of {config.repeats} calls; {threads}; {malloc}; {cpu_model()}, "
            f"{os.cpu_count()} CPUs. Ratio > 1: the current code is faster.")
  table = format_table(rows)
  print(header + "\n\n" + "\n".join(table))
  result = {"baseline": baseline, "current": current_label, "pin_one_core": config.pin_one_core,
            "keep_freed_memory": config.keep_freed_memory,
            "cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "rows": rows}
  if output_dir:
    common.save_config(config, output_dir)
    common.write_json(os.path.join(output_dir, "results.json"), result)
    common.write_markdown(os.path.join(output_dir, "results.md"), header, table)
  return result


if __name__ == "__main__":
  common.app_main("bench_versions", run)
