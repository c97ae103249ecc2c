"""A restricted pickle interpreter: the only code in ckpttool that reads pickle opcodes.

It executes no code from the pickle. Globals become :class:`~.nodes.Global` records; calls
become :class:`~.nodes.Reduce` records (or :class:`~.nodes.TensorRef` for torch's tensor
rebuild functions); persistent ids become :class:`~.nodes.Storage`. Every lookup and call that
loading would perform is judged as it is read (:mod:`.safety`), so the verdict (``safety`` of
the result) is known even when the pickle breaks later: a :class:`PickleError` carries the
verdict reached before the break. A few
calls of harmless builtins (``OrderedDict()``, ``set([...])``, ``_codecs.encode(s, "latin1")``,
``bytes()``, ``complex(a, b)``) are evaluated by this module's own code so the tree holds the
usual Python values; one that would fail (a string that is not Latin-1, an int too large for a
float) stays a recorded call, as torch.load would fail on it. Every opcode of protocols 0-5 is
understood except out-of-band buffers, which are refused; the extension registry (``EXT``) and
``STACK_GLOBAL`` operands computed at load time are read as unsafe lookups. Bounds:
the input size, the stack, and (checked by :func:`check_shape`) the nesting depth and the size
of the tree once shared references expand. Malformed input raises :class:`PickleError`, never
another exception.
"""

from __future__ import annotations

import codecs
import collections
import struct
import warnings
from typing import Any, Callable

from ..errors import PickleError
from .nodes import (FROM_TYPE_REBUILDERS, PARAMETER_REBUILDERS, TENSOR_REBUILDERS, Global, Reduce,
                    Storage, TensorRef, dtensor_local)
from .safety import (ALLOWED, GETATTR, KNOWN_DATA, NEEDS_TRUST, RECONSTRUCTORS, UNSAFE,
                     WEIGHTS_ONLY, Call, Safety, judge_global, normalize, summarize)

_NODE_SAFETY = {WEIGHTS_ONLY: "allowed", NEEDS_TRUST: "opaque", UNSAFE: "dangerous"}

MAX_STACK = 1_000_000
MAX_DEPTH = 400
MAX_EXPANDED = 20_000_000
MAX_HASH_WORK = 1_000_000  # tuple elements hashed as dict keys / set members, per pickle


class PickleTruncated(PickleError):
    """The pickle runs past the end of the bytes given (a longer prefix may parse)."""


class _Mark:
    __slots__ = ()


MARK = _Mark()


class Unpickled:
    """The result of reading one pickle: the root object plus what it referenced."""

    def __init__(self, root: Any, end: int, globals_: dict[str, Global],
                 storages: dict[str, Storage], tensors: list[TensorRef],
                 safety: Safety | None = None) -> None:
        self.root = root
        self.safety = safety or Safety()  # what torch.load of this pickle would run
        self.tensors = tensors  # every tensor node, in pickle order
        self.end = end  # offset just past STOP
        self.globals = globals_  # qualname -> Global (first one met)
        self.storages = storages  # key -> Storage, in the order met
        # offset of the first Python 2 string that is not UTF-8 (read as Latin-1), or None
        self.latin1_at: int | None = None


def _evaluate_builtin(func: Global, args: tuple[Any, ...],
                      check_hashable: Callable[[Any], None]) -> Any:
    """Our own implementation of a few harmless constructors, or NotImplemented."""
    q = func.qualname.replace("__builtin__.", "builtins.")
    if q == "collections.OrderedDict" and args == ():
        return collections.OrderedDict()
    if q == "collections.OrderedDict" and len(args) == 1 and _pairs(args[0]):
        # Python 2 pickled an OrderedDict as one call on its items: a list of [key, value]
        # lists (or a tuple of (key, value) tuples); torch's weights_only loader calls it too
        keys = [p[0] for p in args[0]]
        check_hashable(keys)
        try:
            return collections.OrderedDict((p[0], p[1]) for p in args[0])
        except TypeError:  # an unhashable key: keep the call as recorded
            return NotImplemented
    if q == "collections.Counter" and (args == () or (len(args) == 1 and isinstance(args[0], dict))):
        return collections.Counter(*args)
    if q == "_codecs.encode" and len(args) == 2 and isinstance(args[0], str) \
            and args[1] in ("latin1", "latin-1"):
        try:
            return args[0].encode("latin-1")
        except UnicodeEncodeError:  # torch.load fails on it too: keep the call as recorded
            return NotImplemented
    if q == "builtins.bytes" and args == ():
        return b""
    if q in ("builtins.set", "builtins.frozenset") and len(args) == 1 \
            and isinstance(args[0], list):
        check_hashable(args[0])
        try:
            return set(args[0]) if q == "builtins.set" else frozenset(args[0])
        except TypeError:  # unhashable members: keep the call as recorded
            return NotImplemented
    if q == "builtins.set" and args == ():
        return set()
    if q == "builtins.complex" and len(args) == 2 \
            and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        try:
            return complex(args[0], args[1])
        except OverflowError:  # an int too large for a float: keep the call as recorded
            return NotImplemented
    if q == "builtins.bytearray" and len(args) == 1 and isinstance(args[0], bytes):
        return bytearray(args[0])
    return NotImplemented


