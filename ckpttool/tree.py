"""Walking a checkpoint tree, addressing its parts with JSON Pointers (RFC 6901), and
rebuilding it with parts replaced (copy on write: the tree an edit was given never changes)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

from .errors import CkptError
from .formats.nodes import Reduce, Storage, TensorRef
from .formats.safetensors import SafeTensor


def escape(token: Any) -> str:
    return str(token).replace("~", "~0").replace("/", "~1")


def unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def join(pointer: str, token: Any) -> str:
    return f"{pointer}/{escape(token)}"


def pointer_of(tokens: Any) -> str:
    """The JSON Pointer of a sequence of keys (``("optim", "param_groups", 0)``)."""
    return "".join(f"/{escape(t)}" for t in tokens)


def split(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise CkptError(f"JSON Pointer {pointer!r} must be empty or start with '/' "
                        "(for example /optimizer or /optimizer_states/0)")
    return [unescape(t) for t in pointer[1:].split("/")]


def _child(obj: Any, token: str) -> Any:
    if isinstance(obj, dict):
        if token in obj:
            return obj[token]
        for k in obj:  # non-string keys (ints in optimizer state) are addressed by their text
            if str(k) == token:
                return obj[k]
        raise KeyError(token)
    if isinstance(obj, (list, tuple)):
        if not token.isdigit():
            raise KeyError(token)
        return obj[int(token)]
    raise KeyError(token)


def resolve(root: Any, pointer: str, view: Callable[[Any], Any] | None = None) -> Any:
    """The object at ``pointer`` (``@``-tokens enter opaque objects, see below).

    ``view`` maps each object met on the way to the one to look into (an editor's current
    version of it); by default objects are taken as they are.
    """
    see = view or (lambda x: x)
    obj = see(root)
    tokens = split(pointer)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        try:
            if isinstance(obj, Reduce) and token.startswith("@"):
                obj, used = _reduce_child(obj, token, tokens[i + 1:])
                i += used
            else:
                obj = _child(obj, token)
                i += 1
        except (KeyError, IndexError):
            raise CkptError(f"nothing at {pointer!r} (no {token!r} there)",
                            pointer=pointer) from None
        obj = see(obj)
    return obj


def children(obj: Any) -> Iterator[tuple[Any, Any]]:
    """(token, child) pairs of a container, in order."""
    if isinstance(obj, dict):
        yield from obj.items()
    elif isinstance(obj, (list, tuple)):
        yield from enumerate(obj)


def walk(root: Any, pointer: str = "", max_depth: int = 64) -> Iterator[tuple[str, Any]]:
    """Yield (pointer, obj) for the tree's containers, each object once, depth first.

    Shared and cyclic references are visited once. Opaque objects are not entered.
    """
    seen: set[int] = set()
    stack: list[tuple[str, Any, int]] = [(pointer, root, 0)]
    while stack:
        ptr, obj, depth = stack.pop()
        if not isinstance(obj, (dict, list, tuple)) or id(obj) in seen:
            continue
        seen.add(id(obj))
        yield ptr, obj
        if depth >= max_depth:
            continue
        kids = [(join(ptr, k), v, depth + 1) for k, v in children(obj)
                if isinstance(v, (dict, list, tuple))]
        stack.extend(reversed(kids))



# --------------------------------------------------------------------------------------------
# inside opaque objects
#
# A recorded call (an opaque object such as a pickled ``nn.Module``, or a ``torch.Size``) has
# parts addressed by tokens that a plain dict key would not start with: ``@args/<i>``,
# ``@kwargs/<name>``, ``@state`` (what BUILD set), ``@items/<i>`` (APPENDS on it) and
# ``@dictitems/<key>`` (SETITEMS on it). ``/model/@state/_modules/0/@state/_parameters/weight``
# is the weight of a whole pickled ``Sequential``'s first layer.

def reduce_children(node: Reduce) -> Iterator[tuple[str, Any]]:
    """(pointer suffix, child) pairs of a recorded call, in pickle order."""
    for i, a in enumerate(node.args):
        yield f"@args/{i}", a
    if node.kwargs:
        for k, v in node.kwargs.items():
            yield f"@kwargs/{escape(k)}", v
    for i, x in enumerate(node.items):
        yield f"@items/{i}", x
    for k, v in node.dictitems:
        yield f"@dictitems/{escape(k)}", v
    if node.has_state:
        yield "@state", node.state


def _reduce_child(node: Reduce, token: str, rest: list[str]) -> tuple[Any, int]:
    """The child of ``node`` named by ``token`` (and maybe the next token); tokens used."""
    if token == "@state" and node.has_state:
        return node.state, 1
    if not rest:
        raise KeyError(token)
    sub = rest[0]
    if token == "@args" and sub.isdigit() and int(sub) < len(node.args):
        return node.args[int(sub)], 2
    if token == "@items" and sub.isdigit() and int(sub) < len(node.items):
        return node.items[int(sub)], 2
    if token == "@kwargs" and node.kwargs and sub in node.kwargs:
        return node.kwargs[sub], 2
    if token == "@dictitems":
        for k, v in node.dictitems:
            if str(k) == sub:
                return v, 2
    raise KeyError(token)


def opaque_top(pointer: str) -> str:
    """The pointer of the outermost opaque object on the way to ``pointer`` (or ``pointer``
    itself when the way enters none)."""
    tokens = pointer.split("/")
    for i in range(1, len(tokens)):
        if tokens[i].startswith("@"):
            return "/".join(tokens[:i])
    return pointer


def is_tensor_node(obj: Any) -> bool:
    """A tensor: a :class:`TensorRef` (plain or Parameter) or a safetensors entry."""
    return isinstance(obj, (TensorRef, SafeTensor))


def walk_all(root: Any, pointer: str = "") -> Iterator[tuple[str, Any, bool]]:
    """Yield ``(pointer, obj, inside_opaque)`` for every container and tensor of the tree,
    entering opaque objects (their arguments, state and items) too. Each object once."""
    seen: set[int] = set()
    stack: list[tuple[str, Any, bool]] = [(pointer, root, False)]
    while stack:
        ptr, obj, opaque = stack.pop()
        if id(obj) in seen:
            continue
        if isinstance(obj, TensorRef):
            seen.add(id(obj))
            yield ptr, obj, opaque
            if not obj.plain and obj.is_dtensor:
                # its spec is opaque data that may hold tensors (the mesh's rank map); the
                # local shard is the DTensor's own storage
                spec = obj.args[3][1].get("_spec")
                if isinstance(spec, Reduce):
                    stack.append((f"{ptr}/@args/3/1/_spec", spec, True))
            continue
        if isinstance(obj, Reduce):
            seen.add(id(obj))
            yield ptr, obj, opaque
            kids = [(f"{ptr}/{tok}", v, True) for tok, v in reduce_children(obj)]
        elif isinstance(obj, (dict, list, tuple)):
            seen.add(id(obj))
            yield ptr, obj, opaque
            kids = [(join(ptr, k), v, opaque) for k, v in children(obj)]
        else:
            if is_tensor_node(obj):
                seen.add(id(obj))
                yield ptr, obj, opaque
            continue
        stack.extend(reversed([k for k in kids if isinstance(k[1], (dict, list, tuple, Reduce))
                               or is_tensor_node(k[1])]))


def tensors(root: Any, pointer: str = "") -> Iterator[tuple[str, Any, bool]]:
    """Every tensor of the tree, wherever it is: ``(pointer, tensor, inside_opaque)``."""
    for ptr, obj, opaque in walk_all(root, pointer):
        if is_tensor_node(obj):
            yield ptr, obj, opaque


def storages(root: Any, pointer: str = "") -> dict[int, tuple[str, Storage, bool]]:
    """Every storage of the tree by ``id``: ``(pointer, storage, inside_opaque)``, in tree
    order. The pointer is that of the storage's first tensor; a storage held other than by a
    tensor node (a pickled storage, a tensor kind ckpttool does not model) is found too, under
    its own pointer. Storages inside opaque objects are included."""
    out: dict[int, tuple[str, Storage, bool]] = {}
    for ptr, obj, opaque in walk_all(root, pointer):
        if is_tensor_node(obj):
            st = getattr(obj, "storage", None)
            if isinstance(st, Storage) and id(st) not in out:
                out[id(st)] = (ptr, st, opaque)
            if not isinstance(obj, TensorRef) or not obj.is_wrapper:
                continue
        kids = reduce_children(obj) if isinstance(obj, Reduce) else children(obj)
        for tok, v in kids:
            if isinstance(v, Storage) and id(v) not in out:
                out[id(v)] = (f"{ptr}/{tok}" if isinstance(obj, Reduce) else join(ptr, tok), v,
                              opaque or isinstance(obj, Reduce))
            elif isinstance(v, tuple) and isinstance(obj, Reduce):
                for i, x in enumerate(v):  # reduce args such as _rebuild_from_type_v2's
                    if isinstance(x, Storage) and id(x) not in out:
                        out[id(x)] = (f"{ptr}/{tok}/{i}", x, True)
    return out


# --------------------------------------------------------------------------------------------
# copy on write

def rebuild(root: Any, substitutes: dict[int, Any]) -> Any:
    """A new tree equal to ``root`` with each object whose ``id`` is in ``substitutes``
    replaced by its substitute, every ancestor of a replaced object copied, and everything
    else shared with ``root``.

    Sharing is kept exactly: an object reachable from two places is rebuilt once and both
    places get the same result, so the pickler's memo (shared storages, a scheduler state
    stored twice) comes out as in the original. A substitute's own children are rebuilt too
    (it may hold originals that were replaced elsewhere); substitutes are owned by the caller
    and may be filled in place.
    """
    memo: dict[int, Any] = {}
    active: set[int] = set()
    owned = {id(v) for v in substitutes.values()}

    def fix(obj: Any) -> Any:
        oid = id(obj)
        if oid in memo:
            return memo[oid]
        new = substitutes.get(oid, obj)
        if not isinstance(new, (dict, list, tuple, Reduce)) or oid in active:
            memo[oid] = new
            return new
        active.add(oid)
        mine = new is not obj or id(new) in owned
        if isinstance(new, dict):
            vals = {k: fix(v) for k, v in new.items()}
            if any(vals[k] is not v for k, v in new.items()):
                if not mine:
                    new = copy.copy(new)
                for k, v in vals.items():
                    new[k] = v
        elif isinstance(new, list):
            items = [fix(v) for v in new]
            if any(a is not b for a, b in zip(items, new)):
                if not mine:
                    new = copy.copy(new)
                new[:] = items
        elif isinstance(new, tuple):
            items = [fix(v) for v in new]
            if any(a is not b for a, b in zip(items, new)):
                new = type(new)(items) if type(new) is tuple else new
        else:
            args = tuple(fix(a) for a in new.args)
            state = fix(new.state) if new.has_state else new.state
            items = [fix(x) for x in new.items]
            dictitems = [(k, fix(v)) for k, v in new.dictitems]
            kwargs = {k: fix(v) for k, v in new.kwargs.items()} if new.kwargs else new.kwargs
            changed = (any(a is not b for a, b in zip(args, new.args)) or state is not new.state
                       or any(a is not b for a, b in zip(items, new.items))
                       or any(a[1] is not b[1] for a, b in zip(dictitems, new.dictitems))
                       or (kwargs is not None and new.kwargs is not None
                           and any(kwargs[k] is not new.kwargs[k] for k in kwargs)))
            if changed:
                if not mine:
                    new = new.copy()
                new.args, new.state, new.items, new.dictitems = args, state, items, dictitems
                new.kwargs = kwargs
        active.discard(oid)
        memo[oid] = new
        return new

    return fix(root)
