"""Event logs -> strength sequences: hand-made logs, a loop oracle, splits, bad input."""
from __future__ import annotations

import collections
import copy

import numpy as np
import pytest

from dennl_jax.recsys import events as ev
from dennl_jax.recsys import step_report

D = ev.SECONDS_PER_DAY


def catalogue(features=True):
  return ev.make_catalogue(["a", "b", "c"], [[1, 0, 0], [0.5, 0.5, 0], [0, 0, 1]], ["X", "Y", "idle"],
                           np.arange(6.0).reshape(3, 2) if features else None)


def small_log():
  # u1: day 0 (a, b), day 3 (c x3); u2: day 1 (c, a with value 0).  Rows not in time order.
  return ev.make_event_log(["u1", "u2", "u1", "u1", "u2"], [3 * D + 5, D, 10, 20, D + 7],
                           ["c", "c", "a", "b", "a"], catalogue(), [3, 1, 1, 1, 0])


def test_day_unit_known_sequences():
  s = ev.to_sequences(small_log(), unit="day")
  assert list(s.user_ids) == ["u1", "u2"] and s.category_names == ("X", "Y", "idle")
  np.testing.assert_allclose(s.strengths[0, :2], [[0.75, 0.25, 0], [0, 0, 1]])
  np.testing.assert_allclose(s.strengths[1], [[0, 0, 1], [0, 0, 0]])
  np.testing.assert_array_equal(s.mask, [[True, True], [True, False]])
  np.testing.assert_array_equal(s.lengths, [2, 1])
  np.testing.assert_array_equal(s.step_time, [[0, 3 * D], [D, -1]])
  np.testing.assert_array_equal(s.event_user, [0, 1, 0, 0, 1])
  np.testing.assert_array_equal(s.event_step, [1, 0, 0, 0, 0])
  assert s.strengths.dtype == np.float32


def test_idle_days_become_idle_steps():
  s = ev.to_sequences(small_log(), unit="day", idle_category="idle")
  np.testing.assert_array_equal(s.lengths, [4, 1])
  np.testing.assert_allclose(s.strengths[0], [[0.75, 0.25, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]])
  np.testing.assert_array_equal(s.step_time[0], [0, D, 2 * D, 3 * D])
  np.testing.assert_array_equal(s.event_step, [3, 0, 0, 0, 0])
  assert s.report["idle_steps"] == 2
  with pytest.raises(ValueError, match="unit='day'"):
    ev.to_sequences(small_log(), unit="events", idle_category="idle")
  with pytest.raises(ValueError, match="not a category"):
    ev.to_sequences(small_log(), idle_category="nope")


def test_event_blocks_and_ties_keep_row_order():
  cat = catalogue()
  # Three events of u at the same second: rows 0, 1, 2 in order; then one later.
  log = ev.make_event_log([7, 7, 7, 7], [50, 50, 50, 40], ["a", "c", "b", "c"], cat)
  s = ev.to_sequences(log, unit="events", events_per_step=2)
  # Sorted: row 3 (t=40), row 0, row 1, row 2 -> blocks {3, 0}, {1, 2}.
  np.testing.assert_array_equal(s.event_step, [0, 1, 1, 0])
  np.testing.assert_allclose(s.strengths[0], [[0.5, 0, 0.5], [0.25, 0.25, 0.5]])
  np.testing.assert_array_equal(s.step_time[0], [40, 50])
  s3 = ev.to_sequences(log, unit="events", events_per_step=3)   # last block is partial
  np.testing.assert_array_equal(s3.lengths, [2])
  np.testing.assert_allclose(s3.strengths[0, 1], [0.5, 0.5, 0])


def test_max_steps_keeps_the_last_steps():
  s = ev.to_sequences(small_log(), unit="day", idle_category="idle", max_steps=2)
  np.testing.assert_array_equal(s.lengths, [2, 1])
  np.testing.assert_allclose(s.strengths[0], [[0, 0, 1], [0, 0, 1]])
  np.testing.assert_array_equal(s.step_time[0], [2 * D, 3 * D])
  np.testing.assert_array_equal(s.event_step, [1, 0, -1, -1, 0])
  assert s.report["cut_steps"] == 2 and s.report["cut_events"] == 2 and s.report["cut_users"] == 1