def _pairs(items: Any) -> bool:
    """A list or tuple of 2-item lists or tuples (``dict(items)`` would take it)."""
    return isinstance(items, (list, tuple)) and all(
        type(p) in (list, tuple) and len(p) == 2 for p in items)


def _known_attribute(args: tuple[Any, ...]) -> str | None:
    """``getattr(Class, name)`` naming a known data constructor (Python pickles a classmethod
    as getattr then call: ``zoneinfo.ZoneInfo._unpickle``): its qualified name, else None."""
    if len(args) == 2 and isinstance(args[0], Global) and isinstance(args[1], str):
        mod, name = normalize(args[0].module, args[0].name)
        q = f"{mod}.{name}.{args[1]}"
        return q if q in KNOWN_DATA else None
    return None


def _benign_getattr(args: tuple[Any, ...]) -> bool:
    """``getattr(Class, "public_name")`` on a class that is not dangerous itself: mmengine's
    message hub pickles statistics methods as ``getattr(HistoryBuffer, "min")``. Loading
    fetches the attribute and stores it; calling the result is judged where it happens."""
    if _known_attribute(args) is not None:
        return True
    return (len(args) == 2 and isinstance(args[0], Global) and args[0].safety != "dangerous"
            and args[0].name[:1].isupper() and isinstance(args[1], str)
            and args[1].isidentifier() and not args[1].startswith("_"))


def _wraps_tensor(args: tuple[Any, ...]) -> bool:
    """``_rebuild_from_type_v2`` args that rebuild a tensor from a storage (or wrap one)."""
    if len(args) < 3 or not isinstance(args[0], Global) or not isinstance(args[2], tuple):
        return False
    inner = args[2]
    if args[0].qualname in TENSOR_REBUILDERS:
        return len(inner) >= 4 and isinstance(inner[0], Storage)
    if dtensor_local(args) is not None:  # a DTensor around its local shard
        return True
    return bool(inner) and isinstance(inner[0], TensorRef)


