"""The documentation: the site builds without warnings, and the user-facing text stays
short and free of the build's history."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
HISTORY = (r"\bstop \d+", r"\bissue \d+", r"filing")
MAX_README_LINES = 220


MAX_BUILD_NOTES_LINES = 800


def _user_docs():
  """Everything a user reads: the docs, and the docstrings, comments, configs and
  notebooks of the package, the binaries and the benchmarks."""
  code = [p for d in ("src", "experiments", "benchmarks", "notebooks")
          for p in sorted((REPO / d).rglob("*")) if p.suffix in (".py", ".ipynb")]
  return [REPO / "README.md", REPO / "BUILD_NOTES.md", REPO / "CHANGELOG.md",
          *sorted((REPO / "docs").glob("**/*.md")), *code]


def test_mkdocs_build_is_strict_clean(tmp_path):
  """``mkdocs build --strict``: broken links, unknown API objects and docstring warnings fail."""
  pytest.importorskip("mkdocs")
  pytest.importorskip("material")
  pytest.importorskip("mkdocstrings_handlers.python")
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
  result = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  assert (tmp_path / "site" / "api" / "em" / "index.html").exists()


def test_build_notes_are_concise():
  lines = (REPO / "BUILD_NOTES.md").read_text(encoding="utf-8").splitlines()
  assert len(lines) <= MAX_BUILD_NOTES_LINES, f"BUILD_NOTES.md has {len(lines)} lines"


def test_readme_is_short():
  lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
  assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (> {MAX_README_LINES})"


@pytest.mark.parametrize("path", _user_docs(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_development_history(path):
  text = path.read_text(encoding="utf-8")
  for pattern in HISTORY:
    hits = [m.group(0) for m in re.finditer(pattern, text, flags=re.IGNORECASE)]
    assert not hits, f"{path.relative_to(REPO)} mentions {hits[:5]} ({pattern!r})"


@pytest.mark.slow
def test_readme_tour_runs(tmp_path):
  """The README's code blocks, run in order in a fresh process, as a reader would."""
  text = (REPO / "README.md").read_text(encoding="utf-8")
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "README.md has no python code blocks"
  script = tmp_path / "tour.py"
  script.write_text("\n".join(blocks))
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