def oracle(log, unit, n, max_steps):
  """Per-user Python loops over the events: the straightforward definition."""
  users = sorted(set(log.user.tolist()))
  seqs, times, steps = [], [], {}
  for u in users:
    rows = sorted(np.flatnonzero(log.user == u), key=lambda r: (log.timestamp[r], r))
    groups = collections.OrderedDict()
    for j, r in enumerate(rows):
      k = log.timestamp[r] // D if unit == "day" else j // n
      groups.setdefault(k, []).append(r)
    groups = list(groups.values())[-max_steps:] if max_steps else list(groups.values())
    vecs, ts = [], []
    for i, g in enumerate(groups):
      v = sum(log.value[r] * log.catalogue.categories[log.item_index[r]] for r in g)
      if v.sum() == 0:
        v = sum(log.catalogue.categories[log.item_index[r]] for r in g)
      vecs.append(v / v.sum())
      ts.append(log.timestamp[g[0]] // D * D if unit == "day" else log.timestamp[g[0]])
      steps.update({r: i for r in g})
    seqs.append(vecs)
    times.append(ts)
  return users, seqs, times, steps


@pytest.mark.parametrize("unit,n,max_steps", [("day", 1, None), ("events", 1, None), ("events", 3, None),
                                              ("day", 1, 2), ("events", 4, 1)])
def test_matches_loop_oracle_on_random_logs(unit, n, max_steps):
  rng = np.random.default_rng(0)
  cat = ev.make_catalogue(np.arange(6), rng.dirichlet(np.ones(4) * 0.3, 6), list("pqrs"))
  num = 200
  log = ev.make_event_log(rng.integers(0, 9, num), rng.integers(0, 6, num) * D // 2 + rng.integers(0, 3, num),
                          rng.integers(0, 6, num), cat, rng.choice([0.0, 1.0, 3.0], num))
  s = ev.to_sequences(log, unit=unit, events_per_step=n, max_steps=max_steps)
  users, seqs, times, steps = oracle(log, unit, n, max_steps)
  np.testing.assert_array_equal(s.user_ids, users)
  assert s.strengths.shape[1] == max(len(q) for q in seqs)
  for u, (vecs, ts) in enumerate(zip(seqs, times)):
    assert s.lengths[u] == len(vecs)
    np.testing.assert_allclose(s.strengths[u, :len(vecs)], vecs, atol=1e-6)
    np.testing.assert_array_equal(s.step_time[u, :len(ts)], ts)
    assert np.all(s.strengths[u, len(vecs):] == 0) and np.all(s.step_time[u, len(ts):] == -1)
  np.testing.assert_array_equal(s.event_step, [steps.get(r, -1) for r in range(num)])
  np.testing.assert_allclose(s.strengths.sum(-1)[s.mask], 1.0, atol=1e-6)
  assert np.all(s.mask == (np.arange(s.mask.shape[1]) < s.lengths[:, None]))


def test_time_split_roles_and_report():
  cat = catalogue()
  # Users with 1, 2, 3 and 5 steps (one event per step).
  user = np.repeat([0, 1, 2, 3], [1, 2, 3, 5])
  log = ev.make_event_log(user, np.arange(user.size), ["a"] * user.size, cat)
  s = ev.to_sequences(log, unit="events", events_per_step=1)
  sp = ev.time_split(s)
  np.testing.assert_array_equal(sp.test_step, [0, 1, 2, 4])
  np.testing.assert_array_equal(sp.val_step, [-1, 0, 1, 3])
  np.testing.assert_array_equal(sp.train_mask.sum(1), [0, 0, 1, 3])
  assert not np.any(sp.train_mask & ~s.mask)
  assert sp.report == dict(users=4, with_test=4, with_val=3, with_train=2, too_short=2,
                           length_1=1, length_2=1, idle_between=0)
  train = ev.training_events(log, s, sp)
  np.testing.assert_array_equal(train, s.event_step < sp.val_step[s.event_user])
  with_val = ev.training_events(log, s, sp, include="train+val")
  np.testing.assert_array_equal(with_val, s.event_step < sp.test_step[s.event_user])
  with pytest.raises(ValueError, match="include"):
    ev.training_events(log, s, sp, include="all")
  with pytest.raises(ValueError, match="left-aligned"):
    ev.time_split(s._replace(mask=s.mask[:, ::-1]))


@pytest.mark.parametrize("idle_category", [None, "idle"])
def test_extra_padding_changes_neither_split_nor_training_events(idle_category):
  log = small_log()
  s = ev.to_sequences(log, unit="day", idle_category=idle_category)
  extra = 3
  pad = lambda x, v: np.concatenate([x, np.full(x.shape[:1] + (extra,) + x.shape[2:], v, x.dtype)], 1)
  padded = s._replace(strengths=pad(s.strengths, 0), mask=pad(s.mask, False),
                      step_time=pad(s.step_time, -1), idle=pad(s.idle, False))
  a, b = ev.time_split(s), ev.time_split(padded)
  np.testing.assert_array_equal(a.test_step, b.test_step)
  np.testing.assert_array_equal(a.val_step, b.val_step)
  np.testing.assert_array_equal(a.train_mask, b.train_mask[:, :-extra])
  assert not b.train_mask[:, -extra:].any() and a.report == b.report
  np.testing.assert_array_equal(ev.training_events(log, s, a), ev.training_events(log, padded, b))


def test_time_split_with_idle_days_validates_on_an_active_day():
  s = ev.to_sequences(small_log(), unit="day", idle_category="idle")
  np.testing.assert_array_equal(s.idle, [[False, True, True, False], [False, False, False, False]])
  sp = ev.time_split(s)
  # u1: days 0 (active), 1-2 (idle), 3 (active): val = day 0, test = day 3, no training step.
  np.testing.assert_array_equal(sp.test_step, [3, 0])
  np.testing.assert_array_equal(sp.val_step, [0, -1])
  assert not sp.train_mask.any()
  assert sp.report["idle_between"] == 2 and sp.report["with_val"] == 1 and sp.report["too_short"] == 2
  assert not ev.to_sequences(small_log()).idle.any()


def test_training_events_never_leak_cut_val_or_test_events():
  s = ev.to_sequences(small_log(), unit="day", idle_category="idle", max_steps=3)
  sp = ev.time_split(s)
  keep = ev.training_events(small_log(), s, sp, include="train+val")
  # u1 keeps days 1..3 (day 0's events are cut); day 3 = test; u2 has only a test step.
  np.testing.assert_array_equal(keep, [False] * 5)
  with pytest.raises(ValueError, match="seqs must come from this log"):
    ev.training_events(ev.make_event_log(["u"], [0], ["a"], catalogue()), s, sp)


def test_inputs_are_not_modified_and_are_copied():
  user, ts, item, value = np.array([2, 1]), np.array([5, 6]), np.array(["a", "b"]), np.array([1.0, 2.0])
  cats = np.array([[1.0, 0, 0], [0, 0.5, 0.5], [0, 0, 1]])
  cat = ev.make_catalogue(np.array(["a", "b", "c"]), cats, ["X", "Y", "Z"])
  before = [copy.deepcopy(a) for a in (user, ts, item, value, cats)]
  log = ev.make_event_log(user, ts, item, cat, value)
  ev.time_split(ev.to_sequences(log))
  for a, b in zip((user, ts, item, value, cats), before):
    np.testing.assert_array_equal(a, b)
  user[0], cats[0, 0] = 99, 7.0
  assert log.user[0] == 2 and cat.categories[0, 0] == 1.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(user=[]), "empty"),
    (dict(timestamp=[0.5, 1]), "timestamp: row 0 is not a whole number"),
    (dict(value=[1, -1]), "value: row 1 is negative"),
    (dict(value=[1, np.nan]), "value: row 1 is NaN"),
    (dict(item=["a", "zz"]), "item: row 1 has item 'zz' not in the catalogue"),
    (dict(item=[1, 2]), "catalogue ids"),
    (dict(timestamp=[1, 2, 3]), "timestamp must have shape"),
    (dict(user=[1.5, 2.5]), "integers or strings"),
])
def test_bad_event_log_raises(kwargs, match):
  args = dict(user=["u", "v"], timestamp=[0, 1], item=["a", "b"], value=None)
  args.update(kwargs)
  if "user" in kwargs and not kwargs["user"]:
    args.update(timestamp=[], item=[])
  with pytest.raises(ValueError, match=match):
    ev.make_event_log(args["user"], args["timestamp"], args["item"], catalogue(), args["value"])


