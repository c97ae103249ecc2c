"""What changed between two checkpoints, by JSON Pointer, without loading them.

``diff(a, b)`` walks both trees side by side (files or folders, any format ckpttool reads) and
returns a :class:`DiffResult`: keys added or removed, changed scalars and hyperparameters,
tensors whose shape, dtype or device changed, tensors whose bytes changed, dict keys in
another order, a reordered optimizer, files of a folder that differ, another safety level.

Tensor bytes are compared without reading them wherever the file can tell:

* a torch.save zip record carries the CRC-32 of its storage's bytes. Two tensors with the same
  view (offset, shape, stride, dtype) of storages with equal CRC and size have equal bytes;
  two tensors that each cover their whole storage differ when the CRCs differ. No byte read.
* a view that covers only part of its storage (FSDP's flat buffers, a slice saved with its
  base) whose storage CRCs differ may still be equal: only then the two views' own bytes are
  read and compared, not the whole storages. Views of different layouts (a view against its
  contiguous copy) are compared element by element the same way.
* records without a CRC (the legacy format, safetensors, zip files written with CRCs off) get
  one computed from their bytes, once per storage, so a legacy file and its zip rewrite are
  compared exactly.

A CRC-32 match is taken as equal bytes (a random change escapes it with probability 2^-32);
``values=True`` reads the bytes of every tensor found different and adds the largest absolute
difference, the relative difference ``|b - a| / |a|`` (2-norms) and both norms.

Optimizer state is matched by parameter name when both sides know the names (``param_names``
or a certain alignment with the model, :mod:`ckpttool.names`): a permuted parameter order is
one ``reorder`` difference, and each parameter's state is compared with its namesake's.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import Checkpoint, open_checkpoint
from .formats.nodes import Global, Reduce, Storage, TensorRef
from .formats.safetensors import SafeTensor
from .formats.safety import Safety
from .tree import join, reduce_children

_CHUNK = 8 << 20
_MAX_DEPTH = 200

KINDS = ("added", "removed", "value", "type", "tensor", "bytes", "order", "reorder", "rekey",
         "file", "safety")


@dataclass
class Difference:
    """One difference. ``pointer`` is where it is in ``a`` (in ``b`` for what was added);
    ``pointer_after`` is set when the same thing sits elsewhere in ``b`` (optimizer state of a
    renumbered parameter); ``name`` is the parameter's name when state was matched by name.

    ``kind``: ``added`` / ``removed`` (``after`` / ``before`` is the value), ``value`` (a
    scalar, a hyperparameter, a tiny tensor's values: ``before`` and ``after``), ``type`` (a
    value of another type), ``tensor`` (shape, dtype or device: ``before`` / ``after`` such as
    ``"float32[3, 4] cuda:0"``), ``bytes`` (same shape and dtype, other bytes; ``values`` with
    ``values=True``), ``order`` (the same keys in another order: the key lists), ``reorder``
    (an optimizer's params renumbered: their names in ``a``'s and ``b``'s order), ``rekey``
    (the same params in the same order under another kind of key, names <-> ids: how each
    side keys them), ``file``
    (a folder file ckpttool does not parse: sizes), ``safety`` (the verdict's levels)."""

    pointer: str
    kind: str
    before: Any = None
    after: Any = None
    name: str | None = None
    pointer_after: str | None = None
    values: dict[str, Any] | None = None


@dataclass
class DiffResult:
    """The differences between ``a`` and ``b`` and how tensor bytes were compared."""

    a: str
    b: str
    differences: list[Difference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tensors: int = 0  # tensor pairs compared
    by_value: int = 0  # tiny tensors (``step``...), whose values the reader has read
    by_crc: int = 0  # decided from the archives' CRC-32, no byte read
    by_bytes: int = 0  # decided by reading bytes (views of changed storages, no CRC)
    unread: int = 0  # bytes not comparable (DCP chunks, new tensors not written yet)
    reshaped: int = 0  # another shape or dtype: elements not compared
    bytes_read: int = 0

    @property
    def equal(self) -> bool:
        return not self.differences


def diff(a: str | os.PathLike[str] | Checkpoint, b: str | os.PathLike[str] | Checkpoint, *,
         values: bool = False, optimizer: str | None = None, one: bool = False) -> DiffResult:
    """Compare two checkpoints (paths or opened :class:`~ckpttool.Checkpoint` objects).

    Args:
        a: the checkpoint before (a file or a folder that is one checkpoint).
        b: the checkpoint after.
        values: read the bytes of tensors that differ and add ``max_abs``, ``rel``,
            ``norm_before`` and ``norm_after`` to their difference (imports numpy).
        optimizer: compare only the optimizer at this JSON Pointer (it must be in both).
        one: read folders as one checkpoint whatever their layout (``show --one``).

    Returns:
        a :class:`DiffResult`; ``.equal`` is True when nothing differs.

    Raises:
        CkptError: a path cannot be read (``UnreadableError``), is a run folder
            (``RunFolderError``), or has no optimizer at ``optimizer``.
    """
    ca = a if isinstance(a, Checkpoint) else open_checkpoint(a, one=one)
    cb = b if isinstance(b, Checkpoint) else open_checkpoint(b, one=one)
    return _Differ(ca, cb, values).run(optimizer)


def _describe(t: Any) -> str:
    return f"{t.dtype}{list(t.shape)} {t.device}"


def _is_tensor(x: Any) -> bool:
    return isinstance(x, (TensorRef, SafeTensor))


def _same_scalar(x: Any, y: Any) -> bool:
    if type(x) is not type(y):
        return False
    if isinstance(x, float) and math.isnan(x) and math.isnan(y):
        return True
    if isinstance(x, complex):
        return x == y or (all(map(math.isnan, (x.real, y.real))) and x.imag == y.imag)
    try:
        return bool(x == y)
    except Exception:  # an exotic value that does not compare: say it differs
        return False


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _same_value(x: Any, y: Any) -> bool:
    """Tiny tensors' values (nested lists of numbers), NaN equal to NaN."""
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_same_value(p, q) for p, q in zip(x, y))
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return type(x) is type(y) and x == y


class _Differ:
    def __init__(self, a: Checkpoint, b: Checkpoint, values: bool) -> None:
        self.a, self.b = a, b
        self.values = values
        self.out = DiffResult(a.path, b.path)
        self.seen: set[tuple[int, int]] = set()
        self.reordered: dict[str, tuple[Any, Any]] = {}  # optimizer pointer -> (opt a, opt b)
        # (path, offset, size) of a record -> the CRC-32 computed from its bytes
        self.crcs: dict[tuple[str, int, int], int] = {}
        self.fds: dict[str, int] = {}
        self.pending: list[tuple[Difference, Any, Any]] = []  # --values work
        self.gathered: dict[int, bytes] = {}  # id(DCP tensor) -> its gathered bytes

    # -- driving ---------------------------------------------------------------------------
    def run(self, optimizer: str | None) -> DiffResult:
        a, b = self.a, self.b
        try:
            if a.format != b.format:
                self.out.notes.append(f"formats differ ({a.format} and {b.format}): contents "
                                      "compared")
            if a.safety.level != b.safety.level:
                self._add("", "safety", a.safety.level, b.safety.level)
            if optimizer is not None:
                oa, ob = a.optimizer(optimizer), b.optimizer(optimizer)
                if not (oa.flattened or ob.flattened):
                    self._match_optimizer(oa, ob)
                self._cmp(a.resolve(optimizer), b.resolve(optimizer), optimizer, optimizer, 0)
            elif a.is_folder != b.is_folder:
                self._add("", "type", f"{'folder' if a.is_folder else 'file'} ({a.format})",
                          f"{'folder' if b.is_folder else 'file'} ({b.format})")
            else:
                pa = {o.pointer: o for o in a.optimizers if not o.flattened}
                for o in b.optimizers:
                    if o.pointer in pa and not o.flattened:
                        self._match_optimizer(pa[o.pointer], o)
                self._cmp(a.root, b.root, "", "", 0)
                if a.is_folder:
                    self._other_files()
            if self.values and self.pending:
                self._read_values()
        finally:
            for fd in self.fds.values():
                os.close(fd)
        return self.out

    def _add(self, ptr: str, kind: str, before: Any = None, after: Any = None,
             ptr_b: str | None = None, name: str | None = None) -> Difference:
        d = Difference(ptr, kind, before, after, name,
                       ptr_b if ptr_b is not None and ptr_b != ptr else None)
        self.out.differences.append(d)
        return d

    # -- the walk --------------------------------------------------------------------------
    def _cmp(self, x: Any, y: Any, pa: str, pb: str, depth: int, name: str | None = None
             ) -> None:
        if depth > _MAX_DEPTH:
            if x is not y:
                self._add(pa, "value", "(nested too deep to compare)", "(not compared)", pb,
                          name)
            return
        if _is_tensor(x) or _is_tensor(y):
            if _is_tensor(x) and _is_tensor(y):
                self._tensor(x, y, pa, pb, name)
            else:
                self._add(pa, "type", x, y, pb, name)
            return
        key = (id(x), id(y))
        if isinstance(x, (dict, list, tuple, Reduce)):
            if key in self.seen:  # shared (or cyclic) parts: compared once
                return
            self.seen.add(key)
        if isinstance(x, dict) and isinstance(y, dict):
            if pa in self.reordered and pa == pb:
                self._optimizer(x, y, pa, depth)
                return
            self._dict(x, y, pa, pb, depth, name)
        elif isinstance(x, (list, tuple)) and type(x) is type(y):
            n = min(len(x), len(y))
            for i in range(n):
                self._cmp(x[i], y[i], join(pa, i), join(pb, i), depth + 1, name)
            for i in range(n, len(x)):
                self._add(join(pa, i), "removed", x[i], None, None, name)
            for i in range(n, len(y)):
                self._add(join(pb, i), "added", None, y[i], None, name)
        elif isinstance(x, Reduce) and isinstance(y, Reduce):
            if x.qualname != y.qualname:
                self._add(pa, "type", x, y, pb, name)
                return
            kx, ky = dict(reduce_children(x)), dict(reduce_children(y))
            self._keyed(kx, ky, pa, pb, depth, name, raw=True)
        elif isinstance(x, Global) and isinstance(y, Global):
            if x.qualname != y.qualname:
                self._add(pa, "value", x, y, pb, name)
        elif isinstance(x, Storage) and isinstance(y, Storage):
            if x.location != y.location or x.numel != y.numel:
                self._add(pa, "value", x, y, pb, name)
        elif _number(x) and _number(y):  # 0 and 0.0 are the same hyperparameter
            if not (x == y or (x != x and y != y)):
                self._add(pa, "value", x, y, pb, name)
        elif type(x) is not type(y):
            self._add(pa, "type", x, y, pb, name)
        elif not _same_scalar(x, y):
            self._add(pa, "value", x, y, pb, name)

    def _dict(self, x: dict[Any, Any], y: dict[Any, Any], pa: str, pb: str, depth: int,
              name: str | None) -> None:
        self._keyed(x, y, pa, pb, depth, name)
        common_x = [k for k in x if k in y]
        common_y = [k for k in y if k in x]
        if common_x != common_y:
            self._add(pa, "order", list(x), list(y), pb, name)

    def _keyed(self, x: dict[Any, Any], y: dict[Any, Any], pa: str, pb: str, depth: int,
               name: str | None, raw: bool = False) -> None:
        def j(p: str, k: Any) -> str:
            return f"{p}/{k}" if raw else join(p, k)
        for k, v in x.items():
            if k in y:
                self._cmp(v, y[k], j(pa, k), j(pb, k), depth + 1, name)
            else:
                self._add(j(pa, k), "removed", v, None, None, name)
        for k, v in y.items():
            if k not in x:
                self._add(j(pb, k), "added", None, v, None, name)

    # -- optimizers matched by name --------------------------------------------------------
    def _match_optimizer(self, oa: Any, ob: Any) -> None:
        """Mark an optimizer whose params were renumbered (the same names under other ids)."""
        na, nb = _names(oa), _names(ob)
        if na is None or nb is None or sorted(na.values()) != sorted(nb.values()):
            return
        by_name_b = {n: p for p, n in nb.items()}
        if any(by_name_b[n] != p for p, n in na.items()):
            self.reordered[oa.pointer] = (oa, ob)

    def _optimizer(self, x: dict[Any, Any], y: dict[Any, Any], ptr: str, depth: int) -> None:
        oa, ob = self.reordered[ptr]
        na, nb = _names(oa), _names(ob)
        assert na is not None and nb is not None
        id_b = {n: p for p, n in nb.items()}
        id_a = {n: p for p, n in na.items()}
        order_a, order_b = [na[p] for p in oa.param_ids], [nb[p] for p in ob.param_ids]
        if order_a == order_b:  # the same order, other keys: names <-> ids (to-file, to-dcp)
            self._add(ptr, "rekey", _keyed_by(oa), _keyed_by(ob))
        else:
            self._add(ptr, "reorder", order_a, order_b)
        rest_x = {k: v for k, v in x.items() if k not in ("state", "param_groups")}
        rest_y = {k: v for k, v in y.items() if k not in ("state", "param_groups")}
        self._keyed(rest_x, rest_y, ptr, ptr, depth, None)
        ga, gb = x.get("param_groups"), y.get("param_groups")
        gp = join(ptr, "param_groups")
        if isinstance(ga, list) and isinstance(gb, list):
            for i in range(max(len(ga), len(gb))):
                p = join(gp, i)
                if i >= len(ga):
                    self._add(p, "added", None, gb[i])
                    continue
                if i >= len(gb):
                    self._add(p, "removed", ga[i], None)
                    continue
                hx = {k: v for k, v in ga[i].items() if k not in ("params", "param_names")}
                hy = {k: v for k, v in gb[i].items() if k not in ("params", "param_names")}
                self._keyed(hx, hy, p, p, depth + 2, None)
                mx = [na[q] for q in ga[i].get("params", [])]
                my = [nb[q] for q in gb[i].get("params", [])]
                if sorted(mx) != sorted(my):  # members changed, not only their ids
                    self._add(join(p, "params"), "value", mx, my)
        else:
            self._cmp(ga, gb, gp, gp, depth + 1)
        sx, sy = x.get("state"), y.get("state")
        sp = join(ptr, "state")
        if not (isinstance(sx, dict) and isinstance(sy, dict)):
            self._cmp(sx, sy, sp, sp, depth + 1)
            return
        for n in sorted(set(id_a) | set(id_b), key=lambda n: (id_a.get(n, 1 << 62), n)):
            ia, ib = id_a.get(n), id_b.get(n)
            va = sx.get(ia) if ia is not None else None
            vb = sy.get(ib) if ib is not None else None
            pa, pb = join(sp, ia if ia is not None else ib), join(sp, ib if ib is not None else ia)
            if va is None and vb is None:
                continue
            if vb is None:
                self._add(pa, "removed", va, None, None, n)
            elif va is None:
                self._add(pb, "added", None, vb, None, n)
            else:
                self._cmp(va, vb, pa, pb, depth + 2, n)
        named_a, named_b = set(na), set(nb)
        for k, v in sx.items():  # state under ids no group lists
            if k not in named_a:
                if k in sy and k not in named_b:
                    self._cmp(v, sy[k], join(sp, k), join(sp, k), depth + 2)
                else:
                    self._add(join(sp, k), "removed", v, None)
        for k, v in sy.items():
            if k not in named_b and not (k in sx and k not in named_a):
                self._add(join(sp, k), "added", None, v)

    # -- tensors ---------------------------------------------------------------------------
    def _tensor(self, x: Any, y: Any, pa: str, pb: str, name: str | None) -> None:
        out = self.out
        out.tensors += 1
        if tuple(x.shape) != tuple(y.shape) or x.dtype != y.dtype:
            out.reshaped += 1
            self._add(pa, "tensor", _describe(x), _describe(y), pb, name)
            return
        if x.device != y.device and "-" not in (x.device, y.device):  # "-": DCP, no device
            self._add(pa, "tensor", _describe(x), _describe(y), pb, name)
        vx, vy = _tiny(x), _tiny(y)
        if vx is not None and vy is not None:  # tiny tensors: values read already
            out.by_value += 1
            if not _same_value(vx, vy):
                self._add(pa, "value", x, y, pb, name)
            return
        dcp = _in_chunks(x) or _in_chunks(y)
        same = self._same_dcp(x, y) if dcp else self._same_bytes(x, y)
        if same is None:
            out.unread += 1
        elif not same:
            d = self._add(pa, "bytes", _describe(x), _describe(y), pb, name)
            if self.values:
                self.pending.append((d, self._in_memory(x, self.a), self._in_memory(y, self.b))
                                    if dcp else (d, x, y))

    def _same_bytes(self, x: Any, y: Any) -> bool | None:
        """Whether two tensors of equal shape and dtype hold equal elements (None: cannot
        tell), from CRCs where they decide it, else from the views' bytes."""
        sx, sy = _span(x), _span(y)
        if sx is None or sy is None:
            return None
        if x.numel == 0:
            return True
        (rx, _, _, geomx, wholex), (ry, _, _, geomy, wholey) = sx, sy
        read_before = self.out.bytes_read
        cx, cy = self._crc(rx), self._crc(ry)
        same_storage = cx == cy and rx.size == ry.size
        if wholex and wholey:  # each tensor is its whole storage: the CRCs decide
            self._count(read_before)
            return same_storage
        if geomx == geomy and same_storage:  # the same view of equal storages
            self._count(read_before)
            return True
        self.out.by_bytes += 1
        return self._view_bytes(x) == self._view_bytes(y)

    def _same_dcp(self, x: Any, y: Any) -> bool:
        """Tensors of which one at least lies in DCP chunks: chunk by chunk by the CRCs of
        the chunks' records when both are chunked alike (no tensor byte read), else by their
        gathered bytes."""
        if x.numel == 0:
            return True
        cx = self._chunk_crcs(self.a, x) if _in_chunks(x) else None
        cy = self._chunk_crcs(self.b, y) if _in_chunks(y) else None
        if cx is not None and cy is not None and sorted(cx) == sorted(cy):
            self.out.by_crc += 1
            return cx == cy
        bx, by = self._element_bytes(self.a, x), self._element_bytes(self.b, y)
        self.out.by_bytes += 1
        return bx == by

    def _chunk_crcs(self, ckpt: Checkpoint, t: SafeTensor
                    ) -> dict[tuple[int, ...], tuple[tuple[int, ...], int]] | None:
        """offsets -> (sizes, CRC-32) of each chunk, when each chunk's record holds exactly
        its elements with a CRC (as dcp.save writes them); else None."""
        from .dcp_convert import chunk_records, dcp_transforms
        out = {}
        for offsets, sizes, _, start, rec in chunk_records(
                ckpt.path, "", t, Safety(), dcp_transforms(ckpt)):
            n = math.prod(sizes) * t.itemsize
            if not rec.crc or rec.method != 0 or start != rec.data_offset or rec.size != n:
                return None
            out[offsets] = (sizes, int(rec.crc))
        return out

    def _element_bytes(self, ckpt: Checkpoint, t: Any) -> bytes:
        """A tensor's elements, row-major: a DCP tensor's chunks gathered, else its view."""
        if not _in_chunks(t):
            return self._view_bytes(t)
        from .dcp_convert import gathered_bytes
        raw = gathered_bytes(ckpt, "", t)
        self.out.bytes_read += len(raw)
        if self.values:  # kept for --values, which would read them again
            self.gathered[id(t)] = raw
        return raw

    def _in_memory(self, t: Any, ckpt: Checkpoint) -> Any:
        """A DCP tensor for ``--values``: its gathered bytes in memory (read once more)."""
        if not _in_chunks(t):
            return t
        raw = self.gathered.pop(id(t), None)
        if raw is None:
            from .dcp_convert import gathered_bytes
            raw = gathered_bytes(ckpt, "", t)
        return _Loaded(t.shape, t.dtype, t.numel, t.itemsize, raw)

    def _count(self, read_before: int) -> None:
        if self.out.bytes_read == read_before:
            self.out.by_crc += 1
        else:
            self.out.by_bytes += 1

    def _fd(self, path: str) -> int:
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def _crc(self, rec: Any) -> int:
        """The CRC-32 of a record's bytes: the archive's, or computed once (legacy records,
        safetensors ranges, zip records written without CRCs)."""
        crc = getattr(rec, "crc", 0)
        if crc and getattr(rec, "method", 0) == 0:
            return int(crc)
        where = (rec.path, rec.data_offset, rec.size)
        got = self.crcs.get(where)
        if got is None:
            fd = self._fd(rec.path)
            got, done = 0, 0
            buf = memoryview(bytearray(min(_CHUNK, max(rec.size, 1))))
            while done < rec.size:
                n = os.preadv(fd, [buf[:min(rec.size - done, len(buf))]], rec.data_offset + done)
                if n <= 0:
                    break
                got = zlib.crc32(buf[:n], got)
                done += n
            self.out.bytes_read += done
            self.crcs[where] = got
        return got

    def _view_bytes(self, t: Any) -> bytes:
        """The bytes of a tensor's elements in row-major order (a strided view gathered)."""
        from .checkpoint import read_tensor_bytes
        raw = read_tensor_bytes(t)
        self.out.bytes_read += len(raw)
        if isinstance(t, SafeTensor) or _contiguous(t):
            return raw[:t.numel * t.itemsize] if isinstance(t, TensorRef) else raw
        import numpy as np
        size = t.itemsize
        arr = np.frombuffer(raw, dtype=np.dtype((np.void, size)))
        view = np.lib.stride_tricks.as_strided(arr, shape=t.shape,
                                               strides=[s * size for s in t.stride])
        return bytes(np.ascontiguousarray(view).tobytes())

    # -- --values --------------------------------------------------------------------------
    def _read_values(self) -> None:
        from .diffvalues import compare_all
        for _, x, y in self.pending:  # opened here: the worker threads only read the dict
            for t in (x, y):
                if not isinstance(t, _Loaded):
                    self._fd(t.path if isinstance(t, SafeTensor) else t.storage.record.path)
        results = compare_all([(x, y) for _, x, y in self.pending], self._fd)
        for (d, _, _), (values, n) in zip(self.pending, results):
            d.values = values
            self.out.bytes_read += n

    # -- folders ---------------------------------------------------------------------------
    def _other_files(self) -> None:
        fa, fb = _file_list(self.a.path, self.a.other_files), \
            _file_list(self.b.path, self.b.other_files)
        for rel in sorted(set(fa) | set(fb)):
            ptr = join("", rel)
            if rel not in fb:
                self._add(ptr, "removed", f"file, {fa[rel]} bytes", None)
            elif rel not in fa:
                self._add(ptr, "added", None, f"file, {fb[rel]} bytes")
            elif fa[rel] != fb[rel] or not _same_file(os.path.join(self.a.path, rel),
                                                      os.path.join(self.b.path, rel)):
                self._add(ptr, "file", f"{fa[rel]} bytes", f"{fb[rel]} bytes")


def _names(opt: Any) -> dict[Any, str] | None:
    """param id -> name for every param of the optimizer, or None unless all are named and
    the names are distinct."""
    out: dict[Any, str] = {}
    for g in opt.groups:
        if len(g.param_names) != len(g.params):
            return None
        for p, n in zip(g.params, g.param_names):
            if n is None:
                return None
            try:
                out[p] = n
            except TypeError:
                return None
    if len(set(out.values())) != len(out):
        return None
    return out


def _tiny(t: Any) -> Any:
    """The values the reader read of a tiny tensor (``step``, a 0-d lr), else None."""
    return t.value if isinstance(t, SafeTensor) else t.base.value


def _contiguous(t: TensorRef) -> bool:
    expect = 1
    for n, s in zip(reversed(t.shape), reversed(t.stride)):
        if n != 1 and s != expect:
            return False
        expect *= n
    return True


def _span(t: Any) -> tuple[Any, int, int, tuple[Any, ...], bool] | None:
    """(record, first byte, byte count, view geometry, whether the view is its whole storage)
    of a tensor whose bytes lie in a file; None for one that has none (a new tensor not
    written yet, a DCP tensor in chunks)."""
    if isinstance(t, SafeTensor):
        if t.chunks is not None or not t.path:
            return None
        rec = _Range(t.path, t.data_offset, t.nbytes)
        return rec, t.data_offset, t.nbytes, (0, tuple(t.shape), None), True
    st = t.storage
    if st is None or st.record is None:
        return None
    rec = st.record
    size = t.itemsize
    span = (1 + sum((d - 1) * s for d, s in zip(t.shape, t.stride))) * size if t.numel else 0
    whole = t.offset == 0 and _contiguous(t) and t.numel * size == rec.size
    return rec, rec.data_offset + t.offset * size, span, \
        (t.offset, tuple(t.shape), tuple(t.stride)), whole


def _keyed_by(opt: Any) -> str:
    """How an optimizer keys its per-parameter state."""
    return "keyed by parameter name" if opt.names_source == "param ids (name-keyed)" \
        else "keyed by id"


def _in_chunks(t: Any) -> bool:
    """A DCP folder's tensor: its elements lie in chunks on the ranks' data files."""
    return isinstance(t, SafeTensor) and t.chunks is not None


@dataclass
class _Loaded:
    """A tensor whose elements (row-major) are already in memory (a DCP tensor gathered)."""

    shape: tuple[int, ...]
    dtype: str
    numel: int
    itemsize: int
    raw: bytes


@dataclass
class _Range:
    """A safetensors tensor's bytes, as a record without a CRC."""

    path: str
    data_offset: int
    size: int
    crc: int = 0
    method: int = 0


def _file_list(root: str, entries: list[str]) -> dict[str, int]:
    """Relative path -> size of the files of a folder that ckpttool does not parse
    (subfolders walked)."""
    out: dict[str, int] = {}
    for e in entries:
        p = os.path.join(root, e.rstrip("/"))
        if os.path.isdir(p) and not os.path.islink(p):
            for d, _, files in os.walk(p):
                for f in files:
                    fp = os.path.join(d, f)
                    out[os.path.relpath(fp, root)] = os.path.getsize(fp)
        elif os.path.lexists(p):
            out[e] = os.path.getsize(p) if os.path.exists(p) else 0
    return out


def _same_file(p: str, q: str) -> bool:
    if os.path.islink(p) or os.path.islink(q):
        return os.path.islink(p) and os.path.islink(q) and os.readlink(p) == os.readlink(q)
    with open(p, "rb") as f, open(q, "rb") as g:
        while True:
            x, y = f.read(_CHUNK), g.read(_CHUNK)
            if x != y:
                return False
            if not x:
                return True
