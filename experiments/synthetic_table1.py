r"""Table 1 of the DENNL paper on synthetic HSMM data (section 6.1).

  python -m experiments.synthetic_table1 --quick --output_dir=/tmp/table1_quick
  python -m experiments.synthetic_table1 --output_dir=/work/results/table1_full   # full scale

For every setting (T50, T100, T400: clean sequences of that length; noise20,
noise10: that fraction of observations replaced by other observations of the
same sequence, at length --noise_length) it draws training and held-out users
from one synthetic world, trains every method, decodes the held-out users'
sequences with Viterbi under each method's parameters and scores the
labelling accuracy (best one-to-one relabelling per user).

Writes to --output_dir: table1.json ({method: {setting: accuracy}}),
table1.md (ours beside the paper's Table 1, with training times),
training_curves.png, timings.json and config.json.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dennl_jax import metrics
from dennl_jax import models as M
from dennl_jax import training as Tr
from dennl_jax.data import synthetic as S

METHODS = ("conventional_em", "em_mapping", "mlp_mapper", "initial_fusion", "dennl")
METHOD_NAMES = {
    "conventional_em": "Conventional EM",
    "em_mapping": "Direct Mapping (EM Mapping)",
    "mlp_mapper": "MLP Mapper",
    "initial_fusion": "Initial Fusion",
    "dennl": "DENNL",
}
SETTINGS = ("T50", "T100", "T400", "noise20", "noise10")
PAPER = {  # Paper Table 1, labelling accuracy in %.
    "conventional_em": {"T50": 82.0, "T100": 85.5, "T400": 94.1, "noise20": 83.1, "noise10": 91.5},
    "em_mapping": {"T50": 71.4, "T100": 72.2, "T400": 73.0, "noise20": 67.9, "noise10": 71.4},
    "mlp_mapper": {"T50": 51.5, "T100": 50.3, "T400": 52.1, "noise20": 46.2, "noise10": 48.5},
    "initial_fusion": {"T50": 82.4, "T100": 83.7, "T400": 92.6, "noise20": 82.8, "noise10": 89.7},
    "dennl": {"T50": 88.3, "T100": 90.0, "T400": 93.5, "noise20": 88.1, "noise10": 92.3},
}

# Presets: every value can be overridden by passing the flag explicitly.
PRESETS = {
    "quick": dict(num_users=128, num_test_users=64, train_steps=40, batch_size=16, em_iters=20,
                  num_stages=2, max_duration=16, noise_length=100, em_mapping_users=128,
                  regression_steps=150, hidden=64, gradient="exact"),
    "full": dict(num_users=1000, num_test_users=200, train_steps=150, batch_size=16,
                 em_iters=30, num_stages=3, max_duration=20, noise_length=400,
                 em_mapping_users=200, regression_steps=500, hidden=256, gradient="exact"),
}

_OUTPUT_DIR = flags.DEFINE_string("output_dir", "/tmp/dennl_table1", "Where results go.")
_QUICK = flags.DEFINE_boolean("quick", False, "Small preset: a few minutes on 2 CPU cores.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the world, the users and the training.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"Subset of {METHODS}.")
_SETTINGS = flags.DEFINE_list("settings", list(SETTINGS), f"Subset of {SETTINGS}.")
_GRADIENT = flags.DEFINE_enum("gradient", "spsa", ["spsa", "exact", "forward"],
                              "Backward of the EM layers (DENNL, Initial Fusion); both presets "
                              "use exact unless this flag is given (see BUILD_NOTES.md).")
_NUM_USERS = flags.DEFINE_integer("num_users", 1000, "Training users.")
_NUM_TEST_USERS = flags.DEFINE_integer("num_test_users", 200, "Held-out users (scored).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 150, "Optimiser steps per trained model.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Users per minibatch.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
_EM_ITERS = flags.DEFINE_integer("em_iters", 30, "Conventional EM iterations.")
_NUM_STAGES = flags.DEFINE_integer("num_stages", 3, "EM stages of DENNL and Initial Fusion.")
_HIDDEN = flags.DEFINE_integer("hidden", 256, "Hidden width of the DENNL stage MLP.")
_MAX_DURATION = flags.DEFINE_integer("max_duration", 20, "Maximum HSMM duration D.")
_NOISE_LENGTH = flags.DEFINE_integer("noise_length", 400, "Sequence length of noise settings.")
_EM_MAPPING_USERS = flags.DEFINE_integer(
    "em_mapping_users", 200, "Training users fitted by EM to build EM Mapping's targets.")
_REGRESSION_STEPS = flags.DEFINE_integer("regression_steps", 500, "EM Mapping optimiser steps.")
_SPSA_SAMPLES = flags.DEFINE_integer("spsa_samples", 8, "SPSA perturbations per EM layer.")
_LOSS = flags.DEFINE_enum(
    "loss", "likelihood", ["likelihood", "heldout"],
    "Training loss of the likelihood-trained models: 'likelihood' = paper eq. 9 (in-sample "
    "NLL per step); 'heldout' = NLL of randomly hidden steps given the rest.")
_MIN_COVAR = flags.DEFINE_float(
    "min_covar", 0.1,
    "Added to every fitted covariance diagonal (all methods). With 10 states and short "
    "sequences a small floor lets EM collapse states onto single points, which maximises "
    "the likelihood (the training loss) while hurting decoding.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 25, "Progress line every this many steps.")
_CACHE_DIR = flags.DEFINE_string("compilation_cache_dir",
                                 os.path.expanduser("~/.cache/dennl_jax_xla"),
                                 "Persistent XLA cache ('' disables).")


def _setting(value_name):
  """The effective value: the flag if given, else the preset's."""
  flag = flags.FLAGS[value_name]
  preset = PRESETS["quick" if _QUICK.value else "full"]
  if flag.present or value_name not in preset:
    return flag.value
  return preset[value_name]


