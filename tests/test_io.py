"""Saving and loading parameter pytrees (dennl_jax.io).

Round trips are exact (same classes, static fields, shapes, dtypes and bits)
for every registered emission family, alone and inside HMMs and HSMMs with
each duration family, single and batched, in float32 and float64; damaged,
foreign, other-version and mismatched files raise ValueError naming the
problem; saving is atomic and never touches its inputs.
"""
import json
import os
import subprocess
import sys
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dennl_jax as dj
from helpers import DURATIONS, FAMILIES, random_emission, random_hmm, random_obs, stack_trees
from dennl_jax import io

pytestmark = pytest.mark.x64

KINDS = ("emission", "hmm", "hsmm_poisson", "hsmm_categorical")


def make_model(kind, family, rng, num_states=3):
  if kind == "emission":
    return random_emission(family, rng, num_states, min_covar=0.125)
  hmm = random_hmm(family, rng, num_states, min_covar=0.125)
  if kind == "hmm":
    return hmm
  transition = rng.dirichlet(np.ones(num_states - 1), num_states)
  transition = np.stack([np.insert(row, k, 0.0) for k, row in enumerate(transition)])
  duration = DURATIONS[kind.split("_")[1]].make(rng, num_states, 5)
  return dj.HSMM(hmm.initial, transition, duration, hmm.emission)


def as_dtype(tree, dtype):
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x, dtype) if np.issubdtype(np.asarray(x).dtype, np.floating)
      else np.asarray(x), tree)


def assert_identical(loaded, original):
  """Same pytree types and static fields, and bit-identical leaves of the same dtype."""
  assert (jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(original))
  for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(original)):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_exact(tmp_path, family, kind, dtype):
  rng = np.random.default_rng([FAMILIES.index(family), KINDS.index(kind)])
  model = as_dtype(make_model(kind, family, rng), dtype)
  path = tmp_path / "params.npz"
  io.save_params(path, model)
  loaded = io.load_params(path, like=model)
  assert type(loaded) is type(model)
  assert_identical(loaded, model)
  meta = io.read_metadata(path)
  assert meta["model"] == f"{type(model).__module__}:{type(model).__qualname__}"
  assert meta["dtypes"] == [np.dtype(dtype).name]
  assert meta["library_version"] == dj.__version__
  if kind != "emission":
    assert meta["families"]["emission"].endswith(type(model.emission).__name__)
    assert meta["batch_shape"] == []


