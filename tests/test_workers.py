"""experiments.workers: pieces of an experiment in worker processes; Table 1 run in pieces."""
import os
import sys

import numpy as np
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


def test_table1_in_workers_equals_one_process(tmp_path):
  """Two seeds in 2 worker processes: the same per-user accuracies, tables and
  files as one process; a rerun keeps the finished pieces."""
  from experiments import synthetic_table1
  from tests.test_experiments import OUTPUTS, TABLE1_SMOKE_METHODS
  config = common.get_config("synthetic_table1", "tiny")
  config.methods = TABLE1_SMOKE_METHODS
  config.num_seeds = 2
  one = synthetic_table1.run(config, str(tmp_path / "one"))
  config.workers = 2
  two = synthetic_table1.run(config, str(tmp_path / "two"))
  assert one == two
  for filename in OUTPUTS["synthetic_table1"]:
    assert (tmp_path / "two" / filename).stat().st_size > 0, filename
  per_user = [common.read_json(tmp_path / run / "per_user.json") for run in ("one", "two")]
  assert [list(seed) for seed in per_user[0]] == [list(seed) for seed in per_user[1]]
  for seed_one, seed_two in zip(*per_user):
    for row in seed_one:
      np.testing.assert_array_equal(seed_one[row]["noise20"], seed_two[row]["noise20"])
  for filename in ("table1.json", "table1_stats.json", "selection.json"):
    assert (common.read_json(tmp_path / "one" / filename)
            == common.read_json(tmp_path / "two" / filename)), filename
  times = common.read_json(tmp_path / "two" / "timings.json")["seconds"]
  assert all(len(cells["noise20"]) == 2 for cells in times.values())
  assert common.read_json(tmp_path / "two" / "config.json")["workers"] == 2
  logs = sorted((tmp_path / "two" / "pieces").glob("*/log.txt"))
  assert [p.parent.name for p in logs] == ["seed0_noise20", "seed1_noise20"]
  stamps = [p.stat().st_mtime_ns for p in logs]
  assert synthetic_table1.run(config, str(tmp_path / "two")) == one
  assert [p.stat().st_mtime_ns for p in logs] == stamps   # nothing ran again
