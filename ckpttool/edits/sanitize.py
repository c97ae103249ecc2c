"""``sanitize``: rewrite what ``torch.load(weights_only=True)`` refuses into plain values.

Since torch 2.6 ``torch.load`` defaults to ``weights_only=True`` and refuses every global
outside its allowlist: argparse ``Namespace``, numpy scalars / arrays / dtypes, ``pathlib``
paths, enums and dataclasses of training libraries. This edit maps each such value to the
nearest plain equivalent the allowlist accepts, reading the recorded calls only (nothing is
imported or called), and lists every value it changed:

===================================================  ===========================================
value (a recorded call of a global outside the list)  becomes
===================================================  ===========================================
``argparse.Namespace``, ``types.SimpleNamespace``,    a dict of its state (``__dict__`` and
dataclasses, any object rebuilt from its state        ``__slots__``); a dict / list subclass
                                                      rebuilt from items: a dict / list
numpy scalar (``multiarray.scalar``)                  a Python number (``bool``, ``int``,
                                                      ``float``, ``complex``)
numpy array (``multiarray._reconstruct``)             a tensor of the same dtype and shape (a new
                                                      record holding the array's bytes; column-
                                                      major arrays keep their bytes and strides)
``numpy.dtype``                                       its name (``'float64'``)
``pathlib`` paths                                     the path as a string
an enum (a class called with one plain value)         that value
``uuid.UUID``                                         ``'12345678-1234-...'``
``datetime`` / ``date`` / ``time``                    the ISO 8601 string (a ``ZoneInfo`` zone as
                                                      local time + ``[Europe/Paris]``, no offset)
``datetime.timedelta``                                seconds as a float
``frozenset``                                         a sorted list (``set`` is allowed as is)
``collections.defaultdict`` / ``deque``               a dict / a list
numpy ``Generator`` / ``RandomState`` / bit           the state dict their ``state`` setter /
generator                                             ``set_state`` accept
``torch.Generator``                                   its ``get_state()`` uint8 tensor
===================================================  ===========================================

Anything else (a referenced function or class, ``getattr(...)``, a call with arguments that
is not one of the above) is *unknown*: ``keep_unknown="error"`` (default) refuses, naming each
one; ``"string"`` replaces it with a description; ``"drop"`` removes it (from its dict, list
or tuple). Tensors, storages and every value torch already accepts are kept as they are
(tensor records are copied byte for byte by the writer). Unsafe files are refused before
this runs (:func:`ckpttool.checkpoint.open_for_edit`): a malicious file is never laundered
into one that looks clean.
"""

from __future__ import annotations

import datetime as _dt
import ntpath
import posixpath
import struct
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..checkpoint import Checkpoint, refuse_torchscript
from ..errors import EditError
from ..formats.nodes import DTYPE_ITEMSIZE, Global, Reduce, Storage, TensorRef
from ..formats.safety import ALLOWED, _class_like, normalize, summarize
from ..newtensors import Raw, standalone_tensor
from ..render import fmt
from ..tree import escape, join
from .plan import ABSENT, Change, Plan

KEEP_UNKNOWN = ("error", "string", "drop")

_DROP: Any = type("Drop", (), {"__repr__": lambda self: "(dropped)"})()


@dataclass
class Rewrite(Change):
    """A value sanitize changed: ``pointer`` in the result, ``before`` / ``after`` described,
    ``kind`` the rule that applied (``object``, ``numpy-array``, ``enum``, ``unknown``, ...)."""

    kind: str = ""

    def to_json(self) -> dict[str, Any]:
        from ..render import to_json
        return {"pointer": self.pointer, "kind": self.kind, "before": self.before,
                "after": None if self.after is ABSENT else to_json(self.after)}


def _q(node: Any) -> str:
    """The normalized qualname of a Global or of a Reduce's function."""
    g = node.func if isinstance(node, Reduce) else node
    if isinstance(g, Global):
        m, n = normalize(g.module, g.name)
        return f"{m}.{n}"
    return "<call>"


