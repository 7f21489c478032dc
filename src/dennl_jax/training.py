"""Losses, the jitted train step, :func:`train` and :func:`predict` for NNX models.

:func:`train` runs the step through :func:`dennl_jax.loop.fit`, the step driver
shared by every trained model (DENNL and the baselines).

The loop is functional: the module is split once into a static ``graphdef``
and a ``state`` pytree of parameters (``flax.nnx.split``), and the jitted
step is a plain function ``(state, opt_state, batch, key) -> (state,
opt_state, loss)`` that merges the module inside, so it composes with other
JAX code.  Optimisers come from optax (Adam with global-norm clipping by
default).  Losses:

* :func:`likelihood_loss` -- paper eq. 9 as a mean: the negative
  log-likelihood of every user's sequence under the model's parameters,
  summed over users and divided by the number of valid time steps.
* :func:`regression_loss` -- squared error between the network's
  pre-activation vector and a target one (EM Mapping).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Bool, Float, PRNGKeyArray, Real

from dennl_jax import loop
from dennl_jax.batch import Batch
from dennl_jax.chunking import chunked_map
from dennl_jax.loop import History  # noqa: F401 -- re-exported


def mean_negative_log_likelihood(params, obs: Real[Array, "num_users num_timesteps ..."],
                                 mask: Bool[Array, "num_users num_timesteps"]) -> Float[Array, ""]:
  """-sum_u log p(o_u | lambda_u) / (number of valid steps); params batched."""
  mask = jnp.asarray(mask, bool)
  lls = jax.vmap(lambda p, o, m: p.log_likelihood(o, m))(params, obs, mask)
  return -jnp.sum(lls) / jnp.maximum(jnp.sum(mask), 1)


def likelihood_loss(model, batch: Batch, key: PRNGKeyArray) -> Float[Array, ""]:
  """Paper eq. 9 per valid time step, for any model ``(e, obs, mask, key) -> params``."""
  params = model(batch.embedding, batch.obs, batch.mask, key)
  return mean_negative_log_likelihood(params, batch.obs, batch.mask)


def floor_probabilities(params):
  """Batched params with every probability floored at ``families.PROB_FLOOR``.

  The round trip through the output heads' pre-activations
  (``from_preactivation(to_preactivation(p))``), so it works for any
  family, keeps an HSMM's zero transition diagonal and has finite gradients
  at exact zeros.  Plain EM outputs exact zeros (a transition or duration the
  visible steps never showed); a held-out step that needs one would score
  log 0 = -inf.
  """
  return jax.vmap(lambda p: type(p).from_preactivation(p.to_preactivation()))(params)


def heldout_nll(params, obs: Real[Array, "num_users num_timesteps ..."],
                mask: Bool[Array, "num_users num_timesteps"],
                visible: Bool[Array, "num_users num_timesteps"], *,
                floor: bool = True) -> Float[Array, ""]:
  """-sum_u [log p(o_u | lambda_u) - log p(o_u[visible] | lambda_u)] / #held.

  params: batched (leading U), fitted on the ``visible`` steps; obs: (U, T, ...);
  mask, visible: (U, T) bool with ``visible`` within ``mask``.  ``floor``
  applies :func:`floor_probabilities` first (without it one impossible
  held-out step makes the loss -(-inf - -inf) = NaN).
  """
  mask = jnp.asarray(mask, bool)
  visible = jnp.asarray(visible, bool) & mask
  if floor:
    params = floor_probabilities(params)
  ll = jax.vmap(lambda p, o, m: p.log_likelihood(o, m))
  gain = ll(params, obs, mask) - ll(params, obs, visible)
  return -jnp.sum(gain) / jnp.maximum(jnp.sum(mask & ~visible), 1)


def heldout_split(mask: Bool[Array, "num_users num_timesteps"], key: PRNGKeyArray,
                  holdout: float = 0.2) -> Bool[Array, "num_users num_timesteps"]:
  """(U, T) visible steps: ``mask`` less a random ``holdout`` fraction of each
  user's valid steps (every user keeps at least one visible step).  The
  draw uses ``fold_in(key, 1)``."""
  mask = jnp.asarray(mask, bool)
  held = mask & (jax.random.uniform(jax.random.fold_in(key, 1), mask.shape) < holdout)
  visible = mask & ~held
  return jnp.where(jnp.any(visible, axis=1, keepdims=True), visible, mask)


def heldout_step_loss(model, batch: Batch, key: PRNGKeyArray, holdout: float = 0.2,
                      floor: bool = True) -> Float[Array, ""]:
  """NLL of randomly held-out steps given the rest (an anti-overfitting variant of eq. 9).

  A fraction ``holdout`` of each user's valid steps is hidden from the model
  (its EM layers see ``mask & ~held``); the loss is
  ``-(log p(o_all | lambda) - log p(o_visible | lambda)) / #held``, i.e. how
  well the parameters fitted to the visible steps score the hidden ones
  (:func:`heldout_nll`; ``floor`` floors probabilities at 1e-6 first so
  that plain EM's exact zeros give a finite loss).
  With the library's mask semantics (a masked step is removed from the
  sequence, it does not consume duration) this is a proxy for the exact
  conditional predictive likelihood, not equal to it.  Motivation: on short
  sequences the in-sample likelihood of eq. 9 rewards overfitting (EM at
  T = 50 reaches a log-likelihood far above that of the true parameters).
  """
  visible = heldout_split(batch.mask, key, holdout)
  params = model(batch.embedding, batch.obs, visible, key)
  return heldout_nll(params, batch.obs, batch.mask, visible, floor=floor)


def regression_loss(model, batch: Batch, key: PRNGKeyArray) -> Float[Array, ""]:
  """Mean squared error of the start network's pre-activations vs ``batch.target``."""
  del key
  pred = model.start.preactivation(batch.embedding)
  return jnp.mean((pred - batch.target) ** 2)


