"""Data parallelism (dennl_jax.sharding): 4 devices give what 1 device gives.

The pytest process has already initialised JAX with one CPU device, so the
comparison runs in a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (this file's
``__main__``): fit_em, forecast and three DENNL training steps, each on
unsharded arrays (one device) and on arrays placed by ``shard_users`` /
``replicate`` (four devices), with U = 5 users (padded to 8).  The compiled
training step must be partitioned: per-device batch shapes and an all-reduce
for the gradient, never the whole batch gathered on one device; so must a
vmapped em_step that runs in blocks of users.
"""
from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import numpy as np
import pytest

NUM_DEVICES = 4
NUM_USERS, NUM_STEPS, NUM_STATES, NUM_SYMBOLS, EMBED = 5, 12, 2, 3, 3


def _data():
  import jax.numpy as jnp
  import dennl_jax as dj
  rng = np.random.default_rng(0)
  u, k = NUM_USERS, NUM_STATES
  hmms = dj.HMM(rng.dirichlet(np.ones(k), u), rng.dirichlet(np.ones(k), (u, k)),
                dj.Categorical(rng.dirichlet(np.ones(NUM_SYMBOLS), (u, k))))
  hmms = dj.HMM(*(jnp.asarray(x, jnp.float32) for x in (hmms.initial, hmms.transition)),
                dj.Categorical(jnp.asarray(hmms.emission.probs, jnp.float32)))
  obs = rng.integers(0, NUM_SYMBOLS, (u, NUM_STEPS)).astype(np.int32)
  mask = rng.random((u, NUM_STEPS)) < 0.8
  mask[:, 0] = True
  embedding = rng.normal(size=(u, EMBED)).astype(np.float32)
  return hmms, obs, mask, embedding


def _dennl():
  import jax.numpy as jnp
  from flax import nnx
  import dennl_jax as dj
  k = NUM_STATES
  start = dj.HMM(jnp.full(k, 1.0 / k), jnp.full((k, k), 1.0 / k),
                 dj.Categorical(jnp.asarray([[0.6, 0.3, 0.1], [0.1, 0.3, 0.6]])))
  return dj.DENNL(dj.ParamCodec(start), start, EMBED, num_stages=1, hidden=(8,),
                  start_hidden=(8,), latent_dim=4, layer=dj.EMLayer(gradient="spsa", num_samples=2),
                  rngs=nnx.Rngs(0))


def _run(mesh):
  """Every result of fit_em, forecast and three training steps; sharded when mesh is given."""
  import jax
  from flax import nnx
  import dennl_jax as dj
  from dennl_jax import sharding
  hmms, obs, mask, embedding = _data()
  place = (lambda t: sharding.shard_users(t, mesh)) if mesh else (lambda t: t)
  unpad = (lambda t: sharding.unpad_users(t, NUM_USERS)) if mesh else (lambda t: t)

  fitted, trace = unpad(dj.fit_em(*place((hmms, obs, mask)), num_iters=3))
  forecast = jax.jit(jax.vmap(partial(dj.forecast, num_steps=2)))
  predicted = unpad(forecast(*place((fitted, obs, mask))))

  graphdef, state = nnx.split(_dennl())
  optimizer = dj.make_optimizer(1e-2)
  opt_state = optimizer.init(state)
  step = dj.make_train_step(graphdef, dj.likelihood_loss, optimizer)
  batch = place(dj.Batch(embedding, obs, mask))
  if mesh:
    state, opt_state = sharding.replicate((state, opt_state), mesh)
  compiled = step.lower(state, opt_state, batch, jax.random.key(0)).compile()
  losses = []
  for i in range(3):
    state, opt_state, loss, skipped = compiled(state, opt_state, batch, jax.random.key(i))
    assert not bool(skipped)
    losses.append(loss)
  return (fitted, trace, predicted, losses, state), compiled.as_text()


