r"""Table 1 of the DENNL paper on synthetic HSMM data (section 6.1).

  python -m experiments.synthetic_table1 --quick --output_dir=/tmp/table1_quick
  python -m experiments.synthetic_table1 --output_dir=/work/results/table1_full   # full scale
  python -m experiments.synthetic_table1 \
      --config=experiments/configs/synthetic_table1.py:quick --config.seed=1 --output_dir=DIR

The config (experiments/configs/synthetic_table1.py) lists every knob and its
variants; ``--quick`` is shorthand for its ``quick`` variant.

For every setting (T50, T100, T400: clean sequences of that length; noise20,
noise10: that fraction of observations replaced by other observations of the
same sequence, at length ``config.noise_length``) it draws training and
held-out users from one synthetic world, trains every method, decodes the
held-out users' sequences with Viterbi under each method's parameters and
scores the labelling accuracy (best one-to-one relabelling per user).

Writes to --output_dir: table1.json ({method: {setting: accuracy}}),
table1.md (ours beside the paper's Table 1, with fitting times),
training_curves.png, curves.json, timings.json and config.json.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dennl_jax as dj
from dennl_jax import starts
from dennl_jax.per_user_em import best_restart
from dennl_jax import synthetic as S
from experiments import common
from experiments import workers
from experiments import table1_report as report
from experiments.configs import synthetic_table1 as config_lib

SETTINGS = config_lib.SETTINGS
# Rows ``method@oracle``: candidate and step chosen by the validation users' labelling
# accuracy (their true states), beside the label-free selection of the headline.
ORACLE_SELECTION = report.ORACLE_SELECTION
# Rows ``method@untrained``: the network at its initialisation (what training adds).
UNTRAINED = report.UNTRAINED
REFERENCE_ROWS = {"oracle": "Oracle (true parameters)",
                  "pooled_start": "Pooled start (one shared model)"}
LOSSES = {"likelihood": dj.likelihood_loss, "heldout": dj.heldout_step_loss,
          "regression": dj.regression_loss}


class Setting(NamedTuple):
  """What a method sees in one setting (one sequence length / noise level) of one seed."""
  name: str
  config: object          # the run's ConfigDict
  synthetic: S.SyntheticConfig
  # (8, 2) the setting's keys, one per use (fixed, so a method's numbers do not depend
  # on which other methods run): 0 data, 1 pooled start, 2 network initialisation,
  # 3 conventional EM, 4 EM Mapping's per-user EM, 5 training, 6 prediction,
  # 7 validation (held-out steps of the validation users).
  keys: jax.Array
  train: dj.Batch         # training users (embedding, obs, mask)
  test: dj.Batch          # held-out users (scored)
  start: object           # pooled start: one HSMM shared by every method
  codec: dj.ParamCodec
  optimizer: object       # unused since model selection (kept for the smoke tests' wiring)
  curves: dict            # method -> {"step": [...], "loss": [...]}, filled by _train
  val: dj.Batch | None = None   # validation users: model selection only
  val_states: jax.Array | None = None   # their true states (accuracy / oracle rows only)
  workdir: str | None = None    # checkpoints + metrics of this seed and setting (--workdir)
  progress: bool = False        # tqdm bars (--progress)
  # Oracle selection (config.oracle_selection): candidate -> (validation accuracy, updates
  # done, model) of its most accurate evaluated state; filled by _train.
  oracle: dict | None = None


def _rngs(s: Setting) -> nnx.Rngs:
  # Every network method gets the same initialisation seed.
  return nnx.Rngs(int(jax.random.randint(s.keys[2], (), 0, 2**30)))


def _train(s: Setting, method: str, model, loss_fn, data: dj.Batch, num_steps: int,
           learning_rate: float):
  # The rate lives in the optimiser state: one compiled step serves the whole sweep.
  optimizer = dj.make_optimizer(learning_rate, b1=s.config.adam_b1, rate_in_state=True)
  # Early stopping on the validation users (same criterion as the selection).
  early = s.config.eval_every > 0 and s.val is not None
  # CPU seconds of this process (every thread) when each evaluation starts:
  # time-to-accuracy that a shared machine's load does not inflate.
  cpu_start, cpu_at = time.process_time(), []

  # The oracle row follows the same runs: the most accurate state among this
  # process's evaluations (a resumed run's earlier evaluations are not revisited).
  track_oracle = early and s.oracle is not None and s.config.select_by != "accuracy"
  accuracies, most_accurate = [], []

  def evaluate(m):
    cpu_at.append(time.process_time() - cpu_start)
    if track_oracle:
      accuracies.append(validation_accuracy(s, m))
      if not most_accurate or accuracies[-1] > most_accurate[0]:
        most_accurate[:] = [accuracies[-1], len(accuracies) - 1, m]
    return validation_score(s, m)

  trained, history, fit = dj.train(
      model, data, loss_fn=loss_fn, optimizer=optimizer, num_steps=num_steps,
      batch_size=s.config.batch_size, key=s.keys[5], log_every=s.config.log_every,
      log=common.log, name=f"{s.name}/{method}", workdir=common.subdir(s.workdir, method),
      progress=s.progress, eval_fn=evaluate if early else None,
      eval_every=s.config.eval_every if early else 0, mode="min",
      patience=patience_steps(s.config, num_steps) if early else 0,
      min_delta=s.config.min_delta)
  s.curves[method] = {"step": history.step.tolist(), "loss": history.loss.tolist(),
                      "seconds": history.seconds.tolist()}
  if most_accurate:
    # This process's evaluations are the last entries of the curve.
    accuracy, index, best_model = most_accurate
    s.oracle[method] = (accuracy, int(fit.curve[len(fit.curve) - len(accuracies) + index][0]),
                        best_model)
  elif track_oracle:
    common.log(f"[{s.name}] {method}: resumed without evaluations here; left out of the "
               "oracle-selection row")
  if early:
    # [updates done, validation score, CPU seconds(, validation accuracy)]; a resumed
    # run's CPU count restarts, so only the evaluations of this process have one.
    cpu = [None] * (len(fit.curve) - len(cpu_at)) + cpu_at
    extra = [None] * (len(fit.curve) - len(accuracies)) + accuracies
    s.curves[method].update(
        best_step=int(fit.best_step), stopped_early=bool(fit.stopped_early),
        steps_run=int(fit.curve[-1][0]),
        validation=[[int(c[0]), float(c[2]), t] + ([a] if track_oracle else [])
                    for c, t, a in zip(fit.curve, cpu, extra)])
  return trained


def patience_steps(config, num_steps: int) -> int:
  """Updates without a significant improvement that stop a run of ``num_steps``
  (``patience_fraction`` of it, at least one evaluation; 0: never stop early)."""
  if not config.patience_fraction:
    return 0
  return max(config.eval_every, int(round(config.patience_fraction * num_steps)))


def validation_score(s: Setting, model) -> float:
  """Model selection's criterion on the validation users (lower is better).

  ``heldout_nll`` (default): NLL per step of 20 % hidden steps given the rest
  (no labels: what a practitioner has); ``accuracy``: minus the labelling
  accuracy (uses the validation users' true states: oracle selection).
  """
  if s.config.select_by == "accuracy":
    return -validation_accuracy(s, model)
  val = s.val
  visible = dj.training.heldout_split(val.mask, s.keys[7])
  params = dj.predict(model, dj.Batch(val.embedding, val.obs, visible), s.keys[7])
  return float(_heldout_nll(params, val.obs, val.mask, visible))


def validation_accuracy(s: Setting, model) -> float:
  """Labelling accuracy of the validation users (needs their true states)."""
  val = s.val
  params = dj.predict(model, val, s.keys[7])
  return float(dj.labelling_accuracy(s.val_states, dj.decode_states(params, val.obs, val.mask),
                                     s.synthetic.num_states, val.mask))


_heldout_nll = jax.jit(dj.training.heldout_nll)


def select_and_fit(s: Setting, method: str, build, losses, data: dj.Batch, num_steps: int):
  """Model selection on validation users: every (loss, learning rate) of the grid
  trained for ``num_steps``, scored by :func:`validation_score`.

  Returns ``{"selected": params of the held-out users, "by_loss": {loss:
  params}, "candidates": [...], "oracle": params or None}``: the best
  candidate overall, the best learning rate within each loss and, with
  ``config.oracle_selection``, the candidate and step most accurate on the
  validation users' true states (the oracle-selection row).  Every trained
  method gets the same grid (EM Mapping has one loss).  With ``eval_every >
  0`` each candidate's training length is chosen too: the step with the best
  validation score (the start included) is kept (early stopping with
  ``config.patience_fraction``, :func:`dennl_jax.train`).
  """
  records, best = [], {}
  for loss in losses:
    for lr in s.config.select_learning_rates:
      name = f"{method}[{loss},lr={lr:g}]"
      model = _train(s, name, build(s, _rngs(s)), LOSSES[loss], data, num_steps, lr)
      score = validation_score(s, model)
      curve = s.curves.get(name, {})
      records.append({"loss": loss, "learning_rate": lr, "validation": score,
                      "best_step": curve.get("best_step"), "steps_run": curve.get("steps_run"),
                      "stopped_early": curve.get("stopped_early")})
      if s.oracle and name in s.oracle:
        records[-1].update(oracle_accuracy=s.oracle[name][0], oracle_step=s.oracle[name][1])
      common.log(f"[{s.name}] {method} loss={loss} lr={lr:g} validation {score:.4f}")
      score = score if np.isfinite(score) else np.inf      # a non-finite score never wins
      if loss not in best or score < best[loss][0]:
        best[loss] = (score, model, lr)
  # The kept curve is the selected candidate's.
  by_loss = {loss: dj.predict(m, s.test, s.keys[6]) for loss, (_, m, _) in best.items()}
  chosen = min(best, key=lambda loss: best[loss][0])
  for r in records:
    r["selected"] = r["loss"] == chosen and r["learning_rate"] == best[chosen][2]
  # What training adds: the same network before its first update (one draw of the
  # initialisation every candidate starts from).
  untrained = None if build is None else dj.predict(build(s, _rngs(s)), s.test, s.keys[6])
  oracle = None
  tracked = [r for r in records if "oracle_accuracy" in r]
  if tracked:
    top = max(tracked, key=lambda r: r["oracle_accuracy"])
    oracle = dj.predict(s.oracle[f"{method}[{top['loss']},lr={top['learning_rate']:g}]"][2],
                        s.test, s.keys[6])
  return {"selected": by_loss[chosen], "by_loss": by_loss, "candidates": records,
          "oracle": oracle, "untrained": untrained}


def _per_user_em(s: Setting, key, obs, mask, use: str):
  # One chunk size for every conventional-EM call: one compilation per T.
  c = s.config
  fitted, _, finals = dj.conventional_em(
      key, obs, mask, num_states=s.synthetic.num_states, max_duration=s.synthetic.max_duration,
      num_iters=c.em_iters, min_covar=c.min_covar, chunk_size=c.num_test_users,
      kmeans_restarts=c.em_kmeans_restarts, random_restarts=c.em_random_restarts,
      return_restarts=True, workdir=common.subdir(s.workdir, use))
  return fitted, np.asarray(finals)


def conventional_em(s: Setting, method: str):
  """Each held-out user's own EM, best of its restarts by likelihood; no sharing."""
  del method
  fitted, finals = _per_user_em(s, s.keys[3], s.test.obs, s.test.mask, "conventional_em")
  # Which kind of start won (k-means++ first): how much the restarts matter.
  won = np.asarray(best_restart(jnp.asarray(finals)))
  common.log(f"[{s.name}] conventional EM: {finals.shape[1]} restarts per user; "
             f"k-means++ start kept for {np.mean(won < s.config.em_kmeans_restarts):.0%} of users")
  return fitted


def em_mapping(s: Setting, method: str):
  """Regress per-user EM fits (states aligned to the pooled start) on embeddings."""
  n = min(s.config.em_mapping_users, s.train.obs.shape[0])
  fitted, _ = _per_user_em(s, s.keys[4], s.train.obs[:n], s.train.mask[:n], "em_mapping_fits")
  targets = s.codec.encode_batch(starts.align_to_reference(fitted, s.start.emission.mean))
  data = dj.Batch(s.train.embedding[:n], s.train.obs[:n], s.train.mask[:n], targets)
  return select_and_fit(s, method, _mlp_mapper, ("regression",), data,
                        s.config.regression_steps)


def _likelihood_trained(build: Callable[[Setting, nnx.Rngs], nnx.Module]):
  """A method that trains ``build(setting, rngs)`` with model selection over the config's losses."""
  def method_fn(s: Setting, method: str):
    return select_and_fit(s, method, build, s.config.losses, s.train, s.config.train_steps)
  method_fn.__doc__ = build.__doc__
  return method_fn


def _mlp_mapper(s: Setting, rngs: nnx.Rngs):
  """Embedding -> parameters, no EM."""
  return dj.EmbeddingMapper(s.codec, s.start, s.synthetic.embed_dim, rngs=rngs)


def _em_layer(c) -> dj.EMLayer:
  """The config's EM-layer settings (gradient mode and the SPSA estimator's)."""
  return dj.EMLayer(gradient=c.gradient, num_samples=c.spsa_samples, step=c.spsa_step,
                    perturbation=c.spsa_perturbation)


def _initial_fusion(s: Setting, rngs: nnx.Rngs):
  """Embedding -> EM start, then EM layers."""
  c = s.config
  return dj.InitialFusion(s.codec, s.start, s.synthetic.embed_dim, num_stages=c.num_stages,
                          layer=_em_layer(c), rngs=rngs)


def _dennl_builder(**ablation):
  """DENNL with the config's settings, ``ablation`` overriding them (see networks.DENNL)."""
  def build(s: Setting, rngs: nnx.Rngs):
    c = s.config
    kwargs = dict(num_stages=c.num_stages, residual=c.dennl.residual,
                  use_latent=c.dennl.use_latent, embed_in_stage=c.dennl.embed_in_stage,
                  user_start=c.dennl.user_start)
    kwargs.update(ablation)
    if kwargs["user_start"]:
      kwargs["user_start"] = functools.partial(
          starts.user_start, num_states=s.synthetic.num_states,
          max_duration=s.synthetic.max_duration, min_covar=c.min_covar)
    else:
      kwargs["user_start"] = None
    return dj.DENNL(s.codec, s.start, s.synthetic.embed_dim, hidden=(c.hidden, c.hidden),
                    layer=_em_layer(c), rngs=rngs, **kwargs)
  build.__doc__ = ("The paper's network: EM layers with the embedding fused at every stage"
                   + (f" (ablation: {ablation})" if ablation else "") + ".")
  return build


_dennl = _dennl_builder()


class Method(NamedTuple):
  label: str   # the paper's name
  # (setting, method name) -> the held-out users' batched HSMM parameters, or for a
  # method with model selection the dict of select_and_fit.
  fit: Callable[[Setting, str], object]
  # (setting, rngs) -> the untrained network of a likelihood-trained method, else None.
  build: Callable[[Setting, nnx.Rngs], nnx.Module] | None = None


def _network_method(label: str, build: Callable[[Setting, nnx.Rngs], nnx.Module]) -> Method:
  return Method(label, _likelihood_trained(build), build)


METHODS = {
    "conventional_em": Method("Conventional EM", conventional_em),
    "em_mapping": Method("Direct Mapping (EM Mapping)", em_mapping),
    "mlp_mapper": _network_method("MLP Mapper", _mlp_mapper),
    "initial_fusion": _network_method("Initial Fusion", _initial_fusion),
    "dennl": _network_method("DENNL", _dennl),
}
# DENNL ablations (the `ablations` config variant): one switch changed from the config's DENNL.
ABLATIONS = {
    "dennl_direct": ("DENNL, direct output (paper)", dict(residual=False)),
    "dennl_no_latent": ("DENNL, no latent h", dict(use_latent=False)),
    "dennl_no_embed": ("DENNL, no embedding in stage MLP", dict(embed_in_stage=False)),
    "dennl_1stage": ("DENNL, 1 stage", dict(num_stages=1)),
    "dennl_3stage": ("DENNL, 3 stages", dict(num_stages=3)),
    "dennl_5stage": ("DENNL, 5 stages", dict(num_stages=5)),
    "dennl_user_start": ("DENNL, per-user k-means++ start", dict(user_start=True)),
}
METHODS.update({name: _network_method(label, _dennl_builder(**kw))
                for name, (label, kw) in ABLATIONS.items()})


def setting_spec(name: str, noise_length: int):
  """(sequence length, noise fraction) of a setting name."""
  if name.startswith("T"):
    return int(name[1:]), 0.0
  if name.startswith("noise"):
    return noise_length, int(name[5:]) / 100.0
  raise common.ConfigError(f"unknown setting {name!r}")


def make_setting_data(key, populations, synthetic, num_steps, noise):
  """{split: (true states, observations, masks, embeddings)} of each population.

  populations: {split: Population}; split "train"/"test" use the historical
  keys, any other split (validation) keys folded in from ``key``.
  """
  k_train, k_test, k_noise_train, k_noise_test = jax.random.split(key, 4)
  fixed = {"train": (k_train, k_noise_train), "test": (k_test, k_noise_test)}
  out = {}
  for i, (split, pop) in enumerate(populations.items()):
    k_seq, k_noise = fixed.get(split) or jax.random.split(jax.random.fold_in(key, 100 + i))
    states, obs = S.sample_sequences(k_seq, pop.params, num_steps, synthetic.max_duration)
    mask = jnp.ones(states.shape, bool)
    if noise > 0:
      obs, _ = S.inject_noise(k_noise, obs, noise, mask)
    out[split] = (states, obs, mask, pop.embedding)
  return out


def make_setting(name, key, populations, config, synthetic, *, workdir=None,
                 progress=False) -> tuple[Setting, jax.Array]:
  """(the Setting every method sees, the held-out users' true states (U, T))."""
  num_steps, noise = setting_spec(name, config.noise_length)
  common.log(f"=== setting {name}: T={num_steps} noise={noise:.0%} ===")
  keys = jax.random.split(key, 8)
  data = make_setting_data(keys[0], populations, synthetic, num_steps, noise)
  _, tr_obs, tr_mask, tr_emb = data["train"]
  te_states, te_obs, te_mask, te_emb = data["test"]
  start = dj.pooled_start(keys[1], tr_obs, tr_mask, num_states=synthetic.num_states,
                          max_duration=synthetic.max_duration, min_covar=config.min_covar)
  val = data.get("val")
  s = Setting(name=name, config=config, synthetic=synthetic, keys=keys,
              train=dj.Batch(tr_emb, tr_obs, tr_mask), test=dj.Batch(te_emb, te_obs, te_mask),
              start=start, codec=dj.ParamCodec(start), optimizer=None, curves={},
              val=None if val is None else dj.Batch(val[3], val[1], val[2]),
              val_states=None if val is None else val[0], workdir=workdir, progress=progress,
              oracle={} if config.oracle_selection else None)
  return s, te_states


def run_setting(name, key, populations, config, synthetic, *, workdir=None, progress=False):
  """({row: per-user accuracy (U,)}, {method: seconds}, {method: curve}, {method: selection})."""
  s, te_states = make_setting(name, key, populations, config, synthetic, workdir=workdir,
                              progress=progress)
  te_obs, te_mask, k = s.test.obs, s.test.mask, synthetic.num_states

  def score(params):
    decoded = dj.decode_states(params, te_obs, te_mask)
    return dj.per_user_accuracy(te_states, decoded, k, te_mask)

  results, times, selection = {}, {}, {}
  results["oracle"] = score(S.to_model(populations["test"].params, synthetic.max_duration,
                                       config.min_covar))
  results["pooled_start"] = score(jax.tree_util.tree_map(
      lambda x: jnp.broadcast_to(x, (te_obs.shape[0],) + x.shape), s.start))
  for row in REFERENCE_ROWS:
    common.log(f"[{name}] {REFERENCE_ROWS[row]} accuracy {results[row].mean():.4f}")
  for method in config.methods:
    fitted, times[method] = common.timed(METHODS[method].fit)(s, method)
    if isinstance(fitted, dict):
      selection[method] = fitted["candidates"]
      for loss, params in fitted["by_loss"].items():
        results[f"{method}@{loss}"] = score(params)
      if fitted.get("oracle") is not None:
        results[f"{method}@{ORACLE_SELECTION}"] = score(fitted["oracle"])
      if fitted.get("untrained") is not None:
        results[f"{method}@{UNTRAINED}"] = score(fitted["untrained"])
      fitted = fitted["selected"]
    results[method] = score(fitted)
    common.log(f"[{name}] {METHODS[method].label:28s} accuracy {results[method].mean():.4f}  "
               f"time {times[method]:.1f}s")
  return results, times, s.curves, selection


def row_label(row: str) -> str:
  """A Table 1 row's name in reports: ``method``, ``method@loss`` or ``method@oracle``."""
  base, _, loss = row.partition("@")
  label = REFERENCE_ROWS.get(base) or METHODS[base].label
  if loss == ORACLE_SELECTION:
    return f"{label} [oracle selection: validation accuracy]"
  if loss == UNTRAINED:
    return f"{label} [untrained]"
  return f"{label} [{loss} loss]" if loss else label


def prepare_config(config):
  """A resolved copy with methods/settings as name tuples; ConfigError naming
  an unknown method or setting."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.methods = common.names(config.methods)
    config.settings = common.names(config.settings)
    config.losses = common.names(config.losses)
    config.seeds = tuple(range(config.seed, config.seed + config.num_seeds))
    config.select_learning_rates = tuple(float(x) for x in config.select_learning_rates)
  if not config.methods or not config.settings:
    raise common.ConfigError("config.methods and config.settings must each name an entry")
  for m in config.methods:
    if m not in METHODS:
      raise common.ConfigError(f"unknown method {m!r}; choose from {tuple(METHODS)}")
  for s in config.settings:
    if s not in SETTINGS:
      raise common.ConfigError(f"unknown setting {s!r}; choose from {SETTINGS}")
  for loss in config.losses:
    if loss not in LOSSES or loss == "regression":
      raise common.ConfigError(f"unknown loss {loss!r}; choose from likelihood, heldout")
  if not config.losses or not config.select_learning_rates:
    raise common.ConfigError("config.losses and config.select_learning_rates must be non-empty")
  if config.select_by not in ("heldout_nll", "accuracy"):
    raise common.ConfigError(f"select_by must be heldout_nll or accuracy, got {config.select_by!r}")
  if not 0.0 <= config.patience_fraction <= 1.0 or not config.min_delta >= 0:
    raise common.ConfigError(f"patience_fraction must be in [0, 1] and min_delta >= 0, got "
                             f"{config.patience_fraction}, {config.min_delta}")
  if config.num_val_users < 1:
    raise common.ConfigError("model selection needs validation users (num_val_users >= 1)")
  return config


def make_populations(seed: int, config, synthetic):
  """({split: Population} of one seed's world, the key of its settings (see setting_key))."""
  k_world, k_train, k_test, k_settings = jax.random.split(jax.random.PRNGKey(seed), 4)
  world = S.make_world(k_world, synthetic)
  populations = {"train": S.make_population(k_train, world, config.num_users, synthetic),
                 "test": S.make_population(k_test, world, config.num_test_users, synthetic)}
  if config.num_val_users:
    populations["val"] = S.make_population(jax.random.fold_in(k_test, 1), world,
                                           config.num_val_users, synthetic)
  return populations, k_settings


def setting_key(k_settings, name: str):
  """Keyed by the setting's canonical index: a setting's numbers do not depend on
  which other settings run."""
  return jax.random.fold_in(k_settings, SETTINGS.index(name))


def run(config, output_dir: str, *, workdir: str | None = None, progress: bool = False):
  """Every seed and setting of ``config``; writes the results files; returns
  {row: {setting: mean accuracy over seeds}}.  ``workdir``: checkpoints and
  metrics of every training loop and conventional-EM fit under
  ``workdir/seed<s>/<setting>/<method>`` (rerun to resume).

  With ``config.workers`` > 1 (0: one per core) the (seed, setting) pieces run
  in that many worker processes (:mod:`experiments.table1_pieces`), each writing a
  complete run to ``output_dir/pieces/seed<s>_<setting>``; the results files
  are then pooled from them.  They equal a one-process run's with the same
  XLA:CPU thread count (each worker gets its share of the cores; the trained
  methods' rounding depends on it).  Rerunning skips the pieces that finished
  with the same config.
  """
  config = prepare_config(config)
  num_workers = min(workers.resolve_workers(config.workers),
                    len(config.seeds) * len(config.settings))
  if num_workers > 1:
    from experiments import table1_pieces  # it imports this module
    return table1_pieces.run_in_workers(config, output_dir, workdir, num_workers)
  synthetic = S.SyntheticConfig(**config.synthetic.to_dict())
  common.save_config(config, output_dir)
  common.log(f"config: {json.dumps(common.to_jsonable(config))}")
  per_user, times, curves, selection = [], {}, {}, {}
  t_start = time.time()
  for seed in config.seeds:
    populations, k_settings = make_populations(seed, config, synthetic)
    seed_rows = {}
    per_user.append(seed_rows)
    for name in config.settings:
      common.log(f"##### seed {seed}")
      res, tms, crv, sel = run_setting(name, setting_key(k_settings, name),
                                       populations, config, synthetic, progress=progress,
                                       workdir=common.subdir(workdir, f"seed{seed}", name))
      for m, acc in res.items():
        seed_rows.setdefault(m, {})[name] = acc
      for m, t in tms.items():
        times.setdefault(m, {}).setdefault(name, []).append(t)
      curves.setdefault(str(seed), {})[name] = crv
      selection.setdefault(str(seed), {})[name] = sel
      # Write after every setting so a long run leaves partial results.
      _write(output_dir, config, per_user, times, curves, selection, t_start)
  return write_results(output_dir, config, per_user, times, curves, selection, t_start)


def write_results(output_dir, config, per_user, times, curves, selection, t_start):
  """The final results files; returns {row: {setting: mean accuracy over seeds}}."""
  text = _write(output_dir, config, per_user, times, curves, selection, t_start)
  common.log(f"done in {time.time() - t_start:.0f}s; results in {output_dir}")
  print(text)
  return report.means_table(report.summarize(_complete(per_user), jax.random.PRNGKey(0), 10))


def _complete(per_user):
  """The seeds whose settings all finished (a partial seed would bias the means)."""
  full = {(r, s) for r, cells in per_user[0].items() for s in cells}
  return [p for p in per_user if {(r, s) for r, c in p.items() for s in c} == full]


def _write(output_dir, config, per_user, times, curves, selection, t_start):
  done = _complete(per_user)
  summary = report.summarize(done, jax.random.PRNGKey(config.bootstrap_seed), config.bootstrap)
  settings = sorted({s for cells in summary["rows"].values() for s in cells}, key=SETTINGS.index)
  common.write_json(os.path.join(output_dir, "table1.json"), report.means_table(summary))
  common.write_json(os.path.join(output_dir, "table1_stats.json"), summary)
  common.write_json(os.path.join(output_dir, "per_user.json"), per_user, indent=None)
  common.write_json(os.path.join(output_dir, "selection.json"), selection)
  common.write_json(os.path.join(output_dir, "timings.json"),
                    {"seconds": times, "total_seconds": time.time() - t_start})
  common.write_json(os.path.join(output_dir, "curves.json"), curves, indent=None)
  text = common.write_markdown(os.path.join(output_dir, "table1.md"),
                               report.table_markdown(summary, times, config, settings, row_label))
  report.plot_curves(os.path.join(output_dir, "training_curves.png"),
                     curves[str(config.seeds[0])], settings,
                     lambda m: METHODS[m.partition("[")[0]].label)
  for line in report.headline(summary, select_by=config.select_by):
    common.log(f"HEADLINE {line}")
  return text


if __name__ == "__main__":
  common.app_main("synthetic_table1", run, output_dir="/tmp/dennl_table1",
                  variants={"quick": "quick"}, compilation_cache_dir=common.XLA_CACHE_DIR,
                  tracked=True)
