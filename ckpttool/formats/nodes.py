"""The values a checkpoint tree holds besides plain Python containers and scalars.

The restricted unpickler (:mod:`ckpttool.formats.unpickler`) never imports or calls anything
named in a pickle. A global becomes a :class:`Global`; a call of it becomes a :class:`Reduce`
(kept with its exact arguments so :mod:`ckpttool.formats.pickler` can write it back unchanged);
a tensor becomes a :class:`TensorRef` that knows shape, dtype, storage and location but not
its bytes; a storage becomes a :class:`Storage` keyed like the archive's ``data/<key>`` record.
"""

from __future__ import annotations

import math
from typing import Any

# element size in bytes of torch dtypes, by the name torch pickles them under
DTYPE_ITEMSIZE: dict[str, int] = {
    "float32": 4, "float64": 8, "float16": 2, "bfloat16": 2,
    "complex32": 4, "complex64": 8, "complex128": 16,
    "int8": 1, "int16": 2, "int32": 4, "int64": 8,
    "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8, "bool": 1,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1, "quint2x4": 1,
    "bits1x8": 1, "bits2x4": 1, "bits4x2": 1, "bits8": 1, "bits16": 2,
    **{f"int{i}": 1 for i in range(1, 8)}, **{f"uint{i}": 1 for i in range(1, 8)},
}

# legacy typed storage classes (``torch FloatStorage``) and the dtype they hold
STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "QInt8Storage": "qint8", "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32", "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
}

TENSOR_REBUILDERS = frozenset({
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
})
# ``_rebuild_parameter(data, requires_grad, backward_hooks)``, ``_rebuild_parameter_with_state(
# data, requires_grad, backward_hooks, state)`` and, as torch 0.4 pickled it, ``Parameter(data,
# requires_grad)`` (REDUCE or NEWOBJ): a Parameter around the tensor node ``data``
PARAMETER_REBUILDERS = frozenset({
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "torch.nn.parameter.Parameter",
})
# ``_rebuild_from_type_v2(func, new_type, args, state)``: a tensor subclass or a tensor with
# Python attributes (FSDP1 full state dicts: ``_has_been_cloned``), rebuilt by ``func(*args)``
FROM_TYPE_REBUILDERS = frozenset({"torch._tensor._rebuild_from_type_v2"})
def fields(node: Any) -> dict[str, Any]:
    """The attributes a pickled object (a dataclass, a ``__dict__``) is rebuilt with: its BUILD
    state, whether a dict or ``(dict or None, slots dict)``; ``{}`` for anything else."""
    st = node.state if isinstance(node, Reduce) and node.has_state else None
    if isinstance(st, dict):
        return st
    if isinstance(st, tuple) and len(st) == 2:
        out: dict[str, Any] = {}
        for part in st:
            if isinstance(part, dict):
                out.update(part)
        return out
    return {}


def as_shape(v: Any) -> tuple[int, ...] | None:
    """A shape given as a tuple of ints or a pickled ``torch.Size((...))``, else None."""
    if isinstance(v, Reduce) and v.args and isinstance(v.args[0], (tuple, list)):
        v = v.args[0]
    if isinstance(v, (tuple, list)) and all(type(x) is int for x in v):
        return tuple(v)
    return None


# a DTensor: ``_rebuild_from_type_v2(_rebuild_wrapper_subclass, DTensor, (DTensor, dtype,
# global size, global stride, offset, layout, device, requires_grad), (None, {"_local_tensor":
# <this rank's shard>, "_spec": DTensorSpec(mesh, placements, tensor_meta)}))``
WRAPPER_SUBCLASS = "torch._utils._rebuild_wrapper_subclass"


def dtensor_local(args: tuple[Any, ...]) -> TensorRef | None:
    """The local shard of a DTensor's ``_rebuild_from_type_v2`` args, or None."""
    if len(args) >= 4 and isinstance(args[0], Global) and args[0].qualname == WRAPPER_SUBCLASS \
            and isinstance(args[3], tuple) and len(args[3]) == 2 and isinstance(args[3][1], dict):
        t = args[3][1].get("_local_tensor")
        return t if isinstance(t, TensorRef) else None
    return None


