"""Reading torch.save files without torch: the authors' fixtures, and small files written here byte by byte.

The hand-made files use the opcodes torch.save writes (pickle protocol 2: GLOBAL for torch._utils._rebuild_tensor_v2
and the storage classes, BINPERSID for storage references, an OrderedDict filled by SETITEMS), produced by a small
emitter so that no torch is needed; the emitter itself is checked against pickle.loads on plain data.
"""

import ast
import dataclasses
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from e2former_jax.authors import CheckpointFormatError, read_pt, read_state_dict

FIXTURES = Path(__file__).parent.parent / "fixtures" / "authors"
FIXTURE_NAMES = [
  "main_reduced_qk",
  "main_reduced_qk_lsr",
  "main_reduced_qkdot_linear",
  "main_reduced_qkdot_painn",
  "v2_reduced_qkdots",
]


def read_key_list(path: Path) -> list[tuple[str, tuple[int, ...], str, int]]:
  """(key, shape, dtype, numel) per line of a ``*.keys.txt`` (tab-separated; '#' lines are comments)."""
  rows = []
  for line in path.read_text().splitlines():
    if not line or line.startswith("#"):
      continue
    key, shape, dtype, numel = line.split("\t")[:4]
    rows.append((key, tuple(ast.literal_eval(shape)), dtype, int(numel)))
  return rows


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_checkpoints_match_their_key_lists(name):
  path = FIXTURES / name / f"{name}.pt"
  expected = read_key_list(FIXTURES / name / f"{name}.keys.txt")
  assert len(expected) > 100
  saved = read_pt(path)
  assert list(saved) == ["model"]
  state = read_state_dict(path)
  assert list(state) == [key for key, *_ in expected]
  for key, shape, dtype, numel in expected:
    assert state[key].shape == shape, key
    assert str(state[key].dtype) == dtype, key
    assert state[key].size == numel, key
  assert all(np.all(np.isfinite(v)) for v in state.values() if v.dtype.kind == "f")


# ---- a pickle emitter for the opcodes torch.save uses ----
@dataclasses.dataclass
class Global:
  module: str
  name: str


@dataclasses.dataclass
class Call:
  function: object
  args: tuple


@dataclasses.dataclass
class StorageRef:
  storage_class: str
  key: str
  numel: int


@dataclasses.dataclass
class Build:
  target: object
  state: object


@dataclasses.dataclass
class FilledOrderedDict:
  items: dict


def emit(obj, out: bytearray) -> None:
  if obj is None:
    out += pickle.NONE
  elif obj is True or obj is False:
    out += pickle.NEWTRUE if obj else pickle.NEWFALSE
  elif isinstance(obj, int):
    if 0 <= obj < 256:
      out += pickle.BININT1 + bytes([obj])
    elif -(2**31) <= obj < 2**31:
      out += pickle.BININT + struct.pack("<i", obj)
    else:
      encoded = pickle.encode_long(obj)
      out += pickle.LONG1 + bytes([len(encoded)]) + encoded
  elif isinstance(obj, float):
    out += pickle.BINFLOAT + struct.pack(">d", obj)
  elif isinstance(obj, str):
    encoded = obj.encode("utf-8")
    out += pickle.BINUNICODE + struct.pack("<I", len(encoded)) + encoded
  elif isinstance(obj, Global):
    out += pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode()
  elif isinstance(obj, Call):
    emit(obj.function, out)
    emit(tuple(obj.args), out)
    out += pickle.REDUCE
  elif isinstance(obj, StorageRef):
    emit(("storage", Global("torch", obj.storage_class), obj.key, "cpu", obj.numel), out)
    out += pickle.BINPERSID
  elif isinstance(obj, Build):
    emit(obj.target, out)
    emit(obj.state, out)
    out += pickle.BUILD
  elif isinstance(obj, FilledOrderedDict):
    emit(Call(Global("collections", "OrderedDict"), ()), out)
    emit_items(obj.items, out)
  elif isinstance(obj, tuple):
    out += pickle.MARK
    for item in obj:
      emit(item, out)
    out += pickle.TUPLE
  elif isinstance(obj, list):
    out += pickle.EMPTY_LIST + pickle.MARK
    for item in obj:
      emit(item, out)
    out += pickle.APPENDS
  elif isinstance(obj, dict):
    out += pickle.EMPTY_DICT
    emit_items(obj, out)
  else:
    raise TypeError(f"cannot emit {type(obj).__name__}")


