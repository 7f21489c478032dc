"""The paper's HSMM methods for next-category prediction (Table 2, section 6.2).

Every method fits, per user, an HSMM with K hidden states (the marketplace has
five phases), Multinomial emissions over the C categories (a step's strength
vector is the observation, paper A.2) and shifted Poisson durations up to
``max_duration`` steps, and predicts the next step's category distribution
``dj.forecast(params, history, history_mask, 1).observation_mean``.

* ``conventional_em``: per-user EM, no sharing; several restarts per user
  (k-means++ on the user's own strength vectors, and random Dirichlet
  emission tables); the restart with the highest final log-likelihood wins.
* ``mlp_mapper``: ``lambda = g(e)`` from the embedding alone (no EM).
* ``initial_fusion``: ``lambda0 = g(e)`` then plain EM layers on the history.
* ``dennl``: the DENNL network (EM layers with a residual stage MLP shared
  by users and stages, latent h, embedding input); exact gradients by
  default, ``config["gradient"] = "spsa"`` for the paper's estimator.

The networks start from one pooled Multinomial/Poisson HSMM
(:func:`dennl_jax.starts.pooled_start` with ``family=Multinomial``: k-means on
the training users' strength vectors; :mod:`dennl_jax.recsys.hsmm_family`
holds the family's restarts, forecast and predictive loss), train on the
training steps of the training users with one of three losses, and choose
loss, learning rate and training length on the validation targets:

* ``likelihood``: paper eq. 9 (:func:`dennl_jax.training.likelihood_loss`);
* ``heldout``: random held-out steps (:func:`dennl_jax.training.heldout_step_loss`);
* ``predictive``: the evaluation's own question -- hide each user's last
  ``predictive_targets`` history steps, fit on the rest, and score the soft
  cross-entropy of each hidden step's strength vector under the forecast
  distribution (:func:`predictive_loss`); with ``cold_weight > 0`` plus
  that weight times the same cross-entropy forecast from no history by
  ``lambda_0 = g(e)`` (the cold users' question, h = 0).

Users with a history get the run with the best validation score.  A user
with no history gets the first-step distribution of ``lambda_0`` of the run
whose ``lambda_0`` scores best on the validation users treated as if they had
no history, or global popularity where popularity scores better
(``fitted["cold_start"]``): the two questions are selected separately, so a
run trained for the cold question never costs the warm users.

Emission tables are mixed with ``prob_floor`` of the uniform distribution
before any scoring (losses and forecasts): a per-user M-step leaves exact
zeros for categories the user never touched, and a zero makes the held-out
likelihood of a new category -inf.  Scores add ``1e-9 * popularity`` so that
ties fall to the more popular category, as in :mod:`dennl_jax.recsys.baselines`.
"""
from __future__ import annotations

import functools
import hashlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dennl_jax as dj
from dennl_jax import loop
from dennl_jax.per_user_em import best_of_restarts
from dennl_jax import training as Tr
from dennl_jax.recsys import metrics as rmetrics
from dennl_jax.recsys.baselines import TIE_BREAK, popularity_vector
# multinomial_hsmm is re-exported: experiments/table2.py builds its oracle row with it.
from dennl_jax.recsys.hsmm_family import (first_step_distribution, floor_emission,
                                          history_inputs, idle_index, map_users,
                                          multinomial_hsmm, next_step_distribution,
                                          predictive_loss, rank_active, user_starts)
from dennl_jax.recsys.registry import Predictor, register
from dennl_jax.recsys.task import NextStepTask, evaluated

DEFAULTS = dict(
    num_states=5, max_duration=16, duration_rate=2.0, prob_floor=1e-3, start_smoothing=0.05,
    # conventional EM
    em_iters=30, kmeans_restarts=2, dirichlet_restarts=2, dirichlet_concentration=1.0,
    kmeans_iters=10, chunk_size=256,
    # networks
    num_stages=3, hidden=64, start_hidden=64, latent_dim=16, gradient="exact", spsa_samples=8,
    loss="predictive", predictive_targets=1, cold_weight=0.0, learning_rate=3e-3,
    num_steps=150, eval_every=25,
    batch_size=32, max_points=20000, select_by="mrr", log=None,
    workdir=None, progress=False)
# Each entry overrides DEFAULTS for one training run; the best on validation is kept.
DEFAULT_GRID = ({"loss": "likelihood"}, {"loss": "heldout"}, {"loss": "predictive"})
KINDS = ("mlp_mapper", "initial_fusion", "dennl")