class Global:
    """A ``module.name`` referenced by a pickle. Never imported; ``safety`` classifies it."""

    __slots__ = ("module", "name", "safety", "qualname")

    def __init__(self, module: str, name: str, safety: str) -> None:
        self.module = module
        self.name = name
        self.safety = safety  # "allowed" (torch weights_only list), "opaque" or "dangerous"
        self.qualname = f"{module}.{name}"

    def __repr__(self) -> str:
        return f"<global {self.qualname}>"


class Reduce:
    """A recorded call ``func(*args)`` (REDUCE, NEWOBJ, INST/OBJ) plus BUILD state and items.

    It is data only: ``func`` is a :class:`Global` (or another node) and is never called.
    """

    __slots__ = ("func", "args", "kwargs", "kind", "state", "items", "dictitems")

    NO_STATE: Any = object()

    def __init__(self, func: Any, args: tuple[Any, ...], kind: str = "reduce",
                 kwargs: dict[str, Any] | None = None) -> None:
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.kind = kind  # "reduce", "newobj" or "newobj_ex"
        self.state: Any = Reduce.NO_STATE
        # APPEND(S) and SETITEM(S) on the object: a shared empty tuple until the first one
        # (most nodes have none; two empty lists per tensor cost ~112 bytes)
        self.items: list[Any] | tuple[()] = ()
        self.dictitems: list[tuple[Any, Any]] | tuple[()] = ()

    @property
    def qualname(self) -> str:
        return self.func.qualname if isinstance(self.func, Global) else "<call>"

    def copy(self) -> Reduce:
        """A shallow copy (same func, args, state; own lists of items and dictitems)."""
        new = object.__new__(type(self))
        for cls in type(self).__mro__:
            for slot in getattr(cls, "__slots__", ()):
                setattr(new, slot, getattr(self, slot))
        new.items = list(self.items) if self.items else ()
        new.dictitems = list(self.dictitems) if self.dictitems else ()
        return new

    @property
    def has_state(self) -> bool:
        return self.state is not Reduce.NO_STATE

    def __repr__(self) -> str:
        return f"<{self.qualname}(...)>"


class Storage:
    """A storage named by a persistent id ``("storage", type, key, location, numel[, view])``.

    ``pid`` keeps the tuple's elements as read, so writing it back reproduces the pickle.
    ``record`` is filled by the archive reader: where the bytes lie (or ``None`` if absent).
    ``content`` describes the bytes of a storage an edit made (see :mod:`ckpttool.newtensors`);
    the writer streams it. A storage has a record or a content, never both.
    """

    __slots__ = ("pid", "record", "content")

    def __init__(self, pid: tuple[Any, ...], record: Any = None, content: Any = None) -> None:
        self.pid = pid
        self.record: Any = record
        self.content: Any = content

    def retagged(self, location: str) -> Storage:
        """The same bytes under another device tag (a new storage node)."""
        return Storage(self.with_location(location), self.record, self.content)

    @property
    def storage_type(self) -> Any:
        return self.pid[1]

    @property
    def key(self) -> str:
        return str(self.pid[2])

    @property
    def location(self) -> str:
        return str(self.pid[3])

    @property
    def numel(self) -> int:
        return int(self.pid[4])

    @property
    def typed_dtype(self) -> str | None:
        """The dtype of a legacy typed storage (FloatStorage...), None for UntypedStorage."""
        t = self.storage_type
        return STORAGE_DTYPES.get(t.name) if isinstance(t, Global) else None

    @property
    def nbytes(self) -> int:
        dt = self.typed_dtype
        return self.numel * DTYPE_ITEMSIZE.get(dt, 1) if dt else self.numel

    def with_location(self, location: str) -> tuple[Any, ...]:
        return (self.pid[0], self.pid[1], self.pid[2], location, *self.pid[4:])

    def __repr__(self) -> str:
        return f"<storage {self.key} {self.location} numel={self.numel}>"


