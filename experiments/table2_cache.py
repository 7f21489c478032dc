"""Table 2's result cache: a killed or extended run recomputes only what is missing.

Every finished (seed, method) result and each seed's GraphSAGE embeddings are
pickled the moment they finish (atomic write), under a directory named by a
fingerprint of the data/protocol settings; each method's file name
fingerprints its own settings.  See BUILD_NOTES "Table 2 (next-category prediction)".
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle

import jax
import numpy as np

from experiments import common

# Config fields that change nothing a finished method computed: reruns with a
# different selection of methods/seeds or a different report reuse the cache.
REPORT_ONLY = ("preset", "methods", "seeds", "draws", "bootstrap", "reference", "fail_fast",
                "method_config", "resume", "cached_only")
EMBEDDINGS = "_embeddings"


class ResultCache:
  """Per-seed GraphSAGE embeddings and per-(seed, method) results on disk.

  A killed run keeps every finished method: ``<output_dir>/cache/<data
  fingerprint>/seed<s>/`` (role draw 0; draw d > 0 under ``draw<d>/seed<s>/``)
  holds ``_embeddings.pkl`` (GraphSAGE) and ``<method>-<method
  fingerprint>.pkl``, written atomically as each finishes, and a rerun with
  the same data/protocol settings and the same method settings loads them
  instead of recomputing (results are deterministic given the keys).  The
  data fingerprint covers every config field except :data:`REPORT_ONLY`;
  the method fingerprint covers ``method_config[name]``.  ``directory=None``
  caches nothing.
  """

  def __init__(self, directory, config):
    self.directory = None
    if directory:
      data = {k: v for k, v in config.to_dict().items() if k not in REPORT_ONLY}
      self.directory = os.path.join(directory, "cache", digest(data))
      self._method_config = config.method_config.to_dict()

  def _path(self, seed, name, draw=0):
    if name != EMBEDDINGS:
      name = f"{name}-{digest(self._method_config.get(name, {}))}"
    return os.path.join(self.directory, *draw_dir(draw), f"seed{seed}", f"{name}.pkl")

  def load(self, seed, name, draw=0):
    if self.directory is None or not os.path.exists(self._path(seed, name, draw)):
      return None
    with open(self._path(seed, name, draw), "rb") as f:
      return pickle.load(f)

  def save(self, seed, name, value, draw=0):
    if self.directory is None:
      return
    path = self._path(seed, name, draw)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
      pickle.dump(jax.tree_util.tree_map(
          lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, value), f)
    os.replace(path + ".tmp", path)     # a kill mid-write never leaves a truncated result


def draw_dir(draw) -> tuple:
  """Path parts of role draw ``draw``: none for draw 0 (a single-draw run's layout)."""
  return () if draw == 0 else (f"draw{draw}",)


def digest(obj) -> str:
  return hashlib.sha1(json.dumps(common.to_jsonable(obj), sort_keys=True).encode()).hexdigest()[:12]
