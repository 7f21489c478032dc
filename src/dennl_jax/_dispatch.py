"""When ``jax.vmap`` of a chain function runs its users-minor batched twin.

Dispatch.  :class:`Dispatch` turns a per-sequence function and its
batched twin into one function that equals the per-sequence one everywhere
and, under ``jax.vmap``, runs the batched twin.  Public JAX only:

* values: ``jax.custom_batching.custom_vmap``, whose rule calls the batched
  twin (or ``jax.vmap`` of the per-sequence function, see :class:`Kernels`);
* derivatives: a ``jax.custom_jvp`` around it whose rule is ``jax.jvp`` of
  the per-sequence function.  ``custom_vmap`` has no transpose rule, so a
  tangent map that went through it could not be reversed; plain JVPs are
  transposable and batch like any JAX code, so every composition (``grad``,
  ``vmap`` of ``grad``, ``grad`` of ``vmap``, ``jvp``, ``jacfwd``,
  ``checkpoint``, ``shard_map``) works and is exact.
* the kernels' own JVP (:meth:`Dispatch.jvp`) is for callers that never
  transpose it: the score VJP (:mod:`dennl_jax._score`) runs its backward
  pass as one JVP, through a ``custom_vmap`` whose rule is the batched
  twin's JVP where :class:`Kernels` says so.

The choice is explicit and static: the model's ``kernels`` field (a
:class:`Kernels` name), resolved against the backend tables below when the
function is traced.  Static fields are part of a pytree's structure, so jit
caches one program per choice and nothing global changes.

The kernels themselves are in :mod:`dennl_jax._kernel_hmm` and
:mod:`dennl_jax._kernel_hsmm`.
"""
from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

from dennl_jax import chunking

# Backend -> vmapped values run the users-minor kernels (``kernels="auto"``).
# Measured on CPU (benchmarks/bench_em_step.py, BUILD_NOTES "Users-minor
# batched kernels").  No accelerator has been measured, so there "auto" is
# JAX's own batching of the per-sequence code: the layout XLA's GPU and TPU
# compilers are tuned for, and the one every other JAX library runs.
KERNEL_BACKENDS = types.MappingProxyType({"cpu": True})
# Backend -> the score VJP's forward-mode pass runs the kernels' JVP.  On CPU
# the HMM kernel's JVP made a DENNL exact-gradient step slower than the
# per-sequence derivative.  So does the HSMM kernel's JVP with the reachable-state
# scaling: the Table 1-shaped DENNL step (16 users, T = 400, K = 10, D = 20, 3
# stages) takes 130 ms with it and 97 ms with the per-sequence JVP (it took 80 ms
# before that scaling; measured back to back, benchmarks/bench_versions).
HMM_KERNEL_JVP_BACKENDS = types.MappingProxyType({"cpu": False})
HSMM_KERNEL_JVP_BACKENDS = types.MappingProxyType({"cpu": False})
# Backend -> users per block of a vmapped HMM EM step or chain recursion (0:
# the whole batch at once).  On CPU the temporaries of thousands of users
# leave the cache and glibc serves allocations over 32 MB with fresh pages;
# blocks of 256 users run one after another (``lax.map``) made em_step
# 1.4-2x faster (256 beat 512 on a core with 512 KiB of L2).  HSMMs run
# no blocks (``ChainModel.em_step_in_user_blocks``).  Accelerators want the
# whole batch at once.
USERS_PER_BLOCK = types.MappingProxyType({"cpu": 256})

KERNEL_NAMES = ("auto", "users_minor", "per_sequence")


