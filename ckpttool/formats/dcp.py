"""torch.distributed.checkpoint (DCP) folders: ``.metadata`` plus ``__R_N.distcp`` data files.

``.metadata`` is a plain pickle of ``torch.distributed.checkpoint.metadata.Metadata``; it is read
by the same restricted interpreter as everything else (its dataclasses are known data, see
:mod:`.safety`; nothing in it is imported or run). From it:

* ``state_dict_metadata``: for each flattened key (FQN) a ``TensorStorageMetadata`` (dtype,
  global size, the chunks: offsets and sizes) or a ``BytesStorageMetadata`` (a non-tensor
  value, torch.save'd into a data file);
* ``planner_data``: each FQN's path in the nested state dict (``("optim", "param_groups", 0,
  "lr")``): the tree is rebuilt from these, so optimizers, models and schedulers are found
  as in any file (optimizer state keyed by parameter name);
* ``storage_data``: where each chunk and each value lies (data file, offset, length).

Tensors become :class:`~.safetensors.SafeTensor` entries with their global shape, dtype and
chunks (no tensor byte is read). The non-tensor values (hyperparameters, step counters) are
small torch.save archives inside the data files: each is read like any torch.save file, and
its verdict joins the folder's.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

from ..errors import UnreadableError
from .nodes import DTYPE_ITEMSIZE, Global, Reduce, as_shape, fields
from .safetensors import SafeTensor
from .safety import NEEDS_TRUST, Safety

TINY_NUMEL = 8  # as for torch.save files: tensors this small have their values read


def _qual(node: Any) -> str:
    return node.qualname if isinstance(node, Reduce) else ""


ReadValue = Callable[[str, int, int], tuple[Any, Safety]]


def build_tree(path: str, meta: Any, read_value: ReadValue) -> tuple[dict[str, Any], Safety,
                                                                       list[str]]:
    """The nested state dict a DCP folder holds, the verdict of its values, and notes.

    ``read_value(data_file, offset, length)`` reads one torch.save'd value and its verdict.
    """
    m = fields(meta)
    if not m or "state_dict_metadata" not in m:
        raise UnreadableError(".metadata does not hold a DCP Metadata object", path=path)
    sdm = m.get("state_dict_metadata")
    planner: dict[Any, Any] = m["planner_data"] if isinstance(m.get("planner_data"), dict) \
        else {}
    storage: dict[Any, Any] = m["storage_data"] if isinstance(m.get("storage_data"), dict) \
        else {}
    if not isinstance(sdm, dict):
        raise UnreadableError(".metadata has no state_dict_metadata", path=path)
    where: dict[tuple[str, Any], tuple[str, int, int]] = {}
    # entries written through a stream transform (compression, encryption: DCP's
    # ``_extensions``): their bytes are not a torch.save archive and are not read
    transformed: dict[tuple[str, Any], str] = {}
    for idx, info in storage.items():
        f, i = fields(idx), fields(info)
        if isinstance(f.get("fqn"), str) and isinstance(i.get("relative_path"), str):
            key = (f["fqn"], as_shape(f.get("offset")))
            where[key] = (
                i["relative_path"], int(i.get("offset") or 0), int(i.get("length") or 0))
            td = i.get("transform_descriptors")
            if td:
                transformed[key] = ", ".join(map(str, td)) if isinstance(td, (list, tuple)) \
                    else str(td)
    safety = Safety()
    notes: list[str] = []
    unread: list[str] = []
    root: dict[str, Any] = {}
    for fqn, md in sdm.items():
        if not isinstance(fqn, str):
            continue
        keys = planner.get(fqn)
        keys = tuple(keys) if isinstance(keys, (tuple, list)) and keys else (fqn,)
        q = _qual(md)
        if q.endswith(".TensorStorageMetadata"):
            value: Any = _tensor(fqn, fields(md), where, read_value, safety, transformed)
        elif q.endswith(".BytesStorageMetadata"):
            loc = where.get((fqn, None))
            if (fqn, None) in transformed:
                unread.append(f"{fqn} ({transformed[(fqn, None)]})")
                value = None
            elif loc is None:
                notes.append(f"{fqn}: no data file holds this value")
                value = None
            else:
                file, offset, length = loc
                if "/" in file or file in ("", ".", ".."):
                    raise UnreadableError(f"{fqn} lies in {file!r}, outside the folder",
                                          path=path)
                value, sf = read_value(file, offset, length)
                safety.merge(sf, file)
        else:
            notes.append(f"{fqn}: an entry of kind {q or type(md).__name__} (not read)")
            value = None
        _place(root, keys, value)
    if unread or transformed:
        kinds = sorted(set(transformed.values()))
        notes.append(f"{len(transformed)} entries are stored through stream transforms "
                     f"({', '.join(kinds)}: compression or encryption) that ckpttool does not "
                     f"decode; {len(unread)} value{'s' if len(unread) != 1 else ''} among them "
                     f"{'are' if len(unread) != 1 else 'is'} not read (shown as None)")
    if unread:
        safety.add_reason(NEEDS_TRUST, f"{len(unread)} values stored through stream transforms "
                                       f"were not read, so their content is not judged: "
                                       + ", ".join(unread[:4])
                                       + (" ..." if len(unread) > 4 else ""))
        safety.unjudged += unread
    tensors = [t for t in _leaves(root) if isinstance(t, SafeTensor) and t.chunks is not None]
    n_chunks = sum(len(t.chunks or ()) for t in tensors)
    used = sorted({c[2] for t in tensors for c in t.chunks or ()})
    notes.append(f"{len(tensors)} tensors in {n_chunks} chunks ("
                 + ", ".join(f"{sum(1 for t in tensors for c in t.chunks or () if c[2] == f)} "
                             f"in {f}" for f in used) + ")")
    return root, safety, notes


def _leaves(node: Any) -> list[Any]:
    out, todo = [], [node]
    while todo:
        n = todo.pop()
        if isinstance(n, dict):
            todo.extend(n.values())
        elif isinstance(n, list):
            todo.extend(n)
        else:
            out.append(n)
    return out


def _tensor(fqn: str, md: dict[str, Any], where: dict[tuple[str, Any], tuple[str, int, int]],
            read_value: ReadValue, safety: Safety,
            transformed: dict[tuple[str, Any], str]) -> SafeTensor:
    prop = md.get("properties")
    props = fields(prop)
    st = prop.state if isinstance(prop, Reduce) and prop.has_state else None
    if not props and isinstance(st, tuple) and st:
        # TensorProperties pickles its state as (dtype, layout, requires_grad, memory_format,
        # pin_memory)
        props = {"dtype": st[0]}
    dt = props.get("dtype")
    dtype = dt.name if isinstance(dt, Global) else str(dt)
    shape = as_shape(md.get("size")) or ()
    chunks = []
    for ch in md.get("chunks") or ():
        c = fields(ch)
        offsets, sizes = as_shape(c.get("offsets")), as_shape(c.get("sizes"))
        file, off, length = where.get((fqn, offsets), ("?", -1, 0))
        chunks.append((offsets, sizes, file, off, length))
    first = chunks[0] if chunks else (None, None, "", -1, 0)
    t = SafeTensor(shape, dtype, first[3], math.prod(shape) * DTYPE_ITEMSIZE.get(dtype, 1),
                   device="-", path=first[2], chunks=chunks)
    if len(chunks) == 1 and t.numel <= TINY_NUMEL and first[3] >= 0 \
            and (fqn, first[0]) not in transformed:
        # a step counter and friends: its chunk is a small torch.save file; read its value
        node, sf = read_value(first[2], first[3], first[4])
        safety.merge(sf, first[2])
        t.value = getattr(node, "value", None)
    return t


def _place(root: dict[str, Any], keys: tuple[Any, ...], value: Any) -> None:
    """Put ``value`` at ``keys`` of the nested state dict (ints index lists, as DCP's own
    unflattening does)."""
    node: Any = root
    for k, nxt in zip(keys, keys[1:]):
        child = node.get(k) if isinstance(node, dict) else (
            node[k] if isinstance(node, list) and k < len(node) else None)
        if child is None:
            child = [] if isinstance(nxt, int) else {}
            _set(node, k, child)
        node = child
    _set(node, keys[-1], value)


def _set(node: Any, k: Any, value: Any) -> None:
    if isinstance(node, list) and isinstance(k, int) and 0 <= k < 1_000_000:
        while len(node) <= k:
            node.append(None)
        node[k] = value
    elif isinstance(node, dict):
        node[k] = value


def data_files(path: str, names: list[str]) -> dict[str, int]:
    """The data files of a DCP folder and their sizes."""
    out = {}
    for n in names:
        fp = os.path.join(path, n)
        if n.endswith(".distcp") and os.path.isfile(fp):
            out[n] = os.path.getsize(fp)
    return out
