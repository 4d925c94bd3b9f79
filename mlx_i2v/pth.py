"""Read PyTorch ``.pth`` checkpoints without PyTorch and without running code from them.

The Wan-AI originals (``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``, ...) are ``torch.save``
archives: a zip holding ``<name>/data.pkl`` (a pickle describing the tensors), one member
``<name>/data/<key>`` of raw bytes per storage, and ``<name>/byteorder``. A pickle can name any Python
callable, so :func:`read_pth` unpickles with :class:`_RestrictedUnpickler`, which resolves only the few
globals a state dict of tensors needs (to stand-ins defined here, never to torch) and raises
:class:`~mlx_i2v.errors.UnsafeCheckpointError` for anything else before it can be called. Unpickling
yields only placeholders; the bytes are turned into MLX arrays afterwards, after every shape, stride and
offset has been checked against the storage it indexes.

The legacy format (``torch.save(..., _use_new_zipfile_serialization=False)``, the default before torch
1.6: pickles followed by raw storages in one file) is read too, through the same unpickler. The older tar
format (torch < 0.1.10) is not.

Memory: the file is ``mmap``-ed, not read. ``torch.save`` stores members uncompressed, so each tensor is a
numpy view straight into the mapped file, copied exactly once into MLX memory (made contiguous on the
way, for views such as a transposed weight saved as is); peak use is the tensors' size plus page cache
the OS can reclaim. A big-endian file costs one temporary byte-swapped copy per tensor, and a
compressed member (never written by torch) is decompressed into memory first. Storages are not
CRC-checked (torch does not either); ``data.pkl`` is.
"""

from __future__ import annotations

import io
import logging
import math
import mmap
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, IO

import mlx.core as mx
import numpy as np

from .errors import UnsafeCheckpointError, WeightLoadError

log = logging.getLogger(__name__)

