r"""How good and how cheap are the EM layer's gradient modes (issue 4)?

  python -m experiments.spsa_gradients --output_dir=/tmp/spsa_gradients

Writes ``results.json`` and ``tables.md`` to ``--output_dir``:

(a) cosine similarity of the SPSA / forward-gradient estimate with the exact
    gradient, per user (median over users) and for the gradient of the shared
    weights of a linear network summed over the batch, vs num_samples;
(b) Theorem 1 on the EM map itself (float64): the Frobenius norm of the bias
    E[J_hat] - J vs the step c, measured with common random numbers, and the
    Monte-Carlo error of the averaged J_hat vs the number of perturbations;
(c) wall time of each mode's VJP relative to a forward em_step;
(d) exact-mode gradient time and compiled temporary memory vs T.

The layer input is the paper's network head: softplus + L1 normalisation of
per-user logits ``embedding_u @ W``; loss = -log-likelihood after the layer.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

jax.config.update("jax_enable_x64", True)  # (b) needs float64; (a,c,d) use float32 arrays.

import dennl_jax as dj  # noqa: E402
# The package re-exports the function `spsa`, which shadows the module
# attribute; import the module itself for its private helpers.
sp = importlib.import_module("dennl_jax.spsa")

_OUTPUT_DIR = flags.DEFINE_string("output_dir", "/tmp/spsa_gradients", "Where to write results.")
_NUM_USERS = flags.DEFINE_integer("num_users", 64, "Users for table (a).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 100, "Sequence length for tables (a), (c).")
_NUM_STATES = flags.DEFINE_integer("num_states", 5, "Hidden states for table (a).")
_NUM_SYMBOLS = flags.DEFINE_integer("num_symbols", 10, "Categorical symbols for table (a).")
_SAMPLES = flags.DEFINE_list("num_samples", ["1", "4", "16", "64", "256"], "SPSA sample counts.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Independent keys per cell of table (a).")
_STEP = flags.DEFINE_float("step", 1e-3, "SPSA step c for table (a) (float32).")
_TIMING_USERS = flags.DEFINE_integer("timing_users", 256, "Users for table (c).")
_TIMING_STATES = flags.DEFINE_integer("timing_states", 10, "Hidden states for tables (c), (d).")
_LENGTHS = flags.DEFINE_list("lengths", ["50", "100", "200", "400", "800", "1600"], "T for (d).")
_LENGTH_USERS = flags.DEFINE_integer("length_users", 32, "Users for table (d).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")

F32 = jnp.float32


# ------------------------------------------------------------------ problem


def _normalise(x):
  return jax.nn.softplus(x) / jnp.sum(jax.nn.softplus(x), -1, keepdims=True)


def _head(logits):
  """Per-user logits {'initial','transition','emission'} -> valid HMM."""
  return dj.HMM(_normalise(logits["initial"]), _normalise(logits["transition"]),
                dj.Categorical(_normalise(logits["emission"])))


def _make_problem(key, num_users, num_steps, num_states, num_symbols, embed_dim=8):
  """Users' sequences from per-user HMMs; a linear network W: embedding -> logits."""
  k_true, k_data, k_embed, k_w = jax.random.split(key, 4)

  def true_model(k):
    ka, kb, kc = jax.random.split(k, 3)
    sticky = 0.6 * jnp.eye(num_states, dtype=F32)
    return dj.HMM(jax.random.dirichlet(ka, jnp.ones(num_states, F32), dtype=F32),
                  sticky + 0.4 * jax.random.dirichlet(kb, jnp.ones(num_states, F32),
                                                      (num_states,), dtype=F32),
                  dj.Categorical(jax.random.dirichlet(
                      kc, 0.5 * jnp.ones(num_symbols, F32), (num_states,), dtype=F32)))

  keys = jax.random.split(k_true, num_users)
  truth = jax.vmap(true_model)(keys)
  obs = jax.jit(jax.vmap(lambda k, p: dj.sample(k, p, num_steps)[1]))(
      jax.random.split(k_data, num_users), truth)
  lengths = jax.random.randint(k_data, (num_users,), num_steps // 2, num_steps + 1)
  mask = jnp.arange(num_steps)[None, :] < lengths[:, None]
  embeddings = jax.random.normal(k_embed, (num_users, embed_dim), F32)
  shapes = {"initial": (num_states,), "transition": (num_states, num_states),
            "emission": (num_states, num_symbols)}
  wkeys = jax.random.split(k_w, len(shapes))
  weights = {name: 0.5 * jax.random.normal(k, (embed_dim,) + shape, F32)
             for k, (name, shape) in zip(wkeys, shapes.items())}
  return obs, mask, embeddings, weights


def _logits(weights, embedding):
  return {name: jnp.tensordot(embedding, w, 1) for name, w in weights.items()}


def _user_loss(logits, obs, mask, key, mode, num_samples, step):
  out = sp.em_layer(_head(logits), obs, mask, key, gradient=mode, num_samples=num_samples,
                    step=step)
  return -out.log_likelihood(obs, mask)


def _cosine(a, b):
  return float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


# -------------------------------------------------------------- table (a)


def table_cosine(key):
  obs, mask, embeddings, weights = _make_problem(
      key, _NUM_USERS.value, _NUM_STEPS.value, _NUM_STATES.value, _NUM_SYMBOLS.value)
  logits = jax.vmap(_logits, (None, 0))(weights, embeddings)

  @functools.partial(jax.jit, static_argnums=(2, 3))
  def per_user_grads(logits, keys, mode, num_samples):
    """raw keys (U, 2) or (D, U, 2) -> per-user gradients (with a leading D axis)."""
    grad = jax.vmap(jax.grad(_user_loss), (0, 0, 0, 0, None, None, None))
    if keys.ndim == 2:
      return grad(logits, obs, mask, keys, mode, num_samples, _STEP.value)
    return jax.lax.map(lambda k: grad(logits, obs, mask, k, mode, num_samples, _STEP.value),
                       keys)

  def shared_grad(user_grads):
    # Loss = sum_u L_u(logits_u(W)), logits_u linear in W: dL/dW = sum_u e_u (x) g_u.
    return ravel_pytree({n: jnp.einsum("ue,u...->e...", embeddings, g)
                         for n, g in user_grads.items()})[0]

  num_users = _NUM_USERS.value
  exact = per_user_grads(logits, jax.random.split(jax.random.PRNGKey(0), num_users), "exact", 1)
  exact_users = jax.vmap(lambda g: ravel_pytree(g)[0])(exact)
  exact_shared = shared_grad(exact)
  sample_counts = [int(s) for s in _SAMPLES.value]
  draws = max(sample_counts) * _REPEATS.value
  rows = []
  for mode in ("spsa", "forward"):
    # An estimate with num_samples=S is the mean of S independent one-draw
    # estimates, so one compiled one-draw gradient serves every S: draw
    # max(S) * repeats one-draw estimates per user, average disjoint blocks.
    keys = jax.random.split(jax.random.PRNGKey(7), draws * num_users).reshape(
        draws, num_users, 2)
    one_draw = per_user_grads(logits, keys, mode, 1)             # (draws, U, ...)
    for num_samples in sample_counts:
      per_user, shared = [], []
      for r in range(_REPEATS.value):
        block = slice(r * max(sample_counts), r * max(sample_counts) + num_samples)
        est = jax.tree_util.tree_map(lambda g: g[block].mean(0), one_draw)
        est_users = jax.vmap(lambda g: ravel_pytree(g)[0])(est)
        per_user.append(np.median([_cosine(a, b) for a, b in zip(est_users, exact_users)]))
        shared.append(_cosine(shared_grad(est), exact_shared))
      rows.append({"mode": mode, "num_samples": num_samples,
                   "per_user_median_cosine": float(np.mean(per_user)),
                   "batch_summed_cosine": float(np.mean(shared)),
                   "batch_summed_cosine_min": float(np.min(shared))})
      print(rows[-1], flush=True)
  return {"num_users": _NUM_USERS.value, "num_steps": _NUM_STEPS.value,
          "num_states": _NUM_STATES.value, "num_symbols": _NUM_SYMBOLS.value,
          "step": _STEP.value, "dimension_per_user": int(exact_users.shape[1]),
          "dimension_shared": int(exact_shared.shape[0]), "rows": rows}


# -------------------------------------------------------------- table (b)


def table_theorem1(key):
  k_model, k_data, k_delta = jax.random.split(key, 3)
  num_states, num_symbols, num_steps = 3, 4, 50
  ka, kb, kc = jax.random.split(k_model, 3)
  params = dj.HMM(jax.random.dirichlet(ka, jnp.ones(num_states)),
                  jax.random.dirichlet(kb, 2 * jnp.ones(num_states), (num_states,)),
                  dj.Categorical(jax.random.dirichlet(kc, jnp.ones(num_symbols), (num_states,))))
  _, obs = jax.jit(dj.sample, static_argnums=2)(k_data, params, num_steps)
  mask = jnp.ones(num_steps, bool)
  results = {}
  for dtype in (jnp.float64, jnp.float32):
    p = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    theta, unravel = ravel_pytree(p.to_unconstrained())
    em = lambda th: ravel_pytree(sp._em_of_unconstrained(unravel(th), p, obs, mask))[0]
    jac = jax.jit(jax.jacfwd(em))(theta).astype(jnp.float64)
    num = 4096
    deltas = jax.random.rademacher(k_delta, (num, theta.shape[0]), dtype)

    @jax.jit
    def jhat(c, deltas):
      """Per-sample finite-difference columns (f(+)-f(-))/(2c): (N, M_out)."""
      plus = jax.vmap(em)(theta + c * deltas)
      minus = jax.vmap(em)(theta - c * deltas)
      return ((plus - minus) / (2 * c)).astype(jnp.float64)

    d64 = deltas.astype(jnp.float64)
    bias_rows = []
    for c in (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7):
      fd = jhat(jnp.asarray(c, dtype), deltas)
      # E[J_hat] - J estimated with common random numbers: the J Delta_s
      # term has expectation J exactly (Rademacher), so subtracting it
      # removes the O(1) Monte-Carlo noise and leaves the O(c^2) bias.
      bias = ((fd - d64 @ jac.T)[:, :, None] * (1.0 / d64)[:, None, :]).mean(0)
      bias_rows.append({"step": c, "bias_frobenius": float(jnp.linalg.norm(bias)),
                        "per_sample_fd_error": float(jnp.sqrt(jnp.mean(
                            jnp.sum((fd - d64 @ jac.T) ** 2, 1))))})
    fd = jhat(jnp.asarray(1e-3, dtype), deltas)
    per_sample = fd[:, :, None] * (1.0 / d64)[:, None, :]          # (N, M, M) J_hat_s
    mc_rows = []
    for n in (1, 4, 16, 64, 256, 1024, 4096):
      chunks = per_sample[: (num // n) * n].reshape(num // n, n, *per_sample.shape[1:]).mean(1)
      err = jnp.sqrt(jnp.mean(jnp.sum((chunks - jac) ** 2, axis=(1, 2))))
      mc_rows.append({"num_samples": n, "rms_frobenius_error": float(err),
                      "relative": float(err / jnp.linalg.norm(jac)),
                      "error_times_sqrt_n": float(err * np.sqrt(n))})
    results[jnp.dtype(dtype).name] = {"jacobian_frobenius": float(jnp.linalg.norm(jac)),
                                      "dimension": int(theta.shape[0]),
                                      "bias_vs_step": bias_rows, "error_vs_num_samples": mc_rows}
    print(dtype, bias_rows, flush=True)
  return results


# --------------------------------------------------------- tables (c), (d)


def _compile(fn, *args):
  """(compiled function, temporary bytes from XLA's memory analysis or None)."""
  compiled = fn.lower(*args).compile()
  stats = compiled.memory_analysis()
  return compiled, (None if stats is None else int(stats.temp_size_in_bytes))


def _time(fn, *args, repeats=5):
  jax.block_until_ready(fn(*args))  # warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _timing_setup(key, num_users, num_steps, num_states):
  obs, mask, embeddings, weights = _make_problem(key, num_users, num_steps, num_states,
                                                 2 * num_states)
  params = jax.vmap(lambda e: _head(_logits(weights, e)))(embeddings)
  cot = jax.tree_util.tree_map(lambda x: jnp.ones_like(x) * 0.1, params)
  keys = jax.random.split(key, num_users)
  return params, obs, mask, cot, keys


def _vjp_fn(mode, num_samples):
  if mode == "no-checkpoint":
    layer = lambda p, o, m, k: dj.em_step(p, o, m)
  else:
    layer = lambda p, o, m, k: sp.em_layer(p, o, m, k, gradient=mode,
                                           num_samples=num_samples, step=_STEP.value)

  def one(p, o, m, k, v):
    return jax.vjp(lambda p: layer(p, o, m, k), p)[1](v)[0]
  return jax.jit(jax.vmap(one))


MODES = [("exact", 1), ("no-checkpoint", 1), ("forward", 16), ("spsa", 1), ("spsa", 16),
         ("spsa", 64)]


def table_timing(key):
  params, obs, mask, cot, keys = _timing_setup(
      key, _TIMING_USERS.value, _NUM_STEPS.value, _TIMING_STATES.value)
  args = (params, obs, mask, keys, cot)
  forward, memory = _compile(_forward_fn(), *args)
  base = _time(forward, *args)
  rows = [{"mode": "forward em_step", "num_samples": 0, "seconds": base, "relative": 1.0,
           "temp_mib": memory / 2 ** 20}]
  for mode, num_samples in MODES:
    compiled, memory = _compile(_vjp_fn(mode, num_samples), *args)
    t = _time(compiled, *args)
    rows.append({"mode": mode, "num_samples": num_samples, "seconds": t, "relative": t / base,
                 "temp_mib": memory / 2 ** 20})
    print(rows[-1], flush=True)
  return {"num_users": _TIMING_USERS.value, "num_steps": _NUM_STEPS.value,
          "num_states": _TIMING_STATES.value, "rows": rows}


def _forward_fn():
  return jax.jit(jax.vmap(lambda p, o, m, k, v: dj.em_step(p, o, m)))


def table_length(key):
  rows = []
  fns = {"forward em_step": _forward_fn(), "exact": _vjp_fn("exact", 1)}
  for num_steps in [int(t) for t in _LENGTHS.value]:
    params, obs, mask, cot, keys = _timing_setup(
        key, _LENGTH_USERS.value, num_steps, _TIMING_STATES.value)
    args = (params, obs, mask, keys, cot)
    row = {"num_steps": num_steps}
    for name, fn in fns.items():
      compiled, memory = _compile(fn, *args)
      row[name + " seconds"] = _time(compiled, *args, repeats=3)
      row[name + " temp MiB"] = memory / 2 ** 20
    rows.append(row)
    print(row, flush=True)
  return {"num_users": _LENGTH_USERS.value, "num_states": _TIMING_STATES.value, "rows": rows}


# ------------------------------------------------------------------ output


def _markdown(results):
  lines = []
  a = results["cosine"]
  lines += [f"### (a) Cosine similarity with the exact gradient "
            f"(U={a['num_users']}, T<={a['num_steps']}, K={a['num_states']}, "
            f"V={a['num_symbols']}, float32, c={a['step']}; per-user dimension "
            f"{a['dimension_per_user']}, shared-weight dimension {a['dimension_shared']}; "
            f"mean over {_REPEATS.value} keys)", "",
            "| mode | num_samples | per-user median cosine | batch-summed cosine (min) |",
            "|---|---|---|---|"]
  for r in a["rows"]:
    lines.append(f"| {r['mode']} | {r['num_samples']} | {r['per_user_median_cosine']:.3f} | "
                 f"{r['batch_summed_cosine']:.3f} ({r['batch_summed_cosine_min']:.3f}) |")
  b = results["theorem1"]
  lines += ["", "### (b) Theorem 1 on the EM map: ||E[J_hat] - J||_F vs c "
            f"(K=3, V=4, T=50, M={b['float64']['dimension']}, 4096 Rademacher draws, "
            "common random numbers)", "",
            "| c | bias float64 | bias float32 | per-sample FD error float64 |", "|---|---|---|---|"]
  for r64, r32 in zip(b["float64"]["bias_vs_step"], b["float32"]["bias_vs_step"]):
    lines.append(f"| {r64['step']:.0e} | {r64['bias_frobenius']:.3e} | "
                 f"{r32['bias_frobenius']:.3e} | {r64['per_sample_fd_error']:.3e} |")
  lines += ["", f"||J||_F = {b['float64']['jacobian_frobenius']:.3f}. Monte-Carlo error of "
            "the averaged SPSA Jacobian (float64, c=1e-3):", "",
            "| num_samples | RMS ||mean J_hat - J||_F | relative | error * sqrt(N) |",
            "|---|---|---|---|"]
  for r in b["float64"]["error_vs_num_samples"]:
    lines.append(f"| {r['num_samples']} | {r['rms_frobenius_error']:.3f} | "
                 f"{r['relative']:.3f} | {r['error_times_sqrt_n']:.2f} |")
  c = results["timing"]
  lines += ["", f"### (c) Wall time of one VJP per user, vmapped over U={c['num_users']} users "
            f"(T={c['num_steps']}, K={c['num_states']}, V={2 * c['num_states']}, float32, jit)", "",
            "| mode | num_samples | ms | relative to forward em_step | temp MiB |",
            "|---|---|---|---|---|"]
  for r in c["rows"]:
    lines.append(f"| {r['mode']} | {r['num_samples']} | {1e3 * r['seconds']:.1f} | "
                 f"{r['relative']:.1f} | {r['temp_mib']:.1f} |")
  d = results["length"]
  names = ["forward em_step", "exact"]
  lines += ["", f"### (d) Time and compiled temporary memory vs T (U={d['num_users']}, "
            f"K={d['num_states']}, float32)", "",
            "| T | " + " | ".join(f"{n} ms | {n} MiB" for n in names) + " |",
            "|---|" + "---|---|" * len(names)]
  for r in d["rows"]:
    lines.append(f"| {r['num_steps']} | " + " | ".join(
        f"{1e3 * r[n + ' seconds']:.1f} | {r[n + ' temp MiB']:.2f}" for n in names) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  key = jax.random.PRNGKey(_SEED.value)
  start = time.time()
  results = {"theorem1": table_theorem1(key), "cosine": table_cosine(key),
             "timing": table_timing(key), "length": table_length(key)}
  results["seconds"] = time.time() - start
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  with open(os.path.join(_OUTPUT_DIR.value, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  table = _markdown(results)
  with open(os.path.join(_OUTPUT_DIR.value, "tables.md"), "w") as f:
    f.write(table)
  print(table)
  print(f"total {results['seconds']:.0f} s")


if __name__ == "__main__":
  app.run(main)
