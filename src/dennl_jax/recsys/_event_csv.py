"""CSV reader for the event-log format documented in :mod:`dennl_jax.recsys.events`."""
from __future__ import annotations

import csv
import os
import re
import warnings

from typing import NamedTuple, Optional

import numpy as np


def read_csv(path, required: tuple[str, ...]) -> tuple[list[str], list[list[str]]]:
  if not os.path.isfile(path):
    raise ValueError(f"{path}: file not found")
  # utf-8-sig: a leading byte-order mark (spreadsheets write one) is not part of
  # the first column's name.  Fields may be as long as the file.
  limit = max(csv.field_size_limit(), os.path.getsize(path) + 1)
  previous = csv.field_size_limit(limit)
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      rows = []
      reader = csv.reader(f)
      while True:
        try:
          row = next(reader)
        except StopIteration:
          break
        except UnicodeDecodeError:
          raise _not_utf8(path) from None
        except csv.Error as err:
          raise ValueError(f"{path} line {reader.line_num}: {err}") from None
        rows.append(row)
  finally:
    csv.field_size_limit(previous)
  if not rows:
    raise ValueError(f"{path}: empty file (a header row is required)")
  header = [h.strip() for h in rows[0]]
  missing = [c for c in required if c not in header]
  if missing:
    raise ValueError(f"{path}: missing column(s) {missing}; header is {header}")
  body = rows[1:]
  width = np.fromiter(map(len, body), np.int64, len(body))
  bad = np.flatnonzero(width != len(header))
  if bad.size:
    raise ValueError(f"{path} line {bad[0] + 2}: {width[bad[0]]} fields, header has {len(header)}")
  return header, body


