"""One helper for every chunked batch loop over users.

Memory-bound batch work (per-user EM, Viterbi decoding, a network's
parameters for every user) goes through the users in chunks.  Every chunk
is padded to the same size, so a jitted ``fn`` compiles once for any number
of users -- a short final chunk would otherwise trigger a second compilation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def pad_leading(tree, size: int):
  """Pad the leading (user) axis of every leaf to ``size`` by repeating entry 0."""
  def pad(x):
    extra = size - x.shape[0]
    return x if extra == 0 else jnp.concatenate([x, jnp.repeat(x[:1], extra, 0)], 0)
  return jax.tree_util.tree_map(pad, tree)


def chunked_map(fn, batched, chunk_size: int = 256):
  """``fn`` over chunks of the leading axis of ``batched``, results concatenated.

  Args:
    fn: ``fn(chunk, index) -> out``: ``chunk`` has the structure of
      ``batched`` with a leading axis of ``min(chunk_size, N)`` entries;
      ``index`` is the chunk number as an int32 scalar array (e.g. to fold
      into a PRNG key); every leaf of ``out`` has the chunk's leading axis.
      Pass a jitted function: every call sees the same shapes.
    batched: a pytree of arrays with a common leading axis N.
    chunk_size: the most entries per call.

  Returns:
    ``out`` for all N entries (leading axis N).  The last chunk is padded by
    repeating its first entry; the padded rows' outputs are dropped, so
    ``fn`` must treat rows independently.
  """
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  leaves = jax.tree_util.tree_leaves(batched)
  if not leaves:
    raise ValueError("chunked_map needs at least one batched array")
  num = leaves[0].shape[0]
  size = min(chunk_size, num)
  outs = []
  for index, lo in enumerate(range(0, num, size)):
    hi = min(lo + size, num)
    chunk = pad_leading(jax.tree_util.tree_map(lambda x: x[lo:hi], batched), size)
    out = fn(chunk, jnp.asarray(index, jnp.int32))
    outs.append(jax.tree_util.tree_map(lambda x: x[:hi - lo], out))
  if len(outs) == 1:
    return outs[0]
  return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, 0), *outs)
