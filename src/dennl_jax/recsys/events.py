"""Event logs -> per-user sequences of category-strength vectors (paper A.2).

An **event log** is what a platform records: one row per interaction
``(user, timestamp, item, value)``.  A **catalogue** says which categories
each item belongs to, as weights that sum to 1 per item (a film with three
genres gives each 1/3), plus optional item features (for GraphSAGE).

:func:`to_sequences` aggregates each user's events into steps -- a calendar
day (UTC; the paper), a block of ``n`` consecutive events, or a session (a
new step after an inactivity gap) -- and gives each step the strength vector ``s_c = sum over the step's events of value *
weight(item, c)``, normalised to sum to 1 (paper A.2: "strength ... based on
the number of clicks/purchases ... normalised to 1").  :func:`time_split`
assigns the last valid step of every user to test, the second-last to
validation and the rest to training; :func:`training_events` is the leakage
guard (which events of the log lie in training steps).

CSV format (:func:`read_event_log`), UTF-8, header row required, extra
columns of the events file are ignored::

  events.csv   user,timestamp,item[,value]
               u1,2018-01-03T10:15:00Z,sofa-17,1
               u1,1514974500,lamp-2,3
  items.csv    item,categories[,<feature columns>...]
               sofa-17,Furniture,0.2,1
               lamp-2,Furniture:0.5|Accessories:0.5,0.7,0

* ``user``, ``item``: ids; read as integers when every id of the column (for
  items: of both files) is a canonical integer, else as strings.
* ``timestamp``: integer unix seconds, or ISO 8601 date/datetime in UTC
  (optional trailing ``Z``; explicit offsets are rejected).
* ``value`` (optional, default 1): the event's weight, finite and >= 0 (e.g.
  click 1, purchase 3).
* ``categories``: ``|``-separated category names, split equally (``A|B`` =
  1/2 each), or explicit ``name:weight`` pairs that must sum to 1.  Category
  order = sorted names.
* Every further column of items.csv is a numeric item feature, in file order.

Bad input
raises ``ValueError`` naming the file, line/row and column.  Nothing here
modifies its inputs; arrays are copied.  Host-side numpy only.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from dennl_jax.recsys._event_csv import as_lines, parse_event_files

SECONDS_PER_DAY = 86_400
SESSION_GAP = 1_800      # seconds of inactivity that end a session (30 min, see to_sequences)
DROPPED = -2             # event_step of the events of a dropped trailing partial block
UNITS = ("day", "events", "session")
_TOL = 1e-5

__all__ = ["Catalogue", "EventLog", "Sequences", "TimeSplit", "make_catalogue", "make_event_log",
           "read_event_log", "to_sequences", "time_split", "training_events",
           "SECONDS_PER_DAY", "SESSION_GAP", "DROPPED", "UNITS"]


def _ids(name: str, x) -> np.ndarray:
  """A copied 1-D id array of integers or strings."""
  x = np.array(x, copy=True)
  if x.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
  if x.size == 0:
    return x.astype(np.int64)  # np.array([]) is float; emptiness is reported by the caller
  if x.dtype.kind == "O":
    kinds = {type(v) for v in x.tolist()}
    if all(issubclass(k, (int, np.integer)) for k in kinds):
      x = x.astype(np.int64)
    elif all(issubclass(k, str) for k in kinds):
      x = x.astype(str)
    else:
      raise ValueError(f"{name} mixes id types {sorted(k.__name__ for k in kinds)}; use all "
                       "integers or all strings")
  if x.dtype.kind in "iu":
    return x.astype(np.int64)
  if x.dtype.kind in "US":
    return x.astype(str)
  raise ValueError(f"{name} ids must be integers or strings, got dtype {x.dtype}")


def _first_bad(name: str, bad: np.ndarray, what: str, unit: str = "row") -> None:
  if np.any(bad):
    i = np.flatnonzero(bad)
    raise ValueError(f"{name}: {unit} {i[0]} {what} ({i.size} such {unit}s)")


@dataclasses.dataclass(frozen=True, eq=False)
class Catalogue:
  """Items and their categories.

  item_ids: (I,) unique ids (int or str).
  categories: (I, C) float64 >= 0, each row sums to 1 (the item's weight
    split over categories).
  category_names: (C,) unique str.
  features: (I, F) float32 item features, or None.
  Validated and copied on construction.
  """
  item_ids: np.ndarray
  categories: np.ndarray
  category_names: tuple
  features: np.ndarray | None = None

  def __post_init__(self):
    ids = _ids("item_ids", self.item_ids)
    if ids.size == 0:
      raise ValueError("catalogue is empty: no items")
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if np.any(counts > 1):
      raise ValueError(f"item_ids: item {uniq[counts > 1][0].item()!r} appears {counts[counts > 1][0]} times")
    cats = np.array(self.categories, dtype=np.float64, copy=True)
    names = tuple(str(n) for n in self.category_names)
    if cats.shape != (ids.size, len(names)):
      raise ValueError(f"categories must have shape (I, C) = ({ids.size}, {len(names)}), got {cats.shape}")
    if len(set(names)) != len(names):
      raise ValueError(f"category_names are not unique: {names}")
    _first_bad("categories", ~np.all(np.isfinite(cats), axis=1), "has NaN or inf")
    _first_bad("categories", np.any(cats < 0, axis=1), "has a negative weight")
    _first_bad("categories", np.abs(cats.sum(1) - 1.0) > _TOL, "does not sum to 1")
    feats = self.features
    if feats is not None:
      feats = np.array(feats, dtype=np.float32, copy=True)
      if feats.ndim != 2 or feats.shape[0] != ids.size:
        raise ValueError(f"features must have shape (I, F) with I = {ids.size}, got {feats.shape}")
      _first_bad("features", ~np.all(np.isfinite(feats), axis=1), "has NaN or inf")
    for field, v in (("item_ids", ids), ("categories", cats), ("category_names", names),
                     ("features", feats)):
      object.__setattr__(self, field, v)

  def index(self, items, name: str = "item") -> np.ndarray:
    """(N,) int row of each item id in this catalogue; ValueError for unknown ids."""
    items = _ids(name, items)
    if (items.dtype.kind == "i") != (self.item_ids.dtype.kind == "i"):
      raise ValueError(f"{name} ids are {items.dtype} but catalogue ids are {self.item_ids.dtype}")
    order = np.argsort(self.item_ids, kind="stable")
    pos = np.minimum(np.searchsorted(self.item_ids[order], items), order.size - 1)
    bad = self.item_ids[order][pos] != items
    if np.any(bad):
      i = np.flatnonzero(bad)
      raise ValueError(f"{name}: row {i[0]} has item {items[i[0]].item()!r} not in the catalogue "
                       f"({i.size} such rows)")
    return order[pos]


def make_catalogue(item_ids, categories, category_names, features=None) -> Catalogue:
  """A validated, copied :class:`Catalogue`."""
  return Catalogue(item_ids, categories, tuple(category_names), features)


def _timestamps(x) -> np.ndarray:
  x = np.array(x, copy=True)
  if x.dtype.kind == "M":
    bad = np.isnat(x)
    _first_bad("timestamp", bad, "is NaT")
    return x.astype("datetime64[s]").astype(np.int64)
  if x.dtype.kind in "iu":
    return x.astype(np.int64)
  if x.dtype.kind == "f":
    _first_bad("timestamp", ~np.isfinite(x) | (x != np.round(x)), "is not a whole number of seconds")
    return x.astype(np.int64)
  raise ValueError(f"timestamp must be int unix seconds or datetime64, got dtype {x.dtype}")


@dataclasses.dataclass(frozen=True, eq=False)
class EventLog:
  """N interaction events; validated and copied on construction.

  user: (N,) user ids (int or str).  timestamp: (N,) int64 unix seconds, UTC.
  item: (N,) item ids, all in ``catalogue.item_ids``.  value: (N,) float64,
  finite, >= 0 (click 1, purchase 3, ...).  catalogue: :class:`Catalogue`.
  ``item_index`` (N,) int is each event's catalogue row (derived).
  """
  user: np.ndarray
  timestamp: np.ndarray
  item: np.ndarray
  value: np.ndarray
  catalogue: Catalogue
  item_index: np.ndarray = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    if not isinstance(self.catalogue, Catalogue):
      raise ValueError(f"catalogue must be a Catalogue, got {type(self.catalogue).__name__}")
    user = _ids("user", self.user)
    n = user.size
    if n == 0:
      raise ValueError("event log is empty: no events")
    ts = _timestamps(self.timestamp)
    item = _ids("item", self.item)
    value = np.array(np.ones(n) if self.value is None else self.value, dtype=np.float64, copy=True)
    for name, arr in (("timestamp", ts), ("item", item), ("value", value)):
      if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) like user, got {arr.shape}")
    _first_bad("value", ~np.isfinite(value), "is NaN or inf")
    _first_bad("value", value < 0, "is negative")
    index = self.catalogue.index(item)
    for field, v in (("user", user), ("timestamp", ts), ("item", item), ("value", value),
                     ("item_index", index)):
      object.__setattr__(self, field, v)

  @property
  def num_events(self) -> int:
    return int(self.user.size)


def make_event_log(user, timestamp, item, catalogue, value=None) -> EventLog:
  """A validated, copied :class:`EventLog` (value defaults to ones)."""
  return EventLog(user, timestamp, item, value, catalogue)


class Sequences(NamedTuple):
  """Per-user strength sequences (padding at the end of each row).

  strengths: (U, T, C) float32; valid steps sum to 1, zeros on padding.
  mask: (U, T) bool valid steps, left-aligned.
  step_time: (U, T) int64 start of the step (day start in unix seconds for
    unit="day", first event's timestamp for unit="events"); -1 on padding.
  lengths: (U,) int64 valid steps per user.
  user_ids: (U,) original user ids, sorted; user index u <-> user_ids[u].
  category_names: (C,) str.
  event_user: (N,) int64 user index of every event of the log.
  event_step: (N,) int64 step of every event within its user's sequence;
    -1 for events cut by ``max_steps`` (they precede the first kept step),
    ``DROPPED`` (-2) for the events of a dropped trailing partial block
    (they follow the last step; ``partial="drop"``).
  idle: (U, T) bool steps that are event-free days filled with
    ``idle_category`` (all False without it).
  report: dict of counts (unit, users, events, steps, idle_steps, cut_steps,
    cut_events, cut_users, dropped_events, dropped_users, users_without_steps)
    and the arguments.
  """
  strengths: np.ndarray
  mask: np.ndarray
  step_time: np.ndarray
  lengths: np.ndarray
  user_ids: np.ndarray
  category_names: tuple
  event_user: np.ndarray
  event_step: np.ndarray
  idle: np.ndarray
  report: dict


def _is_positive_int(value) -> bool:
  return (isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
          and value >= 1)


def to_sequences(log: EventLog, unit: str = "day", events_per_step: int = 10,
                 max_steps: int | None = None, idle_category: str | None = None, *,
                 session_gap: int = SESSION_GAP, partial: str = "keep",
                 tie_order: str = "log") -> Sequences:
  """Aggregate ``log`` into per-user strength sequences.

  unit="day": one step per calendar day (UTC) with events.  With
    ``idle_category`` (a name in the catalogue), every day between a user's
    first and last active day without events is a step with all mass on that
    category (the paper's "no action" sub-category).
  unit="events": steps are blocks of ``events_per_step`` consecutive events of
    the user, ordered by timestamp, then by ``tie_order`` among events of the
    same second.  ``partial="keep"``: the last block may hold fewer events;
    ``partial="drop"``: a trailing block with fewer than ``events_per_step``
    events is dropped (its events get ``event_step = DROPPED`` and lie after
    every step), so every step -- validation and test included -- is whole.
  unit="session": a new step starts when more than ``session_gap`` seconds
    pass since the user's previous event (default 30 min, the usual
    inactivity gap of session-based recommendation); events of one second are
    always in one step, whatever their order in the log.
  tie_order (events of one user at the same second): "log" keeps the log's
    row order; "hash" orders them by a fixed hash of (user, item), which
    carries nothing of the log's row order (MovieLens writes a user's
    same-second ratings in movieId order).  Only block boundaries depend on it.
  max_steps: keep each user's last ``max_steps`` steps; the cut events get
    ``event_step = -1`` and are counted in ``report``.

  A step whose events all have value 0 gets the unweighted (value 1)
  strengths of its events, so every valid step sums to 1.
  Returns :class:`Sequences` with U users (sorted ids) and T = longest kept
  sequence; users whose every event was dropped have no valid step.
  """
  if not isinstance(log, EventLog):
    raise ValueError(f"log must be an EventLog, got {type(log).__name__}")
  if unit not in UNITS:
    raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
  if unit == "events" and not _is_positive_int(events_per_step):
    raise ValueError(f"events_per_step must be an integer >= 1, got {events_per_step!r}")
  if unit == "session" and (not isinstance(session_gap, (int, np.integer)) or session_gap < 0):
    raise ValueError(f"session_gap must be an integer >= 0 (seconds), got {session_gap!r}")
  if partial not in ("keep", "drop"):
    raise ValueError(f"partial must be 'keep' or 'drop', got {partial!r}")
  if tie_order not in ("log", "hash"):
    raise ValueError(f"tie_order must be 'log' or 'hash', got {tie_order!r}")
  if max_steps is not None and not _is_positive_int(max_steps):
    raise ValueError(f"max_steps must be None or an integer >= 1, got {max_steps!r}")
  names = log.catalogue.category_names
  if idle_category is not None:
    if unit != "day":
      raise ValueError("idle_category needs unit='day' (idle steps are calendar days)")
    if idle_category not in names:
      raise ValueError(f"idle_category {idle_category!r} is not a category of the catalogue {names}")

  n = log.num_events
  user_ids, event_user = np.unique(log.user, return_inverse=True)
  event_user = event_user.reshape(-1).astype(np.int64)
  num_users = user_ids.size
  ties = np.arange(n) if tie_order == "log" else _tie_hash(event_user, log.item_index)
  order = np.lexsort((np.arange(n), ties, log.timestamp, event_user))
  su, ts = event_user[order], log.timestamp[order]
  user_start = np.searchsorted(su, np.arange(num_users))          # first sorted row of each user
  new_user = np.r_[True, su[1:] != su[:-1]]
  if unit == "day":
    day = np.floor_divide(ts, SECONDS_PER_DAY)
    if idle_category is not None:
      step = day - day[user_start][su]
    else:
      new_step = new_user | np.r_[True, day[1:] != day[:-1]]
      step = np.cumsum(new_step) - 1
      step = step - step[user_start][su]
  elif unit == "session":
    new_step = new_user | (np.r_[0, np.diff(ts)] > session_gap)
    step = np.cumsum(new_step) - 1
    step = step - step[user_start][su]
  else:
    position = np.arange(n) - user_start[su]
    step = position // int(events_per_step)
  dropped = np.zeros(n, bool)
  if partial == "drop" and unit == "events":
    whole = np.bincount(su, minlength=num_users) // int(events_per_step) * int(events_per_step)
    dropped = position >= whole[su]
  lengths = np.zeros(num_users, np.int64)
  np.maximum.at(lengths, su[~dropped], step[~dropped] + 1)
  if lengths.max(initial=0) == 0:
    raise ValueError(f"no step left: every user has fewer than {events_per_step} events "
                     "and partial='drop'" if partial == "drop" and unit == "events"
                     else "no step left: the event log has no event")

  cut = np.zeros(num_users, np.int64) if max_steps is None else np.maximum(lengths - max_steps, 0)
  step = step - cut[su]
  lengths = lengths - cut
  sorted_step = step
  event_step = np.empty(n, np.int64)
  event_step[order] = np.where(dropped, DROPPED, np.where(sorted_step >= 0, sorted_step, -1))

  num_steps = int(lengths.max())
  num_cats = len(names)
  keep = (sorted_step >= 0) & ~dropped
  flat = su[keep] * num_steps + sorted_step[keep]
  rows = log.item_index[order][keep]
  weights = log.value[order][keep]
  cats = log.catalogue.categories
  totals = np.bincount(flat, weights=weights, minlength=num_users * num_steps)
  # All-zero-valued steps fall back to counting events, so they still sum to 1.
  weights = np.where(totals[flat] > 0, weights, 1.0)
  strengths = np.zeros((num_users * num_steps, num_cats), np.float64)
  for c in np.flatnonzero(cats.any(axis=0)):  # loop over categories, not events
    strengths[:, c] = np.bincount(flat, weights=weights * cats[rows, c], minlength=num_users * num_steps)
  strengths = strengths.reshape(num_users, num_steps, num_cats)
  overflow = ~np.isfinite(strengths).all(-1)
  if overflow.any():
    u, s = np.argwhere(overflow)[0]
    raise ValueError(f"the event values of user {user_ids[u]!r}, step {s} (after cuts) sum to a "
                     "non-finite strength; rescale the 'value' column")

  t = np.arange(num_steps)
  mask = t[None, :] < lengths[:, None]
  occupied = strengths.sum(-1) > 0
  idle = mask & ~occupied
  if idle_category is not None:
    strengths[idle, names.index(idle_category)] = 1.0
  totals = strengths.sum(-1, keepdims=True)
  strengths = np.divide(strengths, totals, out=np.zeros_like(strengths), where=totals > 0)

  step_time = np.full(num_users * num_steps, -1, np.int64)
  block, first = np.unique(flat, return_index=True)   # flat is sorted: first = earliest event
  if unit == "day" and idle_category is not None:
    day0 = np.floor_divide(ts[user_start], SECONDS_PER_DAY) + cut
    step_time = np.where(mask, (day0[:, None] + t[None, :]) * SECONDS_PER_DAY, -1)
  else:
    start = ts[keep][first]
    step_time[block] = start - np.mod(start, SECONDS_PER_DAY) if unit == "day" else start
    step_time = step_time.reshape(num_users, num_steps)

  report = dict(unit=unit, events_per_step=int(events_per_step) if unit == "events" else None,
                session_gap=int(session_gap) if unit == "session" else None,
                partial=partial if unit == "events" else None,
                tie_order=tie_order if unit == "events" else None,
                users=int(num_users), events=int(n), steps=int(lengths.sum()),
                idle_steps=int(idle.sum()) if idle_category is not None else 0,
                cut_steps=int(cut.sum()), cut_events=int(((sorted_step < 0) & ~dropped).sum()),
                cut_users=int((cut > 0).sum()), dropped_events=int(dropped.sum()),
                dropped_users=int(np.unique(su[dropped]).size),
                users_without_steps=int((lengths == 0).sum()),
                max_steps=max_steps, idle_category=idle_category)
  return Sequences(strengths.astype(np.float32), mask, step_time, lengths, user_ids, names,
                   event_user, event_step, idle if idle_category is not None else np.zeros_like(mask),
                   report)


def _tie_hash(user: np.ndarray, item: np.ndarray) -> np.ndarray:
  """(N,) uint64 splitmix64 hash of (user index, item row): an order for same-second events
  that is fixed, reproducible and unrelated to the rows' order in the log."""
  with np.errstate(over="ignore"):
    x = (user.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
         + item.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9) + np.uint64(0x94D049BB133111EB))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class TimeSplit(NamedTuple):
  """Per-user chronological split of the valid steps.

  test_step: (U,) int64 last valid step, -1 if none.
  val_step: (U,) int64 second-last valid step, -1 if fewer than 2 steps.
    With idle days (``seqs.idle``), the last *non-idle* step before the test
    step, so validation and test targets are both days with events (the
    test step always is one: a user's window ends at their last event);
    idle days between the two are history for the test target only.
  train_mask: (U, T) bool valid steps strictly before val_step (none when
    there is no val step).
  report: dict users, with_test, with_val, with_train (>= 1 training step),
    too_short (users lacking at least one role), length_1, length_2,
    idle_between (idle steps between val and test steps, all users).
  """
  test_step: np.ndarray
  val_step: np.ndarray
  train_mask: np.ndarray
  report: dict


