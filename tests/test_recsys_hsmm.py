"""HSMM next-step predictors (Conventional EM, MLP Mapper, Initial Fusion, DENNL) on a planted task.

The task: users of two types walk through 2 phases in opposite orders; each
phase emits mostly its own pair of categories; the embedding is a noisy type
indicator.  Every predictor must return (U, C) distributions, read only the
history steps, and the trained DENNL must beat its own start on the
validation targets.
"""
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dennl_jax as dj
from dennl_jax.per_user_em import best_restart

from dennl_jax.recsys import hsmm_family as hf
from dennl_jax.recsys import hsmm_predictors as hp
from dennl_jax.recsys import registry
from dennl_jax.recsys import task as tk

# Binaries run in float32; keep x64 switched on by other modules out.
pytestmark = pytest.mark.usefixtures("float32_default")

K, C, T, D = 2, 4, 7, 3
SMALL = dict(num_states=K, max_duration=D, duration_rate=1.0, em_iters=8, kmeans_restarts=1,
             dirichlet_restarts=2, num_stages=2, hidden=8, start_hidden=8, latent_dim=4,
             num_steps=12, eval_every=12, batch_size=16, learning_rate=2e-2, chunk_size=64)
NETWORKS = ("mlp_mapper", "initial_fusion", "dennl")


def _planted(seed, num_users=32):
  """Sampled from the HSMM in numpy (a jitted sampler would cost seconds of compilation)."""
  rng = np.random.default_rng(seed)
  probs = np.array([[.45, .45, .05, .05], [.05, .05, .45, .45]])
  kind = rng.integers(0, 2, num_users)
  strengths = np.zeros((num_users, T, C), np.float32)
  for u in range(num_users):
    # Type 1 starts in phase 0, type 0 in phase 1; K = 2, so every jump is forced.
    state, left = 1 - kind[u], 1 + min(rng.poisson(1.5), D - 1)
    for t in range(T):
      if left == 0:
        state, left = 1 - state, 1 + min(rng.poisson(1.5), D - 1)
      strengths[u, t] = rng.multinomial(20, probs[state]) / 20.0
      left -= 1
  lengths = rng.integers(2, T + 1, num_users)
  lengths[:2] = 2, 3            # users with empty / one-step validation histories
  mask = np.arange(T)[None] < lengths[:, None]
  strengths = np.where(mask[..., None], np.asarray(strengths), 0.0).astype(np.float32)
  emb = np.stack([kind, 1 - kind], 1) + 0.1 * rng.normal(size=(num_users, 2))
  val, test = lengths - 2, lengths - 1
  split = SimpleNamespace(val_step=val, test_step=test,
                          train_mask=mask & (np.arange(T)[None] < val[:, None]))
  seqs = SimpleNamespace(strengths=strengths, mask=mask,
                         category_names=tuple(map(str, range(C))))
  val_task, test_task = tk.make_tasks(seqs, split, emb.astype(np.float32),
                                      np.arange(num_users) % 4 != 3)
  return tk.training_task(val_task), val_task, test_task


# The tests that use these fixtures are slow: planting and fitting take ~20 s.
@pytest.fixture(scope="module")
def tasks():
  return _planted(0)


@pytest.fixture(scope="module")
def fitted(tasks):
  train, val, _ = tasks
  # A typed key here, raw keys below: predictors take either.
  out = {"conventional_em": registry.get("conventional_em").fit(
      jax.random.key(1), train, val, SMALL)}
  for name in NETWORKS:
    # Only DENNL trains in earnest (its test needs it); compiling the others'
    # training steps would double the file's time without testing more here.
    # Initial Fusion takes two steps: its EM-layer outputs hold exact zero
    # probabilities, which once made every gradient NaN (all updates skipped).
    steps = {"dennl": SMALL["num_steps"], "initial_fusion": 2}.get(name, 0)
    # DENNL trains with the no-history term too (cold_weight), the others without.
    grid = [{"loss": "predictive", "cold_weight": float(name == "dennl")}]
    out[name] = registry.get(name).fit(jax.random.PRNGKey(2), train, val,
                                       dict(SMALL, num_steps=steps, grid=grid))
  return out


def _poisoned(task):
  """The same task with every non-history step (targets included) replaced by garbage."""
  garbage = np.random.default_rng(0).uniform(0, 50, task.strengths.shape).astype(np.float32)
  return task._replace(strengths=np.where(task.history_mask[..., None], task.strengths, garbage))


@pytest.mark.slow
@pytest.mark.parametrize("name", ("conventional_em",) + NETWORKS)
def test_predictions_are_distributions_from_history_only(name, tasks, fitted):
  _, val, test = tasks
  predictor = registry.get(name)
  for task in (val, test):
    scores = predictor.predict(fitted[name], task)
    assert scores.shape == (task.strengths.shape[0], C)
    rows = tk.evaluated(task)
    if predictor.needs_history:
      rows &= tk.history_length(task) > 0
    assert np.all(np.isfinite(scores[rows]))
    np.testing.assert_allclose(scores[rows].sum(1), 1.0, atol=1e-4)
    again = predictor.predict(fitted[name], _poisoned(task))
    np.testing.assert_allclose(again[tk.evaluated(task)], scores[tk.evaluated(task)], atol=1e-6)
  # The validation task has users with empty histories; networks score them from g(e).
  assert (tk.history_length(val)[tk.evaluated(val)] == 0).any()


