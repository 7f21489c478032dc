r"""Table 2: next-category prediction on MovieLens and the simulated marketplace.

  python -m experiments.table2 --quick --dataset=movielens \
      --data_dir=../shared/data/movielens-latest-small --output_dir=/tmp/table2_quick_movielens
  python -m experiments.table2 --quick --dataset=marketplace --output_dir=/tmp/table2_quick_marketplace
  python -m experiments.table2 --quick --dataset=movielens --config.unit=session \
      --data_dir=../shared/data/movielens-latest-small --output_dir=/tmp/table2_quick_movielens_session

(see experiments/configs/table2.py for the variants and fields).

Pipeline: events -> per-user strength sequences (``dennl_jax.recsys.events``;
MovieLens: whole blocks of 10 ratings, or sessions) -> time split (last step
= test, second-last = validation) -> per role draw: user roles
(:mod:`dennl_jax.recsys.protocol`: train / cold / too short) -> per seed:
GraphSAGE on the training steps of the training users only, its user
embeddings shared by every method -> every registered method fitted on the
training steps, hyperparameters and training length chosen on the
validation step -> scored on the test step of the training users (main
table) and of the cold users shown h = 0, 1, 2 steps.  Per-user metrics are
averaged over seeds, pooled over role draws (draws x users) and bootstrapped
over users (a user's rows of every draw resampled together).  Outputs (``--output_dir``):
table2.json, table2.md, table2_buckets.json, table2_cold.json, plots, config.json.
"""
from __future__ import annotations

import time
import zlib

import jax
import numpy as np

from dennl_jax.recsys import events, graphsage
from dennl_jax.recsys import metrics as rm
from dennl_jax.recsys import protocol, registry, step_report
from dennl_jax.recsys.baselines import active_history, category_embeddings, dominant_popularity
from dennl_jax.recsys.task import dominant_set, evaluated, make_tasks, training_task
from experiments import common
from experiments import table2_report as report
from experiments.table2_cache import EMBEDDINGS, ResultCache, draw_dir

NAME = "table2"


# ------------------------------------------------------------------ data


def load_data(config, key):
  """(log, seqs, split, extra) for ``config.dataset``; extra holds user features / truth."""
  extra = {}
  if config.dataset == "movielens":
    from dennl_jax.recsys.movielens import load_movielens
    log = load_movielens(config.data_dir)
  elif config.dataset == "marketplace":
    from dennl_jax.recsys import marketplace
    log, truth = marketplace.simulate_marketplace(key, marketplace_config(config))
    extra["truth"] = truth
  else:
    raise common.ConfigError(f"dataset must be 'movielens' or 'marketplace'; got {config.dataset!r}")
  idle = None
  if config.dataset == "marketplace" and config.idle_days:
    from dennl_jax.recsys.marketplace import IDLE_CATEGORY
    idle = IDLE_CATEGORY
  unit, per_step = sequence_unit(config)
  seqs = events.to_sequences(log, unit=unit, events_per_step=per_step,
                             max_steps=config.max_steps, idle_category=idle,
                             session_gap=config.session_gap, partial=config.partial,
                             tie_order=config.tie_order)
  split = events.time_split(seqs)
  if idle is not None:
    # time_split puts the validation target on the last active day before the
    # test day (itself the last active day): targets are days with events, the
    # paper's hit needs an interaction; ranking is over the 16 sub-categories
    # (see rank_scores)
    extra["idle_index"] = list(seqs.category_names).index(idle)
  if config.dataset == "marketplace":
    extra["user_features"] = marketplace_user_features(extra["truth"], seqs)
  return log, seqs, split, extra


def sequence_unit(config):
  """(unit, events_per_step): ``config.unit == "auto"`` picks the dataset's default.

  MovieLens: blocks of 10 ratings (BUILD_NOTES "Deviations from the paper": by
  calendar day 55% of users have a single step; blocks of 10 give every user
  validation and test steps).  Marketplace: calendar days, as in the paper.
  "session": a new step after ``config.session_gap`` seconds without events.
  """
  if config.unit not in ("auto", "day", "events", "session"):
    raise common.ConfigError(f"unit must be 'auto', 'day', 'events' or 'session'; "
                             f"got {config.unit!r}")
  if config.unit != "auto":
    return config.unit, config.events_per_step
  return ("events", 10) if config.dataset == "movielens" else ("day", config.events_per_step)


