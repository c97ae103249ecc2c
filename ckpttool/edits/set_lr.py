"""``set-lr``: change the learning rate so that a normal resume uses it, schedule scaled.

After ``optimizer.load_state_dict`` and ``scheduler.load_state_dict``, the next
``optimizer.step()`` uses each group's saved ``lr``; the scheduler then computes later lrs from
its own state (``base_lrs``, ``_last_lr``, nested ``_schedulers``, ``eta_min``) and from
LR-like keys in the groups (``initial_lr``, ``max_lr``, ``min_lr``, ``swa_lr``). Scaling every
one of them by ``k = new lr / current lr`` makes the first step use the new lr and the schedule
keep its shape, scaled.

Groups of different lrs (layer-wise decay, head/backbone splits) need intent: ``ratios="keep"``
scales every selected group by the factor that takes the largest lr to LR, ``ratios="same"``
gives every selected group LR, ``scale=F`` multiplies every selected group by F. Without one of
them the edit refuses and lists the lrs. Multipliers that frameworks keep in the groups
(timm ``lr_scale``, mmengine ``lr_mult``) are not lrs and are left alone.
"""

from __future__ import annotations

import math

from .. import deepspeed, knowledge
from ..checkpoint import Checkpoint
from ..errors import AmbiguousError, EditError
from ..locate import OptimizerState, SchedulerState
from ..tree import join
from . import Plan, TreeEditor, as_number, close
from .schedules import LR_SCALAR_KEYS, choose_scheduler, known_nested, lr_list_keys

LR_GROUP_KEYS = knowledge.LR_LIKE_GROUP_KEYS


def _base_lr(opt: OptimizerState, sched: SchedulerState | None, g: int) -> float | None:
    group = opt.groups[g].hyperparameters
    if "max_lr" in group:  # OneCycleLR: the peak is the lr a user sets
        return as_number(group["max_lr"])
    if sched is not None and isinstance(sched.raw.get("base_lrs"), list):
        return as_number(sched.raw["base_lrs"][g])
    if "initial_lr" in group:
        return as_number(group["initial_lr"])
    return as_number(group.get("lr"))


def _scale_scheduler(ed: TreeEditor, s: SchedulerState, factors: dict[int, float],
                     n_groups: int, hint: str, exact: dict[int, tuple[float, float]]) -> None:
    """Scale the LR-like entries of ``s`` by each group's factor. ``exact`` maps a group to
    (old lr, new lr): a ``_last_lr`` equal to the old lr becomes the new lr exactly."""
    for key in lr_list_keys(s):
        v = s.raw.get(key)
        if isinstance(v, list) and len(v) == n_groups:
            for g, k in factors.items():
                x = as_number(v[g])
                if x is None or k == 1.0:
                    continue
                new = x * k
                if key == "_last_lr" and g in exact and x == exact[g][0]:
                    new = exact[g][1]
                if new != x:
                    ed.set_number(join(join(s.pointer, key), g), new)
    for key in LR_SCALAR_KEYS:
        x = as_number(s.raw.get(key))
        if x is None or x == 0:
            continue
        ks = {factors.get(g, 1.0) for g in range(n_groups)}
        if len(ks) != 1:
            raise EditError(f"{key} = {x:g} is one value shared by all {n_groups} groups of "
                            f"the {s.type} scheduler, but the groups would be scaled by "
                            "different factors", path=ed.ckpt.path,
                            pointer=join(s.pointer, key), key=key, hint=hint)
        k = ks.pop()
        if k != 1.0:
            ed.set_number(join(s.pointer, key), x * k)
    for sub in known_nested(s, ed.ckpt.path, "pass --no-scheduler to change only the optimizer"):
        _scale_scheduler(ed, sub, factors, n_groups, hint, exact)