@dataclasses.dataclass(frozen=True)
class Kernels:
  """How ``jax.vmap`` of the chain recursions runs (a model's ``kernels`` field).

  name:
    ``"auto"``: the backend's defaults (:data:`KERNEL_BACKENDS`,
    :data:`USERS_PER_BLOCK`, the ``*_KERNEL_JVP_BACKENDS`` tables);
    ``"users_minor"``: the users-minor kernels on every backend;
    ``"per_sequence"``: ``jax.vmap`` of the per-sequence code, no blocks.
  users_per_block: users per block under vmap (0: none; None: the backend's).
  """
  name: str = "auto"
  users_per_block: int | None = None

  def __post_init__(self):
    if self.name not in KERNEL_NAMES:
      raise ValueError(f"kernels must be one of {KERNEL_NAMES}, got {self.name!r}")
    if self.users_per_block is not None and (
        isinstance(self.users_per_block, bool) or not isinstance(self.users_per_block, int)
        or self.users_per_block < 0):
      raise ValueError("users_per_block must be a non-negative int or None, got "
                       f"{self.users_per_block!r}")

  @classmethod
  def of(cls, kernels) -> "Kernels":
    """``kernels`` itself, or the :class:`Kernels` of a name (``"auto"``, ...)."""
    return kernels if isinstance(kernels, cls) else cls(kernels)

  def users_minor(self) -> bool:
    """Whether vmapped values run the users-minor kernels (at trace time)."""
    if self.name == "auto":
      return KERNEL_BACKENDS.get(jax.default_backend(), False)
    return self.name == "users_minor"

  def kernel_jvp(self, table) -> bool:
    """Whether the score VJP runs the kernels' JVP under vmap (``table``: the model's)."""
    if self.name == "auto":
      return table.get(jax.default_backend(), False)
    return self.name == "users_minor"

  def block(self) -> int:
    """Users per block under vmap (0: the whole batch at once)."""
    if self.users_per_block is not None:
      return self.users_per_block
    if self.name == "per_sequence":
      return 0
    return USERS_PER_BLOCK.get(jax.default_backend(), 0)


def _broadcast_users(args, in_batched, num_users):
  return jax.tree_util.tree_map(
      lambda x, b: x if b else jnp.broadcast_to(x, (num_users,) + jnp.shape(x)),
      list(args), list(in_batched))


def _all_batched(out):
  return jax.tree_util.tree_map(lambda _: True, out)


# The kernels unroll their K-sums into K multiply-adds per step: the program
# grows with K and beyond a few dozen states (e.g. the expanded (K D)-state
# HMM of an HSMM oracle) one batched mat-vec per step is the better program.
# The HSMM kernels unroll only K (their D-sums are products), so K alone decides.
MAX_UNROLLED_STATES = 64


def _vmap_rule(per_sequence, batched, use_kernels: bool, block: int):
  def rule(num_users, in_batched, *args):
    args = _broadcast_users(args, in_batched, num_users)
    # Every chain function's first argument is the initial distribution (U, K).
    small = jax.tree_util.tree_leaves(args[0])[0].shape[-1] <= MAX_UNROLLED_STATES
    impl = batched if use_kernels and small else jax.vmap(per_sequence)
    out = _in_user_blocks(impl, args, num_users, block)
    return out, _all_batched(out)
  return rule