def _worker():
  """Runs in the subprocess with NUM_DEVICES forced host devices."""
  import jax
  from dennl_jax import sharding
  assert jax.device_count() == NUM_DEVICES, jax.devices()
  one, _ = _run(None)
  mesh = sharding.users_mesh()
  many, hlo = _run(mesh)
  leaves_one, leaves_many = jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(many)
  assert len(leaves_one) == len(leaves_many)
  for a, b in zip(leaves_one, leaves_many):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-6)
  # Partitioned, not gathered: each device's program sees 8 / 4 = 2 users of obs.
  per_device = f"s32[{-(-NUM_USERS // NUM_DEVICES)},{NUM_STEPS}]"
  assert per_device in hlo, "the train step's batch is not sharded per device"
  assert f"s32[8,{NUM_STEPS}]" not in hlo, "the whole batch is materialised on a device"
  assert "all-reduce" in hlo, "no cross-device reduction of the loss/gradient"
  _check_user_blocks(mesh)
  print("SHARDING-OK")


def _check_user_blocks(mesh):
  """A vmapped em_step in blocks of users (4 here: the 8 padded users are 2 blocks) stays
  partitioned: every block is spread over the devices, nothing is gathered."""
  import jax
  import dennl_jax as dj
  from dennl_jax import sharding
  hmms, obs, mask, _ = _data()
  hmms = hmms.replace(kernels="users_minor", users_per_block=4)
  em = jax.jit(jax.vmap(dj.em_step))
  expected = em(hmms, obs, mask)
  placed = sharding.shard_users((hmms, obs, mask), mesh)
  # The kernel's carry is (K, users in a block): 4, not the 8 padded users.
  jaxpr = str(jax.make_jaxpr(jax.vmap(dj.em_step))(*placed))
  assert f"f32[{NUM_STATES},4]" in jaxpr and f"f32[{NUM_STATES},8]" not in jaxpr
  compiled = em.lower(*placed).compile()
  out = compiled(*placed)
  hlo = compiled.as_text()
  assert "all-gather" not in hlo, "blocks of users gathered across devices"
  assert out.transition.sharding.spec == sharding.shard_users(obs, mesh).sharding.spec
  for a, b in zip(jax.tree_util.tree_leaves(expected),
                  jax.tree_util.tree_leaves(sharding.unpad_users(out, NUM_USERS))):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-6)


@pytest.mark.slow
def test_four_devices_equal_one():
  flags = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                 "--xla_force_host_platform_device_count=4"]))
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(
      [os.path.join(root, "src"), os.path.dirname(__file__), env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0 and "SHARDING-OK" in proc.stdout, proc.stdout + proc.stderr


def test_padding_and_validation():
  import jax
  import dennl_jax as dj
  from dennl_jax import sharding
  mesh = sharding.users_mesh(jax.devices()[:1])
  assert sharding.padded_num_users(5, mesh) == 5
  hmms, obs, mask, embedding = _data()
  placed = sharding.shard_users(dj.Batch(embedding, obs, mask), mesh)
  np.testing.assert_array_equal(np.asarray(placed.mask), mask)
  with pytest.raises(ValueError, match="leading user axis"):
    sharding.shard_users((obs, mask[:3]), mesh)
  with pytest.raises(ValueError, match="Mesh"):
    sharding.shard_users(obs, object())
  # Padding as on a 4-device mesh (tested without one): copies, masked in a Batch.
  padded = sharding._pad(dj.Batch(embedding, obs, mask), NUM_USERS, 8)
  assert padded.obs.shape == (8, NUM_STEPS) and not np.asarray(padded.mask[NUM_USERS:]).any()
  np.testing.assert_array_equal(np.asarray(padded.embedding[NUM_USERS:]),
                                np.broadcast_to(embedding[0], (3, EMBED)))
  copies = sharding._pad((obs, mask), NUM_USERS, 8)
  np.testing.assert_array_equal(np.asarray(copies[1][NUM_USERS:]),
                                np.broadcast_to(mask[0], (3, NUM_STEPS)))
  with pytest.raises(ValueError, match="regression target"):
    sharding._pad(dj.Batch(embedding, obs, mask, embedding), NUM_USERS, 8)


if __name__ == "__main__":
  _worker()