def allowed(g: Global) -> bool:
    """Does torch.load(weights_only=True) accept this global?"""
    return g.qualname in ALLOWED or _q(g) in ALLOWED


# numpy dtype codes -> torch dtype names (numpy's names are the same)
_NP_KIND = {"f": "float", "i": "int", "u": "uint", "c": "complex"}
_STRUCT = {"float16": "e", "float32": "f", "float64": "d", "int8": "b", "int16": "h",
           "int32": "i", "int64": "q", "uint8": "B", "uint16": "H", "uint32": "I",
           "uint64": "Q", "bool": "?"}
_SWAP = {1: "B", 2: "H", 4: "I", 8: "Q"}

_SCALAR = frozenset({"numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"})
_RECONSTRUCT = frozenset({"numpy.core.multiarray._reconstruct",
                          "numpy._core.multiarray._reconstruct"})
_NP_RANDOM = "numpy.random._pickle."
_PATHS = frozenset({"pathlib.Path", "pathlib.PosixPath", "pathlib.PurePath",
                    "pathlib.PurePosixPath", "pathlib.WindowsPath", "pathlib.PureWindowsPath"})
_RECONSTRUCTORS = frozenset({"copyreg._reconstructor", "copyreg.__newobj__"})


def numpy_dtype(node: Any) -> tuple[str, str] | None:
    """(name, byte order) of a pickled ``numpy.dtype('f8', False, True)``, or None."""
    if not (isinstance(node, Reduce) and _q(node) == "numpy.dtype" and node.args
            and isinstance(node.args[0], str)):
        return None
    code = node.args[0]
    order = "<"
    st = node.state if node.has_state else None
    if isinstance(st, tuple) and len(st) > 1 and isinstance(st[1], str):
        order = st[1]
    if code == "b1":
        return "bool", order
    if len(code) > 1 and code[0] in _NP_KIND and code[1:].isdigit():
        bits = int(code[1:]) * 8
        name = f"{_NP_KIND[code[0]]}{bits}"
        if name in DTYPE_ITEMSIZE and DTYPE_ITEMSIZE[name] == int(code[1:]):
            return name, order
    return code, order


def _little(raw: bytes, itemsize: int, order: str) -> bytes:
    """``raw`` as little-endian elements (byte-swapped when it was pickled big-endian)."""
    if order != ">" or itemsize == 1:
        return raw
    import array
    a = array.array(_SWAP[itemsize])
    a.frombytes(raw)
    if sys.byteorder == "little":
        a.byteswap()
    return a.tobytes()


def _number(dtype: str, order: str, raw: bytes) -> Any:
    """One numpy scalar's value as a Python number, or None when it has no plain form."""
    end = ">" if order == ">" else "<"
    if dtype in _STRUCT and len(raw) == DTYPE_ITEMSIZE[dtype]:
        return struct.unpack(end + _STRUCT[dtype], raw)[0]
    if dtype in ("complex64", "complex128") and len(raw) == DTYPE_ITEMSIZE[dtype]:
        fmt_ = end + ("ff" if dtype == "complex64" else "dd")
        re_, im = struct.unpack(fmt_, raw)
        return complex(re_, im)
    return None


def _contiguous(shape: tuple[int, ...], fortran: bool) -> tuple[int, ...]:
    dims = list(reversed(shape)) if not fortran else list(shape)
    out, acc = [], 1
    for d in dims:
        out.append(acc)
        acc *= d
    return tuple(reversed(out)) if not fortran else tuple(out)


def _state_dict(node: Reduce) -> dict[str, Any] | None:
    """The attributes an object is rebuilt with (``__dict__`` and ``__slots__``), or None when
    its state is not of that form."""
    st = node.state if node.has_state else None
    if st is None:
        return {}
    if isinstance(st, dict) and all(isinstance(k, str) for k in st):
        return dict(st)
    if isinstance(st, tuple) and len(st) == 2 and all(p is None or isinstance(p, dict)
                                                       for p in st):
        out: dict[str, Any] = {}
        for p in st:
            if p:
                if not all(isinstance(k, str) for k in p):
                    return None
                out.update(p)
        return out
    return None


