r"""Timing probes that run unchanged on today's and on older ``dennl_jax`` code.

Run by :mod:`benchmarks.bench_versions`, one probe per fresh process, with the
code under test first on ``PYTHONPATH``:

  PYTHONPATH=<code>/src:<repo> python -m benchmarks.version_probes '<case json>' <out.npz> \
      [<profiled calls>]

Prints one JSON line: the case, the ``dennl_jax`` file that was imported (the
caller checks it is the code it meant), the compile seconds and every timed
repeat.  The first call's outputs go to ``out.npz`` so the caller can check
that both codes computed the same thing.  With a number of profiled calls, the
line also has the per-operation profile of those calls, taken after the timed
ones (``ops``; :mod:`benchmarks.op_profile`, :mod:`benchmarks.profile_ops`).

Only the public API that every compared commit has is used (``dj.HMM``,
``dj.HSMM``, the families, ``dj.em_step``, ``dj.sample``, ``dj.DENNL``,
``dj.make_train_step``, ...), and nothing from :mod:`experiments.common`, which
imports newer names.  Data come from a fixed numpy seed, so both codes see the
same inputs.
"""
from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dennl_jax as dj
from dennl_jax.codec import ParamCodec
from benchmarks import op_profile

# dynamax_smoother: the reference of the HMM em_step target (BUILD_NOTES
# "Performance"), dynamax's vmapped hmm_smoother (E-step only) on hmm_em_step's
# data; the same on every commit.
PROBES = ("hmm_em_step", "hsmm_em_step", "dennl_step_hmm", "dennl_step_hsmm", "dynamax_smoother")


def _dirichlet(rng, size, dim):
  return rng.dirichlet(np.ones(dim), size)


def _no_self_transitions(rng, batch, num_states):
  """(batch..., K, K) row-stochastic matrices with a zero diagonal (HSMM transitions)."""
  off = rng.dirichlet(np.ones(num_states - 1), batch + (num_states,))
  out = np.zeros(batch + (num_states, num_states))
  for k in range(num_states):
    out[..., k, np.arange(num_states) != k] = off[..., k, :]
  return out


def _em_step_call(case):
  """``jit(vmap(dj.em_step))`` of per-user Categorical HMMs or Poisson-duration HSMMs,
  or dynamax's smoother on the same HMMs."""
  users, steps, states, symbols = case["users"], case["steps"], case["states"], case["symbols"]
  rng = np.random.default_rng(0)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  initial = f32(_dirichlet(rng, users, states))
  probs = dj.Categorical(f32(_dirichlet(rng, (users, states), symbols)))
  if case["probe"] in ("hmm_em_step", "dynamax_smoother"):
    params = dj.HMM(initial, f32(_dirichlet(rng, (users, states), states)), probs)
  else:
    max_duration = case["max_duration"]
    rate = f32(rng.uniform(1.0, 0.6 * max_duration, (users, states)))
    params = dj.HSMM(initial, f32(_no_self_transitions(rng, (users,), states)),
                     dj.PoissonDuration(rate, max_duration), probs)
  obs = jnp.asarray(np.random.RandomState(0).randint(0, symbols, (users, steps)), jnp.int32)
  mask = jnp.ones((users, steps), bool)
  if case["probe"] == "dynamax_smoother":
    from dynamax.hidden_markov_model import hmm_smoother

    def smoother(p, o, m):  # every step valid: the mask is all ones
      del m
      return hmm_smoother(p.initial, p.transition, jnp.log(p.emission.probs[:, o].T))
    return jax.jit(jax.vmap(smoother)), (params, obs, mask)
  return jax.jit(jax.vmap(dj.em_step)), (params, obs, mask)


def _dennl_step_call(case):
  """One jitted DENNL training step (likelihood loss, Adam) on a minibatch of users."""
  users, steps, states = case["users"], case["steps"], case["states"]
  rng = np.random.default_rng(0)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  if case["probe"] == "dennl_step_hmm":
    # bench_em_step's DENNL step: Categorical HMM, one sequence per user of random symbols.
    symbols = case["symbols"]
    template = dj.HMM(f32(_dirichlet(rng, (), states)), f32(_dirichlet(rng, states, states)),
                      dj.Categorical(f32(_dirichlet(rng, states, symbols))))
    obs = jnp.asarray(np.random.RandomState(0).randint(0, symbols, (users, steps)), jnp.int32)
  else:
    # Table 1's training step: Gaussian HSMM, sequences sampled from the template.
    dim = case["obs_dim"]
    template = dj.HSMM(
        f32(_dirichlet(rng, (), states)), f32(_no_self_transitions(rng, (), states)),
        dj.PoissonDuration(f32(rng.uniform(2, 6, states)), case["max_duration"]),
        dj.Gaussian(f32(rng.normal(size=(states, dim)) * 2.5),
                    f32(np.tile(np.eye(dim) * 0.4, (states, 1, 1)))))
    keys = jax.random.split(jax.random.PRNGKey(0), users)
    _, obs = jax.vmap(lambda k: dj.sample(k, template, steps))(keys)
  embedding = jax.random.normal(jax.random.PRNGKey(2), (users, case["embed_dim"]))
  batch = dj.Batch(embedding, obs, jnp.ones((users, steps), bool))
  # Commits before dj.EMLayer took the layer's settings as keywords.
  layer = (dict(layer=dj.EMLayer(gradient="exact")) if hasattr(dj, "EMLayer")
           else dict(gradient="exact"))
  model = dj.DENNL(ParamCodec(template), template, case["embed_dim"],
                   num_stages=case["stages"], hidden=tuple(case["hidden"]), rngs=nnx.Rngs(0),
                   **layer)
  graphdef, state = nnx.split(model)
  optimizer = dj.make_optimizer(1e-3)
  step = dj.make_train_step(graphdef, dj.likelihood_loss, optimizer)
  return step, (state, optimizer.init(state), batch, jax.random.PRNGKey(3))


def run_case(case: dict, outputs_path: str | None = None, profile_calls: int = 0) -> dict:
  """Compiles the case's program, calls it once (outputs saved), then times
  ``case["repeats"]`` calls, each waited on; then profiles ``profile_calls`` calls."""
  if case["probe"] not in PROBES:
    raise ValueError(f"unknown probe {case['probe']!r}; choose from {PROBES}")
  build = _dennl_step_call if case["probe"].startswith("dennl_step") else _em_step_call
  fn, args = build(case)
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_seconds = time.perf_counter() - t0
  out = jax.block_until_ready(compiled(*args))
  if outputs_path:
    np.savez(outputs_path, *[np.asarray(x) for x in jax.tree_util.tree_leaves(out)])
  seconds = []
  for _ in range(case["repeats"]):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    seconds.append(time.perf_counter() - t0)
  result = {"case": case, "dennl_jax_file": dj.__file__, "compile_seconds": compile_seconds,
            "seconds": seconds, "jax_version": jax.__version__}
  if profile_calls:
    result["ops"] = op_profile.profile(compiled, args, profile_calls)
  return result


if __name__ == "__main__":
  result = run_case(json.loads(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None,
                    int(sys.argv[3]) if len(sys.argv) > 3 else 0)
  print("PROBE_RESULT " + json.dumps(result))