def set_lr(ckpt: Checkpoint, lr: float | None = None, *, scale: float | None = None,
           ratios: str | None = None, groups: list[int] | None = None,
           optimizer: str | None = None, scheduler: str | None = None,
           no_scheduler: bool = False, base_lr: bool = False) -> Plan:
    """Make the next step after a normal resume use ``lr`` (per selected group).

    Args:
        ckpt: the checkpoint (not changed; the plan's ``result`` is the edited one).
        lr: the new learning rate (with ``base_lr``, the new base learning rate).
        scale: instead of ``lr``, multiply every selected group's lr by this factor.
        ratios: when the selected groups have different lrs: ``"keep"`` (the largest
            becomes ``lr``, the others keep their ratio to it) or ``"same"`` (every group
            becomes ``lr``). Without it such a request is an :class:`AmbiguousError`.
        groups: group indices to change; all when None.
        optimizer: JSON Pointer of the optimizer when the checkpoint has several.
        scheduler: JSON Pointer of the scheduler when pairing is ambiguous.
        no_scheduler: leave schedulers alone (only the optimizer's LR-like keys change).
        base_lr: ``lr`` is the base LR (initial_lr / base_lrs / max_lr); the current lr
            becomes ``lr`` times the schedule's current factor.

    Returns:
        The plan; ``plan.result`` is the edited checkpoint.
    """
    if (lr is None) == (scale is None):
        raise EditError("give either a new learning rate or a scale factor (not both)",
                        hint="for example `set-lr PATH 1e-4` or `set-lr PATH --scale 0.5`")
    value = lr if lr is not None else scale
    assert value is not None
    if not (value > 0 and math.isfinite(value)):
        what = "learning rate" if lr is not None else "scale factor"
        raise EditError(f"the {what} must be positive and finite, got {value}")
    if ratios not in (None, "keep", "same"):
        raise EditError(f"ratios must be 'keep' or 'same', not {ratios!r}")
    opt, ranks = deepspeed.logical_optimizer(ckpt, optimizer)
    where = f"optimizer {opt.pointer or '(root)'}"
    n = len(opt.groups)
    selected = list(range(n)) if groups is None else list(dict.fromkeys(groups))
    for g in selected:
        if not 0 <= g < n:
            raise EditError(f"{where} has groups 0..{n - 1}; there is no group {g}",
                            path=ckpt.path, pointer=opt.pointer)
    sched = choose_scheduler(ckpt, opt, scheduler, no_scheduler, "scale the learning rates")
    refs: dict[int, float] = {}
    for g in selected:
        hp = opt.groups[g].hyperparameters
        ref = _base_lr(opt, sched, g) if base_lr else as_number(hp.get("lr"))
        if ref is None:
            raise EditError(f"group {g} of {where} has no numeric lr", path=ckpt.path,
                            pointer=join(join(opt.pointer, "param_groups"), g), key="lr")
        if ref == 0 and scale is None:
            what = "base lr" if base_lr else "current lr"
            raise EditError(f"group {g} of {where} has {what} 0 (warm-up start or decayed "
                            "to zero), so it cannot be scaled", path=ckpt.path,
                            pointer=join(join(opt.pointer, "param_groups"), g), key="lr",
                            hint=None if base_lr else "use --base-lr to set the base LR "
                                                      "the schedule scales from")
        refs[g] = ref
    what = "base lr" if base_lr else "lr"
    differ = len(selected) > 1 and not all(close(refs[g], refs[selected[0]]) for g in selected)
    targets: dict[int, float] = {}
    if scale is not None:
        factors = {g: scale for g in selected}
        how = f"x{scale:g}"
    elif differ and ratios is None:
        listing = ", ".join(f"group {g}: {refs[g]:g}" for g in selected)
        raise AmbiguousError(f"the groups of {where} have different {what}s ({listing})",
                             path=ckpt.path, pointer=opt.pointer,
                             hint=f"pass --keep-ratios to make the largest {what} {lr:g} and "
                                  "scale the others by the same factor, --same to give "
                                  f"every group {what} {lr:g}, or --scale F to multiply each "
                                  "by F")
    elif differ and ratios == "keep":
        top = max(refs.values())
        assert lr is not None
        factors = {g: lr / top for g in selected}
        targets = {g: lr for g in selected if refs[g] == top}
        how = f"largest {what} {lr:g}, ratios kept"
    else:
        assert lr is not None
        factors = {g: lr / refs[g] for g in selected}
        targets = {g: lr for g in selected}
        how = f"{what} {lr:g}"
    ed = TreeEditor(ckpt, "set-lr")
    exact: dict[int, tuple[float, float]] = {}
    for o in ranks:  # a DeepSpeed ZeRO optimizer: every rank's file holds the same groups
        for g, k in factors.items():
            ptr = join(join(o.pointer, "param_groups"), g)
            hp = o.groups[g].hyperparameters
            for key in LR_GROUP_KEYS:
                x = as_number(hp.get(key))
                if x is None:
                    continue
                target = targets.get(g) if key == "lr" and not base_lr else None
                new = target if target is not None else x * k
                if key == "lr" and o is opt:
                    exact[g] = (x, new)
                if new != x:
                    ed.set_number(join(ptr, key), new)
    cfg = _config_lr(ed, ckpt, factors, n, exact)
    if no_scheduler and (ls := deepspeed.launch_schedule(ckpt)) is not None:
        ed.notes.append(ls.note())
    if sched is not None:
        if groups is not None:
            hint = ("select every group (drop --group) or pass --no-scheduler")
        elif ratios == "same":
            hint = "use --keep-ratios or --scale F (one factor for all groups), or pass " \
                   "--no-scheduler"
        else:
            hint = "pass --no-scheduler"
        for s in deepspeed.scheduler_copies(ckpt, sched):  # ZeRO-3: one per model file
            _scale_scheduler(ed, s, factors, n, hint, exact)
    if len(factors) > 1 and len(set(factors.values())) == 1:
        kinds = f"groups {', '.join(map(str, factors))} x{next(iter(factors.values())):.6g}"
    else:
        kinds = ", ".join(f"group {g} x{k:.6g}" for g, k in factors.items())
    if sched is not None:
        also = " and its copy in every other rank's model file" \
            if len(deepspeed.scheduler_copies(ckpt, sched)) > 1 else ""
        sname = f"; scheduler {sched.pointer or '(root)'} ({sched.type}){also} scaled to match"
    else:
        sname = "; schedulers left unchanged (--no-scheduler)" if no_scheduler \
            else "; no scheduler"
    changed = len(ed.changes)
    copies = deepspeed.ranks_text(ckpt, ranks)
    return ed.finish(f"set-lr: {how} in {where} ({kinds}){copies}{cfg}{sname}; {changed} value"
                     f"{'' if changed == 1 else 's'} changed")


