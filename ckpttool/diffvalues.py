"""``diff --values``: how far apart two tensors' values are, streamed from the files.

Both tensors' bytes are read in chunks of 2M elements into two buffers per worker thread (a
contiguous tensor is read where its storage lies; a strided view is gathered whole) and
decoded with numpy; per chunk, the largest absolute difference and the squared norms of
``a``, ``b`` and ``b - a`` are accumulated (each chunk's sums in the tensors' own precision,
summed over chunks in float64). Tensors are shared out to two threads (``preadv`` and numpy
release the GIL); nothing is held beyond two chunks per thread.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

from .formats.safetensors import SafeTensor

_ELEMS = 2 << 20

_NP = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "int8": "i1", "uint8": "u1",
       "int16": "<i2", "int32": "<i4", "int64": "<i8", "uint16": "<u2", "uint32": "<u4",
       "uint64": "<u8", "bool": "?", "complex64": "<c8", "complex128": "<c16"}


def _decode(np: Any, raw: Any, dtype: str) -> Any:
    if dtype == "bfloat16":
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    arr = np.frombuffer(raw, dtype=_NP[dtype])
    if arr.dtype.kind == "c":
        return arr.astype(np.complex128, copy=False)
    if arr.dtype.kind in "iub":
        return arr.astype(np.float64)
    return arr


def supported(dtype: str) -> bool:
    return dtype == "bfloat16" or dtype in _NP


def compare_all(pairs: list[tuple[Any, Any]], fd: Callable[[str], int]
                ) -> list[tuple[dict[str, Any], int]]:
    """:func:`compare_values` of each pair, on two worker threads, in order. ``fd`` must
    already have opened every file (it is called from the threads)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    local = threading.local()

    def one(pair: tuple[Any, Any]) -> tuple[dict[str, Any], int]:
        bufs = getattr(local, "bufs", None)
        if bufs is None:
            import numpy as np
            bufs = local.bufs = (memoryview(bytearray(_BUF)), memoryview(bytearray(_BUF)),
                                 np.empty(_ELEMS, dtype=np.float32))
        return compare_values(pair[0], pair[1], fd, bufs)

    order = sorted(range(len(pairs)), key=lambda i: -pairs[i][0].numel)  # biggest first
    with ThreadPoolExecutor(2, thread_name_prefix="ckpttool-values") as pool:
        futures = {i: pool.submit(one, pairs[i]) for i in order}
        return [futures[i].result() for i in range(len(pairs))]


_BUF = _ELEMS * 4  # 8 MB: 2M float32 elements a chunk (fewer of wider dtypes)


def compare_values(x: Any, y: Any, fd: Callable[[str], int],
                   bufs: tuple[memoryview, memoryview, Any] | None = None
                   ) -> tuple[dict[str, Any], int]:
    """``{"max_abs", "rel", "norm_before", "norm_after"}`` of tensors ``x`` (before) and ``y``
    (after) of equal shape, and the number of bytes read. ``rel`` is ``|y - x| / |x|`` in
    2-norm (``inf`` when ``x`` is all zeros and ``y`` is not); complex values count by
    magnitude. A dtype numpy cannot decode (float8, quantized) gives ``{"skipped": why}``."""
    if not (supported(x.dtype) and supported(y.dtype)):
        return {"skipped": f"values of {x.dtype} / {y.dtype} are not decoded"}, 0
    max_abs = 0.0
    sa = sb = sd = 0.0
    nread = 0
    nan = False
    import numpy as np
    ba, bb, dbuf = bufs or (memoryview(bytearray(_BUF)), memoryview(bytearray(_BUF)), None)
    # both tensors in chunks of the same element count, so that the chunks line up
    elems = len(ba) // max(_itemsize(x.dtype), _itemsize(y.dtype))
    for ca, cb in zip(_chunks(x, fd, ba, elems), _chunks(y, fd, bb, elems)):
        nread += len(ca) + len(cb)
        a, b = _decode(np, ca, x.dtype), _decode(np, cb, y.dtype)
        if a.dtype != b.dtype:
            a, b = a.astype(np.float64), b.astype(np.float64)
        if a.dtype == np.float32:  # the common case: into a reused buffer (no page faults)
            if dbuf is None or len(dbuf) < a.size:
                dbuf = np.empty(_ELEMS, dtype=np.float32)
            d = np.subtract(b, a, out=dbuf[:a.size])
        else:
            d = b - a
        if d.dtype.kind == "c":
            d, a, b = np.abs(d), np.abs(a), np.abs(b)
        else:
            np.abs(d, out=d)
        if d.size:
            m = float(d.max())
            if math.isnan(m):
                nan = True
            max_abs = max(max_abs, m)
        sa += float(np.dot(a, a))
        sb += float(np.dot(b, b))
        sd += float(np.dot(d, d))
    if nan:
        max_abs = math.nan
    na, nb, nd = math.sqrt(sa), math.sqrt(sb), math.sqrt(sd)
    rel = nd / na if na else (0.0 if nd == 0 else math.inf)
    return {"max_abs": max_abs, "rel": rel, "norm_before": na, "norm_after": nb}, nread


def _chunks(t: Any, fd: Callable[[str], int], buf: memoryview, elems: int) -> Any:
    """The tensor's element bytes in row-major order, ``elems`` elements at a time (each
    chunk a view of the reused ``buf``: use it before asking for the next)."""
    from .checkpoint import read_tensor_bytes
    from .diff import _contiguous
    size = _itemsize(t.dtype)
    total = t.numel * size
    raw_in_memory = getattr(t, "raw", None)
    if raw_in_memory is not None:  # a DCP tensor gathered by the diff
        flat = memoryview(raw_in_memory)
        for i in range(0, total, elems * size):
            yield flat[i:i + elems * size]
        return
    if isinstance(t, SafeTensor):
        path, start = t.path, t.data_offset
    elif _contiguous(t):
        rec = t.storage.record
        path, start = rec.path, rec.data_offset + t.offset * size
    else:  # a strided view: gathered whole (rare: views are mostly contiguous slices)
        import numpy as np
        raw = read_tensor_bytes(t)
        arr = np.frombuffer(raw, dtype=np.dtype((np.void, size)))
        view = np.lib.stride_tricks.as_strided(arr, shape=t.shape,
                                               strides=[s * size for s in t.stride])
        flat = memoryview(np.ascontiguousarray(view).tobytes())
        for i in range(0, total, elems * size):
            yield flat[i:i + elems * size]
        return
    f = fd(path)
    buf = buf[:elems * size]
    done = 0
    while done < total:
        want = min(total - done, len(buf))
        got = 0
        while got < want:  # a full chunk, so that both tensors' chunks line up
            n = os.preadv(f, [buf[got:want]], start + done + got)
            if n <= 0:
                raise OSError(f"{path}: tensor bytes end early (truncated)")
            got += n
        yield buf[:want]
        done += want


def _itemsize(dtype: str) -> int:
    from .formats.nodes import DTYPE_ITEMSIZE
    return DTYPE_ITEMSIZE[dtype]
