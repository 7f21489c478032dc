"""GraphSAGE embeddings: aggregation vs a dense-adjacency oracle, training on a
planted-community graph vs the popularity scorer, inductive cold users,
leakage guard of the graph builder, persistence and bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from sklearn.metrics import roc_auc_score

from dennl_jax.recsys import graph as graph_lib
from dennl_jax.recsys import events
from dennl_jax.recsys import graphsage as gs

# float64, as these tests ran in the full suite before x64 became a per-test
# marker (modules collected before them switched it on at import).
pytestmark = pytest.mark.x64

NUM_COMMUNITIES = 4
CONFIG = dict(embed_dim=16, hidden_dim=32, item_id_dim=8, fanout=5, num_steps=150,
              batch_size=256, holdout=0.2, log_every=0)


def planted_graph(seed=0, num_users=80, num_items=40, degree=8, p_in=0.9, user_features=False):
  """Users and items in communities u % C, i % C; 90% of a user's clicks stay in its
  community.  Communities have equal size, so item degrees carry no community signal."""
  rng = np.random.default_rng(seed)
  user_c, item_c = np.arange(num_users) % NUM_COMMUNITIES, np.arange(num_items) % NUM_COMMUNITIES
  edge_user = np.repeat(np.arange(num_users), degree)
  inside = rng.random(edge_user.size) < p_in
  own = [rng.choice(np.flatnonzero(item_c == user_c[u])) for u in edge_user]
  edge_item = np.where(inside, own, rng.integers(0, num_items, edge_user.size))
  features = rng.normal(size=(num_items, 3)).astype(np.float32)
  users = rng.normal(size=(num_users, 2)).astype(np.float32) if user_features else None
  return gs.BipartiteGraph(edge_user, edge_item, num_users, num_items, features, users)


# The tests that use this trained model are slow (training takes a few seconds).
@pytest.fixture(scope="module")
def trained():
  graph = planted_graph(user_features=True)
  before = [np.copy(graph.edge_user), np.copy(graph.edge_item), np.copy(graph.item_features)]
  lines = []
  model, embeddings, report = gs.train_graphsage(jax.random.key(0), graph,
                                                 dict(CONFIG, log_every=50), log=lines.append)
  for original, now in zip(before, graph[:2] + (graph.item_features,)):
    np.testing.assert_array_equal(original, now)   # inputs never modified
  return graph, model, embeddings, report, lines


def dense_mean(values, source, target, num_targets):
  adjacency = np.zeros((num_targets, values.shape[0]))
  np.add.at(adjacency, (target, source), 1.0)
  degree = adjacency.sum(1, keepdims=True)
  return np.where(degree > 0, adjacency @ values / np.maximum(degree, 1), 0.0), degree[:, 0] > 0


@pytest.mark.parametrize("num_edges,chunk", [(1, 64), (23, 64), (50, 7)])
def test_segment_mean_matches_dense_adjacency(num_edges, chunk):
  rng = np.random.default_rng(num_edges)
  num_src, num_tgt = 6, 9   # more targets than edges can reach: isolated nodes
  values = rng.normal(size=(num_src, 3))
  source, target = rng.integers(0, num_src, num_edges), rng.integers(0, num_tgt - 2, num_edges)
  with jax.enable_x64(True):
    mean, has = jax.jit(graph_lib.segment_mean, static_argnums=(3, 4))(
        jnp.asarray(values), jnp.asarray(source), jnp.asarray(target), num_tgt, chunk)
    assert mean.dtype == jnp.float64
  want, want_has = dense_mean(values, source, target, num_tgt)
  np.testing.assert_allclose(np.asarray(mean), want, atol=1e-12)
  np.testing.assert_array_equal(np.asarray(has), want_has)
  assert not want_has[-2:].any()


def test_sampled_mean_draws_neighbours_and_is_unbiased():
  graph = graph_lib.validate_graph(planted_graph(num_users=12, num_items=10, degree=3)._replace(
      num_users=14))     # users 12 and 13 have no edges
  device = graph_lib.to_device(graph)
  rng = np.random.default_rng(1)
  values = rng.normal(size=(10, 2)).astype(np.float32)
  draw = jax.jit(lambda u: graph_lib.sampled_mean(jnp.asarray(values), device.user_offsets,
                                                  device.user_neighbours, u))
  exact, exact_has = dense_mean(values, graph.edge_item, graph.edge_user, 14)
  many, has = draw(rng.random((14, 4000), np.float32))
  np.testing.assert_array_equal(np.asarray(has), exact_has)
  np.testing.assert_allclose(np.asarray(many), exact, atol=0.05)
  one, _ = draw(rng.random((14, 1), np.float32))     # one draw = one actual neighbour
  for user in range(12):
    neighbours = values[graph.edge_item[graph.edge_user == user]]
    assert np.any(np.all(np.isclose(neighbours, np.asarray(one)[user]), axis=1))
  np.testing.assert_array_equal(np.asarray(one)[12:], 0.0)


def test_link_auc_matches_sklearn_with_ties():
  rng = np.random.default_rng(0)
  pos, neg = rng.integers(0, 5, 30).astype(float), rng.integers(0, 4, 40).astype(float)
  want = roc_auc_score(np.r_[np.ones(30), np.zeros(40)], np.r_[pos, neg])
  assert gs.link_auc(pos, neg) == pytest.approx(want, abs=1e-12)
  with pytest.raises(ValueError, match="at least one"):
    gs.link_auc(pos, [])


@pytest.mark.slow
def test_planted_communities_beat_popularity(trained):
  _, _, embeddings, report, lines = trained
  assert report["num_heldout_edges"] > 50 and report["skipped_steps"] == 0
  assert report["auc"] > 0.8 and report["auc"] > report["popularity_auc"] + 0.25, report
  assert report["auc_popularity_negatives"] > report["popularity_auc_popularity_negatives"] + 0.2
  assert embeddings.shape == (80, 16) and embeddings.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
  assert any("step    50/150" in line for line in lines)
  assert any("held-out AUC" in line for line in lines)


@pytest.mark.slow
def test_same_key_same_embeddings(trained):
  graph, _, embeddings, report, _ = trained
  _, again, report_again = gs.train_graphsage(jax.random.key(0), graph, CONFIG)
  np.testing.assert_array_equal(again, embeddings)
  assert report_again["auc"] == report["auc"]
  _, other, _ = gs.train_graphsage(jax.random.key(1), graph, CONFIG)
  assert np.abs(other - embeddings).max() > 1e-3


@pytest.mark.slow
def test_inductive_cold_and_new_users(trained):
  graph, model, embeddings, _, _ = trained
  np.testing.assert_allclose(gs.embed_users(model, graph), embeddings, atol=1e-6)
  # Three new users: one who clicked community-0 items, two without edges who
  # share their features; the fourth user without edges has other features.
  items_c0 = np.flatnonzero(np.arange(graph.num_items) % NUM_COMMUNITIES == 0)[:5]
  features = np.r_[graph.user_features, graph.user_features[[5, 7, 7]]]
  grown = graph._replace(edge_user=np.r_[graph.edge_user, np.full(5, 80)],
                         edge_item=np.r_[graph.edge_item, items_c0], num_users=83,
                         user_features=features)
  new = gs.embed_users(model, grown)
  assert new.shape == (83, 16) and np.all(np.isfinite(new))
  np.testing.assert_allclose(np.linalg.norm(new, axis=1), 1.0, atol=1e-5)
  similarity = embeddings @ new[80]
  community = np.arange(80) % NUM_COMMUNITIES
  assert similarity[community == 0].mean() > similarity[community != 0].mean() + 0.3
  np.testing.assert_allclose(new[81], new[82], atol=1e-6)   # no edges: features decide
  cold = grown._replace(edge_user=grown.edge_user[grown.edge_user != 5],
                        edge_item=grown.edge_item[grown.edge_user != 5])
  z = gs.embed_users(model, cold)
  assert np.abs(z[5] - z[81]).max() > 1e-4                  # other features, other embedding
  assert gs.item_embeddings(model, graph).shape == (40, 16)
  with pytest.raises(ValueError, match="user features"):
    gs.embed_users(model, graph._replace(user_features=None))


def test_cold_user_without_features_gets_learned_default():
  graph = planted_graph(num_users=8, num_items=40, degree=2)
  graph = graph._replace(edge_user=graph.edge_user[graph.edge_user > 2],
                         edge_item=graph.edge_item[graph.edge_user > 2])
  model = gs.GraphSAGE(40, 3, 0, embed_dim=16, hidden_dim=32, item_id_dim=8, rngs=nnx.Rngs(0))
  z = gs.embed_users(model, graph)
  np.testing.assert_allclose(z[:3], np.broadcast_to(z[0], (3, 16)), atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
  assert np.abs(z[0] - z[3]).max() > 1e-4


def event_pipeline(seed=0, num_users=6, num_items=5, num_events=60):
  """A small event log over 4 days, its daily sequences and time split."""
  rng = np.random.default_rng(seed)
  item_ids = np.array([f"item{j}" for j in range(num_items)])
  catalogue = events.make_catalogue(item_ids, rng.dirichlet(np.ones(3), num_items), ("a", "b", "c"),
                                    rng.normal(size=(num_items, 2)))
  log = events.make_event_log(rng.integers(0, num_users, num_events),
                              rng.integers(0, 4, num_events) * events.SECONDS_PER_DAY,
                              item_ids[rng.integers(0, num_items, num_events)], catalogue)
  seqs = events.to_sequences(log, unit="day")
  return log, seqs, events.time_split(seqs)


def test_graph_from_events_keeps_only_training_events():
  log, seqs, split = event_pipeline()
  mask = events.training_events(log, seqs, split)
  assert 0 < mask.sum() < mask.size
  graph = gs.graph_from_events(log, seqs, mask)
  edges = set(zip(graph.edge_user.tolist(), graph.edge_item.tolist()))
  step_is_train = np.asarray(split.train_mask)[seqs.event_user, seqs.event_step]
  want = {(u, i) for u, i, t in zip(seqs.event_user, log.item_index, step_is_train) if t}
  assert edges == want and len(edges) == graph.edge_user.size   # unique training pairs only
  late = {(u, i) for u, i, t in zip(seqs.event_user, log.item_index, step_is_train) if not t}
  assert late - want and not (late - want) & edges               # val/test-only pairs stay out
  assert graph.num_users == len(seqs.user_ids) and graph.num_items == 5
  np.testing.assert_array_equal(graph.item_features, log.catalogue.features)
  empty = gs.graph_from_events(log, seqs, np.zeros(mask.size, bool))   # everybody cold
  assert empty.edge_user.size == 0 and empty.num_users == len(seqs.user_ids)
  with pytest.raises(ValueError, match="event_mask"):
    gs.graph_from_events(log, seqs, mask[:-1])
  with pytest.raises(ValueError, match="event_mask"):
    gs.graph_from_events(log, seqs, mask.astype(int))


@pytest.mark.slow
def test_save_load_round_trip(trained, tmp_path):
  _, _, embeddings, report, _ = trained
  paths = gs.save_embeddings(tmp_path / "emb.npz", embeddings, CONFIG, report)
  assert [p.endswith(s) for p, s in zip(paths, (".npz", ".json"))] == [True, True]
  loaded, config, loaded_report = gs.load_embeddings(tmp_path / "emb")
  np.testing.assert_array_equal(loaded, embeddings)
  assert config == gs.GraphSAGEConfig(**CONFIG)
  assert loaded_report == pytest.approx(report)
  with pytest.raises(ValueError, match="does not exist"):
    gs.load_embeddings(tmp_path / "missing")


@pytest.mark.parametrize("change,message", [
    (dict(edge_user=np.array([0, 80])), "edge_user\\[1\\] = 80 is out of range"),
    (dict(edge_item=np.array([-1, 3])), "edge_item\\[0\\] = -1 is out of range"),
    (dict(edge_item=np.array([0, 1, 2])), "equal length"),
    (dict(edge_user=np.array([], int), edge_item=np.array([], int)), "no edges"),
    (dict(num_items=0), "at least one"),
    (dict(item_features=np.full((40, 3), np.nan)), "finite"),
    (dict(item_features=np.zeros((39, 3))), "item_features has shape"),
])
def test_bad_graph_raises(change, message):
  graph = planted_graph()._replace(edge_user=np.array([0, 1]), edge_item=np.array([0, 1]))
  with pytest.raises(ValueError, match=message):
    gs.train_graphsage(jax.random.key(0), graph._replace(**change), CONFIG)


@pytest.mark.slow
def test_bad_config_and_mismatched_model_raise(trained):
  graph, model, *_ = trained
  with pytest.raises(ValueError, match="unknown GraphSAGE config"):
    gs.train_graphsage(jax.random.key(0), graph, dict(CONFIG, hidden=3))
  with pytest.raises(ValueError, match="negatives"):
    gs.train_graphsage(jax.random.key(0), graph, dict(CONFIG, negatives="hard"))
  with pytest.raises(ValueError, match="items"):
    gs.embed_users(model, planted_graph(num_items=41))
