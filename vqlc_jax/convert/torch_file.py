"""Read PyTorch checkpoints (`.pth` / `.pt` / `.bin` written by `torch.save`) into numpy, without torch.

The zip format (torch >= 1.6) is an archive `<name>/data.pkl` + `<name>/data/<key>` (raw storage bytes) +
`<name>/byteorder`. The pickle refers to storages through persistent ids `('storage', storage_type, key,
location, numel)` and rebuilds tensors with `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.
Here every storage becomes a 1-D numpy array and every tensor a C-contiguous copy of its strided view.

Unpickling is restricted, like torch's `weights_only`: `find_class` resolves only the tensor rebuilders, storage
types, `torch.Size`, torch dtypes, numpy's array/scalar reconstructors and a few inert builtins. Any other global
(`os.system`, a model class, ...) becomes a `Placeholder` subclass that records the call's arguments and state and
runs no code.
"""

from __future__ import annotations

import argparse
import collections
import os
import pickle
import sys
import tarfile
import zipfile
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np
from numpy.lib.stride_tricks import as_strided

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct, scalar
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar

__all__ = ["Placeholder", "load_torch_file", "state_dict_from_checkpoint"]

# torch dtype name -> numpy dtype (the names `torch.save` pickles, e.g. GLOBAL 'torch float16').
_TORCH_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(dtype)
    for name, dtype in {
        "float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
        "complex128": np.complex128, "complex64": np.complex64,
        "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8,
        "uint64": np.uint64, "uint32": np.uint32, "uint16": np.uint16, "uint8": np.uint8, "bool": np.bool_,
        "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
        "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
        "float8_e8m0fnu": ml_dtypes.float8_e8m0fnu,
    }.items()
}

# Legacy typed-storage class -> element dtype; `UntypedStorage` holds bytes.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    f"{prefix}Storage": _TORCH_DTYPES[name]
    for prefix, name in {
        "Double": "float64", "Float": "float32", "Half": "float16", "BFloat16": "bfloat16",
        "ComplexDouble": "complex128", "ComplexFloat": "complex64", "Long": "int64", "Int": "int32",
        "Short": "int16", "Char": "int8", "Byte": "uint8", "Bool": "bool", "Untyped": "uint8",
    }.items()
}

# `torch.save` writes the pickled magic number 0x1950a86a20f9469cfc6c (a 10-byte LONG1) first in the legacy format.
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


class Placeholder:
    """Inert stand-in for an object of a global the reader does not trust: keeps its pickled data, runs nothing.

    `find_class` returns a fresh subclass per global (its `qualname`, e.g. 'os.system'), so calls (REDUCE) and
    `cls.__new__` (NEWOBJ) both land here. Records `args`/`kwargs` of the call, the BUILD `state`, and what
    APPENDS / SETITEMS added (`items`, `entries`).
    """

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        obj.items, obj.entries = [], {}
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.entries[key] = value

    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    def __repr__(self) -> str:
        return f"Placeholder({self.qualname!r}, args={self.args!r}, state={self.state!r})"


def _placeholder_class(qualname: str) -> type[Placeholder]:
    return type(qualname.rpartition(".")[2] or "Placeholder", (Placeholder,), {"qualname": qualname})


