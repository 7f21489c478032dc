"""The users-minor batched kernels (dennl_jax._kernel_hmm) against the per-sequence path.

``jax.vmap`` of the public functions dispatches to the batched kernels; the
reference is the same function called on one user at a time (no vmap, so the
per-sequence recursion runs).  Values and gradients must agree to float64
round-off for every emission family, on ragged padded batches with garbage
in the padding, and in every autodiff composition users write.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dennl_jax as dj
from dennl_jax import _kernel_hmm
from helpers import (DURATIONS, FAMILIES, pad_sequence, random_emission, random_hmm, random_obs,
                     stack_trees, tree_allclose)

pytestmark = pytest.mark.x64

NUM_USERS, NUM_STATES, PADDED_LEN = 4, 2, 9
HSMM_STATES, MAX_DURATION = 3, 5  # no per-sequence array has the batched carry's shape
TOL = dict(rtol=1e-10, atol=1e-12)


def random_hsmm(family, rng, duration, num_states=HSMM_STATES, max_duration=MAX_DURATION):
  """A random HSMM (zero-diagonal transition) with numpy float64 leaves."""
  off = rng.dirichlet(np.ones(num_states - 1), num_states)
  transition = np.stack([np.insert(off[k], k, 0.0) for k in range(num_states)])
  return dj.HSMM(rng.dirichlet(np.ones(num_states)), transition,
                 DURATIONS[duration].make(rng, num_states, max_duration),
                 random_emission(family, rng, num_states))


def ragged_batch(family, seed, lengths=(6, 1, 4, 7), duration=None):
  """Per-user HMMs (HSMMs with ``duration`` a duration family name) and padded sequences
  of different lengths (garbage in the padding, leading, in between and trailing)."""
  rng = np.random.default_rng([seed, FAMILIES.index(family)])
  hmms, obs, masks = [], [], []
  for length in lengths:
    hmms.append(random_hmm(family, rng, NUM_STATES) if duration is None
                else random_hsmm(family, rng, duration))
    padded, mask, _ = pad_sequence(random_obs(family, rng, length), rng, PADDED_LEN, family)
    obs.append(padded)
    masks.append(mask)
  # The kernels on every backend, for values and the score VJP's JVP alike.
  return stack_trees(hmms).replace(kernels="users_minor"), np.stack(obs), np.stack(masks)


def user(tree, u):
  return jax.tree_util.tree_map(lambda x: x[u], tree)


def em_loss(params, obs, mask):
  """A scalar of the posterior (what the kernels compute), and the EM step's outputs.

  The gradient covers the kernels and each family's likelihood; the M-step
  after them is the same vmapped code on both paths (its gradient through
  the EM layer is tested below).
  """
  post = dj.posterior(params, obs, mask)
  weights = jnp.cos(jnp.arange(post.smoothed_probs.size)).reshape(post.smoothed_probs.shape)
  counts = post[3:]  # transition, initial (and for HSMMs duration) counts
  value = (post.log_likelihood + jnp.sum(weights * post.smoothed_probs)
           + jnp.sum(post.filtered_probs ** 2) + sum(jnp.sum(jnp.sin(c)) for c in counts))
  return value, dj.em_step_with_log_likelihood(params, obs, mask)


per_user_value_and_grad = jax.jit(jax.value_and_grad(em_loss, has_aux=True))


@jax.jit
def batched_value_and_grad(params, obs, mask):
  def total(p):
    values, aux = jax.vmap(em_loss)(p, obs, mask)
    return jnp.sum(values), aux
  return jax.value_and_grad(total, has_aux=True)(params)


def per_user(fn, *batch):
  return stack_trees([fn(*(user(x, u) for x in batch)) for u in range(NUM_USERS)])


@pytest.mark.parametrize("duration", [None, "poisson"])
def test_vmap_takes_the_users_minor_kernels(duration):
  hmms, obs, mask = ragged_batch("categorical", 0, duration=duration)
  # HMM carry (K, U); HSMM carry (D, K, U).
  carry = (f"f64[{NUM_STATES},{NUM_USERS}]" if duration is None
           else f"f64[{MAX_DURATION},{HSMM_STATES},{NUM_USERS}]")
  jaxpr = str(jax.make_jaxpr(jax.vmap(dj.posterior))(hmms, obs, mask))
  assert carry in jaxpr
  # The HSMM smoother keeps no joint per step: nothing of shape (T, D, K, U).
  assert f"f64[{PADDED_LEN},{MAX_DURATION},{HSMM_STATES},{NUM_USERS}]" not in jaxpr
  per_sequence = hmms.replace(kernels="per_sequence")
  assert carry not in str(jax.make_jaxpr(jax.vmap(dj.posterior))(per_sequence, obs, mask))


# HMMs with every emission family and one HSMM: the HSMM kernel sees only
# log-likelihoods and duration log-probabilities, so its derivative does not
# depend on either family (all of them: test_hsmm_every_emission_family).
MODELS = [(family, None) for family in FAMILIES] + [("categorical", "poisson")]


@pytest.mark.parametrize("family,duration", MODELS)
def test_em_step_and_gradient_equal_per_sequence(family, duration):
  hmms, obs, mask = ragged_batch(family, 1, duration=duration)
  (value, aux), grad = batched_value_and_grad(hmms, obs, mask)
  (values, ref_aux), ref_grad = per_user(per_user_value_and_grad, hmms, obs, mask)
  np.testing.assert_allclose(value, np.sum(values), **TOL)
  tree_allclose(aux, ref_aux, **TOL)
  tree_allclose(grad, ref_grad, **TOL)


def test_hsmm_every_emission_family():
  """HSMM EM steps (every posterior count, through each family's M-step) of every
  emission family, the duration families taking turns; one program for all families
  (compiles dominate)."""
  batches = [ragged_batch(family, 2, duration=list(DURATIONS)[i % len(DURATIONS)])
             for i, family in enumerate(FAMILIES)]
  all_families = lambda fn: jax.jit(lambda batches: [fn(*batch) for batch in batches])
  em_step = dj.em_step_with_log_likelihood
  reference = per_user(all_families(em_step), batches)
  tree_allclose(all_families(jax.vmap(em_step))(batches), reference, **TOL)


@pytest.mark.parametrize("duration", [None, "categorical"])
def test_one_step_sequences_and_forecast(duration):
  def summaries(p, o, m):
    return dj.posterior(p, o, m), dj.filtered_posteriors(p, o, m), dj.forecast(p, o, m, 2)

  rng = np.random.default_rng(3)
  hmms = stack_trees([random_hmm("poisson", rng, NUM_STATES) if duration is None
                      else random_hsmm("poisson", rng, duration) for _ in range(NUM_USERS)])
  obs = np.stack([random_obs("poisson", rng, 1) for _ in range(NUM_USERS)])
  mask = np.ones((NUM_USERS, 1), bool)
  tree_allclose(jax.jit(jax.vmap(summaries))(hmms, obs, mask),
                per_user(jax.jit(summaries), hmms, obs, mask), **TOL)


def test_gradient_compositions():
  """grad(vmap), vmap(grad), jvp(vmap), vmap(jvp) and jacfwd agree with per-user grad."""
  hmms, obs, mask = ragged_batch("categorical", 4)
  loss = lambda p, o, m: em_loss(p, o, m)[0]
  # Same shapes as the family test: its compiled per-user gradient is reused.
  reference = per_user(lambda *a: per_user_value_and_grad(*a)[1], hmms, obs, mask)
  tree_allclose(jax.jit(jax.vmap(jax.grad(loss)))(hmms, obs, mask), reference, **TOL)
  tangent = jax.tree_util.tree_map(lambda x: jnp.cos(jnp.arange(x.size)).reshape(x.shape), hmms)
  expected = [sum(jnp.vdot(g, t) for g, t in zip(jax.tree_util.tree_leaves(user(reference, u)),
                                                jax.tree_util.tree_leaves(user(tangent, u))))
              for u in range(NUM_USERS)]
  outer = jax.jit(lambda p, t: jax.jvp(lambda q: jax.vmap(loss)(q, obs, mask), (p,), (t,))[1])
  inner = jax.jit(jax.vmap(lambda p, t, o, m: jax.jvp(lambda q: loss(q, o, m), (p,), (t,))[1]))
  np.testing.assert_allclose(outer(hmms, tangent), expected, **TOL)
  np.testing.assert_allclose(inner(hmms, tangent, obs, mask), expected, **TOL)
  # jacfwd batches tangents of unbatched primals (the primal output stays unbatched).
  jac = jax.jit(jax.jacfwd(loss))(user(hmms, 0), obs[0], mask[0])
  tree_allclose(jac, user(reference, 0), **TOL)


@pytest.mark.slow
def test_hsmm_float32_long_sequences_keep_per_sequence_accuracy():
  """The HSMM kernel's smoothed marginals come from segment starts and ends
  (differences, not products): in float32 over T = 1000 they stay non-negative
  and as close to float64 as the per-sequence path's."""
  rng = np.random.default_rng(5)
  num_users, num_steps = 6, 1000
  hsmms = stack_trees([random_hsmm("categorical", rng, "poisson", num_states=4, max_duration=10)
                       for _ in range(num_users)])
  keys = jax.random.split(jax.random.PRNGKey(5), num_users)
  _, obs = jax.vmap(lambda key, model: dj.sample(key, model, num_steps))(keys, hsmms)
  mask = np.ones((num_users, num_steps), bool)
  mask[0, 700:] = False
  mask[1, :40] = False
  mask[2, 300:350] = False
  reference = jax.vmap(dj.posterior)(hsmms, obs, mask).smoothed_probs
  single = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), hsmms)
  batched = jax.vmap(dj.posterior)(single, obs, mask).smoothed_probs
  per_sequence = jax.vmap(dj.posterior)(single.replace(kernels="per_sequence"), obs,
                                        mask).smoothed_probs
  assert batched.dtype == jnp.float32
  assert float(jnp.min(batched)) >= 0.0
  error = float(jnp.max(jnp.abs(batched - reference)))
  assert error <= max(3 * float(jnp.max(jnp.abs(per_sequence - reference))), 1e-5), error


