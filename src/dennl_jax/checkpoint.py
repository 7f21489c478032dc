"""Checkpoints of training runs and of chunked fits (orbax), resumed by rerunning.

A *workdir* holds one run:

* ``config.json`` -- the run's config, written by the first run and compared
  by every later one: a different config raises :class:`CheckpointError`
  naming the fields that differ (resuming someone else's run would silently
  mix two experiments; starting over would silently lose work);
* ``checkpoints/<step>/`` -- orbax checkpoints (:class:`Checkpointer`), the
  last ``keep`` kept.  Each stores every leaf of the saved pytrees as an
  array, plus a JSON record of the leaves' paths, shapes, dtypes and SHA-1
  digests and the loop's bookkeeping.  Restoring into a pytree of another
  structure raises :class:`CheckpointError` naming the first leaf that
  differs; an unreadable checkpoint or a digest mismatch raises it too
  ("corrupt"), never a fresh start;
* ``chunks/<index>.npz`` -- results of finished chunks of a chunked batch
  fit (:func:`cached_chunks`, e.g. per-user conventional EM), so a killed
  fit redoes only the unfinished chunks.

Randomness is not stored: every trainer derives its keys and batches from
the step index (:mod:`dennl_jax.loop`).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np


class CheckpointError(RuntimeError):
  """A workdir that cannot be resumed: corrupt, or written by another config or model."""


# ------------------------------------------------------------------ config


def _plain(obj: Any) -> Any:
  """JSON-able copy: mappings, sequences, numbers, strings; arrays as lists."""
  if hasattr(obj, "to_dict"):                       # ml_collections ConfigDict
    obj = obj.to_dict()
  if isinstance(obj, Mapping):
    return {str(k): _plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_plain(v) for v in obj]
  if isinstance(obj, (np.ndarray, jax.Array, np.generic)):
    return _plain(np.asarray(obj).tolist())
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  return repr(obj)


def _differences(saved: Any, given: Any, prefix: str = "") -> list[str]:
  if isinstance(saved, dict) and isinstance(given, dict):
    out = []
    for k in sorted(set(saved) | set(given)):
      name = f"{prefix}.{k}" if prefix else k
      if k not in saved:
        out.append(f"{name} (only in the new config)")
      elif k not in given:
        out.append(f"{name} (only in the checkpoint's config)")
      else:
        out += _differences(saved[k], given[k], name)
    return out
  if json.dumps(saved) != json.dumps(given):
    return [f"{prefix or 'config'}: {json.dumps(saved)[:80]} in the checkpoint, "
            f"{json.dumps(given)[:80]} now"]
  return []


def check_config(workdir: str, config) -> None:
  """Write ``workdir/config.json`` (first run) or check that ``config`` equals it.

  Raises:
    CheckpointError: the workdir was written with another config (the
      message lists the differing fields), its config.json is unreadable, or
      it holds checkpoints but no config.json (a run whose config cannot be
      compared is never resumed).
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  given = json.loads(json.dumps(_plain(config)))
  checkpoints = os.path.join(workdir, "checkpoints")
  if not os.path.exists(path) and os.path.isdir(checkpoints) and os.listdir(checkpoints):
    raise CheckpointError(
        f"workdir {workdir} holds checkpoints but no config.json, so its run's config cannot "
        "be checked; restore config.json or delete the workdir to start over")
  if not os.path.exists(path):
    with open(path + ".tmp", "w") as f:
      json.dump(given, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
    return
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path} is corrupt ({e}); delete the workdir to start over") from e
  diff = _differences(saved, given)
  if diff:
    raise CheckpointError(
        f"workdir {workdir} holds a run with a different config ({'; '.join(diff[:5])}"
        f"{'; ...' if len(diff) > 5 else ''}); use another --workdir or delete this one")


# ------------------------------------------------------------------ leaves


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _leaf_array(x) -> np.ndarray:
  return np.asarray(jax.random.key_data(x) if _is_key(x) else x)


def _digest(a: np.ndarray) -> str:
  return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


