"""The step driver every trainer runs: :func:`fit` (validation, checkpoints, resume).

``fit`` drives a jitted step ``step_fn(state, opt_state, batch, key) ->
(state, opt_state, loss, skipped)`` (:func:`dennl_jax.training.make_train_step`
builds one) for ``num_steps`` steps.  Everything random is a pure function
of the step index ``i``: the step's key is ``fold_in(key, i)`` and its batch
is ``batch_at(i)`` (:func:`epoch_batches` gives the usual schedule, a fresh
permutation every epoch), so a run resumed from a checkpoint at step ``k``
sees exactly the batches and keys an uninterrupted run sees after ``k`` --
and reaches bit-identical parameters.

Around the step it does what every trainer needs once; the options come in
three small frozen groups, each checked when it is built:

* :class:`Validation` (``validation=``): ``fn(state) -> float`` after every
  ``every`` steps and after the last (and before the first with
  ``at_start``); the best state by ``mode`` (``"max"`` or ``"min"``, strict
  improvement, so ties keep the earlier state) is returned beside the final
  one;
* :class:`Checkpointing` (``checkpointing=``): periodic orbax checkpoints in
  ``workdir`` (:mod:`dennl_jax.checkpoint`, every ``every`` steps and at the
  end, the last ``keep`` kept) and the run's ``config`` (JSON); rerunning
  with the same workdir resumes, a mismatched or corrupt checkpoint raises
  :class:`~dennl_jax.checkpoint.CheckpointError`.  Metrics go to
  ``workdir/metrics`` (:mod:`dennl_jax.tracking`: TensorBoard + JSONL);
* :class:`Reporting` (``reporting=``): ``name`` prefixes log lines and the
  progress bar; ``log``/``log_every``: progress lines; ``progress``: a tqdm
  bar (progress lines on stderr where tqdm is not installed); ``tracker``:
  metrics to a :class:`dennl_jax.tracking.Tracker`;
* skipped updates (the step's non-finite flag) are counted and reported;
* ``mesh``: batches through :func:`dennl_jax.sharding.shard_users` and the
  state through :func:`dennl_jax.sharding.replicate` (data parallel).

For example::

    indices = loop.epoch_batches(k_perm, num_users, 32)
    result = loop.fit(step_fn, state, opt_state, num_steps=1000,
                      batch_at=lambda i: take(data, indices(i)), key=k_steps,
                      validation=loop.Validation(val_loss, every=100, mode="min"),
                      checkpointing=loop.Checkpointing("runs/a", config=config),
                      reporting=loop.Reporting(name="dennl", log=print, log_every=50))

Step numbering: a loss is recorded under the index ``i`` of the step that
computed it (``History.step``); evaluations, checkpoints and tracked metrics
are numbered by the count of updates done, ``i + 1`` (0 = before training).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np

from dennl_jax import checkpoint, sharding, tracking


class History(NamedTuple):
  """Training curve: step indices, losses, wall-clock seconds since start, and
  whether each step's update was skipped (non-finite loss or gradient)."""
  step: np.ndarray
  loss: np.ndarray
  seconds: np.ndarray
  skipped: np.ndarray


class FitResult(NamedTuple):
  """What :func:`fit` returns.

  state, opt_state: after the last step run; best_state: the state with the
  best validation value (``state`` without ``validation``); best_value: its
  value (``-inf``/``inf`` when no evaluation improved on the start, NaN
  without ``validation``); best_step: updates done at that point; curve: one
  ``(updates done, loss of the last step, value)`` per evaluation (loss NaN
  at 0); skipped: number of skipped updates; seconds: wall clock, resumed
  runs included; start_step: the step this call started from (> 0 when it
  resumed from a checkpoint).
  """
  state: Any
  opt_state: Any
  best_state: Any
  best_value: float
  best_step: int
  history: History
  curve: list
  skipped: int
  seconds: float
  start_step: int
  stopped_early: bool = False


