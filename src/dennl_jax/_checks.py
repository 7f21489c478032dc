"""Concrete-input validation shared by the public functions.

The public functions validate their inputs when they are called with concrete
arrays (eager mode) and raise ``ValueError`` naming the problem.  Under ``jit``
or ``vmap`` the inputs are tracers and value checks are impossible without
``checkify`` (:func:`dennl_jax.checked`); callers there should run
:func:`dennl_jax.validate` once on the concrete batch before entering the
traced region.
"""
from __future__ import annotations

import jax
import numpy as np


def is_concrete(*trees) -> bool:
  """True when no leaf of the given pytrees is a tracer."""
  for tree in trees:
    for leaf in jax.tree_util.tree_leaves(tree):
      if isinstance(leaf, jax.core.Tracer):
        return False
  return True


def as_numpy(x) -> np.ndarray:
  return np.asarray(x)


def check_finite(name: str, x) -> None:
  x = as_numpy(x)
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains NaN or inf values")


def check_distribution(name: str, p, axis: int = -1, atol: float | None = None) -> None:
  """Non-negative entries that sum to one along ``axis``."""
  p = as_numpy(p)
  check_finite(name, p)
  if np.any(p < 0):
    raise ValueError(f"{name} has negative entries; it must be a probability distribution")
  if atol is None:
    atol = 1e-4 if p.dtype == np.float32 else 1e-8
  sums = p.sum(axis=axis)
  if not np.allclose(sums, 1.0, atol=atol):
    raise ValueError(
        f"{name} must sum to 1 along axis {axis}; got sums in "
        f"[{sums.min():.6g}, {sums.max():.6g}]")


def check_positive(name: str, x) -> None:
  x = as_numpy(x)
  check_finite(name, x)
  if np.any(x <= 0):
    raise ValueError(f"{name} must be strictly positive")


def check_shape(name: str, x, shape: tuple) -> None:
  """``shape`` may contain None for a free dimension."""
  actual = np.shape(x)
  ok = len(actual) == len(shape) and all(s is None or s == a for s, a in zip(shape, actual))
  if not ok:
    want = tuple("*" if s is None else s for s in shape)
    raise ValueError(f"{name} has shape {actual}, expected {want}")


def check_mask(mask, num_steps: int) -> np.ndarray:
  mask = as_numpy(mask)
  if mask.shape != (num_steps,):
    raise ValueError(f"mask has shape {mask.shape}, expected ({num_steps},) to match obs")
  if mask.dtype != np.bool_:
    raise ValueError(f"mask must be a bool array, got dtype {mask.dtype}")
  if not mask.any():
    raise ValueError("mask has no valid step; a sequence needs at least one observation")
  return mask


def reverse_mode_only(err: TypeError, what: str, instead: str) -> TypeError:
  """JAX's error for forward mode through a ``custom_vjp`` function, naming the
  mode that supports it; any other ``TypeError`` unchanged."""
  if "forward-mode autodiff" not in str(err):
    return err
  return TypeError(f"{what} defines reverse mode only (jax.grad, jax.vjp: it is a "
                   f"jax.custom_vjp); forward mode "
                   f"(jax.jvp, jax.jacfwd, jax.linearize, Hessians) needs {instead}, which "
                   "differentiates the same function by plain autodiff")
