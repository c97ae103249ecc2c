"""``set``: change hyperparameters of param groups, checked against the optimizer's type.

Keys and value types come from the installed torch's defaults (shipped as data in
:mod:`ckpttool.knowledge`). Turning on an option that needs state (``amsgrad``, RMSprop's
``centered`` or ``momentum``) adds that state as zeros shaped like each param, which is what
torch's optimizer would have created; turning it off removes it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from .. import knowledge
from ..checkpoint import Checkpoint
from ..errors import EditError
from ..formats.nodes import Global, Storage, TensorRef
from ..names import param_shape
from ..tree import join
from . import Change, EditPlan


def _type_ok(default: Any, value: Any) -> bool:
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


def new_zeros_like(plan: EditPlan, file: str, like: TensorRef, shape: tuple[int, ...]
                   ) -> TensorRef:
    """A new contiguous zero tensor of ``like``'s dtype and device, in a new storage record."""
    f = next(x for x in plan.ckpt.files if x.name == file)
    used = {int(k) for k in f.storages if k.isdigit()}
    used |= {int(k) for k in plan.new_records.get(file, {}) if k.isdigit()}
    key = str(max(used, default=-1) + 1)
    base = like.base
    st = like.storage
    assert st is not None
    numel = 1
    for d in shape:
        numel *= d
    stride = []
    acc = 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= d
    typed = st.typed_dtype is not None
    storage = Storage(("storage", st.storage_type, key, st.location,
                       numel if typed else numel * like.itemsize))
    f.storages[key] = storage
    args = (storage, 0, tuple(shape), tuple(reversed(stride)), False, OrderedDict(),
            *base.args[6:])
    func = base.func if isinstance(base.func, Global) else Global(
        "torch._utils", "_rebuild_tensor_v2", "allowed")
    t = TensorRef(Global(func.module, func.name, func.safety), args)
    plan.new_records.setdefault(file, {})[key] = bytes(numel * like.itemsize)
    return t


def set_hparams(ckpt: Checkpoint, assignments: dict[str, Any], groups: list[int] | None = None,
                optimizer: str | None = None, force: bool = False) -> EditPlan:
    """Set hyperparameters ``assignments`` in the selected groups (all when None)."""
    opt = ckpt.optimizer(optimizer)
    n = len(opt.groups)
    selected = list(range(n)) if groups is None else groups
    for g in selected:
        if not 0 <= g < n:
            raise EditError(f"{ckpt.path}: there is no group {g} (groups 0..{n - 1})")
    info = knowledge.optimizer_info(opt.type) if opt.type in knowledge.optimizer_types() \
        else None
    for key, value in assignments.items():
        if key in ("params", "param_names"):
            raise EditError(f"{key} cannot be set; use merge-groups to change groups")
        if info is None:
            if not force:
                raise EditError(f"{ckpt.path}: optimizer type is {opt.type}, so {key!r} cannot "
                                "be checked; pass --force to set it anyway")
            continue
        if key not in info.defaults and key not in knowledge.LR_LIKE_GROUP_KEYS:
            if not force:
                raise EditError(f"{opt.type} has no hyperparameter {key!r} (it has "
                                f"{', '.join(info.defaults)}); pass --force to add it anyway")
            continue
        default = info.defaults.get(key)
        if not _type_ok(default, value) and not force:
            raise EditError(f"{opt.type}.{key} expects a value like {default!r}, got {value!r}")
    plan = EditPlan(ckpt, "set")
    raw_groups = opt.raw["param_groups"]
    for g in selected:
        ptr = join(join(opt.pointer, "param_groups"), g)
        group = raw_groups[g]
        before = dict(group)
        for key, value in assignments.items():
            default = info.defaults.get(key) if info else None
            if isinstance(default, list) and isinstance(value, list):
                value = tuple(value)
            if isinstance(value, list):
                value = tuple(value)
            if isinstance(default, float) and isinstance(value, int):
                value = float(value)
            if key in group:
                if group[key] != value or type(group[key]) is not type(value):
                    plan.set(group, key, ptr, value)
            else:
                group[key] = value
                plan.changes.append(Change(join(ptr, key), None, value))
                plan.touch(ptr)
            opt.groups[g].hyperparameters[key] = group[key]
        if info is not None:
            _sync_state(plan, opt, g, before, group, info)
    plan.summary = (f"set: {', '.join(f'{k}={v!r}' for k, v in assignments.items())} in "
                    f"group{'s' if len(selected) > 1 else ''} "
                    f"{', '.join(map(str, selected))} of {opt.pointer or '(root)'} ({opt.type}); "
                    f"{len(plan.changes)} values changed")
    return plan


def _sync_state(plan: EditPlan, opt: Any, g: int, before: dict[str, Any],
                after: dict[str, Any], info: knowledge.OptimizerInfo) -> None:
    """Add (or drop) the state an option needs when the option is turned on (or off)."""
    file = plan.ckpt.file_for(opt.pointer or "").name if plan.ckpt.is_folder else ""
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
                        raise EditError(f"{sptr}: cannot tell the param's shape to add {key}")
                    entries[key] = new_zeros_like(plan, file, like, shape)
                    plan.changes.append(Change(join(sptr, key), None, f"zeros{list(shape)}"))
                    plan.touch(sptr)
                elif not now and key in entries:
                    old = entries.pop(key)
                    plan.changes.append(Change(join(sptr, key), old, None))
                    plan.touch(sptr)
