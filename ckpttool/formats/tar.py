"""The pre-1.0 torch.save tar format: members ``sys_info``, ``storages``, ``tensors``, ``pickle``.

torch 2.13 still loads it (``weights_only=False`` only), unpickling, in order: the storage count
and one pickle per storage in ``storages`` (each followed by the storage's raw bytes: an int64
element count, then the elements), the view list, the tensor count and one pickle per tensor in
``tensors`` (each followed by its ndim, sizes, strides and offset), then ``pickle``, the object.
Every one of those pickles is judged; the object is read as a tree whose persistent ids (tensor
keys) stay opaque references. Nothing is extracted to disk; member headers are read with
:mod:`tarfile`, which parses and runs nothing from the file.
"""

from __future__ import annotations

import struct
import tarfile
from typing import Any, BinaryIO

from ..errors import PickleError, UnreadableError
from .nodes import Global, Reduce
from .safety import NEEDS_TRUST, Call, Safety
from .unpickler import PickleTruncated, Unpickled, unpickle

_ELEMENT = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2,
            "Char": 1, "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16}


def read_tar(path: str, f: BinaryIO) -> tuple[Unpickled, Safety]:
    """The tar file's object and the verdict over all its pickles (a :class:`PickleError`
    raised here carries ``safety``: the verdict up to the break)."""
    safety = Safety()
    safety.add_reason(NEEDS_TRUST, "the pre-1.0 tar format: torch.load refuses weights_only=True "
                                   "for it")
    safety.calls.append(Call("<legacy tar format>", "", NEEDS_TRUST,
                             "torch.load needs weights_only=False for the tar format"))
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
    except tarfile.TarError as e:
        raise UnreadableError(f"a tar archive that cannot be read ({e})", path=path) from None
    with tar:
        def member(name: str) -> Any:
            try:
                m = tar.extractfile(name)
            except KeyError:
                raise UnreadableError(f"a tar archive without the {name!r} member torch.save "
                                      "wrote before 1.0", path=path) from None
            if m is None:
                raise UnreadableError(f"tar member {name!r} is not a file", path=path)
            return m

        def part(m: Any, pos: int, extra: int = 0) -> tuple[Unpickled, bytes]:
            """The pickle at ``pos`` of member ``m`` and the ``extra`` bytes after it, read
            through a growing window (a member may hold gigabytes of storage bytes)."""
            limit = 1 << 16
            while True:
                m.seek(pos)
                data = m.read(limit)
                complete = len(data) < limit  # the member ends inside the window
                try:
                    u = unpickle(data, 0, persistent=_tensor_key)
                except PickleError as e:
                    if isinstance(e, PickleTruncated) and not complete:
                        limit *= 8
                        continue
                    partial = Safety()
                    partial.merge(safety)
                    partial.merge(getattr(e, "safety", None) or Safety())
                    e.safety = partial
                    raise
                if u.end + extra > len(data):
                    if complete:
                        raise UnreadableError(f"tar member {m.name!r} is truncated", path=path)
                    limit *= 8
                    continue
                safety.merge(u.safety)
                return u, data[u.end:u.end + extra]

        storages = member("storages")
        u, _ = part(storages, 0)
        pos = u.end
        for _ in range(_count(u.root, path, "storages")):
            a, tail = part(storages, pos, 8)
            st = a.root[2] if isinstance(a.root, tuple) and len(a.root) == 3 else None
            size = _ELEMENT.get(st.name.replace("Storage", ""), 1) if isinstance(st, Global) else 1
            (numel,) = struct.unpack("<q", tail)
            if numel < 0:
                raise UnreadableError("tar member 'storages' declares a negative storage size",
                                      path=path)
            pos += a.end + 8 + numel * size
        part(storages, pos)  # the storage views
        tensors = member("tensors")
        u, _ = part(tensors, 0)
        pos = u.end
        for _ in range(_count(u.root, path, "tensors")):
            a, tail = part(tensors, pos, 4)
            (ndim,) = struct.unpack("<i", tail)
            if not 0 <= ndim <= 64:
                raise UnreadableError(f"tar member 'tensors' declares {ndim} dimensions",
                                      path=path)
            pos += a.end + 8 + 16 * ndim + 8
        main, _ = part(member("pickle"), 0)
    return main, safety


def _count(root: Any, path: str, what: str) -> int:
    if type(root) is not int or root < 0:
        raise UnreadableError(f"tar member {what!r} does not start with a count", path=path)
    return root


def _tensor_key(pid: Any) -> Any:
    """The object's persistent ids are keys of the tensors read before it."""
    return Reduce(Global("torch", "Tensor", "allowed"), (pid,), "legacy-tar")
