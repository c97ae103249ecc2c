"""What edits need to know about scheduler states: choosing the one that drives an optimizer,
their LR-like entries, and their nested schedulers (SequentialLR, ChainedScheduler)."""

from __future__ import annotations

from typing import Any

from .. import deepspeed, knowledge
from ..checkpoint import Checkpoint
from ..errors import AmbiguousError, EditError
from ..locate import OptimizerState, SchedulerState
from ..pairing import group_count, pair, per_group_keys
from ..tree import join


def _lr_list_keys() -> frozenset[str]:
    """Per-group scheduler lists that hold lrs (base_lrs, _last_lr, max_lrs, min_lrs, ...)."""
    return frozenset(k for t in knowledge.scheduler_types()
                     for k in knowledge.per_group_scheduler_keys(t)
                     if k.endswith("lrs") or k == "_last_lr")


LR_LIST_KEYS = _lr_list_keys()
LR_SCALAR_KEYS = ("eta_min",)  # one value shared by all groups (CosineAnnealingLR)


def _name(pointer: str) -> str:
    return pointer or "(root)"


def choose_scheduler(ckpt: Checkpoint, opt: OptimizerState, scheduler: str | None,
                     no_scheduler: bool, action: str) -> SchedulerState | None:
    """The known scheduler that drives ``opt``, None when there is none (or
    ``no_scheduler``); an error when that is ambiguous or the scheduler is of an unknown type.

    ``action`` names what the edit would do to the scheduler, for the error messages.
    """
    if no_scheduler:
        return None
    ls = deepspeed.launch_schedule(ckpt)
    if ls is not None and (scheduler is None or scheduler in ls.pointers):
        raise EditError(ls.message(), path=ckpt.path, pointer=ls.pointers[0],
                        hint=ls.hint())
    n = len(opt.groups)
    engine = deepspeed.engine_schedulers(ckpt) if deepspeed.is_deepspeed(ckpt) else []
    if engine and scheduler is None:  # DeepSpeed: the engine's scheduler, one copy per file
        _refuse_unknown(ckpt, [s for s in engine if not s.known], action)
        count = group_count(engine[0])
        if count not in (None, n):
            raise EditError(f"the DeepSpeed engine's scheduler {_name(engine[0].pointer)} keeps "
                            f"{count} per-group entries but optimizer {_name(opt.pointer)} has "
                            f"{n} groups", path=ckpt.path, pointer=engine[0].pointer,
                            hint="pass --no-scheduler to change only the optimizer")
        return engine[0]
    if scheduler is not None:
        for s in ckpt.schedulers:
            if s.pointer == scheduler:
                count = group_count(s)
                if count not in (None, n):
                    raise EditError(f"scheduler {_name(scheduler)} keeps {count} per-group "
                                    f"entries but optimizer {_name(opt.pointer)} has {n} groups",
                                    path=ckpt.path, pointer=scheduler,
                                    hint="pick the scheduler of this optimizer with "
                                         "--scheduler POINTER, or pass --no-scheduler")
                _refuse_unknown(ckpt, [s] if not s.known else [], action)
                return s
        raise EditError(f"no scheduler at {scheduler!r}; schedulers are at "
                        + (", ".join(repr(s.pointer) for s in ckpt.schedulers) or "nowhere"),
                        path=ckpt.path, pointer=scheduler)
    found = pair(ckpt.optimizers, ckpt.schedulers, opt)
    cands = found.candidates
    _refuse_unknown(ckpt, [s for s in cands if not s.known], action)
    if len(cands) > 1:
        raise AmbiguousError(f"several schedulers could drive optimizer {_name(opt.pointer)}: "
                             + ", ".join(_name(s.pointer) for s in cands),
                             path=ckpt.path, pointer=opt.pointer,
                             hint="pick one with --scheduler POINTER, or pass --no-scheduler "
                                  "to leave schedulers unchanged")
    return cands[0] if cands else None


def _refuse_unknown(ckpt: Checkpoint, unknown: list[SchedulerState], action: str) -> None:
    if not unknown:
        return
    what = "; ".join(f"{_name(s.pointer)} ({s.reason})" for s in unknown)
    if len(unknown) == 1:
        lead, it, its = "a scheduler", "it", "its"
    else:
        lead, it, its = "schedulers", "them", "their"
    raise EditError(f"{lead} of a type ckpttool does not know may drive this optimizer: "
                    f"{what}. ckpttool cannot {action} in {it}, and at {its} next step "
                    f"{'it' if len(unknown) == 1 else 'they'} would undo the edit",
                    path=ckpt.path, pointer=unknown[0].pointer,
                    hint=f"edit {it} yourself (or rebuild {it} from your config at resume) "
                         "and pass --no-scheduler to change only the optimizer")


def nested(state: dict[str, Any], pointer: str) -> list[SchedulerState]:
    """The scheduler states nested in ``state`` (SequentialLR / ChainedScheduler)."""
    out = []
    for key in ("_schedulers",):
        subs = state.get(key)
        if isinstance(subs, list):
            for i, sub in enumerate(subs):
                if isinstance(sub, dict):
                    t = knowledge.infer_scheduler(sub.keys()) or knowledge.UNKNOWN
                    out.append(SchedulerState(join(join(pointer, key), i), t, sub,
                                              known=t != knowledge.UNKNOWN,
                                              reason="nested scheduler of no torch class"))
    return out


def known_nested(s: SchedulerState, path: str, hint: str) -> list[SchedulerState]:
    """The schedulers nested in ``s``; an error if one is of a type ckpttool does not know."""
    subs = nested(s.raw, s.pointer)
    for sub in subs:
        if not sub.known:
            raise EditError(f"nested scheduler {sub.pointer} is of a type ckpttool does not "
                            "know", path=path, pointer=sub.pointer, hint=hint)
    return subs


def lr_list_keys(s: SchedulerState) -> list[str]:
    """The per-group keys of ``s`` holding learning rates."""
    return [k for k in per_group_keys(s) if k in LR_LIST_KEYS]
