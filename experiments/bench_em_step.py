r"""Throughput of one EM step against dynamax's smoother and hmmlearn.

  python -m experiments.bench_em_step --num_users=2000 --num_steps=100 \
      --num_states=10 --num_symbols=17 --repeats=7 [--output_dir=/tmp/bench]

Workload: U users, each with its own Categorical HMM (K states, V symbols)
and one length-T sequence, float32.  Measured, on the same data:

* ours: ``jit(vmap(dj.em_step))`` -- emission log-likelihoods, forward-
  backward, expected statistics and the M-step (a full EM iteration);
* dynamax: ``jit(vmap(hmm_smoother))`` on the same per-user parameters,
  including the same emission log-likelihood gather (E-step only, no M-step);
* hmmlearn: ``CategoricalHMM.score_samples`` (log-likelihood + posteriors,
  float64 numpy/C) in a Python loop over a subset of users; its time is
  scaled to user-steps/s.

Compile time is excluded (one warm-up call), every timing waits on
``block_until_ready``, ours and dynamax are timed in alternation (the machine
may be shared), and the median of ``--repeats`` is reported.
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

_NUM_USERS = flags.DEFINE_integer("num_users", 2000, "Users (one sequence each).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 100, "Sequence length T.")
_NUM_STATES = flags.DEFINE_integer("num_states", 10, "Hidden states K.")
_NUM_SYMBOLS = flags.DEFINE_integer("num_symbols", 17, "Categorical symbols V.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed repeats; the median is reported.")
_HMMLEARN_USERS = flags.DEFINE_integer(
    "hmmlearn_users", 100, "Users timed with hmmlearn (Python loop); scaled to all users.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Write results.json and results.md here.")


def random_models(key, num_users, num_states, num_symbols):
  """Per-user Categorical HMMs (a pytree with a leading user axis), float32."""
  k_init, k_trans, k_emit = jax.random.split(key, 3)
  initial = jax.random.dirichlet(k_init, jnp.ones(num_states), (num_users,))
  transition = jax.random.dirichlet(k_trans, jnp.ones(num_states), (num_users, num_states))
  probs = jax.random.dirichlet(k_emit, jnp.ones(num_symbols), (num_users, num_states))
  return dj.HMM(initial.astype(jnp.float32), transition.astype(jnp.float32),
                dj.Categorical(probs.astype(jnp.float32)))


def interleaved_median_seconds(calls, repeats):
  """Median wall time of each ``(fn, args)``; calls alternate so that load
  from other processes on a shared machine hits every method alike."""
  for fn, args in calls:
    jax.block_until_ready(fn(*args))  # compile + warm-up
  times = [[] for _ in calls]
  for _ in range(repeats):
    for (fn, args), out in zip(calls, times):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      out.append(time.perf_counter() - start)
  return [(float(np.median(t)), t) for t in times]


def time_hmmlearn(params, obs, num_users, repeats):
  from hmmlearn import hmm as hl
  models = []
  for u in range(num_users):
    model = hl.CategoricalHMM(n_components=params.num_states, init_params="", params="")
    model.startprob_ = np.asarray(params.initial[u], np.float64)
    model.transmat_ = np.asarray(params.transition[u], np.float64)
    model.emissionprob_ = np.asarray(params.emission.probs[u], np.float64)
    model.n_features = model.emissionprob_.shape[1]
    models.append(model)
  sequences = [np.asarray(obs[u])[:, None] for u in range(num_users)]
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for model, seq in zip(models, sequences):
      model.score_samples(seq)
    times.append(time.perf_counter() - start)
  return float(np.median(times)), times


def main(argv):
  del argv
  num_users, num_steps = _NUM_USERS.value, _NUM_STEPS.value
  num_states, num_symbols = _NUM_STATES.value, _NUM_SYMBOLS.value
  key_model, key_obs = jax.random.split(jax.random.PRNGKey(_SEED.value))
  params = random_models(key_model, num_users, num_states, num_symbols)
  obs = jax.random.randint(key_obs, (num_users, num_steps), 0, num_symbols, jnp.int32)
  mask = jnp.ones((num_users, num_steps), bool)
  dj.validate(params, obs, mask)  # once, on the concrete batch
  user_steps = num_users * num_steps

  ours = jax.jit(jax.vmap(dj.em_step))

  from dynamax.hidden_markov_model import hmm_smoother as dynamax_smoother

  def dynamax_one(p, o):
    log_likes = jnp.log(p.emission.probs[:, o].T)
    return dynamax_smoother(p.initial, p.transition, log_likes)

  dynamax = jax.jit(jax.vmap(dynamax_one))

  (ours_s, ours_all), (dyn_s, dyn_all) = interleaved_median_seconds(
      [(ours, (params, obs, mask)), (dynamax, (params, obs))], _REPEATS.value)
  hl_users = min(_HMMLEARN_USERS.value, num_users)
  hl_s, hl_all = time_hmmlearn(params, obs, hl_users, max(1, min(3, _REPEATS.value)))

  rows = [
      ("dennl_jax em_step (full EM iteration)", user_steps / ours_s, ours_s),
      ("dynamax hmm_smoother (E-step only)", user_steps / dyn_s, dyn_s),
      (f"hmmlearn score_samples ({hl_users} users, scaled)", hl_users * num_steps / hl_s,
       hl_s * num_users / hl_users),
  ]
  ratio_dyn = rows[0][1] / rows[1][1]
  ratio_hl = rows[0][1] / rows[2][1]
  header = (f"U={num_users}, T={num_steps}, K={num_states}, Categorical V={num_symbols}, "
            f"per-user params, float32, jit+vmap; median of {_REPEATS.value}; "
            f"{os.cpu_count()} CPUs, jax {jax.__version__}, {jax.default_backend()}")
  lines = [header, "", "| method | user-steps/s | seconds for all users |",
           "|---|---:|---:|"]
  lines += [f"| {name} | {rate:,.0f} | {sec:.4f} |" for name, rate, sec in rows]
  lines += ["", f"ours / dynamax = {ratio_dyn:.2f}x; ours / hmmlearn = {ratio_hl:.1f}x"]
  text = "\n".join(lines)
  print(text)

  if _OUTPUT_DIR.value:
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    result = {
        "num_users": num_users, "num_steps": num_steps, "num_states": num_states,
        "num_symbols": num_symbols, "repeats": _REPEATS.value, "hmmlearn_users": hl_users,
        "jax_version": jax.__version__, "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "ours_user_steps_per_s": rows[0][1], "dynamax_user_steps_per_s": rows[1][1],
        "hmmlearn_user_steps_per_s": rows[2][1],
        "ratio_ours_over_dynamax": ratio_dyn, "ratio_ours_over_hmmlearn": ratio_hl,
        "raw_seconds": {"ours": ours_all, "dynamax": dyn_all, "hmmlearn_subset": hl_all},
    }
    with open(os.path.join(_OUTPUT_DIR.value, "results.json"), "w") as f:
      json.dump(result, f, indent=2)
    with open(os.path.join(_OUTPUT_DIR.value, "results.md"), "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