def _settings(config) -> dict:
  config = dict(config or {})
  unknown = set(config) - set(DEFAULTS) - {"grid", "popularity", "category_embeddings",
                                           "idle_index"}
  if unknown:
    raise ValueError(f"unknown HSMM predictor settings {sorted(unknown)}")
  return dict(DEFAULTS, **{k: v for k, v in config.items() if k in DEFAULTS})


# --------------------------------------------------------------------------
# Conventional EM: per-user HSMMs with restarts.


@functools.partial(jax.jit, static_argnames=("settings",))
def _em_chunk(chunk, index, settings):
  """Best-of-restarts EM for a chunk of users: (params, best ll (B,), ll (B, R))."""
  del index
  keys, obs, mask = chunk
  s = dict(settings)
  starts = jax.vmap(lambda k, o, m: user_starts(
      k, o, m, num_states=s["num_states"], max_duration=s["max_duration"],
      duration_rate=s["duration_rate"], kmeans_restarts=s["kmeans_restarts"],
      dirichlet_restarts=s["dirichlet_restarts"],
      dirichlet_concentration=s["dirichlet_concentration"], kmeans_iters=s["kmeans_iters"],
      smoothing=s["start_smoothing"]))(keys, obs, mask)
  params, trace, final = best_of_restarts(starts, obs, mask, s["em_iters"])
  return params, trace[:, -1], final


def conventional_em_fit(key, obs, mask, config=None):
  """Per-user EM with restarts; keeps each user's best restart.

  obs: (U, T, C); mask: (U, T) bool (every user needs >= 1 valid step).
  Returns ``(params (batched HSMM, leading U), log_likelihood (U,),
  restart_log_likelihoods (U, R))`` -- log-likelihoods after ``em_iters``
  iterations (NaN counts as -inf when choosing).
  """
  cfg = _settings(config)
  obs, mask = np.asarray(obs, np.float32), np.asarray(mask, bool)
  if obs.ndim != 3 or mask.shape != obs.shape[:2]:
    raise ValueError(f"obs must be (U, T, C) and mask (U, T); got {obs.shape}, {mask.shape}")
  if not mask.any(1).all():
    raise ValueError("conventional EM needs at least one valid step for every user")
  settings = tuple(sorted((k, cfg[k]) for k in (
      "num_states", "max_duration", "duration_rate", "kmeans_restarts", "dirichlet_restarts",
      "dirichlet_concentration", "kmeans_iters", "start_smoothing", "em_iters")))
  keys = jax.random.split(key, obs.shape[0])
  if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
    keys = jax.random.key_data(keys)      # typed keys cannot be padded as numpy arrays
  params, best, per_restart = map_users(functools.partial(_em_chunk, settings=settings),
                                        (keys, obs, mask), cfg["chunk_size"], by_length=True)
  return jax.tree_util.tree_map(jnp.asarray, params), best, per_restart


@jax.jit
def _forecast_chunk(chunk, index):
  del index
  params, obs, mask = chunk
  return next_step_distribution(params, obs, mask)


def fit_conventional_em(key, train_task, val_task, config=None):
  """Nothing is shared: fit only stores the settings (and popularity for empty histories)."""
  del val_task
  return {"settings": _settings(config), "key": key, "popularity": popularity_vector(train_task),
          "report": {}, "selected": {"restarts": _settings(config)["kmeans_restarts"]
                                     + _settings(config)["dirichlet_restarts"]}}


def _conventional_params(fitted, task: NextStepTask):
  """(rows, batched params) of per-user EM on the task's histories, cached per task.

  ``predict`` and ``decode`` on the same task share one EM run (the cache
  key is a digest of the history the fit sees).
  """
  cfg = fitted["settings"]
  obs, hist = history_inputs(task)
  digest = hashlib.sha1(obs.tobytes() + hist.tobytes()).hexdigest()
  if fitted.get("cache", (None,))[0] != digest:
    rows = np.flatnonzero(evaluated(task) & hist.any(1))
    start = time.time()
    params = None
    if rows.size:
      params, _, _ = conventional_em_fit(fitted["key"], obs[rows], hist[rows], cfg)
    fitted["cache"] = (digest, rows, params)
    fitted["report"] = {"users_fitted": int(rows.size), "seconds": time.time() - start,
                        "restarts": cfg["kmeans_restarts"] + cfg["dirichlet_restarts"],
                        "kmeans_restarts": cfg["kmeans_restarts"], "em_iters": cfg["em_iters"]}
  return obs, hist, fitted["cache"][1], fitted["cache"][2]


