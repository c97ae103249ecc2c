"""New tensors as descriptions: what an edit puts in the tree instead of tensor bytes.

An edit that adds or replaces a tensor (``set amsgrad=True`` adds ``max_exp_avg_sq``,
``set-lr`` on a tensor lr, ``convert`` maps moments) builds a :class:`~.formats.nodes.TensorRef`
whose storage has no archive record but a ``content``: a description of its bytes. The writer
streams a content chunk by chunk into a new ``data/<key>`` record, so the peak memory of a
write grows with one chunk, never with the number or the size of new tensors.

Contents:

* :class:`Zeros` - ``nbytes`` zero bytes;
* :class:`Fill` - ``numel`` elements of one value in a dtype;
* :class:`Derived` - computed from source tensors' records one chunk of elements at a time
  (the sources must be contiguous, as optimizer state is);
* :class:`Raw` - bytes the tree already holds (a numpy array's data pickled inside
  ``data.pkl``, which ``sanitize`` turns into a tensor record).
"""

from __future__ import annotations

import math
import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

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


def lazy_numpy() -> Any:
    """numpy, imported only when values are computed (a convert being written, check --deep):
    reading never needs it, and its import takes a tenth of torch's."""
    import numpy
    return numpy


_NP_DTYPES = {"float32": "<f4", "float64": "<f8", "float16": "<f2"}


def decode(raw: bytes | memoryview, dtype: str) -> Any:
    """Little-endian elements of ``dtype`` as a float32 numpy array."""
    np = lazy_numpy()
    if dtype == "bfloat16":
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    if dtype not in _NP_DTYPES:
        raise EditError(f"only floating-point values can be computed, not {dtype}")
    # float32 stays a (read-only) view of ``raw``: the formulas never write in place
    return np.frombuffer(raw, dtype=_NP_DTYPES[dtype]).astype(np.float32, copy=False)


def encode(x: Any, dtype: str, n: int) -> bytes | memoryview:
    """``n`` values (``x`` broadcast) as little-endian elements of ``dtype`` (bfloat16
    rounded to nearest even, as torch rounds)."""
    np = lazy_numpy()
    arr = np.broadcast_to(np.asarray(x, dtype=np.float32), (n,))
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(arr).view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bytes(bits.astype("<u2").tobytes())
    if dtype not in _NP_DTYPES:
        raise EditError(f"only floating-point values can be computed, not {dtype}")
    # the array's own buffer, not a bytes copy of it (the writer takes any buffer)
    return memoryview(np.ascontiguousarray(arr.astype(_NP_DTYPES[dtype], copy=False))).cast("B")


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