@pytest.mark.slow
def test_conventional_em_keeps_the_best_restart(tasks):
  _, val, _ = tasks
  obs, hist = hf.history_inputs(val)
  rows = np.flatnonzero(hist.any(1))
  params, best, per_restart = hp.conventional_em_fit(jax.random.PRNGKey(3), obs[rows], hist[rows],
                                                     SMALL)
  assert per_restart.shape == (rows.size, 3)
  # The kept restart is the first within rounding of the best (baselines.best_restart).
  np.testing.assert_allclose(best, per_restart.max(1), rtol=1e-4)
  np.testing.assert_array_equal(best, per_restart[np.arange(rows.size),
                                                  np.asarray(best_restart(jnp.asarray(per_restart)))])
  # Restarts do differ somewhere, and the kept parameters really score `best`.
  assert np.ptp(per_restart, axis=1).max() > 1e-3
  recomputed = jax.jit(jax.vmap(dj.log_likelihood))(params, jnp.asarray(obs[rows]), jnp.asarray(hist[rows]))
  np.testing.assert_allclose(recomputed, best, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_length_buckets_leave_conventional_em_unchanged(tasks, monkeypatch):
  _, val, _ = tasks
  obs, hist = hf.history_inputs(val)
  rows = np.flatnonzero(hist.any(1))
  monkeypatch.setattr(hf, "LENGTH_LEVELS", ())
  params, _, per_restart = hp.conventional_em_fit(jax.random.PRNGKey(3), obs[rows], hist[rows],
                                                  SMALL)
  # Users cut to a length bucket (their valid steps end by step 3) get the same fits.
  monkeypatch.setattr(hf, "LENGTH_LEVELS", (3,))
  assert 0 < (hist[rows].cumsum(1).argmax(1) < 3).sum() < rows.size
  cut, _, cut_restarts = hp.conventional_em_fit(jax.random.PRNGKey(3), obs[rows],
                                                hist[rows], SMALL)
  np.testing.assert_allclose(cut_restarts, per_restart, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(cut), jax.tree_util.tree_leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_dennl_training_improves_validation_predictive_loss(tasks, fitted):
  _, val, _ = tasks
  f = fitted["dennl"]
  obs, hist = hf.history_inputs(val)
  emb = f["embed"](val.embeddings)
  target = tk.target_strengths(val)[tk.evaluated(val)]

  def cross_entropy(state):
    p = hp.network_scores(f["graphdef"], state, emb, obs, hist, f["key"])[tk.evaluated(val)]
    return float(np.mean(-np.sum(target * np.log(p + 1e-6), 1)))

  assert f["grid_results"][0]["curve"][0][0] == 0      # the start was a candidate
  assert cross_entropy(f["final_state"]) < cross_entropy(f["initial_state"]) - 1e-3


@pytest.mark.slow
def test_bad_settings_raise(tasks):
  train, val, _ = tasks
  with pytest.raises(ValueError, match="unknown HSMM predictor settings"):
    registry.get("dennl").fit(jax.random.PRNGKey(0), train, val, {"num_stage": 2})
  with pytest.raises(ValueError, match="unknown loss"):
    hp._loss_fn(dict(hp.DEFAULTS, loss="mse"))


@pytest.mark.slow
def test_decode_marks_history_steps_only(tasks, fitted):
  _, _, test = tasks
  for name in ("conventional_em", "dennl"):
    paths = registry.get(name).decode(fitted[name], test)
    assert paths.shape == test.history_mask.shape
    rows = tk.evaluated(test) & test.history_mask.any(1)
    np.testing.assert_array_equal(paths[rows] >= 0, test.history_mask[rows])
    assert paths.max() < K


@pytest.mark.slow
def test_predictive_loss_scores_last_active_steps_against_forecasts():
  # One fixed HSMM for every user; the loss must equal the cross-entropy of the
  # last active step (idle category 3 excluded and renormalised away) under
  # dj.forecast from the steps before it.
  probs = np.array([[.6, .2, .1, .1], [.1, .1, .2, .6]], np.float32)
  params = hf.multinomial_hsmm(jnp.array([.5, .5]), jnp.array([[0., 1.], [1., 0.]]),
                               jnp.asarray(probs), jnp.array([1., 2.]), D)
  model = lambda e, o, m, k: jax.tree_util.tree_map(
      lambda x: jnp.broadcast_to(x, (o.shape[0],) + x.shape), params)
  idle = np.array([0, 0, 0, 1], np.float32)
  obs = np.array([[[1, 0, 0, 0], [0, .5, .5, 0], idle, idle],       # last active = step 1
                  [[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], idle],  # last active = step 2
                  [[1, 0, 0, 0], idle, idle, idle]], np.float32)     # nothing before it: no score
  mask = np.ones((3, 4), bool)
  batch = dj.Batch(jnp.zeros((3, 1)), jnp.asarray(obs), jnp.asarray(mask))
  loss = jax.jit(lambda b: hf.predictive_loss(model, b, None, idle_index=3))(batch)
  expected = []
  for u, t in ((0, 1), (1, 2)):
    p = np.asarray(dj.forecast(params, obs[u, :t], mask[u, :t], 1).observation_mean[0])
    p = p[:3] / p[:3].sum()
    expected.append(-np.sum(obs[u, t, :3] * np.log(p + 1e-6)))
  np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)


@pytest.mark.slow
def test_predictive_loss_cold_term_scores_targets_under_the_start():
  # lambda_0 (start_params) differs from the history model; the cold term is
  # the cross-entropy of every user's last active step under lambda_0's
  # first-step distribution -- user 2 too, though it has no step before it.
  start_probs = np.array([[.7, .1, .1, .1], [.1, .3, .3, .3]], np.float32)
  hist_probs = np.array([[.6, .2, .1, .1], [.1, .1, .2, .6]], np.float32)
  make = lambda init, probs: hf.multinomial_hsmm(jnp.asarray(init), jnp.array([[0., 1.], [1., 0.]]),
                                                 jnp.asarray(probs), jnp.array([1., 2.]), D)
  start, params = make([.25, .75], start_probs), make([.5, .5], hist_probs)
  batched = lambda p, n: jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), p)

  class Model:
    def __init__(self, start):
      self.start = start

    def __call__(self, embedding, obs, mask, key):
      return batched(params, obs.shape[0])

    def start_params(self, embedding):
      return batched(self.start, embedding.shape[0])

  idle = np.array([0, 0, 0, 1], np.float32)
  obs = np.array([[[1, 0, 0, 0], [0, .5, .5, 0], idle, idle],
                  [[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], idle],
                  [[1, 0, 0, 0], idle, idle, idle]], np.float32)
  batch = dj.Batch(jnp.zeros((3, 1)), jnp.asarray(obs), jnp.ones((3, 4), bool))
  loss = jax.jit(lambda s, b, w: hf.predictive_loss(Model(s), b, None, idle_index=3,
                                                    cold_weight=w), static_argnums=2)
  warm, both = loss(start, batch, 0.0), loss(start, batch, 0.5)
  first = (np.array([.25, .75]) @ start_probs)[:3]
  first = first / first.sum()
  cold = [-np.sum(obs[u, t, :3] * np.log(first + 1e-6)) for u, t in ((0, 1), (1, 2), (2, 0))]
  np.testing.assert_allclose(both, warm + 0.5 * np.mean(cold), rtol=1e-5)
  # The term reaches lambda_0's parameters (it trains g(e)).
  grad = jax.grad(lambda s: loss(s, batch, 1.0))(start)
  assert np.abs(np.asarray(grad.emission.probs)).max() > 1e-3


