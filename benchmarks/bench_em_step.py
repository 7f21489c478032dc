r"""Throughput of one EM step against dynamax's smoother and hmmlearn.

  python -m benchmarks.bench_em_step [--output_dir=/tmp/bench] \
      [--config=benchmarks/configs/bench_em_step.py --config.num_users=2000 --config.repeats=7]

Workload (benchmarks/configs/bench_em_step.py): U users, each with its own
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

Batched kernels.  ``jax.vmap`` of the engine runs the users-minor
kernels of ``dennl_jax._kernel_hmm``; the same function with the models'
``kernels="per_sequence"`` (:class:`dennl_jax.Kernels`) is the per-sequence vmap.
By default the vmapped step runs in blocks of ``dj.Kernels().block()``
users (``lax.map`` over blocks); the kernels on all users at once are timed too,
so the gain of the blocks shows as a ratio.
All are timed in the same process, interleaved with dynamax, and so are:
a DENNL training step with exact gradients (``config.dennl_users`` users,
skipped at 0), the cost growth over U, T and K (``config.growth`` rows), and
the compiled temporary memory of an exact gradient at ``config.memory_steps``
steps (XLA's ``memory_analysis``; skipped at 0).  ``--config=...:quick`` does
all of it in a few minutes.
"""
from __future__ import annotations

import functools
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

import dennl_jax as dj
from experiments import common


def _with_kernels(args, kernels: str, users_per_block):
  """``args`` with every HMM/HSMM's static ``kernels`` and ``users_per_block`` set."""
  is_model = lambda x: isinstance(x, (dj.HMM, dj.HSMM))  # noqa: E731
  return jax.tree_util.tree_map(
      lambda x: x.replace(kernels=kernels, users_per_block=users_per_block) if is_model(x)
      else x, args, is_leaf=is_model)


def compiled(fn, *args, batched: bool | None, users_per_block: int | None = None):
  """``fn`` (a jitted function) compiled ahead of time for ``args``' models with
  ``kernels="users_minor"`` (``batched=True``) or ``"per_sequence"`` (False) and
  ``users_per_block`` (:class:`dennl_jax.Kernels`); ``batched=None``: the models as
  given (``"auto"``: the backend's defaults).  Returns a callable of the original
  ``args`` with the compiled program's ``memory_analysis``."""
  if batched is None:
    return fn.lower(*args).compile()
  kernels = "users_minor" if batched else "per_sequence"
  program = fn.lower(*_with_kernels(args, kernels, users_per_block)).compile()

  def call(*call_args):
    return program(*_with_kernels(call_args, kernels, users_per_block))

  call.memory_analysis = program.memory_analysis
  return call


def both_paths(fn, *args):
  """(batched, per-sequence) AOT-compiled versions of ``jax.jit(fn)``."""
  return (compiled(jax.jit(fn), *args, batched=True),
          compiled(jax.jit(fn), *args, batched=False))


def random_batch(seed, num_users, num_steps, num_states, num_symbols):
  key_model, key_obs = jax.random.split(jax.random.PRNGKey(seed))
  params = random_models(key_model, num_users, num_states, num_symbols)
  obs = jax.random.randint(key_obs, (num_users, num_steps), 0, num_symbols, jnp.int32)
  return params, obs, jnp.ones((num_users, num_steps), bool)


