"""Run folders: a folder of independent checkpoints (``epoch_1.pt``, ``last.pt``, Lightning's
``epoch=3-step=400.ckpt``, transformers' ``checkpoint-N/``), one row per checkpoint.

Each checkpoint is opened on its own (metadata only), so nothing is ever aligned across
files of different checkpoints. Which folders are one checkpoint and which are runs is decided
by :func:`ckpttool.checkpoint.folder_layout`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import CKPT_SUFFIXES, Checkpoint, folder_layout, open_checkpoint
from .errors import CkptError, UnreadableError
from .tree import is_tensor_node

MAX_DEPTH = 3  # run folders inside run folders (lightning_logs/version_0/checkpoints/)

# where trainers keep their progress counters, by column: top-level keys of a file (or of a
# folder's files, trainer_state.json included), and mmengine's ``meta`` dict
_PROGRESS_KEYS = {
    "epoch": ("epoch", "epochs"),
    "step": ("step", "iter", "iteration", "steps"),
    "global_step": ("global_step", "global_steps"),
}


@dataclass
class RunOptimizer:
    pointer: str
    type: str
    lrs: list[Any]  # each group's lr
    step: Any  # the largest ``step`` of its per-param state (or of its groups), or None


@dataclass
class RunScheduler:
    pointer: str
    type: str
    last_epoch: Any


@dataclass
class RunEntry:
    """One checkpoint of a run: where it is (relative to the run folder) and what it says about
    its progress. ``error`` is set (and the rest empty) when it cannot be read."""

    path: str
    format: str = ""
    size: int = 0
    epoch: Any = None
    step: Any = None
    global_step: Any = None
    optimizers: list[RunOptimizer] = field(default_factory=list)
    schedulers: list[RunScheduler] = field(default_factory=list)
    safety: str = ""
    followed: str | None = None
    error: str | None = None

    @property
    def sort_key(self) -> tuple[Any, ...]:
        """By step: the stored global_step, else step, else the optimizer's step; then epoch;
        then path. Rows that store none of them come last."""
        steps = [self.global_step, self.step] + [o.step for o in self.optimizers]
        s = next((_num(x) for x in steps if _num(x) is not None), None)
        e = _num(self.epoch)
        return (s is None, s or 0, e is None, e or 0, self.path)


@dataclass
class Run:
    """A run folder: its checkpoints sorted by step, and what else it holds."""

    path: str
    entries: list[RunEntry]
    other_files: list[str]


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return v
    return None


def is_run(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder of independent checkpoints (by its layout)."""
    p = os.fspath(path)
    return os.path.isdir(p) and folder_layout(p, sorted(os.listdir(p))) == "run"


def run_members(path: str, depth: int = MAX_DEPTH) -> list[str]:
    """The checkpoints of a run folder, relative to it: files with a checkpoint suffix, and
    subfolders that are one checkpoint each; subfolders that are runs are searched too (down to
    ``depth`` levels), and a DeepSpeed run folder gives each of its ``global_stepN/``."""
    out, _ = _members(path, "", depth)
    return out


def _members(path: str, rel: str, depth: int) -> tuple[list[str], list[str]]:
    here = os.path.join(path, rel) if rel else path
    try:
        names = sorted(os.listdir(here))
    except OSError:
        return [], [rel + "/"]
    out: list[str] = []
    other: list[str] = []
    for n in names:
        fp = os.path.join(here, n)
        r = os.path.join(rel, n) if rel else n
        if os.path.isdir(fp):
            if os.path.islink(fp):
                other.append(r + "/")
                continue
            try:
                sub = sorted(os.listdir(fp))
            except OSError:
                other.append(r + "/")
                continue
            layout = folder_layout(fp, sub)
            if layout in ("run", "deepspeed-run"):
                if depth > 1:
                    got, oth = _members(path, r, depth - 1)
                    out += got
                    other += oth
                else:
                    other.append(r + "/")
            else:
                out.append(r + "/")
        elif n.endswith(CKPT_SUFFIXES) and os.path.isfile(fp):
            out.append(r)
        else:
            other.append(r)
    return out, other


def open_run(path: str | os.PathLike[str]) -> Run:
    """Open every checkpoint of a run folder (metadata only), each on its own.

    Args:
        path: a folder of independent checkpoints (or any folder: its layout is not checked,
            so a folder that is one checkpoint can be listed as a run too).

    Returns:
        a :class:`Run` whose entries are sorted by step (:attr:`RunEntry.sort_key`); a file
        that cannot be read is an entry with ``error`` set, not an exception.

    Raises:
        UnreadableError: the path is not a folder, or holds no checkpoint at all.
    """
    p = os.fspath(path)
    if not os.path.isdir(p):
        raise UnreadableError("not a folder (a run is a folder of checkpoints)", path=p)
    members, other = _members(p, "", MAX_DEPTH)
    if not members:
        raise UnreadableError("a folder with no checkpoint files in it (looked for *.pt / "
                              "*.pth / *.bin / *.ckpt / *.safetensors and checkpoint folders)",
                              path=p)
    entries = [_entry(p, m) for m in members]
    entries.sort(key=lambda e: e.sort_key)
    return Run(p, entries, other)


def _entry(run: str, rel: str) -> RunEntry:
    e = RunEntry(rel)
    try:
        ckpt = open_checkpoint(os.path.join(run, rel.rstrip("/")), one=True)
    except CkptError as err:
        e.error = err.message
        return e
    e.format, e.size, e.safety, e.followed = ckpt.format, ckpt.size, ckpt.safety.level, \
        ckpt.followed
    for col, value in progress(ckpt).items():
        setattr(e, col, value)
    for o in ckpt.optimizers:
        steps = [_value(s.entries.get("step")) for s in o.state]
        steps += [_value(g.hyperparameters.get("step")) for g in o.groups]
        nums = [x for x in (_num(s) for s in steps) if x is not None]
        e.optimizers.append(RunOptimizer(o.pointer, o.type,
                                         [_value(g.hyperparameters.get("lr")) for g in o.groups],
                                         max(nums) if nums else None))
    for s in ckpt.schedulers:
        last = s.raw.get("last_epoch", s.raw.get("last_step", s.raw.get(
            "last_batch_iteration"))) if isinstance(s.raw, dict) else None
        e.schedulers.append(RunScheduler(s.pointer, s.type, _value(last)))
    return e


def _value(v: Any) -> Any:
    """A stored number: a plain value, or the value of a 0-d tensor (a DCP folder's too)."""
    if is_tensor_node(v):
        return v.value if not isinstance(v.value, list) else None
    return v


def progress(ckpt: Checkpoint) -> dict[str, Any]:
    """``epoch``, ``step`` and ``global_step`` where the checkpoint stores them: top-level keys
    (Lightning, timm, ultralytics, most training loops; DeepSpeed's ``global_steps``), mmengine's
    ``meta`` (``epoch``, ``iter``) and transformers' ``trainer_state.json``; absent ones are
    left out."""
    roots = [ckpt.root] if not ckpt.is_folder else [ckpt.roots[f.name] for f in ckpt.files]
    out: dict[str, Any] = {}
    for root in roots:
        for d in (root, root.get("meta") if isinstance(root, dict) else None):
            if not isinstance(d, dict):
                continue
            for col, keys in _PROGRESS_KEYS.items():
                if col in out:
                    continue
                for k in keys:
                    v = _value(d.get(k))
                    if _num(v) is not None:
                        out[col] = v
                        break
    return out