@pytest.mark.parametrize("cats,match", [
    ([[1, 0], [0.5, 0.4]], "categories: row 1 does not sum to 1"),
    ([[1.5, -0.5], [0, 1]], "categories: row 0 has a negative weight"),
    ([[1, 0]], "shape"),
])
def test_bad_catalogue_raises(cats, match):
  with pytest.raises(ValueError, match=match):
    ev.make_catalogue(["a", "b"], cats, ["X", "Y"])
  with pytest.raises(ValueError, match="appears 2 times"):
    ev.make_catalogue(["a", "a"], [[1, 0], [0, 1]], ["X", "Y"])


@pytest.mark.parametrize("kwargs,match", [(dict(unit="week"), "unit"),
                                          (dict(unit="events", events_per_step=0), "events_per_step"),
                                          (dict(max_steps=0), "max_steps")])
def test_bad_sequence_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ev.to_sequences(small_log(), **kwargs)


def write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


ITEMS = "item,categories,price,new\nsofa,Furniture,0.2,1\nlamp,Furniture:0.25|Light:0.75,0.7,0\n"


def test_read_event_log_round_trip(tmp_path):
  events = write(tmp_path, "e.csv", "user,timestamp,item,value,extra\n"
                 "1,2018-01-02T10:00:00Z,sofa,1,x\n1,1514887200,lamp,3,y\n2,2018-01-05,lamp,1,z\n")
  log = ev.read_event_log(events, write(tmp_path, "i.csv", ITEMS))
  assert log.user.dtype == np.int64 and list(log.item) == ["sofa", "lamp", "lamp"]
  np.testing.assert_array_equal(log.timestamp, [1514887200, 1514887200, 1515110400])
  np.testing.assert_allclose(log.value, [1, 3, 1])
  assert log.catalogue.category_names == ("Furniture", "Light")
  np.testing.assert_allclose(log.catalogue.categories, [[1, 0], [0.25, 0.75]])
  np.testing.assert_allclose(log.catalogue.features, [[0.2, 1], [0.7, 0]])
  s = ev.to_sequences(log)
  np.testing.assert_allclose(s.strengths[0, 0], [(1 + 0.75) / 4, 0.75 * 3 / 4])


