r"""Demo: sample sequences from a known HMM, fit them with EM, decode states.

  python -m experiments.demo_em --num_users=200 --num_steps=100

Prints the mean log-likelihood trace and the Viterbi decoding accuracy
against the true states (after the best one-to-one relabelling of states).
"""
from __future__ import annotations

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

import dennl_jax as dj

_NUM_USERS = flags.DEFINE_integer("num_users", 200, "Sequences (one per user).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 100, "Length of each sequence.")
_NUM_STATES = flags.DEFINE_integer("num_states", 4, "Hidden states.")
_NUM_ITERS = flags.DEFINE_integer("num_iters", 50, "EM iterations.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")


def relabelled_accuracy(true_states, decoded, num_states):
  confusion = np.zeros((num_states, num_states))
  np.add.at(confusion, (true_states.ravel(), decoded.ravel()), 1)
  rows, cols = linear_sum_assignment(-confusion)
  return confusion[rows, cols].sum() / true_states.size


def main(argv):
  del argv
  k = _NUM_STATES.value
  key = jax.random.PRNGKey(_SEED.value)
  key_model, key_data, key_init = jax.random.split(key, 3)
  ka, kb = jax.random.split(key_model)
  transition = 0.8 * jnp.eye(k) + 0.2 * jax.random.dirichlet(ka, jnp.ones(k), (k,))
  true = dj.HMM(jnp.ones(k) / k, transition,
                dj.DiagGaussian(3.0 * jax.random.normal(kb, (k, 2)), jnp.ones((k, 2))))
  keys = jax.random.split(key_data, _NUM_USERS.value)
  states, obs = jax.vmap(lambda kk: dj.sample(kk, true, _NUM_STEPS.value))(keys)
  mask = jnp.ones(states.shape, bool)

  # One shared random start per user, as a practitioner would do.
  ki, km = jax.random.split(key_init)
  start = dj.HMM(jnp.ones(k) / k, 0.5 * jnp.eye(k) + 0.5 / k,
                 dj.DiagGaussian(jax.random.normal(km, (k, 2)) * 3.0, 4.0 * jnp.ones((k, 2)), min_covar=1e-3))
  starts = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (_NUM_USERS.value,) + x.shape),
                                  start)
  fitted, trace = dj.fit_em(starts, obs, mask, _NUM_ITERS.value)
  per_step = np.asarray(trace).mean(0) / _NUM_STEPS.value
  print("mean log-likelihood per step during EM:")
  for i in range(0, len(per_step), max(1, len(per_step) // 10)):
    print(f"  iter {i:3d}: {per_step[i]: .4f}")
  print(f"  iter {len(per_step) - 1:3d}: {per_step[-1]: .4f}")
  true_ll = jax.vmap(lambda o, m: dj.log_likelihood(true, o, m))(obs, mask)
  print(f"true-model log-likelihood per step: {float(true_ll.mean()) / _NUM_STEPS.value: .4f}")
  decoded = jax.vmap(dj.viterbi)(fitted, obs, mask)
  accs = [relabelled_accuracy(np.asarray(s), np.asarray(d), k)
          for s, d in zip(states, decoded)]
  print(f"Viterbi accuracy vs true states (per-user relabelling): {np.mean(accs):.3f}")


if __name__ == "__main__":
  app.run(main)