def setting_spec(name: str, noise_length: int):
  """(sequence length, noise fraction) of a setting name."""
  if name.startswith("T"):
    return int(name[1:]), 0.0
  if name.startswith("noise"):
    return noise_length, int(name[5:]) / 100.0
  raise ValueError(f"unknown setting {name!r}")


def _log(msg):
  print(msg, flush=True)


def make_setting_data(key, world, train_pop, test_pop, config, num_steps, noise):
  """Sequences (true states, observations, masks) for training and held-out users."""
  k_train, k_test, k_noise_train, k_noise_test = jax.random.split(key, 4)
  out = {}
  for split, pop, k_seq, k_noise in (("train", train_pop, k_train, k_noise_train),
                                     ("test", test_pop, k_test, k_noise_test)):
    states, obs = S.sample_sequences(k_seq, pop.params, num_steps, config.max_duration)
    mask = jnp.ones(states.shape, bool)
    if noise > 0:
      obs, _ = S.inject_noise(k_noise, obs, noise, mask)
    out[split] = (states, obs, mask, pop.embedding)
  return out


def run_setting(name, key, world, train_pop, test_pop, config, cfg, methods):
  num_steps, noise = setting_spec(name, cfg["noise_length"])
  _log(f"=== setting {name}: T={num_steps} noise={noise:.0%} ===")
  keys = jax.random.split(key, 8)
  data = make_setting_data(keys[0], world, train_pop, test_pop, config, num_steps, noise)
  tr_states, tr_obs, tr_mask, tr_emb = data["train"]
  te_states, te_obs, te_mask, te_emb = data["test"]
  k = config.num_states
  results, times, curves = {}, {}, {}
  # One chunk size for every conventional-EM call: one compilation per T.
  em_chunk = cfg["num_test_users"]

  true_model = S.to_model(test_pop.params, config.max_duration, cfg["min_covar"])
  results["oracle"] = metrics.labelling_accuracy(
      te_states, M.decode_states(true_model, te_obs, te_mask), k, te_mask)
  _log(f"[{name}] oracle (true parameters) accuracy {results['oracle']:.4f}")

  start = M.pooled_start(keys[1], tr_obs, tr_mask, num_states=k,
                         max_duration=config.max_duration, min_covar=cfg["min_covar"])
  starts = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (te_obs.shape[0],) + x.shape),
                                  start)
  results["pooled_start"] = metrics.labelling_accuracy(
      te_states, M.decode_states(starts, te_obs, te_mask), k, te_mask)
  _log(f"[{name}] pooled start (one shared model) accuracy {results['pooled_start']:.4f}")
  codec = M.ParamCodec(start)
  train_data = Tr.Batch(tr_emb, tr_obs, tr_mask)
  test_data = Tr.Batch(te_emb, te_obs, te_mask)
  optimizer = Tr.make_optimizer(cfg["learning_rate"])

  def score(params):
    decoded = M.decode_states(params, te_obs, te_mask)
    return metrics.labelling_accuracy(te_states, decoded, k, te_mask)

  def fit(method_name, model, loss_fn, data, steps, key_train):
    t0 = time.time()
    trained, history = Tr.train(model, data, loss_fn=loss_fn, optimizer=optimizer,
                                num_steps=steps, batch_size=cfg["batch_size"], key=key_train,
                                log_every=cfg["log_every"], log=_log,
                                name=f"{name}/{method_name}")
    curves[method_name] = {"step": history.step.tolist(), "loss": history.loss.tolist()}
    return trained, time.time() - t0

  for method in methods:
    t0 = time.time()
    rngs = nnx.Rngs(int(jax.random.randint(keys[2], (), 0, 2**30)))
    if method == "conventional_em":
      fitted, _ = M.conventional_em(keys[3], te_obs, te_mask, num_states=k,
                                    max_duration=config.max_duration, num_iters=cfg["em_iters"],
                                    min_covar=cfg["min_covar"], chunk_size=em_chunk)
      acc = score(fitted)
      train_time = time.time() - t0
    elif method == "em_mapping":
      n = min(cfg["em_mapping_users"], tr_obs.shape[0])
      fitted, _ = M.conventional_em(keys[4], tr_obs[:n], tr_mask[:n], num_states=k,
                                    max_duration=config.max_duration, num_iters=cfg["em_iters"],
                                    min_covar=cfg["min_covar"], chunk_size=em_chunk)
      aligned = M.align_to_reference(fitted, start.emission.mean)
      targets = codec.encode_batch(aligned)
      model = M.EmbeddingMapper(codec, start, config.embed_dim, rngs=rngs)
      model, _ = fit(method, model, Tr.regression_loss,
                     Tr.Batch(tr_emb[:n], tr_obs[:n], tr_mask[:n], targets),
                     cfg["regression_steps"], keys[5])
      acc = score(Tr.predict(model, test_data, keys[6]))
      train_time = time.time() - t0
    else:
      if method == "mlp_mapper":
        model = M.EmbeddingMapper(codec, start, config.embed_dim, rngs=rngs)
      elif method == "initial_fusion":
        model = M.InitialFusion(codec, start, config.embed_dim, num_stages=cfg["num_stages"],
                                gradient=cfg["gradient"], spsa_samples=cfg["spsa_samples"],
                                rngs=rngs)
      elif method == "dennl":
        model = M.DENNL(codec, start, config.embed_dim, num_stages=cfg["num_stages"],
                        hidden=(cfg["hidden"], cfg["hidden"]), gradient=cfg["gradient"],
                        spsa_samples=cfg["spsa_samples"], rngs=rngs)
      else:
        raise ValueError(f"unknown method {method!r}")
      loss_fn = Tr.likelihood_loss if cfg["loss"] == "likelihood" else Tr.heldout_step_loss
      model, train_time = fit(method, model, loss_fn, train_data, cfg["train_steps"], keys[5])
      acc = score(Tr.predict(model, test_data, keys[6]))
    results[method] = acc
    times[method] = train_time
    _log(f"[{name}] {METHOD_NAMES[method]:28s} accuracy {acc:.4f}  time {train_time:.1f}s")
  return results, times, curves