class _Reader:
    def __init__(self, data: bytes | memoryview, pos: int) -> None:
        self.raw = data if isinstance(data, bytes) else bytes(data)  # for bytes.find
        self.data = memoryview(self.raw)
        self.pos = pos
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.globals: dict[str, Global] = {}
        self.global_nodes: dict[tuple[str, str], Global] = {}
        self.storages: dict[str, Storage] = {}
        self.tensors: list[TensorRef] = []
        self.hash_work = MAX_HASH_WORK
        # the verdict so far: calls and lookups that are not weights-only, deduplicated by
        # (global, level, why); and each global's level as a mere lookup
        self.calls: dict[tuple[str, str, str], Call] = {}
        self.unplaced: list[Call] = []  # new records of the call being read, without a node
        self.value_levels: dict[tuple[str, str], tuple[str, str]] = {}
        self.latin1_at: int | None = None  # the first Python 2 string that is not UTF-8
        self.foreign_ops: set[int] = set()  # opcodes torch's weights-only unpickler refuses

    # -- helpers ---------------------------------------------------------------------------
    def fail(self, what: str) -> PickleError:
        return PickleError(f"malformed pickle at byte {self.pos}: {what}")

    def truncated(self, what: str) -> PickleError:
        return PickleTruncated(f"malformed pickle at byte {self.pos}: {what}")

    def read(self, n: int) -> memoryview:
        if n < 0:
            raise self.fail(f"negative length {n}")
        if self.pos + n > len(self.data):
            raise self.truncated(f"needs {n} more bytes but the pickle ends "
                                 "(truncated or corrupt)")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def readline(self) -> bytes:
        raw = self.raw
        end = raw.find(b"\n", self.pos, self.pos + 65536)
        if end < 0:
            if len(raw) - self.pos < 65536:
                raise self.truncated("line opcode without newline")
            raise self.fail("line opcode without newline")
        line = raw[self.pos:end]
        self.pos = end + 1
        return line

    def push(self, obj: Any) -> None:
        if len(self.stack) >= MAX_STACK:
            raise self.fail("stack too deep")
        self.stack.append(obj)

    def pop(self) -> Any:
        if not self.stack:
            raise self.fail("stack underflow")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            raise self.fail("stack underflow")
        return self.stack[-1]

    def check_hashable(self, items: Any) -> None:
        """Refuse tuples whose hashing would recurse too deep in C (a crash) or, through
        shared parts, cost more than the budget (exponential time). Strings, numbers and
        frozensets (their hash is cached) are cheap; only tuples are walked."""
        todo = [(x, 0) for x in items if type(x) is tuple]
        while todo:
            t, depth = todo.pop()
            self.hash_work -= 1 + len(t)
            if self.hash_work < 0:
                raise self.fail("dict keys / set members too costly to hash (a hash bomb?)")
            if depth >= MAX_DEPTH:
                raise self.fail(f"dict key / set member nests deeper than {MAX_DEPTH} levels")
            todo.extend([(x, depth + 1) for x in t if type(x) is tuple])

    def pop_mark(self) -> list[Any]:
        if not self.metastack:
            raise self.fail("no MARK on the stack")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def record(self, global_: str, args: Any, level: str, why: str, node: Any = None) -> None:
        if level == WEIGHTS_ONLY:
            return
        key = (global_, level, why)
        c = self.calls.get(key)
        if c is None:
            c = self.calls[key] = Call(global_, summarize(args), level, why,
                                       max(self.pos - 1, 0), node=node)
            if node is None:  # the call being read: call() gives it the node it builds
                self.unplaced.append(c)
        else:
            c.count += 1

    def make_global(self, module: Any, name: Any) -> Global:
        if not isinstance(module, str) or not isinstance(name, str):
            # STACK_GLOBAL whose operands another call computed: the name is chosen at load time
            by = ", ".join(dict.fromkeys(x.qualname for x in (module, name)
                                         if isinstance(x, Reduce))) or "non-strings"
            self.record(f"<STACK_GLOBAL computed by {by}>", (module, name), UNSAFE,
                        "STACK_GLOBAL operands computed at load time: the global is chosen "
                        "when the file is loaded")
            return Global("<computed>", "<computed>", "dangerous")
        key = (module, name)
        judged = self.value_levels.get(key)
        if judged is None:
            judged = self.value_levels[key] = judge_global(module, name)
        g = self.global_nodes.get(key)
        if g is None:
            g = Global(module, name, _NODE_SAFETY[judged[0]])
            self.global_nodes[key] = g
            self.globals.setdefault(g.qualname, g)
        # A fresh node per opcode keeps the pickle's object identity (memo) exact on rewrite.
        return Global(module, name, g.safety)

    def judge_call(self, func: Any, args: tuple[Any, ...], kind: str, node: Any) -> None:
        """Judge calling ``func(*args)`` (``kind`` as in :class:`Reduce`)."""
        if isinstance(func, Global) and func.qualname in ALLOWED:
            func.safety = "allowed"
            return
        if not isinstance(func, (Global, Reduce, TensorRef, Storage)):
            return  # calling a constant (a str, a number, a container) only fails
        if isinstance(func, Reduce) and isinstance(func.func, Global) \
                and normalize(func.func.module, func.func.name) == ("builtins", "getattr"):
            known = _known_attribute(func.args)
            if known is not None:  # a classmethod of a known data class, called
                self.record(known, args, NEEDS_TRUST,
                            "a known data constructor outside torch's weights_only list", node)
                return
        if not isinstance(func, Global):
            inner = func.qualname if isinstance(func, Reduce) else type(func).__name__
            self.record(f"<result of {inner}>", args, UNSAFE,
                        f"calls a callable computed at load time (the result of {inner})", node)
            return
        mod, name = normalize(func.module, func.name)
        q = f"{mod}.{name}"
        if q in GETATTR:
            known = _known_attribute(args) if kind == "reduce" else None
            if known is not None:
                level, why = NEEDS_TRUST, f"fetches {known}, a known data constructor"
            elif kind == "reduce" and _benign_getattr(args):
                level, why = NEEDS_TRUST, f"fetches {args[0].qualname}.{args[1]} (not called)"
            else:
                level, why = UNSAFE, "getattr on a module, an object or a private name " \
                    "resolves code at load time"
            self.record(func.qualname, args, level, why, node)
            self.set_safety(func, level)
            return
        if q in RECONSTRUCTORS and kind == "reduce":
            self.set_safety(func, NEEDS_TRUST)
            if not args:
                return
            base = args[1] if q == "copyreg._reconstructor" and len(args) > 1 else None
            plain = base is None or (isinstance(base, Global)
                                     and normalize(base.module, base.name) == ("builtins",
                                                                               "object"))
            self.judge_call(args[0], tuple(args[2:3]) if base is not None else tuple(args[1:]),
                            "newobj" if plain else "reduce", node)
            if not plain:
                self.judge_call(base, tuple(args[2:3]), "reduce", node)
            return
        level, why = judge_global(func.module, func.name,
                                  "new" if kind.startswith("newobj") else "init", args)
        self.set_safety(func, level)
        self.record(func.qualname, args, level, why, node)

    def set_safety(self, g: Global, level: str) -> None:
        g.safety = _NODE_SAFETY[level]
        if level == UNSAFE:  # the file-level record of the global shows the worst use
            first = self.globals.get(g.qualname)
            if first is not None and first.safety != "dangerous":
                self.globals[g.qualname] = Global(g.module, g.name, "dangerous")

    def call(self, func: Any, args: Any, kind: str) -> Any:
        if not isinstance(args, tuple):
            raise self.fail("call arguments are not a tuple")
        self.unplaced.clear()  # records of lookups read before this call stay at their offset
        self.judge_call(func, args, kind, None)
        node = self.build(func, args, kind)
        for c in self.unplaced:  # the first call of each kind: found in the tree later
            c.node = node
        self.unplaced.clear()
        return node

    def build(self, func: Any, args: tuple[Any, ...], kind: str) -> Any:
        """What the call leaves in the tree: a value our own code evaluated, a tensor, or a
        recorded call."""
        if isinstance(func, Global):
            if kind == "reduce" and func.safety != "dangerous":
                value = _evaluate_builtin(func, args, self.check_hashable)
                if value is not NotImplemented:
                    return value
            if func.qualname in TENSOR_REBUILDERS \
                    or (func.qualname in PARAMETER_REBUILDERS and args
                        and isinstance(args[0], TensorRef)) \
                    or (func.qualname in FROM_TYPE_REBUILDERS and _wraps_tensor(args)):
                t = TensorRef(func, args, kind)
                if func.qualname in TENSOR_REBUILDERS:
                    self.check_tensor(t)
                elif func.qualname in FROM_TYPE_REBUILDERS and t.base is not t \
                        and not isinstance(args[2][0], TensorRef):
                    self.check_tensor(t.base)
                self.tensors.append(t)
                return t
        return Reduce(func, args, kind)

    def safety(self) -> Safety:
        """The verdict on everything read so far: the calls, then the globals that were only
        looked up (never called)."""
        out = Safety()
        out.calls.extend(self.calls.values())
        called = {c.global_ for c in self.calls.values()}
        for (module, name), (level, why) in self.value_levels.items():
            if level != WEIGHTS_ONLY and f"{module}.{name}" not in called:
                out.calls.append(Call(f"{module}.{name}", "", level, why))
        out.calls.sort(key=lambda c: c.level != UNSAFE)
        for c in out.calls:
            out.add_reason(c.level, f"{c.global_}: {c.why}")
        if self.foreign_ops:
            out.opcodes = sorted(_opname(o) for o in self.foreign_ops)
            names = ", ".join(out.opcodes)
            out.add_reason(NEEDS_TRUST, f"the pickle uses opcodes torch.load(weights_only=True) "
                                        f"does not read ({names})")
        return out

    def check_tensor(self, t: TensorRef) -> None:
        """Refuse a tensor whose metadata torch would refuse: later code trusts it."""
        a = t.args
        if len(a) < 4 or not isinstance(a[0], Storage) or type(a[1]) is not int or a[1] < 0:
            raise self.fail("malformed tensor (expected storage, offset, size, stride)")
        size = a[2].args[0] if isinstance(a[2], Reduce) and a[2].args else a[2]
        stride = a[3]
        if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)) \
                or len(size) != len(stride) \
                or not all(type(x) is int and x >= 0 for x in size) \
                or not all(type(x) is int and x >= 0 for x in stride):
            raise self.fail("malformed tensor size or stride")
        if 0 not in size:
            last = a[1] + sum((d - 1) * s for d, s in zip(size, stride))
            if (last + 1) * t.itemsize > a[0].nbytes:
                raise self.fail(f"tensor of size {list(size)} runs past its storage "
                                f"{a[0].key} ({a[0].nbytes} bytes)")

    def persistent(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise self.fail(f"unsupported persistent id {type(pid).__name__}")
        if pid[4] < 0:
            raise self.fail("negative storage size")
        st = self.storages.get(pid[2])
        if st is None:
            st = Storage(pid)
            self.storages[pid[2]] = st
        return st

    # -- the loop --------------------------------------------------------------------------
    def load(self) -> Any:
        """The opcode loop. The commonest opcodes of torch.save output (memo puts and gets,
        small ints, short strings, MARK, tuples, booleans, None) are handled inline on local
        variables; the rest through their handlers. The stack bound is checked every 1024
        opcodes (an opcode pushes at most one item)."""
        dispatch = _DISPATCH
        data = self.data
        raw = self.raw
        memo = self.memo
        n = len(data)
        pos = self.pos
        stack = self.stack
        count = 0
        u32 = _u32
        short_unicode = False
        while True:
            if pos >= n:
                self.pos = pos
                raise self.truncated("pickle ends without STOP (truncated)")
            op = data[pos]
            pos += 1
            count += 1
            if not count & 1023 and len(stack) >= MAX_STACK:
                self.pos = pos
                raise self.fail("stack too deep")
            if op == 0x71 or op == 0x72:  # BINPUT, LONG_BINPUT
                k = 1 if op == 0x71 else 4
                if pos + k > n or not stack:
                    self.pos = pos
                    raise self.truncated("needs more bytes but the pickle ends (truncated or "
                                         "corrupt)") if pos + k > n else self.fail(
                        "stack underflow")
                memo[data[pos] if k == 1 else u32(data, pos)[0]] = stack[-1]
                pos += k
            elif op == 0x68 or op == 0x6A:  # BINGET, LONG_BINGET
                k = 1 if op == 0x68 else 4
                if pos + k > n:
                    self.pos = pos
                    raise self.truncated("needs more bytes but the pickle ends (truncated or "
                                         "corrupt)")
                idx = data[pos] if k == 1 else u32(data, pos)[0]
                pos += k
                try:
                    stack.append(memo[idx])
                except KeyError:
                    self.pos = pos
                    raise self.fail(f"memo key {idx} not found") from None
            elif op == 0x4B:  # BININT1
                if pos >= n:
                    self.pos = pos
                    raise self.truncated("needs 1 more bytes but the pickle ends (truncated "
                                         "or corrupt)")
                stack.append(data[pos])
                pos += 1
            elif op == 0x8C:  # SHORT_BINUNICODE (protocol 4: not in torch's weights-only set)
                short_unicode = True
                if pos >= n or pos + 1 + data[pos] > n:
                    self.pos = pos
                    raise self.truncated("needs more bytes but the pickle ends (truncated or "
                                         "corrupt)")
                end = pos + 1 + data[pos]
                try:
                    stack.append(str(raw[pos + 1:end], "utf-8", "surrogatepass"))
                except UnicodeDecodeError:
                    self.pos = pos
                    raise self.fail("string is not UTF-8") from None
                pos = end
            elif op == 0x28:  # MARK
                if len(self.metastack) >= MAX_DEPTH * 4:
                    self.pos = pos
                    raise self.fail("too many nested MARKs")
                self.metastack.append(stack)
                stack = self.stack = []
            elif op == 0x29:  # EMPTY_TUPLE
                stack.append(())
            elif op == 0x85 or op == 0x86 or op == 0x87:  # TUPLE1-3
                k = op - 0x84
                if len(stack) < k:
                    self.pos = pos
                    raise self.fail("stack underflow")
                t = tuple(stack[-k:])
                del stack[-k:]
                stack.append(t)
            elif op == 0x89:  # NEWFALSE
                stack.append(False)
            elif op == 0x88:  # NEWTRUE
                stack.append(True)
            elif op == 0x4E:  # NONE
                stack.append(None)
            elif op == 0x2E:  # STOP
                self.pos = pos
                if short_unicode:
                    self.foreign_ops.add(0x8C)
                return self.pop()
            else:
                if op not in WEIGHTS_ONLY_OPCODES:
                    self.foreign_ops.add(op)
                handler = dispatch.get(op)
                if handler is None:
                    self.pos = pos - 1  # the error names the opcode's own offset
                    raise self.fail(f"unsupported opcode 0x{op:02x}")
                self.pos = pos
                handler(self)
                pos = self.pos
                stack = self.stack


# The opcodes torch's weights-only unpickler reads (torch/_weights_only_unpickler.py, load):
# any other one makes torch.load(weights_only=True) fail with "Unsupported operand", whatever
# the globals are.
WEIGHTS_ONLY_OPCODES = frozenset(
    b"c\x81Rbaesu(t\x85\x86\x87N\x89\x88)]}\x8fJKMGXUQhjqr\x8a\x80.")  # GLOBAL ... STOP


def _opname(op: int) -> str:
    import pickletools  # only to name an opcode in a verdict
    return next((o.name for o in pickletools.opcodes if ord(o.code) == op), f"0x{op:02x}")


def _op(code: bytes) -> Callable[[Callable[[_Reader], None]], Callable[[_Reader], None]]:
    def deco(f: Callable[[_Reader], None]) -> Callable[[_Reader], None]:
        _DISPATCH[code[0]] = f
        return f
    return deco


_DISPATCH: dict[int, Callable[[_Reader], None]] = {}
_u8 = struct.Struct("<B").unpack_from
_u16 = struct.Struct("<H").unpack_from
_i32 = struct.Struct("<i").unpack_from
_u32 = struct.Struct("<I").unpack_from
_u64 = struct.Struct("<Q").unpack_from
_f64 = struct.Struct(">d").unpack_from


@_op(b"\x80")
def _proto(r: _Reader) -> None:
    r.read(1)


@_op(b"\x95")
def _frame(r: _Reader) -> None:
    r.read(8)


@_op(b"K")
def _binint1(r: _Reader) -> None:
    r.push(r.read(1)[0])


@_op(b"M")
def _binint2(r: _Reader) -> None:
    r.push(_u16(r.read(2))[0])


@_op(b"J")
def _binint(r: _Reader) -> None:
    r.push(_i32(r.read(4))[0])


@_op(b"I")
def _int(r: _Reader) -> None:
    line = r.readline()
    if line == b"00":
        r.push(False)
    elif line == b"01":
        r.push(True)
    else:
        try:
            r.push(int(line))
        except ValueError:
            raise r.fail("bad INT") from None


@_op(b"L")
def _long(r: _Reader) -> None:
    line = r.readline().rstrip(b"L")
    if len(line) > 10000:
        raise r.fail("LONG too long")
    try:
        r.push(int(line))
    except ValueError:
        raise r.fail("bad LONG") from None


@_op(b"\x8a")
def _long1(r: _Reader) -> None:
    size = r.read(1)[0]
    r.push(int.from_bytes(r.read(size), "little", signed=True))


@_op(b"\x8b")
def _long4(r: _Reader) -> None:
    size = _i32(r.read(4))[0]
    if size > 100000:
        raise r.fail("LONG4 too long")
    r.push(int.from_bytes(r.read(size), "little", signed=True))


@_op(b"N")
def _none(r: _Reader) -> None:
    r.push(None)


@_op(b"\x88")
def _true(r: _Reader) -> None:
    r.push(True)


@_op(b"\x89")
def _false(r: _Reader) -> None:
    r.push(False)


@_op(b"F")
def _float(r: _Reader) -> None:
    try:
        r.push(float(r.readline()))
    except ValueError:
        raise r.fail("bad FLOAT") from None


@_op(b"G")
def _binfloat(r: _Reader) -> None:
    r.push(_f64(r.read(8))[0])


def _decode(r: _Reader, b: memoryview) -> str:
    try:
        return str(b, "utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise r.fail("string is not UTF-8") from None


@_op(b"X")
def _binunicode(r: _Reader) -> None:
    r.push(_decode(r, r.read(_u32(r.read(4))[0])))


@_op(b"\x8c")
def _short_binunicode(r: _Reader) -> None:
    r.push(_decode(r, r.read(r.read(1)[0])))


@_op(b"\x8d")
def _binunicode8(r: _Reader) -> None:
    r.push(_decode(r, r.read(_u64(r.read(8))[0])))


@_op(b"V")
def _unicode(r: _Reader) -> None:
    try:
        r.push(r.readline().decode("raw-unicode-escape"))
    except UnicodeDecodeError:
        raise r.fail("bad UNICODE escape") from None


def _py2_str(r: _Reader, b: bytes, at: int) -> str:
    """A Python 2 ``str`` as torch.load decodes it: ``encoding="utf-8"`` (its default, strict,
    in both its loaders). Bytes that are not UTF-8 (a Python 2 numpy scalar's or array's data,
    a Latin-1 name) make that fail; they are read as ``torch.load(..., encoding="latin1")``
    reads them, and the offset of the first one's opcode (``at``) is kept (``latin1_at``) so
    the file can say so."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        if r.latin1_at is None:
            r.latin1_at = at
        return b.decode("latin-1")


@_op(b"S")
def _string(r: _Reader) -> None:
    at = r.pos - 1
    line = r.readline()
    if len(line) < 2 or line[:1] != line[-1:] or line[:1] not in (b"'", b'"'):
        raise r.fail("bad STRING")
    try:
        with warnings.catch_warnings():
            # an unknown escape such as \q is kept as is (as pickle does), but Python warns
            warnings.simplefilter("ignore", DeprecationWarning)
            r.push(_py2_str(r, codecs.escape_decode(line[1:-1])[0], at))
    except ValueError:
        raise r.fail("bad STRING escape") from None


@_op(b"T")
def _binstring(r: _Reader) -> None:
    at = r.pos - 1
    size = _i32(r.read(4))[0]
    r.push(_py2_str(r, bytes(r.read(size)), at))


@_op(b"U")
def _short_binstring(r: _Reader) -> None:
    at = r.pos - 1
    r.push(_py2_str(r, bytes(r.read(r.read(1)[0])), at))


@_op(b"B")
def _binbytes(r: _Reader) -> None:
    r.push(bytes(r.read(_u32(r.read(4))[0])))


@_op(b"C")
def _short_binbytes(r: _Reader) -> None:
    r.push(bytes(r.read(r.read(1)[0])))


@_op(b"\x8e")
def _binbytes8(r: _Reader) -> None:
    r.push(bytes(r.read(_u64(r.read(8))[0])))


@_op(b"\x96")
def _bytearray8(r: _Reader) -> None:
    r.push(bytearray(r.read(_u64(r.read(8))[0])))


@_op(b")")
def _empty_tuple(r: _Reader) -> None:
    r.push(())


@_op(b"t")
def _tuple(r: _Reader) -> None:
    r.push(tuple(r.pop_mark()))


@_op(b"\x85")
def _tuple1(r: _Reader) -> None:
    r.push((r.pop(),))


@_op(b"\x86")
def _tuple2(r: _Reader) -> None:
    b = r.pop()
    a = r.pop()
    r.push((a, b))


@_op(b"\x87")
def _tuple3(r: _Reader) -> None:
    c = r.pop()
    b = r.pop()
    a = r.pop()
    r.push((a, b, c))


@_op(b"]")
def _empty_list(r: _Reader) -> None:
    r.push([])


@_op(b"l")
def _list(r: _Reader) -> None:
    r.push(list(r.pop_mark()))


@_op(b"}")
def _empty_dict(r: _Reader) -> None:
    r.push({})


@_op(b"d")
def _dict(r: _Reader) -> None:
    items = r.pop_mark()
    if len(items) % 2:
        raise r.fail("odd number of items for DICT")
    d: dict[Any, Any] = {}
    for i in range(0, len(items), 2):
        _setitem(r, d, items[i], items[i + 1])
    r.push(d)


@_op(b"\x8f")
def _empty_set(r: _Reader) -> None:
    r.push(set())


@_op(b"\x91")
def _frozenset(r: _Reader) -> None:
    items = r.pop_mark()
    r.check_hashable(items)
    try:
        r.push(frozenset(items))
    except TypeError:
        raise r.fail("unhashable frozenset member") from None


@_op(b"\x90")
def _additems(r: _Reader) -> None:
    items = r.pop_mark()
    s = r.top()
    if not isinstance(s, set):
        raise r.fail("ADDITEMS on a non-set")
    r.check_hashable(items)
    try:
        s.update(items)
    except TypeError:
        raise r.fail("unhashable set member") from None


def _append_to(r: _Reader, target: Any, items: list[Any]) -> None:
    if isinstance(target, list):
        target.extend(items)
    elif isinstance(target, Reduce):
        if not isinstance(target.items, list):
            target.items = []
        target.items.extend(items)
    else:
        raise r.fail(f"APPEND on a {type(target).__name__}")


@_op(b"a")
def _append(r: _Reader) -> None:
    v = r.pop()
    _append_to(r, r.top(), [v])


@_op(b"e")
def _appends(r: _Reader) -> None:
    items = r.pop_mark()
    _append_to(r, r.top(), items)


def _setitem(r: _Reader, target: Any, k: Any, v: Any) -> None:
    if isinstance(target, dict):
        if type(k) is tuple:
            r.check_hashable((k,))
        try:
            target[k] = v
        except TypeError:
            raise r.fail(f"unhashable dict key {type(k).__name__}") from None
    elif isinstance(target, Reduce):
        if not isinstance(target.dictitems, list):
            target.dictitems = []
        target.dictitems.append((k, v))
    else:
        raise r.fail(f"SETITEM on a {type(target).__name__}")


@_op(b"s")
def _setitem_op(r: _Reader) -> None:
    v = r.pop()
    k = r.pop()
    _setitem(r, r.top(), k, v)


@_op(b"u")
def _setitems(r: _Reader) -> None:
    items = r.pop_mark()
    if len(items) % 2:
        raise r.fail("odd number of items for SETITEMS")
    target = r.top()
    for i in range(0, len(items), 2):
        _setitem(r, target, items[i], items[i + 1])


@_op(b"(")
def _mark(r: _Reader) -> None:
    if len(r.metastack) >= MAX_DEPTH * 4:
        raise r.fail("too many nested MARKs")
    r.metastack.append(r.stack)
    r.stack = []


@_op(b"0")
def _pop(r: _Reader) -> None:
    if r.stack:
        r.stack.pop()
    else:
        r.pop_mark()


@_op(b"1")
def _pop_mark_op(r: _Reader) -> None:
    r.pop_mark()


@_op(b"2")
def _dup(r: _Reader) -> None:
    r.push(r.top())


def _get(r: _Reader, idx: int) -> None:
    try:
        r.push(r.memo[idx])
    except KeyError:
        raise r.fail(f"memo key {idx} not found") from None


def _put(r: _Reader, idx: int) -> None:
    if idx < 0:
        raise r.fail("negative memo key")
    r.memo[idx] = r.top()


@_op(b"g")
def _get_op(r: _Reader) -> None:
    try:
        _get(r, int(r.readline()))
    except ValueError:
        raise r.fail("bad GET") from None


@_op(b"h")
def _binget(r: _Reader) -> None:
    _get(r, r.read(1)[0])


@_op(b"j")
def _long_binget(r: _Reader) -> None:
    _get(r, _u32(r.read(4))[0])


@_op(b"p")
def _put_op(r: _Reader) -> None:
    try:
        _put(r, int(r.readline()))
    except ValueError:
        raise r.fail("bad PUT") from None


@_op(b"q")
def _binput(r: _Reader) -> None:
    _put(r, r.read(1)[0])


@_op(b"r")
def _long_binput(r: _Reader) -> None:
    _put(r, _u32(r.read(4))[0])


@_op(b"\x94")
def _memoize(r: _Reader) -> None:
    _put(r, len(r.memo))


@_op(b"c")
def _global(r: _Reader) -> None:
    module = r.readline().decode("utf-8", "replace")
    name = r.readline().decode("utf-8", "replace")
    r.push(r.make_global(module, name))


@_op(b"\x93")
def _stack_global(r: _Reader) -> None:
    name = r.pop()
    module = r.pop()
    r.push(r.make_global(module, name))


@_op(b"i")
def _inst(r: _Reader) -> None:
    module = r.readline().decode("utf-8", "replace")
    name = r.readline().decode("utf-8", "replace")
    args = tuple(r.pop_mark())
    r.push(r.call(r.make_global(module, name), args, "reduce"))


@_op(b"o")
def _obj(r: _Reader) -> None:
    items = r.pop_mark()
    if not items:
        raise r.fail("OBJ without a class")
    r.push(r.call(items[0], tuple(items[1:]), "reduce"))


@_op(b"R")
def _reduce(r: _Reader) -> None:
    args = r.pop()
    func = r.pop()
    r.push(r.call(func, args, "reduce"))


def _ext(r: _Reader, code: int) -> None:
    # copyreg's extension registry maps the code to a global registered at load time (by a
    # copyreg.add_extension call earlier in this or another pickle): not knowable from the file
    r.record(f"<extension code {code}>", (code,), UNSAFE,
             "EXT opcode: the global comes from copyreg's extension registry, chosen at load "
             "time (copyreg.add_extension)")
    r.push(Global("copyreg", f"<extension {code}>", "dangerous"))


@_op(b"\x82")
def _ext1(r: _Reader) -> None:
    _ext(r, _u8(r.read(1))[0])


@_op(b"\x83")
def _ext2(r: _Reader) -> None:
    _ext(r, _u16(r.read(2))[0])


@_op(b"\x84")
def _ext4(r: _Reader) -> None:
    _ext(r, _i32(r.read(4))[0])


@_op(b"\x81")
def _newobj(r: _Reader) -> None:
    args = r.pop()
    cls = r.pop()
    r.push(r.call(cls, args, "newobj"))


@_op(b"\x92")
def _newobj_ex(r: _Reader) -> None:
    kwargs = r.pop()
    args = r.pop()
    cls = r.pop()
    node = r.call(cls, args, "newobj_ex")
    if not isinstance(node, Reduce) or not isinstance(kwargs, dict):
        raise r.fail("bad NEWOBJ_EX")
    node.kwargs = kwargs
    r.push(node)


@_op(b"b")
def _build(r: _Reader) -> None:
    state = r.pop()
    target = r.top()
    if isinstance(target, Reduce):
        target.state = state
    elif isinstance(target, Global):
        # BUILD on a class or module object: pickle sets attributes of what it imported
        r.record(target.qualname, (state,), UNSAFE,
                 "BUILD on an imported class or module: sets its attributes at load time")
        target.safety = "dangerous"
    elif type(target) is collections.OrderedDict and isinstance(state, dict) \
            and all(isinstance(k, str) and not k.startswith("__") for k in state):
        # a module state_dict's ``_metadata``: plain attributes, as pickle's default BUILD sets
        for k, v in state.items():
            setattr(target, k, v)
    else:
        raise r.fail(f"BUILD on a {type(target).__name__}")


@_op(b"Q")
def _binpersid(r: _Reader) -> None:
    r.push(r.persistent(r.pop()))


@_op(b"P")
def _persid(r: _Reader) -> None:
    raise r.fail("text persistent ids are not used by torch")


def check_shape(root: Any) -> None:
    """Refuse trees nested deeper than MAX_DEPTH or too large once shared references expand.

    Later walks visit each object once, but a caller rendering a tree naively would otherwise
    be open to a "billion laughs" made of memo references. One iterative pass: each container's
    children are listed once, and its expanded size is summed when its subtree is done.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, int, list[Any] | None]] = [(root, 0, None)]
    pop, push = stack.pop, stack.append
    while stack:
        obj, depth, kids = pop()
        oid = id(obj)
        if kids is not None:  # the subtree is done
            on_path.discard(oid)
            total = 1 + len(kids)
            for k in kids:
                n = sizes.get(id(k))
                if n is not None:
                    total += n - 1
            if total > MAX_EXPANDED:
                raise PickleError("pickle expands to more than 20 million objects "
                                  "through shared references (a memo bomb?)")
            sizes[oid] = total
            continue
        if oid in sizes or oid in on_path:
            continue
        if depth > MAX_DEPTH:
            raise PickleError(f"pickle nests deeper than {MAX_DEPTH} levels")
        kids = _children(obj)
        if kids is None:
            continue
        on_path.add(oid)
        push((obj, depth, kids))
        for k in kids:
            if isinstance(k, _NESTED) and id(k) not in sizes:
                push((k, depth + 1, None))