def _object_class(node: Reduce) -> str | None:
    """The class an object is rebuilt from with no constructor arguments (``NEWOBJ`` with
    ``()``, ``copyreg._reconstructor(cls, object, None)``, ``copyreg.__newobj__(cls)``), or
    None."""
    if not isinstance(node.func, Global):
        return None
    q = _q(node)
    if q in _RECONSTRUCTORS and node.args and isinstance(node.args[0], Global):
        rest = node.args[1:]
        if q == "copyreg._reconstructor" and not (
                len(rest) == 2 and isinstance(rest[0], Global)
                and _q(rest[0]) == "builtins.object" and rest[1] is None):
            return None
        if q == "copyreg.__newobj__" and rest:
            return None
        return _q(node.args[0])
    if node.kind in ("newobj", "newobj_ex") and node.args == () and not node.kwargs:
        return q  # cls.__new__(cls): a class, whatever its name's case
    if node.kind == "reduce" and node.args == () and _class_like(node.func.name):
        return q
    return None


def describe(node: Any) -> str:
    """A short, safe description of a value (what ``--keep-unknown string`` writes)."""
    if isinstance(node, Global):
        return node.qualname
    if isinstance(node, Reduce):
        text = f"{node.qualname}({summarize(node.args, 60)})"
        fields = _state_dict(node)
        if fields:
            names = ", ".join(list(fields)[:6]) + (", ..." if len(fields) > 6 else "")
            text += f" with {names}"
        return text
    return fmt(node)