def write_markdown(path, table, times, cfg, methods, settings):
  lines = [
      "# Table 1 (synthetic HSMMs): labelling accuracy, ours vs. paper",
      "",
      f"Gradient mode of the EM layers: `{cfg['gradient']}`; "
      f"{cfg['num_users']} training users, {cfg['num_test_users']} held-out users; "
      f"noise settings at T = {cfg['noise_length']}; preset `{cfg['preset']}`; "
      f"training loss `{cfg['loss']}`.",
      "",
      "| Method | " + " | ".join(f"{s} ours | {s} paper" for s in settings) + " |",
      "|---|" + "---|---|" * len(settings),
  ]
  for method in ["oracle", "pooled_start", *methods]:
    cells = []
    for s in settings:
      ours = table.get(method, {}).get(s)
      paper = PAPER.get(method, {}).get(s)
      cells.append("—" if ours is None else f"{100 * ours:.1f}")
      cells.append("—" if paper is None else f"{paper:.1f}")
    label = {"oracle": "Oracle (true parameters)",
             "pooled_start": "Pooled start (one shared model)"}.get(method) or METHOD_NAMES[method]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  lines += ["", "Training/fitting time per method and setting (seconds, wall clock, "
            "including compilation):", "",
            "| Method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
  for method in methods:
    cells = [f"{times.get(method, {}).get(s, float('nan')):.0f}" for s in settings]
    lines.append(f"| {METHOD_NAMES[method]} | " + " | ".join(cells) + " |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


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
      ax.plot(np.asarray(curve["step"])[window - 1:], smooth, label=METHOD_NAMES[method])
    ax.set_title(s)
    ax.set_xlabel("step")
    ax.set_ylabel("NLL per time step")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  if _CACHE_DIR.value:
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  methods = [m.strip() for m in _METHODS.value]
  settings = [s.strip() for s in _SETTINGS.value]
  for m in methods:
    if m not in METHODS:
      raise app.UsageError(f"unknown method {m!r}; choose from {METHODS}")
  for s in settings:
    if s not in SETTINGS:
      raise app.UsageError(f"unknown setting {s!r}; choose from {SETTINGS}")
  cfg = {name: _setting(name) for name in (
      "num_users", "num_test_users", "train_steps", "batch_size", "em_iters", "num_stages",
      "max_duration", "noise_length", "em_mapping_users", "regression_steps", "hidden",
      "gradient")}
  cfg.update(preset="quick" if _QUICK.value else "full", seed=_SEED.value,
             learning_rate=_LEARNING_RATE.value, spsa_samples=_SPSA_SAMPLES.value,
             log_every=_LOG_EVERY.value, loss=_LOSS.value, min_covar=_MIN_COVAR.value, methods=methods, settings=settings)
  out = _OUTPUT_DIR.value
  os.makedirs(out, exist_ok=True)
  config = dataclasses.replace(S.SyntheticConfig(), max_duration=cfg["max_duration"])
  cfg["synthetic"] = dataclasses.asdict(config)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  _log(f"config: {json.dumps(cfg)}")

  key = jax.random.PRNGKey(cfg["seed"])
  k_world, k_train, k_test, k_settings = jax.random.split(key, 4)
  world = S.make_world(k_world, config)
  train_pop = S.make_population(k_train, world, cfg["num_users"], config)
  test_pop = S.make_population(k_test, world, cfg["num_test_users"], config)

  table, times, curves = {}, {}, {}
  t_start = time.time()
  for i, name in enumerate(settings):
    res, tms, crv = run_setting(name, jax.random.fold_in(k_settings, SETTINGS.index(name)),
                                world, train_pop, test_pop, config, cfg, methods)
    for m, acc in res.items():
      table.setdefault(m, {})[name] = acc
    for m, t in tms.items():
      times.setdefault(m, {})[name] = t
    curves[name] = crv
    # Write after every setting so a long run leaves partial results.
    with open(os.path.join(out, "table1.json"), "w") as f:
      json.dump({m: v for m, v in table.items()}, f, indent=2)
    with open(os.path.join(out, "timings.json"), "w") as f:
      json.dump({"seconds": times, "total_seconds": time.time() - t_start}, f, indent=2)
    with open(os.path.join(out, "curves.json"), "w") as f:
      json.dump(curves, f)
    done = sorted(settings[:i + 1], key=SETTINGS.index)
    write_markdown(os.path.join(out, "table1.md"), table, times, cfg, methods, done)
    plot_curves(os.path.join(out, "training_curves.png"), curves, done)
  _log(f"done in {time.time() - t_start:.0f}s; results in {out}")
  with open(os.path.join(out, "table1.md")) as f:
    print(f.read())


if __name__ == "__main__":
  app.run(main)
