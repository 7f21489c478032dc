"""Shared plumbing of the experiment binaries: configs, timing, result files.

Every binary loads an ``ml_collections`` config (``experiments/configs/<name>.py``)
through ``config_flags``, times with :func:`timer` / :func:`median_seconds` /
:func:`interleaved_median_seconds`, and writes its outputs with
:func:`write_json`, :func:`write_markdown` (tables from :func:`markdown_table`)
and :func:`save_config`, so every results directory has the same layout:
``config.json`` (the exact config of the run) beside the binary's JSON and
markdown files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from ml_collections import config_dict

from dennl_jax import memory

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The paper's binaries keep their configs in experiments/configs, the
# performance lab in benchmarks/configs; a name lives in exactly one of them.
_CONFIG_PACKAGES = ("experiments", "benchmarks")


class ConfigError(ValueError):
  """A config value a binary cannot run with (reported as a usage error)."""


def _config_package(name: str) -> str:
  for package in _CONFIG_PACKAGES:
    if os.path.exists(os.path.join(_REPO, package, "configs", f"{name}.py")):
      return package
  raise ValueError(f"no config module {name!r} in experiments/configs or benchmarks/configs")


def config_path(name: str) -> str:
  """Absolute path of ``experiments/configs/<name>.py`` (``benchmarks/configs``
  for the benchmarks): the ``--config`` default of a binary, valid from any
  working directory."""
  return os.path.join(_REPO, _config_package(name), "configs", f"{name}.py")


def get_config(name: str, variant: str | None = None) -> config_dict.ConfigDict:
  """``<experiments|benchmarks>/configs/<name>.py``'s ``get_config(variant)``."""
  return importlib.import_module(f"{_config_package(name)}.configs.{name}").get_config(variant)


# Default persistent XLA cache of the long-running binaries: a rerun skips
# compilation (``--compilation_cache_dir=`` turns it off).
XLA_CACHE_DIR = "~/.cache/dennl_jax/xla"


class BinaryFlags:
  """The flags every binary shares, defined when the binary starts.

  ``--config`` (``config_flags.DEFINE_config_file``, default
  ``experiments/configs/<name>.py`` with no variant), ``--output_dir`` (a
  plain string flag), ``--compilation_cache_dir`` and one boolean shorthand
  per entry of ``variants`` (``{"quick": "quick"}`` makes ``--quick`` mean
  ``--config=<file>:quick``; explicitly given ``--config.X`` overrides still
  win).  Binaries define no flags at import, so tests import any number of
  them into one process and call their ``run(config, output_dir)``.
  ``flag_values``/``sys_argv`` let a test parse a command line of its own.
  ``tracked=True`` adds ``--workdir`` (checkpoints, resume and TensorBoard/JSONL
  metrics of every training loop; rerunning with the same workdir resumes) and
  ``--[no]progress`` (tqdm bars), see :meth:`run_options`.
  """

  def __init__(self, name: str, *, output_dir: str | None, variants: Mapping[str, str] = (),
               compilation_cache_dir: str = "", flag_values=None, sys_argv=None,
               tracked: bool = False):
    from absl import flags
    from ml_collections import config_flags
    self.name = name
    self.flag_values = flags.FLAGS if flag_values is None else flag_values
    fv = self.flag_values
    self._config = config_flags.DEFINE_config_file(
        "config", config_path(name), f"Config file[:variant]; see {_config_package(name)}/configs/{name}.py.",
        flag_values=fv, lock_config=True, sys_argv=sys_argv)
    self._output_dir = flags.DEFINE_string(
        "output_dir", output_dir, "Results directory" + ("" if output_dir else
                                                        " (none: print only)."), flag_values=fv)
    self._cache_dir = flags.DEFINE_string(
        "compilation_cache_dir", compilation_cache_dir,
        "Persistent XLA compilation cache ('' disables).", flag_values=fv)
    self._variants = {
        variant: flags.DEFINE_boolean(
            flag, False, f"Shorthand for --config={_config_package(name)}/configs/{name}.py:{variant}.",
            flag_values=fv)
        for flag, variant in dict(variants).items()}
    self._tracked = tracked
    if tracked:
      self._workdir = flags.DEFINE_string(
          "workdir", "", "Checkpoints and metrics (TensorBoard + JSONL) of every training loop, "
          "one subdirectory per method and seed; rerun with the same workdir to resume "
          "('' = none).", flag_values=fv)
      self._progress = flags.DEFINE_boolean(
          "progress", True, "tqdm progress bars on long loops (--noprogress: off).",
          flag_values=fv)

  def run_options(self) -> dict:
    """``{"workdir": str | None, "progress": bool}`` for a tracked binary's ``run``."""
    if not self._tracked:
      return {}
    return {"workdir": self._workdir.value or None, "progress": self._progress.value}

  @property
  def output_dir(self) -> str | None:
    return self._output_dir.value

  @property
  def compilation_cache_dir(self) -> str:
    return self._cache_dir.value

  def config(self) -> config_dict.ConfigDict:
    """The parsed config, with a given variant shorthand applied."""
    chosen = [v for v, holder in self._variants.items() if holder.value]
    if not chosen:
      return self._config.value
    if len(chosen) > 1:
      raise ConfigError(f"variant shorthands {chosen} given together")
    return with_variant(self.flag_values["config"],
                        lambda arg: get_config(self.name, arg), chosen[0])


