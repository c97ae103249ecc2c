"""Walking a checkpoint tree and addressing its parts with JSON Pointers (RFC 6901)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .errors import CkptError


def escape(token: Any) -> str:
    return str(token).replace("~", "~0").replace("/", "~1")


def unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def join(pointer: str, token: Any) -> str:
    return f"{pointer}/{escape(token)}"


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


def resolve(root: Any, pointer: str) -> Any:
    obj = root
    for token in split(pointer):
        try:
            obj = _child(obj, token)
        except (KeyError, IndexError):
            raise CkptError(f"nothing at {pointer!r} (no {token!r} there)") from None
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

