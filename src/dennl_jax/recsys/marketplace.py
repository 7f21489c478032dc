"""A simulated Home Decoration marketplace after the paper's appendix A.2.

The paper's e-commerce data are private; this generator produces a log of the
same shape (10,000 users x 180 days, 5 phases, 17 sub-categories, clicks and
purchases, user features, an item catalogue) in the :mod:`events` format, so
the whole pipeline (sequences, split, GraphSAGE, Table 2) is shared with
MovieLens.  Run it through ``to_sequences(log, unit="day",
idle_category=IDLE_CATEGORY)``: days without events inside a user's active
window become the "no action" sub-category (the paper's 17th).

Assumptions (all stated here, none taken from the paper beyond A.2):

* **Phases** (HSMM states, K = 5): NotDecorating, Planning, Indoor
  Construction, Furniture, Accessories.  Each user has their own explicit-
  duration HSMM; its phase path is drawn with the library's sampler
  (``dj.sample``), so durations follow ``dj.PoissonDuration``: ``p(d) ∝
  Poisson(d - 1; rate)`` on ``d = 1..max_duration``; day 0 starts a segment.
  Base mean durations 45 / 10 / 21 / 14 / 8 days; the base transition matrix
  (``BASE_TRANSITION``) follows the decoration order with a few skips and
  returns (zero entries stay zero for every user).
* **User features** (F_u = num_locations + 3): location one-hot (shares
  .30/.25/.20/.15/.10...), standardised log income ``z ~ N(0, 1)``, household
  size ``h`` in 1..5 (scaled ``(h - 3) / 2``), ``new_owner`` (p = .6).  They
  shape the user's HSMM: new owners start in Planning more often and move
  NotDecorating -> Planning more; high income goes Planning -> Indoor
  Construction rather than straight to Furniture and finishes construction
  faster; larger households stay longer in Construction and Furniture and go
  on to Accessories more; singles click more off-phase.  Per-phase
  sub-category mixes get income, household and regional (location) effects
  (``_mix_logits``).  Every effect has a per-user idiosyncratic part
  (``config.user_spread``).
* **Days**: a user is active on a day with a phase- and user-dependent
  probability (NotDecorating rarely, about 6%); an active day has ``1 +
  Poisson(rate_u)`` events; each picks a sub-category from the phase's four
  (user mix) or, with the user's noise probability (about 15%), from all 16;
  NotDecorating days draw from the user's overall taste with a lean to
  Accessories.  An event is a purchase (value ``purchase_value`` = 3) with a
  phase-dependent probability, else a click (value 1).
* **Items**: ``items_per_cell`` items per (sub-category, price band); a
  click's price band follows the user's income (``exp(-1.5 (band -
  centre_u)^2)``, centre ``1 + 0.8 z``), and the item within the cell its
  popularity in the user's location (global log-normal popularity times a
  regional factor).  Item features: sub-category one-hot + price-band
  one-hot, so the click graph carries location, income and phase-mix
  information that GraphSAGE can learn.

Randomness: one ``jax.random`` key.  The phase paths use ``jax.random``;
the per-event draws use a numpy generator seeded from a split of the same
key (variable-length event lists are a host job), so the same key gives the
same data.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dennl_jax.recsys.events import SECONDS_PER_DAY, EventLog, make_catalogue, make_event_log

PHASES = ("NotDecorating", "Planning", "Indoor Construction", "Furniture", "Accessories")
SUBCATEGORIES = (
    "Design Services", "Contractors", "Floor Plans & Measuring", "Inspiration & Decor Books",
    "Electrical Supplies", "Plumbing Supplies", "Flooring & Tiles", "Paint & Wall Coverings",
    "Sofas & Seating", "Beds & Mattresses", "Tables & Desks", "Storage & Wardrobes",
    "Lighting", "Textiles & Curtains", "Wall Art & Mirrors", "Kitchenware & Tableware",
)
IDLE_CATEGORY = "no action"
CATEGORY_NAMES = SUBCATEGORIES + (IDLE_CATEGORY,)
PRICE_BANDS = ("budget", "mid", "premium")
BASE_MEAN_DURATION = np.array([45.0, 10.0, 21.0, 14.0, 8.0])
BASE_TRANSITION = np.array([
    [0.00, 0.60, 0.10, 0.15, 0.15],   # NotDecorating -> mostly Planning
    [0.05, 0.00, 0.70, 0.20, 0.05],   # Planning -> Construction (or straight to Furniture)
    [0.05, 0.10, 0.00, 0.80, 0.05],
    [0.15, 0.00, 0.05, 0.00, 0.80],
    [0.75, 0.00, 0.00, 0.25, 0.00],
])
BASE_ACTIVE = np.array([0.06, 0.50, 0.45, 0.60, 0.55])
BASE_PURCHASE = np.array([0.02, 0.02, 0.08, 0.12, 0.12])
LOCATION_SHARES = np.array([0.30, 0.25, 0.20, 0.15, 0.10])
_NUM_SUB = len(SUBCATEGORIES)
_K = len(PHASES)


@dataclasses.dataclass(frozen=True)
class MarketplaceConfig:
  """Scale and knobs; the defaults are the paper's scale (10,000 users x 180 days)."""
  num_users: int = 10_000
  num_days: int = 180
  num_locations: int = 5
  items_per_cell: int = 40            # items per (sub-category, price band): 16 * 3 * 40 = 1,920
  max_duration: int = 120             # D of the Poisson durations (>> 45 + 5 sqrt(45))
  mean_extra_events: float = 1.5      # an active day has 1 + Poisson(~this) events
  off_phase: float = 0.15             # typical share of events outside the phase's sub-categories
  user_spread: float = 0.3            # std of per-user idiosyncratic effects (log scale)
  purchase_value: float = 3.0
  click_value: float = 1.0
  start_time: int = 1_514_764_800     # 2018-01-01T00:00:00Z (paper: January-July 2018)
  user_chunk: int = 1_000             # users per compiled phase-path batch (bounds memory)

  @classmethod
  def small(cls) -> "MarketplaceConfig":
    """A tiny world for tests: 60 users x 40 days, 2 items per cell."""
    return cls(num_users=60, num_days=40, num_locations=3, items_per_cell=2, max_duration=60,
               user_chunk=64)