# The legacy format opens with these two pickled ints (torch/serialization.py: MAGIC_NUMBER,
# PROTOCOL_VERSION).
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.<Name>Storage`` class: the element type on disk and the MLX dtype it
    becomes."""

    name: str
    np_dtype: np.dtype  # little-endian; bfloat16 is read as its raw uint16 bits
    mx_dtype: mx.Dtype


_STORAGE_TYPES: dict[str, _StorageType] = {
    t.name: t
    for t in (
        _StorageType("FloatStorage", np.dtype("<f4"), mx.float32),
        _StorageType("HalfStorage", np.dtype("<f2"), mx.float16),
        _StorageType("BFloat16Storage", np.dtype("<u2"), mx.bfloat16),
        # float64 is narrowed: MLX has no float64 on the GPU, and no model here needs the precision.
        _StorageType("DoubleStorage", np.dtype("<f8"), mx.float32),
        # Integer and bool buffers (BatchNorm's num_batches_tracked, masks, position ids).
        _StorageType("LongStorage", np.dtype("<i8"), mx.int64),
        _StorageType("IntStorage", np.dtype("<i4"), mx.int32),
        _StorageType("ShortStorage", np.dtype("<i2"), mx.int16),
        _StorageType("CharStorage", np.dtype("i1"), mx.int8),
        _StorageType("ByteStorage", np.dtype("u1"), mx.uint8),
        _StorageType("BoolStorage", np.dtype("?"), mx.bool_),
    )
}


@dataclass(frozen=True)
class _Storage:
    """A storage reference from the pickle: the member ``data/<key>`` holds ``numel`` elements."""

    type: _StorageType
    key: str
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    """What unpickling a tensor yields: a strided view of a storage, in elements."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise WeightLoadError(f"tensor {what} {value!r} is not a tuple of non-negative ints")
    return tuple(value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor``; validates the view against its storage."""
    if not isinstance(storage, _Storage):
        raise WeightLoadError(f"tensor built from {type(storage).__name__}, not a storage")
    shape, strides = _int_tuple(size, "shape"), _int_tuple(stride, "stride")
    if type(storage_offset) is not int or storage_offset < 0:
        raise WeightLoadError(f"tensor storage offset {storage_offset!r} is not a non-negative int")
    offset = storage_offset
    if len(shape) != len(strides):
        raise WeightLoadError(f"tensor shape {shape} and stride {strides} differ in length")
    count = math.prod(shape)
    # Every element the view can touch must lie inside the storage: as_strided would read past it.
    last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
    if count and last >= storage.numel:
        raise WeightLoadError(f"tensor view (offset {offset}, shape {shape}, stride {strides}) "
                              f"reaches past its storage of {storage.numel} elements")
    # A broadcast view (stride 0) can name far more elements than the file holds; copying it out
    # could exhaust memory, so only views no larger than their storage are accepted.
    if count > storage.numel:
        raise WeightLoadError(f"tensor of shape {shape} is a broadcast view of a storage of "
                              f"{storage.numel} elements; re-save it with .contiguous()")
    return _TensorRef(storage, offset, shape, strides)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, metadata: Any = None) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v2`` (what ``torch.save`` writes for a tensor)."""
    if metadata:
        # Conjugate/negative view bits would change the values; state dicts never carry them.
        raise WeightLoadError(f"tensor carries metadata {metadata!r}, which is not supported")
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_parameter`` (an ``nn.Parameter`` saved as such)."""
    if not isinstance(data, _TensorRef):
        raise WeightLoadError(f"parameter wraps {type(data).__name__}, not a tensor")
    return data


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): t for name, t in _STORAGE_TYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`_SAFE_GLOBALS` and storage references.

    ``find_class`` is the only way a pickle reaches a Python object by name (GLOBAL, STACK_GLOBAL,
    INST and the copyreg extension codes all go through it), so refusing there refuses before any
    call. The storages referenced are collected in :attr:`storages`, by key.
    """

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load '{module}.{name}' from the pickle; only tensor "
                "state dicts are allowed and no code from a checkpoint is ever run") from None

    def persistent_load(self, pid: Any) -> _Storage:
        # Zip format: ('storage', type, key, location, numel); legacy adds a view_metadata entry,
        # which torch >= 0.4 always writes as None.
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and (len(pid) == 5 or pid[5] is None)):
            raise WeightLoadError(f"unsupported persistent id {pid!r}")
        _, stype, key, _location, numel = pid[:5]
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or type(numel) is not int \
                or numel < 0:
            raise WeightLoadError(f"malformed storage reference {pid!r}")
        storage = self.storages.setdefault(key, _Storage(stype, key, numel))
        if storage != _Storage(stype, key, numel):
            raise WeightLoadError(f"storage {key!r} is referenced with two different types or sizes")
        return storage


def read_pth(path: str | Path) -> dict[str, mx.array]:
    """Read a ``torch.save`` state dict into MLX arrays, keyed as in the file.

    Accepted layouts: a dict (or ``OrderedDict``) of tensors, or a dict with exactly one entry whose
    value is such a dict (``{"state_dict": {...}}``, ``{"model": {...}}``), which is unwrapped. Tensors
    keep their dtype (float32, float16, bfloat16, integer and bool; float64 becomes float32), shape and
    values; views (slices, transposes, shared storages) come back as independent contiguous arrays.

    Raises :class:`~mlx_i2v.errors.UnsafeCheckpointError` if the pickle names anything beyond tensors
    (nothing it names is ever called), and :class:`~mlx_i2v.errors.WeightLoadError` if the file is
    missing, truncated, corrupt, or holds something other than such a dict.
    """
    label = str(path)
    try:
        with open(path, "rb") as f:
            if not f.read(4):
                raise WeightLoadError("file is empty")
            # Not closed explicitly: numpy views may still export its buffer (in a traceback, say);
            # it is unmapped when the last reference goes, and it keeps its own file descriptor.
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            f.seek(0)
            try:
                if mm[:4] == b"PK\x03\x04":
                    obj, storage_data = _parse_zip(f, mm)
                else:
                    obj, storage_data = _parse_legacy(f, mm)
            except WeightLoadError:
                raise
            except Exception as e:
                # Malformed bytes can make the unpickler or zipfile raise almost anything (EOFError,
                # UnpicklingError, BadZipFile, UnicodeDecodeError, struct.error ...): all mean the
                # same thing to the user.
                detail = str(e).splitlines()[0] if str(e) else ""
                raise WeightLoadError(
                    f"truncated or corrupt checkpoint ({type(e).__name__}: {detail})") from e
            tensors = _materialize(_state_dict(obj), storage_data)
    except WeightLoadError as e:
        # Messages are raised without the path (the unpickler's stand-ins do not know it); add it once.
        raise type(e)(f"{label}: {e}") from e
    except OSError as e:
        raise WeightLoadError(f"{label}: cannot read checkpoint: {e.strerror or e}") from e
    log.info("read %d tensors from %s", len(tensors), label)
    return tensors


