"""The score functions and their symmetric VJP (dennl_jax._score) against JAX's autodiff.

``hmm_score`` / ``hsmm_score`` must be the exact gradient of the
log-likelihood (checked against ``jax.grad`` of the filter's
log-likelihood), and reverse mode through ``em_step(..., score_vjp=True)``
must equal reverse-mode autodiff through the plain ``em_step``: per user, and
vmapped (``grad(vmap)``, ``vmap(grad)``, batched kernels on and off), on
ragged batches with garbage in the padding, for every emission family and
every duration family, with the log-likelihood output in the loss too.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dennl_jax as dj
from dennl_jax import _kernel_hmm
from dennl_jax.hmm import hmm_filter, hmm_score
from dennl_jax.hsmm import hsmm_filter, hsmm_score
import test_kernels
from helpers import DURATIONS, FAMILIES, stack_trees, tree_allclose
from test_kernels import user

pytestmark = pytest.mark.x64

# The ragged batches of the kernel tests: T = 1, odd, even and heavily padded in 9 steps.
LENGTHS = (6, 1, 7, 3)
TOL = dict(rtol=1e-9, atol=1e-11)


def ragged_batch(family, seed, duration=None):
  return test_kernels.ragged_batch(family, seed, lengths=LENGTHS, duration=duration)


def em_loss(params, obs, mask, score_vjp):
  """A scalar of every output of one EM step, the log-likelihood included."""
  new, log_likelihood = params.em_step(obs, jnp.asarray(mask), score_vjp=score_vjp)
  leaves = jax.tree_util.tree_leaves(new)
  return 0.3 * log_likelihood + sum(jnp.sum(jnp.sin(1.0 + 0.7 * leaf)) for leaf in leaves)


def _grads_by_route(params, obs, mask, score_vjp):
  per_user_grad = jax.jit(jax.grad(functools.partial(em_loss, score_vjp=score_vjp)))
  return stack_trees([per_user_grad(user(params, u), obs[u], mask[u])
                      for u in range(len(LENGTHS))])


MODELS = ([(family, None) for family in FAMILIES]
          + [("gaussian", duration) for duration in DURATIONS]
          + [(family, "poisson") for family in FAMILIES if family != "gaussian"])


# The Poisson-duration HSMMs and the Categorical-duration Gaussian are the full suite's.
_SLOW_MODELS = {("gaussian", "poisson"), ("multinomial", "poisson"), ("diag_gaussian", "poisson"),
                ("poisson", "poisson"), ("gaussian", "categorical")}


@pytest.mark.parametrize("family,duration", [
    pytest.param(*m, marks=pytest.mark.slow) if m in _SLOW_MODELS else m for m in MODELS])
def test_score_vjp_equals_autodiff(family, duration):
  params, obs, mask = ragged_batch(family, 0, duration)
  reference = _grads_by_route(params, obs, mask, score_vjp=False)
  tree_allclose(_grads_by_route(params, obs, mask, score_vjp=True), reference, **TOL)

  def total(p, score_vjp):
    return jnp.sum(jax.vmap(functools.partial(em_loss, score_vjp=score_vjp))(p, obs, mask))

  tree_allclose(jax.jit(jax.grad(total), static_argnums=1)(params, True), reference, **TOL)
  vmap_of_grad = jax.vmap(jax.grad(functools.partial(em_loss, score_vjp=True)))
  tree_allclose(jax.jit(vmap_of_grad)(params, obs, mask), reference, **TOL)


@pytest.mark.parametrize("duration", [None, "poisson"])
def test_score_vjp_with_batched_derivatives(duration):
  """The backward pass's JVP through the users-minor kernels (``kernels="users_minor"``)
  and through plain vmap (``"per_sequence"``) equals autodiff too."""
  params, obs, mask = ragged_batch("categorical", 1, duration)
  reference = _grads_by_route(params, obs, mask, score_vjp=False)

  def total(p):
    return jnp.sum(jax.vmap(functools.partial(em_loss, score_vjp=True))(p, obs, mask))

  for kernels in ("users_minor", "per_sequence"):
    tree_allclose(jax.jit(jax.grad(total))(params.replace(kernels=kernels)),
                  reference.replace(kernels=kernels), **TOL)


@pytest.mark.parametrize("duration", [None, "poisson"])
def test_score_is_the_gradient_of_the_log_likelihood(duration):
  params, obs, mask = ragged_batch("gaussian", 2, duration)
  for u in range(len(LENGTHS)):
    p, o, m = user(params, u), obs[u], jnp.asarray(mask[u])
    log_likes = dj._chain.masked_log_likelihoods(p.emission, o, m)
    if duration is None:
      args, score, filt = (p.initial, p.transition, log_likes), hmm_score, hmm_filter
    else:
      args = (p.initial, p.transition, p.duration.log_probs(), log_likes)
      score, filt = hsmm_score, hsmm_filter
    ll, grads = jax.jit(score)(*args, m)
    ref_ll, ref_grads = jax.jit(jax.value_and_grad(
        lambda *a: filt(*a, m)[0], argnums=tuple(range(len(args)))))(*args)
    np.testing.assert_allclose(ll, ref_ll, **TOL)
    tree_allclose(grads, ref_grads, **TOL)
    # ... and the E-step's counts, from the smoother.
    post = dj.posterior(p, o, m)
    np.testing.assert_allclose(p.initial * grads[0], post.initial_probs, **TOL)
    np.testing.assert_allclose(p.transition * grads[1], post.transition_counts, **TOL)
    np.testing.assert_allclose(grads[-1], np.where(m[:, None], post.smoothed_probs, 0.0), **TOL)
    if duration is not None:
      np.testing.assert_allclose(grads[2], post.duration_counts, **TOL)


def test_exact_layer_uses_the_score_vjp():
  params, obs, mask = ragged_batch("categorical", 3, "poisson")
  p, o, m = user(params, 0), obs[0], mask[0]

  def layer_loss(q, gradient="exact"):
    return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(
        dj.em_layer(q, o, m, gradient=gradient)))

  assert "custom_vjp_call" in str(jax.make_jaxpr(layer_loss)(p))
  tree_allclose(jax.jit(jax.grad(layer_loss))(p),
                jax.jit(jax.grad(functools.partial(layer_loss, gradient="exact_autodiff")))(p),
                **TOL)
  # Forward mode is what the option gives up (JAX says so); exact_autodiff keeps it.
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(layer_loss, (p,), (p,))
  jax.jvp(functools.partial(layer_loss, gradient="exact_autodiff"), (p,), (p,))
  with pytest.raises(ValueError, match="time_parallel and score_vjp"):
    dj.em_step(user(ragged_batch("categorical", 3)[0], 0), o, m, time_parallel=True,
               score_vjp=True)


@pytest.mark.parametrize("duration", [None, "poisson"])
def test_log_likelihood_derivatives_through_the_score(duration):
  """log_likelihood's custom JVP (tangent <score, t>): grad, vmapped grad, jacfwd and the
  Hessian equal autodiff through the filter itself."""
  params, obs, mask = ragged_batch("gaussian", 4, duration)
  filt = hmm_filter if duration is None else hsmm_filter

  def with_mean(p, mean):
    return p.replace(emission=p.emission.replace(mean=mean))

  def by_score(mean, p, o, m):
    return with_mean(p, mean).log_likelihood(o, m)

  def by_filter(mean, p, o, m):
    q = with_mean(p, mean)
    log_likes = dj._chain.masked_log_likelihoods(q.emission, o, m)
    args = ((q.initial, q.transition) if duration is None
            else (q.initial, q.transition, q.duration.log_probs()))
    return filt(*args, log_likes, m)[0]

  means = params.emission.mean
  batched = jax.jit(jax.vmap(jax.grad(by_score)))(means, params, obs, mask)
  tree_allclose(batched, jax.jit(jax.vmap(jax.grad(by_filter)))(means, params, obs, mask), **TOL)
  total = lambda fn: lambda mean: jnp.sum(jax.vmap(fn)(mean, params, obs, mask))
  tree_allclose(jax.jit(jax.grad(total(by_score)))(means), batched, **TOL)
  p, o, m = user(params, 0), obs[0], mask[0]
  np.testing.assert_allclose(jax.jit(jax.jacfwd(by_score))(means[0], p, o, m), batched[0], **TOL)
  np.testing.assert_allclose(jax.jit(jax.hessian(by_score))(means[0], p, o, m),
                             jax.jit(jax.hessian(by_filter))(means[0], p, o, m), **TOL)