def time_dennl_step(config):
  """Seconds of one DENNL exact-gradient training step: batched kernels on and off, and
  the exact gradient by checkpointed autodiff through the scans (``"exact_autodiff"``)
  against the score VJP (``"exact"``)."""
  from flax import nnx
  from dennl_jax.codec import ParamCodec
  params, obs, mask = random_batch(config.seed + 1, config.dennl_users, config.num_steps,
                                   config.num_states, config.num_symbols)
  template = jax.tree_util.tree_map(lambda x: x[0], params)
  optimizer = dj.make_optimizer(1e-3)
  embedding = jax.random.normal(jax.random.PRNGKey(2), (config.dennl_users,
                                                        config.dennl_embed_dim))
  batch = dj.Batch(embedding, obs, mask)

  def train_step(gradient):
    model = dj.DENNL(ParamCodec(template), template, config.dennl_embed_dim,
                     num_stages=config.dennl_stages, layer=dj.EMLayer(gradient=gradient),
                     rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    args = (state, optimizer.init(state), batch, jax.random.PRNGKey(3))
    return dj.make_train_step(graphdef, dj.likelihood_loss, optimizer), args

  # The network builds its models inside the step, with the backend's default kernels.
  step, args = train_step("exact")
  autodiff_step, autodiff_args = train_step("exact_autodiff")
  default = compiled(step, *args, batched=None)
  autodiff = compiled(autodiff_step, *autodiff_args, batched=None)
  (default_s, default_all), (auto_s, auto_all) = common.interleaved_median_seconds(
      [(default, args), (autodiff, autodiff_args)], config.repeats)
  return {"users": config.dennl_users, "stages": config.dennl_stages, "steps": config.num_steps,
          "default_seconds": default_s, "exact_autodiff_seconds": auto_s,
          "speedup_over_autodiff": auto_s / default_s,
          "raw": {"default": default_all, "exact_autodiff": auto_all}}


def growth_rows(config):
  """User-steps/s of vmap(em_step) for each (U, T, K): batched kernels in blocks of users
  (the default), the kernels on all users at once, and the per-sequence vmap."""
  rows = []
  em = jax.jit(jax.vmap(dj.em_step))
  for num_users, num_steps, num_states in config.growth:
    args = random_batch(config.seed, num_users, num_steps, num_states, config.num_symbols)
    fast, slow = both_paths(em, *args)
    one_block = compiled(em, *args, batched=True, users_per_block=0)
    (fast_s, _), (slow_s, _), (one_s, _) = common.interleaved_median_seconds(
        [(fast, args), (slow, args), (one_block, args)], max(1, config.repeats // 2))
    per_step = lambda seconds: 1e6 * seconds / (num_users * num_steps)
    rows.append({"U": num_users, "T": num_steps, "K": num_states,
                 "batched_us_per_user_step": per_step(fast_s),
                 "one_block_us_per_user_step": per_step(one_s),
                 "per_sequence_us_per_user_step": per_step(slow_s),
                 "speedup": slow_s / fast_s, "speedup_from_blocks": one_s / fast_s})
    common.log(str(rows[-1]))
  return rows


def gradient_memory(config):
  """XLA's temporary bytes for the exact gradient of a vmapped EM layer at T = memory_steps."""
  params, obs, mask = random_batch(config.seed, config.memory_users, config.memory_steps,
                                   config.num_states, config.num_symbols)
  def loss(p, gradient):
    layer = jax.vmap(lambda p, o, m: dj.em_layer(p, o, m, gradient=gradient))
    return sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(layer(p, obs, mask)))

  out = {"users": config.memory_users, "steps": config.memory_steps}
  for name, batched, gradient in (("batched", True, "exact"), ("per_sequence", False, "exact"),
                                  ("exact_autodiff", True, "exact_autodiff")):
    grad = jax.jit(jax.grad(functools.partial(loss, gradient=gradient)))
    stats = compiled(grad, params, batched=batched).memory_analysis()
    out[f"{name}_temp_bytes"] = int(stats.temp_size_in_bytes)
  out["bytes_per_user_step_batched"] = out["batched_temp_bytes"] / (
      config.memory_users * config.memory_steps)
  return out


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


def _describe_dennl(d):
  return (f"DENNL exact-gradient training step ({d['users']} users, {d['stages']} stages, "
          f"T={d['steps']}): backend defaults {d['default_seconds']:.3f} s; "
          f"autodiff through the scans ('exact_autodiff', backend defaults) "
          f"{d['exact_autodiff_seconds']:.3f} s: score VJP speedup "
          f"{d['speedup_over_autodiff']:.2f}x")


def _describe_growth(rows):
  return "\n".join(common.markdown_table(
      ["U", "T", "K", "batched µs/user-step", "kernels, one block", "per-sequence",
       "batched / per-sequence", "blocks / one block"],
      [(r["U"], r["T"], r["K"], f"{r['batched_us_per_user_step']:.3f}",
        f"{r['one_block_us_per_user_step']:.3f}", f"{r['per_sequence_us_per_user_step']:.3f}",
        f"{r['speedup']:.2f}x", f"{r['speedup_from_blocks']:.2f}x") for r in rows],
      align="right"))


def _describe_memory(m):
  return (f"Exact gradient of vmap(em_layer) at T={m['steps']}, {m['users']} users: "
          f"XLA temporaries batched {m['batched_temp_bytes'] / 2**20:.1f} MiB, "
          f"per-sequence {m['per_sequence_temp_bytes'] / 2**20:.1f} MiB, "
          f"autodiff through the scans ('exact_autodiff') "
          f"{m['exact_autodiff_temp_bytes'] / 2**20:.1f} MiB")


# (result key, enabled(config), compute(config), describe(result)) of the optional sections.
_SECTIONS = (
    ("dennl_exact_step", lambda c: c.dennl_users > 0, time_dennl_step, _describe_dennl),
    ("growth", lambda c: len(c.growth) > 0, growth_rows, _describe_growth),
    ("gradient_memory", lambda c: c.memory_steps > 0, gradient_memory, _describe_memory),
)


def run(config, output_dir: str | None = None) -> dict:
  """Times the three methods; prints the table, writes it with ``output_dir``."""
  num_users, num_steps = config.num_users, config.num_steps
  num_states, num_symbols = config.num_states, config.num_symbols
  params, obs, mask = random_batch(config.seed, num_users, num_steps, num_states, num_symbols)
  dj.validate(params, obs, mask)  # once, on the concrete batch
  user_steps = num_users * num_steps

  ours, per_sequence = both_paths(jax.vmap(dj.em_step), params, obs, mask)
  one_block = compiled(jax.jit(jax.vmap(dj.em_step)), params, obs, mask, batched=True,
                       users_per_block=0)

  from dynamax.hidden_markov_model import hmm_smoother as dynamax_smoother

  def dynamax_one(p, o):
    log_likes = jnp.log(p.emission.probs[:, o].T)
    return dynamax_smoother(p.initial, p.transition, log_likes)

  dynamax = jax.jit(jax.vmap(dynamax_one))
  # The same blocks of users as ours (lax.map with batch_size), so the ratio against it
  # shows what the kernels add beyond the blocking, which any vmapped function can use.
  block = dj.Kernels().block() or num_users
  dynamax_blocks = jax.jit(lambda p, o: jax.lax.map(lambda a: dynamax_one(*a), (p, o),
                                                    batch_size=block))

  timed = common.interleaved_median_seconds(
      [(ours, (params, obs, mask)), (per_sequence, (params, obs, mask)),
       (dynamax, (params, obs)), (one_block, (params, obs, mask)),
       (dynamax_blocks, (params, obs))], config.repeats)
  (ours_s, ours_all), (seq_s, seq_all), (dyn_s, dyn_all), (one_s, one_all) = timed[:4]
  dyn_blocks_s, dyn_blocks_all = timed[4]
  hl_users = min(config.hmmlearn_users, num_users)
  hl_s, hl_all = time_hmmlearn(params, obs, hl_users, max(1, min(3, config.repeats)))

  rows = [
      (f"dennl_jax em_step (full EM iteration), batched kernels, blocks of "
       f"{dj.Kernels().block()} users", user_steps / ours_s, ours_s),
      ("dynamax hmm_smoother (E-step only)", user_steps / dyn_s, dyn_s),
      (f"hmmlearn score_samples ({hl_users} users, scaled)", hl_users * num_steps / hl_s,
       hl_s * num_users / hl_users),
  ]
  rows.append(("dennl_jax em_step, per-sequence vmap", user_steps / seq_s, seq_s))
  rows.append(("dennl_jax em_step, batched kernels on all users at once", user_steps / one_s,
               one_s))
  rows.append((f"dynamax hmm_smoother in blocks of {block} users (lax.map)",
               user_steps / dyn_blocks_s, dyn_blocks_s))
  ratio_dyn = rows[0][1] / rows[1][1]
  ratio_hl = rows[0][1] / rows[2][1]
  ratio_seq = seq_s / ours_s
  load = os.getloadavg()[0]
  header = (f"U={num_users}, T={num_steps}, K={num_states}, Categorical V={num_symbols}, "
            f"per-user params, float32, jit+vmap; median of {config.repeats}; "
            f"{os.cpu_count()} CPUs, jax {jax.__version__}, {jax.default_backend()}")
  table = common.markdown_table(
      ["method", "user-steps/s", "seconds for all users"],
      [(name, f"{rate:,.0f}", f"{sec:.4f}") for name, rate, sec in rows],
      align=["left", "right", "right"])
  footer = (f"ours / dynamax = {ratio_dyn:.2f}x; ours / hmmlearn = {ratio_hl:.1f}x; "
            f"batched / per-sequence = {ratio_seq:.2f}x; "
            f"per-sequence / dynamax = {dyn_s / seq_s:.2f}x; "
            f"blocks / one block = {one_s / ours_s:.2f}x; "
            f"ours / dynamax in the same blocks = {dyn_blocks_s / ours_s:.2f}x; "
            f"load average {load:.1f}")
  blocks = [header, "\n".join(table), footer]
  extra = {}
  for key, enabled, compute, describe in _SECTIONS:
    if enabled(config):
      extra[key] = compute(config)
      blocks.append(describe(extra[key]))
  blocks.append(f"load average at the end {os.getloadavg()[0]:.1f}")
  print("\n\n".join(blocks))
  result = {
      "num_users": num_users, "num_steps": num_steps, "num_states": num_states,
      "num_symbols": num_symbols, "repeats": config.repeats, "hmmlearn_users": hl_users,
      "jax_version": jax.__version__, "backend": jax.default_backend(),
      "cpu_count": os.cpu_count(), "machine": platform.machine(),
      "ours_user_steps_per_s": rows[0][1], "dynamax_user_steps_per_s": rows[1][1],
      "hmmlearn_user_steps_per_s": rows[2][1],
      "ratio_ours_over_dynamax": ratio_dyn, "ratio_ours_over_hmmlearn": ratio_hl,
      "per_sequence_user_steps_per_s": user_steps / seq_s,
      "ratio_batched_over_per_sequence": ratio_seq, "load_average_start": load,
      "users_per_block": dj.Kernels().block(),
      "one_block_user_steps_per_s": user_steps / one_s, "ratio_blocks_over_one_block": one_s / ours_s,
      "dynamax_blocks_user_steps_per_s": user_steps / dyn_blocks_s,
      "ratio_ours_over_dynamax_blocks": dyn_blocks_s / ours_s,
      "raw_seconds": {"ours": ours_all, "per_sequence": seq_all, "dynamax": dyn_all,
                      "one_block": one_all, "dynamax_blocks": dyn_blocks_all,
                      "hmmlearn_subset": hl_all},
      **extra,
  }
  if output_dir:
    common.save_config(config, output_dir)
    common.write_json(os.path.join(output_dir, "results.json"), result)
    common.write_markdown(os.path.join(output_dir, "results.md"), *blocks)
  return result


if __name__ == "__main__":
  common.app_main("bench_em_step", run)
