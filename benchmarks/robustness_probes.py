"""Numerical-robustness and bad-input probes: what each returns, against what it should.

Run from the repository root:

  python -m benchmarks.robustness_probes --output_dir=/tmp/probes

Each probe is one call a user could make -- a possible sequence with a huge
log-likelihood gap, an impossible sequence, a long float32 sequence, a
malformed input -- with the answer it should give (a reference computed in
float64 log space, -inf, or a ValueError naming the problem).  Writes
``probes.json`` and ``probes.md`` (the table in docs/robustness.md) and exits
non-zero when a probe fails.
"""
from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

import dennl_jax as dj
from experiments import common

def _log_forward(initial, transition, log_likes):
  """Log-space HMM forward in float64: the reference log-likelihood."""
  with np.errstate(divide="ignore"):
    log_a, log_init = np.log(transition), np.log(initial)
  alpha = log_init + log_likes[0]
  for t in range(1, len(log_likes)):
    alpha = logsumexp(alpha[:, None] + log_a, axis=0) + log_likes[t]
  return float(logsumexp(alpha))


def _left_to_right(dtype):
  return dj.HMM(np.array([1.0, 0.0], dtype), np.array([[0.9, 0.1], [0.0, 1.0]], dtype),
                dj.DiagGaussian(np.array([[0.0], [14.0]], dtype), np.ones((2, 1), dtype)))


def _gap_hsmm(dtype, rate_gap=60.0):
  """2-state Poisson-duration HSMM whose second state fits every step far better."""
  return dj.HSMM(np.array([1.0, 0.0], dtype), np.array([[0.0, 1.0], [1.0, 0.0]], dtype),
                 dj.PoissonDuration(np.array([3.0, 3.0], dtype), max_duration=6),
                 dj.Poisson(np.array([1.0, rate_gap], dtype)))


def _categorical(dtype, probs):
  return dj.HMM(np.array([0.5, 0.5], dtype), np.array([[0.8, 0.2], [0.3, 0.7]], dtype),
                dj.Categorical(np.asarray(probs, dtype)))


def _finite(tree) -> bool:
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def _raises(fn, *fragments) -> tuple[str, bool]:
  try:
    fn()
  except ValueError as err:
    return f"ValueError: {str(err)[:90]}", all(f in str(err) for f in fragments)
  except Exception as err:   # noqa: BLE001 -- the probe reports what escaped
    return f"{type(err).__name__}: {str(err)[:80]}", False
  return "no error", False


