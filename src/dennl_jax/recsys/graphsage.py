"""GraphSAGE user embeddings by link prediction on the user-item click graph.

Paper section 1 and appendix A.2: every user has a 128-d embedding trained to
predict whether the user clicks an item from the user's and the item's
embeddings alone.  This module trains it (Flax NNX + optax) on a
:class:`~dennl_jax.recsys.graph.BipartiteGraph` built from training-period events
only (:func:`graph_from_events`), so later steps cannot leak into it.

Encoder (two GraphSAGE-mean layers with concatenation, Hamilton et al. 2017)::

  item h0 = relu(W_i [item features ; learned item vector])
  user h0 = relu(W_u user features)      or one learned vector without features
  h1(v)   = relu(W1 [h0(v) ; mean of h0 over v's neighbours])   (users and items)
  z(v)    = normalise(W2 [h1(v) ; mean of h1 over v's neighbours])

A node without neighbours uses a learned "empty neighbourhood" vector in
place of the mean, so a cold user's embedding is a function of its features
(or one shared learned default).  The encoder is inductive over users: it
has no per-user parameters, so :func:`embed_users` embeds the users of any
graph over the same items, new users included.  The last layer is linear
(no ReLU) before the L2 normalisation so dot products can be negative.

Decoder: ``logit(u, i) = exp(log_scale) <z_u, z_i> + bias``.  Loss: binary
cross-entropy of positive edges against ``num_negatives`` sampled items per
edge (uniform, or popularity-smoothed ``degree^0.75``).

Aggregation.  Training uses a fixed neighbour sample per node and step
(``fanout``, :func:`~dennl_jax.recsys.graph.sampled_mean`) over *all* nodes at
once: its cost is ``(U + I) x fanout x d`` per layer, independent of the
number of edges (the marketplace has millions), and it needs no host work per
step.  Embeddings are then computed with the exact neighbourhood mean
(:func:`~dennl_jax.recsys.graph.segment_mean`).  ``fanout=None`` trains on the exact
mean too (fine for small graphs).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy.stats import rankdata

from dennl_jax import loop, training
from dennl_jax.recsys.graph import (BipartiteGraph, DeviceGraph, graph_from_events, sampled_mean,
                             segment_mean, to_device, validate_graph)

__all__ = ["BipartiteGraph", "GraphSAGE", "GraphSAGEConfig", "embed_users", "graph_from_events",
           "item_embeddings", "link_auc", "load_embeddings", "save_embeddings", "train_graphsage"]


@dataclasses.dataclass(frozen=True)
class GraphSAGEConfig:
  """Model and training settings (saved beside the embeddings)."""
  embed_dim: int = 128        # output embedding size (paper: 128)
  hidden_dim: int = 64        # 128 costs twice the time for the same MovieLens AUC (measured)
  item_id_dim: int = 32       # learned per-item vector appended to the item features; 0 = none
  fanout: Optional[int] = 10  # neighbours sampled per node and layer in training; None = exact
  num_steps: int = 300
  batch_size: int = 4096      # positive edges per step
  num_negatives: int = 1      # sampled items per positive edge
  negatives: str = "uniform"  # or "popularity" (degree^0.75, word2vec's smoothing)
  learning_rate: float = 5e-3
  holdout: float = 0.1        # fraction of edges held out for the AUC (0 = no evaluation)
  log_every: int = 100        # progress line every this many steps; 0 = silent


def _as_config(config) -> GraphSAGEConfig:
  if config is None:
    return GraphSAGEConfig()
  if isinstance(config, GraphSAGEConfig):
    out = config
  else:
    fields = {f.name for f in dataclasses.fields(GraphSAGEConfig)}
    values = dict(config)
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f"unknown GraphSAGE config fields {unknown}; known: {sorted(fields)}")
    out = GraphSAGEConfig(**values)
  if out.negatives not in ("uniform", "popularity"):
    raise ValueError(f"negatives must be 'uniform' or 'popularity', got {out.negatives!r}")
  if not 0.0 <= out.holdout < 1.0:
    raise ValueError(f"holdout must be in [0, 1), got {out.holdout}")
  for name in ("embed_dim", "hidden_dim", "num_steps", "batch_size", "num_negatives"):
    if getattr(out, name) < 1:
      raise ValueError(f"{name} must be positive, got {getattr(out, name)}")
  if out.fanout is not None and out.fanout < 1:
    raise ValueError(f"fanout must be positive or None, got {out.fanout}")
  return out


class GraphSAGE(nnx.Module):
  """Two-layer bipartite GraphSAGE encoder and dot-product decoder.

  ``__call__(graph: DeviceGraph, key=None, fanout=None) -> (z_users (U, d),
  z_items (I, d))``, unit-norm rows; with ``key`` and ``fanout`` the
  neighbourhood means are sampled, otherwise exact.
  """

  def __init__(self, num_items: int, item_feature_dim: int, user_feature_dim: int, *,
               embed_dim: int = 128, hidden_dim: int = 128, item_id_dim: int = 32,
               rngs: nnx.Rngs):
    self.num_items, self.item_feature_dim = num_items, item_feature_dim
    self.user_feature_dim = user_feature_dim
    self.item_ids = nnx.Embed(num_items, item_id_dim, rngs=rngs) if item_id_dim else None
    self.item_in = nnx.Linear(item_feature_dim + item_id_dim, hidden_dim, rngs=rngs)
    self.user_in = nnx.Linear(user_feature_dim, hidden_dim, rngs=rngs) if user_feature_dim else None
    init = lambda: nnx.Param(0.1 * jax.random.normal(rngs.params(), (hidden_dim,)))
    self.user_default = init()
    # Stand-ins for the mean of an empty neighbourhood, per side and layer.
    self.empty = nnx.Param(0.1 * jax.random.normal(rngs.params(), (4, hidden_dim)))
    linear = lambda out: nnx.Linear(2 * hidden_dim, out, rngs=rngs)
    self.user1, self.item1 = linear(hidden_dim), linear(hidden_dim)
    self.user2, self.item2 = linear(embed_dim), linear(embed_dim)
    self.log_scale = nnx.Param(jnp.asarray(np.log(5.0), jnp.float32))
    self.bias = nnx.Param(jnp.zeros(()))

  def check_graph(self, graph: BipartiteGraph) -> None:
    """ValueError unless the graph has this model's items and feature sizes."""
    if graph.num_items != self.num_items or graph.item_features.shape[1] != self.item_feature_dim:
      raise ValueError(f"graph has {graph.num_items} items with {graph.item_features.shape[1]} "
                       f"features; the model was trained on {self.num_items} items with "
                       f"{self.item_feature_dim}")
    got = 0 if graph.user_features is None else graph.user_features.shape[1]
    if got != self.user_feature_dim:
      raise ValueError(f"graph has {got} user features, the model expects {self.user_feature_dim}")

  def __call__(self, graph: DeviceGraph, key=None, fanout: Optional[int] = None):
    num_users = graph.user_offsets.shape[0] - 1
    item_x = graph.item_features
    if self.item_ids is not None:
      item_x = jnp.concatenate([item_x, self.item_ids.embedding[...]], axis=1)
    item_h = jax.nn.relu(self.item_in(item_x))
    if self.user_in is not None:
      user_h = jax.nn.relu(self.user_in(graph.user_features))
    else:
      user_h = jnp.broadcast_to(self.user_default[...], (num_users, item_h.shape[1]))
    num_items = self.num_items
    if key is None or fanout is None:
      draws = [None] * 4
    else:
      sizes = [num_users, num_items, num_users, num_items]
      uniform = jax.random.uniform(key, (sum(sizes), fanout))
      draws = jnp.split(uniform, np.cumsum(sizes)[:-1])

    def aggregate(values, to_users: bool, draw, empty):
      if draw is None:
        src, tgt = ((graph.edge_item, graph.edge_user) if to_users
                    else (graph.edge_user, graph.edge_item))
        mean, has = segment_mean(values, src, tgt, num_users if to_users else self.num_items)
      else:
        offsets, neighbours = ((graph.user_offsets, graph.user_neighbours) if to_users
                               else (graph.item_offsets, graph.item_neighbours))
        mean, has = sampled_mean(values, offsets, neighbours, draw)
      return jnp.where(has[:, None], mean, empty)

    empty = self.empty[...]
    layer = lambda dense, self_h, agg: dense(jnp.concatenate([self_h, agg], axis=1))
    user_1 = jax.nn.relu(layer(self.user1, user_h, aggregate(item_h, True, draws[0], empty[0])))
    item_1 = jax.nn.relu(layer(self.item1, item_h, aggregate(user_h, False, draws[1], empty[1])))
    user_z = layer(self.user2, user_1, aggregate(item_1, True, draws[2], empty[2]))
    item_z = layer(self.item2, item_1, aggregate(user_1, False, draws[3], empty[3]))
    unit = lambda z: z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return unit(user_z), unit(item_z)

  def logits(self, z_user, z_item):
    """(..., d) x (..., d) -> (...) link logits."""
    return jnp.exp(self.log_scale[...]) * jnp.sum(z_user * z_item, axis=-1) + self.bias[...]


