"""DeepSpeed ZeRO-1/2 optimizer files, per parameter.

A ZeRO-1/2 rank file (``zero_pp_rank_R_mp_rank_00_optim_states.pt``) holds, per param group,
one flat fp32 partition (``single_partition_of_fp32_groups``) and the optimizer state over it
(``base_optimizer_state``: one flat ``exp_avg`` / ``exp_avg_sq`` per group). Which elements
belong to which parameter is DeepSpeed's own ``param_slice_mappings`` (name -> ``start``,
``numel`` within this rank's partition); the parameter shapes are the model file's
``param_shapes``. This is what ``zero_to_fp32`` uses to rebuild weights; here it also names
the slices of the moments. Read from the tree only: no tensor byte is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .formats.nodes import as_shape, fields
from .tree import join

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


@dataclass
class ZeroSlice:
    name: str
    shape: tuple[int, ...] | None  # from the model file's param_shapes
    start: int
    numel: int


@dataclass
class ZeroGroup:
    """One param group's partition in one rank's file."""

    file: str
    rank: int
    group: int
    pointer: str  # the optimizer state dict (its base_optimizer_state is the optimizer)
    partition_numel: int | None
    padding: int | None
    slices: list[ZeroSlice]


def zero_groups(ckpt: Checkpoint) -> list[ZeroGroup]:
    """Every ZeRO-1/2 partition of a DeepSpeed checkpoint folder, by rank file and group."""
    if not ckpt.is_folder:
        return []
    shapes: dict[str, tuple[int, ...] | None] = {}
    for f in ckpt.files:
        root = ckpt.roots.get(f.name)
        if f.name.endswith("_model_states.pt") and isinstance(root, dict):
            for group in root.get("param_shapes") or ():
                if isinstance(group, dict):
                    shapes.update({str(k): as_shape(v) for k, v in group.items()})
    out: list[ZeroGroup] = []
    for f in ckpt.files:
        m = _RANK_FILE.search(f.name)
        root = ckpt.roots.get(f.name)
        osd = root.get("optimizer_state_dict") if isinstance(root, dict) else None
        if m is None or not isinstance(osd, dict):
            continue
        mappings = osd.get("param_slice_mappings")
        parts = osd.get("single_partition_of_fp32_groups") or []
        pads = osd.get("group_paddings") or []
        if not isinstance(mappings, list):
            continue
        for g, mapping in enumerate(mappings):
            if not isinstance(mapping, dict):
                continue
            slices = []
            for name, addr in mapping.items():
                a = addr if isinstance(addr, dict) else fields(addr)  # dict: sanitized
                if type(a.get("start")) is int and type(a.get("numel")) is int:
                    slices.append(ZeroSlice(str(name), shapes.get(str(name)), a["start"],
                                            a["numel"]))
            part = parts[g] if isinstance(parts, list) and g < len(parts) else None
            shape = getattr(part, "shape", None)
            out.append(ZeroGroup(f.name, int(m.group(1)), g,
                                 join(join("", f.name), "optimizer_state_dict"),
                                 shape[0] if shape else None,
                                 pads[g] if isinstance(pads, list) and g < len(pads)
                                 and type(pads[g]) is int else None, slices))
    return out
