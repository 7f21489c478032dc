"""benchmarks/robustness_probes.py: every probe gives its expected answer (or a
measured, documented float32 limit), and the binary writes its table."""
import json

import pytest

from benchmarks import robustness_probes
from experiments import common


@pytest.mark.slow
def test_every_probe_passes(tmp_path):
  result = robustness_probes.run(common.get_config("robustness_probes", "tiny"), str(tmp_path))
  verdicts = {p["name"]: p["ok"] for p in result["probes"]}
  assert all(v is True or v == "limit" for v in verdicts.values()), verdicts
  assert sum(v is True for v in verdicts.values()) >= len(verdicts) - 1
  saved = json.loads((tmp_path / "probes.json").read_text())
  assert len(saved["probes"]) == len(verdicts)
  assert "| probe | expected | actual | ok |" in (tmp_path / "probes.md").read_text()
