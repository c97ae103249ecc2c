"""``merge-groups``: merge param groups whose hyperparameters agree into one.

The merged group lists its params in ``model.parameters()`` order when names are known, so
the result loads into an optimizer built from ``model.parameters()``; param ids are renumbered
as torch numbers them (consecutively across groups) and the state follows its param. The
paired scheduler's per-group lists are merged to match.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from .. import deepspeed, knowledge
from ..checkpoint import Checkpoint
from ..errors import EditError
from ..locate import SchedulerState, is_name_keyed
from ..pairing import per_group_keys
from ..tree import join
from . import Plan, TreeEditor, as_number
from .schedules import LR_LIST_KEYS, choose_scheduler, known_nested

LR_GROUP_KEYS = knowledge.LR_LIKE_GROUP_KEYS

_SKIP = ("params", "param_names")


def merge_groups(ckpt: Checkpoint, groups: list[int] | None = None,
                 sets: dict[str, Any] | None = None, optimizer: str | None = None,
                 scheduler: str | None = None, no_scheduler: bool = False,
                 force: bool = False) -> Plan:
    """Merge param groups of an optimizer into the first of them.

    Args:
        ckpt: the checkpoint (not changed; the plan's ``result`` is the edited one).
        groups: indices of the groups to merge (all when None); at least two.
        sets: values for hyperparameters that differ between the groups (``lr`` also
            rescales the LR-like keys and the scheduler's lists).
        optimizer: JSON Pointer of the optimizer when the checkpoint has several.
        scheduler: JSON Pointer of the scheduler when pairing is ambiguous.
        no_scheduler: leave schedulers unchanged.
        force: merge in group order even when the params' model order is unknown.

    Raises:
        EditError: the groups differ in a value not given in ``sets``; the params' model
            order is unknown (without ``force``); the scheduler cannot follow.
    """
    sets = dict(sets or {})
    deepspeed.refuse_zero(ckpt, optimizer, "merge param groups")
    opt = ckpt.optimizer(optimizer)
    where = f"optimizer {opt.pointer or '(root)'}"
    raw = opt.raw
    n = len(opt.groups)
    sel = sorted(set(range(n) if groups is None else groups))
    for g in sel:
        if not 0 <= g < n:
            raise EditError(f"{where} has groups 0..{n - 1}; there is no group {g}",
                            path=ckpt.path, pointer=opt.pointer)
    if len(sel) < 2:
        raise EditError(f"merging needs at least two groups (got {sel}; {where} has {n})",
                        path=ckpt.path, pointer=opt.pointer)
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
        raise EditError(f"groups {', '.join(map(str, sel))} of {where} differ in {detail}",
                        path=ckpt.path, pointer=opt.pointer, key=differ[0],
                        hint="give the merged value with --set KEY=VALUE")
    merged = [p for g in sel for p in rg[g]["params"]]
    order = opt.model_order
    if order is not None and all(p in order for p in merged):
        merged.sort(key=lambda p: order[p])
        order_note = "in model order"
    elif not force:
        why = opt.names_note or "the checkpoint has no model state to order the names by"
        raise EditError(f"the model order of the params of {where} is unknown ({why}), so "
                        "the merged group's param order would be a guess and the state could "
                        "land on the wrong parameters at load", path=ckpt.path,
                        pointer=opt.pointer,
                        hint="pass --force to merge in group order anyway (then build the "
                             "optimizer with the params in that order)")
    else:
        order_note = "in group order (--force; the model order is unknown)"
    sched = choose_scheduler(ckpt, opt, scheduler, no_scheduler, "merge the per-group lists")
    ed = TreeEditor(ckpt, "merge-groups")
    names = {p: nm for g in opt.groups for p, nm in zip(g.params, g.param_names)}
    new_groups: list[Any] = []
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
    # (a name-keyed state dict keeps its names)
    renumber: dict[Any, Any] = {}
    for ng in new_groups:
        for p in ng["params"]:
            renumber[p] = p if is_name_keyed(opt) else len(renumber)
    orphans = [p for p in raw["state"] if p not in renumber]
    if orphans:
        raise EditError(f"{where} has state for param ids {orphans} that no group lists; "
                        "they cannot be renumbered safely", path=ckpt.path,
                        pointer=join(opt.pointer, "state"))
    for k, ng in enumerate(new_groups):
        if any(renumber[p] != p for p in ng["params"]):
            ng = dict(ng)
            ng["params"] = [renumber[p] for p in ng["params"]]
            new_groups[k] = ng
    old_state = raw["state"]
    new_state = copy.copy(old_state)
    new_state.clear()
    keys = list(old_state) if is_name_keyed(opt) else sorted(old_state, key=lambda p: renumber[p])
    for old in keys:
        new_state[renumber[old]] = old_state[old]
    before = f"{n} groups {[len(g['params']) for g in rg]}"
    after = f"{len(new_groups)} groups {[len(g['params']) for g in new_groups]}"
    ed.set(join(opt.pointer, "param_groups"), new_groups, shown=after, shown_before=before)
    if list(new_state) != list(old_state) or \
            any(new_state[k] is not old_state[k] for k in new_state):
        ed.set(join(opt.pointer, "state"), new_state,
               shown=f"{len(new_state)} entries renumbered",
               shown_before=f"{len(old_state)} entries")
    if sched is not None:
        _merge_scheduler(ed, sched, sel, n, sets, rg)
    return ed.finish(f"merge-groups: groups {', '.join(map(str, sel))} of {where} merged into "
                     f"group {sel[0]} ({len(merged)} params, {order_note})"
                     + (f"; scheduler {sched.pointer or '(root)'} lists merged" if sched
                        else ""))


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


def _merge_scheduler(ed: TreeEditor, s: SchedulerState, sel: list[int], n: int,
                     sets: dict[str, Any], old_groups: list[dict[str, Any]]) -> None:
    """Merge the per-group lists of ``s`` (and of its nested schedulers) like the groups."""
    for key in per_group_keys(s):
        v = s.raw.get(key)
        if not (isinstance(v, list) and len(v) == n):
            continue
        vals = [v[g] for g in sel]
        if all(x == vals[0] for x in vals):
            merged = vals[0]
        elif key in LR_LIST_KEYS and "lr" in sets:
            scaled = _rescaled(vals, [old_groups[g].get("lr") for g in sel], sets["lr"])
            if scaled is None:
                raise EditError(f"cannot rescale {vals} to one value for the merged lr (the "
                                "groups follow different schedules)", path=ed.ckpt.path,
                                pointer=join(s.pointer, key), key=key,
                                hint="pass --no-scheduler and rebuild the scheduler at resume")
            merged = scaled
        else:
            raise EditError(f"{key} differs between groups {', '.join(map(str, sel))} "
                            f"({vals}), so the {s.type} scheduler cannot be merged",
                            path=ed.ckpt.path, pointer=join(s.pointer, key), key=key,
                            hint="set the merged lr with --set lr=VALUE, or pass "
                                 "--no-scheduler")
        new = [x for i, x in enumerate(v) if i not in sel[1:]]
        new[sel[0]] = merged
        ed.set(join(s.pointer, key), new)
    for sub in known_nested(s, ed.ckpt.path, "pass --no-scheduler to leave schedulers unchanged"):
        _merge_scheduler(ed, sub, sel, n, sets, old_groups)
