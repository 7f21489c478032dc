"""chunked_map: same result as one call, one compilation whatever the last chunk's size."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dennl_jax as dj
from helpers import random_hmm, random_obs, stack_trees

# float64, as these tests ran in the full suite before x64 became a per-test
# marker (modules collected before them switched it on at import).
pytestmark = pytest.mark.x64


@pytest.mark.parametrize("num,chunk_size", [(7, 3), (6, 3), (2, 5), (1, 1)])
def test_chunked_map_matches_one_call_and_compiles_once(num, chunk_size):
  traces = []

  @jax.jit
  def fn(chunk, index):
    traces.append(chunk["x"].shape)
    return {"y": chunk["x"] * 2.0 + index, "z": chunk["w"].sum(-1)}

  x = jnp.arange(num, dtype=jnp.float32)
  w = jnp.arange(num * 2, dtype=jnp.float32).reshape(num, 2)
  out = dj.chunked_map(fn, {"x": x, "w": w}, chunk_size)
  index = np.arange(num) // min(chunk_size, num)
  np.testing.assert_array_equal(out["y"], 2.0 * np.asarray(x) + index)
  np.testing.assert_array_equal(out["z"], np.asarray(w).sum(-1))
  assert traces == [(min(chunk_size, num),)]     # the padded last chunk reuses the compilation


def test_chunked_map_rejects_bad_chunk_size():
  with pytest.raises(ValueError, match="chunk_size"):
    dj.chunked_map(lambda c, i: c, jnp.ones(3), 0)


def test_decode_states_equals_vmapped_viterbi():
  rng = np.random.default_rng(5)
  params = stack_trees([random_hmm("poisson", rng, 2) for _ in range(5)])
  obs = np.stack([random_obs("poisson", rng, 9) for _ in range(5)])
  mask = np.ones((5, 9), bool)
  mask[2, 6:] = False
  expected = jax.vmap(dj.viterbi)(params, obs, mask)
  np.testing.assert_array_equal(dj.decode_states(params, obs, mask, chunk_size=2), expected)
