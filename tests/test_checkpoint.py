"""Checkpoints: exact resume (stopped, and killed in a subprocess), clear errors on mismatch or corruption."""
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dennl_jax import checkpoint, loop
from test_loop import _batch_at, _init, step

pytestmark = pytest.mark.usefixtures("float32_default")

STEPS = 9
CONFIG = {"lr": 0.1, "data": "toy"}


def _eval(state):
  return -float(jnp.sum(state["w"] ** 2))


def _fit(workdir=None, num_steps=STEPS, save_every=0, **kw):
  state, opt_state = _init()
  return loop.fit(step, state, opt_state, num_steps=num_steps,
                  batch_at=_batch_at(jax.random.key(1)), key=jax.random.key(2),
                  validation=loop.Validation(_eval, every=2, at_start=True),
                  checkpointing=(loop.Checkpointing(workdir, config=CONFIG, every=save_every)
                                 if workdir else None), **kw)


def _assert_same(a, b):
  for x, y in zip(jax.tree_util.tree_leaves((a.state, a.opt_state, a.best_state)),
                  jax.tree_util.tree_leaves((b.state, b.opt_state, b.best_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert (a.best_value, a.best_step, a.skipped) == (b.best_value, b.best_step, b.skipped)
  np.testing.assert_array_equal(a.history.loss, b.history.loss)
  np.testing.assert_array_equal(a.history.skipped, b.history.skipped)
  assert np.allclose(a.curve, b.curve, equal_nan=True) and len(a.curve) == len(b.curve)


@pytest.fixture(scope="module")
def uninterrupted():
  return _fit()


def test_stopped_run_resumes_to_the_uninterrupted_parameters(tmp_path, uninterrupted):
  workdir = str(tmp_path / "run")
  part = _fit(workdir, save_every=3, should_stop=lambda done, loss: done == 5)
  assert len(part.history.loss) == 5
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                if d.isdigit()) == [3, 5]                     # periodic + at the stop
  resumed = _fit(workdir, save_every=3)
  assert resumed.start_step == 5
  _assert_same(resumed, uninterrupted)
  again = _fit(workdir)                      # a finished run: rerunning returns it, no step run
  assert again.start_step == STEPS
  _assert_same(again, uninterrupted)
  longer = _fit(workdir, num_steps=STEPS + 2)      # continue a finished run further
  assert longer.start_step == STEPS and len(longer.history.loss) == STEPS + 2


@pytest.mark.slow
def test_killed_subprocess_resumes_to_the_uninterrupted_parameters(tmp_path, uninterrupted):
  workdir = str(tmp_path / "killed")
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  script = textwrap.dedent(f"""
      import os, signal, sys
      sys.path[:0] = [{tests_dir!r}]
      import test_checkpoint as t
      # SIGKILL after the update of step 6: the checkpoint of step 4 is the last one.
      t._fit({workdir!r}, save_every=2,
             should_stop=lambda done, loss: done == 6 and os.kill(os.getpid(), signal.SIGKILL))
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), tests_dir) if p)
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=600)   # seconds on an idle machine; minutes under heavy load
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert checkpoint.Checkpointer(workdir, config=CONFIG).latest_step() == 4
  resumed = _fit(workdir)
  assert resumed.start_step == 4
  _assert_same(resumed, uninterrupted)


def test_another_or_unreadable_config_is_refused(tmp_path):
  workdir = str(tmp_path / "run")
  _fit(workdir, num_steps=2)
  state, opt_state = _init()
  with pytest.raises(checkpoint.CheckpointError, match=r"different config \(lr: 0.1 .* 0.2 now"):
    loop.fit(step, state, opt_state, num_steps=2, batch_at=_batch_at(jax.random.key(1)),
             key=jax.random.key(2),
             checkpointing=loop.Checkpointing(workdir, config=dict(CONFIG, lr=0.2)))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(checkpoint.CheckpointError, match="config.json is corrupt"):
    _fit(workdir, num_steps=4)
  os.remove(os.path.join(workdir, "config.json"))   # deleted: never resume under another config
  with pytest.raises(checkpoint.CheckpointError, match="no config.json"):
    _fit(workdir, num_steps=4)


def test_another_model_structure_is_refused(tmp_path):
  workdir = str(tmp_path / "run")
  _fit(workdir, num_steps=2)
  ckpt = checkpoint.Checkpointer(workdir, config=CONFIG)
  state, opt_state = _init()
  wider = {"w": jnp.zeros(D_WIDE), "b": jnp.zeros(())}
  with pytest.raises(checkpoint.CheckpointError, match=r"different model: leaf .*'w'.* shape \[3\]"):
    ckpt.restore({"state": wider, "opt_state": opt_state, "best_state": wider})
  with pytest.raises(checkpoint.CheckpointError, match="different model: 9 arrays there, 4"):
    ckpt.restore({"state": state, "opt_state": (), "best_state": state})


D_WIDE = 5


def test_a_workdir_orbax_cannot_read_back_is_refused_before_training(tmp_path):
  with pytest.raises(ValueError, match="brackets"):
    checkpoint.Checkpointer(str(tmp_path / "dennl[lr=0.1]"))


def test_corrupt_checkpoint_is_refused(tmp_path):
  workdir = str(tmp_path / "run")
  _fit(workdir, num_steps=2)
  arrays = os.path.join(workdir, "checkpoints", "2", "arrays")
  files = sorted(os.path.join(r, f) for r, _, fs in os.walk(arrays) for f in fs
                 if os.sep + "d" + os.sep in os.path.join(r, f) or r.endswith(os.sep + "d"))
  assert files
  for path in files:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF           # one flipped byte in every data file
    open(path, "wb").write(bytes(data))
  with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
    _fit(workdir, num_steps=4)


def test_cached_chunks_skip_finished_chunks_and_check_inputs(tmp_path):
  calls = []

  @jax.jit
  def fn(chunk, index):
    rows = index * 4 + jnp.arange(chunk.shape[0])
    return {"sum": chunk.sum(1), "key": jax.vmap(jax.random.fold_in, (None, 0))(
        jax.random.key(0), rows)}

  def counted(chunk, index):
    if not isinstance(index, jax.core.Tracer):    # loading traces fn for the output structure
      calls.append(int(index))
    return fn(chunk, index)

  from dennl_jax.chunking import chunked_map
  x = jnp.arange(20.0).reshape(10, 2)
  workdir = str(tmp_path / "em")
  want = chunked_map(fn, x, 4)
  first = chunked_map(checkpoint.cached_chunks(counted, workdir, {"iters": 3}), x, 4)
  again = chunked_map(checkpoint.cached_chunks(counted, workdir, {"iters": 3}), x, 4)
  assert calls == [0, 1, 2]                 # the second pass loaded every chunk
  for out in (first, again):
    np.testing.assert_array_equal(out["sum"], want["sum"])
    np.testing.assert_array_equal(jax.random.key_data(out["key"]), jax.random.key_data(want["key"]))
  with pytest.raises(checkpoint.CheckpointError, match="other inputs"):
    chunked_map(checkpoint.cached_chunks(counted, workdir, {"iters": 3}), x + 1, 4)
  with pytest.raises(checkpoint.CheckpointError, match="different config"):
    checkpoint.cached_chunks(counted, workdir, {"iters": 4})
  with open(os.path.join(workdir, "chunks", "000001.npz"), "wb") as f:
    f.write(b"truncated")
  with pytest.raises(checkpoint.CheckpointError, match="000001.npz is corrupt"):
    chunked_map(checkpoint.cached_chunks(counted, workdir, {"iters": 3}), x, 4)