def marketplace_config(config):
  import dataclasses
  from dennl_jax.recsys import marketplace
  return dataclasses.replace(marketplace.MarketplaceConfig(), num_users=config.marketplace_users,
                             num_days=config.marketplace_days)


def rank_scores(scores, idle_index):
  """Scores with the idle category ranked last: targets are active days, so
  "no action" cannot be their dominant category (conditioning on activity)."""
  if idle_index is None:
    return scores
  scores = np.array(scores, np.float64)
  scores[:, idle_index] = scores.min() - 1.0
  return scores


def marketplace_user_features(truth, seqs):
  """(U, F_u) user features in ``seqs`` order (the simulator's features, by user id)."""
  feats = np.asarray(truth.user_features, np.float32)
  ids = np.asarray(truth.user_ids) if hasattr(truth, "user_ids") else np.arange(len(feats))
  order = {u: i for i, u in enumerate(ids.tolist())}
  return feats[[order[u] for u in np.asarray(seqs.user_ids).tolist()]]


# ------------------------------------------------------------ embeddings


def embeddings_for_seed(key, log, seqs, split, roles, config, user_features, *, workdir=None,
                        progress=False):
  """GraphSAGE trained on TRAIN users' training steps; embeddings for every task.

  Returns dict(val (U, d), test (U, d), cold {h: (U, d)}, category (C, d), report).
  """
  include_val = bool(config.test_embedding_includes_val)
  train_ev, test_ev, cold_ev = protocol.graph_event_masks(
      seqs.event_user, seqs.event_step, split, roles, include_val=include_val)
  graph = lambda mask: graphsage.graph_from_events(log, seqs, mask, user_features)
  train_graph = graph(train_ev)
  model, val_emb, rep = graphsage.train_graphsage(key, train_graph, dict(config.graphsage),
                                                  log=common.log, progress=progress,
                                                  workdir=common.subdir(workdir, "graphsage"))
  test_emb = graphsage.embed_users(model, graph(test_ev)) if include_val else val_emb
  if config.cold_embedding == "all_before_test":
    everything = graphsage.embed_users(model, graph(cold_ev))
    cold = {h: everything for h in config.cold_history}
  elif config.cold_embedding == "shown":
    cold = {}
    for h in config.cold_history:
      _, _, ev = protocol.graph_event_masks(seqs.event_user, seqs.event_step, split, roles,
                                            include_val=include_val, cold_shown=h)
      cold[h] = graphsage.embed_users(model, graph(ev))
  else:
    raise common.ConfigError(f"cold_embedding must be 'shown' or 'all_before_test'; "
                             f"got {config.cold_embedding!r}")
  items = graphsage.item_embeddings(model, train_graph)
  cats = category_embeddings(items, log.catalogue.categories)
  link = dict(item_embeddings=items, item_categories=np.asarray(log.catalogue.categories),
              link_scale=float(np.exp(model.log_scale[...])), link_bias=float(model.bias[...]))
  rep["graph_events"] = {"train": int(train_ev.sum()), "test": int(test_ev.sum()),
                         "cold": int(cold_ev.sum())}
  return dict(val=val_emb, test=test_emb, cold=cold, category=cats, link=link, report=rep)


def phase_accuracy(predictor, fitted, task, seqs, truth) -> float:
  """Labelling accuracy (best relabelling per user) of decoded history steps vs true phases."""
  from dennl_jax.recsys.marketplace import phases_of_steps
  from dennl_jax.labelling import labelling_accuracy
  decoded = np.asarray(predictor.decode(fitted, task))
  true = phases_of_steps(truth, seqs)
  keep = evaluated(task)
  mask = np.asarray(task.history_mask)[keep] & (decoded[keep] >= 0)
  return 100.0 * labelling_accuracy(true[keep], np.maximum(decoded[keep], 0),
                                    int(max(true.max(), decoded.max()) + 1), mask)


