r"""Scaling: parallel-in-time smoothing and data parallelism over devices.

  python -m benchmarks.bench_scaling [--output_dir=/tmp/bench_scaling] \
      [--config=benchmarks/configs/bench_scaling.py:quick]

(a) One long sequence (Categorical HMM, K states, float32): the sequential
    smoother (``hmm.hmm_smoother``, a ``lax.scan``) against the associative-
    scan one (``time_parallel.hmm_smoother``) and dynamax's parallel smoother, for
    each T of ``config.time_lengths``; timed in alternation in one process
    (interleaved medians, compile excluded and reported separately).  Prints
    sequential / parallel ratios and the crossover (the smallest T where the
    parallel smoother wins), if any.
(b) ``fit_em`` on U users and a DENNL training step (likelihood loss, SPSA
    EM layer) on 1, 2, 4 forced host devices
    (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, one subprocess
    each, inputs placed by ``dennl_jax.sharding``).  Prints the speedup over
    one device.  Forced host devices share the machine's cores: on a 2-core
    CPU expect little or nothing; the figure that matters comes from real
    devices (GPUs, several hosts).

With --output_dir: results.json, results.md and config.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from experiments import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compile_seconds(fn, *args):
  with common.timer() as t:
    compiled = jax.jit(fn).lower(*args).compile()
  return compiled, t.seconds


def smoother_rows(config):
  """One row per T: seconds of each smoother and the ratios."""
  import dennl_jax as dj
  from dennl_jax import time_parallel
  from dennl_jax._chain import masked_log_likelihoods
  rows = []
  k = config.num_states
  for num_steps in config.time_lengths:
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), num_steps)
    k_a, k_b, k_c, k_o = jax.random.split(key, 4)
    hmm = dj.HMM(jax.random.dirichlet(k_a, jnp.ones(k)),
                 jax.random.dirichlet(k_b, jnp.ones(k), (k,)),
                 dj.Categorical(jax.random.dirichlet(k_c, jnp.ones(config.num_symbols), (k,))))
    obs = jax.random.randint(k_o, (num_steps,), 0, config.num_symbols)
    mask = jnp.ones(num_steps, bool)
    log_likes = masked_log_likelihoods(hmm.emission, obs, mask)
    args = (hmm.initial, hmm.transition, log_likes, mask)
    seq, seq_compile = _compile_seconds(dj.hmm_smoother, *args)
    par, par_compile = _compile_seconds(time_parallel.hmm_smoother, *args)
    calls = [(seq, args), (par, args)]
    if config.dynamax:
      from dynamax.hidden_markov_model import parallel_hmm_smoother
      dyn, dyn_compile = _compile_seconds(parallel_hmm_smoother, *args[:3])
      calls.append((dyn, args[:3]))
    timings = common.interleaved_median_seconds(calls, config.repeats)
    row = {"T": num_steps, "sequential_s": timings[0][0], "parallel_s": timings[1][0],
           "compile_sequential_s": seq_compile, "compile_parallel_s": par_compile}
    # The same answer, or the timing means nothing.
    a, b = seq(*args), par(*args)
    row["max_abs_diff_smoothed"] = float(jnp.max(jnp.abs(a.smoothed_probs - b.smoothed_probs)))
    if config.dynamax:
      row.update(dynamax_parallel_s=timings[2][0], compile_dynamax_s=dyn_compile)
      row["max_abs_diff_dynamax"] = float(jnp.max(jnp.abs(
          dyn(*args[:3]).smoothed_probs - b.smoothed_probs)))
    rows.append(row)
  return rows


def device_worker(spec: dict) -> dict:
  """Runs inside a subprocess with forced host devices: seconds of fit_em and a train step."""
  from flax import nnx
  import dennl_jax as dj
  from dennl_jax import sharding
  mesh = sharding.users_mesh()
  key = jax.random.PRNGKey(spec["seed"])
  k_p, k_o, k_e, k_t = jax.random.split(key, 4)
  k, v = spec["num_states"], spec["num_symbols"]
  u, t = spec["num_users"], spec["num_steps"]
  hmms = dj.HMM(jax.random.dirichlet(k_p, jnp.ones(k), (u,)),
                jax.random.dirichlet(jax.random.fold_in(k_p, 1), jnp.ones(k), (u, k)),
                dj.Categorical(jax.random.dirichlet(jax.random.fold_in(k_p, 2),
                                                    jnp.ones(v), (u, k))))
  obs = jax.random.randint(k_o, (u, t), 0, v)
  mask = jnp.ones((u, t), bool)
  placed = sharding.shard_users((hmms, obs, mask), mesh)
  fit = jax.jit(lambda p, o, m: dj.fit_em(p, o, m, spec["em_iters"]))
  (fit_s, _), = common.interleaved_median_seconds([(fit, placed)], spec["repeats"])

  b, tt = spec["train_users"], spec["train_steps"]
  start = jax.tree_util.tree_map(lambda x: x[0], hmms)
  model = dj.DENNL(dj.ParamCodec(start), start, 8, num_stages=2, hidden=(64,),
                   start_hidden=(32,), latent_dim=8, spsa_samples=4, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  optimizer = dj.make_optimizer()
  opt_state = optimizer.init(state)
  step = dj.make_train_step(graphdef, dj.likelihood_loss, optimizer)
  batch = sharding.shard_users(
      dj.Batch(jax.random.normal(k_e, (b, 8)), jax.random.randint(k_t, (b, tt), 0, v),
               jnp.ones((b, tt), bool)), mesh)
  state, opt_state = sharding.replicate((state, opt_state), mesh)
  args = (state, opt_state, batch, jax.random.PRNGKey(0))
  (step_s, _), = common.interleaved_median_seconds([(step, args)], spec["repeats"])
  return {"devices": jax.device_count(), "fit_em_s": fit_s, "train_step_s": step_s}


def device_rows(config):
  spec = {key: config[key] for key in ("seed", "num_states", "num_symbols", "num_users",
                                        "num_steps", "em_iters", "train_users", "train_steps",
                                        "repeats")}
  rows = []
  for count in config.device_counts:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"), ROOT,
                                           os.environ.get("PYTHONPATH", "")]))
    code = ("import json, sys; from benchmarks.bench_scaling import device_worker; "
            "print('RESULT', json.dumps(device_worker(json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
      raise RuntimeError(f"device worker ({count} devices) failed:\n{proc.stderr[-3000:]}")
    rows.append(json.loads(lines[-1][len("RESULT "):]))
  return rows


def run(config, output_dir: str | None = None) -> dict:
  load = os.getloadavg()
  smoothing = smoother_rows(config)
  header = (f"K={config.num_states}, Categorical V={config.num_symbols}, float32, one sequence; "
            f"median of {config.repeats} interleaved; {os.cpu_count()} CPUs, jax "
            f"{jax.__version__}, {jax.default_backend()}; load average {load[0]:.1f}")
  cols = ["T", "sequential s", "parallel s", "seq / par"]
  if config.dynamax:
    cols += ["dynamax parallel s", "dynamax / ours par"]
  cols += ["compile seq s", "compile par s"]
  table = []
  for r in smoothing:
    line = [f"{r['T']:,}", f"{r['sequential_s']:.5f}", f"{r['parallel_s']:.5f}",
            f"{r['sequential_s'] / r['parallel_s']:.2f}"]
    if config.dynamax:
      line += [f"{r['dynamax_parallel_s']:.5f}", f"{r['dynamax_parallel_s'] / r['parallel_s']:.2f}"]
    line += [f"{r['compile_sequential_s']:.1f}", f"{r['compile_parallel_s']:.1f}"]
    table.append(line)
  smoothing_table = common.markdown_table(cols, table)
  wins = [r["T"] for r in smoothing if r["parallel_s"] < r["sequential_s"]]
  crossover = (f"crossover: the parallel smoother is faster from T = {wins[0]:,}" if wins else
               f"crossover: none up to T = {max(config.time_lengths):,} on this "
               f"{jax.default_backend()} (the sequential scan wins everywhere)")

  devices = device_rows(config)
  base = devices[0]
  device_table = common.markdown_table(
      ["devices", "fit_em s", "fit_em speedup", "train step s", "train step speedup"],
      [(d["devices"], f"{d['fit_em_s']:.4f}", f"{base['fit_em_s'] / d['fit_em_s']:.2f}",
        f"{d['train_step_s']:.4f}", f"{base['train_step_s'] / d['train_step_s']:.2f}")
       for d in devices])
  device_header = (f"fit_em: U={config.num_users}, T={config.num_steps}, {config.em_iters} "
                   f"iterations; DENNL train step: B={config.train_users}, "
                   f"T={config.train_steps}, 2 SPSA stages; forced host devices share "
                   f"{os.cpu_count()} cores (little speedup is expected on a small CPU)")
  text = "\n\n".join([header, "\n".join(smoothing_table), crossover, device_header,
                      "\n".join(device_table)])
  print(text)
  result = {"load_average": load, "smoothing": smoothing, "crossover_T": wins[0] if wins else None,
            "devices": devices, "cpu_count": os.cpu_count(), "jax_version": jax.__version__,
            "backend": jax.default_backend()}
  if output_dir:
    common.save_config(config, output_dir)
    common.write_json(os.path.join(output_dir, "results.json"), result)
    common.write_markdown(os.path.join(output_dir, "results.md"), header, smoothing_table,
                          crossover + "\n\n" + device_header + "\n\n" + "\n".join(device_table))
  return result


if __name__ == "__main__":
  common.app_main("bench_scaling", run, variants={"quick": "quick"})