def _not_utf8(path) -> ValueError:
  """The error for a file that is not UTF-8, naming the line of its first bad byte."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    data.decode("utf-8")
  except UnicodeDecodeError as err:
    line = data.count(b"\n", 0, err.start) + 1
    return ValueError(f"{path} line {line}: not UTF-8 (byte 0x{data[err.start]:02x}: "
                      f"{err.reason}); save the file as UTF-8")
  return ValueError(f"{path}: not UTF-8; save the file as UTF-8")


def column(header, body, name) -> np.ndarray:
  j = header.index(name)
  return np.char.strip(np.array([r[j] for r in body], dtype=str)) if body else np.array([], str)


def _canonical_int(col: np.ndarray) -> np.ndarray | None:
  """col as int64 when every entry is a canonical integer ("7", "-3"), else None."""
  try:
    ints = col.astype(np.int64)
  except (ValueError, OverflowError):
    return None
  return ints if np.array_equal(ints.astype(str), col) else None


def parse_int(path, col: np.ndarray, name: str) -> np.ndarray:
  ints = _canonical_int(col)
  if ints is None:
    raise _bad_line(path, col, name, lambda v: (int(v), str(int(v)) == v or int("x")))
  return ints


def _bad_line(path, col, name, parse) -> ValueError:
  for i, v in enumerate(col.tolist()):  # error path only: find the first offender
    try:
      parse(v)
    except (ValueError, OverflowError, Warning):
      return ValueError(f"{path} line {i + 2}, column {name!r}: cannot parse {v!r}")
  return ValueError(f"{path}: column {name!r} cannot be parsed")


def _parse_timestamps(path, col: np.ndarray) -> np.ndarray:
  ints = _canonical_int(col)
  if ints is not None:
    return ints
  iso = np.char.rstrip(col, "Z")

  def one(v):
    if v.lstrip("-").isdigit():
      return int(v)
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # numpy warns (and converts) on explicit UTC offsets
      return np.datetime64(v.rstrip("Z"), "s")

  empty = np.flatnonzero(col == "")
  if empty.size:
    raise ValueError(f"{path} line {empty[0] + 2}, column 'timestamp': empty value")
  digits = np.char.isdigit(np.char.lstrip(col, "-"))
  out = np.empty(col.size, np.int64)
  try:
    if np.any(digits):
      out[digits] = col[digits].astype(np.int64)
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      out[~digits] = iso[~digits].astype("datetime64[s]").astype(np.int64)
  except (ValueError, OverflowError, Warning):
    raise _bad_line(path, col, "timestamp", one) from None
  return out


def parse_float(path, col: np.ndarray, name: str) -> np.ndarray:
  try:
    return col.astype(np.float64)
  except ValueError:
    raise _bad_line(path, col, name, float) from None


def _parse_categories(path, col: np.ndarray):
  """(I, C) weights and sorted names from 'A|B' or 'A:0.3|B:0.7' strings."""
  entries = [cell.split("|") for cell in col.tolist()]
  names, weights, rows = [], [], []
  for i, parts in enumerate(entries):  # one loop over catalogue items (not events)
    explicit = any(":" in p for p in parts)
    for p in parts:
      name, _, w = p.rpartition(":") if explicit else (p, "", "")
      name = name.strip()
      if not name:
        raise ValueError(f"{path} line {i + 2}, column 'categories': empty category in {col[i]!r}")
      try:
        w = float(w) if explicit else 1.0 / len(parts)
      except ValueError:
        raise ValueError(f"{path} line {i + 2}, column 'categories': bad weight in {col[i]!r}") from None
      names.append(name)
      weights.append(w)
      rows.append(i)
  uniq, inv = np.unique(np.array(names, dtype=str), return_inverse=True)
  cats = np.zeros((col.size, uniq.size))
  np.add.at(cats, (np.array(rows, np.int64), inv.reshape(-1)), np.array(weights))
  bad = np.flatnonzero(np.any(cats < 0, axis=1) | (np.abs(cats.sum(1) - 1.0) > 1e-5))
  if bad.size:
    raise ValueError(f"{path} line {bad[0] + 2}, column 'categories': weights {col[bad[0]]!r} "
                     "must be >= 0 and sum to 1")
  return cats, tuple(uniq.tolist())


def as_lines(path, error: ValueError) -> ValueError:
  """The array validator's "row i" as the file's "line i + 2" (after the header)."""
  msg = re.sub(r"\brow (\d+)", lambda m: f"line {int(m.group(1)) + 2}", str(error))
  return ValueError(f"{path}: {msg.replace('such rows', 'such lines')}")


class ParsedEventFiles(NamedTuple):
  """The columns of the two CSV files, parsed and checked cell by cell."""
  item_ids: np.ndarray
  categories: np.ndarray
  category_names: tuple
  features: Optional[np.ndarray]
  user: np.ndarray
  timestamp: np.ndarray
  item: np.ndarray
  value: Optional[np.ndarray]


def parse_event_files(events_csv, items_csv) -> ParsedEventFiles:
  """The columns of the format in :mod:`dennl_jax.recsys.events`; errors name file and line."""
  ih, ib = read_csv(items_csv, ("item", "categories"))
  if not ib:
    raise ValueError(f"{items_csv}: no items")
  eh, eb = read_csv(events_csv, ("user", "timestamp", "item"))
  if not eb:
    raise ValueError(f"{events_csv}: event log is empty: no events")
  cat_items, ev_items = column(ih, ib, "item"), column(eh, eb, "item")
  both = _canonical_int(np.concatenate([cat_items, ev_items]))
  if both is not None:
    cat_items, ev_items = both[:cat_items.size], both[cat_items.size:]
  users = column(eh, eb, "user")
  users = users if _canonical_int(users) is None else _canonical_int(users)
  cats, names = _parse_categories(items_csv, column(ih, ib, "categories"))
  feature_cols = [h for h in ih if h not in ("item", "categories")]
  features = (np.stack([parse_float(items_csv, column(ih, ib, h), h) for h in feature_cols], 1)
              if feature_cols else None)
  timestamps = _parse_timestamps(events_csv, column(eh, eb, "timestamp"))
  value = parse_float(events_csv, column(eh, eb, "value"), "value") if "value" in eh else None
  return ParsedEventFiles(cat_items, cats, names, features, users, timestamps, ev_items, value)
