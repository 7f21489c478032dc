r"""Config of experiments/table2.py: next-category prediction (paper Table 2).

Run from the repository root:

  python -m experiments.table2 --quick --dataset=movielens \
      --data_dir=../shared/data/movielens-latest-small --output_dir=/tmp/table2_quick_movielens
  python -m experiments.table2 --quick --dataset=marketplace --output_dir=/tmp/table2_quick_marketplace
  python -m experiments.table2 --dataset=marketplace --output_dir=/tmp/table2_marketplace   # full
  # MovieLens by session (a new step after 30 min without a rating) instead of blocks of 10:
  python -m experiments.table2 --quick --dataset=movielens --config.unit=session \
      --data_dir=../shared/data/movielens-latest-small --output_dir=/tmp/table2_quick_movielens_session

Variants: ``full`` (default; the real scale: all MovieLens users, the paper's
10,000 marketplace users x 180 days, 3 seeds), ``quick`` (minutes on 2 CPU
cores: fewer marketplace users, shorter training, 2 seeds) and ``tiny`` (the
smoke test of tests/test_table2.py).  Every preset but ``tiny`` scores
every method on ``draws = 5`` seeded role draws (which users are cold); the
tables average over draws x users.  ``--dataset`` and ``--data_dir`` are
shorthands for ``--config.dataset`` and ``--config.data_dir``.  Override any
field, e.g. ``--config.methods=popularity,markov,gru --config.seeds=3``.
"""
from ml_collections import config_dict

from experiments.configs import select_variant

ALL_METHODS = ("popularity", "own_frequency", "last_step", "markov", "graphsage",
               "graphsage_linear", "gru", "sasrec", "conventional_em", "mlp_mapper",
               "initial_fusion", "dennl")

_VARIANTS = {
    "full": dict(seeds=3, marketplace_users=10000, marketplace_days=180, graphsage_steps=400,
                 embed_dim=128, seq_steps=600, hsmm_steps=300, hsmm_evals=6, em_restarts=4,
                 bootstrap=2000),
    "quick": dict(seeds=2, marketplace_users=1000, marketplace_days=90, graphsage_steps=150,
                  embed_dim=32, seq_steps=200, hsmm_steps=60, hsmm_evals=3, em_restarts=2,
                  bootstrap=1000),
    "tiny": dict(seeds=1, marketplace_users=120, marketplace_days=30, graphsage_steps=10,
                 embed_dim=8, seq_steps=10, hsmm_steps=4, hsmm_evals=2, em_restarts=1,
                 bootstrap=100, draws=1,
                 methods=("popularity", "markov", "graphsage")),
}


def get_config(arg=None):
  variant = select_variant(_VARIANTS, arg)
  v = dict(_VARIANTS[variant])
  c = config_dict.ConfigDict()
  c.preset = variant
  c.dataset = "movielens"          # "movielens" or "marketplace"
  c.data_dir = "../shared/data/movielens-latest-small"
  c.seed = 0                       # roles (cold users), marketplace simulation, bootstrap
  c.seeds = v["seeds"]             # training seeds: GraphSAGE + every method, metrics averaged
  # Role draws: the cold/train assignment is drawn `draws` times (draw 0 with
  # the key of a single-draw run, draw d > 0 with fold_in(key, d)); data,
  # split and training seeds are the same in every draw, every method is
  # retrained and scored on every draw (cold users' histories leave the
  # training set).  Tables: means over draws x users, intervals resampling
  # users (all of a user's draws together), the spread over draws beside them.
  c.draws = v.get("draws", 5)
  c.methods = v.get("methods", ALL_METHODS)
  # Sequences.  "auto": MovieLens in blocks of 10 ratings (by calendar day 55%
  # of its users have a single step; BUILD_NOTES "Deviations from the paper"), the
  # marketplace by calendar day (the paper).  Or "day" / "events" / "session".
  c.unit = "auto"
  c.events_per_step = 10           # block size when unit == "events"
  # Blocks: a trailing block of fewer than events_per_step events is dropped
  # ("drop": every step, validation and test included, is whole; the dropped
  # events follow the test step and reach nothing) or kept ("keep").
  c.partial = "drop"
  # Blocks: order of a user's events within one second ("hash": a fixed hash
  # of (user, item); "log": file order, on MovieLens movieId order).
  c.tie_order = "hash"
  # Sessions: a new step after more than session_gap seconds without an
  # event (30 min, the usual inactivity gap of session-based recommendation).
  c.session_gap = 1800
  c.max_steps = 200                # keep each user's last max_steps steps (None: all)
  c.min_steps = 2                  # users with fewer valid steps are reported, not evaluated
  # Marketplace simulation (dennl_jax.recsys.marketplace).  idle_days: days
  # without events between a user's first and last active day are steps of
  # the "no action" category (the paper's 17th); targets stay active days.
  c.idle_days = True
  c.marketplace_users = v["marketplace_users"]
  c.marketplace_days = v["marketplace_days"]
  # Cold-user protocol: held-out users shown only h steps before the test step.
  c.true_hsmm = True               # marketplace: add the generating HSMM's forecast (oracle row)
  c.cold_fraction = 0.2
  c.cold_history = (0, 1, 2)
  c.cold_embedding = "all_before_test"   # or "shown": embedding from the shown steps' items only
  c.test_embedding_includes_val = True   # test-task embeddings also see validation-step items
  # GraphSAGE (dennl_jax.recsys.graphsage.GraphSAGEConfig fields).
  c.graphsage = config_dict.ConfigDict(dict(
      embed_dim=v["embed_dim"], hidden_dim=max(v["embed_dim"], 32), num_steps=v["graphsage_steps"],
      batch_size=4096, fanout=10, holdout=0.1, log_every=50))
  # Per-method settings (plain dicts passed to each predictor's fit).
  seq = dict(num_steps=v["seq_steps"], eval_every=max(v["seq_steps"] // 6, 5), max_len=50)
  # Validation passes cost as much as training steps (every evaluated user,
  # every EM stage), so quick scores 4 candidates (steps 0, 20, 40, 60), full 7.
  # losses: one training run per loss; users with a history get the run best
  # on validation, users without one the run whose lambda_0 = g(e) forecasts
  # the validation step best from no history (or popularity).  Full: the
  # paper's eq. 9, random held-out steps, the predictive loss, and the
  # predictive loss plus lambda_0's no-history forecast ("+cold"); quick must
  # take minutes: "predictive+cold" only.  Override per network, e.g.
  # --config.method_config.dennl.losses="('predictive','predictive+cold')".
  hsmm = dict(num_steps=v["hsmm_steps"], eval_every=max(v["hsmm_steps"] // v["hsmm_evals"], 2),
              losses=("likelihood", "heldout", "predictive", "predictive+cold")
              if variant == "full" else ("predictive+cold",))
  c.method_config = config_dict.ConfigDict(dict(
      gru=dict(seq), sasrec=dict(seq), graphsage_linear=dict(seq),
      conventional_em=dict(kmeans_restarts=v["em_restarts"], dirichlet_restarts=v["em_restarts"]),
      mlp_mapper=dict(hsmm), initial_fusion=dict(hsmm), dennl=dict(hsmm)))
  c.bootstrap = v["bootstrap"]     # bootstrap resamples for every interval
  c.reference = "dennl"            # paired differences: reference - each method
  # Finished methods are stored per seed under <output_dir>/cache as they
  # finish; a rerun into the same output_dir loads them instead of retraining.
  c.resume = True
  c.cached_only = False            # report from the cache alone; methods not cached are left out
  c.fail_fast = variant == "tiny"  # else a failing method is logged, recorded and left out
  return c