def test_hsmm_vmap_of_grad():
  """vmap(grad) of an HSMM: per-sequence derivatives of the batched values (grad(vmap)
  is the family test's batched_value_and_grad)."""
  hsmms, obs, mask = ragged_batch("categorical", 1, duration="poisson")
  loss = lambda p, o, m: em_loss(p, o, m)[0]
  # The family test's batch: its compiled per-user gradient is reused.
  reference = per_user(lambda *a: per_user_value_and_grad(*a)[1], hsmms, obs, mask)
  tree_allclose(jax.jit(jax.vmap(jax.grad(loss)))(hsmms, obs, mask), reference, **TOL)


@pytest.mark.parametrize("gradient", dj.GRADIENT_MODES)
def test_em_layer_gradients(gradient):
  """The three EM-layer modes: vmapped over users (as the networks do) equals per user."""
  hmms, obs, mask = ragged_batch("categorical", 5)
  keys = jax.random.split(jax.random.key(0), NUM_USERS)
  layer = functools.partial(dj.em_layer, gradient=gradient, num_samples=2)

  def layer_loss(p, o, m, k):
    return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(layer(p, o, m, k)))

  batched = jax.jit(jax.grad(lambda p: jnp.sum(jax.vmap(layer_loss)(p, obs, mask, keys))))(hmms)
  reference = per_user(jax.jit(jax.grad(layer_loss)), hmms, obs, mask, keys)
  # SPSA divides finite differences by the step: round-off is amplified by 1 / step.
  tol = dict(rtol=1e-7, atol=1e-9) if gradient == "spsa" else TOL
  tree_allclose(batched, reference, **tol)