@pytest.mark.parametrize("kind", ["hmm", "hsmm_poisson"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_round_trip(tmp_path, family, kind):
  rng = np.random.default_rng([7, FAMILIES.index(family)])
  batch = stack_trees([make_model(kind, family, rng) for _ in range(4)])
  path = tmp_path / "batch.npz"
  io.save_params(path, batch, metadata={"users": [3, 1, 4, 1]})
  loaded = io.load_params(path)
  assert_identical(loaded, batch)
  meta = io.read_metadata(path)
  assert meta["batch_shape"] == [4]
  assert meta["user"] == {"users": [3, 1, 4, 1]}


def test_loaded_model_computes_the_same_values(tmp_path):
  rng = np.random.default_rng(3)
  hmm = jax.tree_util.tree_map(jnp.asarray, random_hmm("categorical", rng, 3))
  obs = random_obs("categorical", rng, 9)
  mask = np.ones(9, bool)
  io.save_params(tmp_path / "m.npz", hmm)
  loaded = io.load_params(tmp_path / "m.npz")
  log_likelihood = jax.jit(dj.log_likelihood)          # one compile for both calls
  assert float(log_likelihood(loaded, obs, mask)) == float(log_likelihood(hmm, obs, mask))


def test_unconstrained_and_containers_round_trip(tmp_path):
  """Pre-activation pytrees (same types, invalid values) and plain containers load as saved."""
  rng = np.random.default_rng(4)
  hmm = random_hmm("categorical", rng, 3)
  tree = {"pre": hmm.to_preactivation(), "theta": hmm.to_unconstrained(),
          "history": [np.arange(3), (np.float32(2.5), None)], "layers": {7: np.zeros((0, 2))},
          "half": jnp.ones(3, jnp.bfloat16), "key": jax.random.key(5)}
  io.save_params(tmp_path / "t.npz", tree)
  loaded = io.load_params(tmp_path / "t.npz")
  assert set(loaded) == set(tree)
  assert_identical({k: v for k, v in loaded.items() if k != "key"},
                   {k: v for k, v in tree.items() if k != "key"})
  np.testing.assert_array_equal(jax.random.key_data(loaded["key"]),
                                jax.random.key_data(tree["key"]))
  assert isinstance(loaded["history"][1], tuple)


def test_save_never_modifies_or_aliases_inputs(tmp_path):
  rng = np.random.default_rng(5)
  hmm = random_hmm("poisson", rng, 3)
  before = jax.tree_util.tree_map(np.copy, hmm)
  io.save_params(tmp_path / "m.npz", hmm)
  assert_identical(hmm, before)
  hmm.emission.rate[0] = 99.0                     # a later in-place change of the caller's array
  assert_identical(io.load_params(tmp_path / "m.npz"), before)


def test_interrupted_save_leaves_the_previous_file(tmp_path, monkeypatch):
  rng = np.random.default_rng(6)
  old, new = random_hmm("categorical", rng, 3), random_hmm("categorical", rng, 3)
  path = tmp_path / "m.npz"
  io.save_params(path, old)
  real_savez = np.savez

  def killed_midway(handle, **arrays):
    real_savez(handle, **arrays)
    handle.truncate(100)                         # half a file, then the process "dies"
    raise KeyboardInterrupt

  monkeypatch.setattr(io.np, "savez", killed_midway)
  with pytest.raises(KeyboardInterrupt):
    io.save_params(path, new)
  monkeypatch.undo()
  assert_identical(io.load_params(path), old)
  assert sorted(os.listdir(tmp_path)) == ["m.npz"]   # no temporary file left behind


_SAVE_FOREVER = """
import sys
import numpy as np
from dennl_jax import io
path, trees = sys.argv[1], [{"x": np.full(4_000_000, float(i))} for i in range(2)]
for i in range(10_000):
  io.save_params(path, trees[i % 2])
  print(i, flush=True)
"""


@pytest.mark.slow
def test_sigkilled_save_never_leaves_a_partial_file(tmp_path):
  """SIGKILL while a save is writing (its temporary file exists): the file stays whole."""
  path = tmp_path / "big.npz"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), JAX_PLATFORMS="cpu")
  child = subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER, str(path)],
                           stdout=subprocess.PIPE, env=env)
  try:
    child.stdout.readline()                       # one save has completed
    deadline = time.monotonic() + 60.0
    while not any(name.endswith(".tmp") for name in os.listdir(tmp_path)):
      assert time.monotonic() < deadline, "the child never started a second save"
      time.sleep(0.001)
  finally:
    child.kill()                                  # inside the write window of a later save
    child.wait()
  leftovers = [name for name in os.listdir(tmp_path) if name != "big.npz"]
  assert leftovers and all(n.startswith(".big.npz.") and n.endswith(".tmp") for n in leftovers)
  loaded = io.load_params(path)["x"]
  assert loaded.shape == (4_000_000,) and loaded[0] in (0.0, 1.0)
  np.testing.assert_array_equal(loaded, np.full(4_000_000, loaded[0]))
  # The next save of the same file removes the dead writer's temporary file.
  io.save_params(path, {"x": np.zeros(3)})
  assert sorted(os.listdir(tmp_path)) == ["big.npz"]