@pytest.mark.parametrize("events,items,match", [
    ("user,item\n1,sofa\n", ITEMS, r"missing column\(s\) \['timestamp'\]"),
    ("user,timestamp,item\n1,yesterday,sofa\n", ITEMS, "line 2, column 'timestamp': cannot parse 'yesterday'"),
    ("user,timestamp,item\n1,2018-01-02T10:00+02:00,sofa\n", ITEMS, "line 2, column 'timestamp'"),
    ("user,timestamp,item,value\n1,0,sofa,1\n1,0,sofa,-2\n", ITEMS, "e.csv: value: line 3 is negative"),
    ("user,timestamp,item,value\n1,0,sofa,1\n1,0,sofa,lots\n", ITEMS, "line 3, column 'value'"),
    ("user,timestamp,item\n1,0,chair\n", ITEMS, "item 'chair' not in the catalogue"),
    ("user,timestamp,item\n", ITEMS, "empty"),
    ("user,timestamp,item\n1,0\n", ITEMS, "line 2: 2 fields"),
    ("user,timestamp,item\n1,0,sofa\n", "item,categories\nsofa,A:0.5|B:0.4\n", "line 2, column 'categories'"),
    ("user,timestamp,item\n1,0,sofa\n", "item\nsofa\n", "missing column"),
])
def test_read_event_log_bad_input(tmp_path, events, items, match):
  with pytest.raises(ValueError, match=match):
    ev.read_event_log(write(tmp_path, "e.csv", events), write(tmp_path, "i.csv", items))