class MarketplaceTruth(NamedTuple):
  """What generated the log (for scoring and for user features).

  user_ids: (U,) int, the log's user ids.  user_features: (U, F_u) float32.
  feature_names: (F_u,).  phase: (U, num_days) int32 true phase per day.
  active: (U, num_days) bool days with events.  day_start: (num_days,) int64.
  initial: (U, K); transition: (U, K, K); duration_rate: (U, K) (Poisson
  rate, mean duration = 1 + rate); max_duration: D.
  subcategory_probs: (U, K, 16) per-phase event mix.  active_probs: (U, K).
  location: (U,) int; income: (U,); household: (U,) int.
  item_subcategory, item_band: (I,) int.
  """
  user_ids: np.ndarray
  user_features: np.ndarray
  feature_names: tuple
  phase: np.ndarray
  active: np.ndarray
  day_start: np.ndarray
  initial: np.ndarray
  transition: np.ndarray
  duration_rate: np.ndarray
  max_duration: int
  subcategory_probs: np.ndarray
  active_probs: np.ndarray
  location: np.ndarray
  income: np.ndarray
  household: np.ndarray
  item_subcategory: np.ndarray
  item_band: np.ndarray


def _check_config(config: MarketplaceConfig) -> None:
  for name in ("num_users", "num_days", "num_locations", "items_per_cell", "max_duration", "user_chunk"):
    value = getattr(config, name)
    if int(value) != value or value < 1:
      raise ValueError(f"MarketplaceConfig.{name} must be a positive integer, got {value!r}")
  if config.num_locations > len(LOCATION_SHARES):
    raise ValueError(f"num_locations must be <= {len(LOCATION_SHARES)}, got {config.num_locations}")
  if not 0.0 < config.off_phase < 1.0:
    raise ValueError(f"off_phase must be in (0, 1), got {config.off_phase}")
  for name in ("mean_extra_events", "user_spread", "purchase_value", "click_value"):
    if not getattr(config, name) >= 0:
      raise ValueError(f"MarketplaceConfig.{name} must be >= 0, got {getattr(config, name)}")