def make_optimizer(learning_rate: float = 1e-3, clip_norm: float = 1.0,
                   weight_decay: float = 0.0, *, b1: float = 0.9,
                   rate_in_state: bool = False) -> optax.GradientTransformation:
  """Adam (AdamW when weight_decay > 0) after global-norm gradient clipping.

  ``b1``: Adam's first-moment decay (0.99 averages about ten times as many
  gradients as 0.9; with SPSA's estimates the learning rate matters far
  more, docs/results.md, "SPSA").

  ``rate_in_state=True`` keeps the learning rate in the optimiser state
  (``optax.inject_hyperparams``) instead of baking it into the compiled
  step as a constant, so a learning-rate sweep compiles one program (the
  persistent compilation cache then serves every rate).
  """
  if not 0.0 <= b1 < 1.0:
    raise ValueError(f"b1 must be in [0, 1), got {b1}")
  if rate_in_state:
    base = optax.inject_hyperparams(optax.adamw if weight_decay > 0 else optax.adam)
    opt = (base(learning_rate=learning_rate, b1=b1, weight_decay=weight_decay)
           if weight_decay > 0 else base(learning_rate=learning_rate, b1=b1))
  else:
    opt = (optax.adamw(learning_rate, b1=b1, weight_decay=weight_decay) if weight_decay > 0
           else optax.adam(learning_rate, b1=b1))
  return optax.chain(optax.clip_by_global_norm(clip_norm), opt)