def emit_items(items: dict, out: bytearray) -> None:
  out += pickle.MARK
  for key, value in items.items():
    emit(key, out)
    emit(value, out)
  out += pickle.SETITEMS


def dumps(obj) -> bytes:
  out = bytearray(pickle.PROTO + b"\x02")
  emit(obj, out)
  return bytes(out + pickle.STOP)


def tensor(storage_class: str, key: str, numel: int, offset: int, size: tuple, stride: tuple) -> Call:
  """A tensor as torch pickles it: _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)."""
  hooks = Call(Global("collections", "OrderedDict"), ())
  storage = StorageRef(storage_class, key, numel)
  return Call(Global("torch._utils", "_rebuild_tensor_v2"), (storage, offset, size, stride, False, hooks))


def write_pt(path: Path, obj, storages: dict[str, bytes], byteorder: str = "little") -> Path:
  """A torch.save zip archive: archive/data.pkl, archive/byteorder, archive/version, archive/data/<key>."""
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
    archive.writestr("archive/data.pkl", dumps(obj))
    archive.writestr("archive/byteorder", byteorder)
    for key, raw in storages.items():
      archive.writestr(f"archive/data/{key}", raw)
    archive.writestr("archive/version", "3\n")
  return path


def test_emitter_writes_what_pickle_reads():
  plain = {"a": [1, 300, -5, 2**40, 1.5, None, True, False], "b": ("x", ()), "c": {"d": "é"}}
  assert pickle.loads(dumps(plain)) == plain


def bfloat16_values() -> np.ndarray:
  """float32 numbers that bfloat16 holds exactly (low 16 bits zero), including signed zero and infinities."""
  values = np.array([1.0, -2.5, 3.140625, 1e-3, 6.5e4, -0.0, np.inf, -np.inf, 1e-38], dtype=np.float32)
  return (values.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)


DTYPE_CASES = [
  ("FloatStorage", np.array([1.5, -2.25, 3e-7], np.float32)),
  ("DoubleStorage", np.array([1.5, -2.25, 1e-300], np.float64)),
  ("HalfStorage", np.array([1.5, -2.25, 6.0e-5, 65504.0], np.float16)),
  ("LongStorage", np.array([0, -1, 2**62, -(2**63)], np.int64)),
  ("IntStorage", np.array([0, -1, 2**31 - 1], np.int32)),
  ("ShortStorage", np.array([-(2**15), 7], np.int16)),
  ("CharStorage", np.array([-128, 127], np.int8)),
  ("ByteStorage", np.array([0, 255], np.uint8)),
  ("BoolStorage", np.array([True, False, True], np.bool_)),
]