class LinkBatch(NamedTuple):
  """What a training step needs: the message-passing graph, the positive edges
  to draw from (E_train,) and the negative-sampling CDF over items (I,)."""
  graph: DeviceGraph
  pos_user: jax.Array
  pos_item: jax.Array
  negative_cdf: jax.Array


def link_loss(model: GraphSAGE, batch: LinkBatch, key, *, batch_size: int, num_negatives: int,
              fanout: Optional[int]):
  """Binary cross-entropy of ``batch_size`` random positive edges vs sampled items."""
  k_draw, k_agg = jax.random.split(key)
  z_users, z_items = model(batch.graph, k_agg, fanout)
  draw = jax.random.uniform(k_draw, (batch_size, 1 + num_negatives))
  num_pos = batch.pos_user.shape[0]
  pick = jnp.minimum((draw[:, 0] * num_pos).astype(jnp.int32), num_pos - 1)
  users, items = batch.pos_user[pick], batch.pos_item[pick]
  # Inverse-CDF sampling: O(B log I), where categorical() would draw B x I Gumbels.
  negatives = jnp.minimum(
      jnp.searchsorted(batch.negative_cdf, draw[:, 1:] * batch.negative_cdf[-1], side="right"),
      batch.negative_cdf.shape[0] - 1)
  pos = model.logits(z_users[users], z_items[items])
  neg = model.logits(z_users[users][:, None], z_items[negatives])
  return jnp.mean(jax.nn.softplus(-pos)) + jnp.mean(jax.nn.softplus(neg))


