"""The generic training loop: batch schedule, best-state selection, skipped updates, resume."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dennl_jax import loop

pytestmark = pytest.mark.usefixtures("float32_default")

N, D, B = 12, 3, 4
OPT = optax.adam(0.1)


def _data():
  x = jax.random.normal(jax.random.key(0), (N, D))
  return x, x @ jnp.array([1.0, -2.0, 0.5]) + 0.3


@jax.jit
def step(state, opt_state, batch, key):
  """Least squares plus a key-dependent jitter of the target (so keys matter)."""
  x, y = batch

  def loss(s):
    noisy = y + 0.01 * jax.random.normal(key, y.shape)
    return jnp.mean((x @ s["w"] + s["b"] - noisy) ** 2)

  value, grads = jax.value_and_grad(loss)(state)
  updates, opt_state = OPT.update(grads, opt_state, state)
  return optax.apply_updates(state, updates), opt_state, value, ~jnp.isfinite(value)


def _init():
  state = {"w": jnp.zeros(D), "b": jnp.zeros(())}
  return state, OPT.init(state)


def _batch_at(key):
  x, y = _data()
  indices = loop.epoch_batches(key, N, B)
  return lambda i: (x[indices(i)], y[indices(i)])


def test_epoch_batches_are_permutations_and_a_pure_function_of_the_step():
  key = jax.random.key(3)
  first = loop.epoch_batches(key, N, 5)     # 2 batches per epoch, 2 users left out
  seen = np.concatenate([first(0), first(1)])
  assert len(set(seen.tolist())) == 10
  np.testing.assert_array_equal(
      seen, np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), N))[:10])
  later = [first(i) for i in (7, 2, 3)]
  fresh = loop.epoch_batches(key, N, 5)    # no history: same batches in any order of calls
  for i, want in zip((7, 2, 3), later):
    np.testing.assert_array_equal(fresh(i), want)
  assert not np.array_equal(first(2), first(0))     # a new permutation per epoch
  assert loop.epoch_batches(key, 3, 10)(0).size == 3   # batch capped at the data
  with pytest.raises(ValueError, match="positive"):
    loop.epoch_batches(key, 0, 2)


def _fit(**kw):
  state, opt_state = _init()
  kw.setdefault("num_steps", 9)
  return loop.fit(step, state, opt_state, batch_at=_batch_at(jax.random.key(1)),
                  key=jax.random.key(2), **kw)


def test_fit_equals_a_hand_written_loop():
  result = _fit()
  state, opt_state = _init()
  batch_at = _batch_at(jax.random.key(1))
  losses = []
  for i in range(9):
    state, opt_state, loss, _ = step(state, opt_state, batch_at(i),
                                     jax.random.fold_in(jax.random.key(2), i))
    losses.append(float(loss))
  for a, b in zip(jax.tree_util.tree_leaves(result.state), jax.tree_util.tree_leaves(state)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(result.history.loss, losses)
  np.testing.assert_array_equal(result.history.step, np.arange(9))
  assert result.skipped == 0 and math.isnan(result.best_value) and result.start_step == 0


@pytest.mark.parametrize("mode,values,best_step", [
    ("max", [0.1, 0.5, 0.3, 0.5], 3),       # ties keep the earlier state
    ("min", [0.4, 0.3, 0.2, 0.9], 6),
    ("max", [0.9, 0.1, 0.2, 0.3], 0),       # nothing beats the start
])
def test_best_state_on_a_hand_made_curve(mode, values, best_step):
  evaluated = []

  def eval_fn(state):
    evaluated.append(state)
    return values[len(evaluated) - 1]

  lines = []
  result = _fit(validation=loop.Validation(eval_fn, every=3, at_start=True, mode=mode),
                reporting=loop.Reporting(log=lines.append))
  assert [c[0] for c in result.curve] == [0, 3, 6, 9]
  assert [c[2] for c in result.curve] == values
  assert math.isnan(result.curve[0][1]) and result.curve[1][1] == result.history.loss[2]
  assert result.best_step == best_step and result.best_value == values[best_step // 3]
  assert result.best_state is evaluated[best_step // 3]
  assert result.state is evaluated[-1]
  assert any("(start)" in line for line in lines)


def test_zero_steps_only_evaluate_the_start():
  result = _fit(num_steps=0, validation=loop.Validation(lambda s: 0.5, at_start=True))
  assert result.curve[0][0] == 0 and result.curve[0][2] == 0.5 and len(result.curve) == 1
  assert result.history.loss.size == 0 and result.best_step == 0
  assert result.state is result.best_state


def test_without_eval_at_start_the_last_step_is_always_evaluated():
  result = _fit(num_steps=7, validation=loop.Validation(lambda s: float(s["b"]), every=3,
                                                        mode="max"))
  assert [c[0] for c in result.curve] == [3, 6, 7]


def test_skipped_updates_are_counted_and_reported():
  def nan_step(state, opt_state, batch, key):
    new, new_opt, loss, _ = step(state, opt_state, batch, key)
    bad = jax.random.bernoulli(key, 0.5)
    return (jax.tree_util.tree_map(lambda a, b: jnp.where(bad, b, a), new, state),
            new_opt, jnp.where(bad, jnp.nan, loss), bad)

  lines = []
  state, opt_state = _init()
  result = loop.fit(nan_step, state, opt_state, num_steps=9, batch_at=_batch_at(jax.random.key(1)),
                    key=jax.random.key(2), reporting=loop.Reporting(log=lines.append))
  assert result.skipped == int(result.history.skipped.sum()) > 0
  assert np.isnan(result.history.loss[result.history.skipped]).all()
  assert any("WARNING" in line and f"{result.skipped} of 9" in line for line in lines)


def test_bad_arguments():
  with pytest.raises(ValueError, match="num_steps"):
    _fit(num_steps=-1)
  with pytest.raises(TypeError, match="validation must be a dennl_jax.loop.Validation"):
    _fit(validation=lambda s: 0.5)


@pytest.mark.parametrize("build,match", [
    (lambda: loop.Validation(lambda s: 0.0, mode="best"), "Validation.mode must be 'max' or 'min'"),
    (lambda: loop.Validation(lambda s: 0.0, every=-1), "Validation.every must be >= 0"),
    (lambda: loop.Validation(0.5), "Validation.fn must be callable"),
    (lambda: loop.Checkpointing("run", every=-1), "Checkpointing.every must be >= 0"),
    (lambda: loop.Checkpointing("run", keep=0), "Checkpointing.keep must be >= 1"),
    (lambda: loop.Checkpointing(""), "Checkpointing.workdir must be a non-empty path"),
    (lambda: loop.Reporting(log_every=-1), "Reporting.log_every must be >= 0"),
])
def test_option_groups_check_their_fields(build, match):
  with pytest.raises(ValueError, match=match):
    build()


def test_option_groups_are_frozen_with_the_old_defaults():
  v, c, r = loop.Validation(len), loop.Checkpointing("run"), loop.Reporting()
  assert (v.every, v.at_start, v.mode, v.name) == (0, False, "max", "val")
  assert (c.config, c.every, c.keep) == (None, 0, 3)
  assert (r.name, r.log, r.log_every, r.progress, r.tracker) == ("train", None, 0, False, None)
  with pytest.raises(dataclasses.FrozenInstanceError):
    v.every = 3


@pytest.mark.parametrize("values,min_delta,stop_at,best_step", [
    # Improves until update 4, then flat: patience 6 stops at the first evaluation >= 4 + 6.
    ([1.0, 0.9, 0.8, 0.85, 0.81, 0.82, 0.83, 0.8, 0.7], 0.0, 10, 4),
    # Improvements of 0.001 are below min_delta: they keep the best state but do not
    # reset patience (last significant improvement at update 2).
    ([1.0, 0.9, 0.899, 0.898, 0.897, 0.5, 0.4, 0.3, 0.2], 0.01, 8, 8),
    # Never runs out: the budget ends the run.
    ([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2], 0.0, None, 16),
])
def test_patience_stops_after_no_significant_improvement(values, min_delta, stop_at, best_step):
  evaluated = []

  def eval_fn(state):
    evaluated.append(state)
    return values[len(evaluated) - 1]

  lines = []
  result = _fit(num_steps=16, validation=loop.Validation(
      eval_fn, every=2, at_start=True, mode="min", patience=6, min_delta=min_delta),
      reporting=loop.Reporting(log=lines.append))
  done = [c[0] for c in result.curve]
  assert result.stopped_early == (stop_at is not None)
  assert done[-1] == (stop_at if stop_at is not None else 16)
  assert result.history.loss.size == done[-1]
  if stop_at is not None:
    assert best_step == result.best_step
    assert any("early stop at step" in line for line in lines)
  else:
    assert result.best_step == 16


def test_patience_checks_its_fields():
  with pytest.raises(ValueError, match="patience and min_delta must be >= 0"):
    loop.Validation(len, patience=-1)
  with pytest.raises(ValueError, match="patience and min_delta must be >= 0"):
    loop.Validation(len, min_delta=float("nan"))
  with pytest.raises(ValueError, match="must be at least every"):
    loop.Validation(len, every=10, patience=5)


def test_a_run_stopped_by_patience_stays_stopped_on_resume(tmp_path):
  values = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.9] + [0.1] * 20)
  validation = loop.Validation(lambda s: next(values), every=2, at_start=True, mode="min",
                               patience=4)
  checkpointing = loop.Checkpointing(str(tmp_path / "run"))
  first = _fit(num_steps=16, validation=validation, checkpointing=checkpointing)
  assert first.stopped_early and first.curve[-1][0] == 6 and first.best_step == 2
  again = _fit(num_steps=16, validation=validation, checkpointing=checkpointing)
  assert again.start_step == 6 and again.stopped_early and again.history.loss.size == 6
  assert again.best_step == 2 and len(again.curve) == len(first.curve)