def predict_conventional_em(fitted, task: NextStepTask):
  cfg = fitted["settings"]
  pop = fitted["popularity"]
  obs, hist, rows, params = _conventional_params(fitted, task)
  scores = np.broadcast_to(pop, (obs.shape[0], obs.shape[2])).copy()
  if rows.size:
    params = floor_emission(params, cfg["prob_floor"])
    scores[rows] = map_users(_forecast_chunk, (params, obs[rows], hist[rows]),
                             cfg["chunk_size"], by_length=True)
  return scores + TIE_BREAK * pop


def _decoded(params, obs, hist, rows, chunk_size):
  """(U, T) Viterbi states of ``rows`` on their history steps, -1 elsewhere."""
  out = np.full(hist.shape, -1, np.int64)
  if rows.size:
    paths = np.asarray(dj.decode_states(params, jnp.asarray(obs[rows]), jnp.asarray(hist[rows]),
                                        chunk_size))
    out[rows] = np.where(hist[rows], paths, -1)
  return out


def decode_conventional_em(fitted, task: NextStepTask):
  obs, hist, rows, params = _conventional_params(fitted, task)
  return _decoded(params, obs, hist, rows, fitted["settings"]["chunk_size"])


# --------------------------------------------------------------------------
# Networks: MLP Mapper, Initial Fusion, DENNL.


class FlooredOutput(nnx.Module):
  """Wraps a parameter network so that every emission table it returns is floored."""

  def __init__(self, inner: nnx.Module, floor: float):
    self.inner = inner
    self.floor = floor

  def __call__(self, embedding, obs, mask, key):
    return floor_emission(self.inner(embedding, obs, mask, key), self.floor)

  def start_params(self, embedding):
    """lambda_0 = g(e): what the network says before seeing any step."""
    return floor_emission(self.inner.start(embedding), self.floor)


def build_network(kind: str, codec, start, embed_dim: int, cfg: dict, key) -> nnx.Module:
  rngs = nnx.Rngs(params=key)
  hidden, start_hidden = (cfg["hidden"],) * 2, (cfg["start_hidden"],) * 2
  layer = dj.EMLayer(gradient=cfg["gradient"], num_samples=cfg["spsa_samples"])
  if kind == "mlp_mapper":
    inner = dj.EmbeddingMapper(codec, start, embed_dim, hidden=start_hidden, rngs=rngs)
  elif kind == "initial_fusion":
    inner = dj.InitialFusion(codec, start, embed_dim, num_stages=cfg["num_stages"],
                            hidden=start_hidden, layer=layer, rngs=rngs)
  elif kind == "dennl":
    inner = dj.DENNL(codec, start, embed_dim, num_stages=cfg["num_stages"], hidden=hidden,
                    start_hidden=start_hidden, latent_dim=cfg["latent_dim"], layer=layer,
                    rngs=rngs)
  else:
    raise ValueError(f"unknown HSMM network {kind!r}; choose from {KINDS}")
  return FlooredOutput(inner, cfg["prob_floor"])


def _loss_fn(cfg):
  if cfg["loss"] == "likelihood":
    return Tr.likelihood_loss
  if cfg["loss"] == "heldout":
    return Tr.heldout_step_loss
  if cfg["loss"] == "predictive":
    return functools.partial(predictive_loss, num_targets=cfg["predictive_targets"],
                             idle_index=cfg.get("idle"), cold_weight=cfg["cold_weight"])
  raise ValueError(f"unknown loss {cfg['loss']!r}; choose likelihood, heldout or predictive")


@functools.partial(jax.jit, static_argnums=0)
def _network_chunk(graphdef, state, key, chunk, index):
  embedding, obs, mask = chunk
  params = nnx.merge(graphdef, state)(embedding, obs, mask, jax.random.fold_in(key, index))
  return next_step_distribution(params, obs, mask)


@functools.partial(jax.jit, static_argnums=0)
def _params_chunk(graphdef, state, key, chunk, index):
  embedding, obs, mask = chunk
  return nnx.merge(graphdef, state)(embedding, obs, mask, jax.random.fold_in(key, index))


@functools.partial(jax.jit, static_argnums=0)
def _first_step_chunk(graphdef, state, chunk, index):
  del index
  return first_step_distribution(nnx.merge(graphdef, state).start_params(chunk))