def time_split(seqs: Sequences) -> TimeSplit:
  """Last valid step = test, second-last = validation, earlier = training."""
  mask = np.asarray(seqs.mask, bool)
  if mask.ndim != 2:
    raise ValueError(f"seqs.mask must be (U, T), got shape {mask.shape}")
  lengths = mask.sum(1).astype(np.int64)
  if not np.array_equal(mask, np.arange(mask.shape[1])[None, :] < lengths[:, None]):
    raise ValueError("seqs.mask must be left-aligned (valid steps first, padding at the end)")
  t = np.arange(mask.shape[1])[None, :]
  test = np.where(lengths >= 1, lengths - 1, -1)
  idle = np.asarray(seqs.idle, bool)
  if idle.shape != mask.shape:
    raise ValueError(f"seqs.idle has shape {idle.shape}, expected the mask's {mask.shape}")
  candidate = mask & ~idle & (t < test[:, None])
  val = np.where(candidate.any(1), mask.shape[1] - 1 - np.argmax(candidate[:, ::-1], axis=1), -1)
  train = mask & (t < val[:, None])
  num_train = train.sum(1)
  report = dict(users=int(lengths.size), with_test=int((test >= 0).sum()),
                with_val=int((val >= 0).sum()), with_train=int((num_train >= 1).sum()),
                too_short=int(((test < 0) | (val < 0) | (num_train < 1)).sum()),
                length_1=int((lengths == 1).sum()), length_2=int((lengths == 2).sum()),
                idle_between=int(np.where(val >= 0, test - val - 1, 0).sum()))
  return TimeSplit(test, val, train, report)