_NESTED = (dict, list, tuple, set, frozenset, Reduce)


def _children(obj: Any) -> list[Any] | None:
    t = type(obj)
    if t is dict or t is collections.OrderedDict or isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if t is tuple or t is list or isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, Reduce):
        if isinstance(obj, TensorRef) and obj.plain:
            # storage, offset, size and stride were checked by check_tensor: flat and small
            kids = [*obj.args[4:], *obj.items]
        else:
            kids = [obj.func, *obj.args, *obj.items]
        for k, v in obj.dictitems:
            kids += [k, v]
        if obj.has_state:
            kids.append(obj.state)
        if obj.kwargs:
            kids.append(obj.kwargs)
        return kids
    return None


def unpickle(data: bytes | memoryview, pos: int = 0,
             persistent: Callable[[Any], Any] | None = None) -> Unpickled:
    """Interpret the pickle starting at ``data[pos]``; never imports or calls what it names.

    Args:
        data: the bytes holding the pickle (more may follow its STOP opcode).
        pos: the offset of the pickle's first opcode.
        persistent: what a persistent id becomes (default: torch.save's storage ids as
            :class:`~.nodes.Storage`; the tar format uses tensor keys).

    Returns:
        The root object with the globals, storages and tensors it references, and the offset
        just past STOP.

    Raises:
        PickleTruncated: the bytes end before STOP (a longer prefix may parse).
        PickleError: the pickle is malformed or exceeds a bound.
    """
    r = _Reader(data, pos)
    if persistent is not None:
        r.persistent = persistent  # type: ignore[method-assign,assignment]
    try:
        root = r.load()
    except RecursionError:
        e = PickleError("pickle nests too deeply")
        e.safety = r.safety()
        raise e from None
    except PickleError as e:
        e.safety = r.safety()  # what loading would have run before the break
        raise
    check_shape(root)
    out = Unpickled(root, r.pos, r.globals, r.storages, r.tensors, r.safety())
    out.latin1_at = r.latin1_at
    return out
