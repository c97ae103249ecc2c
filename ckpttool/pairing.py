"""Which LR scheduler drives which optimizer.

A scheduler's state does not name its optimizer, so the pairing is read off the checkpoint's
structure, in this order:

1. **Per-group lists.** A scheduler keeps one entry per param group in the keys that are
   per-group for its type (``base_lrs``, ``_last_lr``, ``min_lrs``, ... from the shipped torch
   knowledge; never ``_schedule_phases``, ``milestones`` or nested lists). A scheduler whose
   lists have another length cannot drive the optimizer. (Schedulers of unknown types are
   never ruled out this way: what their lists hold is not known.)
2. **Parallel lists.** Lightning's ``/optimizer_states/i`` pairs with ``/lr_schedulers/i``:
   two pointers ending in list indices pair when the indices are equal.
3. **Names.** The last name of each pointer without the words "optimizer" / "scheduler" (and
   a file's extension): ``optimizer_1.bin`` pairs with ``scheduler_1.bin``, ``opt_G`` with
   ``sched_G``, ``optimizer`` with ``lr_scheduler``, mmengine's ``optimizer/generator`` with
   ``param_schedulers/generator/0``. Different names never pair.

With a single optimizer in the checkpoint every scheduler that fits the group count drives it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import knowledge
from .locate import OptimizerState, SchedulerState
from .tree import split

_OPT_WORDS = re.compile(r"^(optimi[sz]er|optim|opt)(_?states?)?(?=$|[_\-.])"
                        r"|(optimi[sz]er|optim|opt)$")
_SCHED_WORDS = re.compile(r"^(param_|lr_)?(scheduler|sched)s?(?=$|[_\-.])|(scheduler|sched)s?$")
_EXTENSIONS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".safetensors")


def per_group_keys(s: SchedulerState) -> tuple[str, ...]:
    """Keys of ``s`` that hold one entry per param group (for its type, when known)."""
    if s.known:
        return knowledge.per_group_scheduler_keys(s.type)
    return tuple(k for k in ("base_lrs", "_last_lr", "base_values", "min_lrs") if k in s.raw)


def group_count(s: SchedulerState) -> int | None:
    """How many param groups ``s`` keeps lists for, or None when its state does not say."""
    lengths = {len(v) for k in per_group_keys(s)
               if isinstance(v := s.raw.get(k), list)}
    return lengths.pop() if len(lengths) == 1 else None


def _tag(pointer: str, words: re.Pattern[str]) -> str | None:
    """The name left of a pointer's last named token once the role word is removed."""
    tokens = [t for t in split(pointer) if not t.isdigit()]
    if not tokens:
        return None
    last = tokens[-1]
    for ext in _EXTENSIONS:
        if last.endswith(ext):
            last = last[:-len(ext)]
    stripped = words.sub("", last.lower())
    return stripped.strip("_-. ")


def _index(pointer: str) -> str | None:
    tokens = split(pointer)
    return tokens[-1] if tokens and tokens[-1].isdigit() else None


def affinity(opt: OptimizerState, s: SchedulerState) -> bool | None:
    """True when the structure pairs them, False when it pairs them with others, None when
    it does not say."""
    i, j = _index(opt.pointer), _index(s.pointer)
    if i is not None and j is not None:
        return i == j
    a, b = _tag(opt.pointer, _OPT_WORDS), _tag(s.pointer, _SCHED_WORDS)
    if a is None or b is None:
        return None
    return a == b


@dataclass
class Pairing:
    """The schedulers that may drive an optimizer (``candidates``; one when it is certain)
    and how that was decided."""

    candidates: list[SchedulerState]
    how: str

    @property
    def scheduler(self) -> SchedulerState | None:
        return self.candidates[0] if len(self.candidates) == 1 else None


def pair(optimizers: list[OptimizerState], schedulers: list[SchedulerState],
         opt: OptimizerState) -> Pairing:
    """The schedulers that drive ``opt`` among ``schedulers`` (see the module docstring)."""
    n = len(opt.groups)
    # an unknown scheduler's lists need not be one per group (mmengine keeps one more for
    # its base_param_settings), so their length never rules it out
    fits = [s for s in schedulers if not s.known or group_count(s) in (None, n)]
    if len(fits) <= 1:
        return Pairing(fits, "the only scheduler with as many groups" if fits else "none fits")
    marks = [(s, affinity(opt, s)) for s in fits]
    sure = [s for s, a in marks if a is True]
    if sure:
        return Pairing(sure, "pointer names")
    if len(optimizers) == 1:
        return Pairing(fits, "single optimizer")
    return Pairing([s for s, a in marks if a is None], "undecided")
