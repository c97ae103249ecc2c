"""New tensors as descriptions: what an edit puts in the tree instead of tensor bytes.

An edit that adds or replaces a tensor (``set amsgrad=True`` adds ``max_exp_avg_sq``,
``set-lr`` on a tensor lr, ``convert`` maps moments) builds a :class:`~.formats.nodes.TensorRef`
whose storage has no archive record but a ``content``: a description of its bytes. The writer
streams a content chunk by chunk into a new ``data/<key>`` record, so the peak memory of a
write grows with one chunk, never with the number or the size of new tensors.

Contents:

* :class:`Zeros` - ``nbytes`` zero bytes;
* :class:`Fill` - ``numel`` elements of one value in a dtype;
* :class:`Derived` - elementwise ``fn`` over source tensors' records, read and computed one
  chunk of elements at a time (the sources must be contiguous, as optimizer state is).
"""

from __future__ import annotations

import math
import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .errors import EditError
from .formats.nodes import DTYPE_ITEMSIZE, STORAGE_DTYPES, Global, Storage, TensorRef

CHUNK_BYTES = 8 << 20

_PACK = {"float32": "<f", "float64": "<d", "float16": "<e", "int64": "<q", "int32": "<i",
         "int16": "<h", "int8": "<b", "uint8": "<B", "bool": "<?"}


def pack_scalar(value: float | int | bool, dtype: str) -> bytes:
    """One element of ``dtype`` holding ``value``, little endian."""
    if dtype == "bfloat16":
        (bits,) = struct.unpack("<I", struct.pack("<f", float(value)))
        bits += 0x7FFF + ((bits >> 16) & 1)  # round to nearest even, as torch does
        return struct.pack("<H", (bits >> 16) & 0xFFFF)
    fmt = _PACK.get(dtype)
    if fmt is None:
        raise EditError(f"cannot write a {dtype} value")
    return struct.pack(fmt, value)


@dataclass(frozen=True)
class Zeros:
    """``nbytes`` zero bytes."""

    nbytes: int

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        zero = bytes(min(chunk_bytes, self.nbytes))
        left = self.nbytes
        while left > 0:
            n = min(left, chunk_bytes)
            yield zero if n == len(zero) else zero[:n]
            left -= n

    def describe(self) -> str:
        return "zeros"


@dataclass(frozen=True)
class Fill:
    """``numel`` elements of ``dtype`` all equal to ``value``."""

    dtype: str
    numel: int
    value: float | int | bool

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_ITEMSIZE[self.dtype]

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        one = pack_scalar(self.value, self.dtype)
        per = max(1, chunk_bytes // len(one))
        block = one * min(per, self.numel)
        left = self.numel
        while left > 0:
            n = min(left, per)
            yield block if n * len(one) == len(block) else block[:n * len(one)]
            left -= n

    def describe(self) -> str:
        return f"full({self.value!r})"


@dataclass(frozen=True)
class Derived:
    """``numel`` elements of ``dtype`` computed from ``sources`` chunk by chunk.

    ``fn`` gets, for one chunk of element indices, the raw little-endian bytes of each source
    over those indices, and returns the chunk of the result (``len == n * itemsize``).
    """

    dtype: str
    numel: int
    sources: tuple[TensorRef, ...]
    fn: Callable[[list[bytes]], bytes]
    label: str

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_ITEMSIZE[self.dtype]

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        widest = max([DTYPE_ITEMSIZE[self.dtype], *(s.itemsize for s in self.sources)])
        per = max(1, chunk_bytes // widest)
        fds: dict[str, int] = {}
        try:
            for start in range(0, self.numel, per):
                n = min(per, self.numel - start)
                parts = []
                for s in self.sources:
                    st = s.storage
                    assert st is not None and st.record is not None
                    path = st.record.path
                    if path not in fds:
                        fds[path] = os.open(path, os.O_RDONLY)
                    size = s.itemsize
                    raw = os.pread(fds[path], n * size,
                                   st.record.data_offset + (s.offset + start) * size)
                    if len(raw) != n * size:
                        raise EditError(f"{path}: a tensor's bytes end early (truncated)")
                    parts.append(raw)
                out = self.fn(parts)
                if len(out) != n * DTYPE_ITEMSIZE[self.dtype]:
                    raise EditError(f"{self.label}: computed {len(out)} bytes for {n} elements")
                yield out
        finally:
            for fd in fds.values():
                os.close(fd)

    def describe(self) -> str:
        return self.label


Content = Zeros | Fill | Derived


def contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride = []
    acc = 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= d
    return tuple(reversed(stride))


def is_contiguous(t: TensorRef) -> bool:
    """Row-major contiguous (size-1 dimensions may have any stride)."""
    want = contiguous_stride(t.shape)
    return all(d == 1 or s == w for d, s, w in zip(t.shape, t.stride, want))


_STORAGE_CLASS = {dtype: name for name, dtype in STORAGE_DTYPES.items()}


def new_tensor(like: TensorRef, shape: Sequence[int], content: Content, *,
               dtype: str | None = None, device: str | None = None) -> TensorRef:
    """A new contiguous tensor shaped ``shape`` whose bytes are ``content``.

    Its storage is pickled like ``like``'s (typed ``torch.FloatStorage`` or untyped with a
    dtype argument), on ``device`` (default ``like``'s); ``dtype`` defaults to ``like``'s.
    The storage's archive key is given by the writer (it numbers storages in first-use order).
    """
    dtype = dtype or like.dtype
    base = like.base
    st = like.storage
    if st is None:
        raise EditError("the tensor to model a new one on has no storage")
    numel = math.prod(shape)
    if content.nbytes != numel * DTYPE_ITEMSIZE[dtype]:
        raise EditError(f"content of {content.nbytes} bytes for {numel} {dtype} elements")
    v3 = base.qualname == "torch._utils._rebuild_tensor_v3"
    if v3:
        storage_type = st.storage_type
        pid_numel = content.nbytes
    else:
        cls = _STORAGE_CLASS.get(dtype)
        if cls is None:
            raise EditError(f"no typed storage class for {dtype}")
        storage_type = Global("torch", cls, "allowed")
        pid_numel = numel
    storage = Storage(("storage", storage_type, "new", device or st.location, pid_numel),
                      content=content)
    args: tuple[object, ...] = (storage, 0, tuple(shape), contiguous_stride(shape), False,
                                OrderedDict())
    if v3:
        args = (*args, Global("torch", dtype, "allowed"))
    func = base.func if isinstance(base.func, Global) else \
        Global("torch._utils", "_rebuild_tensor_v2", "allowed")
    return TensorRef(Global(func.module, func.name, func.safety), args)


__all__ = ["CHUNK_BYTES", "Content", "Derived", "Fill", "Zeros", "is_contiguous", "new_tensor",
           "pack_scalar"]
