r"""GraphSAGE user embeddings end to end: events -> sequences -> split -> graph -> embeddings.

Run from the repository root:

  python -m experiments.graphsage_embeddings --dataset=movielens --output=/tmp/gs/movielens
  python -m experiments.graphsage_embeddings --dataset=marketplace --users=10000 \
      --output=/tmp/gs/marketplace

The graph holds the training-period events only (``training_events``: steps
before each user's validation step), so nothing of a validation or test step
leaks into the embeddings.  Prints the stage timings and the held-out
link-prediction AUC beside the popularity scorer; writes ``<output>.npz``
(embeddings, rows = ``seqs.user_ids`` order) and ``<output>.json`` (config,
report and timings).  ``--set name=value`` overrides a GraphSAGEConfig field.
``--workdir=DIR``: checkpoints and TensorBoard/JSONL metrics under
``DIR/<dataset>/seed<seed>`` (rerun to resume); ``--noprogress``: no bar.
"""
from __future__ import annotations

import argparse
import ast
import time

import jax
import numpy as np

from dennl_jax.recsys import graphsage
from dennl_jax.recsys import events
from experiments import common


def load(dataset: str, data_dir: str, users: int, days: int, seed: int):
  """(EventLog, marketplace truth or None)."""
  if dataset == "movielens":
    from dennl_jax.recsys.movielens import load_movielens
    return load_movielens(data_dir), None
  from dennl_jax.recsys import marketplace
  config = marketplace.MarketplaceConfig(num_users=users, num_days=days)
  return marketplace.simulate_marketplace(jax.random.key(seed), config)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", choices=("movielens", "marketplace"), default="movielens")
  parser.add_argument("--data_dir", default="../shared/data/movielens-latest-small")
  parser.add_argument("--users", type=int, default=10000, help="marketplace users")
  parser.add_argument("--days", type=int, default=180, help="marketplace days")
  parser.add_argument("--unit", choices=("day", "events"), default="day")
  parser.add_argument("--events_per_step", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--output", default="")
  common.add_tracking_arguments(parser)
  args = parser.parse_args(argv)
  overrides = {}
  for item in args.set:
    name, _, value = item.partition("=")
    try:
      overrides[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[name] = value
  config = graphsage.GraphSAGEConfig(**overrides)

  times = {}
  start = time.time()
  log, truth = load(args.dataset, args.data_dir, args.users, args.days, args.seed)
  times["load"] = time.time() - start
  mark = time.time()
  idle, user_features = None, None
  if truth is not None:   # marketplace: idle days are the "no action" sub-category (A.2)
    from dennl_jax.recsys.marketplace import IDLE_CATEGORY as idle
  seqs = events.to_sequences(log, unit=args.unit, events_per_step=args.events_per_step,
                             idle_category=idle)
  if truth is not None:   # truth rows follow truth.user_ids, graph rows seqs.user_ids
    user_features = truth.user_features[np.searchsorted(truth.user_ids, seqs.user_ids)]
  split = events.time_split(seqs)
  mask = events.training_events(log, seqs, split)
  graph = graphsage.graph_from_events(log, seqs, mask, user_features)
  times["sequences_and_graph"] = time.time() - mark
  print(f"{args.dataset}: {log.num_events} events, {mask.sum()} in training steps -> "
        f"{graph.edge_user.size} unique user-item edges; {graph.num_users} users "
        f"({np.bincount(graph.edge_user, minlength=graph.num_users).astype(bool).sum()} with "
        f"edges), {graph.num_items} items; {times['load']:.1f}s load, "
        f"{times['sequences_and_graph']:.1f}s sequences + split + graph", flush=True)
  mark = time.time()
  _, embeddings, report = graphsage.train_graphsage(
      jax.random.key(args.seed), graph, config, progress=args.progress,
      workdir=common.subdir(args.workdir, args.dataset, f"seed{args.seed}"))
  times["graphsage"] = time.time() - mark
  times["total"] = time.time() - start
  report.update(dataset=args.dataset, unit=args.unit, seconds=times)
  print(f"total {times['total']:.1f}s (graphsage {times['graphsage']:.1f}s); "
        f"AUC {report['auc']:.4f} vs popularity {report['popularity_auc']:.4f}; "
        f"vs degree-matched negatives {report['auc_popularity_negatives']:.4f} vs "
        f"{report['popularity_auc_popularity_negatives']:.4f}")
  if args.output:
    paths = graphsage.save_embeddings(args.output, embeddings, config, report)
    print("wrote", *paths)


if __name__ == "__main__":
  main()
