"""The JAX transformations that compose with ``em_step``, ``em_layer`` and the
inference functions (docs/compositions.md), for HMMs and HSMMs, with the
users-minor kernels and without: each against a reference computed another way.

* ``vmap``, ``grad(vmap)``, ``vmap(grad)``, ``jvp``, ``jacfwd``, ``checkpoint``,
  ``pmap`` (one device here), ``lax.map``: equal to per-user calls.
* ``shard_map`` with its default checks, on 2 forced host devices in a subprocess:
  equal to ``vmap``.
* ``checkify`` (``dj.checked``) under ``jit`` and ``vmap``: names domain errors.
* forward mode through a custom-VJP mode fails with a message naming the mode
  that supports it; ``em_layer`` gives ``obs`` no gradient in any mode.
"""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dennl_jax as dj

NUM_USERS, NUM_STEPS, NUM_STATES, NUM_SYMBOLS, MAX_DURATION = 3, 7, 3, 4, 4
KERNELS = ("users_minor", "per_sequence")


pytestmark = pytest.mark.x64


def make_batch(kind: str, kernels: str, seed: int = 0, dtype=np.float64):
  """U per-user models (HMM or HSMM, Categorical emissions), ragged masks with a
  gap in the middle of one sequence, and garbage on the masked steps."""
  rng = np.random.default_rng(seed)
  initial = rng.dirichlet(np.ones(NUM_STATES), NUM_USERS)
  transition = rng.dirichlet(np.ones(NUM_STATES), (NUM_USERS, NUM_STATES))
  emission = dj.Categorical(rng.dirichlet(np.ones(NUM_SYMBOLS), (NUM_USERS, NUM_STATES)))
  if kind == "hmm":
    model = dj.HMM(initial, transition, emission, kernels=kernels)
  else:
    transition = transition * (1 - np.eye(NUM_STATES))
    transition /= transition.sum(-1, keepdims=True)
    rate = rng.uniform(0.5, 3.0, (NUM_USERS, NUM_STATES))
    model = dj.HSMM(initial, transition, dj.PoissonDuration(rate, max_duration=MAX_DURATION),
                    emission, kernels=kernels)
  model = jax.tree_util.tree_map(lambda x: np.asarray(x, dtype), model)
  obs = rng.integers(0, NUM_SYMBOLS, (NUM_USERS, NUM_STEPS))
  mask = np.ones((NUM_USERS, NUM_STEPS), bool)
  mask[1, 4:] = False
  mask[2, 2] = False
  obs[1, 4:] = 99    # garbage on masked steps
  return model, obs, mask


def user(tree, u):
  return jax.tree_util.tree_map(lambda x: x[u], tree)


def per_user(fn, *batch):
  outs = [fn(*(user(x, u) for x in batch)) for u in range(NUM_USERS)]
  return jax.tree_util.tree_map(lambda *x: jnp.stack(x), *outs)


def assert_trees_close(a, b, rtol=1e-9, atol=1e-10):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def em_loss(params, obs, mask):
  new = dj.em_step(params, obs, mask)
  return jnp.sum(new.transition ** 2) + jnp.sum(new.emission.probs ** 2)