@pytest.mark.parametrize("duration", [None, "poisson"])
def test_fit_em_equals_per_user(duration):
  hmms, obs, mask = ragged_batch("multinomial", 6, duration=duration)
  fitted, trace = dj.fit_em(hmms, obs, mask, num_iters=2)
  # fit_em is one jitted vmap: the reference is the same call with the kernels switched off.
  ref, ref_trace = dj.fit_em(hmms.replace(kernels="per_sequence"), obs, mask, num_iters=2)
  tree_allclose(fitted, ref.replace(kernels="users_minor"), **TOL)
  np.testing.assert_allclose(trace, ref_trace, **TOL)


@pytest.mark.parametrize("duration", [None, pytest.param("poisson", marks=pytest.mark.slow)])
def test_user_blocks_equal_per_user(duration):
  """Blocks of users under vmap (``USERS_PER_BLOCK``; 3 here, so 7 users run as 3 blocks
  of 3 with 2 padding copies; HSMMs opt out): EM steps, posteriors, their gradient and
  fit_em equal per-user calls."""
  lengths = (6, 1, 4, 7, 2, 5, 3)
  hmms, obs, mask = ragged_batch("categorical", 7, lengths=lengths, duration=duration)
  users = len(lengths)
  loss = lambda p, o, m: em_loss(p, o, m)[0]

  def batched(p, o, m):
    value, grad = jax.value_and_grad(lambda q: jnp.sum(jax.vmap(loss)(q, o, m)))(p)
    return (value, grad, jax.vmap(dj.em_step_with_log_likelihood)(p, o, m),
            jax.vmap(dj.posterior)(p, o, m))

  def one(p, o, m):
    value, grad = jax.value_and_grad(loss)(p, o, m)
    return value, grad, dj.em_step_with_log_likelihood(p, o, m), dj.posterior(p, o, m)

  # HMMs run in blocks; HSMMs in one batch (ChainModel.em_step_in_user_blocks).
  hmms = hmms.replace(users_per_block=3)
  carry = (f"f64[{NUM_STATES},3]" if duration is None
           else f"f64[{MAX_DURATION},{HSMM_STATES},{users}]")
  assert carry in str(jax.make_jaxpr(jax.vmap(dj.em_step))(hmms, obs, mask))
  value, grad, steps, posts = jax.jit(batched)(hmms, obs, mask)
  fitted, trace = dj.fit_em(hmms, obs, mask, num_iters=2)
  values, ref_grad, ref_steps, ref_posts = stack_trees(
      [jax.jit(one)(*(user(x, u) for x in (hmms, obs, mask))) for u in range(users)])
  np.testing.assert_allclose(value, np.sum(values), **TOL)
  tree_allclose(grad, ref_grad, **TOL)
  tree_allclose(steps, ref_steps, **TOL)
  tree_allclose(posts, ref_posts, **TOL)
  ref_fitted = [dj.fit_em(user_batch(hmms, u), obs[u:u + 1], mask[u:u + 1], num_iters=2)
                for u in range(users)]
  tree_allclose(fitted, jax.tree_util.tree_map(lambda *x: np.concatenate(x),
                                               *[f for f, _ in ref_fitted]), **TOL)
  np.testing.assert_allclose(trace, np.concatenate([t for _, t in ref_fitted]), **TOL)


def user_batch(tree, u):
  return jax.tree_util.tree_map(lambda x: x[u:u + 1], tree)


def test_users_per_block_is_checked():
  with pytest.raises(ValueError, match="users_per_block"):
    dj.Kernels("users_minor", users_per_block=-1)
  with pytest.raises(ValueError, match="kernels must be one of"):
    dj.Kernels("fast")
  hmms, obs, mask = ragged_batch("categorical", 0)
  with pytest.raises(ValueError, match="users_per_block"):
    jax.vmap(dj.em_step)(hmms.replace(users_per_block=-1), obs, mask)