def true_hsmm_predictor(truth, seqs):
  """Oracle row for the marketplace: each user's *generating* HSMM forecasts the next day.

  Emission of phase k: ``active_k * sub-category mix_k`` over the 16
  sub-categories and ``1 - active_k`` on "no action" (the purchase weighting
  of the strengths is ignored); the generator's own initial distribution,
  transitions and Poisson durations.  It bounds what any HSMM estimator can
  reach on these data (up to the sequences starting at the first active day
  rather than day 0); users with no history get popularity.
  """
  from dennl_jax.recsys.marketplace import CATEGORY_NAMES
  from dennl_jax.recsys import hsmm_predictors as hp
  rows = np.searchsorted(truth.user_ids, np.asarray(seqs.user_ids))
  active = np.asarray(truth.active_probs)[rows]
  probs = np.concatenate([active[..., None] * np.asarray(truth.subcategory_probs)[rows],
                          1.0 - active[..., None]], axis=-1)
  order = [list(CATEGORY_NAMES).index(n) for n in seqs.category_names]
  probs = np.clip(probs[..., order], 1e-6, None)
  probs = probs / probs.sum(-1, keepdims=True)
  params = hp.multinomial_hsmm(np.asarray(truth.initial)[rows], np.asarray(truth.transition)[rows],
                               probs, np.asarray(truth.duration_rate)[rows],
                               int(truth.max_duration))
  forecast = jax.jit(lambda chunk, index: hp.next_step_distribution(*chunk))

  def fit(key, train_task, val_task, config):
    return {"popularity": dominant_popularity(train_task)}

  def predict(fitted, task):
    hist = np.asarray(task.history_mask)
    users = np.flatnonzero(evaluated(task) & hist.any(1))
    scores = np.broadcast_to(fitted["popularity"], task.strengths.shape[::2]).copy()
    if users.size:
      obs = np.where(hist[users, :, None], task.strengths[users], 0.0).astype(np.float32)
      chunk = (jax.tree_util.tree_map(lambda x: np.asarray(x)[users], params), obs, hist[users])
      scores[users] = hp.map_users(forecast, chunk, 256, by_length=True)
    return scores + 1e-9 * fitted["popularity"]

  return registry.Predictor(fit, predict, False, True, "the user's generating HSMM (oracle)")


# ------------------------------------------------------------------ run

BEST_CONSTANT = "best_constant"


def best_constant(main_task, cold_tasks, idle_index=None) -> dict:
  """Per-user metrics of the best constant ranking, chosen on each task's own targets.

  Categories ordered by how often they are the target's dominant one (tied
  maxima share the unit) over the task's evaluated users: no constant
  ranking scores more top-k or MRR on those users, so a method near this row
  is near saturation.  It reads the targets: a ceiling, not a method.
  """
  def one(task):
    keep = evaluated(task)
    dom = dominant_set(task)[keep].astype(np.float64)
    freq = (dom / np.maximum(dom.sum(1, keepdims=True), 1.0)).sum(0)
    scores = np.broadcast_to(freq, task.strengths.shape[::2])
    return rm.per_user_metrics(rank_scores(scores, idle_index), task)
  cold = {h: one(t) for h, t in cold_tasks.items()}
  return {"main": one(main_task), "cold": cold, "fit_seconds": 0.0, "predict_seconds": 0.0,
          "fell_back": 0, "cold_fell_back": {h: 0 for h in cold}, "selected": {}}


def role_key(k_roles, draw: int):
  """The key of role draw ``draw``: draw 0 is a single-draw run's key."""
  return k_roles if draw == 0 else jax.random.fold_in(k_roles, draw)


def draw_roles(config, k_roles, lengths, draw: int) -> np.ndarray:
  """(U,) roles of role draw ``draw`` (:func:`dennl_jax.recsys.protocol.assign_roles`)."""
  return protocol.assign_roles(role_key(k_roles, draw), lengths, min_steps=config.min_steps,
                               cold_fraction=config.cold_fraction,
                               cold_min_steps=max(config.min_steps, max(config.cold_history) + 1))


