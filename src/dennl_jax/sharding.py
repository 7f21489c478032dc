"""Data parallelism over users with JAX's own sharding.

Every batched computation in the engine is independent across users (the
leading axis U of parameters, observations and masks), so data parallelism
is a placement decision: put the users' rows on different devices, replicate
what every user shares (network weights, optimiser state), and ``jax.jit``
partitions the program -- each device runs the per-user work of its rows, and
the compiler inserts the cross-device reductions a loss or its gradient
needs (an all-reduce of the gradient; nothing is gathered onto one device).
No function of the engine changes: ``fit_em``, ``forecast`` under
``jax.vmap``, a network's forward pass and ``training.make_train_step`` all
run data-parallel when called on arrays placed by :func:`shard_users` and
:func:`replicate`.

Users not divisible by the device count.  A sharded axis must divide evenly,
so :func:`shard_users` pads the user axis to the next multiple of the device
count with copies of the first user.  In a :class:`~dennl_jax.training.Batch`
the padding users' ``mask`` rows are all False: a user with no valid step
contributes nothing to a mask-weighted loss (``likelihood_loss``,
``heldout_step_loss``: both divide by counts of valid steps) nor to its
gradient, so padding never changes a loss or a trained parameter.  (A loss
that averages over rows -- ``regression_loss`` -- would count them, so a
``Batch`` with a ``target`` must not need padding: ValueError.)  In any
other tree (e.g. ``(params, obs, mask)`` for ``fit_em``) the copies keep
user 0's mask, so they are valid inputs; per-user results of the real users
do not depend on them, and :func:`unpad_users` slices them off.

Several hosts.  Call ``jax.distributed.initialize()`` first on every host
(see docs/scaling.md, "Several hosts"); ``users_mesh()`` then spans the
devices of all hosts, and each host passes its *global* batch to
:func:`shard_users` (every host must build the same batch, e.g. from the same
key) -- ``jax.device_put`` keeps only the rows of local devices.
"""
from __future__ import annotations

import numpy as np

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dennl_jax.batch import Batch
from dennl_jax.chunking import pad_leading

USERS = "users"


def users_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis ``"users"`` over ``devices`` (default: every device, all hosts).

  The axis is ``AxisType.Auto``: the compiler propagates shardings through
  jitted code (no sharding annotations needed inside the engine).
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("users_mesh needs at least one device")
  return Mesh(np.asarray(devices), (USERS,), axis_types=(AxisType.Auto,))


def _check_mesh(mesh) -> None:
  if not isinstance(mesh, Mesh) or USERS not in mesh.axis_names:
    raise ValueError(f"expected a jax.sharding.Mesh with a {USERS!r} axis (users_mesh()), "
                     f"got {mesh!r}")


def _num_users(tree) -> int:
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    raise ValueError("shard_users needs at least one array")
  sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"every leaf needs the same leading user axis; found leading sizes {sizes}")
  return sizes.pop()


def padded_num_users(num_users: int, mesh) -> int:
  """The smallest multiple of the mesh's ``users`` size that holds ``num_users``."""
  size = mesh.shape[USERS]
  return -(-num_users // size) * size


def shard_users(tree, mesh):
  """``tree`` with its leading user axis split across the mesh's devices.

  tree: pytree of arrays with a common leading axis U (a batched model,
  ``(params, obs, mask)``, a :class:`~dennl_jax.training.Batch`, ...).
  Returns the same structure with leading axis ``padded_num_users(U, mesh)``
  (U itself when the device count divides it), every leaf a ``jax.Array``
  sharded as ``PartitionSpec("users")``; see the module docstring for what
  the padding users are.  The input is not modified.
  """
  _check_mesh(mesh)
  if jax.process_count() > 1:
    # Host data, identical on every process; device_put keeps the local rows.
    tree = jax.tree_util.tree_map(np.asarray, tree)
  num_users = _num_users(tree)
  size = padded_num_users(num_users, mesh)
  if size != num_users:
    tree = _pad(tree, num_users, size)
  sharding = NamedSharding(mesh, PartitionSpec(USERS))
  return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), tree)


def _pad(tree, num_users: int, size: int):
  padded = pad_leading(tree, size)
  if not isinstance(tree, Batch):
    return padded
  if tree.target is not None:
    raise ValueError(
        f"{num_users} users do not divide over the mesh's devices and a Batch with a "
        "regression target cannot be padded (its loss averages over rows); use a batch "
        "size divisible by the device count")
  real = np.arange(size) < num_users
  return padded._replace(mask=padded.mask & real[:, None])


def unpad_users(tree, num_users: int):
  """The first ``num_users`` rows of every leaf (drops :func:`shard_users`' padding)."""
  return jax.tree_util.tree_map(lambda x: x[:num_users], tree)


def replicate(tree, mesh):
  """``tree`` (network state, optimiser state, a shared model) copied to every device of ``mesh``."""
  _check_mesh(mesh)
  sharding = NamedSharding(mesh, PartitionSpec())
  return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), tree)
