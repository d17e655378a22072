"""Read a PyTorch ``pytorch_model.bin`` state dict without torch and without running pickled code.

A ``.bin`` is a zip: ``<root>/data.pkl`` (a pickle of the state dict) plus one file of raw bytes per
storage (``<root>/data/<key>``). Unpickling normally lets the file call any importable function,
so a checkpoint could run arbitrary code. Here the unpickler resolves only the few globals that
``torch.save(model.state_dict())`` emits (the tensor rebuild function, storage type markers and
``OrderedDict``); any other global is refused with an error naming it, before anything is called.
Tensors are rebuilt from the storage bytes with numpy (offset, shape and strides checked).
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import MlxgptError

# torch storage class name -> numpy dtype of its bytes (bfloat16 read as uint16, viewed in MLX).
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclass(frozen=True)
class _StorageType:
    """Stands in for ``torch.FloatStorage`` & co.: a marker carrying the element type."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_STORAGE_DTYPES[self.name])


@dataclass
class _Tensor:
    """A rebuilt tensor: a numpy array plus whether its bytes are bfloat16."""

    array: np.ndarray
    bfloat16: bool


class _Storage:
    def __init__(self, data: np.ndarray, storage_type: _StorageType):
        self.data = data  # 1-D, element dtype of the storage
        self.type = storage_type


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> _Tensor:
    """The only function a state dict's pickle may call: view a storage as a strided tensor."""
    if not isinstance(storage, _Storage):
        raise MlxgptError("tensor without a storage")
    size, stride = tuple(size), tuple(stride)
    ints = (storage_offset, *size, *stride)
    if len(size) != len(stride) or not all(isinstance(v, int) and v >= 0 for v in ints):
        raise MlxgptError(f"bad tensor geometry: size {size}, stride {stride}")
    n = storage.data.size
    span = sum((s - 1) * st for s, st in zip(size, stride, strict=True))
    last = storage_offset + span if all(size) else -1  # index of the last element read
    if last >= n or storage_offset > n:
        raise MlxgptError(
            f"tensor of size {size} at offset {storage_offset} overruns its storage ({n} elements)"
        )
    item = storage.data.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage.data[storage_offset:], shape=size, strides=[st * item for st in stride],
        writeable=False,
    )
    return _Tensor(np.ascontiguousarray(view), storage.type.name == "BFloat16Storage")


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None) -> _Tensor:
    """``nn.Parameter`` in a state dict saved from parameters: just its tensor."""
    if not isinstance(data, _Tensor):
        raise MlxgptError("parameter without a tensor")
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, byteorder: str, src: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.root, self.byteorder, self.src = archive, root, byteorder, src
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED.get((module, name))
        if target is None:
            raise MlxgptError(
                f"{self.src}: refusing to load: the pickle asks for {module}.{name}, "
                "and only tensors are allowed"
            )
        return target

    def persistent_load(self, pid: Any) -> _Storage:
        # torch.save writes ("storage", storage_type, key, location, numel) for every storage.
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise MlxgptError(f"{self.src}: unsupported persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str):
            raise MlxgptError(f"{self.src}: bad storage reference {pid!r:.80}")
        if key not in self.storages:  # tied tensors share one storage
            try:
                raw = self.archive.read(f"{self.root}/data/{key}")
            except KeyError:
                raise MlxgptError(f"{self.src}: storage {key} is missing") from None
            dtype = stype.dtype.newbyteorder("<" if self.byteorder == "little" else ">")
            if len(raw) < numel * dtype.itemsize:
                raise MlxgptError(f"{self.src}: storage {key} is truncated")
            data = np.frombuffer(raw, dtype=dtype, count=numel).astype(stype.dtype, copy=False)
            self.storages[key] = _Storage(data, stype)
        return self.storages[key]


def load_torch_bin(path: str | Path) -> dict[str, mx.array]:
    """Tensors of a ``torch.save``-d state dict (zip format), as MLX arrays, name -> array."""
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise MlxgptError(f"{src}: weights file not found")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # a zip whose end (the directory) is missing
                raise MlxgptError(f"{src}: truncated or corrupt (incomplete download?)")
        raise MlxgptError(
            f"{src}: not a zip-format PyTorch checkpoint (the legacy pre-1.6 format is not "
            "supported: re-save it with a current torch, or convert it to safetensors)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            pkls = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pkls) != 1:
                raise MlxgptError(f"{src}: expected one data.pkl in the archive, found {len(pkls)}")
            root = pkls[0].rsplit("/", 1)[0]
            names = set(archive.namelist())
            byteorder = "little"
            if f"{root}/byteorder" in names:
                byteorder = archive.read(f"{root}/byteorder").decode().strip()
            unpickler = _RestrictedUnpickler(archive.read(pkls[0]), archive, root, byteorder, src)
            state = unpickler.load()
    except MlxgptError:
        raise
    except Exception as e:  # corrupt zip, bad pickle, wrong argument types...
        raise MlxgptError(f"{src}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") \
            from None
    if not isinstance(state, dict):
        raise MlxgptError(f"{src}: expected a state dict, found {type(state).__name__}")
    out: dict[str, mx.array] = {}
    for name, t in state.items():
        if not isinstance(t, _Tensor):
            raise MlxgptError(f"{src}: entry {name!r} is not a tensor")
        a = mx.array(t.array)
        out[str(name)] = a.view(mx.bfloat16) if t.bfloat16 else a
    return out