def test_read_event_log_encodings_and_long_fields(tmp_path):
  items = write(tmp_path, "i.csv", ITEMS)
  # A UTF-8 byte-order mark (spreadsheets write one) is not part of the first column's name.
  bom = tmp_path / "bom.csv"
  bom.write_bytes(b"\xef\xbb\xbfuser,timestamp,item\n1,0,sofa\n")
  assert list(ev.read_event_log(str(bom), items).item) == ["sofa"]
  # latin-1: the error names the file and the line of the first bad byte.
  latin = tmp_path / "latin.csv"
  latin.write_bytes("user,timestamp,item\n1,0,sofa\n2,0,caf\u00e9\n".encode("latin-1"))
  with pytest.raises(ValueError, match=r"latin.csv line 3: not UTF-8"):
    ev.read_event_log(str(latin), items)
  # A 200 kB field is read (then refused by the catalogue, naming it), not a csv.Error.
  long_item = "x" * 200_000
  with pytest.raises(ValueError, match="not in the catalogue"):
    ev.read_event_log(write(tmp_path, "long.csv", f"user,timestamp,item\n1,0,{long_item}\n"),
                      items)


def test_to_sequences_refuses_overflowing_values_and_non_integer_settings(tmp_path):
  items = write(tmp_path, "i.csv", ITEMS)
  log = ev.read_event_log(write(tmp_path, "e.csv", "user,timestamp,item,value\n"
                                "1,0,sofa,1e308\n1,10,sofa,1e308\n"), items)
  with pytest.raises(ValueError, match="non-finite strength"):
    ev.to_sequences(log)
  ok = ev.read_event_log(write(tmp_path, "ok.csv", "user,timestamp,item\n1,0,sofa\n"), items)
  for bad in (2.0, True, 0):
    with pytest.raises(ValueError, match="max_steps"):
      ev.to_sequences(ok, max_steps=bad)
    with pytest.raises(ValueError, match="events_per_step"):
      ev.to_sequences(ok, unit="events", events_per_step=bad)


def test_read_event_log_missing_file(tmp_path):
  with pytest.raises(ValueError, match="none.csv: file not found"):
    ev.read_event_log(str(tmp_path / "none.csv"), write(tmp_path, "i.csv", ITEMS))


# ------------------------------------------------ whole blocks, sessions, same-second order