@pytest.mark.parametrize("byteorder", ["little", "big"])
@pytest.mark.parametrize(("storage_class", "values"), DTYPE_CASES, ids=[c for c, _ in DTYPE_CASES])
def test_storage_dtypes_and_byte_orders(tmp_path, storage_class, values, byteorder):
  raw = values.astype(values.dtype.newbyteorder("<" if byteorder == "little" else ">")).tobytes()
  obj = {"model": FilledOrderedDict({"w": tensor(storage_class, "0", values.size, 0, (values.size,), (1,))})}
  state = read_state_dict(write_pt(tmp_path / "t.pt", obj, {"0": raw}, byteorder))
  assert state["w"].dtype == values.dtype
  assert state["w"].dtype.isnative
  np.testing.assert_array_equal(state["w"], values)


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_bfloat16_is_widened_to_float32_exactly(tmp_path, byteorder):
  values = bfloat16_values()
  bits = (values.view(np.uint32) >> 16).astype(np.uint16)
  raw = bits.astype(np.dtype(np.uint16).newbyteorder("<" if byteorder == "little" else ">")).tobytes()
  obj = {"model": FilledOrderedDict({"w": tensor("BFloat16Storage", "0", values.size, 0, (values.size,), (1,))})}
  state = read_state_dict(write_pt(tmp_path / "t.pt", obj, {"0": raw}, byteorder))
  assert state["w"].dtype == np.float32
  np.testing.assert_array_equal(state["w"].view(np.uint32), values.view(np.uint32))


def test_non_contiguous_stride_and_shared_storage_with_offset(tmp_path):
  data = np.arange(12, dtype=np.float32)
  obj = {
    "model": FilledOrderedDict(
      {
        "transposed": tensor("FloatStorage", "0", 12, 0, (3, 4), (1, 3)),
        "head": tensor("FloatStorage", "0", 12, 0, (4,), (1,)),
        "tail": tensor("FloatStorage", "0", 12, 6, (2, 3), (3, 1)),
        "scalar": tensor("FloatStorage", "0", 12, 11, (), ()),
        "empty": tensor("FloatStorage", "0", 12, 0, (0, 5), (5, 1)),
      }
    )
  }
  state = read_state_dict(write_pt(tmp_path / "t.pt", obj, {"0": data.tobytes()}))
  np.testing.assert_array_equal(state["transposed"], data.reshape(4, 3).T)
  np.testing.assert_array_equal(state["head"], data[:4])
  np.testing.assert_array_equal(state["tail"], data[6:].reshape(2, 3))
  assert state["scalar"].shape == () and state["scalar"] == 11.0
  assert state["empty"].shape == (0, 5)
  state["head"][0] = 100.0  # tensors sharing a storage come back as independent arrays
  assert state["transposed"][0, 0] == 0.0


def test_pickled_slice_and_extra_top_level_entries(tmp_path):
  weights = np.ones(3, np.float32)
  obj = {
    "model": FilledOrderedDict({"w": tensor("FloatStorage", "0", 3, 0, (3,), (1,))}),
    "optimizer": {"state": {0: {"step": tensor("FloatStorage", "1", 1, 0, (), ())}}, "param_groups": [{"lr": 1e-3}]},
    "state": {
      "window": Call(Global("builtins", "slice"), (1, 10, 2)),
      "blob": Call(Global("_codecs", "encode"), ("\x00\xff", "latin1")),
    },
  }
  path = write_pt(tmp_path / "t.pt", obj, {"0": weights.tobytes(), "1": np.float32(7).tobytes()})
  saved = read_pt(path)
  assert saved["state"]["window"] == slice(1, 10, 2)
  assert saved["state"]["blob"] == b"\x00\xff"
  assert saved["optimizer"]["state"][0]["step"] == 7.0
  assert list(read_state_dict(path)) == ["w"]


def test_bare_state_dict_and_wrong_layouts(tmp_path):
  w = tensor("FloatStorage", "0", 2, 0, (2,), (1,))
  raw = {"0": np.zeros(2, np.float32).tobytes()}
  assert list(read_state_dict(write_pt(tmp_path / "bare.pt", FilledOrderedDict({"a.weight": w}), raw))) == ["a.weight"]
  other = write_pt(tmp_path / "other.pt", {"weights": {"a": w}, "epoch": 3}, raw)
  with pytest.raises(CheckpointFormatError, match="neither"):
    read_state_dict(other)
  assert list(read_state_dict(other, key="weights")) == ["a"]
  with pytest.raises(CheckpointFormatError, match="not tensors: \\['b'\\]"):
    read_state_dict(write_pt(tmp_path / "mixed.pt", {"model": {"a": w, "b": 1.0}}, raw))


