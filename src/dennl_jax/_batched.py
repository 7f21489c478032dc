"""Users-minor batched chain recursions, reached from ``jax.vmap`` of the per-sequence API.

Why.  ``jax.vmap`` of a per-sequence scan puts the user axis first: every
step of the recursion is a batch of tiny K x K mat-vecs with K minor, which
XLA:CPU runs as many small kernels.  With the user axis *minor* -- carry
``(K, U)``, transition ``(K, K, U)`` -- the K-sum of a mat-vec is K fused
multiply-adds over ``(K, U)`` rows that vectorise over users; written as
``jnp.sum(..., axis=0)`` instead, XLA:CPU's reduction over a non-minor axis
is an order of magnitude slower, hence :func:`_mix` and :func:`_sum_rows`.
Expected counts are accumulated inside the backward scan (a reduction over T
of ``(T, K, U)`` arrays afterwards costs more than both scans together).
The HSMM kernels (:mod:`dennl_jax._batched_hsmm`) carry the joint over
(remaining duration, state) as ``(D, K, U)``: the countdown is a slice of
whole ``(K, U)`` slabs and the D-sums are ones-vector products.  They keep
no joint per step: the smoothed marginals come from segment starts and ends.

Dispatch.  :func:`batched_dispatch` turns a per-sequence function and its
batched twin into one function that equals the per-sequence one everywhere
and runs the batched twin when ``jax.vmap`` batches it:

* primal values: ``jax.custom_batching.custom_vmap`` (its rule calls the
  batched twin, or ``jax.vmap`` of the per-sequence function where
  :data:`BATCHED_BACKENDS` says that is faster);
* derivatives: a ``jax.custom_jvp`` around it.  ``custom_vmap`` alone has
  no transpose rule, so reverse mode would fail whenever the vmap is not
  applied first.  The JVP rule therefore uses the batched twin only when the
  backend's entry in :data:`BATCHED_GRADIENT_BACKENDS` (HSMMs:
  :data:`HSMM_BATCHED_GRADIENT_BACKENDS`) says so and the
  tangents are being batched (``grad(vmap(f))``, ``jvp(vmap(f))``,
  ``vmap(jvp(f))``: the batch rule then turns the tangent map into plain,
  transposable ops) and plain ``jax.jvp`` of the per-sequence function
  otherwise (``grad(f)``, ``vmap(grad(f))``, ``vmap(linearize(f))``), which
  is always correct.  See BUILD_NOTES "Batched kernels (issue 12)".

Every batched function takes and returns arrays with a leading user axis U
(the layout ``jax.vmap`` uses) and transposes internally.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

from dennl_jax import batching
from dennl_jax._numerics import normalize, scaled_likelihoods

try:  # private: only used to tell whether tangents are being batched
  from jax._src.interpreters.batching import BatchTracer as _BatchTracer
except ImportError:  # pragma: no cover - a JAX without it keeps per-sequence tangents
  _BatchTracer = ()

# Backend -> use the users-minor kernels under vmap, for values and for
# derivatives (the JVP, hence also reverse mode).  Measured with
# experiments/bench_em_step.py (BUILD_NOTES "Batched kernels (issue 12)"): on
# CPU the batched values are faster, but the transposed batched kernels made a
# DENNL exact-gradient step slower than the per-sequence derivative.  GPU
# entries are unmeasured guesses (no GPU was available): flip them after
# running the benchmark there.
BATCHED_BACKENDS = {"cpu": True, "gpu": True, "cuda": True, "rocm": True, "tpu": False}
BATCHED_GRADIENT_BACKENDS = {"cpu": False, "gpu": True, "cuda": True, "rocm": True, "tpu": False}
# The HSMM kernel's JVP beats the per-sequence one on CPU since the kernel keeps
# no per-step joints: 3 stacked exact EM layers (score VJP), U = 16, T = 400,
# K = 10: 1.24-1.34x at D = 20, 1.04x at D = 60, with 4-8x fewer temporaries
# (BUILD_NOTES "Stop 17").
HSMM_BATCHED_GRADIENT_BACKENDS = {**BATCHED_GRADIENT_BACKENDS, "cpu": True}

# Backend -> users per block of a vmapped HMM EM step or chain recursion (0:
# the whole batch at once).  On CPU a vmapped em_step over thousands of users has
# tens of MB of temporaries: glibc serves allocations over 32 MB with fresh
# mmap pages on every call (11,300 page faults per call at U = 2000, T = 100,
# K = 10) and the (T, K, U) arrays leave the cache.  Blocks of users run one
# after another (``lax.map``) made em_step 1.4-2x faster there and at T = 400,
# K = 20 and U = 8000 (BUILD_NOTES "Stop 14": 512 users).  256 beat 512 in
# every row on one core of a machine with 512 KiB of L2 per core (2-17 %,
# BUILD_NOTES "Stop 16"; the backward pass's (K, K, U) count carry is 100 KiB
# at 256 users, K = 10).  HSMMs do not use blocks
# (``ChainModel.em_step_in_user_blocks``: no gain measured, stops 14 and 17).  Accelerators want
# the whole batch at once; their entries are unmeasured (no GPU was lent), hence 0.
USERS_PER_BLOCK = {"cpu": 256}


_FORCED = []  # innermost (kernels enabled, users per block or None), see batched_kernels


def use_batched(table=BATCHED_BACKENDS) -> bool:
  """Whether vmapped chain recursions run the users-minor kernels on this backend."""
  if _FORCED:
    return _FORCED[-1][0]
  return table.get(jax.default_backend(), False)


def users_per_block() -> int:
  """Users per block of a vmapped EM step on this backend (0: no blocks)."""
  if _FORCED:
    enabled, block = _FORCED[-1]
    if block is not None:
      return block
    if not enabled:
      return 0
  return USERS_PER_BLOCK.get(jax.default_backend(), 0)


@contextlib.contextmanager
def batched_kernels(enabled: bool, users_per_block: int | None = None):
  """Within the block, functions *traced* use (or not) the users-minor kernels under vmap
  for values and derivatives alike, whatever the backend tables say.

  ``users_per_block``: blocks of users under vmap (0: none); by default the
  backend's :data:`USERS_PER_BLOCK` when enabled and none when not, so
  ``batched_kernels(False)`` is the plain ``jax.vmap`` of the per-sequence code.

  For benchmarks and tests that compare both paths in one process.  The
  choice is made at trace time, and JAX caches traces (jit, and the batched
  jaxprs of ``jax.checkpoint``), so the caches are cleared on entry and exit:
  trace and compile inside the block.
  """
  if users_per_block is not None and (not isinstance(users_per_block, int)
                                      or users_per_block < 0):
    raise ValueError(f"users_per_block must be a non-negative int, got {users_per_block!r}")
  jax.clear_caches()
  _FORCED.append((bool(enabled), users_per_block))
  try:
    yield
  finally:
    _FORCED.pop()
    jax.clear_caches()


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


def _vmap_rule(per_sequence, batched, user_blocks: bool):
  def rule(num_users, in_batched, *args):
    args = _broadcast_users(args, in_batched, num_users)
    # Every chain function's first argument is the initial distribution (U, K).
    small = jax.tree_util.tree_leaves(args[0])[0].shape[-1] <= MAX_UNROLLED_STATES
    impl = batched if use_batched() and small else jax.vmap(per_sequence)
    out = _in_user_blocks(impl, args, num_users) if user_blocks else impl(*args)
    return out, _all_batched(out)
  return rule


def _in_user_blocks(impl, args, num_users):
  """``impl(*args)`` (leading U on every leaf in and out), run block by block.

  Blocks of at most :func:`users_per_block` users go through ``lax.map``;
  U is padded up to equal blocks with copies of user 0, whose results are
  dropped.  Users are independent, so the result equals one ``impl`` call.
  Block j holds users j, j + B, j + 2B, ... (B blocks): a batch sharded over
  users (``dennl_jax.sharding``) then has every block spread over the devices.
  Contiguous blocks would each sit on one device: XLA gathered them (15
  all-gathers, 3x slower on 4 forced host devices, measured).
  """
  block = users_per_block()
  if not block or num_users <= block:
    return impl(*args)
  num_blocks = -(-num_users // block)
  size = -(-num_users // num_blocks)
  padded = num_blocks * size

  def split(x):
    return jnp.swapaxes(x.reshape((size, num_blocks) + x.shape[1:]), 0, 1)

  def merge(x):
    return jnp.swapaxes(x, 0, 1).reshape((padded,) + x.shape[2:])[:num_users]

  blocks = jax.tree_util.tree_map(split, batching._pad_leading(tuple(args), padded))
  out = jax.lax.map(lambda block_args: impl(*block_args), blocks)
  return jax.tree_util.tree_map(merge, out)


def _as_jax_values(args):
  # A numpy array closed over by jit and batched by vmap reaches a custom
  # rule as a raw numpy value, which jit's tracer rejects; a copy (free
  # after XLA) makes every argument a JAX value first.
  return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tuple(args))


def in_user_blocks(per_sequence):
  """``per_sequence(*args)`` that, under ``jax.vmap``, runs in blocks of users.

  For a whole EM step: the blocks bound its temporaries (see
  :data:`USERS_PER_BLOCK`), and inside each block the chain recursions
  dispatch to the kernels as usual.  Derivatives are those of
  ``per_sequence`` (``jax.jvp`` of it, batched by JAX as any function).
  Arguments may be pytrees (a model, observations, a mask).
  """
  primal = custom_vmap(per_sequence)

  @primal.def_vmap
  def rule(num_users, in_batched, *args):
    args = _broadcast_users(args, in_batched, num_users)
    out = _in_user_blocks(jax.vmap(per_sequence), args, num_users)
    return out, _all_batched(out)

  @jax.custom_jvp
  def dispatch(*args):
    return primal(*args)

  @dispatch.defjvp
  def dispatch_jvp(args, tangents):
    return jax.jvp(per_sequence, args, tangents)

  return lambda *args: dispatch(*_as_jax_values(args))


def _is_batched(tree) -> bool:
  return any(isinstance(x, _BatchTracer) for x in jax.tree_util.tree_leaves(tree))


def batched_dispatch(per_sequence, batched, num_diff: int, user_blocks: bool = False,
                     gradient_backends=BATCHED_GRADIENT_BACKENDS):
  """``per_sequence(*diff_args, *other_args)`` that runs ``batched`` under ``jax.vmap``.

  per_sequence: function of one sequence; its first ``num_diff`` arguments are
    float arrays that may be differentiated, the rest (masks) are not.
  batched: the same function on a leading user axis of every argument and output.
  user_blocks: run the vmapped values in blocks of :func:`users_per_block` users.
  gradient_backends: backend -> whether batched tangents run ``batched``'s JVP.
  """
  primal = custom_vmap(per_sequence)
  primal.def_vmap(_vmap_rule(per_sequence, batched, user_blocks))

  def jvp_one(primals, tangents, *other):
    return jax.jvp(lambda *p: per_sequence(*p, *other), primals, tangents)

  def jvp_batched(primals, tangents, *other):
    return jax.jvp(lambda *p: batched(*p, *other), primals, tangents)

  tangent_map = custom_vmap(jvp_one)

  @tangent_map.def_vmap
  def tangent_rule(num_users, in_batched, primals, tangents, *other):
    # Batched tangents of unbatched primals (jacfwd, vmap over directions):
    # the primal output must come back unbatched.
    primal_batched = any(jax.tree_util.tree_leaves((in_batched[0], in_batched[2:])))
    (out, out_tangents), _ = _vmap_rule(jvp_one, jvp_batched, user_blocks)(
        num_users, in_batched, primals, tangents, *other)
    if not primal_batched:
      out = jax.tree_util.tree_map(lambda x: x[0], out)
    return ((out, out_tangents),
            (jax.tree_util.tree_map(lambda _: primal_batched, out), _all_batched(out_tangents)))

  @jax.custom_jvp
  def dispatch(*args):
    return primal(*args)

  def fn(*args):
    return dispatch(*_as_jax_values(args))

  @dispatch.defjvp
  def dispatch_jvp(args, tangents):
    primals, other = tuple(args[:num_diff]), tuple(args[num_diff:])
    tangents = tuple(tangents[:num_diff])
    if use_batched(gradient_backends) and _is_batched(tangents):
      return tangent_map(primals, tangents, *other)
    return jvp_one(primals, tangents, *other)

  return fn


# --------------------------------------------------------------------------
# Users-minor helpers
# --------------------------------------------------------------------------


def _mix(weights, matrix):
  """``sum_i weights[i] * matrix[i]``: weights (K, U), matrix (K, N, U) -> (N, U)."""
  out = weights[0][None] * matrix[0]
  for i in range(1, weights.shape[0]):
    out = out + weights[i][None] * matrix[i]
  return out


def _sum_rows(x):
  """``sum_i x[i]`` over the leading axis of (K, U), as K - 1 adds."""
  out = x[0]
  for i in range(1, x.shape[0]):
    out = out + x[i]
  return out


def _users_minor(x):
  """(U, ...) -> (..., U), as one rank-2 transpose (U, rest) -> (rest, U).

  XLA:CPU runs the rank-2 transpose about 3x faster than the equivalent rank-3
  permutation (0.8 vs 2.2 ms for (2000, 100, 10) float32, measured).
  """
  return x.reshape(x.shape[0], -1).T.reshape(x.shape[1:] + x.shape[:1])


def _users_first(x):
  """(..., U) -> (U, ...), the inverse of :func:`_users_minor`."""
  return x.reshape(-1, x.shape[-1]).T.reshape(x.shape[-1:] + x.shape[:-1])


def _chain_inputs(log_likes, mask):
  """Scaled likelihoods time-major with users minor.

  log_likes: (U, T, K), mask: (U, T) -> likes (T, K, U), shift (T, U), mask (T, U).
  XLA:CPU fuses the exp into the transpose; that fusion (strided, ~10 ms at
  U = 2000, T = 100, K = 10 on one core) is the largest single cost of the
  smoother outside the two scans.  Computing the max and exp after the
  transpose, or per step inside the forward scan, was slower (measured).
  """
  likes, shift = jax.vmap(scaled_likelihoods)(log_likes)
  return _users_minor(likes), shift.T, mask.T


def _hmm_forward(initial, trans, likes, shift, mask):
  """Scaled forward pass (hmm._forward with users minor).

  initial (K, U), trans (K, K, U), likes (T, K, U), shift/mask (T, U).
  Returns filtered (T, K, U), normalisers (T, U), log-likelihood (U,) and
  the step structure of ``_numerics.step_structure``, moves and is_first
  (T, U) -- tracked here with a "seen a valid step" flag rather than a
  cumulative sum over T, which costs as much as the whole scan on CPU.
  """

  def step(carry, inputs):
    alpha_prev, moved, ll, seen = carry
    b_t, shift_t, valid_t = inputs
    moves_t = valid_t & seen
    pred = jnp.where(moves_t, moved, alpha_prev)
    unnorm = pred * b_t
    norm = jnp.where(valid_t, _sum_rows(unnorm), 1.0)
    alpha = jnp.where(valid_t, normalize(unnorm, norm), pred)
    ll = ll + jnp.where(valid_t, jnp.log(norm) + shift_t, 0.0)
    # The next step's prediction alpha A is computed here and carried, so it is
    # materialised once: inside the next step XLA fuses the K-term mat-vec into
    # every consumer of the prediction, and its JVP into every consumer of the
    # tangent (the kernel's JVP was 10x slower, an unblocked em_step 1.6x; the
    # blocked CPU em_step is within 1-4 %, BUILD_NOTES "Stop 17").
    return (alpha, _mix(alpha, trans), ll, seen | valid_t), (alpha, norm, moves_t, valid_t & ~seen)

  users = initial.shape[1:]
  init = (initial, _mix(initial, trans), jnp.zeros(users, likes.dtype), jnp.zeros(users, bool))
  (_, _, ll, _), (filtered, norms, moves, is_first) = jax.lax.scan(
      step, init, (likes, shift, mask))
  return filtered, norms, ll, moves, is_first


def _hmm_backward(trans, alphas, likes, norms, moves, is_first):
  """Scaled backward pass fused with the expected counts (hmm._backward, users minor).

  alphas and likes (T, K, U) as from :func:`_hmm_forward`.  Returns smoothed
  (T, K, U), two-slice sums sum_t alpha_t(i) msg_{t+1}(j) (K, K, U) (times the
  transition they are the transition counts; they are d ll / d transition) and
  the message at the first valid step f, msg_f = b_f beta_f / c_f (K, U) (times
  the initial distribution it is the smoothed marginal at f; it is d ll / d
  initial).  The carry is the message
  ``msg_{t+1} = b_{t+1} beta_{t+1} / c_{t+1}`` rather than beta: the K-sum
  then reads a materialised carry, as in the forward pass, instead of
  recomputing the message from sliced inputs K times per element (25 % of the
  pass, measured).  The scan runs over all T steps from a message of ones
  with "no move" after the last step (beta_T = 1): slicing the (T, K, U)
  inputs to T - 1 steps and concatenating the last marginal copies them.
  (Overwriting the filtered marginals in place with a fori_loop would save a
  buffer, but XLA:CPU then copies the whole buffer twice per step: 2x slower,
  measured.)
  """
  trans_by_target = jnp.swapaxes(trans, 0, 1)          # [j, i, u] = A[i, j, u]

  def step(carry, inputs):
    msg_next, pairs, first_msg = carry
    alpha_t, b_t, norm_t, moves_next, is_first_t = inputs
    # A masked next step has b = 1 and c = 1, so its message passes through.
    beta = jnp.where(moves_next, _mix(msg_next, trans_by_target), msg_next)
    pairs = pairs + alpha_t[:, None] * jnp.where(moves_next, msg_next, 0.0)[None]
    msg = normalize(b_t * beta, norm_t)
    first_msg = jnp.where(is_first_t, msg, first_msg)
    return (msg, pairs, first_msg), alpha_t * beta

  num_states, num_users = alphas.shape[1:]
  dtype = alphas.dtype
  init = (jnp.ones((num_states, num_users), dtype),
          jnp.zeros((num_states, num_states, num_users), dtype),
          jnp.zeros((num_states, num_users), dtype))
  moves_next = jnp.concatenate([moves[1:], jnp.zeros_like(moves[:1])])
  (_, pairs, first_msg), smoothed = jax.lax.scan(
      step, init, (alphas, likes, norms, moves_next, is_first), reverse=True)
  return smoothed, pairs, first_msg


def hmm_filter_batched(initial, transition, log_likes, mask):
  """:func:`dennl_jax.hmm.hmm_filter` for U sequences: leading U on every input and output."""
  likes, shift, mask_t = _chain_inputs(log_likes, mask)
  filtered, _, ll, _, _ = _hmm_forward(_users_minor(initial), _users_minor(transition), likes,
                                       shift, mask_t)
  return ll, _users_first(filtered)


def _hmm_forward_backward(initial, transition, log_likes, mask):
  """Both passes on leading-U inputs: log-likelihood (U,), then users-minor filtered and
  smoothed marginals (T, K, U), jump sums (K, K, U), first messages (K, U) and mask (T, U)."""
  likes, shift, mask_t = _chain_inputs(log_likes, mask)
  trans = _users_minor(transition)
  filtered, norms, ll, moves, is_first = _hmm_forward(_users_minor(initial), trans, likes, shift,
                                                      mask_t)
  smoothed, pairs, first_msg = _hmm_backward(trans, filtered, likes, norms, moves, is_first)
  return ll, filtered, smoothed, pairs, first_msg, mask_t


def hmm_smoother_batched(initial, transition, log_likes, mask):
  """:func:`dennl_jax.hmm.hmm_smoother` for U sequences: the ``HMMPosterior`` fields
  (log-likelihood, filtered, smoothed, transition counts, initial), each with leading U."""
  ll, filtered, smoothed, pairs, first_msg, _ = _hmm_forward_backward(
      initial, transition, log_likes, mask)
  return (ll, _users_first(filtered), _users_first(smoothed), transition * _users_first(pairs),
          initial * _users_first(first_msg))


def hmm_score_batched(initial, transition, log_likes, mask):
  """:func:`dennl_jax.hmm.hmm_score` for U sequences: leading U on every input and output."""
  ll, _, smoothed, pairs, first_msg, mask_t = _hmm_forward_backward(
      initial, transition, log_likes, mask)
  d_log_likes = jnp.where(mask_t[:, None], smoothed, 0.0)
  return ll, (_users_first(first_msg), _users_first(pairs), _users_first(d_log_likes))