StorageData = Callable[[_Storage], np.ndarray]


def _parse_zip(f: IO[bytes], mm: mmap.mmap) -> tuple[Any, StorageData]:
    """Unpickle ``data.pkl`` of a ``torch.save`` zip; return the object and a storage reader."""
    zf = zipfile.ZipFile(f)
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise WeightLoadError(f"zip archive is not a torch.save checkpoint "
                              f"(expected one <name>/data.pkl, found {len(pickles)})")
    prefix = pickles[0][: -len("data.pkl")]
    obj = _RestrictedUnpickler(io.BytesIO(zf.read(pickles[0]))).load()
    names = set(zf.namelist())
    # Archives from torch < 1.5 have no byteorder record; they were little-endian.
    byteorder = zf.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
    if byteorder not in ("little", "big"):
        raise WeightLoadError(f"unknown byte order {byteorder!r}")

    def storage_data(storage: _Storage) -> np.ndarray:
        name = f"{prefix}data/{storage.key}"
        if name not in names:
            raise WeightLoadError(f"storage member {name} is missing")
        info = zf.getinfo(name)
        if info.flag_bits & 0x1:
            raise WeightLoadError(f"storage member {name} is encrypted")
        if info.compress_type == zipfile.ZIP_STORED:
            start = _member_data_offset(mm, info)
            if start + info.file_size > len(mm):
                raise WeightLoadError(f"truncated (storage {name} runs past the end)")
            buf: Any = memoryview(mm)[start : start + info.file_size]
        else:
            buf = zf.read(info)
        dtype = storage.type.np_dtype.newbyteorder("<" if byteorder == "little" else ">")
        return _frombuffer(buf, dtype, storage)

    return obj, storage_data


