"""pytest configuration for the suite: XLA flags, markers' behaviour, fixtures
and hooks.  The helpers the tests import live in ``helpers.py`` and
``models_common.py``.
"""
from __future__ import annotations

import os


# The suite is compile-bound: most tests run a few small programs once.  Two
# XLA:CPU settings halve the compile time and change speed, not semantics:
# * -O0 code generation (LLVM's optimisation passes were ~40% of a training
#   test's wall time);
# * XLA:CPU's older IR emitters for fusions instead of the MLIR "fusion
#   emitters" (--xla_cpu_use_fusion_emitters=false): test_em + test_layer
#   took ~150 CPU-s with them and ~80 without (BUILD_NOTES "Dependencies and why").
# The same HLO passes run and XLA:CPU does not use fast-math either way, so
# every assertion is unchanged.  Experiments and benchmarks are not affected;
# an XLA_FLAGS that already sets either flag wins.  Subprocesses started by
# tests inherit them.
_TEST_XLA_FLAGS = {"xla_backend_optimization_level": "0", "xla_cpu_use_fusion_emitters": "false"}
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS")] + [
    f"--{name}={value}" for name, value in _TEST_XLA_FLAGS.items()
    if name not in os.environ.get("XLA_FLAGS", "")]))


import jax  # noqa: E402  (after XLA_FLAGS: XLA reads it when the backend starts)
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests: a fixed, derandomised set of examples day to day (the same
# every run), a deeper one in CI (which sets CI=true); both without deadlines,
# since the first example of a test compiles.
settings.register_profile("dev", max_examples=40, derandomize=True, deadline=None)
settings.register_profile("ci", max_examples=250, derandomize=True, deadline=None)
settings.load_profile(os.environ.get("DENNL_HYPOTHESIS_PROFILE",
                                     "ci" if os.environ.get("CI") else "dev"))


def _in_x64(item):
  """Generator for the hook wrappers below: jax_enable_x64 on while a test with
  the ``x64`` marker runs, the previous (global) value restored afterwards."""
  if item.get_closest_marker("x64") is None:
    return (yield)
  previous = jax.enable_x64.get_global()
  jax.config.update("jax_enable_x64", True)
  try:
    return (yield)
  finally:
    jax.config.update("jax_enable_x64", previous)


# float64 per test, never switched at import: a test (or module, with
# ``pytestmark = pytest.mark.x64``) that needs float64 carries the ``x64``
# marker.  The switch wraps each phase of the test -- setup, call and teardown --
# rather than living in an autouse fixture, because pytest sets up module-scoped
# fixtures before any function-scoped one: a module fixture that builds arrays
# must see float64 too.  The global flag (not the thread-local
# ``jax.enable_x64`` context) is set, so threads a test starts see it as well.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
  return (yield from _in_x64(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
  return (yield from _in_x64(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
  return (yield from _in_x64(item))


@pytest.fixture(scope="module")
def float32_default():
  """Run a module's tests with float32 as the default dtype, as the binaries do,
  even where ``JAX_ENABLE_X64`` is set in the environment.

  Pipelines that build float32 models from Python scalars (``jnp.full(K, 1 / K)``)
  would otherwise mix float64 and float32 leaves, and float64 posterior masses
  can reach ~1e-297 before they flush to zero (see BUILD_NOTES.md).  Use it with
  ``pytestmark = pytest.mark.usefixtures("float32_default")``.
  """
  with jax.enable_x64(False):
    yield


# Opt-in diagnosis of the suite's time: DENNL_COMPILE_REPORT=<file> appends
# one line per test -- seconds of XLA compilation, number of compilations,
# test id -- so slow tests can be told apart from slow-to-compile ones.
_COMPILE_REPORT = os.environ.get("DENNL_COMPILE_REPORT")
if _COMPILE_REPORT:
  _compile_seconds: list[float] = []

  def _on_duration(event, seconds, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      _compile_seconds.append(seconds)

  jax.monitoring.register_event_duration_secs_listener(_on_duration)

  @pytest.fixture(autouse=True)
  def _report_compile_time(request):
    start = len(_compile_seconds)
    yield
    spent = _compile_seconds[start:]
    with open(_COMPILE_REPORT, "a") as f:
      f.write(f"{sum(spent):8.2f} {len(spent):5d} {request.node.nodeid}\n")