def loss_setting(name: str) -> dict:
  """A network's grid entry from a loss name; ``+cold`` adds the h = 0 term.

  ``"predictive+cold"``: the predictive loss plus lambda_0's no-history
  forecast of the same targets (``cold_weight`` 1, hsmm_family.predictive_loss).
  """
  cold = name.endswith("+cold")
  base = name[:-len("+cold")] if cold else name
  if cold and base != "predictive":
    raise common.ConfigError(f"loss {name!r}: '+cold' goes with the predictive loss only")
  return {"loss": base, "cold_weight": 1.0 if cold else 0.0}


def method_config(config, name, side, link, idle_index=None):
  """The plain dict passed to ``fit``: the method's config plus side information."""
  cfg = dict(config.method_config[name]) if name in config.method_config else {}
  # ConfigDict turns nested dicts/lists into ConfigDicts/tuples; predictors take plain values.
  cfg = {k: (dict(v) if hasattr(v, "items") else v) for k, v in cfg.items()}
  if "losses" in cfg:       # the networks: one training run per loss (hsmm_predictors grid)
    cfg["grid"] = [loss_setting(loss) for loss in cfg.pop("losses")]
  if name in ("last_step", "markov"):
    cfg["idle_index"] = idle_index
  return dict(cfg, **side, **(link if name == "graphsage" else {}))


def run_seed(seed_key, seed, log, seqs, split, roles, config, extra, methods, cache=None, *,
             workdir=None, progress=False, draw=0):
  """{method: {"main": per-user dict, "cold": {h: per-user dict}, "fit_seconds", ...}}.

  Besides the methods: ``best_constant`` (the constant ranking that scores
  best on the evaluated users' own targets: the ceiling of every constant
  ranking, popularity included), ``_users`` (the user index of each main-table
  row) and ``_cold_users`` ({h: user index of each cold row}).
  ``cache`` (:class:`~experiments.table2_cache.ResultCache`) supplies finished results and
  stores new ones.
  ``workdir``: checkpoints and metrics of GraphSAGE and of every trained
  method under ``workdir/[draw<d>/]seed<seed>/<method>`` (rerun to resume).
  ``draw``: the role draw (``roles``), for the cache and the log only.
  """
  workdir = common.subdir(workdir, *draw_dir(draw), f"seed{seed}")
  cache = cache or ResultCache(None, config)
  tag = f"draw {draw} seed {seed}"
  k_graph, k_methods = jax.random.split(seed_key)
  emb = cache.load(seed, EMBEDDINGS, draw)
  if emb is None:
    if config.cached_only:
      raise common.ConfigError(f"cached_only: {tag} has no cached GraphSAGE embeddings "
                               f"under {cache.directory}; lower --config.seeds or --config.draws")
    common.log(f"[table2] {tag}: GraphSAGE on training events")
    emb = embeddings_for_seed(k_graph, log, seqs, split, roles, config,
                              extra.get("user_features"), workdir=workdir, progress=progress)
    cache.save(seed, EMBEDDINGS, emb, draw)
  else:
    common.log(f"[table2] {tag}: GraphSAGE embeddings from the cache")
  train_users = roles == protocol.TRAIN
  val_task, test_task = make_tasks(seqs, split, emb["val"], train_users, test_embeddings=emb["test"])
  val_task = protocol.only_users(val_task, train_users)
  main_task = protocol.only_users(test_task, train_users)
  train_task = training_task(val_task)
  pop = dominant_popularity(train_task)     # what h = 0 users of history methods get
  side = {"popularity": pop, "category_embeddings": emb["category"], "log": common.log}
  # active history steps of each evaluated user, aligned with the per-user metric arrays
  active = active_history(main_task, extra.get("idle_index")).sum(1)
  out = {"_graphsage": emb["report"], "_history_length": active[evaluated(main_task)],
         "_users": np.flatnonzero(evaluated(main_task))}
  cold_users = roles == protocol.COLD
  cold_tasks = {h: protocol.cold_task(test_task, cold_users, h, emb["cold"][h],
                                     extra.get("idle_index"))
                for h in config.cold_history} if cold_users.any() else {}
  out["_cold_users"] = {h: np.flatnonzero(evaluated(t)) for h, t in cold_tasks.items()}
  out[BEST_CONSTANT] = best_constant(main_task, cold_tasks, extra.get("idle_index"))
  for j, name in enumerate(methods):
    predictor = registry.get(name)
    cached = cache.load(seed, name, draw)
    if cached is not None:
      common.log(f"[table2] {tag}: {name} from the cache "
                 f"(top1 {100 * cached['main']['top1'].mean():.1f})")
      out[name] = cached
      continue
    if config.cached_only:
      out.setdefault("_failed", {})[name] = f"not run: no cached result for {tag}"
      continue
    common.log(f"[table2] {tag}: {name} ({j + 1}/{len(methods)})")
    try:
      out[name] = _run_method(predictor, name, k_methods, train_task, val_task, main_task,
                              cold_tasks, pop,
                              dict(side, workdir=common.subdir(workdir, name), progress=progress),
                              emb, seqs, extra, config, tag)
      cache.save(seed, name, out[name], draw)
    except Exception as e:          # noqa: BLE001 -- recorded, reported, optionally re-raised
      if config.fail_fast:
        raise
      common.log(f"[table2] {tag}: {name} FAILED: {type(e).__name__}: {e}")
      out.setdefault("_failed", {})[name] = f"{type(e).__name__}: {e}"
  return out