def test_a_live_writers_temporary_file_is_kept(tmp_path):
  """Only temporary files of processes that are gone are stale."""
  path = tmp_path / "m.npz"
  child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                         capture_output=True, text=True, check=True)
  dead, live = int(child.stdout), os.getppid()
  for pid in (dead, live):
    (tmp_path / f".m.npz.{pid}.abc.tmp").write_bytes(b"partial")
  io.save_params(path, {"x": np.ones(2)})
  assert sorted(os.listdir(tmp_path)) == [f".m.npz.{live}.abc.tmp", "m.npz"]


def test_unsavable_input_writes_nothing(tmp_path):
  hmm = random_hmm("categorical", np.random.default_rng(8), 2)
  with pytest.raises(TypeError, match="JSON"):
    io.save_params(tmp_path / "a.npz", hmm, metadata={"bad": object()})
  with pytest.raises(TypeError, match=r"params\[0\] is a object"):
    io.save_params(tmp_path / "a.npz", [object()])
  assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# Files that must not load.
# ---------------------------------------------------------------------------

def _saved(tmp_path, name="m.npz"):
  hmm = random_hmm("diag_gaussian", np.random.default_rng(9), 3)
  io.save_params(tmp_path / name, hmm)
  return tmp_path / name, hmm


def _rewrite_description(path, edit):
  """Rewrite a saved file with ``edit(description)`` applied (a foreign or future file)."""
  with np.load(path) as npz:
    arrays = {k: npz[k] for k in npz.files}
  description = json.loads(arrays["__metadata__"].tobytes())
  edit(description)
  arrays["__metadata__"] = np.frombuffer(json.dumps(description).encode(), np.uint8)
  with open(path, "wb") as handle:
    np.savez(handle, **arrays)


def test_truncated_file(tmp_path):
  path, _ = _saved(tmp_path)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="corrupt"):
    io.load_params(path)


def test_damaged_array_bytes(tmp_path):
  path, _ = _saved(tmp_path)
  with zipfile.ZipFile(path) as archive:
    info = archive.getinfo("a2.npy")
  data = bytearray(path.read_bytes())
  data[info.header_offset + 100] ^= 0xFF          # inside the member's data: CRC mismatch
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="corrupt"):
    io.load_params(path)


@pytest.mark.parametrize("content", [b"", b"not a zip file at all", b"\x93NUMPY garbage"])
def test_not_a_parameter_file(tmp_path, content):
  path = tmp_path / "x.npz"
  path.write_bytes(content)
  with pytest.raises(ValueError, match="corrupt or not a parameter file"):
    io.load_params(path)


def test_every_single_byte_flip_is_refused_or_harmless(tmp_path):
  """Flip each byte of a saved file in turn: loading raises ValueError naming the
  file, or returns exactly the saved parameters -- never another exception, never
  different values."""
  path, hmm = _saved(tmp_path)
  data = path.read_bytes()
  expected = jax.tree_util.tree_leaves(hmm)
  refused = 0
  for i in range(len(data)):
    flipped = bytearray(data)
    flipped[i] ^= 0xFF
    path.write_bytes(bytes(flipped))
    try:
      loaded = io.load_params(path)
    except ValueError as err:
      assert str(path) in str(err), (i, err)
      refused += 1
      continue
    leaves = jax.tree_util.tree_leaves(loaded)
    assert len(leaves) == len(expected), i
    for a, b in zip(leaves, expected):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"byte {i}")
  assert refused > len(data) // 2


def test_plain_npy_and_edited_descriptions_raise_value_error(tmp_path):
  np.save(tmp_path / "a.npy", np.ones(3))
  with pytest.raises(ValueError, match="single numpy array"):
    io.load_params(tmp_path / "a.npy")
  path, _ = _saved(tmp_path)
  _rewrite_description(path, lambda d: d["tree"].pop("fields"))
  with pytest.raises(ValueError, match="malformed description|malformed"):
    io.load_params(path)
  # A description nested deeper than Python's recursion limit (written as text:
  # json.dumps itself refuses it).
  with np.load(path) as npz:
    arrays = {k: npz[k] for k in npz.files}
  text = json.loads(arrays["__metadata__"].tobytes())
  head = json.dumps({k: v for k, v in text.items() if k != "tree"})[:-1]
  deep = '{"list": [' * 5000 + "null" + "]}" * 5000
  arrays["__metadata__"] = np.frombuffer(f'{head}, "tree": {deep}}}'.encode(), np.uint8)
  with open(path, "wb") as handle:
    np.savez(handle, **arrays)
  with pytest.raises(ValueError, match=str(path.name)):
    io.load_params(path)