def training_events(log: EventLog, seqs: Sequences, split: TimeSplit,
                    include: str = "train") -> np.ndarray:
  """(N,) bool: events of ``log`` that lie in training steps (leakage guard).

  include="train": training steps only; "train+val": also validation steps.
  Test-step events and events cut by ``max_steps`` are never included.
  """
  if include not in ("train", "train+val"):
    raise ValueError(f"include must be 'train' or 'train+val', got {include!r}")
  eu, es = np.asarray(seqs.event_user), np.asarray(seqs.event_step)
  if eu.shape != (log.num_events,):
    raise ValueError(f"seqs has {eu.shape[0]} events but the log has {log.num_events}; "
                     "seqs must come from this log")
  train_mask = np.asarray(split.train_mask, bool)
  if train_mask.shape != np.asarray(seqs.mask).shape:
    raise ValueError(f"split.train_mask {train_mask.shape} does not match seqs.mask "
                     f"{np.asarray(seqs.mask).shape}")
  ok = es >= 0
  es_safe = np.where(ok, es, 0)
  keep = ok & train_mask[eu, es_safe]
  if include == "train+val":
    keep |= ok & (es == np.asarray(split.val_step)[eu])
  return keep


def read_event_log(events_csv, items_csv) -> EventLog:
  """EventLog from the two CSV files of the format above; errors name the file and line."""
  parsed = parse_event_files(events_csv, items_csv)
  try:
    catalogue = make_catalogue(parsed.item_ids, parsed.categories, parsed.category_names,
                               parsed.features)
  except ValueError as e:
    raise as_lines(items_csv, e) from None
  try:
    return make_event_log(parsed.user, parsed.timestamp, parsed.item, catalogue, parsed.value)
  except ValueError as e:
    raise as_lines(events_csv, e) from None
