"""Labelling accuracy: decoded states vs. true states up to relabelling.

A fitted HMM's state numbering is arbitrary, so each user's decoded path is
compared with its true path after the one-to-one relabelling that maximises
the number of agreeing steps (Hungarian algorithm on the confusion matrix,
``scipy.optimize.linear_sum_assignment``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from jaxtyping import ArrayLike, Bool, Float, Int
from scipy.optimize import linear_sum_assignment


def confusion_matrix(true_states: Int[ArrayLike, "num_timesteps"],
                     decoded: Int[ArrayLike, "num_timesteps"], num_states: int,
                     mask: Optional[Bool[ArrayLike, "num_timesteps"]] = None
                     ) -> Int[np.ndarray, "num_states num_states"]:
  """(K, K) counts ``[true, decoded]`` over the valid steps of one sequence."""
  true_states = np.asarray(true_states).ravel()
  decoded = np.asarray(decoded).ravel()
  if true_states.shape != decoded.shape:
    raise ValueError(f"true_states {true_states.shape} and decoded {decoded.shape} differ")
  if mask is not None:
    keep = np.asarray(mask, bool).ravel()
    true_states, decoded = true_states[keep], decoded[keep]
  for name, x in (("true_states", true_states), ("decoded", decoded)):
    if x.size and (x.min() < 0 or x.max() >= num_states):
      raise ValueError(f"{name} has labels outside [0, {num_states - 1}]")
  confusion = np.zeros((num_states, num_states), np.int64)
  np.add.at(confusion, (true_states, decoded), 1)
  return confusion


def matched_steps(true_states: Int[ArrayLike, "num_timesteps"],
                  decoded: Int[ArrayLike, "num_timesteps"], num_states: int,
                  mask: Optional[Bool[ArrayLike, "num_timesteps"]] = None) -> tuple[int, int]:
  """(number of steps that agree under the best relabelling, number of valid steps)."""
  confusion = confusion_matrix(true_states, decoded, num_states, mask)
  rows, cols = linear_sum_assignment(-confusion)
  return int(confusion[rows, cols].sum()), int(confusion.sum())


def labelling_accuracy(true_states: Int[ArrayLike, "num_users num_timesteps"],
                       decoded: Int[ArrayLike, "num_users num_timesteps"], num_states: int,
                       mask: Optional[Bool[ArrayLike, "num_users num_timesteps"]] = None
                       ) -> float:
  """Labelling accuracy over users, averaged over all valid time steps.

  true_states, decoded: (U, T) int; mask: (U, T) bool or None.  Each user
  gets its own best one-to-one relabelling; the result is the total number
  of matched steps divided by the total number of valid steps.
  """
  true_states = np.asarray(true_states)
  decoded = np.asarray(decoded)
  if true_states.ndim != 2 or true_states.shape != decoded.shape:
    raise ValueError(
        f"true_states and decoded must both be (U, T); got {true_states.shape}, {decoded.shape}")
  mask = np.ones(true_states.shape, bool) if mask is None else np.asarray(mask, bool)
  if mask.shape != true_states.shape:
    raise ValueError(f"mask {mask.shape} must match states {true_states.shape}")
  hits = total = 0
  for t, d, m in zip(true_states, decoded, mask):
    h, n = matched_steps(t, d, num_states, m)
    hits += h
    total += n
  if total == 0:
    raise ValueError("no valid steps to score")
  return hits / total


def per_user_accuracy(true_states: Int[ArrayLike, "num_users num_timesteps"],
                      decoded: Int[ArrayLike, "num_users num_timesteps"], num_states: int,
                      mask: Optional[Bool[ArrayLike, "num_users num_timesteps"]] = None
                      ) -> Float[np.ndarray, "num_users"]:
  """(U,) each user's accuracy under its own best relabelling."""
  true_states = np.asarray(true_states)
  decoded = np.asarray(decoded)
  mask = np.ones(true_states.shape, bool) if mask is None else np.asarray(mask, bool)
  out = []
  for t, d, m in zip(true_states, decoded, mask):
    h, n = matched_steps(t, d, num_states, m)
    out.append(h / max(n, 1))
  return np.asarray(out)
