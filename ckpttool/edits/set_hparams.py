"""``set``: change hyperparameters of param groups, checked against the optimizer's type.

Keys and value types come from the installed torch's defaults (shipped as data in
:mod:`ckpttool.knowledge`). Turning on an option that needs state (``amsgrad``, RMSprop's
``centered`` or ``momentum``) adds that state as zeros shaped like each param, which is what
torch's optimizer would have created; turning it off removes it.
"""

from __future__ import annotations

import math
from typing import Any

from .. import deepspeed, knowledge
from ..checkpoint import Checkpoint
from ..errors import EditError
from ..formats.nodes import TensorRef
from ..locate import OptimizerState
from ..names import param_shape
from ..newtensors import Zeros, new_tensor
from ..tree import join
from . import Plan, TreeEditor, as_number


def type_ok(default: Any, value: Any) -> bool:
    """Is ``value`` of the kind ``default`` is (a bool for a bool, a number for a number, a
    sequence of the same length for a tuple)? None on either side accepts anything."""
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple)) and len(value) == len(default)
    return isinstance(value, type(default))


def _fits_option(option: str, values: dict[str, Any]) -> bool:
    """Does a group with ``values`` have the option "key=value" (as knowledge spells it)?"""
    key, _, want = option.partition("=")
    v: Any = values.get(key)
    if want in ("true", "false"):
        return bool(v) == (want == "true")
    try:
        return bool(v) and float(v) != 0  # "momentum=0.9": any non-zero momentum
    except (TypeError, ValueError):
        return False


def set_hparams(ckpt: Checkpoint, assignments: dict[str, Any], groups: list[int] | None = None,
                optimizer: str | None = None, force: bool = False) -> Plan:
    """Set hyperparameters in the selected param groups.

    Args:
        ckpt: the checkpoint (not changed; the plan's ``result`` is the edited one).
        assignments: key -> value; keys are checked against the inferred optimizer type
            (its torch defaults, the LR-like keys, and extra keys already in the groups).
        groups: group indices to change; all when None.
        optimizer: JSON Pointer of the optimizer when the checkpoint has several.
        force: allow keys the type does not have and values of another type.

    Returns:
        The plan. Turning on an option that needs state adds it (zeros, streamed at write
        time); turning it off removes it.
    """
    opt, ranks = deepspeed.logical_optimizer(ckpt, optimizer)
    where = f"optimizer {opt.pointer or '(root)'}"
    n = len(opt.groups)
    selected = list(range(n)) if groups is None else list(dict.fromkeys(groups))
    for g in selected:
        if not 0 <= g < n:
            raise EditError(f"{where} has groups 0..{n - 1}; there is no group {g}",
                            path=ckpt.path, pointer=opt.pointer)
    info = knowledge.optimizer_info(opt.type) if opt.type in knowledge.optimizer_types() \
        else None
    for key, value in assignments.items():
        if key in ("params", "param_names"):
            raise EditError(f"{key} cannot be set", key=key,
                            hint="use merge-groups to change which params a group holds")
        if info is None:
            if not force:
                raise EditError(f"the type of {where} is unknown ({opt.guess.reason}), so "
                                f"{key!r} cannot be checked", path=ckpt.path,
                                pointer=opt.pointer, key=key,
                                hint="pass --force to set it anyway")
            continue
        known = set(info.defaults) | set(knowledge.LR_LIKE_GROUP_KEYS) | set(opt.extra_keys)
        if key not in known:
            if not force:
                raise EditError(f"{opt.type} has no hyperparameter {key!r} (it has "
                                f"{', '.join(info.defaults)})", path=ckpt.path,
                                pointer=opt.pointer, key=key,
                                hint="pass --force to add it anyway")
            continue
        default = info.defaults.get(key)
        if not type_ok(default, value) and not force:
            raise EditError(f"{opt.type}.{key} expects a value like {default!r}, got {value!r}",
                            path=ckpt.path, pointer=opt.pointer, key=key)
    ed = TreeEditor(ckpt, "set")
    for o, g in [(o, g) for o in ranks for g in selected]:  # DeepSpeed ZeRO: every rank
        ptr = join(join(o.pointer, "param_groups"), g)
        before = o.raw["param_groups"][g]
        after = dict(before)
        for key, value in assignments.items():
            default = info.defaults.get(key) if info else None
            if isinstance(value, list):
                value = tuple(value)
            if isinstance(default, float) and isinstance(value, int) \
                    and not isinstance(value, bool):
                value = float(value)
            after[key] = value
            if key in before and before[key] == value and type(before[key]) is type(value):
                continue
            if key in before and isinstance(before[key], TensorRef):
                num = as_number(value)
                if num is None:
                    raise EditError(f"{key} is a tensor here; it can only be set to a number",
                                    path=ckpt.path, pointer=join(ptr, key), key=key)
                if as_number(before[key]) != num:
                    ed.set_number(join(ptr, key), num)
                continue
            ed.set(join(ptr, key), value)
        if info is not None:
            _sync_state(ed, o, g, before, after, info)
    cfg = _config(ed, ckpt, assignments, len(selected) == n)
    if set(assignments) & set(knowledge.LR_LIKE_GROUP_KEYS) \
            and (ls := deepspeed.launch_schedule(ckpt)) is not None:
        ed.notes.append(ls.note())
    changed = len(ed.changes)
    return ed.finish(f"set: {', '.join(f'{k}={v!r}' for k, v in assignments.items())} in "
                     f"group{'s' if len(selected) > 1 else ''} "
                     f"{', '.join(map(str, selected))} of {where} ({opt.type})"
                     f"{deepspeed.ranks_text(ckpt, ranks)}{cfg}; "
                     f"{changed} value{'' if changed == 1 else 's'} changed")


