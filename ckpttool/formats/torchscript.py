"""TorchScript archives (``torch.jit.save``): what they hold and what loading them runs.

A TorchScript archive is a torch zip archive with ``constants.pkl`` beside ``data.pkl`` (the test
``torch.load`` itself uses to hand the file to ``torch.jit.load``), the module's TorchScript
source under ``code/`` and, for traced modules, ``traced_inputs.pkl``. Each pickle's tensors
live in its own folder of records: ``data/<key>``, ``constants/<key>``, ``traced_inputs/<key>``.

``data.pkl`` is the module object tree: ``__torch__.<Class>`` objects (NEWOBJ + BUILD of their
attributes), tensors rebuilt as in ``torch.save`` files, lists tagged by
``torch.jit._pickle.build_intlist`` / ``restore_type_tag`` and friends. ``torch.jit.load`` reads
it with TorchScript's own C++ unpickler: the ``__torch__`` classes are the ones compiled from
``code/``, the ``torch.jit._pickle`` names are type tags from a fixed table; no Python global is
imported. Loading compiles the archive's TorchScript code and runs the ``__setstate__`` methods
it defines; ``weights_only=True`` refuses the archive.

The tree ckpttool builds for an archive is ``{"data.pkl": module, "constants.pkl": (...),
["traced_inputs.pkl": {...}]}``, so every storage of every pickle is reachable (``move`` retags
them all) and the writer can put each pickle back in its record.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any

from .nodes import Reduce, TensorRef, fields
from .safety import NEEDS_TRUST, Call, Safety

# the pickles of an archive, in the order torch.jit.save writes them; each one's storages are
# the records of the folder named like it
PICKLES = ("data.pkl", "constants.pkl", "traced_inputs.pkl")

# names TorchScript's unpickler resolves from its own table (torch/csrc/jit/serialization/
# unpickler.cpp); Python's torch.jit._pickle holds the same names for torch.load of old files
TYPE_TAGS = frozenset({
    "torch.jit._pickle.build_intlist", "torch.jit._pickle.build_tensorlist",
    "torch.jit._pickle.build_doublelist", "torch.jit._pickle.build_boollist",
    "torch.jit._pickle.build_tensor_from_id", "torch.jit._pickle.restore_type_tag",
})

WHY = ("a TorchScript archive (torch.jit.save): torch.load hands it to torch.jit.load, which "
       "compiles the archive's TorchScript code (code/) and runs it (the __setstate__ methods "
       "it defines at load, forward when called); weights_only=True refuses it. TorchScript "
       "code calls torch operators only: it cannot import or call Python, so nothing known to "
       "be dangerous")


def is_torchscript(records: dict[str, Any]) -> bool:
    """What ``torch.load`` tests (``_is_torchscript_zip``): a ``constants.pkl`` record."""
    return "constants.pkl" in records


def is_torchscript_global(qualname: str) -> bool:
    """A global that TorchScript resolves itself, never as a Python import."""
    return qualname in TYPE_TAGS or qualname.startswith("__torch__.")


def verdict(parts: dict[str, Safety], code_files: int) -> Safety:
    """The archive's verdict: torch.jit.load runs its TorchScript code (needs-trust), and any
    global of its pickles that is not TorchScript's own is judged as usual."""
    out = Safety()
    for name, part in parts.items():
        kept = Safety()
        for c in part.calls:
            if not is_torchscript_global(c.global_):
                kept.calls.append(c)
                kept.add_reason(c.level, f"{c.global_}: {c.why}")
        out.merge(kept, name)
    load = Call("torch.jit.load", f"<{code_files} TorchScript code files>", NEEDS_TRUST, WHY)
    out.merge(Safety(NEEDS_TRUST, [f"torch.jit.load: {WHY}"], [load]))
    return out


_CLASS = re.compile(r"^class (\w+)\(.*?\):\n((?:  .*\n|\n)*)", re.MULTILINE)
_LIST = re.compile(r"^  (__parameters__|__buffers__) = (\[.*?\])$", re.MULTILINE)


def member_kinds(code: dict[str, str]) -> dict[str, dict[str, str]]:
    """``{"__torch__.a.b.Class": {"weight": "parameter", "running_mean": "buffer"}}`` from
    the ``__parameters__`` / ``__buffers__`` lines of the ``code/`` files (read as text, the
    lists parsed as literals; nothing is compiled or run)."""
    out: dict[str, dict[str, str]] = {}
    for path, text in code.items():
        if not path.startswith("code/") or not path.endswith(".py"):
            continue
        module = path[len("code/"):-len(".py")].replace("/", ".")
        for m in _CLASS.finditer(text):
            kinds: dict[str, str] = {}
            for lm in _LIST.finditer(m.group(2)):
                try:
                    names = ast.literal_eval(lm.group(2))
                except (ValueError, SyntaxError):
                    continue
                kind = "parameter" if lm.group(1) == "__parameters__" else "buffer"
                for n in names if isinstance(names, list) else ():
                    if isinstance(n, str):
                        kinds[n] = kind
            out[f"{module}.{m.group(1)}"] = kinds
    return out


@dataclass
class Member:
    """A tensor of the module tree: its qualified name, kind and the tensor."""

    name: str
    kind: str  # "parameter", "buffer" or "attribute" (a tensor attribute of the class)
    tensor: TensorRef
    pointer: str


@dataclass
class ScriptModule:
    """What ``show`` says about an archive."""

    cls: str
    code: list[str]
    members: list[Member] = field(default_factory=list)
    constants: int = 0  # tensors in constants.pkl


def describe(root: dict[str, Any], code: dict[str, str]) -> ScriptModule:
    """The module class, its tensors by qualified name (submodules walked in attribute order)
    and the code files."""
    module = root.get("data.pkl")
    kinds = member_kinds(code)
    out = ScriptModule(module.qualname if isinstance(module, Reduce) else type(module).__name__,
                       sorted(p for p in code if not p.endswith(".debug_pkl")))
    seen: set[int] = set()
    todo: list[tuple[str, Any, str]] = [("", module, "/data.pkl")]
    while todo:
        prefix, node, ptr = todo.pop(0)
        if not isinstance(node, Reduce) or id(node) in seen:
            continue
        seen.add(id(node))
        own = kinds.get(node.qualname, {})
        subs = []
        for k, v in fields(node).items():
            here = f"{ptr}/@state/{k}"
            if isinstance(v, TensorRef):
                out.members.append(Member(prefix + str(k), own.get(str(k), "attribute"), v,
                                          here))
            elif isinstance(v, Reduce) and not isinstance(v, TensorRef) \
                    and v.qualname.startswith("__torch__."):
                subs.append((f"{prefix}{k}.", v, here))
        todo[0:0] = subs
    consts = root.get("constants.pkl")
    out.constants = sum(1 for c in consts if isinstance(c, TensorRef)) \
        if isinstance(consts, tuple) else 0
    return out
