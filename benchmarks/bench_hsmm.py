r"""Cost of one HSMM EM step: structured recursion vs the dense expanded HMM.

  python -m benchmarks.bench_hsmm [--output_dir=/tmp/bench_hsmm] \
      [--config=benchmarks/configs/bench_hsmm.py --config.durations="(10, 30, 60, 120)"]

Workload (benchmarks/configs/bench_hsmm.py): U users, each with its own HSMM
(K states, Categorical emissions over V symbols, Poisson durations truncated
at D) and one length-T sequence, float32.  For every D we time a full EM
iteration (E-step + M-step of every parameter), ``jit(vmap(...))``:

* structured: ``dj.em_step`` on the HSMM -- the countdown forward-backward,
  O(K (K + D)) per step;
* expanded: ``oracles.expanded_em_update`` -- the same EM step with the
  E-step done by the engine's plain HMM smoother on the explicitly built
  (K D)-state transition matrix, O((K D)^2) per step.  It runs on
  ``config.expanded_users`` users (memory: a (K D)^2 matrix per user) and is
  skipped where K D exceeds ``config.max_expanded_states``.

Batched kernel.  ``jax.vmap`` of the HSMM smoother runs the
users-minor kernel of ``dennl_jax._kernel_hsmm`` (so "structured" above is that
kernel); a second table times, in the same process on the same data and
interleaved, ``jit(vmap(dj.em_step))`` compiled with the kernels on and off
(the models' ``kernels="per_sequence"`` is the per-sequence vmap), at
``config.kernel_users`` users, ``config.kernel_states`` states and each D of
``config.kernel_durations``, with the load average before and after (the
machine may be shared).

Exact gradient.  A third table times the gradient of
``config.gradient_stages`` stacked vmapped EM layers at
``config.gradient_users`` users and T = ``config.gradient_steps`` (Table 1's
shape: 16 users, T = 400, 3 stages) with ``gradient="exact"`` (the E-step's
VJP as one forward-mode pass, :mod:`dennl_jax._score`) and
``"exact_autodiff"`` (checkpointed autodiff through the scans), interleaved,
with each compiled program's temporary memory and the largest gradient
difference.

Compile time is excluded (one warm-up call), every timing waits on
``block_until_ready``, the median of ``config.repeats`` is reported as
microseconds per user-step.  The machine may be shared: timings are noisy
(compare ratios within one run, not across runs).  With --output_dir:
results.json, results.md and config.json.
"""
from __future__ import annotations

import functools
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

import dennl_jax as dj
from dennl_jax import oracles
from experiments import common
from benchmarks.bench_em_step import both_paths


def random_models(rng, num_users, num_states, num_symbols, max_duration):
  """Per-user HSMMs (pytree with a leading user axis), float32, numpy-drawn."""
  initial = rng.dirichlet(np.ones(num_states), num_users)
  off = rng.dirichlet(np.ones(num_states - 1), (num_users, num_states))
  transition = np.zeros((num_users, num_states, num_states))
  for k in range(num_states):
    transition[:, k, np.arange(num_states) != k] = off[:, k]
  rate = rng.uniform(1.0, 0.6 * max_duration, (num_users, num_states))
  probs = rng.dirichlet(np.ones(num_symbols), (num_users, num_states))
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return dj.HSMM(f32(initial), f32(transition), dj.PoissonDuration(f32(rate), max_duration),
              dj.Categorical(f32(probs)))


def take_users(tree, num_users):
  return jax.tree_util.tree_map(lambda x: x[:num_users], tree)


def format_table(rows, num_states):
  """Markdown lines; growth is compared with D and with the O(K (K + D)) model."""
  if not rows:
    return []
  base = rows[0]
  d0 = base["max_duration"]
  cells = []
  for row in rows:
    growth = row["structured_us_per_user_step"] / base["structured_us_per_user_step"]
    cost_ratio = (num_states + row["max_duration"]) / (num_states + d0)
    if "expanded_us_per_user_step" in row:
      exp_text = f"{row['expanded_us_per_user_step']:.1f}"
      ratio_text = f"{row['ratio_expanded_over_structured']:.1f}×"
    else:
      exp_text, ratio_text = "skipped (K·D too large)", "–"
    cells.append([row["max_duration"], row["expanded_states"],
                  f"{row['structured_us_per_user_step']:.2f}", f"{growth:.2f}×",
                  f"{row['max_duration'] / d0:.0f}", f"{cost_ratio:.2f}", exp_text, ratio_text])
  return common.markdown_table(
      ["D", "K·D", "structured µs/user-step", f"time / time at D={d0}", f"D / {d0}",
       f"(K+D) / (K+{d0})", "expanded (K·D)² µs/user-step", "expanded / structured"],
      cells, align="right")


