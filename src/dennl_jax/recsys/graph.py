"""The bipartite user-item click graph and mean aggregation over it.

The graph is built host-side in numpy (:class:`BipartiteGraph`,
:func:`graph_from_events`) and moved to the device once as a
:class:`DeviceGraph`: both directions in CSR form (each node's neighbours
contiguous), so that a node's neighbourhood mean is either

* exact -- :func:`segment_mean`, a ``jax.ops.segment_sum`` over all edges,
  accumulated over fixed-size edge chunks so memory stays at
  ``chunk x d`` whatever the number of edges, or
* sampled -- :func:`sampled_mean`, ``fanout`` neighbours per node drawn with
  replacement from the node's CSR slice (GraphSAGE's fixed-size neighbour
  sample), costing ``nodes x fanout x d`` whatever the degrees.

Edges are unique (user, item) pairs: repeated clicks on the same item do not
weigh a neighbour more (GraphSAGE's mean is over the neighbour set).  On the
device the edge arrays are padded to a power of two (padding edges point
past the last node and are dropped), so graphs of similar size -- the
training graph, the graph with held-out edges, a graph with a few new users
-- share one compiled program.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

# Edges per chunk of the exact aggregation: 2^18 x 128 float32 = 128 MiB.
EDGE_CHUNK = 1 << 18


class BipartiteGraph(NamedTuple):
  """User-item graph (host-side numpy).

  edge_user: (E,) int user index in [0, num_users);
  edge_item: (E,) int item index in [0, num_items);
  item_features: (num_items, F) float; user_features: (num_users, F_u) float or None.
  Users or items without edges are allowed (they get default embeddings).
  """
  edge_user: np.ndarray
  edge_item: np.ndarray
  num_users: int
  num_items: int
  item_features: np.ndarray
  user_features: Optional[np.ndarray] = None


class DeviceGraph(NamedTuple):
  """Device arrays of a validated graph (a pytree; shapes fix U, I, E).

  user_offsets: (U + 1,) CSR offsets into user_neighbours (E,) item indices;
  item_offsets: (I + 1,) CSR offsets into item_neighbours (E,) user indices;
  edge_user, edge_item: (E,) the edges in user-major order (= the user CSR);
  item_features: (I, F) float32; user_features: (U, F_u) float32 or None.
  """
  user_offsets: jax.Array
  user_neighbours: jax.Array
  item_offsets: jax.Array
  item_neighbours: jax.Array
  edge_user: jax.Array
  edge_item: jax.Array
  item_features: jax.Array
  user_features: Optional[jax.Array]


def _check_features(name: str, x, rows: int) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2 or x.shape[0] != rows:
    raise ValueError(f"{name} has shape {x.shape}, expected ({rows}, F)")
  if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
    raise ValueError(f"{name} must be finite numbers")
  return x.astype(np.float32)


def validate_graph(graph: BipartiteGraph, *, require_edges: bool = True) -> BipartiteGraph:
  """Checked copy with unique edges sorted user-major; ValueError naming the problem."""
  num_users, num_items = int(graph.num_users), int(graph.num_items)
  if num_users < 1 or num_items < 1:
    raise ValueError(f"graph needs at least one user and one item, got num_users={num_users}, "
                     f"num_items={num_items}")
  edge_user, edge_item = np.asarray(graph.edge_user), np.asarray(graph.edge_item)
  if edge_user.ndim != 1 or edge_user.shape != edge_item.shape:
    raise ValueError(f"edge_user {edge_user.shape} and edge_item {edge_item.shape} must be "
                     "1-d of equal length")
  for name, idx, bound in (("edge_user", edge_user, num_users), ("edge_item", edge_item, num_items)):
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
      raise ValueError(f"{name} must hold integer indices, got dtype {idx.dtype}")
    bad = np.flatnonzero((idx < 0) | (idx >= bound))
    if bad.size:
      raise ValueError(f"{name}[{bad[0]}] = {idx[bad[0]]} is out of range [0, {bound}) "
                       f"({bad.size} such edges)")
  if require_edges and edge_user.size == 0:
    raise ValueError("graph has no edges; link prediction needs at least one user-item edge")
  keys = np.unique(edge_user.astype(np.int64) * num_items + edge_item.astype(np.int64))
  item_features = _check_features("item_features", graph.item_features, num_items)
  user_features = (None if graph.user_features is None else
                   _check_features("user_features", graph.user_features, num_users))
  return BipartiteGraph((keys // num_items).astype(np.int32), (keys % num_items).astype(np.int32),
                        num_users, num_items, item_features, user_features)


def padded_size(num_edges: int) -> int:
  """The next power of two: a graph and the graph minus its held-out edges (or
  plus a few new users) then usually share one compiled program."""
  return 1 << int(np.ceil(np.log2(max(num_edges, 1))))


def to_device(graph: BipartiteGraph) -> DeviceGraph:
  """CSR arrays of a graph already passed through :func:`validate_graph`.

  Edge arrays are padded to :func:`padded_size`: edge_user with num_users,
  edge_item with num_items (out of range, so aggregation drops them), the
  neighbour lists with 0 (never inside a node's CSR slice).
  """
  eu, ei = graph.edge_user, graph.edge_item
  user_offsets = np.concatenate([[0], np.cumsum(np.bincount(eu, minlength=graph.num_users))])
  by_item = np.lexsort((eu, ei))
  item_offsets = np.concatenate([[0], np.cumsum(np.bincount(ei, minlength=graph.num_items))])
  pad = padded_size(eu.size) - eu.size

  def as_int(a, fill):
    return jnp.asarray(np.concatenate([a, np.full(pad, fill)]), jnp.int32)

  return DeviceGraph(jnp.asarray(user_offsets, jnp.int32), as_int(ei, 0),
                     jnp.asarray(item_offsets, jnp.int32), as_int(eu[by_item], 0),
                     as_int(eu, graph.num_users), as_int(ei, graph.num_items),
                     jnp.asarray(graph.item_features, jnp.float32),
                     None if graph.user_features is None
                     else jnp.asarray(graph.user_features, jnp.float32))


def segment_mean(values, source, target, num_targets: int, chunk: int = EDGE_CHUNK):
  """Exact neighbourhood mean: ``out[t] = mean(values[source[e]] for e with target[e] == t)``.

  values: (N_src, d); source, target: (E,) int; returns ((num_targets, d),
  has_neighbour (num_targets,) bool).  Targets without an edge get zeros.
  Edges with ``target >= num_targets`` are ignored (padding).
  """
  num_edges = source.shape[0]
  source = jnp.minimum(source, values.shape[0] - 1)   # padding edges may point past the end
  counts = jax.ops.segment_sum(jnp.ones(num_edges, values.dtype), target, num_targets)
  if num_edges <= chunk:
    total = jax.ops.segment_sum(values[source], target, num_targets)
  else:
    # Padding edges point at segment num_targets, which segment_sum drops.
    pad = -num_edges % chunk
    source = jnp.concatenate([source, jnp.zeros(pad, source.dtype)]).reshape(-1, chunk)
    target = jnp.concatenate([target, jnp.full(pad, num_targets, target.dtype)]).reshape(-1, chunk)

    def add_chunk(acc, edges):
      src, tgt = edges
      return acc + jax.ops.segment_sum(values[src], tgt, num_targets), None

    total, _ = jax.lax.scan(add_chunk, jnp.zeros((num_targets, values.shape[1]), values.dtype),
                            (source, target))
  mean = total / jnp.maximum(counts, 1)[:, None]
  return mean, counts > 0


def sampled_mean(values, offsets, neighbours, uniform):
  """Mean of ``fanout`` neighbours per node drawn uniformly with replacement.

  values: (N_src, d); offsets: (N + 1,) CSR offsets into neighbours (E,);
  uniform: (N, fanout) draws in [0, 1) that pick the neighbours (the caller
  draws them from its key, all layers' at once: every separate random call
  adds a threefry hash to the compiled step).  Returns ((N, d),
  has_neighbour (N,) bool); nodes without neighbours get zeros.  An unbiased
  estimate of :func:`segment_mean` for every node with edges.
  """
  degree = offsets[1:] - offsets[:-1]
  pick = offsets[:-1, None] + jnp.minimum((uniform * degree[:, None]).astype(jnp.int32),
                                          jnp.maximum(degree[:, None] - 1, 0))
  pick = jnp.clip(pick, 0, neighbours.shape[0] - 1)
  has = degree > 0
  mean = jnp.mean(values[neighbours[pick]], axis=1)
  return jnp.where(has[:, None], mean, 0.0), has


def graph_from_events(log, seqs, event_mask, user_features=None) -> BipartiteGraph:
  """The click graph of the events where ``event_mask`` is True.

  log: ``dennl_jax.recsys.events.EventLog`` (N events); seqs: its
  ``Sequences`` (user index u <-> ``seqs.user_ids[u]``, ``seqs.event_user``);
  event_mask: (N,) bool -- pass ``training_events(log, seqs, split)`` so no
  validation or test event reaches the graph.  Every user of ``seqs`` is a
  node, also one with no kept event (it gets a cold-user embedding).
  Item features: ``log.catalogue.features``, or its category weights when
  the catalogue has none.  user_features: optional (U, F_u) in seqs order.
  """
  event_mask = np.asarray(event_mask)
  num_events = np.asarray(log.item_index).shape[0]
  if event_mask.shape != (num_events,) or event_mask.dtype != np.bool_:
    raise ValueError(f"event_mask must be a bool array of shape ({num_events},), got "
                     f"{event_mask.dtype} {event_mask.shape}")
  event_user = np.asarray(seqs.event_user)
  if event_user.shape != (num_events,):
    raise ValueError(f"seqs.event_user has shape {event_user.shape}; seqs must come from this log "
                     f"({num_events} events)")
  keep = event_mask
  catalogue = log.catalogue
  features = catalogue.features if catalogue.features is not None else catalogue.categories
  return validate_graph(BipartiteGraph(event_user[keep], np.asarray(log.item_index)[keep],
                                       len(seqs.user_ids), len(catalogue.item_ids), features,
                                       user_features),
                        require_edges=False)
