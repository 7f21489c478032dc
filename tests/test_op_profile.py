"""benchmarks/op_profile.py and the profile_ops binary: per-operation profiles on CPU."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import dennl_jax as dj
from benchmarks import bench_versions, op_profile, profile_ops, version_probes
from benchmarks.configs import profile_ops as profile_ops_config

# float64, as these tests ran in the full suite before x64 became a per-test
# marker (modules collected before them switched it on at import).
pytestmark = pytest.mark.x64

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scan_loss(x, n):
  # A fori_loop with a traced trip count: XLA keeps the while loop (no unrolling).
  return jnp.sum(jax.lax.fori_loop(0, n, lambda i, c: jnp.sin(c) * x, x))


def _compiled_text(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def test_parse_hlo_places_operations_in_their_loops_and_passes():
  x = jnp.linspace(0.1, 1.0, 64)
  forward = op_profile.parse_hlo(_compiled_text(_scan_loss, x, 5))
  whiles = [n for n, info in forward.items() if info["opcode"] == "while"]
  assert whiles
  in_loop = [info for info in forward.values() if info["loops"] and info["opcode"] != "parameter"]
  assert in_loop and all(info["loops"][0].startswith(tuple(w + ":" for w in whiles))
                         for info in in_loop)
  assert any(not info["loops"] for info in forward.values())  # the entry's operations
  assert all(op_profile.pass_of(info) == "forward" for info in forward.values())

  # A conditional runs its branches: their operations are its children, not siblings.
  switch = lambda x, i: jax.lax.switch(i, [lambda x: jnp.sin(x) * 3, lambda x: jnp.cos(x)], x)
  branches = op_profile.parse_hlo(_compiled_text(switch, jnp.ones(4096), 1))
  (conditional,) = [i for i in branches.values() if i["opcode"] == "conditional"]
  assert len(conditional["calls"]) == 2 and all(
      any(i["computation"] == c for i in branches.values()) for c in conditional["calls"])

  grad = op_profile.parse_hlo(_compiled_text(jax.grad(lambda x: _scan_loss(x, 5)), x))
  passes = {op_profile.pass_of(info) for info in grad.values() if info["loops"]}
  assert "backward" in passes  # the transposed loop (grad of a fori_loop: a scan)


def test_a_small_loop_compiled_as_one_kernel_is_one_call_operation():
  args = (jnp.linspace(0.1, 1.0, 64), 7)
  compiled = jax.jit(_scan_loss).lower(*args).compile()
  compiled(*args)
  rows = op_profile.profile(compiled, args, calls=2)
  assert rows and all(r["seconds_per_call"] > 0 for r in rows)
  assert [r["seconds_per_call"] for r in rows] == sorted((r["seconds_per_call"] for r in rows),
                                                         reverse=True)
  assert any(r["opcode"] in ("call", "while") for r in rows)
  with pytest.raises(ValueError, match="calls"):
    op_profile.profile(compiled, args, calls=0)


def test_profile_counts_every_run_of_a_loop_operation():
  # A single-threaded process (XLA_FLAGS is read when JAX starts), so no
  # operation is split over threads; 8192 elements, so the loop keeps its thunks.
  script = textwrap.dedent("""
      import json, jax, jax.numpy as jnp
      from benchmarks import op_profile
      def _scan_loss(x, n):
        return jnp.sum(jax.lax.fori_loop(0, n, lambda i, c: jnp.sin(c) * x, x))
      args = (jnp.linspace(0.1, 1.0, 8192, dtype=jnp.float32), 7)
      compiled = jax.jit(_scan_loss).lower(*args).compile()
      compiled(*args)
      rows = op_profile.profile(compiled, args, calls=2)
      print("ROWS " + json.dumps({"rows": rows, "regions": op_profile.by_region(rows)}))
  """)
  # float32 whatever the caller's environment: in float64 XLA:CPU runs this loop as one
  # kernel (a small-loop `call`), with no operation inside it to count.
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_X64="0",
             XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                       text=True, check=True).stdout
  result = json.loads(next(l for l in out.splitlines() if l.startswith("ROWS "))[5:])
  rows, regions = result["rows"], result["regions"]
  looped = [r for r in rows if r["loops"]]
  # The body's fusion runs once per iteration: 7 per call, in the loop's region.
  body = [r for r in looped if r["opcode"] == "fusion" and r["count_per_call"] == 7]
  assert body and all(len(r["loops"]) == 1 for r in body)
  # The condition runs 8 times, in the same loop; nothing outside the loop repeats.
  loop = body[0]["loops"][0]
  assert any(r["count_per_call"] == 8 and r["loops"] == [loop] for r in rows)
  assert all(r["count_per_call"] == 1 for r in rows if not r["loops"])
  assert any(r["loop"] != "(no loop)" and r["runs_per_call"] == 8 for r in regions)
  assert sum(r["seconds_per_call"] for r in regions) == pytest.approx(
      sum(r["seconds_per_call"] for r in rows))
  assert op_profile.overhead_per_run(rows, untraced_seconds=1e9) == 0.0
  # The body's fusion, the condition's and the loop's own time are "time scans" at
  # 7 steps; none of them is at 9 (nothing runs 9 times).
  split = {r["where"]: r for r in op_profile.by_time_scan(rows, 7)}
  assert split["time scans"]["seconds_per_call"] >= sum(r["seconds_per_call"] for r in body)
  assert "time scans" not in {r["where"] for r in op_profile.by_time_scan(rows, 9)}


@pytest.mark.slow
@pytest.mark.parametrize("code", ["", "HEAD"])
def test_profile_ops_tiny_run_writes_every_operation(tmp_path, code):
  config = profile_ops_config.get_config("tiny")
  config.probes = ("hmm_em_step",)
  config.calls = 1
  config.top = 3
  config.code = code
  result = profile_ops.run(config, str(tmp_path))
  assert result["code"] == ("checkout" if not code else
                            bench_versions.resolve_commit("HEAD"))
  (probe,) = result["probes"]
  assert probe["ops"] and probe["regions"] and probe["time_scans"]
  assert probe["traced_seconds_per_call"] == pytest.approx(
      sum(r["seconds_per_call"] for r in probe["ops"]))
  saved = json.loads((tmp_path / "results.json").read_text())
  assert len(saved["probes"][0]["ops"]) == len(probe["ops"])
  assert "costliest operations" in (tmp_path / "results.md").read_text()


def test_profile_ops_config_has_no_comparison_fields():
  config = profile_ops_config.get_config()
  assert "baseline" not in config and "pairs" not in config
  assert config.calls >= 1 and config.pin_one_core
  # The em_step probe comes with its peer, dynamax's smoother, at the same shape.
  hmm, dynamax = bench_versions.cases(config)[:2]
  assert (hmm["probe"], dynamax["probe"]) == ("hmm_em_step", "dynamax_smoother")
  assert {k: v for k, v in hmm.items() if k != "probe"} == {
      k: v for k, v in dynamax.items() if k != "probe"}


@pytest.mark.slow
def test_dynamax_probe_smooths_the_em_step_probes_data():
  case = dict(probe="dynamax_smoother", users=3, steps=7, states=2, symbols=3, repeats=1)
  fn, (params, obs, mask) = version_probes._em_step_call(case)
  posterior = fn(params, obs, mask)
  ours = jax.vmap(dj.posterior)(params, obs, mask)
  assert jnp.allclose(posterior.smoothed_probs, ours.smoothed_probs, atol=1e-5)
  assert jnp.allclose(posterior.marginal_loglik, ours.log_likelihood, atol=1e-4)