def kernel_rows(config, rng) -> list[dict]:
  """em_step throughput, batched users-minor kernel vs per-sequence vmap, one row per D."""
  num_users, num_steps = config.kernel_users, config.num_steps
  obs = jnp.asarray(rng.randint(0, config.num_symbols, (num_users, num_steps)), jnp.int32)
  mask = jnp.ones((num_users, num_steps), bool)
  rows = []
  for max_duration in (int(d) for d in config.kernel_durations):
    params = random_models(rng, num_users, config.kernel_states, config.num_symbols,
                           max_duration)
    args = (params, obs, mask)
    batched, per_sequence = both_paths(jax.vmap(dj.em_step), *args)
    max_diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(
        jax.tree_util.tree_leaves(batched(*args)), jax.tree_util.tree_leaves(per_sequence(*args))))
    load_before = os.getloadavg()[0]
    (fast_s, fast_all), (slow_s, slow_all) = common.interleaved_median_seconds(
        [(batched, args), (per_sequence, args)], repeats=config.repeats)
    user_steps = num_users * num_steps
    row = {"max_duration": max_duration, "num_users": num_users,
           "num_states": config.kernel_states,
           "batched_user_steps_per_s": user_steps / fast_s,
           "per_sequence_user_steps_per_s": user_steps / slow_s,
           "ratio_batched_over_per_sequence": slow_s / fast_s,
           "batched_raw_seconds": fast_all, "per_sequence_raw_seconds": slow_all,
           "max_abs_param_diff_f32": max_diff,
           "load_average_before": load_before, "load_average_after": os.getloadavg()[0]}
    rows.append(row)
    common.log(str(row))
  return rows


def format_kernel_table(rows):
  return common.markdown_table(
      ["D", "K", "U", "batched user-steps/s", "per-sequence user-steps/s", "batched / per-sequence",
       "load avg (before, after)"],
      [[r["max_duration"], r["num_states"], r["num_users"],
        f"{r['batched_user_steps_per_s']:,.0f}", f"{r['per_sequence_user_steps_per_s']:,.0f}",
        f"{r['ratio_batched_over_per_sequence']:.2f}×",
        f"{r['load_average_before']:.1f}, {r['load_average_after']:.1f}"] for r in rows],
      align="right")


def gradient_rows(config, rng) -> list[dict]:
  """Exact gradient of a stack of vmapped EM layers: the score VJP vs autodiff, one row per D.

  ``em_layer(gradient="exact")`` (the E-step's VJP as one forward-mode pass,
  dennl_jax._score) against ``gradient="exact_autodiff"`` (checkpointed
  reverse mode through the scans), same data,
  interleaved, with XLA's temporary bytes of each compiled gradient.
  """
  num_users, num_steps = config.gradient_users, config.gradient_steps
  obs = jnp.asarray(rng.randint(0, config.num_symbols, (num_users, num_steps)), jnp.int32)
  mask = jnp.ones((num_users, num_steps), bool)

  def stack_gradient(mode):
    layer = jax.vmap(functools.partial(dj.em_layer, gradient=mode))

    def loss(params):
      for _ in range(config.gradient_stages):
        params = layer(params, obs, mask)
      return jnp.sum(jax.vmap(lambda p, o, m: p.log_likelihood(o, m))(params, obs, mask))
    return jax.jit(jax.grad(loss))

  rows = []
  for max_duration in (int(d) for d in config.gradient_durations):
    params = random_models(rng, num_users, config.gradient_states, config.num_symbols,
                           max_duration)
    score, autodiff = (stack_gradient(mode).lower(params).compile()
                       for mode in ("exact", "exact_autodiff"))
    leaves = lambda tree: jax.tree_util.tree_leaves(tree)
    max_rel_diff = max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
                       for x, y in zip(leaves(score(params)), leaves(autodiff(params))))
    load_before = os.getloadavg()[0]
    (score_s, score_all), (auto_s, auto_all) = common.interleaved_median_seconds(
        [(score, (params,)), (autodiff, (params,))], repeats=config.repeats)
    row = {"max_duration": max_duration, "num_users": num_users, "num_steps": num_steps,
           "num_states": config.gradient_states, "stages": config.gradient_stages,
           "score_vjp_seconds": score_s, "autodiff_seconds": auto_s,
           "ratio_autodiff_over_score_vjp": auto_s / score_s,
           "score_vjp_temp_bytes": int(score.memory_analysis().temp_size_in_bytes),
           "autodiff_temp_bytes": int(autodiff.memory_analysis().temp_size_in_bytes),
           "max_rel_grad_diff_f32": max_rel_diff,
           "score_vjp_raw_seconds": score_all, "autodiff_raw_seconds": auto_all,
           "load_average_before": load_before, "load_average_after": os.getloadavg()[0]}
    rows.append(row)
    common.log(str(row))
  return rows