class _Sanitizer:
    def __init__(self, ckpt: Checkpoint, keep_unknown: str) -> None:
        self.ckpt = ckpt
        self.keep_unknown = keep_unknown
        self.memo: dict[int, Any] = {}
        self.keep: list[Any] = []  # originals alive while their ids are memo keys
        self.active: set[int] = set()
        self.changes: list[Rewrite] = []
        self.unknown: list[tuple[str, str]] = []

    def note(self, pointer: str, kind: str, before: str, after: Any) -> None:
        self.changes.append(Rewrite(pointer, before, after, kind))

    # -- the walk ----------------------------------------------------------------------------
    def value(self, obj: Any, ptr: str) -> Any:
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, bytearray,
                                           Storage)):
            return obj
        oid = id(obj)
        if oid in self.memo:
            return self.memo[oid]
        if oid in self.active:
            raise EditError("a value contains itself (a cycle through objects to convert); "
                            "sanitize cannot make that plain", path=self.ckpt.path,
                            pointer=ptr)
        self.active.add(oid)
        try:
            new = self._value(obj, ptr)
        finally:
            self.active.discard(oid)
        self.memo[oid] = new
        self.keep.append(obj)
        return new

    def _value(self, obj: Any, ptr: str) -> Any:
        if isinstance(obj, TensorRef):
            return obj if self._all_allowed(obj) else self._unknown(obj, ptr)
        if isinstance(obj, Global):
            return obj if allowed(obj) else self._unknown(obj, ptr)
        if isinstance(obj, dict):
            return self._dict(obj, ptr)
        if isinstance(obj, list):
            items = self._seq(obj, ptr)
            return obj if items is None else items
        if isinstance(obj, tuple):
            items = self._seq(obj, ptr)
            return obj if items is None else tuple(items)
        if isinstance(obj, set):
            members = {self.value(x, ptr) for x in obj}
            return obj if members == obj and all(a is b for a, b in zip(members, obj)) \
                else members
        if isinstance(obj, frozenset):
            plain = [m for m in (self.value(x, join(ptr, i)) for i, x in enumerate(obj))
                     if m is not _DROP]
            plain.sort(key=lambda x: (type(x).__name__, x) if isinstance(x, (int, float, str))
                       else (type(x).__name__, repr(x)))
            self.note(ptr, "frozenset", f"frozenset of {len(obj)}", fmt(plain))
            return plain
        if isinstance(obj, Reduce):
            if isinstance(obj.func, Global) and allowed(obj.func):
                return self._allowed_reduce(obj, ptr)
            return self._convert(obj, ptr)
        return self._unknown(obj, ptr)

    def _dict(self, obj: dict[Any, Any], ptr: str) -> Any:
        out = []
        changed = False
        for k, v in obj.items():
            nk = self.value(k, ptr) if isinstance(k, (Reduce, Global, tuple, frozenset)) else k
            nv = self.value(v, join(ptr, nk if nk is not _DROP else k))
            if nk is not k or nv is not v:
                changed = True
            if nk is _DROP or nv is _DROP:
                continue
            if isinstance(nk, list):  # a frozenset key made a sorted list: a tuple as a key
                nk = tuple(nk)
            out.append((nk, nv))
        if not changed:
            return obj
        new = obj.copy()  # the same type (OrderedDict, Counter) and attributes (_metadata)
        new.clear()
        new.update(out)
        if type(obj) is OrderedDict and hasattr(obj, "_metadata"):
            new._metadata = obj._metadata  # type: ignore[attr-defined]
        return new

    def _seq(self, obj: list[Any] | tuple[Any, ...], ptr: str) -> list[Any] | None:
        items = [self.value(x, join(ptr, i)) for i, x in enumerate(obj)]
        if all(a is b for a, b in zip(items, obj)):
            return None
        return [x for x in items if x is not _DROP]

    def _allowed_reduce(self, node: Reduce, ptr: str) -> Any:
        """A call torch allows (``OrderedDict``, ``torch.Size``, a Parameter): its parts
        sanitized, the call kept."""
        args = self._seq(node.args, f"{ptr}/@args")
        state = self.value(node.state, f"{ptr}/@state") if node.has_state else node.state
        items = self._seq(list(node.items), f"{ptr}/@items") if node.items else None
        dictitems = [(k, self.value(v, f"{ptr}/@dictitems/{escape(k)}"))
                     for k, v in node.dictitems]
        old_kwargs = node.kwargs or {}
        kwargs = {k: self.value(v, f"{ptr}/@kwargs/{escape(k)}") for k, v in old_kwargs.items()}
        if args is None and state is node.state and items is None \
                and all(a[1] is b[1] for a, b in zip(dictitems, node.dictitems)) \
                and all(kwargs[k] is old_kwargs[k] for k in kwargs):
            return node
        new = node.copy()
        if kwargs:
            new.kwargs = {k: v for k, v in kwargs.items() if v is not _DROP}
        if args is not None:
            new.args = tuple(args)
        new.state = state if state is not _DROP else Reduce.NO_STATE
        if items is not None:
            new.items = items
        new.dictitems = [(k, v) for k, v in dictitems if v is not _DROP]
        return new

    def _all_allowed(self, node: Any, depth: int = 0) -> bool:
        """Every global a tensor node's pickle names is on the list."""
        if depth > 20:
            return False
        if isinstance(node, Global):
            return allowed(node)
        if isinstance(node, Storage):
            t = node.storage_type
            return not isinstance(t, Global) or allowed(t)
        if isinstance(node, Reduce):
            parts = [node.func, *node.args, *node.items, *(v for _, v in node.dictitems)]
            if node.has_state:
                parts.append(node.state)
            return all(self._all_allowed(p, depth + 1) for p in parts)
        if isinstance(node, dict):
            return all(self._all_allowed(v, depth + 1) for v in node.values())
        if isinstance(node, (list, tuple)):
            return all(self._all_allowed(v, depth + 1) for v in node)
        return True

    # -- the rules ---------------------------------------------------------------------------
    def _convert(self, node: Reduce, ptr: str) -> Any:
        q = _q(node)
        if q in _SCALAR:
            dt = numpy_dtype(node.args[0]) if node.args else None
            raw = node.args[1] if len(node.args) > 1 else None
            if dt is not None and isinstance(raw, bytes):
                v = _number(dt[0], dt[1], raw)
                if v is not None:
                    self.note(ptr, "numpy-scalar", f"numpy.{dt[0]}({v!r})", v)
                    return v
            return self._unknown(node, ptr)
        if q in _RECONSTRUCT:
            return self._array(node, ptr)
        if q == "numpy.dtype":
            dt = numpy_dtype(node)
            st = node.state if node.has_state else None
            structured = isinstance(st, tuple) and len(st) > 3 and (st[2], st[3]) != (None, None)
            if dt is not None and not structured:  # a structured dtype's fields: unknown
                self.note(ptr, "numpy-dtype", f"numpy.dtype({node.args[0]!r})", dt[0])
                return dt[0]
            return self._unknown(node, ptr)
        if q in _PATHS and all(isinstance(a, str) for a in node.args) and not node.has_state:
            join_ = ntpath.join if "Windows" in q else posixpath.join
            text = join_(*node.args) if node.args else "."
            self.note(ptr, "path", f"{q}({text!r})", text)
            return text
        if q == "uuid.UUID":
            n = (_state_dict(node) or {}).get("int")
            if isinstance(n, int) and 0 <= n < 1 << 128:
                h = f"{n:032x}"
                text = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
                self.note(ptr, "uuid", f"uuid.UUID({text!r})", text)
                return text
            return self._unknown(node, ptr)
        if q in ("datetime.datetime", "datetime.date", "datetime.time", "datetime.timedelta"):
            return self._datetime(node, q, ptr)
        if q == "collections.defaultdict" and not node.items:
            entries = dict(node.dictitems)
            self.note(ptr, "collection", f"collections.defaultdict of {len(entries)}",
                      f"dict of {len(entries)}")
            return self.value(entries, ptr)
        if q == "collections.deque" and node.args and isinstance(node.args[0], (list, tuple)) \
                and not node.has_state:
            items = list(node.args[0]) + list(node.items)
            self.note(ptr, "collection", f"collections.deque of {len(items)}",
                      f"list of {len(items)}")
            return self.value(items, ptr)
        if q.startswith(_NP_RANDOM):
            return self._np_random(node, q, ptr)
        if q in ("torch._C.Generator", "torch.Generator") and node.has_state \
                and isinstance(node.state, tuple) and len(node.state) == 3 \
                and isinstance(node.state[2], TensorRef) and node.state[2].dtype == "uint8":
            # Generator.__reduce__: (Generator, (device,), (seed, offset, get_state()))
            t = node.state[2]
            self.note(ptr, "torch-generator", "torch.Generator",
                      f"its get_state() tensor uint8{list(t.shape)}")
            return self.value(t, ptr)
        cls = _object_class(node)
        if cls is not None:
            fields = _state_dict(node)
            if fields is not None and not (fields and (node.items or node.dictitems)):
                if node.dictitems and not node.items:
                    out: Any = {k: v for k, v in node.dictitems}
                    after = f"dict of {len(out)}"
                elif node.items and not node.dictitems:
                    out = list(node.items)
                    after = f"list of {len(out)}"
                elif not node.items and not node.dictitems:
                    out = fields
                    after = "dict of " + (", ".join(list(fields)[:6])
                                          + (", ..." if len(fields) > 6 else "")
                                          if fields else "0")
                else:
                    return self._unknown(node, ptr)
                self.note(ptr, "object", f"{cls} object", after)
                return self.value(out, ptr)
            return self._unknown(node, ptr)
        # an enum member (``Enum.__reduce_ex__`` is ``cls, (value,)``) and value classes like
        # it (``decimal.Decimal('1.5')``): the one plain value they are rebuilt from
        if isinstance(node.func, Global) and node.kind == "reduce" \
                and _class_like(node.func.name) and len(node.args) == 1 \
                and isinstance(node.args[0], (str, int, float, bool)) \
                and not node.has_state and not node.items and not node.dictitems:
            v = node.args[0]
            self.note(ptr, "enum", f"{q}({v!r})", v)
            return v
        return self._unknown(node, ptr)

    def _array(self, node: Reduce, ptr: str) -> Any:
        st = node.state if node.has_state else None
        if not (isinstance(st, tuple) and len(st) == 5):
            return self._unknown(node, ptr)
        _, shape, dtype_node, fortran, raw = st
        dt = numpy_dtype(dtype_node)
        if dt is None or not isinstance(shape, tuple) \
                or not all(type(d) is int and d >= 0 for d in shape):
            return self._unknown(node, ptr)
        name, order = dt
        numel = 1
        for d in shape:
            numel *= d
        if name not in _STRUCT and name not in ("complex64", "complex128") \
                or not isinstance(raw, (bytes, bytearray)) \
                or len(raw) != numel * DTYPE_ITEMSIZE[name]:
            return self._unknown(node, ptr)
        data = _little(bytes(raw), DTYPE_ITEMSIZE[name], order)
        t = standalone_tensor(name, shape, _contiguous(shape, bool(fortran)),
                              Raw(data, f"numpy array bytes ({name}{list(shape)})"))
        desc = f"{name}{list(shape)}"
        self.note(ptr, "numpy-array", f"numpy.ndarray {desc}", f"tensor {desc} (new record)")
        return t

    def _datetime(self, node: Reduce, q: str, ptr: str) -> Any:
        args = node.args
        try:
            if q == "datetime.timedelta":
                if len(args) == 3 and all(type(a) is int for a in args):
                    secs = _dt.timedelta(*args).total_seconds()
                    self.note(ptr, "datetime", f"datetime.timedelta{args!r}", secs)
                    return secs
                return self._unknown(node, ptr)
            if not args or not isinstance(args[0], bytes) or len(args) > 2:
                return self._unknown(node, ptr)
            zone = ""
            tz: Any = None
            if len(args) == 2:
                tz, zone = self._tz(args[1])
                if tz is None and not zone:
                    return self._unknown(node, ptr)
            ctor = {"datetime.datetime": _dt.datetime, "datetime.date": _dt.date,
                    "datetime.time": _dt.time}[q]
            # the C constructors' own pickle path: plain data in, a value out
            value = ctor(args[0], tz) if tz is not None else ctor(args[0])  # type: ignore
        except (TypeError, ValueError):
            return self._unknown(node, ptr)
        text = value.isoformat() + (f"[{zone}]" if zone else "")
        self.note(ptr, "datetime", f"{q}({text!r})", text)
        return text

    def _tz(self, node: Any) -> tuple[Any, str]:
        """A pickled tzinfo as (datetime.timezone or None, IANA key or "")."""
        if isinstance(node, Reduce) and _q(node) == "datetime.timezone" and node.args:
            off = node.args[0]
            if isinstance(off, Reduce) and _q(off) == "datetime.timedelta" \
                    and all(type(a) is int for a in off.args) and len(off.args) == 3:
                delta = _dt.timedelta(*off.args)
                name = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], str) \
                    else None
                return (_dt.timezone(delta, name) if name else _dt.timezone(delta)), ""
        if isinstance(node, Reduce) and node.args and isinstance(node.args[0], str):
            # ZoneInfo: ``getattr(ZoneInfo, "_unpickle")(key, 1)``; the key is kept as written
            inner = node.func
            if isinstance(inner, Reduce) and _q(inner) == "builtins.getattr" \
                    and inner.args and isinstance(inner.args[0], Global) \
                    and _q(inner.args[0]) == "zoneinfo.ZoneInfo":
                return None, node.args[0]
        return None, ""

    def _np_random(self, node: Reduce, q: str, ptr: str) -> Any:
        """numpy's random objects as the state dicts their ``state`` setters accept:
        ``Generator(PCG64())`` -> ``{"bit_generator": "PCG64", "state": {...}, ...}`` (set it
        with ``rng.bit_generator.state = d``); ``RandomState`` -> its ``get_state(legacy=False)``
        dict (``RandomState().set_state(d)``). A ``SeedSequence`` pickled beside a bit
        generator's state (numpy 2) is left out: it only matters for ``spawn``."""
        name = q[len(_NP_RANDOM):]
        what = {"__generator_ctor": "numpy.random.Generator",
                "__randomstate_ctor": "numpy.random.RandomState",
                "__bit_generator_ctor": "numpy.random bit generator"}.get(name)
        state = node.state if node.has_state else None
        if isinstance(state, tuple) and state and isinstance(state[0], dict):
            state = state[0]
        if not isinstance(state, dict) and name in ("__generator_ctor", "__randomstate_ctor") \
                and node.args and isinstance(node.args[0], Reduce) \
                and _q(node.args[0]) == _NP_RANDOM + "__bit_generator_ctor":
            inner = node.args[0].state if node.args[0].has_state else None
            state = inner[0] if isinstance(inner, tuple) and inner else inner
        if what is None or not isinstance(state, dict) or "bit_generator" not in state:
            return self._unknown(node, ptr)
        self.note(ptr, "numpy-random", f"{what} ({state['bit_generator']})", "its state dict")
        return self.value(dict(state), ptr)

    def _unknown(self, node: Any, ptr: str) -> Any:
        desc = describe(node)
        self.unknown.append((ptr, desc))
        if self.keep_unknown == "string":
            self.note(ptr, "unknown", desc, desc)
            return desc
        if self.keep_unknown == "drop":
            self.note(ptr, "unknown", desc, ABSENT)
            return _DROP
        return node