def _softmax(x, axis=-1):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def _logit(p):
  return np.log(p) - np.log1p(-p)


def _draw(probs_rows: np.ndarray, row: np.ndarray, uniform: np.ndarray) -> np.ndarray:
  """Index drawn from ``probs_rows[row]`` for every (row, uniform) pair, by inverse CDF.

  One searchsorted over all rows' CDFs laid end to end (row r's CDF shifted
  by r), so no Python loop over draws and no (draws, choices) array.
  """
  cdf = np.cumsum(probs_rows, axis=1)
  cdf = cdf / cdf[:, -1:]
  width = cdf.shape[1]
  flat = (cdf + np.arange(cdf.shape[0])[:, None]).ravel()
  pos = np.searchsorted(flat, row + uniform, side="right")
  return np.clip(pos - row * width, 0, width - 1)


def _mix_logits(rng, config, location, income, household):
  """(U, 16) sub-category taste: income, household, regional and own effects."""
  num_users = location.size
  effect = np.zeros((num_users, _NUM_SUB))
  sub = {n: j for j, n in enumerate(SUBCATEGORIES)}
  for name, w in (("Design Services", 0.5), ("Sofas & Seating", 0.4), ("Lighting", 0.4),
                  ("Paint & Wall Coverings", -0.5), ("Floor Plans & Measuring", -0.4)):
    effect[:, sub[name]] += w * income
  h = (household - 3) / 2.0
  for name, w in (("Beds & Mattresses", 0.8), ("Storage & Wardrobes", 0.8),
                  ("Kitchenware & Tableware", 0.6), ("Wall Art & Mirrors", -0.6)):
    effect[:, sub[name]] += w * h
  regional = rng.normal(0.0, 0.5, (config.num_locations, _NUM_SUB))
  return effect + regional[location] + rng.normal(0.0, 2 * config.user_spread, (num_users, _NUM_SUB))


