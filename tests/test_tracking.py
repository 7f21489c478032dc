"""Run tracking: JSONL and TensorBoard event contents, and clean curves after a resume."""
import glob
import os
import struct

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from dennl_jax import loop, tracking
from test_loop import _batch_at, _init, step

pytestmark = pytest.mark.usefixtures("float32_default")


def read_events(logdir):
  """{tag: [(step, value), ...]} as TensorBoard shows them, from every event file in logdir
  (TFRecord framing: u64 length, u32 crc, payload, u32 crc)."""
  out = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.session_log.status == event_pb2.SessionLog.START:
        # what TensorBoard does with a purge_step: forget later points of earlier files
        out = {tag: [(s, v) for s, v in pts if s < event.step] for tag, pts in out.items()}
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_tracker_writes_jsonl_and_events(tmp_path):
  logdir = str(tmp_path / "m")
  with tracking.Tracker(logdir) as t:
    t.scalars(1, {"loss": 2.5, "val": float("nan")})
    t.scalars(2, {"loss": 1.5})
  assert tracking.read_jsonl(os.path.join(logdir, "metrics.jsonl")) == [
      {"step": 1, "loss": 2.5, "val": None}, {"step": 2, "loss": 1.5}]
  events = read_events(logdir)
  assert events["loss"] == [(1, 2.5), (2, 1.5)]
  assert events["val"][0][0] == 1 and np.isnan(events["val"][0][1])


def test_torn_last_jsonl_line_is_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
  assert tracking.read_jsonl(str(path)) == [{"step": 1, "loss": 1.0}]


def test_fit_with_a_workdir_tracks_every_step_and_resumes_without_duplicates(tmp_path):
  workdir = str(tmp_path / "run")

  def run(**kw):
    state, opt_state = _init()
    return loop.fit(step, state, opt_state, num_steps=6, batch_at=_batch_at(jax.random.key(1)),
                    key=jax.random.key(2),
                    validation=loop.Validation(lambda s: float(s["b"]), every=3, name="val_b"),
                    checkpointing=loop.Checkpointing(workdir, every=2), **kw)

  def crash(done, loss):
    if done == 5:
      raise RuntimeError("killed")
    return False

  # Dies after step 5 was tracked; the last checkpoint is at 4, so step 5 is redone.
  with pytest.raises(RuntimeError, match="killed"):
    run(should_stop=crash)
  assert len(tracking.read_jsonl(os.path.join(workdir, "metrics", "metrics.jsonl"))) == 6
  result = run()
  assert result.start_step == 4
  records = tracking.read_jsonl(os.path.join(workdir, "metrics", "metrics.jsonl"))
  losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
  assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([v for _, v in losses], result.history.loss, rtol=1e-6)
  assert [(r["step"], r["val_b"]) for r in records if "val_b" in r] == [
      (c[0], c[2]) for c in result.curve]
  events = read_events(os.path.join(workdir, "metrics"))
  # TensorBoard drops the stale points itself (purge_step); every step is present.
  assert [s for s, _ in events["loss"]] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([v for _, v in events["loss"]], result.history.loss, rtol=1e-6)
  assert [s for s, _ in events["val_b"]] == [3, 6]
