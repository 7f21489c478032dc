r"""How good and how cheap are the EM layer's gradient modes?

  python -m experiments.spsa_gradients --output_dir=/tmp/spsa_gradients
  python -m experiments.spsa_gradients --config=experiments/configs/spsa_gradients.py:tiny \
      --output_dir=/tmp/spsa_tiny

Writes ``results.json``, ``tables.md`` and ``config.json`` to ``--output_dir``
(sizes of every table in experiments/configs/spsa_gradients.py):

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
Everything runs with 64-bit types enabled ((b) needs float64; (a), (c), (d)
use float32 arrays), scoped to :func:`run`.
"""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import dennl_jax as dj
from experiments import common

F32 = jnp.float32


# ------------------------------------------------------------------ problem


def _normalise(x):
  return jax.nn.softplus(x) / jnp.sum(jax.nn.softplus(x), -1, keepdims=True)


def _head(logits):
  """Per-user logits {'initial','transition','emission'} -> valid HMM."""
  return dj.HMM(_normalise(logits["initial"]), _normalise(logits["transition"]),
                dj.Categorical(_normalise(logits["emission"])))


@functools.partial(jax.jit, static_argnums=2)
def _sample_observations(keys, truth, num_steps):
  return jax.vmap(lambda k, p: dj.sample(k, p, num_steps)[1])(keys, truth)


# One program per problem size: run eagerly, every Dirichlet draw compiled its
# own gamma-sampling loop (12 s of the tiny run's compilation).
@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
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
  obs = _sample_observations(jax.random.split(k_data, num_users), truth, num_steps)
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


def _user_loss(logits, obs, mask, key, mode, num_samples, step, perturbation="rademacher"):
  out = dj.em_layer(_head(logits), obs, mask, key, gradient=mode, num_samples=num_samples,
                    step=step, perturbation=perturbation)
  return -out.log_likelihood(obs, mask)


def _cosine(a, b):
  return float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


# -------------------------------------------------------------- table (a)


def table_cosine(key, config, step):
  obs, mask, embeddings, weights = _make_problem(
      key, config.num_users, config.num_steps, config.num_states, config.num_symbols)
  logits = jax.vmap(_logits, (None, 0))(weights, embeddings)

  @functools.partial(jax.jit, static_argnums=(2, 3))
  def per_user_grads(logits, keys, mode, num_samples):
    """raw keys (U, 2) or (D, U, 2) -> per-user gradients (with a leading D axis)."""
    grad = jax.vmap(jax.grad(_user_loss), (0, 0, 0, 0, None, None, None))
    if keys.ndim == 2:
      return grad(logits, obs, mask, keys, mode, num_samples, step)
    return jax.lax.map(lambda k: grad(logits, obs, mask, k, mode, num_samples, step), keys)

  def shared_grad(user_grads):
    # Loss = sum_u L_u(logits_u(W)), logits_u linear in W: dL/dW = sum_u e_u (x) g_u.
    return ravel_pytree({n: jnp.einsum("ue,u...->e...", embeddings, g)
                         for n, g in user_grads.items()})[0]

  num_users = config.num_users
  exact = per_user_grads(logits, jax.random.split(jax.random.PRNGKey(0), num_users), "exact", 1)
  exact_users = jax.vmap(lambda g: ravel_pytree(g)[0])(exact)
  exact_shared = shared_grad(exact)
  sample_counts = [int(s) for s in config.num_samples]
  draws = max(sample_counts) * config.repeats
  rows = []
  for mode in config.modes:
    # An estimate with num_samples=S is the mean of S independent one-draw
    # estimates, so one compiled one-draw gradient serves every S: draw
    # max(S) * repeats one-draw estimates per user, average disjoint blocks.
    keys = jax.random.split(jax.random.PRNGKey(7), draws * num_users).reshape(
        draws, num_users, 2)
    one_draw = per_user_grads(logits, keys, mode, 1)             # (draws, U, ...)
    for num_samples in sample_counts:
      per_user, shared = [], []
      for r in range(config.repeats):
        block = slice(r * max(sample_counts), r * max(sample_counts) + num_samples)
        est = jax.tree_util.tree_map(lambda g: g[block].mean(0), one_draw)
        est_users = jax.vmap(lambda g: ravel_pytree(g)[0])(est)
        per_user.append(np.median([_cosine(a, b) for a, b in zip(est_users, exact_users)]))
        shared.append(_cosine(shared_grad(est), exact_shared))
      rows.append({"mode": mode, "num_samples": num_samples,
                   "per_user_median_cosine": float(np.mean(per_user)),
                   "batch_summed_cosine": float(np.mean(shared)),
                   "batch_summed_cosine_min": float(np.min(shared))})
      common.log(str(rows[-1]))
  return {"num_users": num_users, "num_steps": config.num_steps,
          "num_states": config.num_states, "num_symbols": config.num_symbols,
          "repeats": config.repeats, "step": step,
          "dimension_per_user": int(exact_users.shape[1]),
          "dimension_shared": int(exact_shared.shape[0]), "rows": rows}


