"""MovieLens loader: a tiny hand-made copy always; the real ml-latest-small when present."""
from __future__ import annotations

import numpy as np
import pytest

from dennl_jax.recsys import events as ev
from dennl_jax.recsys import movielens as ml

MOVIES = """movieId,title,genres
1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy
2,"Matrix, The (1999)",Action|Sci-Fi|IMAX
3,Some Documentary,(no genres listed)
4,Series (2006\u20132007),Drama
"""
RATINGS = """userId,movieId,rating,timestamp
1,1,4.0,964982703
1,2,5.0,964982703
1,3,2.5,965082703
2,4,3.0,1000000000
"""


@pytest.fixture
def tiny_dir(tmp_path):
  (tmp_path / "movies.csv").write_text(MOVIES, encoding="utf-8")
  (tmp_path / "ratings.csv").write_text(RATINGS)
  return tmp_path


def test_tiny_copy_categories_features_and_values(tiny_dir):
  log = ml.load_movielens(tiny_dir)
  cat = log.catalogue
  assert "IMAX" not in cat.category_names and ml.NO_GENRES in cat.category_names
  row = dict(zip(cat.category_names, cat.categories[1]))
  assert row["Action"] == row["Sci-Fi"] == 0.5
  np.testing.assert_allclose(cat.categories[0][cat.categories[0] > 0], [0.2] * 5)
  assert cat.categories[2, cat.category_names.index(ml.NO_GENRES)] == 1.0
  num_cats = len(cat.category_names)
  feats = cat.features
  assert feats.shape == (4, num_cats + 1 + 2)
  np.testing.assert_array_equal(feats[:, num_cats], [0, 1, 0, 0])          # IMAX bit
  np.testing.assert_array_equal(feats[:, -1], [0, 0, 1, 0])                 # year missing
  years = np.array([1995, 1999, 2006])
  np.testing.assert_allclose(feats[[0, 1, 3], -2], (years - years.mean()) / years.std(), atol=1e-6)
  assert feats[2, -2] == 0.0
  np.testing.assert_array_equal(log.value, 1.0)
  np.testing.assert_array_equal(ml.load_movielens(tiny_dir, value="rating").value, [4, 5, 2.5, 3])
  s = ev.to_sequences(log, unit="day")
  np.testing.assert_array_equal(s.lengths, [2, 1])


def test_missing_directory_and_files_are_clear_errors(tmp_path, tiny_dir):
  with pytest.raises(ValueError, match="MovieLens directory not found"):
    ml.load_movielens(tmp_path / "nowhere")
  (tiny_dir / "movies.csv").unlink()
  with pytest.raises(ValueError, match="MovieLens file missing: .*movies.csv"):
    ml.load_movielens(tiny_dir)
  with pytest.raises(ValueError, match="value"):
    ml.load_movielens(tiny_dir, value="stars")


def test_bad_rows_name_the_line(tiny_dir):
  (tiny_dir / "ratings.csv").write_text(RATINGS + "3,99,4.0,1000000001\n")
  with pytest.raises(ValueError, match="ratings.csv: item: line 6 has item 99 not in the catalogue"):
    ml.load_movielens(tiny_dir)
  (tiny_dir / "ratings.csv").write_text(RATINGS + "3,1,4.0,soon\n")
  with pytest.raises(ValueError, match="ratings.csv line 6, column 'timestamp'"):
    ml.load_movielens(tiny_dir)


def real_dir():
  try:
    return ml.resolve_data_dir(ml.DEFAULT_DATA_DIR)
  except ValueError:
    pytest.skip(f"MovieLens not found at {ml.DEFAULT_DATA_DIR}")


@pytest.fixture(scope="module")
def real_log():
  return ml.load_movielens(real_dir())


def test_real_counts(real_log):
  assert real_log.num_events == 100_836
  assert np.unique(real_log.user).size == 610
  assert real_log.catalogue.item_ids.size == 9_742
  assert len(real_log.catalogue.category_names) == 19
  assert real_log.catalogue.features.shape == (9_742, 22)
  # The measured facts: 2.27 genres per film on average (IMAX counted).
  genres_per_film = (real_log.catalogue.features[:, :20] > 0).sum(1)
  assert abs(genres_per_film.mean() - 2.27) < 0.01


@pytest.mark.parametrize("unit,n,expected", [
    ("day", 1, {1: 610, 2: 276, 3: 171}),
    ("events", 10, {1: 610, 2: 610, 3: 596}),
    ("events", 20, {1: 610, 2: 596, 3: 422}),
    ("session", 1, {1: 610, 2: 303, 3: 208}),      # a new step after 30 min without a rating
])
def test_real_length_distribution(real_log, unit, n, expected):
  s = ev.to_sequences(real_log, unit=unit, events_per_step=n)
  assert {k: int((s.lengths >= k).sum()) for k in expected} == expected
  np.testing.assert_allclose(s.strengths.sum(-1)[s.mask], 1.0, atol=1e-5)
  if unit == "day":
    assert s.lengths.max() == 844 and np.median(s.lengths) == 1