def _run_method(predictor, name, k_methods, train_task, val_task, main_task, cold_tasks, pop,
                side, emb, seqs, extra, config, tag):
  """Fit one method, score the main and cold tasks; returns its per-seed result dict."""
  start = time.time()
  # the key depends on the method's name, not its position, so a run of a
  # subset of methods reproduces the same numbers for those methods
  fitted = predictor.fit(jax.random.fold_in(k_methods, zlib.crc32(name.encode()) & 0x7FFFFFFF),
                         train_task, val_task,
                         method_config(config, name, side, emb["link"],
                                       extra.get("idle_index")))
  fit_seconds = time.time() - start
  start = time.time()
  scores, fell_back = registry.predict_with_fallback(predictor, fitted, main_task, pop)
  scores = rank_scores(scores, extra.get("idle_index"))
  res = {"main": rm.per_user_metrics(scores, main_task), "fit_seconds": fit_seconds,
         "fell_back": int(fell_back.sum()), "cold": {}, "cold_fell_back": {}}
  for h, task in cold_tasks.items():
    s, fb = registry.predict_with_fallback(predictor, fitted, task, pop)
    res["cold"][h] = rm.per_user_metrics(rank_scores(s, extra.get("idle_index")), task)
    res["cold_fell_back"][h] = int(fb.sum())
  res["predict_seconds"] = time.time() - start
  if predictor.decode is not None and "truth" in extra:
    res["phase_accuracy"] = phase_accuracy(predictor, fitted, main_task, seqs, extra["truth"])
  res["selected"] = {k: v for k, v in (fitted.get("selected") or {}).items()
                     if isinstance(v, (int, float, str))} if isinstance(fitted, dict) else {}
  for k in ("alpha", "beta", "selected_steps", "validation"):
    if isinstance(fitted, dict) and k in fitted and np.isscalar(fitted[k]):
      res["selected"][k] = fitted[k]
  if isinstance(fitted, dict) and "cold_start" in fitted:    # h = 0: which run's g(e), or popularity
    run = fitted["cold_start"]["run"]
    setting = {} if run is None else fitted["grid_results"][run]["setting"]
    res["selected"]["cold_start"] = "popularity" if run is None else (
        setting.get("loss", "default") + ("+cold" if setting.get("cold_weight") else ""))
  common.log(f"[table2] {tag}: {name} top1 {100 * res['main']['top1'].mean():.1f} "
             f"top3 {100 * res['main']['top3'].mean():.1f} fit {fit_seconds:.1f}s")
  return res