def _tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, dtype: np.dtype | None = None) -> np.ndarray:
    """Copy of the `size`/`stride` view (in elements) of a 1-D storage array from `storage_offset`, bounds-checked.

    `dtype` reinterprets the storage's bytes (default: the storage's own dtype).
    """
    if not (isinstance(storage, np.ndarray) and storage.ndim == 1 and storage.flags.c_contiguous):
        raise pickle.UnpicklingError(f"tensor storage must be a storage record, got {type(storage).__name__}")
    dtype = storage.dtype if dtype is None else dtype
    if dtype.hasobject or storage.dtype.hasobject:
        raise pickle.UnpicklingError("tensors of Python objects are not supported")
    if storage.nbytes % dtype.itemsize:
        raise pickle.UnpicklingError(f"storage of {storage.nbytes} bytes does not hold whole {dtype} elements")
    elements = storage.view(np.dtype((np.void, dtype.itemsize)))  # as_strided loses ml_dtypes types: stride raw bytes
    offset, shape, strides = int(storage_offset), tuple(map(int, size)), tuple(map(int, stride))
    if len(shape) != len(strides) or min((offset, *shape, *strides)) < 0:
        raise pickle.UnpicklingError(f"bad tensor geometry: offset {offset}, size {shape}, stride {strides}")
    if 0 in shape:
        return np.zeros(shape, dtype)
    end = offset + sum((n - 1) * s for n, s in zip(shape, strides)) + 1
    if end > elements.size:
        raise pickle.UnpicklingError(
            f"tensor (offset {offset}, size {shape}, stride {strides}) overruns its storage of {elements.size} elements"
        )
    return as_strided(elements[offset:], shape, tuple(s * dtype.itemsize for s in strides)).copy().view(dtype)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_grad_hooks_meta: Any) -> np.ndarray:
    """`torch._utils._rebuild_tensor` and `_rebuild_tensor_v2` (requires_grad, hooks, metadata ignored)."""
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any,
    dtype: Any, metadata: Any = None,
) -> np.ndarray:
    """`torch._utils._rebuild_tensor_v3`: a byte storage plus an explicit dtype (uint16/32/64, float8, ...)."""
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError(f"unsupported tensor dtype {dtype!r}")
    return _tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data: Any, *_grad_hooks_state: Any) -> Any:
    """`torch._utils._rebuild_parameter[_with_state]` and `torch.nn.Parameter`: the parameter is its data."""
    return data


def _bytes_from_latin1(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it to store bytes; only latin-1 is accepted."""
    if encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_BUILTINS: dict[str, Any] = {
    "set": set, "frozenset": frozenset, "bytes": bytes, "bytearray": bytearray, "slice": slice, "complex": complex,
}
_ALLOWED: dict[str, Any] = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch.nn.parameter.Parameter": _rebuild_parameter,
    "torch.Size": tuple,
    "torch.storage.UntypedStorage": _STORAGE_DTYPES["UntypedStorage"],
    "collections.OrderedDict": collections.OrderedDict,
    "argparse.Namespace": argparse.Namespace,
    "_codecs.encode": _bytes_from_latin1,
    "numpy.dtype": np.dtype,
    "numpy.ndarray": np.ndarray,
    **{f"numpy.{core}.multiarray.{fn.__name__}": fn for core in ("core", "_core") for fn in (_reconstruct, scalar)},
    **{f"{module}.{name}": obj for module in ("builtins", "__builtin__") for name, obj in _BUILTINS.items()},
    **{f"{module}.{name}": dtype for module in ("torch", "torch.cuda") for name, dtype in _STORAGE_DTYPES.items()},
    **{f"torch.{name}": dtype for name, dtype in _TORCH_DTYPES.items()},
}


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles `data.pkl`, loading each storage record once (as a 1-D array) through `read_storage`."""

    def __init__(self, file: Any, read_storage: Callable[[str, np.dtype, int], np.ndarray]):
        super().__init__(file, encoding="utf-8")
        self._read_storage = read_storage
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        qualname = f"{module}.{name}"
        return _ALLOWED[qualname] if qualname in _ALLOWED else _placeholder_class(qualname)

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise pickle.UnpicklingError(f"unsupported storage type {getattr(dtype, 'qualname', dtype)!r}")
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, dtype, int(numel))
        return self._storages[key]