def test_foreign_npz_and_missing_file(tmp_path):
  np.savez(tmp_path / "plain.npz", x=np.ones(3))
  with pytest.raises(ValueError, match="no dennl_jax description"):
    io.load_params(tmp_path / "plain.npz")
  with pytest.raises(FileNotFoundError, match="no parameter file"):
    io.load_params(tmp_path / "absent.npz")


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(format_version=999), "format version 999"),
    (lambda d: d.update(format="something.else"), "not a dennl_jax.params file"),
    (lambda d: d["tree"].update({"class": "dennl_jax.hmm:NoSuchModel"}), "has no class"),
    (lambda d: d["tree"].update({"class": "some_plugin.families:Thing"}), "not imported"),
    (lambda d: d["tree"].update({"class": "json:JSONDecoder"}), "not a dennl_jax parameter"),
    (lambda d: d["tree"]["fields"]["emission"]["static"].update(extra=1), r"fields \['extra'\]"),
    (lambda d: d["tree"]["fields"]["initial"].update(shape=[4]), r"shape \(3,\).*says \(4,\)"),
    (lambda d: d["tree"]["fields"]["initial"].update(dtype="int32"), "dtype float64"),
    (lambda d: d["tree"]["fields"]["initial"].update(array="a99"), "'a99' is missing"),
])
def test_mismatched_description(tmp_path, edit, message):
  path, _ = _saved(tmp_path)
  _rewrite_description(path, edit)
  with pytest.raises(ValueError, match=message):
    io.load_params(path)


def test_like_names_the_first_difference(tmp_path):
  path, hmm = _saved(tmp_path)
  rng = np.random.default_rng(10)
  with pytest.raises(ValueError, match="expected"):
    io.load_params(path, like=make_model("hsmm_poisson", "diag_gaussian", rng))
  with pytest.raises(ValueError, match=r"\.initial has shape \(3,\), expected \(4,\)"):
    io.load_params(path, like=random_hmm("diag_gaussian", rng, 4))
  with pytest.raises(ValueError, match="has dtype float64, expected float32"):
    io.load_params(path, like=as_dtype(hmm, np.float32))
  with pytest.raises(ValueError, match="expected"):     # another static field
    io.load_params(path, like=hmm.replace(emission=hmm.emission.replace(min_covar=0.5)))


# ---------------------------------------------------------------------------
# Flax NNX state.
# ---------------------------------------------------------------------------

class _Net(nnx.Module):
  """Params, batch statistics and an RNG stream: every kind of NNX state a network holds."""

  def __init__(self, hidden, seed):
    rngs = nnx.Rngs(seed, dropout=seed + 1)
    self.linear = nnx.Linear(3, hidden, rngs=rngs)
    self.norm = nnx.BatchNorm(hidden, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)


def test_nnx_state_round_trip(tmp_path):
  model = _Net(4, seed=0)
  io.save_state(tmp_path / "net.npz", model, metadata={"seed": 0})
  restored = _Net(4, seed=1)                             # same configuration, other values
  io.load_state(tmp_path / "net.npz", restored)
  assert_identical(jax.tree_util.tree_map(_key_data, nnx.to_pure_dict(nnx.state(restored))),
                   jax.tree_util.tree_map(_key_data, nnx.to_pure_dict(nnx.state(model))))
  with pytest.raises(ValueError, match="expected"):
    io.load_state(tmp_path / "net.npz", _Net(5, seed=0))


def _key_data(x):
  return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
