"""The notebooks in notebooks/ execute top to bottom, and are committed without outputs.

Each notebook runs in its own python3 kernel (nbclient) from a temporary copy,
with the checkout's ``src`` first on ``PYTHONPATH`` so the kernel imports this
tree's library, not whatever ``dennl_jax`` is installed.  The kernels compile
with ``JAX_DISABLE_MOST_OPTIMIZATIONS=1``: the notebooks' work is tiny and
almost all of their CPU time is XLA compilation, which this roughly halves
(BUILD_NOTES "Notebooks").  03 needs MovieLens and is skipped without it.
"""
from __future__ import annotations

import os
import pathlib
import shutil

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("01_engine.ipynb", "02_dennl_synthetic.ipynb", "03_real_data.ipynb")
MOVIELENS = pathlib.Path(os.environ.get("DENNL_MOVIELENS_DIR",
                                        ROOT / "../shared/data/movielens-latest-small"))


def _execute(name: str, tmp_path: pathlib.Path, monkeypatch, **env):
  """Run a temporary copy of notebooks/<name> up to its first error.

  Returns (the executed notebook, the CellExecutionError or None)."""
  # The kernel inherits this process's environment.
  for var, value in dict(JAX_DISABLE_MOST_OPTIMIZATIONS="1", MPLBACKEND="Agg", **env).items():
    monkeypatch.setenv(var, value)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
  monkeypatch.delenv("DENNL_FIGURES_DIR", raising=False)
  copy = tmp_path / name
  shutil.copy(NOTEBOOKS / name, copy)
  nb = nbformat.read(copy, as_version=4)
  # The kernel's working directory is the copy's, as when a user opens it.
  try:
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
  except nbclient.exceptions.CellExecutionError as error:
    return nb, error
  return nb, None


def _errors(nb) -> list[str]:
  return [f"{o.get('ename')}: {o.get('evalue')}" for c in nb.cells if c.cell_type == "code"
          for o in c.get("outputs", []) if o.get("output_type") == "error"]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_stripped(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.get("outputs") == [], f"{name} cell {i} has outputs: strip them before committing"
      assert cell.get("execution_count") is None, f"{name} cell {i} has an execution count"
  assert "REPO_URL" in nb.cells[1].source, f"{name}: the first code cell must install the package"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, tmp_path, monkeypatch):
  env = {}
  if name.startswith("03"):
    if not (MOVIELENS / "ratings.csv").is_file():
      pytest.skip(f"MovieLens not found at {MOVIELENS} (set DENNL_MOVIELENS_DIR)")
    env["DENNL_MOVIELENS_DIR"] = str(MOVIELENS.resolve())
  nb, error = _execute(name, tmp_path, monkeypatch, **env)
  assert error is None and not _errors(nb), (_errors(nb), error)
  last = nb.cells[-1]
  assert "notebook ran in" in "".join(o.get("text", "") for o in last.outputs), \
      f"{name} did not reach its last cell"


@pytest.mark.slow
def test_real_data_notebook_stops_without_movielens(tmp_path, monkeypatch):
  """Without the data, the data cell prints what to do and stops the run there."""
  nb, error = _execute("03_real_data.ipynb", tmp_path, monkeypatch,
                       DENNL_MOVIELENS_DIR=str(tmp_path / "absent"))
  assert error is not None and _errors(nb) == ["SystemExit: 0"], (_errors(nb), error)
  code = [c for c in nb.cells if c.cell_type == "code"]
  stop = next(i for i, c in enumerate(code)
              if any(o.get("output_type") == "error" for o in c.outputs))
  assert "load_movielens" in code[stop].source
  text = "".join(o.get("text", "") for o in code[stop].outputs)
  assert "MovieLens not found" in text and "DENNL_MOVIELENS_DIR" in text
  assert all(not c.outputs for c in code[stop + 1:]), "cells after the stop ran"
