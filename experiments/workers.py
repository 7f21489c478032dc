"""Independent pieces of an experiment run in worker processes, a share of the cores each.

Why.  A Table 1 training step (16 users, T = 400, three HSMM EM layers, exact
gradient) is a chain of small sequential scans that one core runs about as
fast as two threads do (score-VJP gradient 183 ms on one pinned core, 176 ms
with two threads; BUILD_NOTES "Workers for Table 1").  Seeds and settings share nothing,
so on a 2-core machine two single-threaded processes do nearly twice the work
of one process.  Each piece is a fresh ``python`` process (its own XLA
runtime and thread flags; a crash or kill loses that piece only) that writes
its results to its own directory; the caller pools them.  Compiled programs
are shared through the persistent XLA cache when the binary enables one.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import NamedTuple, Sequence

from experiments import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Piece(NamedTuple):
  name: str               # for progress lines and errors
  argv: tuple[str, ...]   # the command, run from the repository root
  log_path: str           # the process's stdout and stderr


def available_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover - not Linux
    return os.cpu_count() or 1


def resolve_workers(workers: int) -> int:
  """``workers`` processes (0: one per available core)."""
  if not isinstance(workers, int) or workers < 0:
    raise common.ConfigError(f"workers must be a non-negative int (0: one per core), "
                             f"got {workers!r}")
  return workers or available_cores()


def threads_per_worker(num_workers: int) -> int:
  return max(1, available_cores() // num_workers)


def worker_environment(num_workers: int, environ=None) -> dict:
  """The environment of a worker: XLA:CPU threads limited to the worker's share of
  the cores (unless ``XLA_FLAGS`` already sets them), the repository importable."""
  env = dict(os.environ if environ is None else environ)
  flags = env.get("XLA_FLAGS", "")
  threads = threads_per_worker(num_workers)
  if "intra_op_parallelism_threads" not in flags and "xla_cpu_multi_thread_eigen" not in flags:
    extra = f"intra_op_parallelism_threads={threads}"
    if threads == 1:
      extra = f"--xla_cpu_multi_thread_eigen=false {extra}"
    env["XLA_FLAGS"] = f"{flags} {extra}".strip()
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
  return env


def _tail(path: str, lines: int = 15) -> str:
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return "(no log)"


def _exit_on_sigterm(signum, frame):
  # SIGTERM's default action ends the interpreter without unwinding, which
  # would leave the workers running as orphans; exiting through an exception
  # runs run_pieces' cleanup.
  raise SystemExit(128 + signum)


def run_pieces(pieces: Sequence[Piece], num_workers: int, *, poll_seconds: float = 0.5,
               environ=None) -> list[str]:
  """Runs every piece, at most ``num_workers`` at once, in the given order (put
  the longest first).  Returns the names of the pieces that failed (non-zero
  exit; the tail of each one's log is printed).  An exception in the caller
  (Ctrl-C) or a SIGTERM to it (``kill``, a scheduler's timeout) terminates the
  running pieces; pieces that finished keep their files.
  """
  env = worker_environment(num_workers, environ)
  pending, running, failed = list(pieces), {}, []
  t_start, done = time.time(), 0
  in_main_thread = threading.current_thread() is threading.main_thread()
  previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main_thread else None
  try:
    while pending or running:
      while pending and len(running) < num_workers:
        piece = pending.pop(0)
        os.makedirs(os.path.dirname(piece.log_path) or ".", exist_ok=True)
        with open(piece.log_path, "w") as log:
          process = subprocess.Popen(list(piece.argv), cwd=ROOT, env=env, stdout=log,
                                     stderr=subprocess.STDOUT)
        running[process] = (piece, time.time())
        common.log(f"[workers] started {piece.name} (log: {piece.log_path})")
      time.sleep(poll_seconds)
      for process in [p for p in running if p.poll() is not None]:
        piece, started = running.pop(process)
        done += 1
        status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
        common.log(f"[workers] {piece.name} {status} in {time.time() - started:.0f} s "
                   f"({done}/{len(pieces)}, {time.time() - t_start:.0f} s elapsed)")
        if process.returncode != 0:
          failed.append(piece.name)
          common.log(_tail(piece.log_path))
  finally:
    for process in running:
      process.terminate()
    for process in running:
      process.wait()
    if in_main_thread and previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
  return failed


def python_call(module: str, function: str, *args: str) -> tuple[str, ...]:
  """argv running ``module.function(*args)`` (string arguments) in a fresh interpreter."""
  code = (f"import sys; from {module} import {function}; "
          f"{function}(*sys.argv[1:])")
  return (sys.executable, "-c", code, *args)
