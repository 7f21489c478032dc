"""experiments.table1_pieces: Table 1 as (seed, setting) pieces in worker processes."""
import numpy as np
import pytest

from experiments import common
from experiments import synthetic_table1
from experiments import table1_pieces
from tests.test_experiments import OUTPUTS, TABLE1_SMOKE_METHODS

pytestmark = pytest.mark.usefixtures("float32_default")


def test_piece_order_starts_with_one_piece_of_every_length():
  config = synthetic_table1.prepare_config(common.get_config("synthetic_table1"))
  order = table1_pieces._piece_order(config)
  assert order[:3] == [(0, "T400"), (0, "T100"), (0, "T50")]   # one of each length
  assert sorted(order) == sorted((s, n) for s in (0, 1, 2) for n in synthetic_table1.SETTINGS)
  lengths = [synthetic_table1.setting_spec(n, config.noise_length)[0] for _, n in order[3:]]
  assert lengths == sorted(lengths, reverse=True)                # then longest first
  assert config.workers == 0 and common.get_config("synthetic_table1", "quick").workers == 1


@pytest.mark.slow
def test_table1_in_workers_equals_one_process(tmp_path):
  """Two seeds in 2 worker processes: the same per-user accuracies, tables and
  files as one process; a rerun keeps the finished pieces."""
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