@pytest.mark.slow
def test_cold_start_uses_the_forecast_validation_prefers(tasks, fitted):
  _, val, _ = tasks
  for name in NETWORKS:
    f = fitted[name]
    choice = f["cold_start"]
    assert list(choice["validation"]) == ["run 0", "popularity"]
    # The best validation value wins; ties go to the earlier candidate.
    best = max(choice["validation"],
               key=lambda k: (choice["validation"][k], -list(choice["validation"]).index(k)))
    assert choice["run"] == (None if best == "popularity" else 0)
  # Users with no history get exactly the chosen forecast; users with one are untouched.
  f = fitted["dennl"]
  empty = tk.evaluated(val) & (tk.history_length(val) == 0)
  warm = tk.evaluated(val) & ~empty
  assert empty.any()
  as_network = hp.predict_network(dict(f, cold_start={"run": 0},
                                       cold_state=f["state"]), val)
  as_popularity = hp.predict_network(dict(f, cold_start={"run": None},
                                          cold_state=None), val)
  np.testing.assert_allclose(as_popularity[empty], np.broadcast_to(
      f["popularity"] * (1 + hp.TIE_BREAK), as_popularity[empty].shape), rtol=1e-6)
  first = hp.map_users(functools.partial(hp._first_step_chunk, f["graphdef"], f["state"]),
                       f["embed"](val.embeddings)[empty], 64)
  np.testing.assert_allclose(as_network[empty], first + hp.TIE_BREAK * f["popularity"], rtol=1e-5)
  np.testing.assert_array_equal(as_network[warm], as_popularity[warm])


@pytest.mark.slow
@pytest.mark.parametrize("name", ("initial_fusion", "dennl"))
def test_em_layer_networks_train_without_skipped_updates(name, fitted):
  # A skipped update means a non-finite loss or gradient: the network did not train.
  assert fitted[name]["grid_results"][0]["skipped"] == 0