def _member_data_offset(mm: mmap.mmap, info: zipfile.ZipInfo) -> int:
    """Offset of a member's bytes: after its local header, whose name/extra lengths may differ from
    the central directory's (torch pads the extra field to align the data)."""
    start = info.header_offset
    header = mm[start : start + 30]
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise WeightLoadError(f"bad local header for zip member {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return start + 30 + name_len + extra_len


def _parse_legacy(f: IO[bytes], mm: mmap.mmap) -> tuple[Any, StorageData]:
    """Read the pre-1.6 format: magic, protocol, sys_info, the object, the storage keys (all pickles),
    then each storage as an int64 element count and its bytes, always little-endian."""
    try:
        magic = _RestrictedUnpickler(f).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:
        raise WeightLoadError("not a PyTorch checkpoint (neither a torch.save zip archive "
                              "nor the legacy pickle format)") from e
    if magic != _LEGACY_MAGIC:
        raise WeightLoadError("not a PyTorch checkpoint (a pickle without torch's magic "
                              "number)")
    if _RestrictedUnpickler(f).load() != _LEGACY_PROTOCOL:
        raise WeightLoadError("unsupported legacy protocol version")
    _RestrictedUnpickler(f).load()  # sys_info: the writer's endianness does not matter
    unpickler = _RestrictedUnpickler(f)
    obj = unpickler.load()
    keys = _RestrictedUnpickler(f).load()
    if not isinstance(keys, list) or set(keys) != set(unpickler.storages):
        raise WeightLoadError("storage key list does not match the tensors")
    # The C unpickler consumes exactly the pickle's bytes, so the storages start at f.tell().
    position = f.tell()
    arrays: dict[str, np.ndarray] = {}
    for key in keys:
        storage = unpickler.storages[key]
        if position + 8 > len(mm):
            raise WeightLoadError(f"truncated (storage {key} is missing)")
        (numel,) = struct.unpack("<q", mm[position : position + 8])
        if numel != storage.numel:
            raise WeightLoadError(f"storage {key} holds {numel} elements, expected "
                                  f"{storage.numel}")
        nbytes = numel * storage.type.np_dtype.itemsize
        start = position + 8
        if start + nbytes > len(mm):
            raise WeightLoadError(f"truncated (storage {key} runs past the end)")
        arrays[key] = _frombuffer(memoryview(mm)[start : start + nbytes], storage.type.np_dtype,
                                  storage)
        position = start + nbytes
    return obj, lambda storage: arrays[storage.key]


def _frombuffer(buf: Any, dtype: np.dtype, storage: _Storage) -> np.ndarray:
    """The storage's elements as a read-only 1-D view of ``buf`` (no copy)."""
    nbytes = storage.numel * dtype.itemsize
    if len(buf) < nbytes:
        raise WeightLoadError(f"storage {storage.key} has {len(buf)} bytes, expected {nbytes}")
    return np.frombuffer(buf, dtype=dtype, count=storage.numel)


def _state_dict(obj: Any) -> dict[str, _TensorRef]:
    """The flat ``{name: tensor}`` dict in ``obj``, unwrapping a one-entry wrapper dict."""
    problem = _tensor_dict_problem(obj)
    if problem is None:
        # dict.items, not dict(obj): dict() would call a keys() that the pickle may have set.
        return dict(dict.items(obj))
    if isinstance(obj, dict) and len(obj) == 1:
        ((key, inner),) = dict.items(obj)
        inner_problem = _tensor_dict_problem(inner)
        if inner_problem is None:
            log.info("unwrapping the state dict under %r", key)
            return dict(dict.items(inner))
        problem = f"{problem}; inside {key!r}: {inner_problem}"
    raise WeightLoadError(f"expected a dict of tensors, optionally wrapped in a one-entry "
                          f"dict such as {{'state_dict': ...}}; {problem}")


def _tensor_dict_problem(obj: Any) -> str | None:
    """Why ``obj`` is not a ``{str: tensor}`` dict, or None if it is."""
    if not isinstance(obj, dict):
        return f"found a {type(obj).__name__}"
    # dict.items, not obj.items: a pickle can set instance attributes on an OrderedDict.
    for key, value in dict.items(obj):
        if not isinstance(key, str):
            return f"key {key!r} is not a string"
        if not isinstance(value, _TensorRef):
            return f"entry {key!r} is a {type(value).__name__}, not a tensor"
    return None


def _materialize(refs: dict[str, _TensorRef], storage_data: StorageData) -> dict[str, mx.array]:
    """Copy each tensor view out of its storage into a contiguous MLX array."""
    storages: dict[str, np.ndarray] = {}
    out: dict[str, mx.array] = {}
    for name, ref in refs.items():
        key = ref.storage.key
        if key not in storages:
            storages[key] = storage_data(ref.storage)
        data = storages[key]
        itemsize = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[ref.offset :], shape=ref.shape, strides=[s * itemsize for s in ref.stride],
            writeable=False)
        if not view.dtype.isnative:
            view = view.astype(view.dtype.newbyteorder("="))
        if ref.storage.type.mx_dtype == mx.bfloat16:
            out[name] = mx.array(view).view(mx.bfloat16)
        else:
            out[name] = mx.array(view, dtype=ref.storage.type.mx_dtype)
    return out