def fingerprint(tree) -> str:
  """SHA-1 (hex) of a pytree's array leaves (values, shapes, dtypes): names data
  or keys in a run's config without storing them."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  h = hashlib.sha1(str(treedef).encode())
  for x in leaves:
    a = np.ascontiguousarray(_leaf_array(x))
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _spec(trees: Mapping[str, Any]) -> tuple[list, list]:
  """(leaves, [[path, shape, dtype], ...]) of a dict of pytrees, in a fixed order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(dict(trees))
  leaves = [leaf for _, leaf in flat]
  spec = [[jax.tree_util.keystr(path), list(np.shape(leaf)),
           str(leaf.dtype) if hasattr(leaf, "dtype") else type(leaf).__name__]
          for path, leaf in flat]
  return leaves, spec


def _check_structure(where: str, saved: list, expected: list) -> None:
  if len(saved) != len(expected):
    raise CheckpointError(f"{where} was written for a different model: {len(saved)} arrays "
                          f"there, {len(expected)} in the model being trained")
  for s, e in zip(saved, expected):
    if s != e:
      raise CheckpointError(f"{where} was written for a different model: leaf {s[0]} has shape "
                            f"{s[1]} dtype {s[2]} there, {e[0]} shape {e[1]} dtype {e[2]} here")


def _key_impl(template):
  if isinstance(template, jax.ShapeDtypeStruct):      # no key_impl() for abstract keys
    return template.dtype._impl                        # pylint: disable=protected-access
  return jax.random.key_impl(template)


def _rebuild(trees: Mapping[str, Any], arrays: list) -> dict:
  flat, treedef = jax.tree_util.tree_flatten(dict(trees))
  out = [jax.random.wrap_key_data(a, impl=_key_impl(t)) if _is_key(t)
         else jnp.asarray(a) for t, a in zip(flat, arrays)]
  return jax.tree_util.tree_unflatten(treedef, out)


# ------------------------------------------------------------- checkpoints


class Checkpointer:
  """Orbax checkpoints of a dict of pytrees plus JSON bookkeeping in ``workdir``.

  ``save(step, trees, meta)``; ``restore(templates)`` -> ``(step, trees,
  meta)`` of the latest checkpoint, or None when there is none.  The config
  is checked when the checkpointer is made (:func:`check_config`).
  """

  def __init__(self, workdir: str, *, config=None, keep: int = 3):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    if "[" in os.path.abspath(workdir) or "]" in os.path.abspath(workdir):
      # orbax 0.12 / tensorstore save under such a path but cannot read the arrays back
      raise ValueError(f"checkpoint workdir {workdir!r}: orbax cannot restore from a path with "
                       "brackets [ ]; use another directory name")
    check_config(workdir, {} if config is None else config)
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    # Synchronous saves: a checkpoint exists once save() returns, so a job
    # killed right after loses nothing it reported as saved.
    self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, trees: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    ocp = self._ocp
    leaves, spec = _spec(trees)
    arrays = [_leaf_array(x) for x in leaves]
    record = dict(meta, step=int(step), leaves=spec, digests=[_digest(a) for a in arrays])
    self._manager.save(int(step), args=ocp.args.Composite(
        arrays=ocp.args.StandardSave({f"{j:06d}": a for j, a in enumerate(arrays)}),
        meta=ocp.args.JsonSave(record)), force=True)
    self._manager.wait_until_finished()

  def restore(self, templates: Mapping[str, Any]):
    """``(step, trees, meta)`` of the latest checkpoint, trees shaped as ``templates``.

    Raises:
      CheckpointError: corrupt checkpoint, or one of another structure.
    """
    ocp = self._ocp
    step = self._manager.latest_step()
    if step is None:
      return None
    where = f"checkpoint {os.path.join(self.directory, str(step))}"
    leaves, spec = _spec(templates)
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:   # noqa: BLE001 -- any failure to read is reported as corruption
      raise CheckpointError(f"{where} is corrupt or incomplete ({type(e).__name__}: {e}); "
                            "delete that step's directory to resume from an earlier "
                            "checkpoint") from e
    _check_structure(where, meta.get("leaves", []), spec)
    target = {f"{j:06d}": np.zeros(s[1], np.asarray(_leaf_array(x)).dtype)
              for j, (x, s) in enumerate(zip(leaves, spec))}
    try:
      arrays = self._manager.restore(step, args=ocp.args.Composite(
          arrays=ocp.args.StandardRestore(target)))["arrays"]
    except Exception as e:   # noqa: BLE001
      raise CheckpointError(f"{where} is corrupt or incomplete ({type(e).__name__}: {e}); "
                            "delete that step's directory to resume from an earlier "
                            "checkpoint") from e
    arrays = [np.asarray(arrays[f"{j:06d}"]) for j in range(len(leaves))]
    for (path, _, _), a, digest in zip(spec, arrays, meta["digests"]):
      if _digest(a) != digest:
        raise CheckpointError(f"{where} is corrupt: the stored {path} does not match its "
                              "digest; delete that step's directory to resume from an earlier "
                              "checkpoint")
    return int(meta["step"]), _rebuild(templates, arrays), meta

  def close(self) -> None:
    self._manager.close()