def run(config, output_dir, *, workdir=None, progress=False):
  methods = common.names(config.methods)
  if not methods:
    raise common.ConfigError("no methods given")
  for name in methods:
    registry.get(name)          # unknown names fail before any work
  if config.draws < 1:
    raise common.ConfigError(f"draws must be >= 1; got {config.draws}")
  root = jax.random.key(config.seed)
  k_data, k_roles, k_seeds, k_boot = jax.random.split(root, 4)
  start = time.time()
  log, seqs, split, extra = load_data(config, k_data)
  lengths = np.asarray(seqs.mask).sum(1)
  if "truth" in extra and config.true_hsmm:
    registry.register("true_hsmm", true_hsmm_predictor(extra["truth"], seqs))
    methods = methods + ("true_hsmm",)
  cache = ResultCache(output_dir if config.resume else None, config)
  # Every draw shares the data, split and training keys; only the roles differ.
  runs, counts = [], None
  for d in range(config.draws):
    roles = draw_roles(config, k_roles, lengths, d)
    counts = protocol.role_counts(roles)
    common.log(f"[table2] {config.dataset}: {len(lengths)} users, role draw {d + 1}/{config.draws}:"
               f" {counts}, {time.time() - start:.1f}s")
    runs.append([run_seed(jax.random.fold_in(k_seeds, s), s, log, seqs, split, roles, config,
                          extra, methods, cache, workdir=workdir, progress=progress, draw=d)
                 for s in range(config.seeds)])
  failed = {}
  for r in (r for draw in runs for r in draw):
    failed.update(r.get("_failed", {}))
  if failed:
    common.log(f"[table2] methods left out (failed in some seed or draw): {sorted(failed)}")
  methods = tuple(m for m in methods if m not in failed)
  if not methods:
    raise RuntimeError(f"every method failed: {failed}")
  methods = methods + (BEST_CONSTANT,)
  unit, per_step = sequence_unit(config)
  meta = dict(dataset=config.dataset, preset=config.preset, unit=unit,
              events_per_step=per_step if unit == "events" else None,
              partial=config.partial if unit == "events" else None,
              tie_order=config.tie_order if unit == "events" else None,
              session_gap=config.session_gap if unit == "session" else None,
              target="dominant category of the test step (primary); any category with strength > 0 "
                     "(hit@k, the paper's definition)",
              split=("per user: last valid step = test, "
                     + ("last active day before it" if "idle_index" in extra else "second-last")
                     + " = validation, earlier steps = training"),
              seeds=list(range(config.seeds)), draws=int(config.draws),
              num_users=int(len(lengths)),
              num_users_evaluated=int(counts["train"]), users_per_role=counts,
              steps=step_report.step_statistics(log, seqs, split),
              ranked_categories=len(seqs.category_names) - ("idle_index" in extra),
              num_categories=len(seqs.category_names), category_names=list(seqs.category_names),
              split_report=dict(split.report), cold_embedding=config.cold_embedding,
              idle_category=(seqs.category_names[extra["idle_index"]] if "idle_index" in extra
                             else None),
              sequence_report=dict(getattr(seqs, "report", {}) or {}),
              tie_break="stable sort: lower category index first; methods add 1e-9 * popularity",
              failed_methods=failed,
              seconds=time.time() - start,
              graphsage=[common.to_jsonable({k: v for k, v in r["_graphsage"].items()})
                         for draw in runs for r in draw])
  results = report.aggregate(runs, methods, k_boot, config, meta)
  text = report.markdown(results, config)
  print(text)
  if output_dir:
    report.write(results, text, output_dir)
    common.save_config(config, output_dir)
    common.log(f"[table2] wrote {output_dir}")
  return results


def main():
  from absl import app, flags
  # A persistent XLA cache by default: most of a quick run's first minutes are
  # compilation, which a rerun then skips (--compilation_cache_dir= turns it off).
  binary = common.BinaryFlags(NAME, output_dir=None, variants={"quick": "quick", "tiny": "tiny"},
                              compilation_cache_dir=common.XLA_CACHE_DIR, tracked=True)
  dataset = flags.DEFINE_string("dataset", None, "Shorthand for --config.dataset.")
  data_dir = flags.DEFINE_string("data_dir", None, "Shorthand for --config.data_dir.")

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    common.keep_freed_memory()
    try:
      config = binary.config()
      with config.unlocked():
        if dataset.value is not None:
          config.dataset = dataset.value
        if data_dir.value is not None:
          config.data_dir = data_dir.value
      common.enable_compilation_cache(binary.compilation_cache_dir)
      run(config, binary.output_dir, **binary.run_options())
    except common.ConfigError as e:
      raise app.UsageError(str(e)) from e

  app.run(_main)


if __name__ == "__main__":
  main()
