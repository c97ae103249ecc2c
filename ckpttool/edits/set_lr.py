"""``set-lr``: change the learning rate so that a normal resume uses it, schedule scaled.

After ``optimizer.load_state_dict`` and ``scheduler.load_state_dict``, the next
``optimizer.step()`` uses each group's saved ``lr``; the scheduler then computes later lrs from
its own state (``base_lrs``, ``_last_lr``, nested ``_schedulers``, ``eta_min``) and from
LR-like keys in the groups (``initial_lr``, ``max_lr``, ``min_lr``). Scaling every one of them by
``k = LR / current lr`` makes the first step use LR and the schedule keep its shape, scaled.
"""

from __future__ import annotations

import re
from typing import Any

from .. import knowledge
from ..checkpoint import Checkpoint
from ..errors import EditError
from ..locate import OptimizerState, SchedulerState
from ..tree import join
from . import EditPlan, as_number

LR_GROUP_KEYS = knowledge.LR_LIKE_GROUP_KEYS

def _lr_list_keys() -> tuple[str, ...]:
    """Per-group scheduler lists that hold lrs (base_lrs, _last_lr, max_lrs, min_lrs, ...)."""
    keys = {k for t in knowledge.scheduler_types() for k in knowledge.per_group_scheduler_keys(t)
            if k.endswith("lrs") or k == "_last_lr"}
    return tuple(sorted(keys))


LR_SCHEDULER_LIST_KEYS = _lr_list_keys()
LR_SCHEDULER_SCALAR_KEYS = ("eta_min",)
NESTED_KEYS = ("_schedulers",)


def _group_count(s: SchedulerState) -> int | None:
    for k in ("_last_lr", "base_lrs", "min_lrs"):
        v = s.raw.get(k)
        if isinstance(v, list):
            return len(v)
    return None


def _trailing_index(pointer: str) -> str | None:
    m = re.search(r"/(\d+)$", pointer)
    return m.group(1) if m else None


def pair_scheduler(ckpt: Checkpoint, opt: OptimizerState, scheduler: str | None,
                   no_scheduler: bool = False) -> SchedulerState | None:
    """The scheduler that drives ``opt``: given, the only one that fits, or an error."""
    if no_scheduler:
        return None
    n = len(opt.groups)
    if scheduler is not None:
        for s in ckpt.schedulers:
            if s.pointer == scheduler:
                if _group_count(s) not in (None, n):
                    raise EditError(f"{ckpt.path}: scheduler {scheduler} has {_group_count(s)} "
                                    f"per-group entries but optimizer {opt.pointer or '(root)'} "
                                    f"has {n} groups")
                return s
        raise EditError(f"{ckpt.path}: no scheduler at {scheduler!r}; schedulers are at "
                        + (", ".join(repr(s.pointer) for s in ckpt.schedulers) or "nowhere"))
    fits = [s for s in ckpt.schedulers if _group_count(s) == n]
    if len(fits) <= 1:
        return fits[0] if fits else None
    # parallel lists (Lightning's optimizer_states/i and lr_schedulers/i)
    idx = _trailing_index(opt.pointer)
    same = [s for s in fits if idx is not None and _trailing_index(s.pointer) == idx]
    if len(same) == 1 and len(ckpt.optimizers) > 1:
        return same[0]
    raise EditError(f"{ckpt.path}: several schedulers could drive optimizer "
                    f"{opt.pointer or '(root)'}: " + ", ".join(s.pointer for s in fits)
                    + "; pick one with --scheduler POINTER or use --no-scheduler")


def _base_lr(opt: OptimizerState, sched: SchedulerState | None, g: int) -> float | None:
    group = opt.groups[g].hyperparameters
    if "max_lr" in group:  # OneCycleLR: the peak is the lr a user sets
        return as_number(group["max_lr"])
    if sched is not None and isinstance(sched.raw.get("base_lrs"), list):
        return as_number(sched.raw["base_lrs"][g])
    if "initial_lr" in group:
        return as_number(group["initial_lr"])
    return as_number(group.get("lr"))


