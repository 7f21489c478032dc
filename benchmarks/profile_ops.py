r"""Where this checkout's time goes, per XLA operation, for bench_versions' probes.

  python -m benchmarks.profile_ops --output_dir=/tmp/profile_ops
  python -m benchmarks.profile_ops --config.probes="('dennl_step_hmm',)" \
      --config.top=40 --output_dir=/tmp/profile_dennl_hmm
  python -m benchmarks.profile_ops --config.code=4881312 --output_dir=/tmp/profile_reference

Why.  A ratio (bench_em_step, bench_versions) says how fast; a missed target
needs the profile that explains it.  This prints, per probe
(:mod:`benchmarks.version_probes`: HMM/HSMM em_step, dynamax's smoother, the
HMM and HSMM DENNL training steps), the time of the untraced calls, then the
traced time inside and outside the scans over time steps, per (pass, while
loop) -- forward or reverse-mode operations, and the loop they run in -- and the
costliest operations with their shapes and JAX op_names
(:mod:`benchmarks.op_profile`).

How.  Each probe runs in a fresh process on this checkout's ``src/`` (or that
of ``config.code``, a commit exported as bench_versions does; by
default pinned to one core with XLA:CPU single-threaded, ``config.pin_one_core``:
with several threads an operation split over them is traced once per part),
times ``config.repeats`` calls, then traces ``config.calls`` more.  Traced times
carry the tracer's overhead (about a microsecond per operation run; the tables
give each region less that estimate), so compare shares and orders of
magnitude.  CPU only.
With --output_dir: results.json (every operation), results.md, config.json, logs.
"""
from __future__ import annotations

import os
import tempfile

from benchmarks import op_profile
from experiments import common
from benchmarks.bench_versions import (ROOT, case_name, case_stem, cases, cpu_model,
                                        export_source, resolve_commit, run_probe)


def _less_overhead(row: dict, overhead: float) -> float:
  return max(0.0, row["seconds_per_call"] - overhead * row["operation_runs_per_call"])


def _region_table(regions: list[dict], total: float, overhead: float) -> list[str]:
  return common.markdown_table(
      ["ms per call (traced)", "share", "less tracer overhead", "pass", "innermost loop",
       "most runs of an op", "operation runs"],
      [[f"{1e3 * r['seconds_per_call']:.2f}", f"{100 * r['seconds_per_call'] / total:.1f} %",
        f"{1e3 * _less_overhead(r, overhead):.2f}", r["pass"], f"`{r['loop']}`",
        f"{r['runs_per_call']:g}", f"{r['operation_runs_per_call']:g}"] for r in regions],
      align=["right", "right", "right", "left", "left", "right", "right"])


def _scan_table(split: list[dict], total: float, overhead: float) -> list[str]:
  return common.markdown_table(
      ["pass", "where", "ms per call (traced)", "share", "less tracer overhead"],
      [[r["pass"], r["where"], f"{1e3 * r['seconds_per_call']:.2f}",
        f"{100 * r['seconds_per_call'] / total:.1f} %", f"{1e3 * _less_overhead(r, overhead):.2f}"]
       for r in split], align=["left", "left", "right", "right", "right"])


def run(config, output_dir: str | None = None) -> dict:
  """Profiles every probe; prints and (with ``output_dir``) writes the tables."""
  todo = cases(config)
  if config.calls < 1 or config.top < 1:
    raise common.ConfigError("config.calls and config.top must be >= 1")
  log_dir = output_dir and os.path.join(output_dir, "logs")
  if log_dir:
    os.makedirs(log_dir, exist_ok=True)
  threads = ("one pinned core, XLA:CPU single-threaded" if config.pin_one_core
             else f"all {len(os.sched_getaffinity(0))} cores")
  commit = resolve_commit(config.code) if config.code else None
  label = f"commit {commit[:10]}" if commit else f"this checkout ({ROOT}/src)"
  malloc = ("glibc malloc keeping freed memory (dennl_jax.memory)" if config.keep_freed_memory
            else "glibc malloc defaults")
  blocks = [f"Per-operation profile of {label}; {threads}; {malloc}; {cpu_model()}."]
  results = []
  with tempfile.TemporaryDirectory(prefix="profile_ops_") as workdir:
    src = (export_source(commit, os.path.join(workdir, "code")) if commit
           else os.path.join(ROOT, "src"))
    for case in todo:
      stem = case_stem(case)
      result = run_probe(src, case, pin_one_core=config.pin_one_core,
                         keep_freed_memory=config.keep_freed_memory,
                         outputs_path=os.path.join(workdir, stem + ".npz"),
                         log_path=log_dir and os.path.join(log_dir, stem + ".log"),
                         profile_calls=config.calls)
      ops = result["ops"]
      total = sum(r["seconds_per_call"] for r in ops)
      regions = op_profile.by_region(ops)
      overhead = op_profile.overhead_per_run(ops, result["median_seconds"])
      title = (f"## {case_name(case)}\n\nUntraced: {1e3 * result['median_seconds']:.1f} ms per "
               f"call (median of {config.repeats}); traced operations: {1e3 * total:.1f} ms per "
               f"call over {config.calls} calls, {len(ops)} operations, "
               f"{sum(r['count_per_call'] for r in ops):g} operation runs per call (tracer "
               f"overhead about {1e6 * overhead:.2f} us per run); compile "
               f"{result['compile_seconds']:.1f} s.")
      split = op_profile.by_time_scan(ops, case["steps"])
      header, lines = op_profile.format_rows(ops, config.top)
      blocks += [title, "Inside and outside the scans over time steps:",
                 _scan_table(split, total, overhead),
                 "By pass and loop:", _region_table(regions, total, overhead),
                 f"The {min(config.top, len(ops))} costliest operations:", header + lines]
      results.append({"case": case, "name": case_name(case),
                       "median_seconds": result["median_seconds"],
                       "compile_seconds": result["compile_seconds"],
                       "traced_seconds_per_call": total, "tracer_overhead_per_run": overhead,
                       "time_scans": split, "regions": regions, "ops": ops})
      common.log(f"[{case_name(case)}] {1e3 * result['median_seconds']:.1f} ms untraced, "
                 f"{1e3 * total:.1f} ms traced; largest loop: "
                 f"{regions[0]['pass']} {regions[0]['loop']}")
  text = "\n\n".join("\n".join(b) if isinstance(b, list) else b for b in blocks)
  print(text)
  out = {"code": commit or "checkout", "pin_one_core": config.pin_one_core,
         "keep_freed_memory": config.keep_freed_memory, "cpu_model": cpu_model(),
         "cpu_count": os.cpu_count(), "probes": results}
  if output_dir:
    common.save_config(config, output_dir)
    common.write_json(os.path.join(output_dir, "results.json"), out)
    common.write_markdown(os.path.join(output_dir, "results.md"), text)
  return out


if __name__ == "__main__":
  common.app_main("profile_ops", run)