def make_train_step(graphdef, loss_fn: Callable, optimizer: optax.GradientTransformation):
  """The jitted step ``(state, opt_state, batch, key) -> (state, opt_state, loss, skipped)``.

  graphdef: from ``nnx.split(model)``; loss_fn(model, batch, key) -> scalar.
  A non-finite loss or gradient leaves state and optimiser untouched (the
  returned ``skipped`` flag says so), so one bad minibatch cannot poison the
  weights.  :func:`train` counts and reports skipped steps: a run where every
  step is skipped has not trained at all.
  """

  def step(state, opt_state, batch, key):
    def objective(s):
      return loss_fn(nnx.merge(graphdef, s), batch, key)

    loss, grads = jax.value_and_grad(objective)(state)
    updates, new_opt_state = optimizer.update(grads, opt_state, state)
    new_state = optax.apply_updates(state, updates)
    finite = jnp.isfinite(loss) & jnp.all(jnp.asarray(
        [jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
    return keep(new_state, state), keep(new_opt_state, opt_state), loss, ~finite

  return jax.jit(step)


def make_eval_fn(graphdef, loss_fn: Callable):
  """Jitted ``(state, batch, key) -> loss`` without gradients."""
  return jax.jit(lambda state, batch, key: loss_fn(nnx.merge(graphdef, state), batch, key))


def _take(data: Batch, index) -> Batch:
  return Batch(*(None if x is None else x[index] for x in data))


class TrainResult(NamedTuple):
  """What :func:`train` returns.

  model: the trained model (the best-scoring one with early stopping);
  history: the per-step losses (:class:`dennl_jax.loop.History`);
  fit: the training loop's whole result (:class:`dennl_jax.loop.FitResult`:
  validation curve, best step and value, skipped updates, seconds).
  """
  model: nnx.Module
  history: loop.History
  fit: loop.FitResult


def train(model: nnx.Module, data: Batch, *, loss_fn: Callable = likelihood_loss,
          optimizer: Optional[optax.GradientTransformation] = None, num_steps: int = 200,
          batch_size: int = 32, key: PRNGKeyArray, log_every: int = 25,
          log: Callable[[str], None] = print,
          name: str = "model", workdir: Optional[str] = None, progress: bool = False,
          save_every: int = 0, keep: int = 3, mesh=None,
          eval_fn: Optional[Callable[[nnx.Module], float]] = None, eval_every: int = 0,
          mode: str = "min", patience: int = 0, min_delta: float = 0.0) -> "TrainResult":
  """Minibatch training of ``model`` on users ``data`` (leading axis U).

  Each step draws ``batch_size`` users without replacement (a fresh
  permutation every epoch, :func:`dennl_jax.loop.epoch_batches`).  Returns a
  :class:`TrainResult` ``(model, history, fit)``; the model passed in is not
  modified.
  Progress lines ``name step loss elapsed`` every ``log_every`` steps.

  Early stopping: with ``eval_fn(model) -> float`` (e.g. a validation loss,
  ``mode="min"``, or accuracy, ``mode="max"``), the model is scored at the
  start and every ``eval_every`` steps (0: after the last step only), and the
  best-scoring model is returned instead of the last one (the validation
  curve, best step and value are in ``fit``).  ``patience`` > 0 also stops
  the run once that many updates pass without an improvement larger than
  ``min_delta`` (:class:`dennl_jax.loop.Validation`), so ``num_steps`` is a
  budget; ``fit.stopped_early`` says whether it was cut short.
  ``workdir``, ``progress``, ``save_every``, ``keep``, ``mesh``: checkpoints
  and resume, metrics, progress bar and data parallelism of
  :func:`dennl_jax.loop.fit` (the workdir's config records the loss, batch
  size, key, model class and a digest of ``data``; the optimiser is not
  recorded, so resume with the same one).
  """
  if num_steps < 1 or batch_size < 1:
    raise ValueError(f"num_steps and batch_size must be positive, got {num_steps}, {batch_size}")
  # Checked here too: the loop's option groups are built only when used (with
  # eval_fn, with a workdir), and a bad value is an error either way.
  if eval_every < 0 or save_every < 0 or keep < 1:
    raise ValueError(f"eval_every, save_every must be >= 0 and keep >= 1; got {eval_every}, "
                     f"{save_every}, {keep}")
  if mode not in ("max", "min"):
    raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
  num_users = data.mask.shape[0]
  optimizer = optimizer or make_optimizer()
  graphdef, state = nnx.split(model)
  step_fn = make_train_step(graphdef, loss_fn, optimizer)
  key_perm, key_steps = jax.random.split(key)
  indices = loop.epoch_batches(key_perm, num_users, batch_size)
  config = None
  if workdir:
    from dennl_jax.checkpoint import fingerprint
    config = dict(trainer="dennl_jax.training.train", name=name, model=type(model).__name__,
                  loss=getattr(loss_fn, "__name__", repr(loss_fn)), batch_size=batch_size,
                  key=fingerprint(key), data=fingerprint(tuple(data)))
    if eval_fn is not None:   # absent otherwise, so earlier workdirs still resume
      config["early_stopping"] = dict(every=eval_every, mode=mode)
      if patience:
        config["early_stopping"].update(patience=patience, min_delta=min_delta)
  state_eval = None if eval_fn is None else (lambda st: eval_fn(nnx.merge(graphdef, st)))
  result = loop.fit(
      step_fn, state, optimizer.init(state), num_steps=num_steps,
      batch_at=lambda i: _take(data, indices(i)), key=key_steps,
      validation=None if eval_fn is None else loop.Validation(
          state_eval, every=eval_every, at_start=True, mode=mode, patience=patience,
          min_delta=min_delta),
      checkpointing=(loop.Checkpointing(workdir, config=config, every=save_every, keep=keep)
                     if workdir else None),
      reporting=loop.Reporting(name=name, log=log, log_every=log_every, progress=progress),
      mesh=mesh)
  trained = nnx.merge(graphdef, result.best_state if eval_fn is not None else result.state)
  return TrainResult(trained, result.history, result)


def predict(model: nnx.Module, data: Batch, key: PRNGKeyArray, *, chunk_size: int = 256):
  """The model's batched parameters for all users (leading axis U).

  Users go through in chunks of ``chunk_size`` (the last one padded, so one
  compilation serves every chunk); chunk j is called with key
  ``fold_in(key, j)``.
  """
  graphdef, state = nnx.split(model)
  return chunked_map(partial(_predict_chunk, graphdef, state, key),
                     (data.embedding, data.obs, data.mask), chunk_size)


# Module level with the graph definition static: every call on a model of the
# same structure reuses one compiled program (validation during training
# calls predict at every evaluation).
@partial(jax.jit, static_argnums=0)
def _predict_chunk(graphdef, state, key, chunk, index):
  embedding, obs, mask = chunk
  return nnx.merge(graphdef, state)(embedding, obs, mask, jax.random.fold_in(key, index))