class TensorRef(Reduce):
    """A tensor rebuilt by ``torch._utils._rebuild_tensor_v2/v3`` (or a Parameter around one).

    Only metadata: shape, stride, offset, dtype, storage. ``value`` holds the element values of
    0-d and tiny tensors when the reader read them (``step`` and friends), else ``None``.
    """

    __slots__ = ("value", "plain")

    def __init__(self, func: Any, args: tuple[Any, ...], kind: str = "reduce") -> None:
        super().__init__(func, args, kind)
        self.value: Any = None
        # a plain tensor rebuild (not a Parameter or subclass wrapper): the common case, whose
        # metadata is read straight from its own args
        self.plain = isinstance(func, Global) and func.qualname in TENSOR_REBUILDERS

    @property
    def is_parameter(self) -> bool:
        return not self.plain and self.qualname in PARAMETER_REBUILDERS

    @property
    def is_wrapper(self) -> bool:
        """A Parameter or subclass around another tensor node (not a plain tensor)."""
        return self.qualname in PARAMETER_REBUILDERS or self.qualname in FROM_TYPE_REBUILDERS

    @property
    def base(self) -> TensorRef:
        """The plain tensor (a Parameter's data, the tensor a subclass is rebuilt from)."""
        if self.plain:
            return self
        if self.is_parameter:
            inner = self.args[0]
            if isinstance(inner, TensorRef):
                return inner.base
        elif self.qualname in FROM_TYPE_REBUILDERS and dtensor_local(self.args) is not None:
            return dtensor_local(self.args).base  # type: ignore[union-attr]
        elif self.qualname in FROM_TYPE_REBUILDERS and len(self.args) > 2 \
                and isinstance(self.args[0], Global) and isinstance(self.args[2], tuple):
            if self.args[0].qualname in TENSOR_REBUILDERS:
                return TensorRef(self.args[0], self.args[2])  # a view of the same args
            inner = self.args[2][0] if self.args[2] else None
            if isinstance(inner, TensorRef):
                return inner.base
        return self

    @property
    def storage(self) -> Storage | None:
        args = self.args if self.plain else self.base.args
        s = args[0] if args else None
        return s if isinstance(s, Storage) else None

    @property
    def offset(self) -> int:
        return int((self.args if self.plain else self.base.args)[1])

    @property
    def is_dtensor(self) -> bool:
        return not self.plain and self.qualname in FROM_TYPE_REBUILDERS \
            and dtensor_local(self.args) is not None

    @property
    def dtensor(self) -> dict[str, Any] | None:
        """For a DTensor: its global and local shapes, placements and mesh shape."""
        if not self.is_dtensor:
            return None
        st = fields(self.args[3][1].get("_spec"))
        placements = []
        for p in st.get("placements") or ():
            if isinstance(p, Reduce):
                dim = fields(p).get("dim", p.args[0] if p.args else None)
                name = p.qualname.rsplit(".", 1)[-1]
                placements.append(f"{name}({dim})" if dim is not None else f"{name}()")
            else:
                placements.append(str(p))
        return {"global_shape": list(self.shape), "local_shape": list(self.base.shape),
                "placements": placements,
                "mesh_device": str(fields(st.get("mesh")).get("_device_type", "?"))}

    @property
    def shape(self) -> tuple[int, ...]:
        if not self.plain and self.is_dtensor:  # the global shape
            size = self.args[2][2] if len(self.args[2]) > 2 else ()
            return tuple(int(x) for x in size) if isinstance(size, (tuple, list)) else ()
        size = (self.args if self.plain else self.base.args)[2]
        if isinstance(size, Reduce):  # torch.Size((...))
            size = size.args[0] if size.args else ()
        return tuple(int(x) for x in size)

    @property
    def stride(self) -> tuple[int, ...]:
        st = (self.args if self.plain else self.base.args)[3]
        return tuple(int(x) for x in st) if isinstance(st, (tuple, list)) else ()

    @property
    def requires_grad(self) -> bool:
        b = self.base
        if self.is_parameter and len(self.args) > 1:
            return bool(self.args[1])
        return bool(b.args[4]) if len(b.args) > 4 else False

    @property
    def dtype(self) -> str:
        b = self if self.plain else self.base
        if len(b.args) > 6 and b.qualname == "torch._utils._rebuild_tensor_v3":
            dt = b.args[6]
            return dt.name if isinstance(dt, Global) else str(dt)
        s = self.storage
        return (s.typed_dtype if s else None) or "unknown"

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE.get(self.dtype, 1)

    @property
    def device(self) -> str:
        s = self.storage
        return s.location if s else "unknown"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def __repr__(self) -> str:
        return f"<tensor {self.dtype}{list(self.shape)} {self.device}>"