def _check_clean(root: Any, path: str) -> None:
    """Every global of the result is on torch's list (a bug in this module otherwise)."""
    s = _Sanitizer.__new__(_Sanitizer)
    stack = [root]
    seen: set[int] = set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, (Global, Storage)):
            if not _Sanitizer._all_allowed(s, obj):
                raise AssertionError(f"{path}: sanitize left {obj!r} in the tree")
        elif isinstance(obj, Reduce):
            if not isinstance(obj.func, Global) or not allowed(obj.func):
                raise AssertionError(f"{path}: sanitize left {obj!r} in the tree")
            stack += [*obj.args, *obj.items, *(v for _, v in obj.dictitems),
                      *(obj.kwargs.values() if obj.kwargs else ())]
            if obj.has_state:
                stack.append(obj.state)
        elif isinstance(obj, dict):
            stack += list(obj.keys()) + list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack += list(obj)
        elif isinstance(obj, frozenset):
            raise AssertionError(f"{path}: sanitize left a frozenset in the tree")


def _sanitize_files(ckpt: Checkpoint, s: _Sanitizer, roots: dict[str, Any]) -> None:
    """Each torch.save file's tree sanitized into ``roots`` (other files kept as they are)."""
    for f in ckpt.files:
        tree = ckpt.roots[f.name]
        if f.format not in ("torch-zip", "torch-legacy"):
            roots[f.name] = tree
            continue
        base = join("", f.name) if ckpt.is_folder else ""
        new = s.value(tree, base)
        if new is _DROP:
            raise EditError("the whole file is a value no rule maps; it cannot be dropped",
                            path=f.path)
        roots[f.name] = new


