"""safetensors files, read from their JSON header only."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any

from ..errors import UnreadableError

_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64",
}
MAX_HEADER = 100 << 20


@dataclass
class SafeTensor:
    """A tensor whose metadata comes from a header (a safetensors file, a DCP folder's
    ``.metadata``): shape, dtype and where its bytes lie."""

    shape: tuple[int, ...]
    dtype: str
    data_offset: int
    nbytes: int
    device: str = "cpu"
    value: Any = None
    path: str = ""
    # a DCP tensor's chunks: (offsets, sizes, data file, offset, length) each
    chunks: list[tuple[Any, ...]] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        from .nodes import DTYPE_ITEMSIZE
        return DTYPE_ITEMSIZE.get(self.dtype, 1)


def read_safetensors(path: str, fd: int, file_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (tensors by name in header order, the ``__metadata__`` dict)."""
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise UnreadableError(f"too short for a safetensors file", path=path)
    (n,) = struct.unpack("<Q", head)
    if n > min(MAX_HEADER, file_size - 8):
        raise UnreadableError(f"not a safetensors file (header size {n} out of range)", path=path)
    try:
        header = json.loads(os.pread(fd, n, 8))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UnreadableError(f"safetensors header is not valid JSON", path=path) from None
    if not isinstance(header, dict):
        raise UnreadableError(f"safetensors header is not a JSON object", path=path)
    meta = header.pop("__metadata__", {}) or {}
    tensors: dict[str, Any] = {}
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            tensors[name] = SafeTensor(tuple(int(x) for x in info["shape"]),
                                       _DTYPES.get(info["dtype"], info["dtype"].lower()),
                                       8 + n + int(begin), int(end) - int(begin),
                                       path=path)
        except (KeyError, TypeError, ValueError):
            raise UnreadableError(f"safetensors entry {name!r} is malformed", path=path) from None
    return tensors, meta