@functools.lru_cache(maxsize=8)
def _train_step(graphdef, batch_size: int, num_negatives: int, fanout, learning_rate: float):
  """(optimizer, jitted step), cached so that runs of one architecture compile once."""
  optimizer = training.make_optimizer(learning_rate)
  loss_fn = functools.partial(link_loss, batch_size=batch_size, num_negatives=num_negatives,
                              fanout=fanout)
  return optimizer, training.make_train_step(graphdef, loss_fn, optimizer)


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, graph: DeviceGraph):
  return nnx.merge(graphdef, state)(graph)


def _encode_graph(model: GraphSAGE, graph: BipartiteGraph):
  graph = validate_graph(graph, require_edges=False)
  model.check_graph(graph)
  graphdef, state = nnx.split(model)
  return _encode(graphdef, state, to_device(graph))


def embed_users(model: GraphSAGE, graph: BipartiteGraph) -> np.ndarray:
  """(U, d) float32 unit-norm embeddings of the graph's users (exact means).

  Any graph over the model's items works: new users, and users without edges
  (their embedding depends only on their features, or is the learned default).
  """
  return np.asarray(_encode_graph(model, graph)[0], np.float32)


def item_embeddings(model: GraphSAGE, graph: BipartiteGraph) -> np.ndarray:
  """(I, d) float32 unit-norm item embeddings given the graph's users."""
  return np.asarray(_encode_graph(model, graph)[1], np.float32)


