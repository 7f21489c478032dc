r"""Table 1's training and model selection: every trained method's (loss, rate) grid
under one budget rule, selected on the validation users.

:func:`select_and_fit` trains each candidate with early stopping on
:func:`validation_score` (default: the validation users' held-out NLL, no
labels) and keeps the best; :class:`Setting` is what a method sees of one
seed and setting. Used by :mod:`experiments.synthetic_table1` and
:mod:`experiments.spsa_training`.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

import dennl_jax as dj
from dennl_jax import synthetic as S
from experiments import common

LOSSES = {"likelihood": dj.likelihood_loss, "heldout": dj.heldout_step_loss,
          "regression": dj.regression_loss}


class Setting(NamedTuple):
  """What a method sees in one setting (one sequence length / noise level) of one seed."""
  name: str
  config: object          # the run's ConfigDict
  synthetic: S.SyntheticConfig
  # (8, 2) the setting's keys, one per use (fixed, so a method's numbers do not depend
  # on which other methods run): 0 data, 1 pooled start, 2 network initialisation,
  # 3 conventional EM, 4 EM Mapping's per-user EM, 5 training, 6 prediction,
  # 7 validation (held-out steps of the validation users).
  keys: jax.Array
  train: dj.Batch         # training users (embedding, obs, mask)
  test: dj.Batch          # held-out users (scored)
  start: object           # pooled start: one HSMM shared by every method
  codec: dj.ParamCodec
  curves: dict            # method -> {"step": [...], "loss": [...]}, filled by _train
  val: dj.Batch | None = None   # validation users: model selection only
  val_states: jax.Array | None = None   # their true states (accuracy / oracle rows only)
  workdir: str | None = None    # checkpoints + metrics of this seed and setting (--workdir)
  progress: bool = False        # tqdm bars (--progress)
  # Oracle selection (config.oracle_selection): candidate -> (validation accuracy, updates
  # done, model) of its most accurate evaluated state; filled by _train.
  oracle: dict | None = None


def network_rngs(s: Setting) -> nnx.Rngs:
  # Every network method gets the same initialisation seed.
  return nnx.Rngs(int(jax.random.randint(s.keys[2], (), 0, 2**30)))


def _train(s: Setting, method: str, model, loss_fn, data: dj.Batch, num_steps: int,
           learning_rate: float):
  # The rate lives in the optimiser state: one compiled step serves the whole sweep.
  optimizer = dj.make_optimizer(learning_rate, b1=s.config.adam_b1, rate_in_state=True)
  # Early stopping on the validation users (same criterion as the selection).
  early = s.config.eval_every > 0 and s.val is not None
  # CPU seconds of this process (every thread) when each evaluation starts:
  # time-to-accuracy that a shared machine's load does not inflate.
  cpu_start, cpu_at = time.process_time(), []

  # The oracle row follows the same runs: the most accurate state among this
  # process's evaluations (a resumed run's earlier evaluations are not revisited).
  track_oracle = early and s.oracle is not None and s.config.select_by != "accuracy"
  accuracies, most_accurate = [], []

  def evaluate(m):
    cpu_at.append(time.process_time() - cpu_start)
    if track_oracle:
      accuracies.append(validation_accuracy(s, m))
      if not most_accurate or accuracies[-1] > most_accurate[0]:
        most_accurate[:] = [accuracies[-1], len(accuracies) - 1, m]
    return validation_score(s, m)

  trained, history, fit = dj.train(
      model, data, loss_fn=loss_fn, optimizer=optimizer, num_steps=num_steps,
      batch_size=s.config.batch_size, key=s.keys[5], log_every=s.config.log_every,
      log=common.log, name=f"{s.name}/{method}", workdir=common.subdir(s.workdir, method),
      progress=s.progress, eval_fn=evaluate if early else None,
      eval_every=s.config.eval_every if early else 0, mode="min",
      patience=patience_steps(s.config, num_steps) if early else 0,
      min_delta=s.config.min_delta)
  # skipped: updates left out for a non-finite loss or gradient (dj.train's guard).
  s.curves[method] = {"step": history.step.tolist(), "loss": history.loss.tolist(),
                      "seconds": history.seconds.tolist(), "skipped": int(fit.skipped)}
  if most_accurate:
    # This process's evaluations are the last entries of the curve.
    accuracy, index, best_model = most_accurate
    s.oracle[method] = (accuracy, int(fit.curve[len(fit.curve) - len(accuracies) + index][0]),
                        best_model)
  elif track_oracle:
    common.log(f"[{s.name}] {method}: resumed without evaluations here; left out of the "
               "oracle-selection row")
  if early:
    # [updates done, validation score, CPU seconds(, validation accuracy)]; a resumed
    # run's CPU count restarts, so only the evaluations of this process have one.
    cpu = [None] * (len(fit.curve) - len(cpu_at)) + cpu_at
    extra = [None] * (len(fit.curve) - len(accuracies)) + accuracies
    s.curves[method].update(
        best_step=int(fit.best_step), stopped_early=bool(fit.stopped_early),
        steps_run=int(fit.curve[-1][0]),
        validation=[[int(c[0]), float(c[2]), t] + ([a] if track_oracle else [])
                    for c, t, a in zip(fit.curve, cpu, extra)])
  return trained


def patience_steps(config, num_steps: int) -> int:
  """Updates without a significant improvement that stop a run of ``num_steps``
  (``patience_fraction`` of it, at least one evaluation; 0: never stop early)."""
  if not config.patience_fraction:
    return 0
  return max(config.eval_every, int(round(config.patience_fraction * num_steps)))


def validation_score(s: Setting, model) -> float:
  """Model selection's criterion on the validation users (lower is better).

  ``heldout_nll`` (default): NLL per step of 20 % hidden steps given the rest
  (no labels: what a practitioner has); ``accuracy``: minus the labelling
  accuracy (uses the validation users' true states: oracle selection).
  """
  if s.config.select_by == "accuracy":
    return -validation_accuracy(s, model)
  val = s.val
  visible = dj.training.heldout_split(val.mask, s.keys[7])
  params = dj.predict(model, dj.Batch(val.embedding, val.obs, visible), s.keys[7])
  return float(_heldout_nll(params, val.obs, val.mask, visible))


def validation_accuracy(s: Setting, model) -> float:
  """Labelling accuracy of the validation users (needs their true states)."""
  val = s.val
  params = dj.predict(model, val, s.keys[7])
  return float(dj.labelling_accuracy(s.val_states, dj.decode_states(params, val.obs, val.mask),
                                     s.synthetic.num_states, val.mask))


_heldout_nll = jax.jit(dj.training.heldout_nll)


def select_and_fit(s: Setting, method: str, build, losses, data: dj.Batch, num_steps: int):
  """Model selection on validation users: every (loss, learning rate) of the grid
  trained for ``num_steps``, scored by :func:`validation_score`.

  Returns ``{"selected": params of the held-out users, "by_loss": {loss:
  params}, "candidates": [...], "oracle": params or None}``: the best
  candidate overall, the best learning rate within each loss and, with
  ``config.oracle_selection``, the candidate and step most accurate on the
  validation users' true states (the oracle-selection row).  Every trained
  method gets the same grid (EM Mapping has one loss).  With ``eval_every >
  0`` each candidate's training length is chosen too: the step with the best
  validation score (the start included) is kept (early stopping with
  ``config.patience_fraction``, :func:`dennl_jax.train`).
  """
  records, best = [], {}
  for loss in losses:
    for lr in s.config.select_learning_rates:
      name = f"{method}[{loss},lr={lr:g}]"
      model = _train(s, name, build(s, network_rngs(s)), LOSSES[loss], data, num_steps, lr)
      score = validation_score(s, model)
      curve = s.curves.get(name, {})
      records.append({"loss": loss, "learning_rate": lr, "validation": score,
                      "best_step": curve.get("best_step"), "steps_run": curve.get("steps_run"),
                      "stopped_early": curve.get("stopped_early"),
                      "skipped_steps": curve.get("skipped")})
      if s.oracle and name in s.oracle:
        records[-1].update(oracle_accuracy=s.oracle[name][0], oracle_step=s.oracle[name][1])
      common.log(f"[{s.name}] {method} loss={loss} lr={lr:g} validation {score:.4f}")
      score = score if np.isfinite(score) else np.inf      # a non-finite score never wins
      if loss not in best or score < best[loss][0]:
        best[loss] = (score, model, lr)
  # The kept curve is the selected candidate's.
  by_loss = {loss: dj.predict(m, s.test, s.keys[6]) for loss, (_, m, _) in best.items()}
  chosen = min(best, key=lambda loss: best[loss][0])
  for r in records:
    r["selected"] = r["loss"] == chosen and r["learning_rate"] == best[chosen][2]
  # What training adds: the same network before its first update (one draw of the
  # initialisation every candidate starts from).
  untrained = None if build is None else dj.predict(build(s, network_rngs(s)), s.test, s.keys[6])
  oracle = None
  tracked = [r for r in records if "oracle_accuracy" in r]
  if tracked:
    top = max(tracked, key=lambda r: r["oracle_accuracy"])
    oracle = dj.predict(s.oracle[f"{method}[{top['loss']},lr={top['learning_rate']:g}]"][2],
                        s.test, s.keys[6])
  return {"selected": by_loss[chosen], "by_loss": by_loss, "candidates": records,
          "oracle": oracle, "untrained": untrained}
