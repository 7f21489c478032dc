r"""Table 1 run as (seed, setting) pieces in worker processes, then pooled.

``python -m experiments.synthetic_table1`` with ``--config.workers`` > 1 (0:
one per core; the full and ablations presets' default) comes here.  Every
piece is a one-process ``synthetic_table1.run`` with ``seed = s,
num_seeds = 1, settings = (setting,)`` in ``output_dir/pieces/seed<s>_<setting>``
(the same ``--workdir`` layout, the parent's persistent compilation cache),
run by :mod:`experiments.workers`; the pieces are pooled with
``table1_pool.read_runs`` (which checks that their protocols agree) and
written by ``synthetic_table1.write_results``: the files of a one-process run.
A rerun skips the pieces that finished with the same config.  Results equal a
one-process run's with the same XLA:CPU thread count (BUILD_NOTES "Workers for
Table 1").
"""
from __future__ import annotations

import json
import os
import time

import jax
from ml_collections import config_dict

from experiments import common
from experiments import synthetic_table1 as T1
from experiments import table1_pool
from experiments import workers


def _piece_config(config, seed: int, setting: str):
  piece = config.copy_and_resolve_references()
  with piece.unlocked():
    piece.seed, piece.num_seeds, piece.settings, piece.workers = seed, 1, (setting,), 1
  return T1.prepare_config(piece)


def _piece_finished(directory: str, piece_config) -> bool:
  """The piece's run in ``directory`` finished its setting with this config."""
  try:
    saved = common.read_json(os.path.join(directory, "config.json"))
    rows = common.read_json(os.path.join(directory, "per_user.json"))
  except (OSError, ValueError):
    return False
  setting = piece_config.settings[0]
  return (saved == json.loads(json.dumps(common.to_jsonable(piece_config)))
          and len(rows) == 1 and all(setting in cells for cells in rows[0].values()))


def run_piece(spec_path: str) -> None:
  """A worker's entry point: the one-process run a piece spec (JSON) describes."""
  spec = common.read_json(spec_path)
  common.enable_compilation_cache(spec["compilation_cache_dir"])
  T1.run(config_dict.ConfigDict(spec["config"]), spec["output_dir"], workdir=spec["workdir"])


def _piece_order(config) -> list[tuple[int, str]]:
  """(seed, setting) pieces, longest sequences first so that short pieces fill
  the workers' last gaps; but first one piece of every sequence length.

  Pieces of one length compile the same programs, which a piece started later
  loads from the persistent XLA cache.  Two such pieces started together both
  compile them (T400 and noise20 side by side: noise20 took 460 s against
  330 s after T400 in one process, measured): different lengths first.
  """
  length = lambda p: T1.setting_spec(p[1], config.noise_length)[0]
  pieces = sorted(((seed, name) for seed in config.seeds for name in config.settings),
                  key=lambda p: (-length(p), p[0], T1.SETTINGS.index(p[1])))
  first, lengths = [], set()
  for p in pieces:
    if length(p) not in lengths:
      lengths.add(length(p))
      first.append(p)
  return first + [p for p in pieces if p not in first]


def run_in_workers(config, output_dir, workdir, num_workers):
  """``synthetic_table1.run`` of a prepared ``config`` in ``num_workers`` processes."""
  common.save_config(config, output_dir)
  common.log(f"config: {json.dumps(common.to_jsonable(config))}")
  t_start = time.time()
  order = _piece_order(config)
  directories, pieces = {}, []
  cache_dir = jax.config.jax_compilation_cache_dir or ""
  for seed, name in order:
    directory = directories[seed, name] = os.path.join(output_dir, "pieces", f"seed{seed}_{name}")
    piece_config = _piece_config(config, seed, name)
    if _piece_finished(directory, piece_config):
      common.log(f"[workers] seed {seed} {name}: finished earlier, kept ({directory})")
      continue
    spec = common.write_json(os.path.join(directory, "piece.json"), dict(
        config=piece_config, output_dir=directory, workdir=workdir or None,
        compilation_cache_dir=cache_dir))
    pieces.append(workers.Piece(f"seed {seed} {name}",
                                workers.python_call(__name__, "run_piece", spec),
                                os.path.join(directory, "log.txt")))
  common.log(f"[workers] {len(pieces)} of {len(order)} pieces to run, {num_workers} at once, "
             f"{workers.threads_per_worker(num_workers)} XLA thread(s) each")
  failed = workers.run_pieces(pieces, num_workers)
  if failed:
    raise RuntimeError(f"{len(failed)} piece(s) failed: {', '.join(failed)} (their logs are "
                       f"log.txt under {os.path.join(output_dir, 'pieces')}); the other pieces' "
                       "results are kept: rerun the same command to run only the missing ones")
  ordered = [directories[seed, name] for seed in config.seeds for name in config.settings]
  pooled, times, _ = table1_pool.read_runs(ordered)
  per_user, curves, selection = [], {}, {}
  for seed in config.seeds:
    rows = {}
    for name in config.settings:
      for row, acc in pooled[seed][name].items():
        rows.setdefault(row, {})[name] = acc
      for target, filename in ((curves, "curves.json"), (selection, "selection.json")):
        part = common.read_json(os.path.join(directories[seed, name], filename))
        target.setdefault(str(seed), {}).update(part[str(seed)])
    per_user.append(rows)
  return T1.write_results(output_dir, config, per_user, times, curves, selection, t_start)