class Reader:
    """Reads elements of contiguous source tensors from their records (one fd per file)."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def read(self, t: TensorRef, start: int, n: int) -> bytes:
        """The bytes of elements ``start .. start + n`` of ``t`` (row-major)."""
        st = t.storage
        if st is None or st.record is None:
            raise EditError("a source tensor has no record to read")
        if not is_contiguous(t):
            raise EditError(f"a {t.dtype}{list(t.shape)} source tensor is not contiguous")
        path = st.record.path
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        size = t.itemsize
        raw = os.pread(fd, n * size, st.record.data_offset + (t.offset + start) * size)
        if len(raw) != n * size:
            raise EditError(f"{path}: a tensor's bytes end early (truncated)")
        return raw

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@dataclass(frozen=True)
class Derived:
    """``numel`` elements of ``dtype`` computed chunk by chunk from source records.

    ``compute(start, n, reader)`` returns the little-endian bytes (``bytes`` or a byte
    ``memoryview``) of elements ``start .. start + n`` of the result, reading what it needs of
    its sources through ``reader`` (see :mod:`ckpttool.edits.convert` for the moment formulas
    built on this).
    """

    dtype: str
    numel: int
    compute: Callable[[int, int, Reader], bytes | memoryview]
    label: str
    # 1 MB of float32: the few numpy temporaries of a chunk stay in the CPU caches (on the
    # 1.3 GB SGD -> Adam convert 4 MB chunks measured 0.3-0.6 s slower, 16 MB ones 1.4 s)
    chunk_elements: int = 1 << 18

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_ITEMSIZE[self.dtype]

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes | memoryview]:
        """The chunks in order. Chunk ``i + 1`` is computed on a worker thread while the
        caller CRCs and writes chunk ``i`` (numpy, ``os.pread``, ``zlib.crc32`` and
        ``os.write`` release the GIL). One worker thread per tensor, stopped when its chunks
        are done: ``compute`` is called for one chunk at a time, in order, as without it."""
        reader = Reader()
        ex = ThreadPoolExecutor(1, thread_name_prefix="ckpttool-derived")
        ahead: list[tuple[Future[bytes | memoryview], int]] = []  # submitted, not yielded
        try:
            for start in range(0, self.numel, self.chunk_elements):
                n = min(self.chunk_elements, self.numel - start)
                ahead.append((ex.submit(self.compute, start, n, reader), n))
                if len(ahead) == 2:
                    fut, k = ahead.pop(0)
                    yield self._checked(fut.result(), k)
            while ahead:
                fut, k = ahead.pop(0)
                yield self._checked(fut.result(), k)
        finally:
            for fut, _ in ahead:  # closed early: no compute may still use the reader
                if not fut.cancel():
                    try:
                        fut.result()
                    except BaseException:
                        pass
            ex.shutdown(wait=True)
            reader.close()

    def _checked(self, out: bytes | memoryview, n: int) -> bytes | memoryview:
        if len(out) != n * DTYPE_ITEMSIZE[self.dtype]:
            raise EditError(f"{self.label}: computed {len(out)} bytes for {n} elements")
        return out

    def describe(self) -> str:
        return self.label


@dataclass(frozen=True)
class Raw:
    """Bytes already in memory (little-endian elements), written as they are."""

    data: bytes | memoryview
    label: str = "raw"

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes | memoryview]:
        view = memoryview(self.data).cast("B")
        for start in range(0, len(view), chunk_bytes):
            yield view[start:start + chunk_bytes]

    def describe(self) -> str:
        return self.label


class Content(Protocol):
    """What the writer needs of a new storage's bytes (:class:`Zeros`, :class:`Fill`,
    :class:`Derived`, :class:`Raw`, and ``dcp_convert.Gathered``)."""

    @property
    def nbytes(self) -> int: ...

    def chunks(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes | memoryview]: ...

    def describe(self) -> str: ...


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


def standalone_tensor(dtype: str, shape: Sequence[int], stride: Sequence[int],
                      content: Content, device: str = "cpu") -> TensorRef:
    """A new tensor pickled the way ``torch.save`` pickles one of ``dtype`` today, with no
    existing tensor to model it on: ``_rebuild_tensor_v2`` over a typed storage
    (``torch.FloatStorage``) for the dtypes that have one, else ``_rebuild_tensor_v3`` over an
    ``UntypedStorage`` with the dtype as last argument (uint16/32/64 and newer dtypes).
    ``stride`` may be any strides that stay within the content (a column-major numpy array
    keeps its bytes and gets column-major strides)."""
    itemsize = DTYPE_ITEMSIZE[dtype]
    numel = content.nbytes // itemsize
    cls = _STORAGE_CLASS.get(dtype)
    hooks: OrderedDict[Any, Any] = OrderedDict()
    if cls is not None:
        storage = Storage(("storage", Global("torch", cls, "allowed"), "new", device, numel),
                          content=content)
        return TensorRef(Global("torch._utils", "_rebuild_tensor_v2", "allowed"),
                         (storage, 0, tuple(shape), tuple(stride), False, hooks))
    storage = Storage(("storage", Global("torch.storage", "UntypedStorage", "allowed"), "new",
                       device, content.nbytes), content=content)
    return TensorRef(Global("torch._utils", "_rebuild_tensor_v3", "allowed"),
                     (storage, 0, tuple(shape), tuple(stride), False, hooks,
                      Global("torch", dtype, "allowed")))


def new_tensor(like: TensorRef, shape: Sequence[int], content: Content, *,
               dtype: str | None = None, device: str | None = None) -> TensorRef:
    """A new contiguous tensor shaped ``shape`` whose bytes are ``content``.

    Its storage is pickled like ``like``'s (typed ``torch.FloatStorage`` or untyped with a
    dtype argument), on ``device`` (default ``like``'s); ``dtype`` defaults to ``like``'s.
    The storage's archive key is given by the writer (it numbers storages in first-use order).
    """
    if like.is_dtensor:
        raise EditError("the state holds DTensors (FSDP2 / tensor parallel): making new "
                        "sharded tensors is not supported yet",
                        hint="convert or add state before sharding, or on a full state dict "
                             "(get_state_dict with full_state_dict=True)")
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


__all__ = ["CHUNK_BYTES", "Content", "Derived", "Fill", "Raw", "Reader", "Zeros", "decode",
           "encode", "is_contiguous", "lazy_numpy", "new_tensor", "pack_scalar",
           "standalone_tensor"]
