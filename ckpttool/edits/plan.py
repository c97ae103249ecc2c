"""Plans: what an edit changes, computed without touching the checkpoint it was given.

An edit is a function ``edit(ckpt, ...) -> Plan``. It records its changes with a
:class:`TreeEditor` (copy on write: containers on the way to a change are copied, everything
else is shared) and returns a :class:`Plan` holding the changes (pointer, before, after), a
one-line summary, notes, and ``result``: a new :class:`~ckpttool.checkpoint.Checkpoint` whose
tree is the edited one and whose views (optimizers, groups, schedulers, names) are derived
from that tree afresh. Edits chain::

    from ckpttool.edits import merge_groups, move, set_lr
    from ckpttool.save import save

    plan = merge_groups(ckpt).then(set_lr, 1e-4).then(move, "cpu")
    print(plan.render())   # the --dry-run table
    save(plan, "out.pt")   # written once, crash-safely

New tensors are descriptions (:mod:`ckpttool.newtensors`) until the writer streams them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec

from ..checkpoint import Checkpoint, refuse_torchscript
from ..errors import CkptError
from ..formats.nodes import Reduce, Storage, TensorRef
from ..newtensors import Fill, new_tensor
from ..render import plan_text
from ..tree import rebuild, resolve, split

P = ParamSpec("P")

ABSENT: Any = type("Absent", (), {"__repr__": lambda self: "(absent)"})()


@dataclass
class Change:
    """One change: the value at ``pointer`` was ``before`` and becomes ``after``
    (:data:`ABSENT` when the key did not exist or is removed)."""

    pointer: str
    before: Any
    after: Any


@dataclass
class Plan:
    """The outcome of one edit, or of several chained with :meth:`then`."""

    source: Checkpoint  # the checkpoint the (first) edit was given; never changed
    result: Checkpoint  # the edited checkpoint (views derived from its tree)
    command: str
    changes: list[Change] = field(default_factory=list)
    summary: str = ""
    notes: list[str] = field(default_factory=list)
    steps: list[Plan] = field(default_factory=list)  # the plans chained into this one

    @property
    def changed(self) -> bool:
        return bool(self.result.touched)

    @property
    def touched(self) -> list[str]:
        """Files whose tree differs from the file on disk (``""`` for a single file)."""
        return self.result.touched

    def then(self, edit: Callable[Concatenate[Checkpoint, P], Plan], *args: P.args,
             **kwargs: P.kwargs) -> Plan:
        """Apply ``edit`` to this plan's result; the chained plan has both plans' changes."""
        nxt = edit(self.result, *args, **kwargs)
        steps = (self.steps or [self]) + (nxt.steps or [nxt])
        return Plan(self.source, nxt.result, f"{self.command} + {nxt.command}",
                    self.changes + nxt.changes, f"{self.summary}; {nxt.summary}",
                    self.notes + nxt.notes, steps)

    def render(self) -> str:
        """The before/after table of the changes, then the summary (``--dry-run``)."""
        return plan_text(self)


class TreeEditor:
    """Records changes to a checkpoint's tree without modifying it (copy on write).

    ``get`` reads the edited tree; ``set`` / ``delete`` change a value at a pointer;
    ``substitute`` replaces one object everywhere it occurs (a storage retagged by ``move``);
    ``finish`` builds the plan. Objects reachable from several places stay shared.
    """

    def __init__(self, ckpt: Checkpoint, command: str) -> None:
        if command != "move":
            refuse_torchscript(ckpt, command)
        self.ckpt = ckpt
        self.command = command
        self.changes: list[Change] = []
        self.notes: list[str] = []
        self._subst: dict[int, Any] = {}  # id(original) -> its replacement (owned copy)
        self._owned: set[int] = set()  # ids of the copies this editor made
        self._keep: list[Any] = []  # keeps originals alive while their ids are keys

    # -- reading the edited tree -----------------------------------------------------------
    def view(self, obj: Any) -> Any:
        return self._subst.get(id(obj), obj)

    def get(self, pointer: str) -> Any:
        """The value at ``pointer`` in the edited tree."""
        try:
            return resolve(self.ckpt.root, pointer, self.view)
        except CkptError as e:
            raise CkptError(e.message, path=self.ckpt.path, pointer=pointer) from None

    # -- changing it -----------------------------------------------------------------------
    def own(self, obj: Any) -> Any:
        """A copy of container ``obj`` that this editor may change (made once per object)."""
        if id(obj) in self._owned:
            return obj
        if id(obj) in self._subst:
            return self._subst[id(obj)]
        mine: Any
        if isinstance(obj, Reduce):
            mine = obj.copy()
        elif isinstance(obj, (dict, list)):
            mine = copy.copy(obj)
        else:
            raise CkptError(f"cannot edit inside a {type(obj).__name__}", path=self.ckpt.path)
        self._subst[id(obj)] = mine
        self._owned.add(id(mine))
        self._keep.append(obj)
        return mine

    def _parent(self, pointer: str) -> tuple[Any, Any]:
        tokens = split(pointer)
        if not tokens:
            raise CkptError("cannot replace the whole tree", path=self.ckpt.path)
        parent_ptr = "/" + "/".join(t.replace("~", "~0").replace("/", "~1")
                                    for t in tokens[:-1]) if len(tokens) > 1 else ""
        parent = self.own(self.get(parent_ptr))
        token = tokens[-1]
        if isinstance(parent, list):
            if not token.isdigit() or int(token) >= len(parent):
                raise CkptError(f"no index {token} at {parent_ptr!r}", path=self.ckpt.path,
                                pointer=pointer)
            return parent, int(token)
        if isinstance(parent, dict):
            for k in parent:
                if k == token or str(k) == token:
                    return parent, k
            return parent, token
        raise CkptError(f"cannot set a key inside a {type(parent).__name__} at "
                        f"{parent_ptr!r}", path=self.ckpt.path, pointer=pointer)

    def set(self, pointer: str, value: Any, *, shown: Any = ABSENT,
            shown_before: Any = ABSENT) -> None:
        """Set the value at ``pointer`` (a new key is appended to its dict).

        ``shown`` / ``shown_before`` are what the change lists as the new / old value when
        the values themselves are not readable (a new tensor, a whole list of groups)."""
        parent, key = self._parent(pointer)
        before = parent[key] if (isinstance(parent, list) or key in parent) else ABSENT
        parent[key] = value
        self.changes.append(Change(pointer, before if shown_before is ABSENT else shown_before,
                                   value if shown is ABSENT else shown))

    def set_number(self, pointer: str, value: float) -> None:
        """Set a number at ``pointer``; a tensor holding one number is replaced by a new
        tensor of its dtype and device holding ``value`` (written at save time)."""
        old = self.get(pointer)
        if not isinstance(old, TensorRef):
            self.set(pointer, value)
            return
        if old.numel != 1:
            raise CkptError(f"a {old.dtype} tensor of shape {list(old.shape)} cannot be set "
                            "to one number", path=self.ckpt.path, pointer=pointer)
        t = new_tensor(old, old.shape, Fill(old.dtype, 1, value))
        t.value = value if not old.shape else [value]
        parent, key = self._parent(pointer)
        parent[key] = t
        self.changes.append(Change(pointer, old.value, value))

    def delete(self, pointer: str) -> None:
        parent, key = self._parent(pointer)
        if not isinstance(parent, dict) or key not in parent:
            raise CkptError(f"nothing to remove at {pointer!r}", path=self.ckpt.path,
                            pointer=pointer)
        before = parent.pop(key)
        self.changes.append(Change(pointer, before, ABSENT))

    def substitute(self, old: Storage, new: Storage, pointer: str, before: Any,
                   after: Any) -> None:
        """Replace storage ``old`` by ``new`` wherever a tensor uses it."""
        self._subst[id(old)] = new
        self._keep.append(old)
        self.changes.append(Change(pointer, before, after))

    # -- the plan --------------------------------------------------------------------------
    def finish(self, summary: str) -> Plan:
        root = rebuild(self.ckpt.root, self._subst) if self._subst else self.ckpt.root
        result = self.ckpt.derive(root) if root is not self.ckpt.root else self.ckpt
        return Plan(self.ckpt, result, self.command, self.changes, summary, self.notes)