# -------------------------------------------------------------- table (b)


def table_theorem1(key, config):
  k_model, k_data, k_delta = jax.random.split(key, 3)
  num_states, num_symbols, num_steps = config.num_states, config.num_symbols, config.num_steps
  ka, kb, kc = jax.random.split(k_model, 3)
  params = dj.HMM(jax.random.dirichlet(ka, jnp.ones(num_states)),
                  jax.random.dirichlet(kb, 2 * jnp.ones(num_states), (num_states,)),
                  dj.Categorical(jax.random.dirichlet(kc, jnp.ones(num_symbols), (num_states,))))
  _, obs = jax.jit(dj.sample, static_argnums=2)(k_data, params, num_steps)
  mask = jnp.ones(num_steps, bool)
  num = config.num_draws
  results = {"num_states": num_states, "num_symbols": num_symbols, "num_steps": num_steps,
             "num_draws": num}
  for dtype in (jnp.dtype(d) for d in config.dtypes):
    p = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    theta, unravel = ravel_pytree(p.to_unconstrained())
    # The map every gradient mode differentiates: EM of the model at unconstrained theta.
    em = lambda th: ravel_pytree(dj.em_step(p.from_unconstrained(unravel(th)), obs, mask))[0]
    jac = jax.jit(jax.jacfwd(em))(theta).astype(jnp.float64)
    deltas = jax.random.rademacher(k_delta, (num, theta.shape[0]), dtype)

    @jax.jit
    def jhat(c, deltas):
      """Per-sample finite-difference columns (f(+)-f(-))/(2c): (N, M_out)."""
      plus = jax.vmap(em)(theta + c * deltas)
      minus = jax.vmap(em)(theta - c * deltas)
      return ((plus - minus) / (2 * c)).astype(jnp.float64)

    d64 = deltas.astype(jnp.float64)
    bias_rows = []
    for c in config.steps:
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
    for n in config.num_samples:
      chunks = per_sample[: (num // n) * n].reshape(num // n, n, *per_sample.shape[1:]).mean(1)
      err = jnp.sqrt(jnp.mean(jnp.sum((chunks - jac) ** 2, axis=(1, 2))))
      mc_rows.append({"num_samples": n, "rms_frobenius_error": float(err),
                      "relative": float(err / jnp.linalg.norm(jac)),
                      "error_times_sqrt_n": float(err * np.sqrt(n))})
    results[dtype.name] = {"jacobian_frobenius": float(jnp.linalg.norm(jac)),
                                      "dimension": int(theta.shape[0]),
                                      "bias_vs_step": bias_rows, "error_vs_num_samples": mc_rows}
    common.log(f"{dtype.name} {bias_rows}")
  return results


# --------------------------------------------------------- tables (c), (d)


class _Compiled:
  """Ahead-of-time compilations, kept per (function, argument shapes): tables
  (c) and (d) share them where their workloads coincide."""

  def __init__(self):
    self._cache = {}

  def __call__(self, fn, *args):
    """(compiled function, temporary bytes from XLA's memory analysis or None)."""
    key = (fn, jax.tree_util.tree_structure(args),
           tuple((x.shape, x.dtype) for x in jax.tree_util.tree_leaves(args)))
    if key not in self._cache:
      compiled = fn.lower(*args).compile()
      stats = compiled.memory_analysis()
      self._cache[key] = compiled, (None if stats is None else int(stats.temp_size_in_bytes))
    return self._cache[key]


def _mib(num_bytes):
  return None if num_bytes is None else num_bytes / 2 ** 20


def _timing_setup(key, num_users, num_steps, num_states):
  obs, mask, embeddings, weights = _make_problem(key, num_users, num_steps, num_states,
                                                 2 * num_states)
  params = jax.vmap(lambda e: _head(_logits(weights, e)))(embeddings)
  cot = jax.tree_util.tree_map(lambda x: jnp.ones_like(x) * 0.1, params)
  keys = jax.random.split(key, num_users)
  return params, obs, mask, cot, keys


@functools.lru_cache(maxsize=None)
def _vjp_fn(mode, num_samples, step):
  if mode == "no-checkpoint":
    layer = lambda p, o, m, k: dj.em_step(p, o, m)
  else:
    layer = lambda p, o, m, k: dj.em_layer(p, o, m, k, gradient=mode, num_samples=num_samples,
                                           step=step)

  def one(p, o, m, k, v):
    return jax.vjp(lambda p: layer(p, o, m, k), p)[1](v)[0]
  return jax.jit(jax.vmap(one))


@functools.lru_cache(maxsize=None)
def _forward_fn():
  return jax.jit(jax.vmap(lambda p, o, m, k, v: dj.em_step(p, o, m)))


def _parse_mode(text):
  mode, _, num_samples = str(text).partition(":")
  return mode, int(num_samples or 1)


def table_timing(key, config, step, compile_fn):
  params, obs, mask, cot, keys = _timing_setup(
      key, config.num_users, config.num_steps, config.num_states)
  args = (params, obs, mask, keys, cot)
  forward, memory = compile_fn(_forward_fn(), *args)
  base, _ = common.median_seconds(forward, *args, repeats=config.repeats)
  rows = [{"mode": "forward em_step", "num_samples": 0, "seconds": base, "relative": 1.0,
           "temp_mib": _mib(memory)}]
  for mode, num_samples in map(_parse_mode, config.modes):
    compiled, memory = compile_fn(_vjp_fn(mode, num_samples, step), *args)
    t, _ = common.median_seconds(compiled, *args, repeats=config.repeats)
    rows.append({"mode": mode, "num_samples": num_samples, "seconds": t, "relative": t / base,
                 "temp_mib": _mib(memory)})
    common.log(str(rows[-1]))
  return {"num_users": config.num_users, "num_steps": config.num_steps,
          "num_states": config.num_states, "rows": rows}


def table_length(key, config, step, compile_fn):
  rows = []
  fns = {"forward em_step": _forward_fn(), "exact": _vjp_fn("exact", 1, step)}
  for num_steps in (int(t) for t in config.lengths):
    params, obs, mask, cot, keys = _timing_setup(key, config.num_users, num_steps,
                                                 config.num_states)
    args = (params, obs, mask, keys, cot)
    row = {"num_steps": num_steps}
    for name, fn in fns.items():
      compiled, memory = compile_fn(fn, *args)
      row[name + " seconds"], _ = common.median_seconds(compiled, *args, repeats=config.repeats)
      row[name + " temp MiB"] = _mib(memory)
    rows.append(row)
    common.log(str(row))
  return {"num_users": config.num_users, "num_states": config.num_states, "rows": rows}


# -------------------------------------------------------------- table (e)


def table_variance(key, config, step):
  """Variance reduction at equal cost: per-user squared error of the SPSA
  gradient (relative to the exact one) with i.i.d. vs orthogonal directions,
  the same S (2 S em_step evaluations either way)."""
  obs, mask, embeddings, weights = _make_problem(
      key, config.num_users, config.num_steps, config.num_states, config.num_symbols)
  logits = jax.vmap(_logits, (None, 0))(weights, embeddings)
  flat = jax.vmap(lambda g: ravel_pytree(g)[0])

  @functools.partial(jax.jit, static_argnums=(2, 3, 4))
  def grads(logits, keys, mode, num_samples, perturbation):
    grad = jax.vmap(jax.grad(_user_loss), (0, 0, 0, 0, None, None, None, None))
    return flat(grad(logits, obs, mask, keys, mode, num_samples, step, perturbation))

  users = config.num_users
  exact = grads(logits, jax.random.split(jax.random.PRNGKey(0), users), "exact", 1,
                "rademacher")
  norm2 = jnp.sum(exact ** 2, 1)
  rows = []
  for num_samples in config.num_samples:
    for perturbation in config.perturbations:
      rel, cos = [], []
      for r in range(config.repeats):
        est = grads(logits, jax.random.split(jax.random.PRNGKey(100 + r), users), "spsa",
                    int(num_samples), perturbation)
        rel.append(np.asarray(jnp.sum((est - exact) ** 2, 1) / norm2))
        cos.append(np.asarray(jnp.sum(est * exact, 1) / jnp.sqrt(norm2 * jnp.sum(est ** 2, 1))))
      rows.append({"num_samples": int(num_samples), "perturbation": perturbation,
                   "relative_mse": float(np.mean(rel)), "median_cosine": float(np.median(cos))})
      common.log(str(rows[-1]))
  return {"num_users": users, "num_steps": config.num_steps, "num_states": config.num_states,
          "num_symbols": config.num_symbols, "repeats": config.repeats,
          "dimension_per_user": int(exact.shape[1]), "rows": rows}


# ------------------------------------------------------------------ output


def _num(x, fmt):
  return "n/a" if x is None else format(x, fmt)


def _markdown(results):
  a = results["cosine"]
  blocks = [
      f"### (a) Cosine similarity with the exact gradient (U={a['num_users']}, "
      f"T<={a['num_steps']}, K={a['num_states']}, V={a['num_symbols']}, float32, c={a['step']}; "
      f"per-user dimension {a['dimension_per_user']}, shared-weight dimension "
      f"{a['dimension_shared']}; mean over {a['repeats']} keys)",
      common.markdown_table(
          ["mode", "num_samples", "per-user median cosine", "batch-summed cosine (min)"],
          [(r["mode"], r["num_samples"], f"{r['per_user_median_cosine']:.3f}",
            f"{r['batch_summed_cosine']:.3f} ({r['batch_summed_cosine_min']:.3f})")
           for r in a["rows"]])]
  b = results["theorem1"]
  blocks += [
      f"### (b) Theorem 1 on the EM map: ||E[J_hat] - J||_F vs c (K={b['num_states']}, "
      f"V={b['num_symbols']}, T={b['num_steps']}, M={b['float64']['dimension']}, "
      f"{b['num_draws']} Rademacher draws, common random numbers)",
      common.markdown_table(
          ["c", "bias float64", "bias float32", "per-sample FD error float64"],
          [(f"{r64['step']:.0e}", f"{r64['bias_frobenius']:.3e}",
            _num(r32 and r32["bias_frobenius"], ".3e"), f"{r64['per_sample_fd_error']:.3e}")
           for r64, r32 in zip(b["float64"]["bias_vs_step"],
                               b.get("float32", {}).get("bias_vs_step") or
                               [None] * len(b["float64"]["bias_vs_step"]))]),
      f"||J||_F = {b['float64']['jacobian_frobenius']:.3f}. Monte-Carlo error of the "
      "averaged SPSA Jacobian (float64, c=1e-3):",
      common.markdown_table(
          ["num_samples", "RMS ||mean J_hat - J||_F", "relative", "error * sqrt(N)"],
          [(r["num_samples"], f"{r['rms_frobenius_error']:.3f}", f"{r['relative']:.3f}",
            f"{r['error_times_sqrt_n']:.2f}") for r in b["float64"]["error_vs_num_samples"]])]
  c = results["timing"]
  blocks += [
      f"### (c) Wall time of one VJP per user, vmapped over U={c['num_users']} users "
      f"(T={c['num_steps']}, K={c['num_states']}, V={2 * c['num_states']}, float32, jit)",
      common.markdown_table(
          ["mode", "num_samples", "ms", "relative to forward em_step", "temp MiB"],
          [(r["mode"], r["num_samples"], f"{1e3 * r['seconds']:.1f}", f"{r['relative']:.1f}",
            _num(r["temp_mib"], ".1f")) for r in c["rows"]])]
  d = results["length"]
  names = ["forward em_step", "exact"]
  blocks += [
      f"### (d) Time and compiled temporary memory vs T (U={d['num_users']}, "
      f"K={d['num_states']}, float32)",
      common.markdown_table(
          ["T", *[f"{n} {unit}" for n in names for unit in ("ms", "MiB")]],
          [(r["num_steps"], *[v for n in names for v in (
              f"{1e3 * r[n + ' seconds']:.1f}", _num(r[n + " temp MiB"], ".2f"))])
           for r in d["rows"]])]
  e = results["variance"]
  blocks += [
      f"### (e) Variance reduction at equal cost: i.i.d. Rademacher vs orthogonal directions "
      f"(U={e['num_users']}, T<={e['num_steps']}, K={e['num_states']}, V={e['num_symbols']}, "
      f"float32, per-user dimension {e['dimension_per_user']}, {e['repeats']} keys)",
      common.markdown_table(
          ["num_samples", "perturbation", "relative MSE ||g - g*||^2 / ||g*||^2",
           "median cosine"],
          [(r["num_samples"], r["perturbation"], f"{r['relative_mse']:.3f}",
            f"{r['median_cosine']:.3f}") for r in e["rows"]])]
  return blocks


def run(config, output_dir: str | None = None) -> dict:
  """All four tables; prints them, writes them with ``output_dir``."""
  with jax.enable_x64(True):
    key = jax.random.PRNGKey(config.seed)
    compile_fn = _Compiled()
    start = time.time()
    results = {"theorem1": table_theorem1(key, config.theorem1),
               "cosine": table_cosine(key, config.cosine, config.step),
               "timing": table_timing(key, config.timing, config.step, compile_fn),
               "length": table_length(key, config.length, config.step, compile_fn),
               "variance": table_variance(key, config.variance, config.step)}
    results["seconds"] = time.time() - start
  blocks = _markdown(results)
  if output_dir:
    common.save_config(config, output_dir)
    common.write_json(os.path.join(output_dir, "results.json"), results, indent=1)
    common.write_markdown(os.path.join(output_dir, "tables.md"), *blocks)
  print("\n\n".join(b if isinstance(b, str) else "\n".join(b) for b in blocks))
  print(f"total {results['seconds']:.0f} s")
  return results


if __name__ == "__main__":
  common.app_main("spsa_gradients", run, output_dir="/tmp/spsa_gradients")
