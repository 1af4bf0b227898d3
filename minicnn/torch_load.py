"""Read PyTorch ``torch.save`` checkpoints with NumPy alone: torch is never imported.

A ``torch.save`` file (PyTorch >= 1.6) is a zip archive::

    <name>/data.pkl        the pickled object (a state_dict: {name: tensor})
    <name>/data/<key>      one file per storage: the raw bytes of its elements
    <name>/byteorder       "little" or "big" (absent in old files: little)
    <name>/version ...     other records, not needed here

In data.pkl each tensor is a call ``torch._utils._rebuild_tensor_v2(storage,
storage_offset, size, stride, requires_grad, backward_hooks)`` and each storage a
"persistent id" ``('storage', torch.FloatStorage, key, location, numel)``.

Unpickling runs whatever functions the file names, so a pickle from a stranger
can run ``os.system``. Here the unpickler knows only a handful of names, each
mapped to a harmless local stand-in (the real torch objects are never touched);
any other global is refused with an ``UnpicklingError`` before it is called.
Tensors are rebuilt from the storage bytes with NumPy: a strided view
(``as_strided``, after checking it stays inside the storage), then a copy.
"""
from __future__ import annotations

import _compat_pickle
import io
import math
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

__all__ = ["load_torch_state_dict", "load_state_dict_file", "is_torch_checkpoint"]


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co.: only a name and an element dtype. Immutable."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: str):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)

    def __setattr__(self, name, value):
        raise AttributeError("storage types are read-only")

    def __repr__(self):
        return f"<stand-in for torch.{self.name}>"


# Element dtype of each storage type, little-endian byte order before any byteorder fix.
# BFloat16 has no NumPy dtype: it is read as uint16 bits and widened to float32.
_STORAGE_TYPES = {name: _StorageType(name, dtype) for name, dtype in [
    ("FloatStorage", "f4"), ("DoubleStorage", "f8"), ("HalfStorage", "f2"), ("BFloat16Storage", "u2"),
    ("LongStorage", "i8"), ("IntStorage", "i4"), ("ShortStorage", "i2"), ("CharStorage", "i1"),
    ("ByteStorage", "u1"), ("BoolStorage", "?"), ("UntypedStorage", "u1"),
]}


class _Storage:
    """A storage read from the archive: a 1-D NumPy array of its elements (read-only)."""

    __slots__ = ("array", "type")

    def __init__(self, array: np.ndarray, storage_type: _StorageType):
        self.array, self.type = array, storage_type


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v2 -> a NumPy array (a copy, C-contiguous).

    element [i0, i1, ...] = storage[storage_offset + i0*stride[0] + i1*stride[1] + ...]
    """
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor data is {type(storage).__name__}, not a storage")
    size, stride = tuple(size), tuple(stride)
    if not (_is_int(storage_offset) and all(map(_is_int, size + stride)) and len(size) == len(stride)):
        raise pickle.UnpicklingError(f"malformed tensor: offset {storage_offset!r}, size {size!r}, stride {stride!r}")
    if storage_offset < 0 or min(size + stride, default=0) < 0:
        raise pickle.UnpicklingError(f"malformed tensor: negative offset, size or stride "
                                     f"(offset {storage_offset}, size {size}, stride {stride})")
    array = storage.array
    count = math.prod(size)
    if count == 0:
        out = np.empty(size, dtype=array.dtype)  # host-ok
    else:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))    # the furthest element read
        if last >= array.size:
            raise pickle.UnpicklingError(f"malformed tensor: size {size}, stride {stride} and offset {storage_offset} "
                                         f"reach element {last} of a storage of {array.size}")
        if count > max(array.size, 1 << 24):   # stride-0 (expanded) views may repeat elements, within reason
            raise pickle.UnpicklingError(f"malformed tensor: {count} elements from a storage of {array.size}")
        itemsize = array.itemsize
        view = np.lib.stride_tricks.as_strided(array[storage_offset:], shape=size,
                                               strides=tuple(s * itemsize for s in stride), writeable=False)
        out = np.array(view, order="C")                                            # the copy  # host-ok
    out = out.astype(out.dtype.newbyteorder("="), copy=False)                     # native byte order
    if storage.type.name == "BFloat16Storage":                                    # bfloat16 = top half of a float32
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """Stand-in for torch._utils._rebuild_parameter (``torch.save(dict(model.named_parameters()))``)."""
    if not isinstance(data, np.ndarray):
        raise pickle.UnpicklingError(f"parameter data is {type(data).__name__}, not a tensor")
    return data


# The only globals a tensor state_dict needs, each mapped to its stand-in.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "UntypedStorage"): _STORAGE_TYPES["UntypedStorage"],
    **{("torch", name): storage_type for name, storage_type in _STORAGE_TYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles data.pkl with the allow-list above; storages are read from the zip on demand."""

    def __init__(self, file, *, path, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self.path, self.archive, self.prefix = path, archive, prefix
        self.byteorder = "<" if byteorder == "little" else ">"
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        # Python 2 names in protocol-2 pickles (__builtin__ -> builtins), as pickle's fix_imports does
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self.path}: refusing to load global '{module}.{name}' "
                "(only tensor state_dicts are allowed)") from None

    def persistent_load(self, pid):
        """('storage', storage_type, key, location, numel) -> _Storage from <prefix>data/<key>."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _is_int(pid[4])):
            raise pickle.UnpicklingError(f"{self.path}: unsupported persistent id {pid!r} "
                                         "(only tensor storages are allowed)")
        _, storage_type, key, _location, numel = pid
        if key in self.storages:
            return self.storages[key]
        member = f"{self.prefix}data/{key}"
        try:
            info = self.archive.getinfo(member)
        except KeyError:
            raise pickle.UnpicklingError(f"{self.path}: storage '{member}' is missing from the archive") from None
        dtype = np.dtype(storage_type.dtype).newbyteorder(self.byteorder)
        if info.file_size != numel * dtype.itemsize:          # checked before reading anything
            raise pickle.UnpicklingError(f"{self.path}: storage '{member}' has {info.file_size} bytes, expected "
                                         f"{numel} x {dtype.itemsize}")
        storage = _Storage(np.frombuffer(self.archive.read(info), dtype=dtype), storage_type)
        self.storages[key] = storage
        return storage


def is_torch_checkpoint(path) -> bool:
    """True for a zip archive holding a ``<name>/data.pkl`` record (the torch.save format)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return _find_data_pkl(archive) is not None
    except (zipfile.BadZipFile, OSError):
        return False