def _archive_prefix(archive: zipfile.ZipFile) -> str:
    """The `<name>` of the archive's single `<name>/data.pkl` record."""
    prefixes = [n[: -len("/data.pkl")] for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(prefixes) != 1:
        raise ValueError(f"expected one <name>/data.pkl record, found {len(prefixes)}")
    return prefixes[0]


def _storage_reader(archive: zipfile.ZipFile, prefix: str) -> Callable[[str, np.dtype, int], np.ndarray]:
    """Reads `<prefix>/data/<key>` as `numel` elements of `dtype`, byte-swapped to native order when needed."""
    record = f"{prefix}/byteorder"
    byteorder = archive.read(record).decode() if record in archive.NameToInfo else "little"
    if byteorder not in ("little", "big"):
        raise ValueError(f"unknown byteorder {byteorder!r}")

    def read(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        data = archive.read(f"{prefix}/data/{key}")
        if len(data) < numel * dtype.itemsize:
            raise ValueError(f"storage {key} holds {len(data)} bytes, expected {numel} x {dtype}")
        array = np.frombuffer(bytearray(data[: numel * dtype.itemsize]), dtype)
        return array.byteswap() if byteorder != sys.byteorder else array

    return read


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        prefix = _archive_prefix(archive)
        with archive.open(f"{prefix}/data.pkl") as pkl:
            return _TorchUnpickler(pkl, _storage_reader(archive, prefix)).load()


def _is_legacy(path: str) -> bool:
    """True for the pre-1.6 formats: a pickle stream led by torch's magic number, or the older tar archive."""
    with open(path, "rb") as f:
        head = f.read(64)
    return _LEGACY_MAGIC in head or tarfile.is_tarfile(path)


def _tensors_to_numpy(obj: Any, torch: Any) -> Any:
    """Replace the torch tensors in (nested dicts, lists, tuples of) `obj` by numpy copies."""
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu()
        dtype = _TORCH_DTYPES.get(str(tensor.dtype).removeprefix("torch."))
        if dtype is not None and dtype.isbuiltin == 2:  # an ml_dtypes type, which torch cannot hand to numpy
            return tensor.view({1: torch.uint8, 2: torch.int16}[dtype.itemsize]).numpy().view(dtype).copy()
        return tensor.numpy().copy()
    if type(obj) in (dict, collections.OrderedDict):
        return type(obj)((k, _tensors_to_numpy(v, torch)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_tensors_to_numpy(v, torch) for v in obj)
    return obj


def _load_legacy(path: str) -> Any:
    """Fall back on `torch.load` (unrestricted: trusted files only) when torch is installed."""
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"{path} uses PyTorch's legacy (pre-1.6) serialization format, which this reader cannot parse: "
            "re-save it with torch>=1.6 (torch.save(torch.load(f), f)) or install torch"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"{path}: torch.load failed on this legacy-format file: {err}") from err
    return _tensors_to_numpy(obj, torch)


def load_torch_file(path: str | os.PathLike) -> Any:
    """The object `torch.save` wrote to `path`, with every tensor as a numpy array (restricted unpickling).

    Raises FileNotFoundError if `path` does not exist, ValueError if it is not a readable PyTorch file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"PyTorch file not found: {path}")
    if zipfile.is_zipfile(path):
        try:
            return _load_zip(path)
        except Exception as err:
            raise ValueError(f"{path} is not a readable torch.save archive: {err}") from err
    if _is_legacy(path):
        return _load_legacy(path)
    raise ValueError(f"{path} is not a PyTorch file (neither a torch.save zip archive nor the legacy format)")


def _is_array_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())
    )


def state_dict_from_checkpoint(
    obj: Any, *, keys: tuple[str, ...] = ("model", "state_dict", "ema")
) -> dict[str, np.ndarray]:
    """The flat `{name: array}` state dict in a loaded checkpoint: `obj` itself or the first of `obj[keys]` that is one.

    A `module.` prefix (DistributedDataParallel) is stripped when every key has it.
    """
    if _is_array_dict(obj):
        state = obj
    else:
        found = [obj[k] for k in keys if isinstance(obj, Mapping) and k in obj and _is_array_dict(obj[k])]
        if not found:
            top = list(obj) if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(f"no state dict of arrays in the checkpoint (looked under {list(keys)}); top level: {top}")
        state = found[0]
    if all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)