@dataclasses.dataclass(frozen=True)
class Validation:
  """Validation and early stopping of :func:`fit`.

  Attributes:
    fn: ``state -> float``, the validation value of a state.
    every: updates between evaluations (0: after the last step only; the last
      step is always evaluated).
    at_start: also evaluate before the first step (a fresh run only).
    mode: ``"max"`` or ``"min"``: which values are better.  Strict
      improvement, so ties keep the earlier state.
    name: the value's name in log lines and tracked metrics.
    patience: early stopping: the run stops at the first evaluation that is
      ``patience`` or more updates after the last *significant* improvement
      (better by more than ``min_delta`` than the value at the previous
      significant improvement); 0: never.
      The start evaluation counts as an improvement at update 0.
    min_delta: the smallest change of the value (in its own units) that
      counts as an improvement for ``patience``.  The best state is still
      the strictly best one: ``min_delta`` only decides when to stop.
  """
  fn: Callable[[Any], float]
  every: int = 0
  at_start: bool = False
  mode: str = "max"
  name: str = "val"
  patience: int = 0
  min_delta: float = 0.0

  def __post_init__(self):
    if not callable(self.fn):
      raise ValueError(f"Validation.fn must be callable, got {self.fn!r}")
    if self.every < 0:
      raise ValueError(f"Validation.every must be >= 0, got {self.every}")
    if self.mode not in ("max", "min"):
      raise ValueError(f"Validation.mode must be 'max' or 'min', got {self.mode!r}")
    if self.patience < 0 or not self.min_delta >= 0:
      raise ValueError(f"Validation.patience and min_delta must be >= 0, got {self.patience}, "
                       f"{self.min_delta}")
    if self.patience and self.patience < self.every:
      raise ValueError(f"Validation.patience ({self.patience}) must be at least every "
                       f"({self.every}): the run is evaluated only every {self.every} updates")


@dataclasses.dataclass(frozen=True)
class Checkpointing:
  """Checkpoints, resume and metrics of :func:`fit` in a work directory.

  Attributes:
    workdir: directory of the checkpoints, ``config.json`` and (without a
      ``Reporting.tracker``) ``metrics/``; rerunning with it resumes.
    config: JSON-able description of the run, compared on resume (leave out
      what may change between runs, such as ``num_steps``).
    every: steps between checkpoints (0: ``ceil(num_steps / 10)``); one is
      also written at the end and when ``should_stop`` stops the run.
    keep: checkpoints kept (the latest ones).
  """
  workdir: str
  config: Any = None
  every: int = 0
  keep: int = 3

  def __post_init__(self):
    if not self.workdir:
      raise ValueError(f"Checkpointing.workdir must be a non-empty path, got {self.workdir!r} "
                       "(pass checkpointing=None to run without checkpoints)")
    if self.every < 0:
      raise ValueError(f"Checkpointing.every must be >= 0, got {self.every}")
    if self.keep < 1:
      raise ValueError(f"Checkpointing.keep must be >= 1, got {self.keep}")


@dataclasses.dataclass(frozen=True)
class Reporting:
  """What :func:`fit` reports while it runs.

  Attributes:
    name: prefix of log lines and the progress bar's label.
    log: ``log(line)``, called every ``log_every`` steps, at each evaluation,
      on resume and for skipped updates (None: silent).
    log_every: steps between progress lines (0: none; evaluations are still
      logged).
    progress: show a tqdm progress bar.
    tracker: a :class:`dennl_jax.tracking.Tracker` for the metrics (default
      with :class:`Checkpointing`: one writing to ``workdir/metrics``).
  """
  name: str = "train"
  log: Optional[Callable[[str], None]] = None
  log_every: int = 0
  progress: bool = False
  tracker: Any = None

  def __post_init__(self):
    if self.log_every < 0:
      raise ValueError(f"Reporting.log_every must be >= 0, got {self.log_every}")


def epoch_batches(key, num_examples: int, batch_size: int) -> Callable[[int], np.ndarray]:
  """``i -> (batch_size,)`` int64 indices of step ``i``'s minibatch.

  Epoch ``e`` is the permutation ``jax.random.permutation(fold_in(key, e),
  num_examples)`` cut into ``num_examples // batch_size`` batches (the
  remainder is not used in that epoch): a pure function of ``(key, i)``.
  ``batch_size`` is capped at ``num_examples``.
  """
  if num_examples < 1 or batch_size < 1:
    raise ValueError(f"num_examples and batch_size must be positive, got {num_examples}, "
                     f"{batch_size}")
  batch_size = min(batch_size, num_examples)
  per_epoch = num_examples // batch_size
  current = {}     # the permutation of the epoch in use: one draw per epoch

  def indices(i: int) -> np.ndarray:
    epoch, pos = divmod(int(i), per_epoch)
    if epoch not in current:
      current.clear()
      current[epoch] = np.asarray(
          jax.random.permutation(jax.random.fold_in(key, epoch), num_examples))
    return current[epoch][pos * batch_size:(pos + 1) * batch_size]

  return indices


def _better(mode: str) -> Callable[[float, float], bool]:
  if mode == "max":
    return lambda new, old: new > old
  if mode == "min":
    return lambda new, old: new < old
  raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")


def _placement(mesh):
  """(place state, place batch): identity without a mesh."""
  if mesh is None:
    return (lambda tree: tree), (lambda tree: tree)
  return (lambda tree: sharding.replicate(tree, mesh)), (
      lambda tree: sharding.shard_users(tree, mesh))


