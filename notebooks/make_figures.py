r"""Regenerate the README gallery: executes the notebooks, which save their figures.

  python notebooks/make_figures.py            # writes notebooks/figures/*.png

Each notebook saves its plots to ``$DENNL_FIGURES_DIR`` when that is set (and
only shows them otherwise); this script sets it to ``notebooks/figures`` and
runs every notebook in a temporary copy, so the committed notebooks keep no
outputs.  03 is skipped when MovieLens is absent (DENNL_MOVIELENS_DIR).
"""
from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile
import time

import nbclient
import nbformat

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def main(names=("01_engine.ipynb", "02_dennl_synthetic.ipynb", "03_real_data.ipynb")):
  out = HERE / "figures"
  out.mkdir(exist_ok=True)
  os.environ["DENNL_FIGURES_DIR"] = str(out)
  os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                           os.environ.get("PYTHONPATH")]))
  os.environ.setdefault("DENNL_MOVIELENS_DIR",
                        str(ROOT / "../shared/data/movielens-latest-small"))
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      copy = pathlib.Path(tmp) / name
      shutil.copy(HERE / name, copy)
      nb = nbformat.read(copy, as_version=4)
      start = time.time()
      nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                              resources={"metadata": {"path": tmp}}).execute()
      print(f"{name}: {time.time() - start:.0f}s")
  print("figures:", sorted(p.name for p in out.glob("*.png")))


if __name__ == "__main__":
  main(*(tuple(sys.argv[1:]),) if len(sys.argv) > 1 else ())
