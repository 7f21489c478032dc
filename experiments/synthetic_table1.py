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
from dennl_jax.data import synthetic as S
from experiments import common
from experiments.configs import synthetic_table1 as config_lib

SETTINGS = config_lib.SETTINGS
PAPER = {  # Paper Table 1, labelling accuracy in %.
    "conventional_em": {"T50": 82.0, "T100": 85.5, "T400": 94.1, "noise20": 83.1, "noise10": 91.5},
    "em_mapping": {"T50": 71.4, "T100": 72.2, "T400": 73.0, "noise20": 67.9, "noise10": 71.4},
    "mlp_mapper": {"T50": 51.5, "T100": 50.3, "T400": 52.1, "noise20": 46.2, "noise10": 48.5},
    "initial_fusion": {"T50": 82.4, "T100": 83.7, "T400": 92.6, "noise20": 82.8, "noise10": 89.7},
    "dennl": {"T50": 88.3, "T100": 90.0, "T400": 93.5, "noise20": 88.1, "noise10": 92.3},
}
REFERENCE_ROWS = {"oracle": "Oracle (true parameters)",
                  "pooled_start": "Pooled start (one shared model)"}
LOSSES = {"likelihood": dj.likelihood_loss, "heldout": dj.heldout_step_loss}


class Setting(NamedTuple):
  """What a method sees in one setting (one sequence length / noise level)."""
  name: str
  config: object          # the run's ConfigDict
  synthetic: S.SyntheticConfig
  # (8, 2) the setting's keys, one per use (fixed, so a method's numbers do not depend
  # on which other methods run): 0 data, 1 pooled start, 2 network initialisation,
  # 3 conventional EM, 4 EM Mapping's per-user EM, 5 training, 6 prediction.
  keys: jax.Array
  train: dj.Batch         # training users (embedding, obs, mask)
  test: dj.Batch          # held-out users
  start: object           # pooled start: one HSMM shared by every method
  codec: dj.ParamCodec
  optimizer: object
  curves: dict            # method -> {"step": [...], "loss": [...]}, filled by _train


def _rngs(s: Setting) -> nnx.Rngs:
  # Every network method gets the same initialisation seed.
  return nnx.Rngs(int(jax.random.randint(s.keys[2], (), 0, 2**30)))


def _train(s: Setting, method: str, model, loss_fn, data: dj.Batch, num_steps: int):
  trained, history = dj.train(model, data, loss_fn=loss_fn, optimizer=s.optimizer,
                              num_steps=num_steps, batch_size=s.config.batch_size, key=s.keys[5],
                              log_every=s.config.log_every, log=common.log,
                              name=f"{s.name}/{method}")
  s.curves[method] = {"step": history.step.tolist(), "loss": history.loss.tolist()}
  return trained


def _per_user_em(s: Setting, key, obs, mask):
  # One chunk size for every conventional-EM call: one compilation per T.
  fitted, _ = dj.conventional_em(key, obs, mask, num_states=s.synthetic.num_states,
                                 max_duration=s.synthetic.max_duration,
                                 num_iters=s.config.em_iters, min_covar=s.config.min_covar,
                                 chunk_size=s.config.num_test_users)
  return fitted


def conventional_em(s: Setting, method: str):
  """Each held-out user's own EM from its own k-means++ start; no sharing."""
  del method
  return _per_user_em(s, s.keys[3], s.test.obs, s.test.mask)


def em_mapping(s: Setting, method: str):
  """Regress per-user EM fits (states aligned to the pooled start) on embeddings."""
  n = min(s.config.em_mapping_users, s.train.obs.shape[0])
  fitted = _per_user_em(s, s.keys[4], s.train.obs[:n], s.train.mask[:n])
  targets = s.codec.encode_batch(starts.align_to_reference(fitted, s.start.emission.mean))
  model = _mlp_mapper(s, _rngs(s))
  data = dj.Batch(s.train.embedding[:n], s.train.obs[:n], s.train.mask[:n], targets)
  model = _train(s, method, model, dj.regression_loss, data, s.config.regression_steps)
  return dj.predict(model, s.test, s.keys[6])


def _likelihood_trained(build: Callable[[Setting, nnx.Rngs], nnx.Module]):
  """A method that trains ``build(setting, rngs)`` on the config's likelihood loss."""
  def method_fn(s: Setting, method: str):
    model = _train(s, method, build(s, _rngs(s)), LOSSES[s.config.loss], s.train,
                   s.config.train_steps)
    return dj.predict(model, s.test, s.keys[6])
  method_fn.__doc__ = build.__doc__
  return method_fn


