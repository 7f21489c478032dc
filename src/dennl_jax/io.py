"""Saving and loading parameter pytrees: one ``.npz`` file with its description.

``save_params(path, tree, metadata)`` writes every array of ``tree`` and a
JSON description of the tree into one ``.npz`` (zip) file; ``load_params``
rebuilds the exact pytree type from it.  ``tree`` is any model pytree --
:class:`~dennl_jax.HMM`, :class:`~dennl_jax.HSMM`, any emission or duration
family on its own, single or batched with leading user axes, including the
unconstrained / pre-activation pytrees of the same types -- or plain
containers (dict, list, tuple, None) of those and of arrays, such as the pure
dict of a Flax NNX state (:func:`save_state` / :func:`load_state`).

The description records, for every parameterised node, its class
(``module:qualname``), its static fields (``min_covar``, ``max_duration``) and
for every array its path, shape and dtype; beside it: the format version, the
library version, the model and family classes, the batch shape and the
caller's ``metadata`` (any JSON value).  :func:`read_metadata` returns it
without loading the arrays.

Guarantees.  Saving never modifies its inputs and is atomic: the file is
written under a temporary name in the same directory, flushed to disk and
renamed over ``path``, so a save that is killed leaves the previous file (or
none), never half a file.  Loading checks everything it reads and raises
``ValueError`` naming the problem: not a zip/npz file, a damaged member (zip
CRC), no description, another format version, an unknown class, a missing
array, an array whose shape or dtype differs from its description, and (with
``like=``) a tree of another structure, shape or dtype than expected.
Loaded leaves are numpy arrays, bit-identical to what was saved (no dtype
conversion: a float64 file stays float64 even when JAX runs in float32).

Classes are resolved from modules that are already imported (``dennl_jax``
modules are imported on demand), so a file never causes arbitrary imports;
a custom family's module must be imported before its file is loaded.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Mapping

import jax
import numpy as np

from dennl_jax._version import __version__
from dennl_jax.families import Parameterised

FORMAT = "dennl_jax.params"
FORMAT_VERSION = 1
_METADATA_KEY = "__metadata__"


# ---------------------------------------------------------------------------
# Tree <-> (JSON description, arrays)
# ---------------------------------------------------------------------------

def _class_name(cls) -> str:
  return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_class(name: str, where: str):
  module_name, _, qualname = name.partition(":")
  if module_name.split(".")[0] == "dennl_jax":
    try:
      importlib.import_module(module_name)
    except ImportError as err:
      raise ValueError(f"{where}: class {name} names a module that does not exist "
                       f"in this version of dennl_jax ({err})") from None
  module = sys.modules.get(module_name)
  if module is None:
    raise ValueError(f"{where}: class {name} lives in module {module_name!r}, which is not "
                     f"imported; import it before loading")
  cls = module
  for part in qualname.split("."):
    cls = getattr(cls, part, None)
    if cls is None:
      raise ValueError(f"{where}: module {module_name!r} has no class {qualname!r}")
  if not (isinstance(cls, type) and issubclass(cls, Parameterised)
          and dataclasses.is_dataclass(cls)):
    raise ValueError(f"{where}: {name} is not a dennl_jax parameter pytree class")
  return cls


def _static_value(value, where: str):
  if isinstance(value, (bool, int, float, str)) or value is None:
    return value
  if isinstance(value, (np.integer, np.floating, np.bool_)):
    return value.item()
  raise TypeError(f"{where} is a static field holding {type(value).__name__}; only "
                  f"numbers, strings, booleans and None can be saved")


def _describe(node, where: str, arrays: dict):
  """JSON description of ``node``; its arrays (copied to numpy) go into ``arrays``."""
  if isinstance(node, Parameterised) and dataclasses.is_dataclass(node):
    fields, static = {}, {}
    for field in dataclasses.fields(node):
      value = getattr(node, field.name)
      if field.metadata.get("pytree_node", True):
        fields[field.name] = _describe(value, f"{where}.{field.name}", arrays)
      else:
        static[field.name] = _static_value(value, f"{where}.{field.name}")
    return {"class": _class_name(type(node)), "fields": fields, "static": static}
  if node is None:
    return {"none": True}
  if isinstance(node, Mapping):
    items = []
    for key, value in node.items():
      if not isinstance(key, (str, int)) or isinstance(key, bool):
        raise TypeError(f"{where}: dict keys must be str or int, got {key!r}")
      items.append([key, _describe(value, f"{where}[{key!r}]", arrays)])
    return {"dict": items}
  if isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
    kind = "list" if isinstance(node, list) else "tuple"
    return {kind: [_describe(v, f"{where}[{i}]", arrays) for i, v in enumerate(node)]}
  if isinstance(node, tuple):
    raise TypeError(f"{where}: NamedTuple {type(node).__name__} cannot be saved; convert it "
                    f"to a dict (node._asdict())")
  return _describe_array(node, where, arrays)


def _is_prng_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _dtype(x):
  # np.result_type, not jnp's: jnp maps float64 to float32 when x64 is off.
  return x.dtype if hasattr(x, "dtype") else np.result_type(x)


def _describe_array(node, where: str, arrays: dict):
  entry = {}
  if _is_prng_key(node):
    # Typed PRNG keys (e.g. in an NNX Rngs) are stored as their raw key data.
    entry["prng_impl"] = str(jax.random.key_impl(node))
    node = jax.random.key_data(node)
  # np.array copies: the caller's arrays are never aliased or modified.
  array = np.array(jax.device_get(node))
  if array.dtype == object:
    raise TypeError(f"{where} is a {type(node).__name__}, not an array or a parameter pytree")
  key = f"a{len(arrays)}"
  arrays[key] = array
  entry.update({"array": key, "path": where, "shape": list(array.shape),
                "dtype": array.dtype.name})
  return entry


def _rebuild(spec, where: str, arrays):
  if not isinstance(spec, dict):
    raise ValueError(f"{where}: malformed description {spec!r}")
  if "class" in spec:
    cls = _resolve_class(spec["class"], where)
    kwargs = {name: _rebuild(sub, f"{where}.{name}", arrays)
              for name, sub in spec["fields"].items()}
    kwargs.update(spec.get("static", {}))
    expected = {f.name for f in dataclasses.fields(cls) if f.init}
    if set(kwargs) - expected:
      raise ValueError(f"{where}: the file gives {cls.__name__} fields "
                       f"{sorted(set(kwargs) - expected)} that this version does not have")
    try:
      return cls(**kwargs)
    except TypeError as err:
      raise ValueError(f"{where}: cannot rebuild {cls.__name__} from the file ({err})") from None
  if "none" in spec:
    return None
  if "dict" in spec:
    return {key: _rebuild(sub, f"{where}[{key!r}]", arrays) for key, sub in spec["dict"]}
  if "list" in spec:
    return [_rebuild(sub, f"{where}[{i}]", arrays) for i, sub in enumerate(spec["list"])]
  if "tuple" in spec:
    return tuple(_rebuild(sub, f"{where}[{i}]", arrays) for i, sub in enumerate(spec["tuple"]))
  if "array" in spec:
    return _load_array(spec, where, arrays)
  raise ValueError(f"{where}: malformed description {spec!r}")


def _load_array(spec, where: str, arrays):
  key = spec["array"]
  if key not in arrays:
    raise ValueError(f"{where}: array {key!r} is missing from the file")
  array = arrays[key]
  dtype = jax.numpy.dtype(spec["dtype"])
  if array.dtype != dtype:
    # npz stores extension dtypes (bfloat16, float8) as raw bytes of the same width.
    if array.dtype.kind == "V" and array.dtype.itemsize == dtype.itemsize:
      array = array.view(dtype)
    else:
      raise ValueError(f"{where}: the file's array has dtype {array.dtype}, its description "
                       f"says {spec['dtype']}")
  if list(array.shape) != list(spec["shape"]):
    raise ValueError(f"{where}: the file's array has shape {array.shape}, its description "
                     f"says {tuple(spec['shape'])}")
  if "prng_impl" in spec:
    return jax.random.wrap_key_data(array, impl=spec["prng_impl"])
  return array


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------

def _summary(tree) -> dict:
  """Model class, family classes and batch shape of a model (what a reader looks for)."""
  summary = {"model": _class_name(type(tree)) if isinstance(tree, Parameterised)
             else type(tree).__name__}
  families = getattr(tree, "families", None)
  if callable(families):
    summary["families"] = {name: _class_name(type(f)) for name, f in families()}
    summary["batch_shape"] = list(np.shape(tree.initial)[:-1])
  return summary


def save_params(path, params, metadata=None) -> None:
  """Write ``params`` (any parameter pytree, single or batched) to ``path`` atomically.

  path: the file to write (kept as given; ``.npz`` is the conventional
    suffix).  Its directory must exist.  An existing file is replaced only
    once the new one is completely on disk.
  params: an HMM/HSMM, a family, or dict/list/tuple/None containers of
    those and of arrays (see the module docstring).  Never modified.
  metadata: any JSON-serialisable value stored with the file (e.g. the
    config that produced the parameters); read back by :func:`read_metadata`.

  Raises ``TypeError`` naming a leaf or static field that cannot be stored,
  before anything is written.
  """
  arrays = {}
  description = {"format": FORMAT, "format_version": FORMAT_VERSION,
                 "library_version": __version__, **_summary(params),
                 "dtypes": [], "tree": _describe(params, "params", arrays),
                 "user": metadata}
  description["dtypes"] = sorted({a.dtype.name for a in arrays.values()})
  try:
    text = json.dumps(description, allow_nan=False)
  except (TypeError, ValueError) as err:
    raise TypeError(f"metadata must be JSON-serialisable (finite numbers): {err}") from None
  arrays[_METADATA_KEY] = np.frombuffer(text.encode("utf-8"), np.uint8)
  _write_atomically(os.fspath(path), arrays)


def _temp_prefix(path: str, pid: int) -> str:
  return f".{os.path.basename(path)}.{pid}."


def _remove_stale_temporaries(path: str) -> None:
  """Delete the temporary files of earlier saves of ``path`` whose process is gone.

  A save killed between writing its temporary file and renaming it (SIGKILL,
  power loss) leaves ``.NAME.PID.*.tmp`` beside the target.  The writer's PID
  is in the name, so a temporary file of a process that still runs (another
  save in progress) is kept.
  """
  directory = os.path.dirname(os.path.abspath(path))
  head = f".{os.path.basename(path)}."
  for name in os.listdir(directory):
    if not (name.startswith(head) and name.endswith(".tmp")):
      continue
    pid_text = name[len(head):].split(".", 1)[0]
    if not pid_text.isdigit() or int(pid_text) == os.getpid() or _process_alive(int(pid_text)):
      continue
    try:
      os.unlink(os.path.join(directory, name))
    except FileNotFoundError:
      pass


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:      # alive, owned by another user
    return True
  return True


def _write_atomically(path: str, arrays: dict) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  _remove_stale_temporaries(path)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=_temp_prefix(path, os.getpid()),
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as handle:
      np.savez(handle, **arrays)
      handle.flush()
      os.fsync(handle.fileno())
    # mkstemp creates the file private (0600); give it the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _read(path, with_arrays: bool):
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no parameter file at {path}")
  # Every way a damaged file can fail to read (truncated zip, bad CRC,
  # bad npy header, not a zip at all) becomes one ValueError naming the file.
  # (NotImplementedError and RuntimeError: numpy's readers raise them for some
  # flipped header bytes, e.g. an unsupported compression method.)
  damaged = (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError, UnicodeDecodeError,
             zlib.error, NotImplementedError, RuntimeError)
  try:
    npz = np.load(path, allow_pickle=False)
  except damaged as err:
    raise ValueError(f"{path} is corrupt or not a parameter file ({type(err).__name__}: "
                     f"{err})") from None
  if not isinstance(npz, np.lib.npyio.NpzFile):       # a plain .npy array
    raise ValueError(f"{path} is a single numpy array, not a parameter file")
  with npz:
    if _METADATA_KEY not in npz.files:
      raise ValueError(f"{path} has no dennl_jax description (not written by save_params)")
    try:
      text = npz[_METADATA_KEY].tobytes().decode("utf-8")
      arrays = {k: npz[k] for k in npz.files if k != _METADATA_KEY} if with_arrays else None
    except damaged as err:
      raise ValueError(f"{path} is corrupt ({type(err).__name__}: {err})") from None
  try:
    description = json.loads(text)
  except (json.JSONDecodeError, RecursionError) as err:
    raise ValueError(f"{path}: its description is not valid JSON ({type(err).__name__}: "
                     f"{err})") from None
  if not isinstance(description, dict) or description.get("format") != FORMAT:
    raise ValueError(f"{path} is not a {FORMAT} file")
  if description.get("format_version") != FORMAT_VERSION:
    raise ValueError(
        f"{path} has format version {description.get('format_version')} (written by "
        f"dennl_jax {description.get('library_version')}); this version of dennl_jax "
        f"reads format version {FORMAT_VERSION}")
  return description, arrays


def read_metadata(path) -> dict:
  """The file's description without loading its arrays.

  Keys: ``format``, ``format_version``, ``library_version``, ``model``,
  ``families`` and ``batch_shape`` (models), ``dtypes``, ``tree`` (the full
  structure: classes, static fields, paths, shapes, dtypes) and ``user`` (the
  ``metadata`` given to :func:`save_params`).
  """
  return _read(path, with_arrays=False)[0]


def load_params(path, *, like=None):
  """Rebuild the pytree saved by :func:`save_params` at ``path``.

  like: optional template (e.g. a freshly initialised model of the expected
    configuration): the loaded tree must have its pytree structure (classes,
    static fields), leaf shapes and dtypes, else ``ValueError`` naming the
    first difference.
  Returns the same pytree type with numpy leaves, bit-identical to the saved
  arrays.  Raises ``FileNotFoundError`` or ``ValueError`` (see module docstring).
  """
  description, arrays = _read(path, with_arrays=True)
  try:
    tree = _rebuild(description["tree"], "params", arrays)
  except (KeyError, TypeError, AttributeError, IndexError, RecursionError) as err:
    # A description edited by hand or damaged in a way JSON still parses.
    raise ValueError(f"{os.fspath(path)}: malformed description ({type(err).__name__}: "
                     f"{err})") from None
  if like is not None:
    check_same_structure(tree, like, f"{os.fspath(path)}")
  return tree


def check_same_structure(tree, like, name: str = "tree") -> None:
  """Raise ``ValueError`` naming the first structural, shape or dtype difference."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  flat_like, treedef_like = jax.tree_util.tree_flatten_with_path(like)
  if treedef != treedef_like:
    raise ValueError(f"{name} holds {treedef}, expected {treedef_like}")
  for (key_path, leaf), (_, ref) in zip(flat, flat_like):
    where = jax.tree_util.keystr(key_path)
    if np.shape(leaf) != np.shape(ref):
      raise ValueError(f"{name}: {where} has shape {np.shape(leaf)}, expected {np.shape(ref)}")
    if _dtype(leaf) != _dtype(ref):
      raise ValueError(f"{name}: {where} has dtype {_dtype(leaf)}, expected {_dtype(ref)}")


def save_state(path, model, metadata=None) -> None:
  """Save the state (all variables) of a Flax NNX module, e.g. a :class:`~dennl_jax.DENNL`.

  Only the state is stored: the caller rebuilds the module (its graph) from
  its configuration and restores the values with :func:`load_state`.
  """
  from flax import nnx
  save_params(path, nnx.to_pure_dict(nnx.state(model)), metadata)


def load_state(path, model) -> None:
  """Restore into ``model`` (built from the same configuration) the state saved at ``path``.

  The saved state must match the module's variables in structure, shapes and
  dtypes (``ValueError`` naming the first difference otherwise); ``model`` is
  updated in place, as NNX modules are.
  """
  from flax import nnx
  state = nnx.state(model)
  pure = load_params(path, like=nnx.to_pure_dict(state))
  # Device arrays, like the module's own variables (dtypes were checked equal above).
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jax.numpy.asarray, pure))
  nnx.update(model, state)
