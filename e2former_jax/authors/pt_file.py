"""Reading PyTorch ``.pt`` checkpoints without PyTorch.

A ``torch.save`` file (torch >= 1.6) is a zip archive with one top folder ``<prefix>/`` holding

* ``data.pkl``: a pickle (protocol 2) of the saved object in which every tensor is a call
  ``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks)`` and
  every storage a persistent id ``("storage", <storage class>, key, location, numel)``;
* ``data/<key>``: the raw bytes of storage ``key`` (``numel`` elements of the storage's dtype);
* ``byteorder``: ``little`` or ``big`` (absent in files of older torch versions; read as little-endian);
* ``version`` and a few bookkeeping records.

``read_pt`` unpickles ``data.pkl`` with an unpickler that resolves only the globals a state dict needs (table
``ALLOWED_GLOBALS``) and never imports or calls anything else, so a hostile file cannot run code. Tensors come back
as numpy arrays (bfloat16 widened exactly to float32). ``read_state_dict`` returns the flat name -> array mapping
of a released checkpoint (``{"model": state_dict, ...}``). See docs/authors_checkpoints.md.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

_LEGACY_MAGIC_PICKLE = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


class CheckpointFormatError(ValueError):
  """The file is not a readable PyTorch checkpoint, or holds something a state dict does not need."""


# Storage class name -> numpy dtype of one element as stored (bfloat16 is read as its uint16 bit pattern).
STORAGE_DTYPES: dict[str, np.dtype] = {
  "FloatStorage": np.dtype(np.float32),
  "DoubleStorage": np.dtype(np.float64),
  "HalfStorage": np.dtype(np.float16),
  "BFloat16Storage": np.dtype(np.uint16),
  "LongStorage": np.dtype(np.int64),
  "IntStorage": np.dtype(np.int32),
  "ShortStorage": np.dtype(np.int16),
  "CharStorage": np.dtype(np.int8),
  "ByteStorage": np.dtype(np.uint8),
  "BoolStorage": np.dtype(np.bool_),
}


class _Frozen:
  """Base of the stand-ins a pickle can reference: a BUILD or attribute write on them is refused."""

  __slots__ = ()

  def __setattr__(self, name, value):
    raise CheckpointFormatError(f"the pickle tries to set attribute {name!r} of {self!r}")


class _StorageType(_Frozen):
  """Stand-in for a ``torch.*Storage`` class named in the pickle."""

  __slots__ = ("name",)

  def __init__(self, name: str):
    object.__setattr__(self, "name", name)

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class _Storage(_Frozen):
  """One storage record: its elements as a flat numpy array in native byte order."""

  __slots__ = ("array", "name", "key")

  def __init__(self, array: np.ndarray, name: str, key: str):
    for field, value in (("array", array), ("name", name), ("key", key)):
      object.__setattr__(self, field, value)


class _Callable(_Frozen):
  """Stand-in for an allowed torch or codec function: calls ``function``; cannot be modified by the pickle."""

  __slots__ = ("qualname", "function")

  def __init__(self, qualname: str, function: Callable):
    object.__setattr__(self, "qualname", qualname)
    object.__setattr__(self, "function", function)

  def __call__(self, *args):
    return self.function(*args)

  def __repr__(self) -> str:
    return self.qualname


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused) -> np.ndarray:
  """``torch._utils._rebuild_tensor_v2``: the view (offset, size, stride in elements) of a storage, copied."""
  if not isinstance(storage, _Storage):
    raise CheckpointFormatError(f"tensor rebuilt from {type(storage).__name__}, expected a storage record")
  size, stride = tuple(size), tuple(stride)
  if len(size) != len(stride) or not all(isinstance(v, int) and v >= 0 for v in (storage_offset, *size, *stride)):
    raise CheckpointFormatError(f"invalid tensor view offset={storage_offset} size={size} stride={stride}")
  flat = storage.array
  if 0 in size:
    return np.zeros(size, dtype=flat.dtype)
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise CheckpointFormatError(
      f"tensor view offset={storage_offset} size={size} stride={stride} reaches element {last} of storage "
      f"{storage.key!r} with {flat.size} elements"
    )
  strides = tuple(s * flat.itemsize for s in stride)
  view = np.lib.stride_tricks.as_strided(flat[storage_offset:], shape=size, strides=strides, writeable=False)
  return np.array(view, copy=True)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None) -> np.ndarray:
  """``torch._utils._rebuild_parameter[_with_state]``: a parameter is its data."""
  return data


def _torch_size(dims=()) -> tuple[int, ...]:
  return tuple(dims)


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
  """``_codecs.encode``: how protocol 2 pickles ``bytes``; only the latin-1 form pickle writes is accepted."""
  if not isinstance(text, str) or encoding != "latin1":
    raise CheckpointFormatError(f"_codecs.encode called with {type(text).__name__}, {encoding!r}")
  return text.encode("latin1")


# "module.name" -> the object the unpickler hands back. Anything else in a pickle is an error. Torch writes
# tensors with _rebuild_tensor_v2 and storages as the typed classes below (torch.UntypedStorage only appears with
# _rebuild_tensor_v3, used for dtypes without a typed storage class such as uint16/float8, not supported here).
ALLOWED_GLOBALS: dict[str, Any] = {
  "collections.OrderedDict": collections.OrderedDict,
  "builtins.slice": slice,
  "builtins.set": set,
  "builtins.frozenset": frozenset,
  "builtins.bytearray": bytearray,
  "builtins.complex": complex,
}
for _qualname, _function in (
  ("torch._utils._rebuild_tensor_v2", _rebuild_tensor),
  ("torch._utils._rebuild_parameter", _rebuild_parameter),
  ("torch._utils._rebuild_parameter_with_state", _rebuild_parameter),
  ("torch.Size", _torch_size),
  ("_codecs.encode", _codecs_encode),
):
  ALLOWED_GLOBALS[_qualname] = _Callable(_qualname, _function)
for _name in STORAGE_DTYPES:
  ALLOWED_GLOBALS[f"torch.{_name}"] = _StorageType(_name)


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickler that resolves only ``ALLOWED_GLOBALS`` and reads storages from the archive."""

  def __init__(self, file, load_storage: Callable[[_StorageType, str, int], _Storage]):
    super().__init__(file, encoding="utf-8")
    self._load_storage = load_storage

  def find_class(self, module: str, name: str):
    module = "builtins" if module == "__builtin__" else module
    full = f"{module}.{name}"
    if full not in ALLOWED_GLOBALS:
      raise CheckpointFormatError(
        f"the pickle references {full}, which a state dict does not need; refusing to load it "
        f"(allowed: {', '.join(sorted(ALLOWED_GLOBALS))})"
      )
    return ALLOWED_GLOBALS[full]

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise CheckpointFormatError(f"unexpected persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
      raise CheckpointFormatError(f"malformed storage reference {pid!r}")
    return self._load_storage(storage_type, key, numel)


def _read_member(archive: zipfile.ZipFile, name: str) -> bytes:
  try:
    return archive.read(name)
  except KeyError as error:
    raise CheckpointFormatError(f"archive member {name!r} is missing") from error
  except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
    raise CheckpointFormatError(f"archive member {name!r} is corrupt ({error})") from error


def _archive_prefix(archive: zipfile.ZipFile) -> str:
  """The top folder that holds ``data.pkl``."""
  prefixes = [n[: -len("data.pkl")] for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(prefixes) != 1:
    raise CheckpointFormatError(
      f"expected one '<prefix>/data.pkl' in the archive, found {len(prefixes)}; not a torch.save file"
    )
  return prefixes[0]


def _byte_order(archive: zipfile.ZipFile, prefix: str) -> str:
  """``<`` or ``>`` from the ``byteorder`` record; files without one (older torch versions) are little-endian."""
  if f"{prefix}byteorder" not in archive.namelist():
    return "<"
  order = _read_member(archive, f"{prefix}byteorder").decode("ascii", errors="replace").strip()
  if order not in ("little", "big"):
    raise CheckpointFormatError(f"byteorder record is {order!r}, expected 'little' or 'big'")
  return "<" if order == "little" else ">"


def _decode_storage(raw: bytes, storage_type: _StorageType, numel: int, order: str, name: str) -> np.ndarray:
  """Raw storage bytes -> flat native-order array (bfloat16 widened to float32, bool checked to be 0/1)."""
  dtype = STORAGE_DTYPES[storage_type.name]
  if len(raw) != numel * dtype.itemsize:
    raise CheckpointFormatError(
      f"{name}: {len(raw)} bytes for {numel} elements of {storage_type} ({numel * dtype.itemsize} expected)"
    )
  if dtype == np.bool_:
    flat = np.frombuffer(raw, dtype=np.uint8)
    if flat.size and flat.max() > 1:
      raise CheckpointFormatError(f"{name}: bool storage holds bytes other than 0 and 1")
    return flat.astype(np.bool_)
  flat = np.frombuffer(raw, dtype=dtype.newbyteorder(order)).astype(dtype)
  if storage_type.name == "BFloat16Storage":
    return (flat.astype(np.uint32) << 16).view(np.float32)
  return flat


def _unpickle_archive(archive: zipfile.ZipFile) -> Any:
  prefix = _archive_prefix(archive)
  order = _byte_order(archive, prefix)
  storages: dict[str, _Storage] = {}

  def load_storage(storage_type: _StorageType, key: str, numel: int) -> _Storage:
    if key not in storages:
      name = f"{prefix}data/{key}"
      array = _decode_storage(_read_member(archive, name), storage_type, numel, order, name)
      storages[key] = _Storage(array, storage_type.name, key)
    elif storages[key].name != storage_type.name:
      raise CheckpointFormatError(f"storage {key!r} referenced as {storage_type} and as torch.{storages[key].name}")
    return storages[key]

  pickled = _read_member(archive, f"{prefix}data.pkl")
  try:
    return _StateDictUnpickler(io.BytesIO(pickled), load_storage).load()
  except CheckpointFormatError:
    raise
  except Exception as error:  # any other failure inside the pickle stream means a malformed file
    raise CheckpointFormatError(f"cannot unpickle data.pkl ({type(error).__name__}: {error})") from error


def read_pt(path: str | os.PathLike) -> Any:
  """Reads a ``torch.save`` file and returns the saved object with numpy arrays in place of tensors.

  Args:
    path: the ``.pt`` file.

  Returns:
    The unpickled object (for a checkpoint usually a dict; state dicts are ``collections.OrderedDict``). Tensor
    dtypes map to numpy as float32/float64/float16/int64/int32/int16/int8/uint8/bool; bfloat16 tensors come
    back as float32 holding exactly the same values. Tensors that share a storage are independent copies.

  Raises:
    CheckpointFormatError: not a zip archive, a corrupt or truncated file, a missing record, a legacy
      (pre-1.6) file, or a pickle that references anything outside ``ALLOWED_GLOBALS``; the message names the file.
  """
  path = os.fspath(path)
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile as error:
    with open(path, "rb") as handle:
      head = handle.read(len(_LEGACY_MAGIC_PICKLE))
    if head == _LEGACY_MAGIC_PICKLE:
      raise CheckpointFormatError(
        f"{path}: legacy (pre-1.6) torch.save format is not supported, re-save with torch>=1.6"
      ) from error
    raise CheckpointFormatError(f"{path}: not a PyTorch checkpoint (not a zip archive, or truncated)") from error
  with archive:
    try:
      return _unpickle_archive(archive)
    except CheckpointFormatError as error:
      raise CheckpointFormatError(f"{path}: {error}") from error


def read_state_dict(path: str | os.PathLike, key: str = "model") -> dict[str, np.ndarray]:
  """Reads the parameter tensors of a checkpoint.

  Args:
    path: the ``.pt`` file: the released layout ``{key: state_dict, ...}`` (other top-level entries, such as
      optimizer or trainer state, are read and dropped) or a bare state dict.
    key: the top-level entry that holds the state dict.

  Returns:
    Parameter name -> numpy array, in the file's order.

  Raises:
    CheckpointFormatError: as ``read_pt``, or when the file holds neither layout.
  """
  path = os.fspath(path)
  saved = read_pt(path)
  if not isinstance(saved, dict):
    raise CheckpointFormatError(f"{path}: holds a {type(saved).__name__}, expected a dict")
  if key in saved and isinstance(saved[key], dict):
    state = saved[key]
  elif saved and all(isinstance(v, np.ndarray) for v in saved.values()):
    state = saved
  else:
    raise CheckpointFormatError(
      f"{path}: neither a {{{key!r}: state_dict, ...}} checkpoint nor a bare state dict; top-level entries: "
      f"{sorted(map(str, saved))}"
    )
  not_arrays = sorted(str(name) for name, value in state.items() if not isinstance(value, np.ndarray))
  if not_arrays:
    raise CheckpointFormatError(f"{path}: state dict entries that are not tensors: {not_arrays}")
  return {str(name): value for name, value in state.items()}