def _users(rng, config):
  """User features and their per-user HSMM and emission parameters."""
  u = config.num_users
  shares = LOCATION_SHARES[:config.num_locations] / LOCATION_SHARES[:config.num_locations].sum()
  location = rng.choice(config.num_locations, size=u, p=shares)
  income = rng.normal(size=u)
  household = rng.choice(np.arange(1, 6), size=u, p=[0.25, 0.30, 0.20, 0.15, 0.10])
  new_owner = rng.random(u) < 0.6
  h = (household - 3) / 2.0
  spread = config.user_spread

  initial = np.where(new_owner[:, None], [0.30, 0.50, 0.10, 0.05, 0.05], [0.70, 0.10, 0.07, 0.07, 0.06])
  with np.errstate(divide="ignore"):
    logits = np.broadcast_to(np.log(BASE_TRANSITION), (u, _K, _K)).copy()
  logits[:, 0, 1] += 1.0 * new_owner
  logits[:, 1, 2] += 0.5 * income
  logits[:, 1, 3] -= 0.5 * income
  logits[:, 3, 4] += 0.4 * h
  logits += rng.normal(0.0, spread, logits.shape)
  transition = _softmax(logits)                         # -inf (structural zeros) stay 0

  log_mean = np.log(BASE_MEAN_DURATION) + rng.normal(0.0, spread, (u, _K))
  log_mean[:, 2] += 0.25 * h - 0.15 * income
  log_mean[:, 3] += 0.25 * h
  rate = np.maximum(np.exp(log_mean) - 1.0, 0.05)

  engagement = rng.normal(0.0, 0.5, u)
  active = 1.0 / (1.0 + np.exp(-(_logit(BASE_ACTIVE) + engagement[:, None])))
  extra = config.mean_extra_events * np.exp(0.3 * engagement)
  off = 1.0 / (1.0 + np.exp(-(_logit(config.off_phase) - 0.5 * h + rng.normal(0.0, spread, u))))

  taste = _mix_logits(rng, config, location, income, household)
  probs = np.zeros((u, _K, _NUM_SUB))
  lean = np.zeros(_NUM_SUB)
  lean[12:] = 1.0                                      # NotDecorating leans to Accessories
  probs[:, 0] = _softmax(taste + lean)
  for k in range(1, _K):                               # four phases: the phase's own sub-categories
    own = np.full((u, _NUM_SUB), -np.inf)
    own[:, 4 * (k - 1):4 * k] = taste[:, 4 * (k - 1):4 * k]
    probs[:, k] = (1 - off[:, None]) * _softmax(own) + off[:, None] / _NUM_SUB
  purchase = np.clip(BASE_PURCHASE[None, :] + 0.03 * income[:, None], 0.0, 1.0)
  band_centre = np.clip(1.0 + 0.8 * income, 0.0, len(PRICE_BANDS) - 1.0)
  band_probs = _softmax(-1.5 * (np.arange(len(PRICE_BANDS))[None, :] - band_centre[:, None]) ** 2)

  features = np.concatenate([np.eye(config.num_locations)[location], income[:, None], h[:, None],
                             new_owner[:, None]], axis=1).astype(np.float32)
  names = tuple(f"location_{i}" for i in range(config.num_locations)) + ("income", "household",
                                                                          "new_owner")
  return dict(location=location, income=income, household=household, features=features,
              feature_names=names, initial=initial, transition=transition, rate=rate, active=active,
              extra=extra, probs=probs, purchase=purchase, band_probs=band_probs)


@functools.lru_cache(maxsize=8)
def _path_sampler(num_days: int, max_duration: int):
  """Jitted (keys, initial, transition, rate) -> (n, num_days) phases; cached per shape."""
  import dennl_jax as dj

  def one(key, initial, transition, rate):
    model = dj.HSMM(initial=initial, transition=transition,
                    duration=dj.PoissonDuration(rate=rate, max_duration=max_duration),
                    emission=dj.Categorical(probs=jnp.ones((_K, 1))))
    return dj.sample(key, model, num_days)[0]

  return jax.jit(jax.vmap(one))


def _phase_paths(key, users, config) -> np.ndarray:
  """(U, num_days) int32 phases drawn by the library's HSMM sampler, in user chunks."""
  sample = _path_sampler(config.num_days, config.max_duration)
  u, chunk = config.num_users, min(config.user_chunk, config.num_users)
  keys = jax.random.split(key, u)
  pad = -u % chunk                                      # equal chunks: one compilation
  arrays = [np.concatenate([a, np.repeat(a[-1:], pad, 0)]).astype(np.float32)
            for a in (users["initial"], users["transition"], users["rate"])]
  keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], pad, 0)])
  paths = [np.asarray(sample(keys[s:s + chunk], *(a[s:s + chunk] for a in arrays)))
           for s in range(0, u + pad, chunk)]
  return np.concatenate(paths)[:u].astype(np.int32)


def _catalogue(rng, config):
  bands = len(PRICE_BANDS)
  cells = _NUM_SUB * bands
  item_sub = np.repeat(np.arange(_NUM_SUB), bands * config.items_per_cell)
  item_band = np.tile(np.repeat(np.arange(bands), config.items_per_cell), _NUM_SUB)
  categories = np.eye(len(CATEGORY_NAMES))[item_sub]
  features = np.concatenate([np.eye(_NUM_SUB)[item_sub], np.eye(bands)[item_band]], axis=1)
  catalogue = make_catalogue(np.arange(item_sub.size), categories, CATEGORY_NAMES, features)
  # Item popularity per location, laid out (location, cell, item in cell) for _draw.
  base = rng.lognormal(0.0, 1.0, item_sub.size)
  regional = np.exp(0.8 * rng.normal(size=(config.num_locations, item_sub.size)))
  popularity = (base * regional).reshape(config.num_locations * cells, config.items_per_cell)
  return catalogue, item_sub, item_band, popularity