def _in_user_blocks(impl, args, num_users, block: int):
  """``impl(*args)`` (leading U on every leaf in and out), run block by block.

  Blocks of at most ``block`` users go through ``lax.map``; U is padded up to
  equal blocks with copies of user 0, whose results are dropped.  Users are
  independent, so the result equals one ``impl`` call.  Block j holds users
  j, j + B, j + 2B, ... (B blocks): a batch sharded over users
  (``dennl_jax.sharding``) then has every block spread over the devices.
  Contiguous blocks would each sit on one device: XLA gathered them (15
  all-gathers, 3x slower on 4 forced host devices, measured).
  """
  if not block or num_users <= block:
    return impl(*args)
  num_blocks = -(-num_users // block)
  size = -(-num_users // num_blocks)
  padded = num_blocks * size

  def split(x):
    return jnp.swapaxes(x.reshape((size, num_blocks) + x.shape[1:]), 0, 1)

  def merge(x):
    return jnp.swapaxes(x, 0, 1).reshape((padded,) + x.shape[2:])[:num_users]

  blocks = jax.tree_util.tree_map(split, chunking.pad_leading(tuple(args), padded))
  out = jax.lax.map(lambda block_args: impl(*block_args), blocks)
  return jax.tree_util.tree_map(merge, out)


def _as_jax_values(args):
  # A numpy array closed over by jit and batched by vmap reaches a custom
  # rule as a raw numpy value, which jit's tracer rejects; a copy (free
  # after XLA) makes every argument a JAX value first.
  return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tuple(args))


def in_user_blocks(per_sequence):
  """``fn(kernels, *args)``: ``per_sequence(*args)`` that, under ``jax.vmap``,
  runs in blocks of ``kernels.block()`` users.

  For a whole EM step: the blocks bound its temporaries (see
  :data:`USERS_PER_BLOCK`), and inside each block the chain recursions
  dispatch to the kernels as usual.  Derivatives are those of
  ``per_sequence`` (``jax.jvp`` of it, batched by JAX as any function).
  Arguments may be pytrees (a model, observations, a mask).
  """

  @functools.lru_cache(maxsize=None)
  def build(block: int):
    primal = custom_vmap(per_sequence)

    @primal.def_vmap
    def rule(num_users, in_batched, *args):
      args = _broadcast_users(args, in_batched, num_users)
      out = _in_user_blocks(jax.vmap(per_sequence), args, num_users, block)
      return out, _all_batched(out)

    @jax.custom_jvp
    def dispatch(*args):
      return primal(*args)

    @dispatch.defjvp
    def dispatch_jvp(args, tangents):
      return jax.jvp(per_sequence, args, tangents)

    return dispatch

  return lambda kernels, *args: build(kernels.block())(*_as_jax_values(args))


class Dispatch:
  """A chain function that runs its users-minor twin under ``jax.vmap``.

  ``dispatch(kernels, *diff_args, *other_args)`` equals
  ``per_sequence(*diff_args, *other_args)``; ``kernels`` (:class:`Kernels`)
  picks what ``jax.vmap`` of it runs.  Derivatives are ``jax.jvp`` of
  ``per_sequence``; :meth:`jvp` is the kernels' own JVP for callers that never
  transpose it.

  per_sequence: function of one sequence; its first ``num_diff`` arguments are
    float arrays that may be differentiated, the rest (masks) are not.
  batched: the same function on a leading user axis of every argument and output.
  user_blocks: run the vmapped values in blocks of ``kernels.block()`` users.
  jvp_backends: backend -> whether :meth:`jvp` runs the kernels' JVP under vmap.
  """

  def __init__(self, per_sequence, batched, num_diff: int, user_blocks: bool = False,
               jvp_backends=HMM_KERNEL_JVP_BACKENDS):
    self._per_sequence, self._batched, self._num_diff = per_sequence, batched, num_diff
    self._user_blocks, self._jvp_backends = user_blocks, jvp_backends

  def _jvp_one(self, primals, tangents, *other):
    return jax.jvp(lambda *p: self._per_sequence(*p, *other), primals, tangents)

  def _jvp_batched(self, primals, tangents, *other):
    return jax.jvp(lambda *p: self._batched(*p, *other), primals, tangents)

  @functools.lru_cache(maxsize=None)
  def _values(self, use_kernels: bool, block: int):
    primal = custom_vmap(self._per_sequence)
    primal.def_vmap(_vmap_rule(self._per_sequence, self._batched, use_kernels, block))
    num_diff = self._num_diff

    @jax.custom_jvp
    def dispatch(*args):
      return primal(*args)

    @dispatch.defjvp
    def dispatch_jvp(args, tangents):
      return self._jvp_one(tuple(args[:num_diff]), tuple(tangents[:num_diff]),
                           *args[num_diff:])

    return dispatch

  @functools.lru_cache(maxsize=None)
  def _tangent_map(self, block: int):
    """The kernels' JVP under vmap (``custom_vmap`` of the per-sequence JVP)."""
    tangent_map = custom_vmap(self._jvp_one)

    @tangent_map.def_vmap
    def rule(num_users, in_batched, primals, tangents, *other):
      # Batched tangents of unbatched primals (vmap over directions): the
      # primal output must come back unbatched.
      primal_batched = any(jax.tree_util.tree_leaves((in_batched[0], in_batched[2:])))
      (out, out_tangents), _ = _vmap_rule(self._jvp_one, self._jvp_batched, True,
                                          block)(num_users, in_batched, primals, tangents,
                                                 *other)
      if not primal_batched:
        out = jax.tree_util.tree_map(lambda x: x[0], out)
      return ((out, out_tangents),
              (jax.tree_util.tree_map(lambda _: primal_batched, out),
               _all_batched(out_tangents)))

    return tangent_map

  def _block(self, kernels: Kernels) -> int:
    return kernels.block() if self._user_blocks else 0

  def __call__(self, kernels: Kernels, *args):
    fn = self._values(kernels.users_minor(), self._block(kernels))
    return fn(*_as_jax_values(args))

  def jvp(self, kernels: Kernels, primals, tangents, *other):
    """``jax.jvp`` of the function in ``primals`` (the first ``num_diff``
    arguments); under ``jax.vmap`` the kernels' JVP where ``kernels`` says so.
    Not transposable (no reverse mode through it)."""
    use = kernels.users_minor() and kernels.kernel_jvp(self._jvp_backends)
    if not use:
      return self._jvp_one(tuple(primals), tuple(tangents), *other)
    tangent_map = self._tangent_map(self._block(kernels))
    return tangent_map(*_as_jax_values((tuple(primals), tuple(tangents)) + tuple(other)))
