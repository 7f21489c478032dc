r"""Throughput of one EM step against dynamax's smoother and hmmlearn.

  python -m experiments.bench_em_step [--output_dir=/tmp/bench] \
      [--config=experiments/configs/bench_em_step.py --config.num_users=2000 --config.repeats=7]

Workload (experiments/configs/bench_em_step.py): U users, each with its own
Categorical HMM (K states, V symbols) and one length-T sequence, float32.
Measured, on the same data:

* ours: ``jit(vmap(dj.em_step))`` -- emission log-likelihoods, forward-
  backward, expected statistics and the M-step (a full EM iteration);
* dynamax: ``jit(vmap(hmm_smoother))`` on the same per-user parameters,
  including the same emission log-likelihood gather (E-step only, no M-step);
* hmmlearn: ``CategoricalHMM.score_samples`` (log-likelihood + posteriors,
  float64 numpy/C) in a Python loop over a subset of users; its time is
  scaled to user-steps/s.

Compile time is excluded (one warm-up call), every timing waits on
``block_until_ready``, ours and dynamax are timed in alternation (the machine
may be shared), and the median of ``config.repeats`` is reported.  With
--output_dir: results.json, results.md and config.json.
"""
from __future__ import annotations

import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

import dennl_jax as dj
from experiments import common


def random_models(key, num_users, num_states, num_symbols):
  """Per-user Categorical HMMs (a pytree with a leading user axis), float32."""
  k_init, k_trans, k_emit = jax.random.split(key, 3)
  initial = jax.random.dirichlet(k_init, jnp.ones(num_states), (num_users,))
  transition = jax.random.dirichlet(k_trans, jnp.ones(num_states), (num_users, num_states))
  probs = jax.random.dirichlet(k_emit, jnp.ones(num_symbols), (num_users, num_states))
  return dj.HMM(initial.astype(jnp.float32), transition.astype(jnp.float32),
                dj.Categorical(probs.astype(jnp.float32)))


def time_hmmlearn(params, obs, num_users, repeats):
  """(median seconds, all seconds) of hmmlearn's score_samples over the first users."""
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

  def score_all():
    for model, seq in zip(models, sequences):
      model.score_samples(seq)

  return common.median_seconds(score_all, repeats=repeats, warmup=False)


def run(config, output_dir: str | None = None) -> dict:
  """Times the three methods; prints the table, writes it with ``output_dir``."""
  num_users, num_steps = config.num_users, config.num_steps
  num_states, num_symbols = config.num_states, config.num_symbols
  key_model, key_obs = jax.random.split(jax.random.PRNGKey(config.seed))
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

  (ours_s, ours_all), (dyn_s, dyn_all) = common.interleaved_median_seconds(
      [(ours, (params, obs, mask)), (dynamax, (params, obs))], config.repeats)
  hl_users = min(config.hmmlearn_users, num_users)
  hl_s, hl_all = time_hmmlearn(params, obs, hl_users, max(1, min(3, config.repeats)))

  rows = [
      ("dennl_jax em_step (full EM iteration)", user_steps / ours_s, ours_s),
      ("dynamax hmm_smoother (E-step only)", user_steps / dyn_s, dyn_s),
      (f"hmmlearn score_samples ({hl_users} users, scaled)", hl_users * num_steps / hl_s,
       hl_s * num_users / hl_users),
  ]
  ratio_dyn = rows[0][1] / rows[1][1]
  ratio_hl = rows[0][1] / rows[2][1]
  header = (f"U={num_users}, T={num_steps}, K={num_states}, Categorical V={num_symbols}, "
            f"per-user params, float32, jit+vmap; median of {config.repeats}; "
            f"{os.cpu_count()} CPUs, jax {jax.__version__}, {jax.default_backend()}")
  table = common.markdown_table(
      ["method", "user-steps/s", "seconds for all users"],
      [(name, f"{rate:,.0f}", f"{sec:.4f}") for name, rate, sec in rows],
      align=["left", "right", "right"])
  footer = f"ours / dynamax = {ratio_dyn:.2f}x; ours / hmmlearn = {ratio_hl:.1f}x"
  print("\n\n".join([header, "\n".join(table), footer]))
  result = {
      "num_users": num_users, "num_steps": num_steps, "num_states": num_states,
      "num_symbols": num_symbols, "repeats": config.repeats, "hmmlearn_users": hl_users,
      "jax_version": jax.__version__, "backend": jax.default_backend(),
      "cpu_count": os.cpu_count(), "machine": platform.machine(),
      "ours_user_steps_per_s": rows[0][1], "dynamax_user_steps_per_s": rows[1][1],
      "hmmlearn_user_steps_per_s": rows[2][1],
      "ratio_ours_over_dynamax": ratio_dyn, "ratio_ours_over_hmmlearn": ratio_hl,
      "raw_seconds": {"ours": ours_all, "dynamax": dyn_all, "hmmlearn_subset": hl_all},
  }
  if output_dir:
    common.save_config(config, output_dir)
    common.write_json(os.path.join(output_dir, "results.json"), result)
    common.write_markdown(os.path.join(output_dir, "results.md"), header, table, footer)
  return result


if __name__ == "__main__":
  common.app_main("bench_em_step", run)