def _find_data_pkl(archive: zipfile.ZipFile):
    names = [name for name in archive.namelist() if name == "data.pkl" or name.endswith("/data.pkl")]
    names = [name for name in names if name.count("/") <= 1]       # <name>/data.pkl, not deeper
    return min(names, key=len) if names else None


def load_torch_state_dict(path) -> "OrderedDict[str, np.ndarray]":
    """Read a ``torch.save(model.state_dict(), path)`` file into {name: NumPy array}, without torch.

    dtypes follow the tensors' (float32, float16, int64 for BatchNorm's
    num_batches_tracked, ...; bfloat16 becomes float32). A checkpoint dict that
    keeps the state_dict under "state_dict" or "model" is unwrapped.
    Raises pickle.UnpicklingError for anything that is not a plain tensor
    state_dict (a pickled function, class or object), and for plain pickles.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as file:
            head = file.read(2)
        kind = ("a plain pickle, or a torch.save file in the legacy (pre-1.6) format"
                if head[:1] == b"\x80" else "not a zip archive")
        raise pickle.UnpicklingError(
            f"{path}: {kind}; refusing to unpickle it. Only torch.save zip checkpoints holding tensors "
            "are read (re-save the file with a current torch, or use .npz)")
    with zipfile.ZipFile(path) as archive:
        data_pkl = _find_data_pkl(archive)
        if data_pkl is None:
            raise ValueError(f"{path}: a zip archive without data.pkl, so not a torch.save checkpoint "
                             "(for .npz files use minicnn.torch_load.load_state_dict_file or serialization.load)")
        prefix = data_pkl[:-len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise ValueError(f"{path}: unknown byteorder {byteorder!r}")
        unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(data_pkl)), path=path, archive=archive,
                                         prefix=prefix, byteorder=byteorder)
        obj = unpickler.load()
    return _as_state_dict(obj, path)


def _as_state_dict(obj, path) -> "OrderedDict[str, np.ndarray]":
    """The {str: array} dict in ``obj``: obj itself, or obj["state_dict"] / obj["model"]."""
    def is_state_dict(value):
        return (isinstance(value, dict) and value
                and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in value.items()))

    if isinstance(obj, dict) and not is_state_dict(obj):
        for key in ("state_dict", "model"):
            if is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not is_state_dict(obj):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors by name), got "
                         f"{type(obj).__name__}" + (f" with keys {list(obj)[:10]}" if isinstance(obj, dict) else ""))
    return OrderedDict(obj.items())


def load_state_dict_file(path) -> "OrderedDict[str, np.ndarray]":
    """A state_dict from a ``.pth``/``.pt`` torch.save file or a minicnn ``.npz`` checkpoint."""
    from .serialization import load as load_npz

    path = Path(path)
    if path.suffix == ".npz" or (zipfile.is_zipfile(path) and not is_torch_checkpoint(path)):
        state, _metadata = load_npz(path)
        return OrderedDict(state)
    return load_torch_state_dict(path)
