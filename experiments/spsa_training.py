r"""Does SPSA train DENNL?  The estimate along a real training run, and training at equal CPU time.

  python -m experiments.spsa_training --quick --output_dir=/tmp/spsa_training   # quick scale
  python -m experiments.spsa_training --output_dir=/tmp/spsa_training_full       # full scale

One Table 1 setting (data, network and EM settings of a synthetic_table1
variant, experiments/configs/spsa_training.py).  Two studies:

(a) **The estimate along a real run.**  DENNL trains with exact gradients;
    every ``probe_every`` steps, on fixed minibatches of each
    ``probe_batch_sizes``, the exact gradient of the training loss with
    respect to *all network weights* is compared with estimates of it
    (``probes``: SPSA with S perturbations per EM layer and user and step c,
    or the forward-gradient estimate with the same directions and exact
    directional derivatives; fresh draws per repeat): cosine similarity and
    norm ratio.  This is the quantity the
    optimiser sees, unlike a per-layer Jacobian check.
(b) **Training runs** (``runs``: gradient mode, perturbations, users per
    step, learning rate, Adam's b1), each ``run_steps`` steps: validation
    held-out NLL (the label-free criterion) and labelling accuracy against
    process CPU seconds after compilation (a one-step warm-up run first), so
    modes compare at equal CPU time.

Writes ``results.json``, ``tables.md``, ``curves.png`` and ``config.json`` to
``--output_dir``.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

import dennl_jax as dj
from dennl_jax import synthetic as S
from experiments import common
from experiments import synthetic_table1 as table1
from experiments import table1_selection as selection


def _setting(config):
  """The Table 1 setting (and its config) the studies run on."""
  t1 = common.get_config("synthetic_table1", config.table1)
  t1.settings = (config.setting,)
  t1.methods = ("dennl",)
  t1.oracle_selection = False
  t1.losses = (config.loss,)
  t1 = table1.prepare_config(t1)
  synthetic = S.SyntheticConfig(**t1.synthetic.to_dict())
  populations, k_settings = table1.make_populations(config.seed, t1, synthetic)
  s, _ = table1.make_setting(config.setting, table1.setting_key(k_settings, config.setting),
                             populations, t1, synthetic)
  return s


def _model(s, gradient: str, samples: int, perturbation: str, step: float = 1e-3):
  """DENNL of the setting with the given EM-layer gradient; same initialisation for all."""
  config = s.config.copy_and_resolve_references()
  with config.unlocked():
    config.gradient, config.spsa_samples = gradient, max(samples, 1)
    config.spsa_perturbation, config.spsa_step = perturbation, step
  return table1._dennl(s._replace(config=config), selection.network_rngs(s))


def _gradient_fn(graphdef, loss_fn):
  def grad(state, batch, key):
    flat, _ = ravel_pytree(jax.grad(lambda x: loss_fn(nnx.merge(graphdef, x), batch, key))(state))
    return flat
  return jax.jit(grad)


def _cosine(a, b) -> float:
  return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def probe_along_run(s, config) -> list:
  """Study (a): one record per (probe step, batch size, perturbations)."""
  loss_fn = selection.LOSSES[config.loss]
  model = _model(s, "exact", 1, config.spsa_perturbation)
  exact = _gradient_fn(nnx.split(model)[0], loss_fn)
  spsa = {}
  for spec in common.names(config.probes):
    gradient, n, step = parse_probe(spec)
    spsa[spec] = _gradient_fn(
        nnx.split(_model(s, gradient, n, config.spsa_perturbation, step))[0], loss_fn)
  k_probe = jax.random.fold_in(s.keys[5], 7)
  order = np.asarray(jax.random.permutation(k_probe, s.train.mask.shape[0]))
  batches = {b: jax.tree_util.tree_map(lambda x: x[order[:b]], s.train)
             for b in config.probe_batch_sizes}
  records, updates = [], [0]

  def probe(m) -> float:
    state = nnx.split(m)[1]
    for b, batch in batches.items():
      for r in range(config.probe_repeats):
        key = jax.random.fold_in(k_probe, 1000 * updates[0] + r)
        g = np.asarray(exact(state, batch, key), np.float64)
        for n, fn in spsa.items():
          t = time.process_time()
          e = np.asarray(fn(state, batch, key), np.float64)
          records.append(dict(step=updates[0], batch=b, estimator=n, repeat=r,
                              cosine=_cosine(g, e), norm_ratio=float(np.linalg.norm(e)
                                                                    / np.linalg.norm(g)),
                              cpu=time.process_time() - t))
    value = selection.validation_score(s, m)
    now = [x for x in records if x["step"] == updates[0]]
    common.log(f"[probe] step {updates[0]}: validation {value:.4f}; mean cosine " + ", ".join(
        f"{n},B={b}: "
        f"{np.mean([x['cosine'] for x in now if x['estimator'] == n and x['batch'] == b]):.3f}"
        for b in batches for n in spsa))
    updates[0] += config.probe_every
    return value

  optimizer = dj.make_optimizer(config.probe_rate)
  dj.train(model, s.train, loss_fn=loss_fn, optimizer=optimizer, num_steps=config.probe_steps,
           batch_size=s.config.batch_size, key=s.keys[5], log=common.log, log_every=0,
           name="probe/exact", eval_fn=probe, eval_every=config.probe_every)
  return records


def parse_probe(spec: str) -> tuple[str, int, float]:
  """``"spsa:S:c"`` or ``"forward:S"`` -> (gradient, S, c); ConfigError naming a bad one."""
  parts = spec.split(":")
  if parts[0] == "spsa" and len(parts) == 3:
    return "spsa", int(parts[1]), float(parts[2])
  if parts[0] == "forward" and len(parts) == 2:
    return "forward", int(parts[1]), 1e-3
  raise common.ConfigError(f"probe {spec!r}: want spsa:samples:step or forward:samples")


def parse_run(spec: str) -> dict:
  """``"name:gradient:samples:batch:rate:b1"`` -> dict; ConfigError naming a bad field."""
  parts = spec.split(":")
  if len(parts) != 6:
    raise common.ConfigError(f"run {spec!r}: want name:gradient:samples:batch:rate:b1")
  name, gradient, samples, batch, rate, b1 = parts
  if gradient not in ("exact", "spsa", "forward"):
    raise common.ConfigError(f"run {spec!r}: gradient must be exact, spsa or forward")
  return dict(name=name, gradient=gradient, samples=int(samples), batch=int(batch),
              rate=float(rate), b1=float(b1))


def training_run(s, config, spec: dict) -> dict:
  """Study (b): one run's validation curve against CPU seconds."""
  model = _model(s, spec["gradient"], spec["samples"], config.spsa_perturbation)
  optimizer = dj.make_optimizer(spec["rate"], b1=spec["b1"])
  loss_fn = selection.LOSSES[config.loss]
  # Warm-up (compilation of the step and the validation): CPU seconds then count training.
  warm = dj.train(model, s.train, loss_fn=loss_fn, optimizer=optimizer, num_steps=1,
                  batch_size=spec["batch"], key=s.keys[5], log=None, log_every=0).model
  selection.validation_score(s, warm), selection.validation_accuracy(s, warm)
  curve, cpu_start = [], time.process_time()

  def evaluate(m) -> float:
    cpu = time.process_time() - cpu_start
    nll, acc = selection.validation_score(s, m), selection.validation_accuracy(s, m)
    curve.append(dict(step=len(curve) * config.eval_every, cpu=cpu, heldout_nll=nll,
                      accuracy=acc))
    return nll

  _, history, _ = dj.train(model, s.train, loss_fn=loss_fn, optimizer=optimizer,
                           num_steps=config.run_steps, batch_size=spec["batch"], key=s.keys[5],
                           log=common.log, log_every=max(config.run_steps // 4, 1), name=spec["name"],
                           eval_fn=evaluate, eval_every=config.eval_every)
  curve[-1]["step"] = config.run_steps
  best = min(curve, key=lambda c: c["heldout_nll"])
  common.log(f"[{spec['name']}] start accuracy {curve[0]['accuracy']:.4f}; best validation NLL "
             f"{best['heldout_nll']:.4f} at step {best['step']} (accuracy {best['accuracy']:.4f});"
             f" {curve[-1]['cpu']:.0f} CPU s")
  return dict(spec, curve=curve, skipped=int(history.skipped.sum()))


def _at_cpu(curve, seconds):
  """The label-free choice among the evaluations done within ``seconds`` CPU seconds."""
  within = [c for c in curve if c["cpu"] <= seconds] or curve[:1]
  return min(within, key=lambda c: c["heldout_nll"])


def tables(probes, runs) -> list:
  lines = ["## (a) SPSA estimate of the full network gradient along an exact-gradient run", "",
           "Cosine similarity with the exact gradient (mean over repeats), and the estimate's "
           "norm over the exact one:", ""]
  keys = sorted({(p["batch"], p["estimator"]) for p in probes})
  steps = sorted({p["step"] for p in probes})

  def cell(step, b, n, field):
    return np.mean([p[field] for p in probes
                    if p["step"] == step and p["batch"] == b and p["estimator"] == n])
  lines += common.markdown_table(
      ["step", *[f"B={b}, {n}" for b, n in keys]],
      [[step, *[f"{cell(step, b, n, 'cosine'):.3f} (×{cell(step, b, n, 'norm_ratio'):.1f})"
                for b, n in keys]] for step in steps])
  exact = next((r for r in runs if r["gradient"] == "exact"), None)
  budget = exact["curve"][-1]["cpu"] if exact else None
  lines += ["", "## (b) Training runs: label-free choice (lowest validation held-out NLL)", "",
            "Accuracy = validation labelling accuracy of that checkpoint (reported, never used "
            "to choose)."
            + (f" 'Within the exact run's CPU': the best checkpoint reached within "
               f"{budget:.0f} CPU s." if budget else ""), ""]
  rows = []
  for r in runs:
    best = min(r["curve"], key=lambda c: c["heldout_nll"])
    equal = _at_cpu(r["curve"], budget) if budget else None
    rows.append([r["name"], r["gradient"], r["samples"] or "—", r["batch"], r["rate"], r["b1"],
                 f"{r['curve'][0]['heldout_nll']:.3f} → {best['heldout_nll']:.3f}",
                 f"{100 * r['curve'][0]['accuracy']:.1f} → {100 * best['accuracy']:.1f}",
                 best["step"], f"{r['curve'][-1]['cpu']:.0f}",
                 "—" if equal is None else f"{100 * equal['accuracy']:.1f}"])
  lines += common.markdown_table(
      ["run", "gradient", "S", "users/step", "rate", "b1", "validation NLL start → best",
       "accuracy start → at best NLL", "best step", "CPU s", "accuracy within the exact run's CPU"],
      rows)
  return lines


def plot(path, runs):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for r in runs:
    cpu = [c["cpu"] for c in r["curve"]]
    axes[0].plot(cpu, [c["heldout_nll"] for c in r["curve"]], marker=".", label=r["name"])
    axes[1].plot(cpu, [100 * c["accuracy"] for c in r["curve"]], marker=".", label=r["name"])
  axes[0].set_ylabel("validation held-out NLL")
  axes[1].set_ylabel("validation accuracy %")
  for ax in axes:
    ax.set_xlabel("process CPU seconds")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def run(config, output_dir: str):
  config = config.copy_and_resolve_references()
  specs = [parse_run(r) for r in common.names(config.runs)]
  common.save_config(config, output_dir)
  s = _setting(config)
  results = {"probes": probe_along_run(s, config) if config.probes else [], "runs": []}
  for spec in specs:
    results["runs"].append(training_run(s, config, spec))
    common.write_json(os.path.join(output_dir, "results.json"), results)
  common.write_json(os.path.join(output_dir, "results.json"), results)
  text = common.write_markdown(os.path.join(output_dir, "tables.md"),
                               [f"# SPSA training study: {config.table1} scale, setting "
                                f"{config.setting}, loss {config.loss}", "",
                                *tables(results["probes"], results["runs"])])
  plot(os.path.join(output_dir, "curves.png"), results["runs"])
  print(text)
  return results


if __name__ == "__main__":
  common.app_main("spsa_training", run, output_dir="/tmp/spsa_training",
                  variants={"quick": "quick"}, compilation_cache_dir=common.XLA_CACHE_DIR)