def _config_lr(ed: TreeEditor, ckpt: Checkpoint, factors: dict[int, float], n: int,
               exact: dict[int, tuple[float, float]]) -> str:
    """Change the lr in the copies of the DeepSpeed config the checkpoint keeps
    (``ds_config["optimizer"]["params"]["lr"]``), as the groups changed; a summary part."""
    copies = [c for c in deepspeed.config_copies(ckpt) if as_number(c.params.get("lr")) is not None]
    if not copies:
        return ""
    x = as_number(copies[0].params["lr"])
    assert x is not None
    ks = set(factors.values())
    new: float | None = None
    for old, target in exact.values():  # a group that had the config's lr: its new lr
        if close(old, x):
            new = target
            break
    if new is None and len(factors) == n and len(ks) == 1:
        new = x * ks.pop()
    if new is None:
        ed.notes.append(f"the DeepSpeed config's optimizer lr ({x:g}, ds_config in "
                        f"{len(copies)} file{'s' if len(copies) > 1 else ''}) was left as it "
                        "was: the groups changed by different factors")
        return ""
    for c in copies:
        if as_number(c.params["lr"]) != new:
            ed.set_number(join(c.pointer, "lr"), new)
    return f"; ds_config optimizer lr {new:g} in {len(copies)} file{'s' if len(copies) > 1 else ''}"
