r"""Demo: sample sequences from a known HMM, fit them with EM, decode states.

  python -m experiments.demo_em [--output_dir=/tmp/demo_em] [--config.num_users=200]

Prints the mean log-likelihood trace and the Viterbi decoding accuracy
against the true states (after each user's best one-to-one relabelling of
states, ``dj.labelling.labelling_accuracy``).  With --output_dir:
results.json and config.json.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

import dennl_jax as dj
from dennl_jax import labelling
from experiments import common


def run(config, output_dir: str | None = None) -> dict:
  k, num_users, num_steps = config.num_states, config.num_users, config.num_steps
  key = jax.random.PRNGKey(config.seed)
  key_model, key_data, key_init = jax.random.split(key, 3)
  ka, kb = jax.random.split(key_model)
  transition = 0.8 * jnp.eye(k) + 0.2 * jax.random.dirichlet(ka, jnp.ones(k), (k,))
  true = dj.HMM(jnp.ones(k) / k, transition,
                dj.DiagGaussian(3.0 * jax.random.normal(kb, (k, 2)), jnp.ones((k, 2))))
  keys = jax.random.split(key_data, num_users)
  states, obs = jax.vmap(lambda kk: dj.sample(kk, true, num_steps))(keys)
  mask = jnp.ones(states.shape, bool)

  # One shared random start per user, as a practitioner would do.
  _, km = jax.random.split(key_init)
  start = dj.HMM(jnp.ones(k) / k, 0.5 * jnp.eye(k) + 0.5 / k,
                 dj.DiagGaussian(jax.random.normal(km, (k, 2)) * 3.0, 4.0 * jnp.ones((k, 2)),
                                 min_covar=1e-3))
  starts = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (num_users,) + x.shape), start)
  fitted, trace = dj.fit_em(starts, obs, mask, config.num_iters)
  per_step = np.asarray(trace).mean(0) / num_steps
  common.log("mean log-likelihood per step during EM:")
  shown = sorted(set(range(0, len(per_step), max(1, len(per_step) // 10))) |
                 {len(per_step) - 1})
  for i in shown:
    common.log(f"  iter {i:3d}: {per_step[i]: .4f}")
  true_ll = jax.vmap(lambda o, m: dj.log_likelihood(true, o, m))(obs, mask)
  true_per_step = float(true_ll.mean()) / num_steps
  common.log(f"true-model log-likelihood per step: {true_per_step: .4f}")
  decoded = jax.vmap(dj.viterbi)(fitted, obs, mask)
  accuracy = labelling.labelling_accuracy(states, decoded, k, mask)
  common.log(f"Viterbi accuracy vs true states (per-user relabelling): {accuracy:.3f}")
  result = {"log_likelihood_per_step": per_step, "true_log_likelihood_per_step": true_per_step,
            "accuracy": accuracy}
  if output_dir:
    common.save_config(config, output_dir)
    common.write_json(os.path.join(output_dir, "results.json"), result)
  return result


if __name__ == "__main__":
  common.app_main("demo_em", run)
