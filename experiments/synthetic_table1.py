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
from experiments.table1_selection import LOSSES, Setting, select_and_fit
from experiments.configs import synthetic_table1 as config_lib

SETTINGS = config_lib.SETTINGS
# Rows ``method@oracle``: candidate and step chosen by the validation users' labelling
# accuracy (their true states), beside the label-free selection of the headline.
ORACLE_SELECTION = report.ORACLE_SELECTION
# Rows ``method@untrained``: the network at its initialisation (what training adds).
UNTRAINED = report.UNTRAINED
REFERENCE_ROWS = {"oracle": "Oracle (true parameters)",
                  "pooled_start": "Pooled start (one shared model)"}
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
              start=start, codec=dj.ParamCodec(start), curves={},
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
