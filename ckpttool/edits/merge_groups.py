"""``merge-groups``: merge param groups whose hyperparameters agree into one.

The merged group lists its params in ``model.parameters()`` order when names are known, so
the result loads into an optimizer built from ``model.parameters()``; param ids are renumbered
as torch numbers them (consecutively across groups) and the state follows its param. The
paired scheduler's per-group lists are merged to match.
"""

from __future__ import annotations

import math
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import EditError
from ..tree import join
from . import Change, EditPlan, as_number
from .set_lr import LR_GROUP_KEYS, LR_SCHEDULER_LIST_KEYS, NESTED_KEYS, pair_scheduler

_SKIP = ("params", "param_names")


def merge_groups(ckpt: Checkpoint, groups: list[int] | None = None,
                 sets: dict[str, Any] | None = None, optimizer: str | None = None,
                 scheduler: str | None = None, no_scheduler: bool = False) -> EditPlan:
    """Merge ``groups`` (all when None) of an optimizer into the first of them."""
    sets = dict(sets or {})
    opt = ckpt.optimizer(optimizer)
    raw = opt.raw
    n = len(opt.groups)
    sel = sorted(set(range(n) if groups is None else groups))
    if len(sel) < 2:
        raise EditError(f"{ckpt.path}: merging needs at least two groups (got {sel}; the "
                        f"optimizer has {n})")
    for g in sel:
        if not 0 <= g < n:
            raise EditError(f"{ckpt.path}: there is no group {g} (groups 0..{n - 1})")
    rg = raw["param_groups"]
    if "lr" in sets:
        # LR-like keys (initial_lr, max_lr, ...) follow the merged lr as the scheduler does
        for key in LR_GROUP_KEYS:
            if key == "lr" or key in sets or all(key not in rg[g] for g in sel):
                continue
            scaled = _rescaled([rg[g].get(key) for g in sel], [rg[g].get("lr") for g in sel],
                               sets["lr"])
            if scaled is not None:
                sets[key] = scaled
    first = {k: v for k, v in rg[sel[0]].items() if k not in _SKIP}
    first.update(sets)
    differ = []
    for g in sel[1:]:
        other = {k: v for k, v in rg[g].items() if k not in _SKIP}
        other.update(sets)
        for k in sorted(set(first) | set(other)):
            if first.get(k, "<missing>") != other.get(k, "<missing>") and k not in differ:
                differ.append(k)
    if differ:
        detail = "; ".join(f"{k}: " + ", ".join(f"group {g}={rg[g].get(k, '<missing>')!r}"
                                                for g in sel) for k in differ)
        raise EditError(f"{ckpt.path}: groups {', '.join(map(str, sel))} differ in {detail}; "
                        "give the merged value with --set KEY=VALUE")
    sched = pair_scheduler(ckpt, opt, scheduler, no_scheduler)
    plan = EditPlan(ckpt, "merge-groups")
    plan.touch(opt.pointer)
    # merged param order
    merged = [p for g in sel for p in rg[g]["params"]]
    if opt.model_order is not None and all(p in opt.model_order for p in merged):
        merged.sort(key=lambda p: opt.model_order[p])  # type: ignore[index]
        order_note = "in model order"
    else:
        order_note = "in group order (parameter names unknown: check the order)"
        plan.notes.append("parameter names are not known, so merged params keep group order; "
                          "an optimizer built from model.parameters() may list them otherwise")
    names = {p: n for g in opt.groups for p, n in zip(g.params, g.param_names)}
    new_groups = []
    for i, group in enumerate(rg):
        if i == sel[0]:
            ng = dict(group)
            for k, v in sets.items():
                ng[k] = tuple(v) if isinstance(v, list) else v
            if "param_names" in group:
                ng["param_names"] = [names[p] for p in merged]
            ng["params"] = merged
            new_groups.append(ng)
        elif i not in sel:
            new_groups.append(group)
    # torch numbers params consecutively across groups: renumber and move the state along
    renumber: dict[int, int] = {}
    for ng in new_groups:
        for p in ng["params"]:
            renumber[p] = len(renumber)
    orphans = [p for p in raw["state"] if p not in renumber]
    if orphans:
        raise EditError(f"{ckpt.path}: state for param ids {orphans} that no group lists; "
                        "cannot renumber safely")
    for ng in new_groups:
        ng["params"] = [renumber[p] for p in ng["params"]]
    old_state = raw["state"]
    new_state = type(old_state)()
    for old in sorted(old_state, key=lambda p: renumber[p]):
        new_state[renumber[old]] = old_state[old]
    before = [len(g["params"]) for g in rg]
    raw["param_groups"] = new_groups
    raw["state"] = new_state
    plan.changes.append(Change(join(opt.pointer, "param_groups"), f"{n} groups {before}",
                               f"{len(new_groups)} groups "
                               f"{[len(g['params']) for g in new_groups]}"))
    if sched is not None:
        _merge_scheduler(plan, sched.raw, sched.pointer, sel, n, sets, rg)
    plan.summary = (f"merge-groups: groups {', '.join(map(str, sel))} of "
                    f"{opt.pointer or '(root)'} merged into group {sel[0]} ({len(merged)} "
                    f"params, {order_note})"
                    + (f"; scheduler {sched.pointer} lists merged" if sched else ""))
    return plan


def _rescaled(values: list[Any], lrs: list[Any], new_lr: Any) -> float | None:
    """The one value ``values[i] * new_lr / lrs[i]`` gives for every i, else None."""
    out = []
    for x, old in zip(values, lrs):
        xf, of = as_number(x), as_number(old)
        if xf is None or not of or as_number(new_lr) is None:
            return None
        out.append(xf * float(new_lr) / of)
    if all(math.isclose(v, out[0], rel_tol=1e-9, abs_tol=0.0) for v in out):
        return out[0]
    return None


def _merge_scheduler(plan: EditPlan, state: dict[str, Any], pointer: str, sel: list[int],
                     n: int, sets: dict[str, Any], old_groups: list[dict[str, Any]]) -> None:
    for key, v in list(state.items()):
        if key in NESTED_KEYS and isinstance(v, list):
            for i, sub in enumerate(v):
                if isinstance(sub, dict):
                    _merge_scheduler(plan, sub, join(join(pointer, key), i), sel, n, sets,
                                     old_groups)
            continue
        if not (isinstance(v, list) and len(v) == n) or key == "_schedulers":
            continue
        vals = [v[g] for g in sel]
        if all(x == vals[0] for x in vals):
            merged = vals[0]
        elif key in LR_SCHEDULER_LIST_KEYS and "lr" in sets:
            scaled = _rescaled(vals, [old_groups[g].get("lr") for g in sel], sets["lr"])
            if scaled is None:
                raise EditError(f"{join(pointer, key)}: cannot rescale {vals} to one value for "
                                "the merged lr (the groups follow different schedules)")
            merged = scaled
        else:
            raise EditError(f"{join(pointer, key)} differs between groups "
                            f"{', '.join(map(str, sel))} ({vals}); the scheduler cannot be "
                            "merged (set lr with --set lr=VALUE, or use --no-scheduler)")
        new = [x for i, x in enumerate(v) if i not in sel[1:]]
        new[sel[0]] = merged
        state[key] = new
        plan.changes.append(Change(join(pointer, key), v, new))
        plan.touch(pointer)