def simulate_marketplace(key, config: MarketplaceConfig = MarketplaceConfig()):
  """Draw the marketplace: ``(EventLog, MarketplaceTruth)``.

  key: a ``jax.random`` key (same key and config -> same data).
  The log's users are ``0..U-1`` (every user, also one without events, is in
  ``truth``; users without any event do not appear in the log), items
  ``0..I-1``; categories are the 16 sub-categories plus ``IDLE_CATEGORY``.
  """
  _check_config(config)
  key_paths, key_host = jax.random.split(key)
  seed = np.asarray(jax.random.key_data(key_host) if jnp.issubdtype(key_host.dtype,
                                                                    jax.dtypes.prng_key)
                    else key_host).ravel()
  rng = np.random.default_rng(seed.astype(np.uint64))
  users = _users(rng, config)
  catalogue, item_sub, item_band, popularity = _catalogue(rng, config)
  phase = _phase_paths(key_paths, users, config)

  u_idx = np.arange(config.num_users)[:, None]
  active = rng.random(phase.shape) < users["active"][u_idx, phase]
  day_user, day = np.nonzero(active)
  counts = 1 + rng.poisson(users["extra"][day_user])
  ev_user, ev_day = np.repeat(day_user, counts), np.repeat(day, counts)
  ev_phase = phase[ev_user, ev_day]
  n = ev_user.size
  sub = _draw(users["probs"].reshape(-1, _NUM_SUB), ev_user * _K + ev_phase, rng.random(n))
  band = _draw(users["band_probs"], ev_user, rng.random(n))
  bands = len(PRICE_BANDS)
  cell = sub * bands + band
  within = _draw(popularity, users["location"][ev_user] * _NUM_SUB * bands + cell, rng.random(n))
  item = cell * config.items_per_cell + within
  buy = rng.random(n) < users["purchase"][ev_user, ev_phase]
  value = np.where(buy, config.purchase_value, config.click_value)
  day_start = config.start_time + np.arange(config.num_days, dtype=np.int64) * SECONDS_PER_DAY
  timestamp = day_start[ev_day] + rng.integers(0, SECONDS_PER_DAY, n)
  order = np.lexsort((timestamp, ev_user))
  log = make_event_log(ev_user[order], timestamp[order], item[order], catalogue, value[order])
  truth = MarketplaceTruth(
      user_ids=np.arange(config.num_users), user_features=users["features"],
      feature_names=users["feature_names"], phase=phase, active=active, day_start=day_start,
      initial=users["initial"], transition=users["transition"], duration_rate=users["rate"],
      max_duration=config.max_duration, subcategory_probs=users["probs"],
      active_probs=users["active"], location=users["location"], income=users["income"],
      household=users["household"], item_subcategory=item_sub, item_band=item_band)
  return log, truth


def phases_of_steps(truth: MarketplaceTruth, seqs) -> np.ndarray:
  """(U_seqs, T) int true phase of every valid day step of ``seqs`` (-1 on padding).

  seqs: ``to_sequences(log, unit="day", ...)`` of this marketplace's log.
  """
  day = (np.asarray(seqs.step_time) - truth.day_start[0]) // SECONDS_PER_DAY
  mask = np.asarray(seqs.mask)
  valid_day = (day >= 0) & (day < truth.phase.shape[1])
  if np.any(mask & ~valid_day):
    raise ValueError("seqs has steps outside the simulated days; use unit='day' on this log")
  rows = np.searchsorted(truth.user_ids, np.asarray(seqs.user_ids))
  return np.where(mask, truth.phase[rows[:, None], np.where(mask, day, 0)], -1)