def _mlp_mapper(s: Setting, rngs: nnx.Rngs):
  """Embedding -> parameters, no EM."""
  return dj.EmbeddingMapper(s.codec, s.start, s.synthetic.embed_dim, rngs=rngs)


def _initial_fusion(s: Setting, rngs: nnx.Rngs):
  """Embedding -> EM start, then EM layers."""
  c = s.config
  return dj.InitialFusion(s.codec, s.start, s.synthetic.embed_dim, num_stages=c.num_stages,
                          gradient=c.gradient, spsa_samples=c.spsa_samples, rngs=rngs)


def _dennl(s: Setting, rngs: nnx.Rngs):
  """The paper's network: EM layers with the embedding fused at every stage."""
  c = s.config
  return dj.DENNL(s.codec, s.start, s.synthetic.embed_dim, num_stages=c.num_stages,
                  hidden=(c.hidden, c.hidden), gradient=c.gradient, spsa_samples=c.spsa_samples,
                  rngs=rngs)


class Method(NamedTuple):
  label: str   # the paper's name
  # (setting, method name) -> the held-out users' batched HSMM parameters.
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


def setting_spec(name: str, noise_length: int):
  """(sequence length, noise fraction) of a setting name."""
  if name.startswith("T"):
    return int(name[1:]), 0.0
  if name.startswith("noise"):
    return noise_length, int(name[5:]) / 100.0
  raise common.ConfigError(f"unknown setting {name!r}")


def make_setting_data(key, train_pop, test_pop, synthetic, num_steps, noise):
  """Sequences (true states, observations, masks, embeddings) of training and held-out users."""
  k_train, k_test, k_noise_train, k_noise_test = jax.random.split(key, 4)
  out = {}
  for split, pop, k_seq, k_noise in (("train", train_pop, k_train, k_noise_train),
                                     ("test", test_pop, k_test, k_noise_test)):
    states, obs = S.sample_sequences(k_seq, pop.params, num_steps, synthetic.max_duration)
    mask = jnp.ones(states.shape, bool)
    if noise > 0:
      obs, _ = S.inject_noise(k_noise, obs, noise, mask)
    out[split] = (states, obs, mask, pop.embedding)
  return out


def run_setting(name, key, train_pop, test_pop, config, synthetic):
  """({row: accuracy}, {method: seconds}, {method: curve}) of one setting."""
  num_steps, noise = setting_spec(name, config.noise_length)
  common.log(f"=== setting {name}: T={num_steps} noise={noise:.0%} ===")
  keys = jax.random.split(key, 8)
  data = make_setting_data(keys[0], train_pop, test_pop, synthetic, num_steps, noise)
  tr_states, tr_obs, tr_mask, tr_emb = data["train"]
  te_states, te_obs, te_mask, te_emb = data["test"]
  k = synthetic.num_states

  def score(params):
    decoded = dj.decode_states(params, te_obs, te_mask)
    return dj.labelling_accuracy(te_states, decoded, k, te_mask)

  results, times = {}, {}
  results["oracle"] = score(S.to_model(test_pop.params, synthetic.max_duration, config.min_covar))
  common.log(f"[{name}] oracle (true parameters) accuracy {results['oracle']:.4f}")
  start = dj.pooled_start(keys[1], tr_obs, tr_mask, num_states=k,
                         max_duration=synthetic.max_duration, min_covar=config.min_covar)
  results["pooled_start"] = score(jax.tree_util.tree_map(
      lambda x: jnp.broadcast_to(x, (te_obs.shape[0],) + x.shape), start))
  common.log(f"[{name}] pooled start (one shared model) accuracy {results['pooled_start']:.4f}")

  s = Setting(name=name, config=config, synthetic=synthetic, keys=keys,
              train=dj.Batch(tr_emb, tr_obs, tr_mask), test=dj.Batch(te_emb, te_obs, te_mask),
              start=start, codec=dj.ParamCodec(start),
              optimizer=dj.make_optimizer(config.learning_rate), curves={})
  for method in config.methods:
    params, times[method] = common.timed(METHODS[method].fit)(s, method)
    results[method] = score(params)
    common.log(f"[{name}] {METHODS[method].label:28s} accuracy {results[method]:.4f}  "
               f"time {times[method]:.1f}s")
  return results, times, s.curves


