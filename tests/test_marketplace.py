"""Simulated Home Decoration marketplace: determinism, HSMM structure, through the event pipeline."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from dennl_jax.recsys import events as ev
from dennl_jax.recsys import marketplace as mp

SMALL = mp.MarketplaceConfig.small()


@pytest.fixture(scope="module")
def world():
  return mp.simulate_marketplace(jax.random.key(0), SMALL)


def test_same_key_same_data_other_key_other_data(world):
  log, truth = world
  again, truth2 = mp.simulate_marketplace(jax.random.key(0), SMALL)
  for field in ("user", "timestamp", "item", "value"):
    np.testing.assert_array_equal(getattr(log, field), getattr(again, field))
  np.testing.assert_array_equal(truth.phase, truth2.phase)
  other, truth3 = mp.simulate_marketplace(jax.random.key(1), SMALL)
  assert other.num_events != log.num_events or not np.array_equal(other.item, log.item)
  assert not np.array_equal(truth3.phase, truth.phase)


def test_shapes_catalogue_and_features(world):
  log, truth = world
  u, t, k = SMALL.num_users, SMALL.num_days, len(mp.PHASES)
  cat = log.catalogue
  assert cat.category_names == mp.CATEGORY_NAMES and len(cat.category_names) == 17
  num_items = 16 * len(mp.PRICE_BANDS) * SMALL.items_per_cell
  assert cat.categories.shape == (num_items, 17) and cat.features.shape == (num_items, 16 + 3)
  assert np.all(cat.categories[:, mp.CATEGORY_NAMES.index(mp.IDLE_CATEGORY)] == 0)
  np.testing.assert_array_equal(cat.categories[:, :16].argmax(1), truth.item_subcategory)
  np.testing.assert_array_equal(cat.features[:, 16:].argmax(1), truth.item_band)
  assert truth.phase.shape == truth.active.shape == (u, t) and truth.phase.dtype == np.int32
  assert truth.user_features.shape == (u, SMALL.num_locations + 3)
  assert len(truth.feature_names) == truth.user_features.shape[1]
  np.testing.assert_array_equal(truth.user_features[:, :SMALL.num_locations].sum(1), 1)
  assert truth.transition.shape == (u, k, k) and truth.subcategory_probs.shape == (u, k, 16)
  np.testing.assert_allclose(truth.transition.sum(-1), 1, atol=1e-9)
  np.testing.assert_allclose(truth.subcategory_probs.sum(-1), 1, atol=1e-9)
  assert set(np.unique(log.value)) <= {SMALL.click_value, SMALL.purchase_value}
  day = (log.timestamp - truth.day_start[0]) // ev.SECONDS_PER_DAY
  assert day.min() >= 0 and day.max() < t
  assert np.all(truth.active[log.user, day])                  # events only on active days
  assert truth.active.sum() == np.unique(log.user * t + day).size


def test_phase_paths_follow_the_hsmm_structure(world):
  _, truth = world
  prev, nxt = truth.phase[:, :-1], truth.phase[:, 1:]
  moved = prev != nxt
  assert moved.any()
  # Every change of phase uses a transition the user's HSMM allows (the base
  # matrix's structural zeros, including the diagonal, are zero for everyone).
  u = np.nonzero(moved)[0]
  assert np.all(truth.transition[u, prev[moved], nxt[moved]] > 0)
  assert np.all(mp.BASE_TRANSITION[prev[moved], nxt[moved]] > 0)
  # Complete segments (both ends seen) are at most max_duration days long.
  for row in truth.phase:
    cuts = np.flatnonzero(np.diff(row)) + 1
    if cuts.size >= 2:
      assert np.diff(cuts).max() <= truth.max_duration


def test_events_follow_the_phase_mix(world):
  log, truth = world
  day = (log.timestamp - truth.day_start[0]) // ev.SECONDS_PER_DAY
  phase = truth.phase[log.user, day]
  sub = truth.item_subcategory[log.item_index]
  decorating = phase > 0
  in_phase = sub[decorating] // 4 == phase[decorating] - 1
  assert in_phase.mean() > 0.7                                 # off-phase share is ~15%


def test_through_the_event_pipeline(world):
  log, truth = world
  s = ev.to_sequences(log, unit="day", idle_category=mp.IDLE_CATEGORY)
  np.testing.assert_allclose(s.strengths.sum(-1)[s.mask], 1, atol=1e-6)
  idle = mp.CATEGORY_NAMES.index(mp.IDLE_CATEGORY)
  phases = mp.phases_of_steps(truth, s)
  assert np.all((phases >= 0) == s.mask)
  day = (s.step_time - truth.day_start[0]) // ev.SECONDS_PER_DAY
  rows = np.searchsorted(truth.user_ids, s.user_ids)
  was_active = np.where(s.mask, truth.active[rows[:, None], np.where(s.mask, day, 0)], False)
  np.testing.assert_array_equal(s.strengths[..., idle] == 1, s.mask & ~was_active)
  split = ev.time_split(s)
  assert split.report["users"] == s.user_ids.size
  users = np.arange(s.user_ids.size)
  has_val = split.val_step >= 0
  assert not s.idle[users[has_val], split.val_step[has_val]].any()   # targets are active days
  assert not s.idle[users, split.test_step].any()
  keep = ev.training_events(log, s, split)
  assert np.all(s.event_step[keep] < split.val_step[s.event_user[keep]])


@pytest.mark.parametrize("field,value", [("num_users", 0), ("num_days", 2.5), ("off_phase", 1.0),
                                         ("num_locations", 9), ("purchase_value", -1.0)])
def test_bad_config_raises(field, value):
  with pytest.raises(ValueError, match=field):
    mp.simulate_marketplace(jax.random.key(0), dataclasses.replace(SMALL, **{field: value}))