def with_variant(config_flag, get_config_fn: Callable, variant: str):
  """``get_config_fn(variant)`` with the command line's ``--config.X`` overrides re-applied.

  ``config_flag`` is ``FLAGS["config"]``; an explicitly given ``--config``
  already names its variant, so combining it with a shorthand is an error.
  """
  from ml_collections import config_flags
  if config_flag.present:
    raise ConfigError(f"--config and the {variant!r} shorthand both pick a config; "
                      f"use --config=<file>:{variant} alone")
  config = get_config_fn(variant)
  config.update_from_flattened_dict(dict(config_flags.get_override_values(config_flag)))
  return config


def app_main(name: str, run: Callable[[config_dict.ConfigDict, str | None], Any], *,
             output_dir: str | None = None, variants: Mapping[str, str] = (),
             compilation_cache_dir: str = "", tracked: bool = False) -> None:
  """Entry point of ``python -m experiments.<name>``: defines :class:`BinaryFlags`,
  parses the command line and calls ``run(config, output_dir)`` (tracked:
  ``run(config, output_dir, workdir=..., progress=...)``).  A
  :class:`ConfigError` from ``run`` is reported as a usage error."""
  from absl import app
  binary = BinaryFlags(name, output_dir=output_dir, variants=variants,
                       compilation_cache_dir=compilation_cache_dir, tracked=tracked)

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    keep_freed_memory()
    try:
      config = binary.config()
      enable_compilation_cache(binary.compilation_cache_dir)
      run(config, binary.output_dir, **binary.run_options())
    except ConfigError as e:
      raise app.UsageError(str(e)) from e

  app.run(main)


def keep_freed_memory() -> bool:
  """:func:`dennl_jax.keep_freed_memory` in this process, and its settings in the
  environment that worker processes inherit (glibc reads them when a process
  starts).  The binaries call it first (:func:`app_main`, table2): their
  programs' temporaries then reuse their pages instead of page-faulting on
  fresh ones every call (BUILD_NOTES "Memory: `keep_freed_memory`").  Results do
  not change."""
  os.environ.update(memory.malloc_environment())
  return memory.keep_freed_memory()


def add_tracking_arguments(parser) -> None:
  """``--workdir`` and ``--progress/--noprogress`` for an argparse binary (as
  :class:`BinaryFlags` with ``tracked=True``)."""
  parser.add_argument("--workdir", default="", help="checkpoints and TensorBoard/JSONL metrics; "
                      "rerun with the same workdir to resume ('' = none)")
  parser.add_argument("--progress", dest="progress", action="store_true", default=True,
                      help="tqdm progress bars (default)")
  parser.add_argument("--noprogress", dest="progress", action="store_false",
                      help="no progress bars")


def subdir(workdir: str | None, *parts) -> str | None:
  """``workdir/part/...`` (one per method, seed, ...), or None without a workdir.
  Brackets in a part become ``_`` (orbax cannot restore from such a path)."""
  if not workdir:
    return None
  return os.path.join(workdir, *(str(p).replace("[", "_").replace("]", "") for p in parts))


def log(message: str) -> None:
  print(message, flush=True)


def enable_compilation_cache(cache_dir: str) -> None:
  """Persistent XLA cache in ``cache_dir`` ('' leaves it off)."""
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# ------------------------------------------------------------------ timing


class _Elapsed:
  seconds: float = float("nan")


@contextlib.contextmanager
def timer():
  """``with timer() as t: ...`` then ``t.seconds`` (wall clock).

  Waits on nothing: call ``jax.block_until_ready`` inside the block on what
  must be finished (dispatch is asynchronous).
  """
  elapsed = _Elapsed()
  start = time.perf_counter()
  try:
    yield elapsed
  finally:
    elapsed.seconds = time.perf_counter() - start