def probes():
  """``(name, expected, actual, ok)`` for every probe; ``ok`` is True, False or
  ``"limit"`` (a documented limit of float32, measured)."""
  rows = []
  obs14 = np.full((3, 1), 14.0)
  reference = _log_forward(np.array([1.0, 0.0]), np.array([[0.9, 0.1], [0.0, 1.0]]),
                           np.stack([-0.5 * (obs14[:, 0] - m) ** 2 - 0.5 * np.log(2 * np.pi)
                                     for m in (0.0, 14.0)], axis=1))
  for dtype, tol in ((np.float32, 1e-3), (np.float64, 1e-9)):
    ll = float(dj.log_likelihood(_left_to_right(dtype), obs14.astype(dtype), np.ones(3, bool)))
    rows.append((f"left-to-right HMM, 14-sigma observation ({np.dtype(dtype).name})",
                 f"{reference:.4f}", f"{ll:.4f}", abs(ll - reference) < tol))
  post = dj.posterior(_left_to_right(np.float32), obs14.astype(np.float32), np.ones(3, bool))
  rows.append(("... its posteriors and em_step (float32)", "finite",
               "finite" if _finite(post) and _finite(dj.em_step(
                   _left_to_right(np.float32), obs14.astype(np.float32), np.ones(3, bool)))
               else "non-finite", _finite(post)))

  rng = np.random.default_rng(0)
  counts = rng.poisson(60.0, 200).astype(np.float64)
  ll64 = float(dj.log_likelihood(_gap_hsmm(np.float64), counts, np.ones(200, bool)))
  ll32 = float(dj.log_likelihood(_gap_hsmm(np.float32), counts.astype(np.float32),
                                 np.ones(200, bool)))
  # A known limit, not a failure: the true filtered mass of the worse state falls to
  # e^-86 .. e^-99 (below float32's 1e-38) and is flushed, and paths through it are
  # needed later; float32 then gives a finite lower bound.
  exact = abs(ll32 - ll64) < 1e-4 * abs(ll64)
  rows.append(("HSMM, the unreachable-at-first state ~180 nats better per step, T = 200 "
               "(float32 vs float64)", f"{ll64:.2f}", f"{ll32:.2f}",
               True if exact else ("limit" if np.isfinite(ll32) and ll32 <= ll64 else False)))
  ll64_short = float(dj.log_likelihood(_gap_hsmm(np.float64), counts[:5], np.ones(5, bool)))
  ll32_short = float(dj.log_likelihood(_gap_hsmm(np.float32), counts[:5].astype(np.float32),
                                       np.ones(5, bool)))
  rows.append(("... the same HSMM over its first 5 steps (float32 vs float64)", f"{ll64_short:.4f}",
               f"{ll32_short:.4f}", abs(ll32_short - ll64_short) < 1e-4 * abs(ll64_short)))

  impossible = {
      "emission-impossible middle step": (_categorical(np.float64, [[1.0, 0.0], [1.0, 0.0]]),
                                          np.array([0, 1, 0])),
      "emission-impossible last step": (_categorical(np.float64, [[1.0, 0.0], [1.0, 0.0]]),
                                        np.array([0, 0, 1])),
      "transition-impossible": (dj.HMM(np.array([1.0, 0.0]), np.array([[1.0, 0.0], [0.0, 1.0]]),
                                       dj.Categorical(np.array([[1.0, 0.0], [0.0, 1.0]]))),
                                np.array([0, 1, 1])),
  }
  for name, (model, obs) in impossible.items():
    mask = np.ones(len(obs), bool)
    ll = float(dj.log_likelihood(model, obs, mask))
    batched = float(jax.vmap(dj.log_likelihood)(
        jax.tree_util.tree_map(lambda x: x[None], model.replace(kernels="users_minor")),
        obs[None], mask[None])[0])
    ok = ll == -np.inf and batched == -np.inf and _finite(dj.posterior(model, obs, mask).smoothed_probs)
    rows.append((f"{name} (log-likelihood, kernel, posteriors)", "-inf, -inf, finite",
                 f"{ll}, {batched}, {'finite' if ok else 'see'}", ok))

  steps = 100_000
  hmm64 = _categorical(np.float64, [[0.7, 0.3], [0.2, 0.8]])
  obs = rng.integers(0, 2, steps)
  mask = np.ones(steps, bool)
  exact = float(dj.log_likelihood(hmm64, obs, mask))
  hmm32 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), hmm64)
  single = float(dj.log_likelihood(hmm32, obs, mask))
  batched32 = jax.tree_util.tree_map(lambda x: x[None], hmm32).replace(kernels="users_minor")
  batched = float(jax.vmap(dj.log_likelihood)(batched32, obs[None], mask[None])[0])
  rows.append((f"float32 log-likelihood at T = {steps:,}: kernel error vs per-sequence error",
               "kernel <= 2 x per-sequence + 0.01", f"{abs(batched - exact):.3f} vs "
               f"{abs(single - exact):.3f}", abs(batched - exact) <= 2 * abs(single - exact) + 0.01))

  cat = _categorical(np.float64, [[0.5, 0.5], [0.5, 0.5]])
  for name, fn, fragments in [
      ("category out of range", lambda: dj.log_likelihood(cat, np.array([0, 5]), np.ones(2, bool)),
       ("out of range",)),
      ("float mask", lambda: dj.em_step(cat, np.array([0, 1]), np.ones(2)), ("bool",)),
      ("no valid step", lambda: dj.log_likelihood(cat, np.array([0, 1]), np.zeros(2, bool)),
       ("no valid step",)),
      ("int32 parameters", lambda: dj.log_likelihood(cat.replace(initial=np.array([1, 0], np.int32)),
                                                      np.array([0]), np.ones(1, bool)), ("dtype",)),
      ("decode_states user-count mismatch", lambda: dj.decode_states(
          jax.tree_util.tree_map(lambda x: np.stack([x, x]), cat), np.zeros((1, 2), int),
          np.ones((1, 2), bool)), ("leading user axis",)),
      ("sample with T = 0", lambda: dj.sample(jax.random.key(0), cat, 0), ("num_steps",)),
  ]:
    actual, ok = _raises(fn, *fragments)
    rows.append((f"bad input: {name}", "ValueError naming it", actual, ok))

  err, _ = jax.jit(dj.checked(dj.log_likelihood))(
      dj.HMM(np.array([0.5, 0.5]), np.array([[0.9, 0.1], [0.2, 0.8]]), dj.Poisson(np.array([1., 5.]))),
      np.array([1.0, -3.0]), np.ones(2, bool))
  rows.append(("dj.checked under jit: negative Poisson count", "flagged",
               str(err.get())[:60], "negative" in str(err.get())))

  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "m.npz")
    dj.save_params(path, cat)
    data = open(path, "rb").read()
    refused = harmless = wrong = 0
    for i in range(len(data)):
      flipped = bytearray(data)
      flipped[i] ^= 0xFF
      with open(path, "wb") as f:
        f.write(bytes(flipped))
      try:
        loaded = dj.load_params(path)
      except ValueError:
        refused += 1
        continue
      except Exception:   # noqa: BLE001
        wrong += 1
        continue
      same = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(loaded),
                                                      jax.tree_util.tree_leaves(cat)))
      harmless += same
      wrong += not same
    rows.append((f"every single-byte flip of a {len(data):,}-byte parameter file",
                 "ValueError or the same parameters",
                 f"{refused} refused, {harmless} loaded identically, {wrong} other", wrong == 0))
  return rows


def run(config, output_dir: str | None = None) -> dict:
  del config
  # float64 for the references; the float32 probes cast explicitly.
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    rows = probes()
  finally:
    jax.config.update("jax_enable_x64", previous)
  table = ["| probe | expected | actual | ok |", "|---|---|---|---|"]
  verdict = {True: "yes", False: "**no**", "limit": "known limit (float32 range)"}
  table += [f"| {name} | {expected} | {actual} | {verdict[ok]} |"
            for name, expected, actual, ok in rows]
  text = "\n".join(table)
  print(text)
  result = {"probes": [dict(name=n, expected=e, actual=a, ok=o) for n, e, a, o in rows]}
  if output_dir:
    os.makedirs(output_dir, exist_ok=True)
    common.write_json(os.path.join(output_dir, "probes.json"), result)
    with open(os.path.join(output_dir, "probes.md"), "w") as f:
      f.write(text + "\n")
  failed = [r[0] for r in rows if r[3] is False]
  if failed:
    raise SystemExit(f"{len(failed)} probe(s) failed: {failed}")
  return result


if __name__ == "__main__":
  common.app_main("robustness_probes", run)