def link_auc(pos_scores, neg_scores) -> float:
  """ROC AUC = P(score of a positive > score of a negative), ties counted half."""
  pos, neg = np.ravel(pos_scores), np.ravel(neg_scores)
  if pos.size == 0 or neg.size == 0:
    raise ValueError("link_auc needs at least one positive and one negative score")
  ranks = rankdata(np.concatenate([pos, neg]))
  return float((ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def _sample_non_edges(rng: np.random.Generator, users, weights, known_keys, num_items):
  """One item per user drawn from ``weights``, redrawn while (user, item) is a known edge."""
  items = rng.choice(num_items, size=users.size, p=weights)
  for _ in range(20):
    clash = np.isin(users.astype(np.int64) * num_items + items, known_keys)
    if not clash.any():
      break
    items[clash] = rng.choice(num_items, size=int(clash.sum()), p=weights)
  return items


def _evaluate(model, train_graph: BipartiteGraph, held_user, held_item, known_keys, seed):
  """AUCs of the held-out edges vs same-user non-edges, model and item-degree scorer.

  Two negative sets: uniform items (the usual link-prediction AUC) and
  items drawn in proportion to their degree, under which popularity alone
  scores about 0.5, so that AUC measures what the embedding adds.
  """
  z_users, z_items = (np.asarray(z) for z in _encode_graph(model, train_graph))
  degree = np.bincount(train_graph.edge_item, minlength=train_graph.num_items).astype(np.float64)
  rng = np.random.default_rng(seed)
  score = lambda u, i: np.sum(z_users[u] * z_items[i], axis=1)
  out = {}
  uniform = np.full(train_graph.num_items, 1.0 / train_graph.num_items)
  for name, weights in (("", uniform), ("_popularity_negatives", degree / degree.sum())):
    neg_item = _sample_non_edges(rng, held_user, weights, known_keys, train_graph.num_items)
    out["auc" + name] = link_auc(score(held_user, held_item), score(held_user, neg_item))
    out["popularity_auc" + name] = link_auc(degree[held_item], degree[neg_item])
  return out


def train_graphsage(key, graph: BipartiteGraph, config=None, *,
                    log: Callable[[str], None] = print, workdir: Optional[str] = None,
                    progress: bool = False):
  """Train on ``graph`` and embed its users.

  key: jax.random key (same key, graph and config -> same embeddings);
  config: :class:`GraphSAGEConfig`, a dict or ConfigDict of its fields.
  A random ``holdout`` fraction of the (unique) edges is removed before
  training and scored at the end: ``report['auc']`` (held-out edges vs
  uniformly drawn non-edges of the same users) beside
  ``report['popularity_auc']`` (items scored by their training degree), and
  the same pair against degree-proportional negatives.  The returned
  embeddings (U, embed_dim) float32 use the whole graph, held-out edges
  included (they are training-period events too).
  ``workdir``/``progress``: checkpoints, resume and metrics, and a progress
  bar (:func:`dennl_jax.loop.fit`; the workdir's config is the config less
  ``num_steps`` and ``log_every``, plus digests of the key and the graph).
  Returns (model, embeddings, report).
  """
  config = _as_config(config)
  graph = validate_graph(graph)
  k_split, k_init, k_train, k_eval = jax.random.split(key, 4)
  num_edges = graph.edge_user.size
  num_held = int(round(config.holdout * num_edges))
  if config.holdout > 0 and not 1 <= num_held < num_edges:
    raise ValueError(f"holdout={config.holdout} of {num_edges} edges leaves no edge to hold out "
                     "or none to train on")
  order = np.asarray(jax.random.permutation(k_split, num_edges))
  held, kept = order[:num_held], np.sort(order[num_held:])
  train_graph = graph._replace(edge_user=graph.edge_user[kept], edge_item=graph.edge_item[kept])
  device_graph = to_device(train_graph)

  model = GraphSAGE(graph.num_items, graph.item_features.shape[1],
                    0 if graph.user_features is None else graph.user_features.shape[1],
                    embed_dim=config.embed_dim, hidden_dim=config.hidden_dim,
                    item_id_dim=config.item_id_dim, rngs=nnx.Rngs(params=k_init))
  degree = np.bincount(train_graph.edge_item, minlength=graph.num_items).astype(np.float64)
  weights = np.ones(graph.num_items) if config.negatives == "uniform" else (degree + 1.0) ** 0.75
  batch = LinkBatch(device_graph, jnp.asarray(train_graph.edge_user),
                    jnp.asarray(train_graph.edge_item),
                    jnp.asarray(np.cumsum(weights / weights.sum()), jnp.float32))
  graphdef, state = nnx.split(model)
  optimizer, step_fn = _train_step(graphdef, config.batch_size, config.num_negatives,
                                   config.fanout, config.learning_rate)
  run_config = None
  if workdir:
    from dennl_jax.checkpoint import fingerprint
    run_config = {k: v for k, v in dataclasses.asdict(config).items()
                  if k not in ("num_steps", "log_every")}
    run_config.update(key=fingerprint(key), graph=fingerprint(tuple(graph)))
  result = loop.fit(
      step_fn, state, optimizer.init(state), num_steps=config.num_steps,
      batch_at=lambda i: batch, key=k_train,
      checkpointing=loop.Checkpointing(workdir, config=run_config) if workdir else None,
      reporting=loop.Reporting(name="graphsage", log=log, log_every=config.log_every,
                               progress=progress))
  train_seconds, losses, skipped = result.seconds, result.history.loss, result.skipped
  model = nnx.merge(graphdef, result.state)

  report = dict(num_users=graph.num_users, num_items=graph.num_items, num_edges=num_edges,
                num_train_edges=int(kept.size), num_heldout_edges=num_held,
                train_seconds=train_seconds, final_loss=float(np.mean(losses[-10:])),
                skipped_steps=skipped)
  if num_held:
    known = graph.edge_user.astype(np.int64) * graph.num_items + graph.edge_item
    seed = int(jax.random.randint(k_eval, (), 0, 2**31 - 1))
    report.update(_evaluate(model, train_graph, graph.edge_user[held], graph.edge_item[held],
                            known, seed))
  start = time.time()
  embeddings = embed_users(model, graph)
  report["embed_seconds"] = time.time() - start
  if config.log_every and num_held:
    log(f"[graphsage] held-out AUC {report['auc']:.4f} (popularity {report['popularity_auc']:.4f});"
        f" vs degree-matched negatives {report['auc_popularity_negatives']:.4f} "
        f"(popularity {report['popularity_auc_popularity_negatives']:.4f})")
  return model, embeddings, report


def _jsonable(value):
  if isinstance(value, (np.generic, np.ndarray)):
    return value.tolist()
  raise TypeError(f"report value of type {type(value).__name__} is not JSON-serialisable")


def _paths(path) -> tuple[str, str]:
  base = os.fspath(path)
  base = base[:-4] if base.endswith(".npz") else base
  return base + ".npz", base + ".json"


def save_embeddings(path, embeddings, config, report) -> tuple[str, str]:
  """Write ``<path>.npz`` (embeddings) and ``<path>.json`` (config, report); returns both paths."""
  embeddings = np.asarray(embeddings)
  if embeddings.ndim != 2 or not np.all(np.isfinite(embeddings)):
    raise ValueError(f"embeddings must be a finite (U, d) array, got shape {embeddings.shape}")
  npz_path, json_path = _paths(path)
  config = dataclasses.asdict(_as_config(config))
  with open(json_path, "w") as f:
    json.dump({"config": config, "report": dict(report), "shape": list(embeddings.shape)}, f,
              indent=1, sort_keys=True, default=_jsonable)
  np.savez(npz_path, embeddings=embeddings.astype(np.float32))
  return npz_path, json_path


def load_embeddings(path):
  """(embeddings (U, d) float32, GraphSAGEConfig, report dict) saved by :func:`save_embeddings`."""
  npz_path, json_path = _paths(path)
  for p in (npz_path, json_path):
    if not os.path.exists(p):
      raise ValueError(f"no saved embeddings: {p} does not exist")
  with np.load(npz_path) as data:
    embeddings = data["embeddings"]
  with open(json_path) as f:
    meta = json.load(f)
  return embeddings, _as_config(meta["config"]), meta["report"]
