"""Name -> next-step predictor, shared by the Table 2 binary and its tests.

A predictor is a pair of plain functions:

* ``fit(key, train_task, val_task, config) -> fitted``.  ``train_task`` shows
  the training steps only (``target_step`` all -1, see
  :func:`dennl_jax.recsys.task.training_task`); shared models train on the
  ``history_mask`` steps of ``train_users``.  ``val_task`` predicts each
  user's validation step from the training steps: use its targets to choose
  hyperparameters and training length.  The test task is never passed to fit.
  ``config`` is a plain dict: the method's settings from the experiment config
  plus side information the runner adds (``"popularity"`` (C,),
  ``"category_embeddings"`` (C, d) when the method needs them).
* ``predict(fitted, task) -> (U, C)`` scores, higher = more likely, using only
  ``task.history_mask`` steps and ``task.embeddings``.

Modules register their predictors at import; :func:`available` imports the
known modules (the HSMM-based ones are optional, see ``_MODULES``).
"""
from __future__ import annotations

import importlib
from typing import Callable, NamedTuple, Optional

import numpy as np

from dennl_jax.recsys.task import NextStepTask, evaluated, history_length


class Predictor(NamedTuple):
  fit: Callable
  predict: Callable
  needs_embedding: bool
  needs_history: bool      # True: users with h = 0 get popularity instead (reported)
  description: str = ""
  # Optional, for state-space methods: decode(fitted, task) -> (U, T) int
  # most likely hidden state of every history step (-1 elsewhere); the
  # marketplace run scores it against the true phases (labelling accuracy).
  decode: Optional[Callable] = None


_REGISTRY: dict[str, Predictor] = {}
_MODULES = ("dennl_jax.recsys.baselines", "dennl_jax.recsys.sequence_models",
            "dennl_jax.recsys.hsmm_predictors")


def register(name: str, predictor: Predictor) -> Predictor:
  if not isinstance(predictor, Predictor):
    raise ValueError(f"{name}: expected a Predictor, got {type(predictor).__name__}")
  _REGISTRY[name] = predictor
  return predictor


def _import(module: str) -> None:
  try:
    importlib.import_module(module)
  except ModuleNotFoundError as e:
    # Only the optional module itself may be missing; a missing dependency
    # inside an existing module is a real error.
    if e.name != module:
      raise


def available() -> dict[str, Predictor]:
  """All registered predictors, importing every known predictor module first."""
  for module in _MODULES:
    _import(module)
  return dict(_REGISTRY)


def get(name: str) -> Predictor:
  """The predictor ``name``; modules are imported in order until it is found."""
  for module in _MODULES:
    if name in _REGISTRY:
      break
    _import(module)
  if name not in _REGISTRY:
    raise ValueError(f"unknown method {name!r}; registered: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def predict_with_fallback(predictor: Predictor, fitted, task: NextStepTask, popularity):
  """(scores (U, C), fell_back (U,) bool): popularity for h = 0 users of history methods."""
  scores = np.asarray(predictor.predict(fitted, task), np.float64)
  expected = (task.strengths.shape[0], task.strengths.shape[2])
  if scores.shape != expected:
    raise ValueError(f"predictor returned scores of shape {scores.shape}, expected {expected}")
  fell_back = np.zeros(expected[0], bool)
  if predictor.needs_history:
    fell_back = evaluated(task) & (history_length(task) == 0)
    scores = np.where(fell_back[:, None], np.asarray(popularity, np.float64)[None, :], scores)
  if not np.all(np.isfinite(scores[evaluated(task)])):
    raise ValueError("predictor returned NaN or inf scores for evaluated users")
  return scores, fell_back