class _LineProgress:
  """Progress without tqdm (an optional dependency): a line on stderr at every
  tenth of the run, with the same ``update``/``set_postfix``/``close`` calls."""

  def __init__(self, total: int, initial: int, name: str):
    self._total, self._done, self._name = total, initial, name
    self._every, self._postfix = max(1, math.ceil(total / 10)), ""

  def update(self, n: int):
    self._done += n
    if self._done % self._every == 0 or self._done == self._total:
      print(f"{self._name}: {self._done}/{self._total} {self._postfix}", file=sys.stderr,
            flush=True)

  def set_postfix(self, refresh: bool = False, **values):
    del refresh
    self._postfix = " ".join(f"{k}={v}" for k, v in values.items())

  def close(self):
    pass


def _progress_bar(progress: bool, total: int, initial: int, name: str):
  """A tqdm bar where tqdm is installed, progress lines where it is not."""
  if not progress:
    return None
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return _LineProgress(total, initial, name)
  return tqdm(total=total, initial=initial, desc=name, dynamic_ncols=True, leave=False)


def fit(step_fn: Callable, state, opt_state, *, num_steps: int,
        batch_at: Callable[[int], Any], key, validation: Optional[Validation] = None,
        checkpointing: Optional[Checkpointing] = None, reporting: Reporting = Reporting(),
        mesh=None, should_stop: Optional[Callable[[int, float], bool]] = None) -> FitResult:
  """Run ``step_fn`` from ``state``/``opt_state`` to ``num_steps`` steps.

  Args:
    step_fn: jitted ``(state, opt_state, batch, key) -> (state, opt_state,
      loss, skipped)``.
    state, opt_state: pytrees (e.g. ``nnx.split(model)[1]`` and
      ``optimizer.init(state)``); not modified.
    num_steps: total steps of the run (a resumed run continues to it; a
      larger value than a finished checkpoint's continues that run; 0 runs
      only the start evaluation).
    batch_at: ``i -> batch``, a pure function of ``i``.
    key: step ``i`` gets ``fold_in(key, i)``.
    validation: a :class:`Validation` (None: no evaluation; the final state
      is also the best).
    checkpointing: a :class:`Checkpointing`: checkpoints, config and metrics
      in its workdir (resume by rerunning); None: nothing written.
    reporting: a :class:`Reporting`: log lines, progress bar, tracker.
    mesh: see the module docstring.
    should_stop: ``(updates done, loss) -> bool``; True checkpoints (with
      ``checkpointing``) and returns early, as a preempted job would.

  Returns:
    :class:`FitResult`.
  """
  if num_steps < 0:
    raise ValueError(f"num_steps must be >= 0, got {num_steps}")
  reporting = Reporting() if reporting is None else reporting
  for arg, value, cls in (("validation", validation, Validation),
                          ("checkpointing", checkpointing, Checkpointing),
                          ("reporting", reporting, Reporting)):
    if value is not None and not isinstance(value, cls):
      raise TypeError(f"{arg} must be a dennl_jax.loop.{cls.__name__}, got {value!r}")
  eval_fn, eval_every, eval_at_start, mode, eval_name, patience, min_delta = (
      (validation.fn, validation.every, validation.at_start, validation.mode, validation.name,
       validation.patience, validation.min_delta)
      if validation is not None else (None, 0, False, "max", "val", 0, 0.0))
  workdir, config, save_every, keep = (
      (checkpointing.workdir, checkpointing.config, checkpointing.every, checkpointing.keep)
      if checkpointing is not None else (None, None, 0, 3))
  name, log, log_every, progress, tracker = (reporting.name, reporting.log, reporting.log_every,
                                             reporting.progress, reporting.tracker)
  better = _better(mode)
  place_state, place_batch = _placement(mesh)
  state, opt_state = place_state(state), place_state(opt_state)
  best_value = -math.inf if mode == "max" else math.inf
  best_step, best_state = 0, state
  # For patience: the value and updates done at the last significant improvement.
  mark_value, mark_step = best_value, 0
  losses, seconds, skips, curve = [], [], [], []
  start_step, elapsed_before = 0, 0.0
  checkpointer = own_tracker = None
  if workdir:
    checkpointer = checkpoint.Checkpointer(workdir, config=config, keep=keep)
    trees = {"state": state, "opt_state": opt_state}
    if eval_fn is not None:
      trees["best_state"] = state
    try:
      restored = checkpointer.restore(trees)
    except Exception:
      checkpointer.close()
      raise
    if restored is not None:
      start_step, trees, meta = restored
      state, opt_state = place_state(trees["state"]), place_state(trees["opt_state"])
      best_state = place_state(trees["best_state"]) if eval_fn is not None else state
      best_value, best_step = meta["best_value"], meta["best_step"]
      mark_value, mark_step = meta.get("mark_value", best_value), meta.get("mark_step", best_step)
      losses, seconds, skips = meta["loss"], meta["seconds"], meta["skipped"]
      curve = [tuple(c) for c in meta["curve"]]
      elapsed_before = seconds[-1] if seconds else 0.0
      if log:
        log(f"[{name}] resumed from the checkpoint at step {start_step} in {workdir}")
    if tracker is None:
      tracker = own_tracker = tracking.Tracker(os.path.join(workdir, "metrics"),
                                               start_step=start_step)
  if eval_fn is None:
    best_value = math.nan
  start = time.time() - elapsed_before

  def evaluate(done: int, loss: float):
    nonlocal best_value, best_step, best_state, mark_value, mark_step
    value = float(eval_fn(state))
    curve.append((done, loss, value))
    if better(value, best_value):
      best_value, best_step, best_state = value, done, state
    # -inf/inf marks (nothing seen yet) compare as improved by any finite value.
    if better(value, mark_value) and not abs(value - mark_value) <= min_delta:
      mark_value, mark_step = value, done
    if tracker is not None:
      tracker.scalars(done, {eval_name: value})
    if log:
      at = "0 (start)" if done == 0 else f"{done}/{num_steps} loss {loss:.4f}"
      log(f"[{name}] step {at} {eval_name} {value:.4f} ({time.time() - start:.0f}s)")

  if eval_fn is not None and eval_at_start and start_step == 0:
    evaluate(0, math.nan)

  def save(done: int):
    trees = {"state": state, "opt_state": opt_state}
    if eval_fn is not None:
      trees["best_state"] = best_state
    checkpointer.save(done, trees, dict(
        best_value=best_value, best_step=best_step, loss=losses, seconds=seconds,
        skipped=skips, curve=[list(c) for c in curve], mark_value=mark_value,
        mark_step=mark_step))

  def out_of_patience(done: int) -> bool:
    return bool(patience) and done - mark_step >= patience

  save_every = save_every or max(1, math.ceil(num_steps / 10))
  bar = _progress_bar(progress, num_steps, start_step, name)
  # A run resumed after its patience ran out stays stopped.
  stopped_early = start_step < num_steps and bool(curve) and out_of_patience(curve[-1][0])
  try:
    for i in range(start_step, num_steps if not stopped_early else start_step):
      state, opt_state, loss, skip = step_fn(state, opt_state, place_batch(batch_at(i)),
                                             jax.random.fold_in(key, i))
      loss, done = float(loss), i + 1
      losses.append(loss)
      skips.append(bool(skip))
      seconds.append(time.time() - start)
      if tracker is not None:
        tracker.scalars(done, {"loss": loss, "skipped": float(sum(skips))})
      if log and log_every and (i % log_every == 0 or done == num_steps):
        log(f"[{name}] step {i:5d}/{num_steps}  loss {loss: .4f}  elapsed {seconds[-1]:7.1f}s"
            f"  skipped {sum(skips)}")
      if eval_fn is not None and ((eval_every and done % eval_every == 0) or done == num_steps):
        evaluate(done, loss)
        stopped_early = done < num_steps and out_of_patience(done)
        if stopped_early and log:
          log(f"[{name}] early stop at step {done}: no {eval_name} improvement over "
              f"{min_delta:g} in {done - mark_step} updates (best {best_value:.4f} at "
              f"{best_step})")
      if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
      stop = stopped_early or (should_stop is not None and should_stop(done, loss))
      if checkpointer is not None and (done % save_every == 0 or done == num_steps or stop):
        save(done)
        if tracker is not None:
          tracker.flush()   # metrics up to a checkpoint survive a kill, like the checkpoint
      if stop:
        break
  finally:
    if bar is not None:
      bar.close()
    if checkpointer is not None:
      checkpointer.close()
    if own_tracker is not None:
      own_tracker.close()
    elif tracker is not None:
      tracker.flush()
  skipped = int(sum(skips))
  if log and skipped:
    log(f"[{name}] WARNING: {skipped} of {len(skips)} updates skipped "
        "(non-finite loss or gradient)")
  history = History(np.arange(len(losses)), np.asarray(losses, np.float64),
                    np.asarray(seconds, np.float64), np.asarray(skips, bool))
  return FitResult(state, opt_state, best_state if eval_fn is not None else state,
                   best_value, best_step, history, curve, skipped, time.time() - start,
                   start_step, stopped_early)