# The fast tier runs the HMM; the full suite the HSMM too.
KINDS = ["hmm", pytest.param("hsmm", marks=pytest.mark.slow)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kernels", KERNELS)
def test_vmap_and_gradients_equal_per_user(kind, kernels):
  params, obs, mask = make_batch(kind, kernels)
  assert_trees_close(jax.jit(jax.vmap(dj.em_step))(params, obs, mask),
                     per_user(dj.em_step, params, obs, mask))
  assert_trees_close(jax.lax.map(lambda a: dj.em_step(*a), (params, obs, mask)),
                     per_user(dj.em_step, params, obs, mask))
  reference = per_user(jax.grad(em_loss), params, obs, mask)
  grad_of_vmap = jax.jit(jax.grad(lambda p: jnp.sum(jax.vmap(em_loss)(p, obs, mask))))(params)
  vmap_of_grad = jax.jit(jax.vmap(jax.grad(em_loss)))(params, obs, mask)
  checkpointed = jax.jit(jax.grad(lambda p: jnp.sum(jax.vmap(jax.checkpoint(em_loss))(
      p, obs, mask))))(params)
  for grads in (grad_of_vmap, vmap_of_grad, checkpointed):
    assert_trees_close(grads, reference)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kernels", KERNELS)
def test_forward_mode_equals_reverse_mode(kind, kernels):
  params, obs, mask = make_batch(kind, kernels)
  tangent = jax.tree_util.tree_map(lambda x: jnp.ones_like(x) * 0.01, params)
  total = lambda p: jnp.sum(jax.vmap(em_loss)(p, obs, mask))  # noqa: E731
  _, forward = jax.jit(lambda p, t: jax.jvp(total, (p,), (t,)))(params, tangent)
  reverse = jax.grad(total)(params)
  expected = sum(jnp.sum(g * t) for g, t in zip(jax.tree_util.tree_leaves(reverse),
                                                jax.tree_util.tree_leaves(tangent)))
  np.testing.assert_allclose(forward, expected, rtol=1e-9)
  # jacfwd of the log-likelihood in the transition matrix, against jacrev.
  ll = lambda t: jnp.sum(jax.vmap(dj.log_likelihood)(params.replace(transition=t), obs, mask))  # noqa: E731,E501
  np.testing.assert_allclose(jax.jacfwd(ll)(params.transition), jax.jacrev(ll)(params.transition),
                             rtol=1e-9, atol=1e-12)
  # vmap over tangent directions with unbatched primals (jacfwd of one user).
  one = user(params, 0)
  jac = jax.jacfwd(lambda t: dj.em_step(one.replace(transition=t), obs[0], mask[0]).transition)(
      one.transition)
  jac_rev = jax.jacrev(lambda t: dj.em_step(one.replace(transition=t), obs[0],
                                            mask[0]).transition)(one.transition)
  np.testing.assert_allclose(jac, jac_rev, rtol=1e-8, atol=1e-12)


def test_pmap_equals_vmap():
  params, obs, mask = make_batch("hmm", "auto")
  add_device = lambda x: x[None]  # noqa: E731
  out = jax.pmap(jax.vmap(dj.em_step))(*jax.tree_util.tree_map(add_device, (params, obs, mask)))
  assert_trees_close(jax.tree_util.tree_map(lambda x: x[0], out),
                     jax.vmap(dj.em_step)(params, obs, mask))


_SHARD_MAP_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import dennl_jax as dj
import test_compositions as tc
jax.config.update("jax_enable_x64", True)
mesh = jax.make_mesh((2,), ("users",))
key = jax.random.key(0)
fns = {
    "em_step": dj.em_step,
    "posterior": lambda p, o, m: dj.posterior(p, o, m).smoothed_probs,
    "viterbi": dj.viterbi,
    "grad_em": jax.grad(tc.em_loss),
    "grad_score_vjp": jax.grad(lambda p, o, m: jnp.sum(dj.em_step(
        p, o, m, score_vjp=True).transition ** 2)),
    "grad_layer_spsa": jax.grad(lambda p, o, m: jnp.sum(dj.em_layer(
        p, o, m, key, gradient="spsa").transition ** 2)),
}
for kind in ("hmm", "hsmm"):
  for kernels in tc.KERNELS:
    params, obs, mask = tc.make_batch(kind, kernels)
    # 4 users over 2 devices: users 0-2 and a copy of user 0.
    params, obs, mask = jax.tree_util.tree_map(
        lambda x: np.concatenate([x, x[:1]]), (params, obs, mask))
    placed = jax.device_put((params, obs, mask), NamedSharding(mesh, P("users")))
    for name, fn in fns.items():
      sharded = jax.jit(jax.shard_map(jax.vmap(fn), mesh=mesh, in_specs=P("users"),
                                      out_specs=P("users")))
      tc.assert_trees_close(sharded(*placed), jax.vmap(fn)(params, obs, mask), rtol=1e-7,
                            atol=1e-9)
      print("ok", kind, kernels, name, flush=True)
print("SHARD-MAP-OK")
"""


@pytest.mark.slow
def test_shard_map_with_default_checks_equals_vmap():
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(filter(None, [
      os.environ.get("XLA_FLAGS"), "--xla_force_host_platform_device_count=2"])))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
  proc = subprocess.run([sys.executable, "-c", _SHARD_MAP_SCRIPT], env=env, cwd=here,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0 and "SHARD-MAP-OK" in proc.stdout, (
      proc.stdout[-2000:] + proc.stderr[-4000:])


@pytest.mark.parametrize("kind", ["hmm", "hsmm"])
def test_checked_names_domain_errors_under_jit_and_vmap(kind):
  params, obs, mask = make_batch(kind, "auto")
  check = jax.jit(dj.checked(jax.vmap(dj.em_step)))
  err, _ = check(params, obs, mask)
  assert err.get() is None        # garbage on masked steps is not an error
  bad = obs.copy()
  bad[2, 5] = NUM_SYMBOLS + 5
  err, _ = check(params, bad, mask)
  assert "Categorical obs out of range" in err.get()
  err, _ = jax.jit(jax.vmap(dj.checked(dj.log_likelihood)))(params, bad, mask)
  assert "at mapped index 2" in err.get() and "out of range" in err.get()
  no_valid = mask.copy()
  no_valid[0] = False
  err, _ = check(params, obs, no_valid)
  assert "no valid step" in err.get()


def test_checked_flags_negative_poisson_counts():
  hmm = dj.HMM(np.array([0.5, 0.5]), np.array([[0.9, 0.1], [0.2, 0.8]]),
               dj.Poisson(np.array([1.0, 5.0])))
  err, ll = jax.jit(dj.checked(dj.log_likelihood))(hmm, np.array([1.0, -3.0, 2.0]),
                                                  np.ones(3, bool))
  assert "negative counts" in err.get()
  err, _ = jax.jit(dj.checked(dj.log_likelihood))(hmm, np.array([1.0, 0.5]), np.ones(2, bool))
  assert "whole numbers" in err.get()


@pytest.mark.parametrize("gradient", ["spsa", "forward", "exact"])
def test_forward_mode_through_a_custom_vjp_mode_names_the_alternative(gradient):
  params, obs, mask = make_batch("hmm", "auto")
  one, key = user(params, 0), jax.random.key(0)
  layer = lambda t: dj.em_layer(one.replace(transition=t), obs[0], mask[0], key,  # noqa: E731
                                gradient=gradient).transition
  with pytest.raises(TypeError, match='gradient="exact_autodiff"'):
    jax.jvp(layer, (one.transition,), (jnp.ones_like(one.transition),))
  with pytest.raises(TypeError, match="score_vjp=False"):
    jax.jacfwd(lambda t: dj.em_step(one.replace(transition=t), obs[0], mask[0],
                                    score_vjp=True).transition)(one.transition)
  # The mode named in the message does forward mode.
  jax.jvp(lambda t: dj.em_layer(one.replace(transition=t), obs[0], mask[0],
                                gradient="exact_autodiff").transition,
          (one.transition,), (jnp.ones_like(one.transition),))


@pytest.mark.parametrize("gradient", dj.GRADIENT_MODES)
def test_em_layer_gives_obs_no_gradient_in_any_mode(gradient):
  rng = np.random.default_rng(0)
  hmm = dj.HMM(np.array([0.6, 0.4]), np.array([[0.8, 0.2], [0.3, 0.7]]),
               dj.DiagGaussian(rng.normal(size=(2, 2)), np.ones((2, 2))))
  obs, mask = rng.normal(size=(5, 2)), np.ones(5, bool)
  grad = jax.grad(lambda o: jnp.sum(dj.em_layer(hmm, o, mask, jax.random.key(1),
                                                gradient=gradient).emission.mean))(obs)
  np.testing.assert_array_equal(grad, np.zeros_like(obs))


def test_a_masked_step_is_absent_not_missing():
  """``mask=False`` removes the step: the chain does not advance across it, so a
  gap in the middle gives the log-likelihood of the sequence without it."""
  params, obs, mask = make_batch("hmm", "auto")
  one = user(params, 0)
  gap = np.ones(NUM_STEPS, bool)
  gap[3] = False
  removed = np.delete(obs[0], 3)
  np.testing.assert_allclose(dj.log_likelihood(one, obs[0], gap),
                             dj.log_likelihood(one, removed, np.ones(NUM_STEPS - 1, bool)),
                             rtol=1e-12)


def test_an_all_zero_multinomial_step_is_a_missing_observation():
  """The documented way to model a missing observation: a valid step whose
  log-likelihood is 0 under every state; the chain advances across it."""
  rng = np.random.default_rng(3)
  initial, transition = rng.dirichlet(np.ones(3)), rng.dirichlet(np.ones(3), 3)
  probs = rng.dirichlet(np.ones(4), 3)
  hmm = dj.HMM(initial, transition, dj.Multinomial(probs))
  obs = rng.integers(0, 3, (5, 4)).astype(float)
  obs[2] = 0.0
  likes = np.exp(obs @ np.log(probs).T)     # (T, K); the zero step's row is all ones
  alpha = initial * likes[0]
  for t in range(1, len(obs)):
    alpha = (alpha @ transition) * likes[t]
  np.testing.assert_allclose(dj.log_likelihood(hmm, obs, np.ones(5, bool)),
                             np.log(alpha.sum()), rtol=1e-12)