def network_scores(graphdef, state, embedding, obs, mask, key, chunk_size: int = 256,
                   start_state=None):
  """(U, C) forecasts of a trained network for every user (numpy).

  A user with an empty history gets the first-step distribution of
  ``lambda_0 = g(e)`` (its initial distribution times the emission means)
  of ``start_state`` (default ``state``): an EM layer needs at least one
  valid step.
  """
  out = np.zeros((obs.shape[0], obs.shape[2]))
  empty = ~np.asarray(mask).any(1)
  rows = np.flatnonzero(~empty)
  if rows.size:
    out[rows] = map_users(functools.partial(_network_chunk, graphdef, state, key),
                          (embedding[rows], obs[rows], mask[rows]), chunk_size, by_length=True)
  rows = np.flatnonzero(empty)
  if rows.size:
    out[rows] = map_users(functools.partial(_first_step_chunk, graphdef,
                                            state if start_state is None else start_state),
                          embedding[rows], chunk_size)
  return out


def _cold_start_choice(runs, val_task, pop, cfg) -> dict:
  """Which forecast users with no history get: some run's ``g(e)``, or popularity.

  Every evaluated validation user is scored as if it had no history (its
  validation step forecast from the embedding alone) under each run's
  ``lambda_0`` and under popularity; the best mean ``select_by`` wins, ties
  to the earlier candidate (runs in grid order, popularity last).
  Returns ``{"run": index, or None for popularity, "validation": {"run <j>":
  value, ..., "popularity": value}}``.
  """
  rows = np.flatnonzero(evaluated(val_task))
  base = np.broadcast_to(pop, (val_task.strengths.shape[0], pop.shape[0]))
  value = {}
  for j, run in enumerate(runs):
    scores = base.copy()
    scores[rows] = map_users(functools.partial(_first_step_chunk, run["graphdef"], run["state"]),
                             run["embed"](val_task.embeddings)[rows], cfg["chunk_size"])
    value[f"run {j}"] = _mean_metric(scores, val_task, pop, cfg)
  value["popularity"] = _mean_metric(base, val_task, pop, cfg)
  best = max(value, key=lambda k: (value[k], -list(value).index(k)))
  return {"run": None if best == "popularity" else int(best.split()[1]), "validation": value}


def _standardise(embeddings, mean, scale):
  return ((np.asarray(embeddings, np.float32) - mean) / scale).astype(np.float32)


def _mean_metric(scores, task, pop, cfg) -> float:
  """Mean ``select_by`` of forecasts ``scores`` (U, C) on ``task``'s evaluated users."""
  ranked = rank_active(scores + TIE_BREAK * pop, cfg.get("idle"))
  return float(np.mean(rmetrics.per_user_metrics(ranked, task)[cfg["select_by"]]))


def _validation_score(run, task, pop, cfg):
  obs, hist = history_inputs(task)
  return _mean_metric(network_scores(run["graphdef"], run["state"], run["embed"](task.embeddings),
                                     obs, hist, run["key"], cfg["chunk_size"]), task, pop, cfg)


def _train_one(kind, key, cfg, data: Tr.Batch, val_task, codec, start, pop, embed):
  key_init, key_order, key_steps, key_eval = jax.random.split(key, 4)
  model = build_network(kind, codec, start, data.embedding.shape[1], cfg, key_init)
  graphdef, state = nnx.split(model)
  optimizer = Tr.make_optimizer(cfg["learning_rate"])
  step_fn = Tr.make_train_step(graphdef, _loss_fn(cfg), optimizer)
  run = {"graphdef": graphdef, "state": state, "key": key_eval, "embed": embed,
         "initial_state": state}
  indices = loop.epoch_batches(key_order, data.mask.shape[0], cfg["batch_size"])
  setting = {k: v for k, v in cfg.items() if k not in ("log", "workdir", "progress")}
  workdir = None
  if cfg.get("workdir"):
    from dennl_jax.checkpoint import fingerprint
    setting.update(kind=kind, key=fingerprint(key), data=fingerprint(tuple(data[:3])))
    setting.pop("num_steps")       # a finished run may be continued further
    workdir = os.path.join(cfg["workdir"], f"{kind}-{cfg['loss']}-{fingerprint(setting)[:8]}")
  result = loop.fit(
      step_fn, state, optimizer.init(state), num_steps=cfg["num_steps"],
      batch_at=lambda i: Tr.Batch(*(jnp.asarray(x[indices(i)]) for x in data[:3])),
      key=key_steps,
      validation=loop.Validation(
          lambda s: _validation_score(dict(run, state=s), val_task, pop, cfg),
          every=cfg["eval_every"], at_start=True, name=f"val {cfg['select_by']}"),
      checkpointing=loop.Checkpointing(workdir, config=setting) if workdir else None,
      reporting=loop.Reporting(name=f"{kind}/{cfg['loss']}", log=cfg.get("log"),
                               progress=cfg.get("progress", False)))
  return dict(run, state=result.best_state, final_state=result.state, value=result.best_value,
              steps=result.best_step, curve=result.curve, skipped=result.skipped,
              seconds=result.seconds)


