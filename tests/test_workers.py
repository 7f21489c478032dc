"""experiments.workers: independent pieces of an experiment in worker processes."""
import os
import sys

import pytest

from experiments import common
from experiments import workers

pytestmark = pytest.mark.usefixtures("float32_default")

# A piece that records its start/end times and the XLA flags it was given.
_RECORD = ("import os, sys, time; t0 = time.time(); time.sleep(float(sys.argv[2])); "
           "open(sys.argv[1], 'w').write(f'{t0} {time.time()} ' + os.environ['XLA_FLAGS']); "
           "print('piece output'); sys.exit(int(sys.argv[3]))")


def _piece(tmp_path, name, seconds=0.3, code=0):
  return workers.Piece(name, (sys.executable, "-c", _RECORD, str(tmp_path / f"{name}.rec"),
                              str(seconds), str(code)), str(tmp_path / "logs" / f"{name}.txt"))


def test_run_pieces_bounds_concurrency_and_reports_failures(tmp_path, capsys):
  pieces = [_piece(tmp_path, "a"), _piece(tmp_path, "b"), _piece(tmp_path, "bad", 0.1, 3),
            _piece(tmp_path, "c")]
  failed = workers.run_pieces(pieces, 2, poll_seconds=0.05, environ={"XLA_FLAGS": ""})
  assert failed == ["bad"]
  assert "bad FAILED (exit 3)" in capsys.readouterr().out
  spans = {}
  for piece in pieces:
    start, end, *flags = (tmp_path / f"{piece.name}.rec").read_text().split()
    spans[piece.name] = (float(start), float(end))
    assert f"intra_op_parallelism_threads={workers.threads_per_worker(2)}" in flags
    assert open(piece.log_path).read().strip() == "piece output"
  # Never more than two at once: every start sees at most one other piece running.
  for name, (start, _) in spans.items():
    others = [n for n, (s, e) in spans.items() if n != name and s <= start < e]
    assert len(others) <= 1, (name, others)
  assert spans["a"][0] < spans["c"][0]   # in the given order


def test_worker_environment_keeps_given_thread_flags():
  env = workers.worker_environment(1, {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"})
  assert env["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=false"
  assert env["PYTHONPATH"].split(os.pathsep)[0] == workers.ROOT
  many = workers.worker_environment(10 * workers.available_cores(), {})
  assert many["XLA_FLAGS"] == ("--xla_cpu_multi_thread_eigen=false "
                               "intra_op_parallelism_threads=1")


def test_resolve_workers():
  assert workers.resolve_workers(0) == workers.available_cores()
  assert workers.resolve_workers(3) == 3
  with pytest.raises(common.ConfigError, match="workers must be a non-negative int"):
    workers.resolve_workers(-1)


@pytest.mark.slow
def test_terminating_the_caller_stops_its_pieces(tmp_path):
  """``kill <pid>`` of a binary running pieces (SIGTERM, as a job scheduler or
  timeout sends) must not leave its workers running on."""
  import signal
  import subprocess
  import time
  pid_file = tmp_path / "piece.pid"
  piece = workers.Piece("sleeper", (sys.executable, "-c", (
      "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"),
      str(pid_file)), str(tmp_path / "sleeper.txt"))
  caller = subprocess.Popen([sys.executable, "-c", (
      "import sys; from experiments import workers; "
      f"workers.run_pieces([workers.Piece(*{tuple(piece)!r})], 1, poll_seconds=0.05)")],
      cwd=workers.ROOT, env=workers.worker_environment(1))
  deadline = time.time() + 60
  while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
    time.sleep(0.05)
  piece_pid = int(pid_file.read_text())
  caller.send_signal(signal.SIGTERM)
  assert caller.wait(timeout=30) != 0
  deadline = time.time() + 10
  while os.path.exists(f"/proc/{piece_pid}") and time.time() < deadline:
    time.sleep(0.05)
  alive = os.path.exists(f"/proc/{piece_pid}")
  if alive:
    os.kill(piece_pid, signal.SIGKILL)
  assert not alive, "the piece outlived its terminated caller"
