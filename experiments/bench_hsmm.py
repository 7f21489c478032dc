r"""Cost of one HSMM EM step: structured recursion vs the dense expanded HMM.

  python -m experiments.bench_hsmm --num_users=300 --num_steps=100 --num_states=10 \
      --durations=10,30,60,120 [--output_dir=/tmp/bench_hsmm]

Workload: U users, each with its own HSMM (K states, Categorical emissions
over V symbols, Poisson durations truncated at D) and one length-T sequence,
float32.  For every D we time a full EM iteration (E-step + M-step of every
parameter), ``jit(vmap(...))``:

* structured: ``dj.em_step`` on the HSMM -- the countdown forward-backward,
  O(K (K + D)) per step;
* expanded: :func:`dennl_jax.hsmm.expanded_em_update` -- the same EM step with
  the E-step done by the engine's plain HMM smoother on the explicitly built
  (K D)-state transition matrix, O((K D)^2) per step.  It runs on
  ``--expanded_users`` users (memory: a (K D)^2 matrix per user) and is
  skipped where K D exceeds ``--max_expanded_states``.

Compile time is excluded (one warm-up call), every timing waits on
``block_until_ready``, the median of ``--repeats`` is reported as
microseconds per user-step.  The machine may be shared: timings are noisy
(compare ratios within one run, not across runs).
"""
from __future__ import annotations

import json
import os
import platform
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import dennl_jax as dj
from dennl_jax.hsmm import HSMM, PoissonDuration, expanded_em_update

_NUM_USERS = flags.DEFINE_integer("num_users", 300, "Users for the structured HSMM.")
_EXPANDED_USERS = flags.DEFINE_integer("expanded_users", 40,
                                       "Users for the dense expanded HMM (memory-heavy).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 100, "Sequence length T.")
_NUM_STATES = flags.DEFINE_integer("num_states", 10, "Hidden states K.")
_NUM_SYMBOLS = flags.DEFINE_integer("num_symbols", 17, "Categorical symbols V.")
_DURATIONS = flags.DEFINE_list("durations", ["10", "30", "60", "120"], "Maximum durations D.")
_MAX_EXPANDED = flags.DEFINE_integer("max_expanded_states", 1200,
                                     "Skip the expanded HMM when K * D exceeds this.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats; the median is reported.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Write results.json and results.md here.")


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
  return HSMM(f32(initial), f32(transition), PoissonDuration(f32(rate), max_duration),
              dj.Categorical(f32(probs)))


def median_seconds(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)), times


def take_users(tree, num_users):
  return jax.tree_util.tree_map(lambda x: x[:num_users], tree)


def format_table(rows, num_states, header):
  """Markdown lines; growth is compared with D and with the O(K (K + D)) model."""
  base = rows[0]
  d0 = base["max_duration"]
  lines = [header, "",
           f"| D | K·D | structured µs/user-step | time / time at D={d0} | D / {d0} | "
           f"(K+D) / (K+{d0}) | expanded (K·D)² µs/user-step | expanded / structured |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for row in rows:
    growth = row["structured_us_per_user_step"] / base["structured_us_per_user_step"]
    d_ratio = row["max_duration"] / d0
    cost_ratio = (num_states + row["max_duration"]) / (num_states + d0)
    if "expanded_us_per_user_step" in row:
      exp_text = f"{row['expanded_us_per_user_step']:.1f}"
      ratio_text = f"{row['ratio_expanded_over_structured']:.1f}×"
    else:
      exp_text, ratio_text = "skipped (K·D too large)", "–"
    lines.append(f"| {row['max_duration']} | {row['expanded_states']} | "
                 f"{row['structured_us_per_user_step']:.2f} | {growth:.2f}× | {d_ratio:.0f} | "
                 f"{cost_ratio:.2f} | {exp_text} | {ratio_text} |")
  return lines


def main(argv):
  del argv
  num_users, num_steps = _NUM_USERS.value, _NUM_STEPS.value
  num_states, num_symbols = _NUM_STATES.value, _NUM_SYMBOLS.value
  durations = [int(d) for d in _DURATIONS.value]
  rng = np.random.RandomState(_SEED.value)
  obs = jnp.asarray(rng.randint(0, num_symbols, (num_users, num_steps)), jnp.int32)
  mask = jnp.ones((num_users, num_steps), bool)
  structured = jax.jit(jax.vmap(dj.em_step))
  expanded = jax.jit(jax.vmap(lambda p, o, m: expanded_em_update(p, o, m)[0]))

  rows = []
  for max_duration in durations:
    params = random_models(rng, num_users, num_states, num_symbols, max_duration)
    dj.validate(params, obs, mask)  # once, on the concrete batch
    sec, raw = median_seconds(structured, (params, obs, mask), _REPEATS.value)
    row = {"max_duration": max_duration, "expanded_states": num_states * max_duration,
           "structured_us_per_user_step": 1e6 * sec / (num_users * num_steps),
           "structured_raw_seconds": raw}
    exp_users = min(_EXPANDED_USERS.value, num_users)
    if num_states * max_duration <= _MAX_EXPANDED.value:
      args = (take_users(params, exp_users), obs[:exp_users], mask[:exp_users])
      # Same model, same answer: check before timing.
      a = structured(*args)
      b = expanded(*args)
      max_diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(
          jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
      esec, eraw = median_seconds(expanded, args, _REPEATS.value)
      row.update(expanded_users=exp_users,
                 expanded_us_per_user_step=1e6 * esec / (exp_users * num_steps),
                 expanded_raw_seconds=eraw, max_abs_param_diff_f32=max_diff)
      row["ratio_expanded_over_structured"] = (row["expanded_us_per_user_step"] /
                                               row["structured_us_per_user_step"])
    rows.append(row)
    print(row, flush=True)

  header = (f"K={num_states}, T={num_steps}, Categorical V={num_symbols}, Poisson durations, "
            f"per-user params, float32, jit+vmap full em_step; structured U={num_users}, "
            f"expanded U={min(_EXPANDED_USERS.value, num_users)}; median of "
            f"{_REPEATS.value}; {os.cpu_count()} CPUs, jax {jax.__version__}, "
            f"{jax.default_backend()} (shared machine: timings noisy)")
  lines = format_table(rows, num_states, header)
  text = "\n".join(lines)
  print(text)

  if _OUTPUT_DIR.value:
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    result = {"num_users": num_users, "expanded_users": _EXPANDED_USERS.value,
              "num_steps": num_steps, "num_states": num_states, "num_symbols": num_symbols,
              "repeats": _REPEATS.value, "jax_version": jax.__version__,
              "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
              "machine": platform.machine(), "rows": rows}
    with open(os.path.join(_OUTPUT_DIR.value, "results.json"), "w") as f:
      json.dump(result, f, indent=2)
    with open(os.path.join(_OUTPUT_DIR.value, "results.md"), "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