def scale_scheduler(plan: EditPlan, state: dict[str, Any], pointer: str,
                    factors: dict[int, float], n_groups: int) -> None:
    """Scale the LR-like entries of a scheduler state (and its nested schedulers) in place."""
    for key in LR_SCHEDULER_LIST_KEYS:
        v = state.get(key)
        if isinstance(v, list) and len(v) == n_groups:
            for g, k in factors.items():
                x = as_number(v[g])
                if x is not None:
                    plan.set(v, g, join(pointer, key), x * k)
    for key in LR_SCHEDULER_SCALAR_KEYS:
        x = as_number(state.get(key))
        if x is None or x == 0:
            continue
        ks = set(factors.values())
        if len(factors) != n_groups or len(ks) != 1:
            raise EditError(f"{join(pointer, key)} = {x} is shared by all groups but the groups "
                            "get different factors; set every group to the same factor (no "
                            "--group) or use --no-scheduler")
        plan.set(state, key, pointer, x * ks.pop())
    for key in NESTED_KEYS:
        nested = state.get(key)
        if isinstance(nested, list):
            for i, sub in enumerate(nested):
                if isinstance(sub, dict):
                    scale_scheduler(plan, sub, join(join(pointer, key), i), factors, n_groups)


def set_lr(ckpt: Checkpoint, lr: float, groups: list[int] | None = None,
           optimizer: str | None = None, scheduler: str | None = None,
           no_scheduler: bool = False, base_lr: bool = False) -> EditPlan:
    """Make the next step after a normal resume use ``lr`` (per selected group).

    :param lr: the new learning rate (with ``base_lr``, the new base learning rate).
    :param groups: group indices to change; all when None.
    :param optimizer: JSON Pointer of the optimizer when the checkpoint has several.
    :param scheduler: JSON Pointer of the paired scheduler when pairing is ambiguous.
    :param no_scheduler: leave schedulers alone (only the optimizer's LR-like keys change).
    :param base_lr: ``lr`` is the base LR (initial_lr / base_lrs / max_lr); the current lr
        becomes ``lr`` times the schedule's current factor.
    """
    if not lr > 0:
        raise EditError(f"the learning rate must be positive, got {lr}")
    opt = ckpt.optimizer(optimizer)
    n = len(opt.groups)
    selected = list(range(n)) if groups is None else groups
    for g in selected:
        if not 0 <= g < n:
            raise EditError(f"{ckpt.path}: optimizer {opt.pointer or '(root)'} has groups "
                            f"0..{n - 1}; there is no group {g}")
    sched = pair_scheduler(ckpt, opt, scheduler, no_scheduler)
    plan = EditPlan(ckpt, "set-lr")
    factors: dict[int, float] = {}
    for g in selected:
        hp = opt.groups[g].hyperparameters
        ref = _base_lr(opt, sched, g) if base_lr else as_number(hp.get("lr"))
        if ref is None:
            raise EditError(f"{ckpt.path}: group {g} of {opt.pointer or '(root)'} has no "
                            "numeric lr")
        if ref == 0:
            what = "base lr" if base_lr else "current lr"
            hint = "" if base_lr else ("; use --base-lr to set the base LR the schedule "
                                       "scales from")
            raise EditError(f"{ckpt.path}: group {g} has {what} 0 (warm-up start or decayed "
                            f"to zero), so it cannot be scaled{hint}")
        factors[g] = lr / ref
    raw_groups = opt.raw["param_groups"]
    for g, k in factors.items():
        ptr = join(join(opt.pointer, "param_groups"), g)
        for key in LR_GROUP_KEYS:
            if key in raw_groups[g]:
                x = as_number(raw_groups[g][key])
                if x is not None:
                    new = lr if key == "lr" and not base_lr else x * k
                    plan.set(raw_groups[g], key, ptr, new)
                    opt.groups[g].hyperparameters[key] = raw_groups[g][key]
    if sched is not None:
        scale_scheduler(plan, sched.raw, sched.pointer, factors, n)
    where = f"optimizer {opt.pointer or '(root)'}"
    sname = f", scheduler {sched.pointer or '(root)'} ({sched.type}) scaled to match" \
        if sched else (" (no scheduler)" if not ckpt.schedulers or no_scheduler else "")
    kinds = ", ".join(f"group {g} x{k:.6g}" for g, k in factors.items())
    plan.summary = (f"set-lr: {'base ' if base_lr else ''}lr {lr:g} in {where} ({kinds})"
                    f"{sname}; {len(plan.changes)} values changed")
    if sched is None and ckpt.schedulers and not no_scheduler:
        plan.notes.append("no scheduler matches this optimizer's groups; only the optimizer "
                          "changed")
    return plan