def fit_network(kind: str, key, train_task: NextStepTask, val_task: NextStepTask, config=None):
  """Train ``kind`` for every setting of ``config["grid"]``; keep the best on validation.

  Training data: the ``history_mask`` steps of ``train_users`` with at least
  one such step.  Embeddings are standardised with the training users'
  mean and scale (stored, and applied unchanged to every task).
  """
  cfg = dict(_settings(config), idle=idle_index(train_task, config))
  grid = list((config or {}).get("grid") or DEFAULT_GRID)
  obs, hist = history_inputs(train_task)
  rows = np.flatnonzero(np.asarray(train_task.train_users) & hist.any(1))
  if rows.size == 0:
    raise ValueError(f"{kind}: no training user has a training step")
  emb = np.asarray(train_task.embeddings, np.float32)
  mean, scale = emb[rows].mean(0), emb[rows].std(0) + 1e-6
  embed = functools.partial(_standardise, mean=mean, scale=scale)
  key_start, key_runs = jax.random.split(key)
  start = dj.starts.pooled_start(key_start, obs[rows], hist[rows], num_states=cfg["num_states"],
                                 max_duration=cfg["max_duration"],
                                 duration_rate=cfg["duration_rate"], max_points=cfg["max_points"],
                                 family=dj.Multinomial, smoothing=cfg["start_smoothing"])
  codec = dj.ParamCodec(start)
  pop = popularity_vector(train_task)
  data = Tr.Batch(embed(emb[rows]), obs[rows], hist[rows])
  runs = []
  for j, override in enumerate(grid):
    run_cfg = dict(cfg, **override)
    # Every setting starts from the same initial weights: differences are the setting's.
    run = _train_one(kind, key_runs, run_cfg, data, val_task, codec, start, pop, embed)
    runs.append((run["value"], -j, run_cfg, run))
  _, _, best_cfg, best = max(runs, key=lambda r: r[:2])
  cold_start = _cold_start_choice([r[3] for r in runs], val_task, pop, cfg)
  return {"cold_start": cold_start,
          "cold_state": None if cold_start["run"] is None else runs[cold_start["run"]][3]["state"],
          "graphdef": best["graphdef"], "state": best["state"], "key": best["key"],
          "initial_state": best["initial_state"], "final_state": best["final_state"],
          "embed": embed, "popularity": pop, "chunk_size": cfg["chunk_size"], "start": start,
          "selected": {k: v for k, v in best_cfg.items()
                       if k not in ("log", "idle", "workdir", "progress")},
          "selected_steps": best["steps"], "validation": best["value"],
          "grid_results": [{"setting": g, "validation": r[0], "steps": r[3]["steps"],
                            "seconds": r[3]["seconds"], "skipped": r[3]["skipped"],
                            "curve": r[3]["curve"]} for g, r in zip(grid, runs)]}


def predict_network(fitted, task: NextStepTask):
  obs, hist = history_inputs(task)
  scores = network_scores(fitted["graphdef"], fitted["state"], fitted["embed"](task.embeddings),
                          obs, hist, fitted["key"], fitted["chunk_size"],
                          start_state=fitted.get("cold_state"))
  if "cold_start" in fitted and fitted["cold_start"]["run"] is None:   # popularity validated best
    scores[~hist.any(1)] = fitted["popularity"]
  return scores + TIE_BREAK * fitted["popularity"]


def decode_network(fitted, task: NextStepTask):
  """(U, T) Viterbi states of every evaluated user's history under its network parameters."""
  obs, hist = history_inputs(task)
  rows = np.flatnonzero(evaluated(task) & hist.any(1))
  params = None
  if rows.size:
    emb = fitted["embed"](task.embeddings)
    params = map_users(functools.partial(_params_chunk, fitted["graphdef"], fitted["state"],
                                         fitted["key"]),
                       (emb[rows], obs[rows], hist[rows]), fitted["chunk_size"], by_length=True)
  return _decoded(params, obs, hist, rows, fitted["chunk_size"])


register("conventional_em", Predictor(
    fit_conventional_em, predict_conventional_em, False, True,
    "per-user Multinomial/Poisson HSMM, EM with k-means++ and Dirichlet restarts",
    decode_conventional_em))
for _kind, _desc in (("mlp_mapper", "HSMM parameters from the embedding alone (no EM)"),
                     ("initial_fusion", "HSMM start from the embedding, then EM layers"),
                     ("dennl", "DENNL: EM layers fused with the embedding at every stage")):
  register(_kind, Predictor(functools.partial(fit_network, _kind), predict_network, True, False,
                            _desc, decode_network))