def timed(fn: Callable) -> Callable:
  """``fn`` returning ``(result, wall seconds)``; the result is blocked on."""
  def wrapped(*args, **kwargs):
    with timer() as t:
      out = jax.block_until_ready(fn(*args, **kwargs))
    return out, t.seconds
  return wrapped


def interleaved_median_seconds(calls: Sequence[tuple[Callable, tuple]], repeats: int,
                               warmup: bool = True) -> list[tuple[float, list[float]]]:
  """``(median seconds, all seconds)`` of each ``(fn, args)`` call.

  One untimed warm-up call each (compilation) unless ``warmup`` is False;
  every timing waits on ``block_until_ready``.  The calls alternate within
  each repeat, so load from other processes on a shared machine hits every
  method alike.
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  if warmup:
    for fn, args in calls:
      jax.block_until_ready(fn(*args))
  times = [[] for _ in calls]
  for _ in range(repeats):
    for (fn, args), out in zip(calls, times):
      with timer() as t:
        jax.block_until_ready(fn(*args))
      out.append(t.seconds)
  return [(float(np.median(t)), t) for t in times]


def median_seconds(fn: Callable, *args, repeats: int = 5,
                   warmup: bool = True) -> tuple[float, list[float]]:
  """``(median seconds, all seconds)`` of ``fn(*args)``; see :func:`interleaved_median_seconds`."""
  return interleaved_median_seconds([(fn, args)], repeats, warmup)[0]


# ---------------------------------------------------------------- results


def to_jsonable(obj: Any) -> Any:
  """Plain-Python copy of ``obj``: ConfigDicts, dataclasses, NamedTuples,
  numpy/jax arrays and scalars become dicts, lists and numbers."""
  if isinstance(obj, config_dict.ConfigDict):
    return to_jsonable(obj.to_dict())
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return to_jsonable(dataclasses.asdict(obj))
  if isinstance(obj, tuple) and hasattr(obj, "_asdict"):
    return to_jsonable(obj._asdict())
  if isinstance(obj, Mapping):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, (np.ndarray, jax.Array)):
    return to_jsonable(np.asarray(obj).tolist())
  if isinstance(obj, np.generic):
    return obj.item()
  return obj


def write_json(path: str, obj: Any, indent: int | None = 2) -> str:
  """Write ``obj`` (see :func:`to_jsonable`) as JSON; creates the directory."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(to_jsonable(obj), f, indent=indent)
    f.write("\n")
  return path


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def save_config(config: Any, output_dir: str) -> str:
  """Write the run's config to ``output_dir/config.json``; returns the path."""
  return write_json(os.path.join(output_dir, "config.json"), config)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]],
                   align: Sequence[str] | str | None = None) -> list[str]:
  """Lines of a markdown table.

  header: column titles; rows: cells (``str()`` is applied, so format numbers
  first); align: one of ``"left"``, ``"right"`` per column (or one for all),
  default left.
  """
  header = [str(h) for h in header]
  if align is None or isinstance(align, str):
    align = [align or "left"] * len(header)
  if len(align) != len(header):
    raise ValueError(f"{len(align)} alignments for {len(header)} columns")
  marks = {"left": "---", "right": "---:"}
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
  for row in rows:
    row = [str(c) for c in row]
    if len(row) != len(header):
      raise ValueError(f"row {row} has {len(row)} cells for {len(header)} columns")
    lines.append("| " + " | ".join(row) + " |")
  return lines


def write_markdown(path: str, *blocks: str | Sequence[str]) -> str:
  """Write blocks (strings, or lists of lines such as :func:`markdown_table`'s)
  separated by blank lines; creates the directory; returns the text."""
  parts = [b if isinstance(b, str) else "\n".join(b) for b in blocks]
  text = "\n\n".join(p.rstrip("\n") for p in parts) + "\n"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return text


def write_markdown_table(path: str, header: Sequence[str], rows: Iterable[Sequence[Any]],
                         title: str | None = None, align=None) -> str:
  """One table (with an optional title line above it) as a markdown file."""
  table = markdown_table(header, rows, align)
  return write_markdown(path, *([title] if title else []), table)


def names(value) -> tuple[str, ...]:
  """A tuple of names from a config field: a tuple/list of names, or one
  comma-separated string (``--config.methods=dennl,em_mapping``)."""
  if isinstance(value, str):
    value = (value,)
  return tuple(n.strip() for item in value for n in str(item).split(",") if n.strip())
