"""Where a compiled program's time goes, per XLA operation, on CPU.

XLA:CPU runs a program as thunks (fusions, copies, dots, while loops, calls,
...), and each thunk's execution is a trace event of ``jax.profiler``, named
after its HLO instruction.  :func:`profile` traces a few calls of a compiled
program and joins the events with the optimised HLO text: each instruction's
shape, its JAX ``op_name`` (the transformation path, e.g.
``jit(step)/transpose(jvp())/while/body/...``) and the while loops it runs in.
A while loop or call is charged only its own time (its duration less that of
the traced operations of the computations it runs): a small loop that XLA
compiles into one kernel shows as one ``call`` operation.

Used by :mod:`benchmarks.profile_ops` (the binary) and
:mod:`benchmarks.version_probes`.  Durations carry the tracer's own overhead
(about a microsecond per operation run, :func:`overhead_per_run`): the small
operations inside long scans look slower than they are, and the total exceeds
an untraced call's time.  Profile single-threaded (XLA_FLAGS
``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``): with
several threads an operation split over them is traced once per part, so its
time is CPU time and its runs count the parts (a very large fusion, ~10^5
elements, can be split even single-threaded).
"""
from __future__ import annotations

import collections
import glob
import re
import tempfile

import jax


_COMPUTATION = re.compile(r"^(?:ENTRY )?(%[\w.\-]+) .*\{\s*$")
# The shape may be a tuple with spaces; the opcode is the first "name(" after it.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_BODY = re.compile(r"(?:body|condition)=(%[\w.\-]+)")
_CALLS = re.compile(r"(?:calls|to_apply|true_computation|false_computation)=(%[\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def parse_hlo(text: str) -> dict[str, dict]:
  """Instruction name -> {shape, opcode, op_name, loops} of an optimised HLO module.

  ``loops``: the while loops around the instruction, outermost first, each as
  ``"<while instruction>: <its op_name>"``; ``computation``: the computation it
  is in; ``calls``: the computations it runs (fusion bodies, loop bodies, ...).
  """
  computation_of, instructions = {}, {}
  body_of = {}      # while body or condition -> (while instruction, its computation)
  called_from = {}  # any other called computation -> calling instruction's computation
  current = None
  for line in text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = match.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match or current is None:
      continue
    name, shape, opcode = match.groups()
    op_name = _OP_NAME.search(line)
    branches = [b.strip() for group in _BRANCHES.findall(line) for b in group.split(",")]
    calls = _CALLS.findall(line) + branches + _BODY.findall(line)
    instructions[name] = {"shape": shape, "opcode": opcode,
                          "op_name": op_name.group(1) if op_name else "", "calls": calls}
    computation_of[name] = current
    if opcode == "while":
      for loop_computation in _BODY.findall(line):
        body_of[loop_computation] = (name, current)
    for called in _CALLS.findall(line) + branches:
      called_from.setdefault(called, current)
  for name in instructions:
    instructions[name]["computation"] = computation_of[name]

  def loops(computation, seen=()):
    if computation in seen:
      return []
    if computation in body_of:
      loop, parent = body_of[computation]
      return loops(parent, seen + (computation,)) + [f"{loop}: {instructions[loop]['op_name']}"]
    if computation in called_from:
      return loops(called_from[computation], seen + (computation,))
    return []

  for name, info in instructions.items():
    info["loops"] = loops(computation_of[name])
  return instructions


def _events(trace_dir: str):
  paths = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
  if not paths:
    raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
  data = jax.profiler.ProfileData.from_file(paths[0])
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        yield event.name, event.duration_ns


def profile(compiled, args, calls: int = 3) -> list[dict]:
  """Per-operation time of ``compiled(*args)``, traced over ``calls`` calls.

  compiled: a ``jax.stages.Compiled`` (``jax.jit(f).lower(*args).compile()``),
    already called once (so no first-call work is traced).  A call dispatched
    before and not waited for may run late (XLA:CPU executes asynchronously, on
    its own threads): one blocked call settles it, so no operation of an earlier
    call is counted in the traced ones.
  Returns one row per HLO instruction that ran (loops and calls with their own
  time only), largest first: ``{op, seconds_per_call, count_per_call, shape,
  opcode, op_name, loops, computation, calls}``.
  """
  if calls < 1:
    raise ValueError(f"calls must be >= 1, got {calls}")
  instructions = parse_hlo(compiled.as_text())
  jax.block_until_ready(compiled(*args))  # untraced: earlier asynchronous calls are done
  with tempfile.TemporaryDirectory(prefix="op_profile_") as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(calls):
        jax.block_until_ready(compiled(*args))
    seconds, counts = collections.Counter(), collections.Counter()
    for name, duration_ns in _events(trace_dir):
      if name in instructions:
        seconds[name] += duration_ns * 1e-9 / calls
        counts[name] += 1
  if not seconds:
    raise RuntimeError("no XLA operation of the program was traced (not an XLA:CPU program?)")
  inner = collections.Counter()  # traced time of the operations each computation ran
  for name, s in seconds.items():
    inner[instructions[name]["computation"]] += s
  own = {name: max(0.0, s - sum(inner[c] for c in instructions[name]["calls"]
                                if instructions[name]["opcode"] != "fusion"))
         for name, s in seconds.items()}
  return [dict(instructions[name], op=name, seconds_per_call=own[name],
               count_per_call=counts[name] / calls)
          for name in sorted(own, key=own.get, reverse=True) if own[name] > 0]


def pass_of(row: dict) -> str:
  """``backward`` for an operation of a reverse-mode pass (``transpose(...)`` in its
  op_name or in that of a loop around it), ``forward`` otherwise."""
  return "backward" if any("transpose(" in n for n in [row["op_name"], *row["loops"]]) else "forward"


def _short(op_name: str, parts: int = 4) -> str:
  return "/".join(op_name.split("/")[-parts:]) if op_name else "(unnamed)"


def by_region(rows: list[dict]) -> list[dict]:
  """Seconds per (pass, innermost while loop): where a program spends its time.

  The loop is its while instruction and the tail of its op_name (``(no loop)``
  outside loops); ``runs_per_call`` is the most runs of one operation in it (a
  scan's length times the runs of the loops around it).
  """
  totals, runs, events = collections.Counter(), collections.Counter(), collections.Counter()
  for row in rows:
    loops = row["loops"]
    if loops:
      name, op_name = loops[-1].split(": ", 1)
      where = f"{name}: {_short(op_name)} (depth {len(loops)})"
    else:
      where = "(no loop)"
    key = (pass_of(row), where)
    totals[key] += row["seconds_per_call"]
    runs[key] = max(runs[key], row["count_per_call"])
    events[key] += row["count_per_call"]
  return [{"pass": p, "loop": loop, "seconds_per_call": s, "runs_per_call": runs[(p, loop)],
           "operation_runs_per_call": events[(p, loop)]}
          for (p, loop), s in totals.most_common()]


def by_time_scan(rows: list[dict], num_steps: int) -> list[dict]:
  """Seconds per (pass, inside or outside the scans over time steps).

  An operation is in a time scan when it runs at least ``num_steps`` times per
  call (a scan over T steps, possibly inside loops over stages or blocks); a
  loop's own time counts there when an operation of its body does.  The rest --
  emission log-likelihoods, layout changes, M-steps, networks, residuals -- is
  the per-call work around the recursions.
  """
  scans = {r["loops"][-1].split(":", 1)[0] for r in rows
           if r["loops"] and r["count_per_call"] >= num_steps}
  totals, events = collections.Counter(), collections.Counter()
  for row in rows:
    inside = row["count_per_call"] >= num_steps or row["op"] in scans
    key = (pass_of(row), "time scans" if inside else "outside time scans")
    totals[key] += row["seconds_per_call"]
    events[key] += row["count_per_call"]
  return [{"pass": p, "where": w, "seconds_per_call": totals[(p, w)],
           "operation_runs_per_call": events[(p, w)]} for p, w in sorted(totals)]


def overhead_per_run(rows: list[dict], untraced_seconds: float) -> float:
  """Seconds the tracer added per operation run: (traced total - untraced call time)
  / operation runs per call (0 when tracing added nothing measurable).  A
  region's time less its ``operation_runs_per_call`` times this estimates its
  untraced time."""
  runs = sum(r["count_per_call"] for r in rows)
  traced = sum(r["seconds_per_call"] for r in rows)
  return max(0.0, traced - untraced_seconds) / runs if runs else 0.0


def format_rows(rows: list[dict], top: int) -> tuple[list[str], list[str]]:
  """(header, rows) of a markdown table of the ``top`` operations."""
  total = sum(r["seconds_per_call"] for r in rows)
  lines = []
  for r in rows[:top]:
    lines.append(f"| {1e3 * r['seconds_per_call']:.3f} | {100 * r['seconds_per_call'] / total:.1f} % "
                 f"| {r['count_per_call']:g} | `{r['op']}` | `{r['shape'][:40]}` "
                 f"| {pass_of(r)} | `{_short(r['op_name'], 5)}` |")
  header = ["| ms per call | share | runs per call | operation | shape | pass | op_name (tail) |",
            "|---:|---:|---:|---|---|---|---|"]
  return header, lines
