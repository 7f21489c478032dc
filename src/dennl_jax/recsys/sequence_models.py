"""Trained next-step models (Flax NNX + optax): GRU4Rec-, SASRec-style and an embedding softmax.

Every model maps a user's embedding ``(E,)`` and history ``(H, C)`` (last
``max_len`` history steps, left-aligned, padded) to logits ``(H + 1, C)``:
position j predicts the step that follows the first j history steps, and
position 0 predicts from the embedding alone — so these models also score
users with an empty history (``needs_history=False``).  They are trained on
the training steps of the training users with the soft cross-entropy between
the predicted distribution and the next step's strength vector, and the
prediction for a task is the softmax at position h (after all h steps).

* ``gru`` (GRU4Rec-style): input = linear projection of the strength vector;
  initial state = tanh(linear(embedding)); output layer reads the state and
  the embedding.
* ``sasrec`` (SASRec-style): a causal self-attention block over
  ``[embedding token, s_1, ..., s_H]`` with learned positions.
* ``graphsage_linear``: GraphSAGE + a softmax layer on the embedding (no
  history is read): the "logistic layer on the embedding" variant of the
  paper's GraphSAGE baseline.

Training length is chosen on the validation step: every ``eval_every``
steps the validation MRR is computed and the best state kept (early
stopping); with ``config["grid"]`` (a list of overrides) each setting is
trained and the best by validation MRR kept.  Training runs
:func:`dennl_jax.loop.fit` with the library's step
(:func:`dennl_jax.training.make_train_step`: Adam(W) after global-norm
clipping; a non-finite update is skipped and counted).
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dennl_jax import loop
from dennl_jax import training as Tr

from dennl_jax.recsys import metrics as rmetrics
from dennl_jax.recsys.baselines import popularity_vector
from dennl_jax.recsys.registry import Predictor, register
from dennl_jax.recsys.task import NextStepTask, history_features, last_steps

DEFAULTS = dict(hidden=32, learning_rate=3e-3, weight_decay=1e-4, num_steps=300, eval_every=50,
                batch_size=64, max_len=50, dropout=0.1, num_heads=2, select_by="mrr",
                log=None, workdir=None, progress=False)


class SeqBatch(NamedTuple):
  """embedding (B, E) float32; history (B, H, C) float32; mask (B, H) bool."""
  embedding: jax.Array
  history: jax.Array
  mask: jax.Array


class GRURec(nnx.Module):
  def __init__(self, num_categories, embed_dim, hidden, dropout, *, rngs):
    self.inp = nnx.Linear(num_categories, hidden, rngs=rngs)
    self.init = nnx.Linear(embed_dim, hidden, rngs=rngs)
    self.rnn = nnx.RNN(nnx.GRUCell(hidden, hidden, rngs=rngs), rngs=False)
    self.out = nnx.Linear(hidden + embed_dim, num_categories, rngs=rngs)
    self.dropout = dropout

  def __call__(self, embedding, history, key):
    """(B, E), (B, H, C), key -> (B, H + 1, C) logits."""
    x = self.inp(history)
    if self.dropout > 0 and key is not None:
      keep = jax.random.bernoulli(key, 1 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1 - self.dropout), 0.0)
    h0 = jnp.tanh(self.init(embedding))
    states = self.rnn(x, initial_carry=h0)                 # (B, H, hidden)
    states = jnp.concatenate([h0[:, None], states], axis=1)
    emb = jnp.broadcast_to(embedding[:, None], states.shape[:2] + embedding.shape[-1:])
    return self.out(jnp.concatenate([states, emb], axis=-1))


class SASRec(nnx.Module):
  def __init__(self, num_categories, embed_dim, hidden, dropout, num_heads, max_len, *, rngs):
    self.inp = nnx.Linear(num_categories, hidden, rngs=rngs)
    self.user = nnx.Linear(embed_dim, hidden, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len + 1, hidden)))
    self.attn = nnx.MultiHeadAttention(num_heads, hidden, decode=False, keep_rngs=False,
                                       rngs=rngs)
    self.norm1 = nnx.LayerNorm(hidden, rngs=rngs)
    self.ff = nnx.Linear(hidden, hidden, rngs=rngs)
    self.norm2 = nnx.LayerNorm(hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, num_categories, rngs=rngs)
    self.dropout = dropout

  def __call__(self, embedding, history, key):
    x = jnp.concatenate([self.user(embedding)[:, None], self.inp(history)], axis=1)
    x = x + self.pos[: x.shape[1]]
    if self.dropout > 0 and key is not None:
      keep = jax.random.bernoulli(key, 1 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1 - self.dropout), 0.0)
    # Causal: token j sees tokens <= j; padding sits after every valid token,
    # so it is never attended to by a position that is scored.
    causal = nnx.make_causal_mask(x[..., 0])
    x = self.norm1(x + self.attn(x, mask=causal, deterministic=True))
    x = self.norm2(x + nnx.relu(self.ff(x)))
    return self.out(x)


class EmbeddingSoftmax(nnx.Module):
  def __init__(self, num_categories, embed_dim, *, rngs):
    self.out = nnx.Linear(embed_dim, num_categories, rngs=rngs)

  def __call__(self, embedding, history, key):
    del key
    logits = self.out(embedding)[:, None]
    return jnp.broadcast_to(logits, (logits.shape[0], history.shape[1] + 1, logits.shape[2]))


def next_step_loss(model, batch: SeqBatch, key):
  """Soft cross-entropy of position j's prediction against history step j (valid steps only)."""
  logits = model(batch.embedding, batch.history, key)[:, :-1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.sum(batch.history * logp, axis=-1)
  w = batch.mask.astype(ce.dtype)
  return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


@functools.lru_cache(maxsize=None)
def _train_step(graphdef, learning_rate, weight_decay):
  """(optimizer, jitted step): one compiled step per architecture and optimiser settings."""
  optimizer = Tr.make_optimizer(learning_rate, weight_decay=weight_decay)
  return optimizer, Tr.make_train_step(graphdef, next_step_loss, optimizer)


@functools.partial(jax.jit, static_argnums=0)
def _probabilities(graphdef, state, embedding, history, lengths):
  logits = nnx.merge(graphdef, state)(embedding, history, None)
  at = jnp.take_along_axis(logits, lengths[:, None, None], axis=1)[:, 0]
  return jax.nn.softmax(at, axis=-1)


def _inputs(task: NextStepTask, max_len: int):
  """Fixed-width (max_len) padded history so every call hits one compiled shape."""
  feats, fmask = history_features(last_steps(task, max_len))
  u, w, c = feats.shape
  hist = np.zeros((u, max_len, c), np.float32)
  mask = np.zeros((u, max_len), bool)
  hist[:, :min(w, max_len)] = feats[:, :max_len]
  mask[:, :min(w, max_len)] = fmask[:, :max_len]
  return np.asarray(task.embeddings, np.float32), hist, mask


def _build(kind, c, e, cfg, key):
  rngs = nnx.Rngs(params=key)
  if kind == "gru":
    return GRURec(c, e, cfg["hidden"], cfg["dropout"], rngs=rngs)
  if kind == "sasrec":
    return SASRec(c, e, cfg["hidden"], cfg["dropout"], cfg["num_heads"], cfg["max_len"], rngs=rngs)
  if kind == "graphsage_linear":
    return EmbeddingSoftmax(c, e, rngs=rngs)
  raise ValueError(f"unknown sequence model {kind!r}")


def _predict_state(graphdef, state, task, max_len):
  emb, hist, mask = _inputs(task, max_len)
  probs = _probabilities(graphdef, state, jnp.asarray(emb), jnp.asarray(hist),
                         jnp.asarray(mask.sum(1)))
  return np.asarray(probs, np.float64)


def _train_one(key, kind, cfg, train_task, val_task, pop):
  c, e = train_task.strengths.shape[2], train_task.embeddings.shape[1]
  emb, hist, mask = _inputs(train_task, cfg["max_len"])
  rows = np.flatnonzero(np.asarray(train_task.train_users) & mask.any(1))
  if rows.size == 0:
    raise ValueError(f"{kind}: no training user has a training step")
  key_init, key_order, key_steps = jax.random.split(key, 3)
  model = _build(kind, c, e, cfg, key_init)
  graphdef, state = nnx.split(model)
  optimizer, step_fn = _train_step(graphdef, float(cfg["learning_rate"]),
                                   float(cfg["weight_decay"]))
  indices = loop.epoch_batches(key_order, rows.size, cfg["batch_size"])

  def batch_at(i):
    idx = rows[indices(i)]
    return SeqBatch(emb[idx], hist[idx], mask[idx])

  def validation(state):
    scores = _predict_state(graphdef, state, val_task, cfg["max_len"]) + 1e-9 * pop
    return float(np.mean(rmetrics.per_user_metrics(scores, val_task)[cfg["select_by"]]))

  setting = {k: v for k, v in cfg.items() if k not in ("log", "workdir", "progress", "num_steps")}
  workdir = None
  if cfg.get("workdir"):
    from dennl_jax.checkpoint import fingerprint
    setting.update(kind=kind, key=fingerprint(key),
                   data=fingerprint((emb[rows], hist[rows], mask[rows])))
    workdir = os.path.join(cfg["workdir"], f"{kind}-{fingerprint(setting)[:8]}")
  result = loop.fit(
      step_fn, state, optimizer.init(state), num_steps=cfg["num_steps"],
      batch_at=batch_at, key=key_steps,
      validation=loop.Validation(validation, every=cfg["eval_every"],
                                 name=f"val {cfg['select_by']}"),
      checkpointing=loop.Checkpointing(workdir, config=setting) if workdir else None,
      reporting=loop.Reporting(name=kind, log=cfg.get("log"),
                               progress=cfg.get("progress", False)))
  return {"value": result.best_value, "steps": result.best_step, "state": result.best_state,
          "graphdef": graphdef, "curve": result.curve, "skipped": result.skipped}


def fit_sequence_model(kind, key, train_task, val_task, config=None):
  """Train ``kind`` for every setting in ``config["grid"]`` (default: one), keep the best on val."""
  base = dict(DEFAULTS)
  base.update({k: v for k, v in (config or {}).items() if k in DEFAULTS})
  grid = (config or {}).get("grid") or [{}]
  pop = popularity_vector(train_task)
  runs = []
  for j, override in enumerate(grid):
    cfg = dict(base, **override)
    run = _train_one(jax.random.fold_in(key, j), kind, cfg, train_task, val_task, pop)
    runs.append((run["value"], j, cfg, run))
  value, j, cfg, run = max(runs, key=lambda r: (r[0], -r[1]))
  return {"graphdef": run["graphdef"], "state": run["state"], "max_len": cfg["max_len"],
          "popularity": pop,
          "selected": {k: cfg[k] for k in cfg if k not in ("log", "workdir", "progress")},
          "selected_steps": run["steps"], "validation": value,
          "grid_results": [(r[0], r[3]["steps"]) for r in runs], "curve": run["curve"]}


def predict_sequence_model(fitted, task):
  return (_predict_state(fitted["graphdef"], fitted["state"], task, fitted["max_len"])
          + 1e-9 * fitted["popularity"])


for _kind, _desc in (("gru", "GRU4Rec-style GRU over strength vectors + embedding"),
                     ("sasrec", "SASRec-style causal self-attention + embedding token"),
                     ("graphsage_linear", "softmax layer on the GraphSAGE embedding")):
  register(_kind, Predictor(functools.partial(fit_sequence_model, _kind), predict_sequence_model,
                            True, False, _desc))
