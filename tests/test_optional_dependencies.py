"""The main binary runs with nothing but the core dependencies installed.

CI installs the test extras, so a core code path that needs an optional
package would pass there and fail on a user's fresh ``pip install -e .``.
This test makes every optional dependency unimportable -- in the binary's
process and in any process it starts -- and runs the README's main job on its
``tiny`` variant.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
OPTIONAL = ("tqdm", "orbax", "tensorboardX", "nbclient", "nbformat", "hmmlearn", "dynamax",
            "sklearn")

_BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys

    class _BlockOptional(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
          raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None

    sys.meta_path.insert(0, _BlockOptional())
    """)


def _blocked_env(tmp_path: pathlib.Path) -> dict:
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(_BLOCKER)
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), str(REPO),
                                                    env.get("PYTHONPATH")]))
  return env


def test_blocker_blocks(tmp_path):
  """The harness itself: each optional package fails to import under it."""
  env = _blocked_env(tmp_path)
  for name in OPTIONAL:
    result = subprocess.run([sys.executable, "-c", f"import {name}"], env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "blocked" in result.stderr, name


@pytest.mark.slow
def test_main_job_tiny_runs_without_optional_dependencies(tmp_path):
  out = tmp_path / "out"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.synthetic_table1",
       f"--config={REPO}/experiments/configs/synthetic_table1.py:tiny",
       f"--output_dir={out}"],
      cwd=REPO, env=_blocked_env(tmp_path), capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  table = json.loads((out / "table1.json").read_text())
  assert {"dennl", "conventional_em", "initial_fusion"} <= set(table)
  assert "blocked" not in result.stderr
