"""Memory-mapped safetensors reading and atomic writing, with bfloat16 through ml_dtypes.

We read the format ourselves (an 8-byte little-endian header length, a JSON header, then raw tensor bytes)
so that a tensor is a `np.memmap` view: slicing it reads only the bytes a device shard needs, and bf16
checkpoints need no torch. Every structural problem is reported with the file's path.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read as one (truncated, corrupt header, unknown dtype)."""


class SafetensorsFile:
    """The tensors of one .safetensors file as lazily memory-mapped numpy arrays."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise SafetensorsError(f"{self.path}: file is {size} bytes, too short for a safetensors header "
                                       "(truncated download?)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise SafetensorsError(f"{self.path}: header claims {header_len} bytes but the file has {size}; "
                                       "the file is truncated or not safetensors")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{self.path}: corrupt safetensors header ({e})") from e
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries = header
        for name, entry in header.items():
            if entry.get("dtype") not in _DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
            begin, end = entry["data_offsets"]
            expected = int(np.prod(entry["shape"], dtype=np.int64)) * _DTYPES[entry["dtype"]].itemsize
            if end - begin != expected:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has {end - begin} bytes for shape "
                                       f"{entry['shape']} {entry['dtype']} ({expected} expected)")
            if self._data_start + end > size:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} ends at byte {self._data_start + end} but the file has "
                    f"{size} bytes; the file is truncated (re-download it)")
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _DTYPES[self._entries[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of tensor `name` (no bytes read until indexed)."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        flat = self._mmap[self._data_start + begin:self._data_start + end]
        return flat.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write `tensors` to `path` atomically (a temporary file renamed into place)."""
    path = os.fspath(path)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in _NAMES:
            raise SafetensorsError(f"cannot write tensor {name!r} of dtype {arr.dtype} to {path}")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for arr in arrays:
                f.write(arr.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