def table_markdown(table, times, config, settings):
  """Lines of table1.md: accuracies beside the paper's, then fitting times."""
  rows = []
  for method in [*REFERENCE_ROWS, *config.methods]:
    cells = []
    for s in settings:
      ours = table.get(method, {}).get(s)
      paper = PAPER.get(method, {}).get(s)
      cells.append("—" if ours is None else f"{100 * ours:.1f}")
      cells.append("—" if paper is None else f"{paper:.1f}")
    label = REFERENCE_ROWS.get(method) or METHODS[method].label
    rows.append([label, *cells])
  accuracy = common.markdown_table(
      ["Method", *[f"{s} {who}" for s in settings for who in ("ours", "paper")]], rows)
  timing = common.markdown_table(
      ["Method", *settings],
      [[METHODS[m].label, *[f"{times.get(m, {}).get(s, float('nan')):.0f}" for s in settings]]
       for m in config.methods])
  intro = (f"Gradient mode of the EM layers: `{config.gradient}`; {config.num_users} training "
           f"users, {config.num_test_users} held-out users; noise settings at T = "
           f"{config.noise_length}; preset `{config.preset}`; training loss `{config.loss}`.")
  return ["# Table 1 (synthetic HSMMs): labelling accuracy, ours vs. paper", "", intro, "",
          *accuracy, "", "Time to fit each method and produce the held-out users' parameters "
          "(seconds, wall clock, including compilation):", "", *timing]


def plot_curves(path, curves, settings):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.2), squeeze=False)
  for ax, s in zip(axes[0], settings):
    for method, curve in curves.get(s, {}).items():
      if method == "em_mapping":
        continue  # a squared-error loss: a different scale
      loss = np.asarray(curve["loss"])
      window = max(1, len(loss) // 20)
      smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
      ax.plot(np.asarray(curve["step"])[window - 1:], smooth, label=METHODS[method].label)
    ax.set_title(s)
    ax.set_xlabel("step")
    ax.set_ylabel("NLL per time step")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def prepare_config(config):
  """A resolved copy with methods/settings as name tuples; ConfigError naming
  an unknown method or setting."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.methods = common.names(config.methods)
    config.settings = common.names(config.settings)
  if not config.methods or not config.settings:
    raise common.ConfigError("config.methods and config.settings must each name an entry")
  for m in config.methods:
    if m not in METHODS:
      raise common.ConfigError(f"unknown method {m!r}; choose from {tuple(METHODS)}")
  for s in config.settings:
    if s not in SETTINGS:
      raise common.ConfigError(f"unknown setting {s!r}; choose from {SETTINGS}")
  return config


def run(config, output_dir: str):
  """Every setting of ``config``; writes the results files; returns {row: {setting: acc}}."""
  config = prepare_config(config)
  synthetic = S.SyntheticConfig(**config.synthetic.to_dict())
  common.save_config(config, output_dir)
  common.log(f"config: {json.dumps(common.to_jsonable(config))}")

  k_world, k_train, k_test, k_settings = jax.random.split(jax.random.PRNGKey(config.seed), 4)
  world = S.make_world(k_world, synthetic)
  train_pop = S.make_population(k_train, world, config.num_users, synthetic)
  test_pop = S.make_population(k_test, world, config.num_test_users, synthetic)

  table, times, curves = {}, {}, {}
  t_start = time.time()
  for i, name in enumerate(config.settings):
    # Keyed by the setting's canonical index: a setting's numbers do not
    # depend on which other settings run.
    res, tms, crv = run_setting(name, jax.random.fold_in(k_settings, SETTINGS.index(name)),
                                train_pop, test_pop, config, synthetic)
    for m, acc in res.items():
      table.setdefault(m, {})[name] = acc
    for m, t in tms.items():
      times.setdefault(m, {})[name] = t
    curves[name] = crv
    # Write after every setting so a long run leaves partial results.
    common.write_json(os.path.join(output_dir, "table1.json"), table)
    common.write_json(os.path.join(output_dir, "timings.json"),
                      {"seconds": times, "total_seconds": time.time() - t_start})
    common.write_json(os.path.join(output_dir, "curves.json"), curves, indent=None)
    done = sorted(config.settings[:i + 1], key=SETTINGS.index)
    text = common.write_markdown(os.path.join(output_dir, "table1.md"),
                                 table_markdown(table, times, config, done))
    plot_curves(os.path.join(output_dir, "training_curves.png"), curves, done)
  common.log(f"done in {time.time() - t_start:.0f}s; results in {output_dir}")
  print(text)
  return table


if __name__ == "__main__":
  common.app_main("synthetic_table1", run, output_dir="/tmp/dennl_table1",
                  variants={"quick": "quick"}, compilation_cache_dir="~/.cache/dennl_jax_xla")