def sanitize(ckpt: Checkpoint, keep_unknown: str = "error") -> Plan:
    """Rewrite every value ``torch.load(weights_only=True)`` refuses into a plain one.

    Args:
        ckpt: the checkpoint (opened with :func:`ckpttool.open_for_edit`, which refuses an
            unsafe one); not changed.
        keep_unknown: what to do with values no rule maps: ``"error"`` (raise
            :class:`EditError` naming each), ``"string"`` (a description string) or
            ``"drop"`` (removed from its container).

    Returns:
        The plan; its ``changes`` are :class:`Rewrite` records (pointer in the result, before,
        after, kind), one per value changed, outer values before the values inside them.
    """
    if keep_unknown not in KEEP_UNKNOWN:
        raise EditError(f"--keep-unknown takes error, string or drop, not {keep_unknown!r}")
    refuse_torchscript(ckpt, "sanitize")
    if ckpt.kind == "dcp":
        raise EditError("a torch.distributed.checkpoint folder is loaded by dcp.load, not by "
                        "torch.load; sanitize rewrites torch.save files", path=ckpt.path,
                        hint="`ckpttool to-file` it and sanitize the file")
    if ckpt.unsafe:
        from ..errors import UnsafeCheckpointError
        raise UnsafeCheckpointError("refusing to sanitize: " + ckpt.safety.headline()
                                    + ". Nothing was written.", path=ckpt.path)
    s = _Sanitizer(ckpt, keep_unknown)
    roots: dict[str, Any] = {}
    # the walk recurses ~3 frames per level; the unpickler allows 400 levels of nesting
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4000))
    try:
        _sanitize_files(ckpt, s, roots)
    finally:
        sys.setrecursionlimit(limit)
    if s.unknown and keep_unknown == "error":
        listed = "; ".join(f"{p or '/'}: {d}" for p, d in s.unknown[:8])
        more = f" and {len(s.unknown) - 8} more" if len(s.unknown) > 8 else ""
        many = len(s.unknown) != 1
        raise EditError(f"{len(s.unknown)} value{'s' if many else ''} "
                        f"{'have' if many else 'has'} no plain equivalent sanitize knows: "
                        f"{listed}{more}",
                        path=ckpt.path,
                        hint="pass --keep-unknown string to write a description of each, or "
                             "--keep-unknown drop to remove them (both listed)")
    for name, tree in roots.items():
        _check_clean(tree, name)
    # a pickle torch's weights-only unpickler cannot read for its opcodes alone (protocol 4:
    # FRAME, MEMOIZE, SHORT_BINUNICODE, ...): written again in protocol 2
    reprotocol = [f for f in ckpt.files
                  if f.format in ("torch-zip", "torch-legacy") and f.safety.opcodes]
    for f in reprotocol:
        if roots[f.name] is ckpt.roots[f.name]:  # nothing else changed: a new tree all the same
            tree = roots[f.name]
            roots[f.name] = tree.copy() if isinstance(tree, Reduce) else \
                type(tree)(tree) if isinstance(tree, (dict, list)) else tree
        s.changes.append(Rewrite(join("", f.name) if ckpt.is_folder else "",
                                 "a pickle with opcodes " + ", ".join(f.safety.opcodes),
                                 "a protocol 2 pickle", "pickle-protocol"))
    if ckpt.is_folder:
        result = ckpt.derive(roots) if any(roots[n] is not ckpt.roots[n] for n in roots) \
            else ckpt
    else:
        only = ckpt.files[0].name
        result = ckpt.derive(roots[only]) if roots[only] is not ckpt.roots[only] else ckpt
    for f in reprotocol:
        result.protocols[f.name] = 2
    n = len(s.changes)
    kinds: dict[str, int] = {}
    for c in s.changes:
        kinds[c.kind] = kinds.get(c.kind, 0) + 1
    what = ", ".join(f"{k} {v}" for k, v in kinds.items())
    files = [f.name for f in ckpt.files if f.name in result.touched] if result is not ckpt \
        else []
    where = f" in {', '.join(files)}" if ckpt.is_folder and files else ""
    summary = (f"sanitize: {n} value{'' if n == 1 else 's'} made plain{where} ({what}); "
               "torch.load(weights_only=True) loads the result" if n else
               "sanitize: nothing to change; torch.load(weights_only=True) already loads it")
    plan = Plan(ckpt, result, "sanitize", list(s.changes), summary)
    return plan


__all__ = ["KEEP_UNKNOWN", "Rewrite", "describe", "sanitize"]
