"""MovieLens ml-latest-small as an event log (stands in for the paper's click log).

Reads ``ratings.csv`` (userId, movieId, rating, timestamp) and ``movies.csv``
(movieId, title, genres) from ``data_dir``; the data are never copied into
this repository.  Choices:

* **Events**: one event per rating, value 1 by default -- a rating says the
  user watched (interacted with) the film, the analogue of a click; how much
  they liked it is a different signal.  ``value="rating"`` uses the rating
  (0.5..5) as the weight instead.
* **Categories**: the 18 content genres plus ``(no genres listed)`` (C = 19).
  A film's weight is split equally over its genres (3 genres -> 1/3 each).
  ``IMAX`` is a release format, not a content genre, and never a film's only
  genre, so it gets no category weight (it would take mass from the real
  genres of 158 films); it is kept as an item feature.  ``(no genres
  listed)`` (34 films, 47 ratings) is its own category, so no rating is
  dropped and no genre receives invented mass.
* **Item features** (I, 22) float32: multi-hot over the 19 categories +
  IMAX, the release year parsed from the title ("(1995)", or the first year
  of "(2006-2007)") standardised over films, and an indicator for the 13
  titles without a year (their year is set to the mean, i.e. 0 after
  scaling).

Measured on ml-latest-small: 610 users, 100,836 ratings, 9,742 films; see
BUILD_NOTES.md "Deviations from the paper" (Table 2: MovieLens steps) for
the per-unit step counts and the Table 2 default unit.
"""
from __future__ import annotations

import os
import pathlib
import re

import numpy as np

from dennl_jax.recsys._event_csv import column, as_lines, parse_float, parse_int, read_csv
from dennl_jax.recsys.events import EventLog, make_catalogue, make_event_log

# Relative to the repository root (experiments use it as the --data_dir default).
DEFAULT_DATA_DIR = "../shared/data/movielens-latest-small"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
NO_GENRES = "(no genres listed)"
FORMAT_TAGS = ("IMAX",)
_YEAR = re.compile(r"\((\d{4})(?:\s*[-\u2013]\s*\d{4})?\)\s*$")

__all__ = ["DEFAULT_DATA_DIR", "load_movielens", "resolve_data_dir", "movie_catalogue"]


def resolve_data_dir(data_dir=DEFAULT_DATA_DIR) -> pathlib.Path:
  """``data_dir`` as given, or relative to the repository root; ValueError if absent."""
  path = pathlib.Path(data_dir)
  candidates = [path] if path.is_absolute() else [path, REPO_ROOT / path]
  for c in candidates:
    if c.is_dir():
      return c
  raise ValueError(f"MovieLens directory not found: tried {[str(c.resolve()) for c in candidates]}; "
                   "pass --data_dir=<dir with ratings.csv and movies.csv of ml-latest-small>")


def _file(directory: pathlib.Path, name: str) -> str:
  path = directory / name
  if not path.is_file():
    raise ValueError(f"MovieLens file missing: {path} (expected ratings.csv and movies.csv)")
  return os.fspath(path)


def movie_catalogue(movies_csv):
  """Catalogue of films: categories (genres split equally) and item features."""
  header, body = read_csv(movies_csv, ("movieId", "title", "genres"))
  ids = parse_int(movies_csv, column(header, body, "movieId"), "movieId")
  genres = [g.split("|") for g in column(header, body, "genres").tolist()]
  content = [[x for x in gs if x not in FORMAT_TAGS] for gs in genres]
  empty = [i for i, gs in enumerate(content) if not gs]
  if empty:
    raise ValueError(f"{movies_csv} line {empty[0] + 2}: film has only format tags {genres[empty[0]]}")
  names = sorted({x for gs in content for x in gs})
  col = {n: j for j, n in enumerate(names)}
  rows = np.repeat(np.arange(len(content)), [len(gs) for gs in content])
  cols = np.array([col[x] for gs in content for x in gs], np.int64)
  hot = np.zeros((len(content), len(names)), np.float64)
  hot[rows, cols] = 1.0
  categories = hot / hot.sum(1, keepdims=True)
  fmt = np.array([[t in gs for t in FORMAT_TAGS] for gs in genres], np.float64)
  years = np.array([float(m.group(1)) if (m := _YEAR.search(t)) else np.nan
                    for t in column(header, body, "title").tolist()])
  missing = np.isnan(years)
  known = years[~missing]
  scaled = np.where(missing, 0.0, (years - known.mean()) / max(known.std(), 1e-9))
  features = np.concatenate([hot, fmt, scaled[:, None], missing[:, None]], axis=1)
  return make_catalogue(ids, categories, names, features)


def load_movielens(data_dir=DEFAULT_DATA_DIR, value: str = "one") -> EventLog:
  """EventLog of ml-latest-small: one event per rating (see the module docstring).

  data_dir: directory with ratings.csv and movies.csv (relative paths are
    tried against the working directory, then the repository root).
  value: "one" (every rating weighs 1) or "rating" (weight = the rating).
  """
  if value not in ("one", "rating"):
    raise ValueError(f"value must be 'one' or 'rating', got {value!r}")
  directory = resolve_data_dir(data_dir)
  ratings_csv, movies_csv = _file(directory, "ratings.csv"), _file(directory, "movies.csv")
  catalogue = movie_catalogue(movies_csv)
  header, body = read_csv(ratings_csv, ("userId", "movieId", "rating", "timestamp"))
  if not body:
    raise ValueError(f"{ratings_csv}: event log is empty: no ratings")
  cols = {name: parse_int(ratings_csv, column(header, body, name), name)
          for name in ("userId", "movieId", "timestamp")}
  rating = parse_float(ratings_csv, column(header, body, "rating"), "rating")
  try:
    return make_event_log(cols["userId"], cols["timestamp"], cols["movieId"], catalogue,
                          rating if value == "rating" else None)
  except ValueError as e:
    raise as_lines(ratings_csv, e) from None