def oracle_units(log, unit, n=3, gap=ev.SESSION_GAP, partial="keep"):
  """{row: step} per user by Python loops: sessions split at gaps > gap; blocks of n
  (a trailing partial block dropped when partial == "drop"); rows time then row ordered."""
  steps = {}
  for u in sorted(set(log.user.tolist())):
    rows = sorted(np.flatnonzero(log.user == u), key=lambda r: (log.timestamp[r], r))
    if unit == "session":
      step = 0
      for j, r in enumerate(rows):
        if j and log.timestamp[r] - log.timestamp[rows[j - 1]] > gap:
          step += 1
        steps[r] = step
    else:
      whole = len(rows) // n * n if partial == "drop" else len(rows)
      steps.update({r: j // n for j, r in enumerate(rows[:whole])})
      steps.update({r: ev.DROPPED for r in rows[whole:]})
  return steps


def random_log(seed, num=300):
  rng = np.random.default_rng(seed)
  cat = ev.make_catalogue(np.arange(8), rng.dirichlet(np.ones(4) * 0.3, 8), list("pqrs"))
  # bursts: many events share a second, gaps from 0 s to several hours
  ts = np.cumsum(rng.choice([0, 0, 1, 30, 1_000, 5_000, 20_000], num))
  return ev.make_event_log(rng.integers(0, 7, num), ts, rng.integers(0, 8, num), cat)


@pytest.mark.parametrize("unit,partial", [("session", "keep"), ("events", "drop"), ("events", "keep")])
def test_sessions_and_whole_blocks_match_loop_oracle(unit, partial):
  for seed in range(3):
    log = random_log(seed)
    s = ev.to_sequences(log, unit=unit, events_per_step=3, partial=partial)
    np.testing.assert_array_equal(s.event_step, [oracle_units(log, unit, 3, partial=partial)[r]
                                                 for r in range(log.num_events)])
    np.testing.assert_allclose(s.strengths.sum(-1)[s.mask], 1.0, atol=1e-6)


def test_no_validation_or_test_block_is_partial():
  log = random_log(0, 500)
  s = ev.to_sequences(log, unit="events", events_per_step=4, partial="drop")
  sizes = step_report.step_sizes(s)
  assert np.all(sizes[s.mask] == 4) and not sizes[~s.mask].any()
  sp = ev.time_split(s)
  stats = step_report.step_statistics(log, s, sp)
  assert stats["partial_val_steps"] == stats["partial_test_steps"] == 0
  assert stats["events_per_test_step"]["min"] == stats["events_per_val_step"]["max"] == 4
  # the dropped events are each user's most recent ones: after the test step, in no mask
  dropped = s.event_step == ev.DROPPED
  assert dropped.sum() == s.report["dropped_events"] > 0
  last_kept = np.full(len(s.user_ids), -1)
  np.maximum.at(last_kept, s.event_user[~dropped], log.timestamp[~dropped])
  assert np.all(log.timestamp[dropped] >= last_kept[s.event_user[dropped]])
  assert not np.any(ev.training_events(log, s, sp, include="train+val") & dropped)
  kept = ev.to_sequences(log, unit="events", events_per_step=4, partial="keep")
  assert step_report.step_statistics(log, kept, ev.time_split(kept))["partial_test_steps"] > 0


def test_sessions_split_at_the_gap_and_keep_a_second_together():
  cat = catalogue()
  ts = [0, 100, 100 + 1800, 100 + 1801 + 1800, 100 + 1801 + 1800]
  log = ev.make_event_log([1] * 5, ts, ["a", "b", "c", "a", "c"], cat)
  s = ev.to_sequences(log, unit="session")
  np.testing.assert_array_equal(s.event_step, [0, 0, 0, 1, 1])    # gap 1800 stays, 1801 splits
  np.testing.assert_array_equal(s.step_time[0], [0, 3701])
  s = ev.to_sequences(log, unit="session", session_gap=0)
  np.testing.assert_array_equal(s.event_step, [0, 1, 2, 3, 3])    # one second is one step
  assert s.report["session_gap"] == 0 and s.report["partial"] is None
  with pytest.raises(ValueError, match="session_gap"):
    ev.to_sequences(log, unit="session", session_gap=-1)


@pytest.mark.parametrize("unit", ["events", "session"])
def test_same_second_order_is_not_the_log_order(unit):
  # one user, six films in one second then two later: reversing the rows of the
  # burst must not change any step under tie_order="hash" (nor any session)
  cat = ev.make_catalogue(np.arange(8), np.eye(4)[[0, 0, 0, 1, 1, 1, 2, 3]], list("pqrs"))
  ts = np.array([5] * 6 + [9, 20])
  items = np.arange(8)
  perm = np.r_[np.arange(6)[::-1], 6, 7]
  a = ev.to_sequences(ev.make_event_log([0] * 8, ts, items, cat), unit=unit, events_per_step=4,
                      tie_order="hash")
  b = ev.to_sequences(ev.make_event_log([0] * 8, ts[perm], items[perm], cat), unit=unit,
                      events_per_step=4, tie_order="hash")
  np.testing.assert_array_equal(a.strengths, b.strengths)
  np.testing.assert_array_equal(a.event_step[perm], b.event_step)
  if unit == "events":
    logs = [ev.to_sequences(ev.make_event_log([0] * 8, ts[p], items[p], cat), unit=unit,
                            events_per_step=4, tie_order="log") for p in (np.arange(8), perm)]
    assert not np.array_equal(logs[0].strengths, logs[1].strengths)   # log order decides there
  with pytest.raises(ValueError, match="tie_order"):
    ev.to_sequences(small_log(), unit=unit, tie_order="random")
  with pytest.raises(ValueError, match="partial"):
    ev.to_sequences(small_log(), unit=unit, partial="merge")
