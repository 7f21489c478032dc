"""The ``x64`` marker (tests/conftest.py): float64 for the marked test only, its
module-scoped fixtures included, and the previous setting back afterwards."""
import os

import jax
import jax.numpy as jnp
import pytest

DEFAULT_X64 = os.environ.get("JAX_ENABLE_X64", "0").lower() in ("1", "true")


@pytest.fixture(scope="module")
def built_by_a_module_fixture():
  return jnp.zeros(2)


@pytest.mark.x64
def test_a_marked_test_and_its_module_fixtures_run_in_float64(built_by_a_module_fixture):
  assert jax.config.jax_enable_x64
  assert jnp.zeros(2).dtype == jnp.float64
  assert built_by_a_module_fixture.dtype == jnp.float64


@pytest.mark.skipif(DEFAULT_X64, reason="JAX_ENABLE_X64 is set: float64 everywhere")
def test_an_unmarked_test_after_it_runs_in_float32():
  assert not jax.config.jax_enable_x64
  assert jnp.zeros(2).dtype == jnp.float32