def _sync_state(ed: TreeEditor, opt: OptimizerState, g: int, before: dict[str, Any],
                after: dict[str, Any], info: knowledge.OptimizerInfo) -> None:
    """Add (or drop) the state an option needs when the option is turned on (or off)."""
    for option, keys in info.conditional_state.items():
        was, now = _fits_option(option, before), _fits_option(option, after)
        if was == now:
            continue
        for pid in opt.groups[g].params:
            entries = opt.raw["state"].get(pid)
            if not isinstance(entries, dict) or not entries:
                continue  # no state yet: torch creates all of it at the first step
            sptr = join(join(opt.pointer, "state"), pid)
            for key in keys:
                if now and key not in entries:
                    like = next((v for k, v in entries.items() if isinstance(v, TensorRef)
                                 and k != "step" and v.shape), None)
                    shape = param_shape(opt.type, entries)
                    if like is None or shape is None:
                        raise EditError(f"cannot tell the param's shape to add {key}",
                                        path=ed.ckpt.path, pointer=sptr, key=key)
                    t = new_tensor(like, shape, Zeros(math.prod(shape) * like.itemsize))
                    ed.set(join(sptr, key), t, shown=f"zeros{list(shape)}")
                elif not now and key in entries:
                    ed.delete(join(sptr, key))


def _config(ed: TreeEditor, ckpt: Checkpoint, assignments: dict[str, Any], every_group: bool
            ) -> str:
    """Set the keys the DeepSpeed config's optimizer params also hold (its copies in the
    checkpoint: ``ds_config["optimizer"]["params"]``); a summary part."""
    copies = deepspeed.config_copies(ckpt)
    keys = [k for k in assignments if any(k in c.params for c in copies)]
    if not keys:
        return ""
    if not every_group:
        ed.notes.append(f"the DeepSpeed config's optimizer {', '.join(keys)} (ds_config) was "
                        "left as it was: it applies to every group, and only some changed")
        return ""
    for c in copies:
        for key in keys:
            if key not in c.params:
                continue
            old, value = c.params[key], assignments[key]
            if isinstance(old, list) and isinstance(value, (list, tuple)):
                value = list(value)  # the config came from JSON
            elif isinstance(old, float) and isinstance(value, int) \
                    and not isinstance(value, bool):
                value = float(value)
            if not (old == value and type(old) is type(value)):
                ed.set(join(c.pointer, key), value)
    return (f"; ds_config optimizer {', '.join(keys)} in {len(copies)} "
            f"file{'s' if len(copies) > 1 else ''}")