def format_gradient_table(rows):
  mib = lambda b: f"{b / 2**20:.1f}"
  return common.markdown_table(
      ["D", "K", "U", "T", "stages", "score VJP ms", "autodiff ms", "autodiff / score VJP",
       "temp MiB (score, autodiff)", "max rel. grad diff (f32)", "load avg (before, after)"],
      [[r["max_duration"], r["num_states"], r["num_users"], r["num_steps"], r["stages"],
        f"{1e3 * r['score_vjp_seconds']:.1f}", f"{1e3 * r['autodiff_seconds']:.1f}",
        f"{r['ratio_autodiff_over_score_vjp']:.2f}×",
        f"{mib(r['score_vjp_temp_bytes'])}, {mib(r['autodiff_temp_bytes'])}",
        f"{r['max_rel_grad_diff_f32']:.1e}",
        f"{r['load_average_before']:.1f}, {r['load_average_after']:.1f}"] for r in rows],
      align="right")


def run(config, output_dir: str | None = None) -> dict:
  """One row per D; prints the table, writes it with ``output_dir``."""
  num_users, num_steps = config.num_users, config.num_steps
  num_states, num_symbols = config.num_states, config.num_symbols
  rng = np.random.RandomState(config.seed)
  obs = jnp.asarray(rng.randint(0, num_symbols, (num_users, num_steps)), jnp.int32)
  mask = jnp.ones((num_users, num_steps), bool)
  structured = jax.jit(jax.vmap(dj.em_step))
  expanded = jax.jit(jax.vmap(lambda p, o, m: oracles.expanded_em_update(p, o, m)[0]))
  exp_users = min(config.expanded_users, num_users)

  rows = []
  for max_duration in (int(d) for d in config.durations):
    params = random_models(rng, num_users, num_states, num_symbols, max_duration)
    dj.validate(params, obs, mask)  # once, on the concrete batch
    sec, raw = common.median_seconds(structured, params, obs, mask, repeats=config.repeats)
    row = {"max_duration": max_duration, "expanded_states": num_states * max_duration,
           "structured_us_per_user_step": 1e6 * sec / (num_users * num_steps),
           "structured_raw_seconds": raw}
    if num_states * max_duration <= config.max_expanded_states:
      args = (take_users(params, exp_users), obs[:exp_users], mask[:exp_users])
      # Same model, same answer: check before timing.
      a = structured(*args)
      b = expanded(*args)
      max_diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(
          jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
      esec, eraw = common.median_seconds(expanded, *args, repeats=config.repeats)
      row.update(expanded_users=exp_users,
                 expanded_us_per_user_step=1e6 * esec / (exp_users * num_steps),
                 expanded_raw_seconds=eraw, max_abs_param_diff_f32=max_diff)
      row["ratio_expanded_over_structured"] = (row["expanded_us_per_user_step"] /
                                               row["structured_us_per_user_step"])
    rows.append(row)
    common.log(str(row))

  header = (f"K={num_states}, T={num_steps}, Categorical V={num_symbols}, Poisson durations, "
            f"per-user params, float32, jit+vmap full em_step; structured U={num_users}, "
            f"expanded U={exp_users}; median of {config.repeats}; {os.cpu_count()} CPUs, "
            f"jax {jax.__version__}, {jax.default_backend()} (shared machine: timings noisy)")
  table = format_table(rows, num_states)
  if rows:
    print(header + "\n\n" + "\n".join(table))
  batched_rows = kernel_rows(config, rng)
  kernel_header = (f"jit(vmap(dj.em_step)) of the HSMM, users-minor batched kernel vs "
                   f"per-sequence vmap, same data, interleaved; T={num_steps}, Categorical "
                   f"V={num_symbols}, Poisson durations, float32, median of {config.repeats}")
  kernel_table = format_kernel_table(batched_rows)
  if batched_rows:
    print("\n" + kernel_header + "\n\n" + "\n".join(kernel_table))
  grad_rows = gradient_rows(config, rng) if config.gradient_users else []
  grad_header = (f"Exact gradient of {config.gradient_stages} stacked vmapped EM layers "
                 f"(jit(grad)), em_layer(gradient='exact') (score VJP) vs "
                 f"'exact_autodiff', same data, interleaved; Categorical V={num_symbols}, "
                 f"Poisson durations, float32, median of {config.repeats}")
  grad_table = format_gradient_table(grad_rows)
  if grad_rows:
    print("\n" + grad_header + "\n\n" + "\n".join(grad_table))
  result = {"num_users": num_users, "expanded_users": config.expanded_users,
            "num_steps": num_steps, "num_states": num_states, "num_symbols": num_symbols,
            "repeats": config.repeats, "jax_version": jax.__version__,
            "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "rows": rows, "batched_kernel_rows": batched_rows,
            "gradient_rows": grad_rows}
  if output_dir:
    common.save_config(config, output_dir)
    common.write_json(os.path.join(output_dir, "results.json"), result)
    common.write_markdown(os.path.join(output_dir, "results.md"), header, table, kernel_header,
                          kernel_table, grad_header, grad_table)
  return result


if __name__ == "__main__":
  common.app_main("bench_hsmm", run)
