"""Edits: functions from an opened checkpoint to a plan of changes to its tree.

An edit mutates the tree of the :class:`~ckpttool.checkpoint.Checkpoint` it is given and
returns an :class:`EditPlan` saying what changed, which files must be rewritten and which
storages get new bytes. Edits never touch files; :func:`ckpttool.save.save` writes a plan.
"""

from __future__ import annotations

import ast
import struct
from dataclasses import dataclass, field
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import EditError
from ..formats.nodes import TensorRef
from ..tree import join


@dataclass
class Change:
    pointer: str
    before: Any
    after: Any


@dataclass
class EditPlan:
    """What an edit did to the tree and what the writer must do about it."""

    ckpt: Checkpoint
    command: str
    changes: list[Change] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)  # file names ("" for a single file)
    new_records: dict[str, dict[str, Any]] = field(default_factory=dict)  # file -> key -> bytes
    notes: list[str] = field(default_factory=list)
    summary: str = ""

    def touch(self, pointer: str) -> str:
        name = self.ckpt.file_for(pointer).name
        self.touched.add(name)
        return name

    def set(self, container: Any, key: Any, pointer: str, value: Any) -> None:
        """Set ``container[key] = value`` (a tensor's value is rewritten in its record)."""
        old = container[key]
        ptr = join(pointer, key)
        if isinstance(old, TensorRef):
            self.set_tensor_scalar(old, ptr, value)
            return
        container[key] = value
        self.changes.append(Change(ptr, old, value))
        self.touch(ptr)

    def set_tensor_scalar(self, t: TensorRef, pointer: str, value: float) -> None:
        st = t.storage
        fmt = {"float32": "<f", "float64": "<d"}.get(t.dtype)
        if st is None or fmt is None or t.numel != 1 or st.nbytes != t.itemsize:
            raise EditError(f"{pointer}: a {t.dtype} tensor of shape {list(t.shape)} sharing "
                            "its storage cannot be edited as a number")
        name = self.touch(pointer)
        self.new_records.setdefault(name, {})[st.key] = struct.pack(fmt, value)
        self.changes.append(Change(pointer, t.value, value))
        t.value = value


def as_number(v: Any) -> float | None:
    """A numeric hyperparameter as a float: a number, or a 0-d tensor whose value was read."""
    if isinstance(v, TensorRef):
        return float(v.value) if isinstance(v.value, (int, float)) else None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


def parse_value(text: str) -> Any:
    """A command-line value: a Python literal (0.9, (0.9, 0.95), True, None), ``a,b`` as a
    tuple, true/false/null as JSON spells them, else the string itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    try:
        v = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if "," in text:
            return tuple(parse_value(p) for p in text.split(","))
        return text
    return v