def test_forbidden_global_is_refused_without_running_it(tmp_path):
  marker = tmp_path / "ran"
  obj = {
    "model": FilledOrderedDict({}),
    "state": Call(Global("posix", "system"), (f"touch {marker}",)),
  }
  path = write_pt(tmp_path / "evil.pt", obj, {})
  with pytest.raises(CheckpointFormatError, match="posix.system") as error:
    read_pt(path)
  assert str(path) in str(error.value)
  assert not marker.exists()


def test_pickle_cannot_modify_the_allowed_stand_ins(tmp_path):
  obj = {"model": Build(Global("torch", "FloatStorage"), (None, {"name": "LongStorage"}))}
  with pytest.raises(CheckpointFormatError, match="attribute 'name'"):
    read_pt(write_pt(tmp_path / "t.pt", obj, {}))
  obj = {"model": Build(Global("torch._utils", "_rebuild_tensor_v2"), {"function": None})}
  with pytest.raises(CheckpointFormatError):
    read_pt(write_pt(tmp_path / "u.pt", obj, {}))


def test_damaged_files_are_format_errors(tmp_path):
  data = np.arange(64, dtype=np.float32)
  obj = {"model": FilledOrderedDict({"w": tensor("FloatStorage", "0", 64, 0, (64,), (1,))})}
  good = write_pt(tmp_path / "good.pt", obj, {"0": data.tobytes()}).read_bytes()

  truncated = tmp_path / "truncated.pt"
  truncated.write_bytes(good[: len(good) // 2])
  with pytest.raises(CheckpointFormatError, match="truncated") as error:
    read_pt(truncated)
  assert str(truncated) in str(error.value)

  corrupt = tmp_path / "corrupt.pt"
  position = good.index(data.tobytes()) + 17
  corrupt.write_bytes(good[:position] + bytes([good[position] ^ 0xFF]) + good[position + 1 :])
  with pytest.raises(CheckpointFormatError, match="corrupt"):
    read_pt(corrupt)

  text = tmp_path / "text.pt"
  text.write_text("not a checkpoint")
  with pytest.raises(CheckpointFormatError, match="not a PyTorch checkpoint"):
    read_pt(text)

  legacy = tmp_path / "legacy.pt"
  legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"rest")
  with pytest.raises(CheckpointFormatError, match="legacy \\(pre-1.6\\)"):
    read_pt(legacy)

  with zipfile.ZipFile(tmp_path / "nopickle.pt", "w") as archive:
    archive.writestr("archive/version", "3\n")
  with pytest.raises(CheckpointFormatError, match="data.pkl"):
    read_pt(tmp_path / "nopickle.pt")

  with pytest.raises(CheckpointFormatError, match="'archive/data/0' is missing"):
    read_pt(write_pt(tmp_path / "nodata.pt", obj, {}))
  with pytest.raises(CheckpointFormatError, match="252 bytes for 64 elements"):
    read_pt(write_pt(tmp_path / "short.pt", obj, {"0": data.tobytes()[:-4]}))
  beyond = {"model": {"w": tensor("FloatStorage", "0", 64, 60, (8,), (1,))}}
  with pytest.raises(CheckpointFormatError, match="beyond.pt: tensor view .* reaches element 67"):
    read_pt(write_pt(tmp_path / "beyond.pt", beyond, {"0": data.tobytes()}))
  broken = tmp_path / "broken.pt"
  with zipfile.ZipFile(broken, "w") as archive:
    archive.writestr("archive/data.pkl", dumps({"model": {"w": 1.0}})[:-4])
  with pytest.raises(CheckpointFormatError, match="cannot unpickle data.pkl") as error:
    read_pt(broken)
  assert str(broken) in str(error.value)