# ------------------------------------------------------------------ chunks


def cached_chunks(fn: Callable, workdir: str, config=None) -> Callable:
  """``fn(chunk, index)`` whose results are kept in ``workdir/chunks/<index>.npz``.

  For :func:`dennl_jax.chunking.chunked_map`: a finished chunk is loaded
  instead of recomputed, so a killed fit resumes at its first unfinished
  chunk.  Each file records a digest of its chunk's inputs; loading it for
  other inputs, for an output of another structure, or a file that cannot be
  read, raises :class:`CheckpointError` (``config`` is checked as in
  :func:`check_config`).
  """
  check_config(workdir, {} if config is None else config)
  directory = os.path.join(workdir, "chunks")
  os.makedirs(directory, exist_ok=True)

  def wrapped(chunk, index):
    inputs = hashlib.sha1(b"".join(_leaf_array(x).tobytes()
                                   for x in jax.tree_util.tree_leaves(chunk))).hexdigest()
    path = os.path.join(directory, f"{int(index):06d}.npz")
    if os.path.exists(path):
      shapes = jax.eval_shape(fn, chunk, index)
      leaves, spec = _spec({"out": shapes})
      try:
        with np.load(path) as f:
          saved = {k: f[k] for k in f.files}
        record = json.loads(str(saved.pop("__record__")))
      except Exception as e:   # noqa: BLE001 -- any failure to read is corruption
        raise CheckpointError(f"chunk file {path} is corrupt ({type(e).__name__}: {e}); "
                              "delete it to recompute that chunk") from e
      if not isinstance(record, dict) or not {"inputs", "leaves"} <= set(record):
        raise CheckpointError(f"chunk file {path} is corrupt (its record lacks inputs or "
                              "leaves); delete it to recompute that chunk")
      if record["inputs"] != inputs:
        raise CheckpointError(f"chunk file {path} was computed from other inputs (data or "
                              f"keys changed); use another workdir or delete {directory}")
      _check_structure(f"chunk file {path}", record["leaves"], spec)
      missing = [f"{j:06d}" for j in range(len(leaves)) if f"{j:06d}" not in saved]
      if missing:
        raise CheckpointError(f"chunk file {path} is corrupt (arrays {missing[:3]} missing); "
                              "delete it to recompute that chunk")
      arrays = [saved[f"{j:06d}"] for j in range(len(leaves))]
      return _rebuild({"out": shapes}, arrays)["out"]
    out = fn(chunk, index)
    leaves, spec = _spec({"out": out})
    arrays = [_leaf_array(x) for x in leaves]
    record = json.dumps({"inputs": inputs, "leaves": spec})
    with open(path + ".tmp", "wb") as f:       # a kill mid-write leaves no truncated .npz
      np.savez(f, __record__=np.asarray(record), **{f"{j:06d}": a for j, a in enumerate(arrays)})
    os.replace(path + ".tmp", path)
    return out

  return wrapped
