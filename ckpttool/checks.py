"""``check``: the pre-resume sanity check, as small independent checks over an opened checkpoint.

Each check is a function from a :class:`Context` to findings, listed in :data:`CHECKS`; the
stable ids they report are documented in the README. torch is imported by the load test (it
builds the optimizer over ``meta`` params and loads the state), to ask whether CUDA devices
exist when a storage is tagged ``cuda``, and to read the installed torch's ``weights_only``
allowlist when a file names a global outside ckpttool's copy of it.

    report = ckpttool.check("ckpt.pth")           # or check("ckpt.pth", deep=True)
    if not report.ok:
        print(report.render())
    report.raise_for_problems()   # CheckFailed listing the FAIL findings
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from tabulate import tabulate

from . import knowledge
from .checkpoint import Checkpoint, latin1_note, open_checkpoint
from .edits import as_number
from .errors import CkptError
from .formats.nodes import TensorRef
from .formats.safetensors import SafeTensor
from .formats.safety import ALLOWED, NEEDS_TRUST
from .locate import OptimizerState
from .names import model_parameters, param_shape, state_shapes
from .newtensors import decode, lazy_numpy
from .pairing import group_count, pair
from .tree import join

FAIL, WARN, INFO = "FAIL", "WARN", "INFO"
_ORDER = {FAIL: 0, WARN: 1, INFO: 2}


@dataclass(frozen=True)
class Finding:
    """One thing ``check`` found: a stable ``id``, a ``level`` (FAIL / WARN / INFO), the
    JSON Pointer it concerns, what is wrong and the fix (often a ckpttool command)."""

    id: str
    level: str
    pointer: str
    message: str
    hint: str = ""


class CheckFailed(CkptError):
    """``Report.raise_for_problems``: the checkpoint would not resume as it should."""


@dataclass
class Report:
    """The findings of a check, most severe first."""

    path: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No FAIL finding."""
        return not any(f.level == FAIL for f in self.findings)

    def count(self, level: str) -> int:
        return sum(f.level == level for f in self.findings)

    def raise_for_problems(self, strict: bool = False) -> None:
        """Raise :class:`CheckFailed` if a finding is a FAIL (or a WARN, with ``strict``)."""
        bad = [f for f in self.findings if f.level == FAIL or (strict and f.level == WARN)]
        if bad:
            raise CheckFailed("; ".join(f"{f.id} at {f.pointer or '(root)'}: {f.message}"
                                        for f in bad), path=self.path)

    def summary(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (f"check {verdict}: {self.count(FAIL)} fail, {self.count(WARN)} warn, "
                f"{self.count(INFO)} info")

    def render(self) -> str:
        """A table of the findings and one summary line."""
        rows = [[f.level, f.id, f.pointer or "(root)", f.message, f.hint] for f in self.findings]
        table = tabulate(rows, ["level", "id", "pointer", "message", "hint"],
                         maxcolwidths=[None, None, 40, 60, 50]) if rows else "no findings"
        return f"{table}\n{self.summary()}"

    def to_json(self) -> dict[str, Any]:
        return {"schema": 1, "path": self.path, "ok": self.ok,
                "counts": {lv: self.count(lv) for lv in (FAIL, WARN, INFO)},
                "findings": [vars(f) for f in self.findings]}


@dataclass
class Context:
    """What the checks look at."""

    ckpt: Checkpoint
    optimizers: list[OptimizerState]
    load_test: bool = True
    deep: bool = False
    model: Any = None  # a live torch.nn.Module to compare with, if given
    live_optimizer: Any = None  # a live torch.optim.Optimizer to compare with, if given
    deep_scan: DeepScan | None = None  # started before the checks when deep


Check = Callable[[Context], Iterator[Finding]]


# ------------------------------------------------------------------------------- structure

def check_structure(ctx: Context) -> Iterator[Finding]:
    for opt in ctx.optimizers:
        seen: dict[Any, int] = {}
        for g in opt.groups:
            for p in g.params:
                if p in seen:
                    yield Finding("param-in-two-groups", FAIL,
                                  join(join(opt.pointer, "param_groups"), g.index),
                                  f"param {p} is listed in groups {seen[p]} and {g.index}",
                                  "the state dict is corrupt; restore it from another save")
                seen.setdefault(p, g.index)
            names = opt.raw["param_groups"][g.index].get("param_names")
            if isinstance(names, list) and len(names) != len(g.params):
                yield Finding("param-names-length", FAIL,
                              join(join(join(opt.pointer, "param_groups"), g.index),
                                   "param_names"),
                              f"{len(names)} param_names for {len(g.params)} params", "")
        orphans = [s.param for s in opt.state if s.group is None]
        if orphans:
            yield Finding("orphan-state", FAIL, join(opt.pointer, "state"),
                          f"state for param ids {orphans} that no group lists (torch keeps it "
                          "and never uses it; it may belong to a param the groups lost)",
                          "check how the optimizer was built; merge-groups refuses such state")
        with_state = {s.param for s in opt.state if s.entries}
        missing = [p for p in opt.param_ids if p not in with_state]
        if missing and opt.type not in ("SGD", "LBFGS", knowledge.UNKNOWN) and with_state:
            names = {p: n for g in opt.groups for p, n in zip(g.params, g.param_names)}
            shown = ", ".join(f"{p} ({names[p]})" if names.get(p) else str(p)
                              for p in missing[:8])
            yield Finding("no-state", INFO, join(opt.pointer, "state"),
                          f"{len(missing)} params have no state (frozen or unused so far): "
                          f"{shown}{', ...' if len(missing) > 8 else ''}",
                          "torch creates it when they first get a gradient")


# ------------------------------------------------------------------------------- shapes

def check_shapes(ctx: Context) -> Iterator[Finding]:
    models = {m.pointer: m for m in ctx.ckpt.models}
    for opt in ctx.optimizers:
        if opt.type in ("LBFGS", knowledge.UNKNOWN):
            continue
        for s in opt.state:
            shapes = state_shapes(opt.type, s.entries)
            if len(set(shapes.values())) > 1:
                yield Finding("state-shape", FAIL, join(join(opt.pointer, "state"), s.param),
                              "the state's tensors disagree on the param's shape: "
                              + ", ".join(f"{k} {list(v)}" for k, v in shapes.items()),
                              "this state was assembled from different params; do not resume it")
        model = models.get(opt.names_model) if opt.names_model is not None else None
        if model is not None:
            yield from _shapes_by_name(opt, model.tensors)
            continue
        ordered = [m for m in models.values() if m.ordered]
        if len(ordered) == 1 and len(ctx.ckpt.optimizers) == 1:
            n_model = len(model_parameters(ordered[0]))
            if len(opt.param_ids) > n_model:
                yield Finding("param-count", FAIL, opt.pointer,
                              f"the optimizer lists {len(opt.param_ids)} params but the model "
                              f"{ordered[0].pointer} has {n_model} parameter tensors",
                              "a group holds params the model does not have; rebuild the "
                              "optimizer or restore a matching save")
                continue
        if len(opt.groups) == 1 and len(ordered) == 1:
            yield from _shapes_by_position(opt, model_parameters(ordered[0]))
        elif opt.state and ordered:
            yield Finding("shapes-unchecked", INFO, opt.pointer,
                          "state shapes were not compared with the model: "
                          + (opt.names_note or "parameter names are unknown"), "")


def _shapes_by_name(opt: OptimizerState, tensors: dict[str, Any]) -> Iterator[Finding]:
    for s in opt.state:
        shape = param_shape(opt.type, s.entries)
        t = tensors.get(s.name) if s.name else None
        if shape is None or t is None:
            continue
        ptr = join(join(opt.pointer, "state"), s.param)
        if tuple(t.shape) != shape:
            yield Finding("state-shape", FAIL, ptr,
                          f"state of {s.name} has shape {list(shape)} but the param has "
                          f"{list(t.shape)}",
                          "the params were reordered or resized since the save; do not resume "
                          "this state onto them")
        moment = next((x for k, x in s.entries.items() if k != "step"
                       and isinstance(x, TensorRef) and x.shape), None)
        if moment is not None and moment.dtype != t.dtype and t.dtype.startswith(
                ("float", "bfloat")):
            yield Finding("state-dtype", INFO, ptr,
                          f"state of {s.name} is {moment.dtype}, the param {t.dtype}: "
                          f"torch casts the state to {t.dtype} at load", "")


def _shapes_by_position(opt: OptimizerState, params: list[tuple[str, tuple[int, ...]]]
                        ) -> Iterator[Finding]:
    """One group and no names: torch pairs state and params by position, as here."""
    ids = opt.param_ids
    if len(params) != len(ids):
        return
    state = {s.param: s for s in opt.state}
    for pos, pid in enumerate(ids):
        s = state.get(pid)
        shape = param_shape(opt.type, s.entries) if s else None
        if shape is not None and shape != params[pos][1]:
            yield Finding("state-shape", FAIL, join(join(opt.pointer, "state"), pid),
                          f"param {pid} is position {pos} of the group, which is "
                          f"{params[pos][0]} {list(params[pos][1])} in the model, but its state "
                          f"has shape {list(shape)}",
                          "the param order differs from the model's: the state would land on "
                          "the wrong parameters")


# ------------------------------------------------------------------------------- hyperparameters

_RANGES: dict[str, Callable[[Any], bool]] = {
    "lr": lambda x: x >= 0 and math.isfinite(x),
    "eps": lambda x: x > 0 and math.isfinite(x),
    "momentum": lambda x: 0 <= x < 1,
    "dampening": lambda x: 0 <= x <= 1,
    "alpha": lambda x: 0 <= x < 1,
    "rho": lambda x: 0 <= x < 1,
    "weight_decay": lambda x: x >= 0 and math.isfinite(x),
    "lr_decay": lambda x: x >= 0,
}


def check_hyperparameters(ctx: Context) -> Iterator[Finding]:
    for opt in ctx.optimizers:
        if opt.type == knowledge.UNKNOWN:
            yield Finding("unknown-optimizer", WARN, opt.pointer,
                          f"the optimizer type is not a torch.optim class ({opt.guess.reason})",
                          "checks that need the type were skipped")
            continue
        info = knowledge.optimizer_info(opt.type)
        required = [k for k in info.defaults if k not in info.flag_keys]
        for g in opt.groups:
            ptr = join(join(opt.pointer, "param_groups"), g.index)
            hp = g.hyperparameters
            for k in required:
                if k not in hp:
                    yield Finding("missing-hyperparameter", FAIL, join(ptr, k),
                                  f"{opt.type} reads {k!r} at every step and group {g.index} "
                                  "has none (torch would raise KeyError at the first step)",
                                  f"ckpttool set PATH {k}={_fmt(info.defaults[k])} --group "
                                  f"{g.index}")
            for k, ok in _RANGES.items():
                x = as_number(hp.get(k))
                if x is not None and not ok(x):
                    yield Finding("hyperparameter-range", FAIL, join(ptr, k),
                                  f"{k} = {x!r} is out of range", f"ckpttool set PATH {k}=...")
            betas = hp.get("betas")
            if isinstance(betas, (tuple, list)):
                for b in betas:
                    x = as_number(b)
                    if x is not None and not 0 <= x < 1:
                        yield Finding("hyperparameter-range", FAIL, join(ptr, "betas"),
                                      f"betas = {tuple(betas)!r}: each must be in [0, 1)",
                                      "ckpttool set PATH betas=0.9,0.999")
                        break


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


# ------------------------------------------------------------------------------- steps

def _steps(opt: OptimizerState) -> dict[Any, float]:
    """Each param's step (a 0-d tensor whose value was read, or SparseAdam's int)."""
    return {s.param: x for s in opt.state if (x := as_number(s.entries.get("step"))) is not None}


def check_steps(ctx: Context) -> Iterator[Finding]:
    root = ctx.ckpt.root
    trainer_step = None
    if isinstance(root, dict):
        gs = root.get("global_step")  # Lightning
        for name in ("trainer_state.json", "mp_rank_00_model_states.pt"):  # Trainer, DeepSpeed
            state = root.get(name)
            if isinstance(state, dict):
                gs = state.get("global_step", state.get("global_steps", gs))
        trainer_step = gs if isinstance(gs, int) and not isinstance(gs, bool) else None
    for opt in ctx.optimizers:
        steps = _steps(opt)
        if not steps:
            continue
        values = sorted(set(steps.values()))
        if len(values) > 1:
            by = {v: [p for p, x in steps.items() if x == v] for v in values}
            yield Finding("unequal-steps", WARN, join(opt.pointer, "state"),
                          "params are at different steps: " + "; ".join(
                              f"step {v:g}: {len(ps)} params" for v, ps in by.items()),
                          "expected only when some params were frozen for a while; bias "
                          "corrections differ per param")
        top = max(values)
        for s in pair(ctx.ckpt.optimizers, ctx.ckpt.schedulers, opt).candidates:
            if not s.known:
                continue
            last = s.raw.get("last_epoch")
            # a per-step schedule is at last_epoch == step; a per-epoch one is behind: only a
            # schedule ahead of the optimizer's step is a sign of mismatched files
            if isinstance(last, int) and not isinstance(last, bool) and last > int(top):
                yield Finding("step-vs-scheduler", WARN, join(s.pointer, "last_epoch"),
                              f"the scheduler is at last_epoch {last} but the optimizer at "
                              f"step {top:g}: the schedule ran ahead of the optimizer",
                              "check that the scheduler was saved with this optimizer")
        if trainer_step is not None and top > trainer_step + 1 and len(ctx.ckpt.optimizers) == 1:
            yield Finding("step-vs-trainer", WARN, join(opt.pointer, "state"),
                          f"the optimizer is at step {top:g} but the trainer's global_step is "
                          f"{trainer_step}", "check that these files come from the same save")


# ------------------------------------------------------------------------------- schedulers

def check_schedulers(ctx: Context) -> Iterator[Finding]:
    for s in ctx.ckpt.schedulers:
        if not s.known:
            yield Finding("unknown-scheduler", WARN, s.pointer,
                          f"a scheduler of a type ckpttool does not know ({s.reason})",
                          "set-lr and convert cannot keep it consistent; edit it yourself")
    for opt in ctx.optimizers:
        n = len(opt.groups)
        found = pair(ctx.ckpt.optimizers, ctx.ckpt.schedulers, opt)
        for s in ctx.ckpt.schedulers:
            count = group_count(s)
            if s.known and count is not None and count != n and len(ctx.ckpt.optimizers) == 1:
                yield Finding("scheduler-lists", FAIL, s.pointer,
                              f"the scheduler keeps {count} per-group entries but the optimizer "
                              f"has {n} groups",
                              "the groups changed since the scheduler was saved")
        sched = found.scheduler
        if sched is None or not sched.known:
            continue
        last = sched.raw.get("_last_lr")
        if isinstance(last, list) and len(last) == n:
            for g in opt.groups:
                x, y = as_number(last[g.index]), as_number(g.hyperparameters.get("lr"))
                if x is not None and y is not None and not math.isclose(x, y, rel_tol=1e-6,
                                                                        abs_tol=1e-12):
                    yield Finding("last-lr", WARN, join(join(sched.pointer, "_last_lr"),
                                                        g.index),
                                  f"the scheduler's _last_lr {x:g} differs from group "
                                  f"{g.index}'s lr {y:g}: the next scheduler step recomputes "
                                  "the lr from its own state",
                                  "ckpttool set-lr PATH LR scales both consistently")
        base = sched.raw.get("base_lrs")
        if isinstance(base, list) and len(base) == n:
            for g in opt.groups:
                x, y = as_number(base[g.index]), as_number(g.hyperparameters.get("initial_lr"))
                if x is not None and y is not None and not math.isclose(x, y, rel_tol=1e-6):
                    yield Finding("base-lrs", WARN, join(join(sched.pointer, "base_lrs"),
                                                         g.index),
                                  f"base_lrs {x:g} differs from group {g.index}'s initial_lr "
                                  f"{y:g}", "ckpttool set-lr PATH LR --base-lr")


# ------------------------------------------------------------------------------- devices

def check_devices(ctx: Context) -> Iterator[Finding]:
    cuda = [u for u in ctx.ckpt.storages if u.storage.location.startswith("cuda")]
    if cuda:
        import torch
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        wanted = sorted({u.storage.location for u in cuda})
        over = [d for d in wanted if (int(d.split(":")[1]) if ":" in d else 0) >= have]
        if over:
            yield Finding("cuda-unavailable", FAIL, cuda[0].pointer,
                          f"{len(cuda)} storages are tagged {', '.join(wanted)} and this machine "
                          f"has {have} CUDA device{'s' if have != 1 else ''}: torch.load without "
                          "map_location fails",
                          f"ckpttool move {ctx.ckpt.path} cpu")
    for opt in ctx.optimizers:
        for s in opt.state:
            step = s.entries.get("step")
            if not isinstance(step, TensorRef) or s.group is None:
                continue
            hp = opt.groups[s.group].hyperparameters
            on_device = bool(hp.get("capturable") or hp.get("fused"))
            if step.device != "cpu" and not on_device:
                yield Finding("step-device", WARN, join(join(opt.pointer, "state"), s.param),
                              f"step is on {step.device} but the group is neither capturable "
                              "nor fused (torch keeps such steps on the CPU)",
                              f"ckpttool move {ctx.ckpt.path} cpu --pointer "
                              f"{join(join(join(opt.pointer, 'state'), s.param), 'step')}")
                break


# ------------------------------------------------------------------------------- loading

def check_loading(ctx: Context) -> Iterator[Finding]:
    if ctx.ckpt.unsafe:
        yield Finding("unsafe", FAIL, "", ctx.ckpt.safety.headline(),
                      "do not torch.load it with weights_only=False")
    for f in ctx.ckpt.files:
        where = join("", f.name) if ctx.ckpt.is_folder else ""
        for trick in f.extra.get("tricks", ()):
            crc = trick.startswith("data.pkl fails its CRC")
            yield Finding("crc" if crc else "archive-trick", FAIL if crc else WARN, where,
                          trick, "restore the file from another copy" if crc else
                          "re-save it with torch.save if you trust it")
    for f in ctx.ckpt.files:
        if "latin1_at" in f.extra:
            yield Finding("py2-encoding", FAIL, join("", f.name) if ctx.ckpt.is_folder else "",
                          latin1_note(f),
                          "load it with torch.load(..., encoding='latin1')")
        if f.format == "torchscript":
            yield Finding("weights-only", WARN, join("", f.name) if ctx.ckpt.is_folder else "",
                          "a TorchScript archive: torch.load hands it to torch.jit.load, which "
                          "runs its TorchScript code and refuses weights_only=True",
                          "load it with torch.jit.load if you trust it")
    if ctx.ckpt.safety.unjudged:
        n = len(ctx.ckpt.safety.unjudged)
        yield Finding("not-judged", WARN, "",
                      f"{n} value{'s' if n != 1 else ''} stored through stream transforms "
                      "(compression, encryption) that ckpttool does not decode could not be "
                      "read, so not judged: " + ", ".join(ctx.ckpt.safety.unjudged[:4])
                      + (" ..." if n > 4 else ""),
                      "dcp.load unpickles every value with torch.load(weights_only=False): load "
                      "it only if you trust where it comes from")
    for f in ctx.ckpt.files:
        if f.safety.opcodes and f.format in ("torch-zip", "torch-legacy"):
            yield Finding("weights-only", WARN, join("", f.name) if ctx.ckpt.is_folder else "",
                          "torch.load(weights_only=True) cannot read this pickle's opcodes ("
                          + ", ".join(f.safety.opcodes) + "; saved with pickle_protocol=4?)",
                          f"`ckpttool sanitize {ctx.ckpt.path} -o OUT` writes it again in "
                          "protocol 2, which it reads")
    # the verdict's needs-trust globals (outside ckpttool's copy of torch's allowlist), less
    # those a newer installed torch allows
    outside = {c.global_ for f in ctx.ckpt.files if f.format in ("torch-zip", "torch-legacy")
               for c in f.safety.calls if c.level == NEEDS_TRUST and c.global_ in f.globals}
    refused = sorted(q for q in outside if _norm(q) not in _allowed()) if outside else []
    if refused:
        yield Finding("weights-only", WARN, "",
                      "torch.load(weights_only=True), the default since torch 2.6, refuses "
                      "these globals: " + ", ".join(refused),
                      f"`ckpttool sanitize {ctx.ckpt.path} -o OUT` rewrites them into plain "
                      "values torch accepts (--dry-run lists each), without running the file; "
                      "or load with torch.serialization.add_safe_globals([...]) for classes "
                      "you trust")


def _norm(q: str) -> str:
    return "builtins." + q.split(".", 1)[1] if q.startswith("__builtin__.") else q


def _allowed() -> frozenset[str]:
    """The installed torch's own weights_only allowlist (ckpttool's ``ALLOWED`` mirrors the
    torch it was generated from; a newer torch may allow more)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        return frozenset(_get_allowed_globals()) | ALLOWED
    except ImportError:
        return ALLOWED


# ------------------------------------------------------------------------------- load test

def check_load_test(ctx: Context) -> Iterator[Finding]:
    if not ctx.load_test:
        return
    from . import eager_torch
    for opt in ctx.optimizers:
        if opt.type in (knowledge.UNKNOWN, "LBFGS"):
            continue
        error = _load_test(opt)
        if error is not None and eager_torch.active():
            # the CLI's stand-in for torch._dynamo may lack what this torch needs: retry
            # with the real module before reporting torch's error
            eager_torch.real()
            error = _load_test(opt)
        if error is not None:
            yield Finding("load-test", FAIL, opt.pointer,
                          f"torch.optim.{opt.type} over params of these shapes refuses the "
                          f"state: {type(error).__name__}: {str(error).splitlines()[0][:200]}",
                          "fix the finding above that explains it, or rebuild the optimizer")


def _load_test(opt: OptimizerState) -> Exception | None:
    """Build ``torch.optim.<type>`` over ``meta`` params of the saved shapes and grouping,
    load the state and take one step; torch's own exception if any of it fails."""
    import torch
    state = {s.param: s for s in opt.state}
    params: list[Any] = []
    groups = []
    for g in opt.groups:
        ps = []
        for pid in g.params:
            s = state.get(pid)
            shape = param_shape(opt.type, s.entries) if s else None
            ps.append(torch.empty(shape if shape is not None else (1,), device="meta"))
        params += ps
        groups.append({"params": ps})
    try:
        cls = getattr(torch.optim, opt.type)
        optim = cls(groups, lr=0.1) if opt.type == "SGD" else cls(groups)
        optim.load_state_dict(_meta_state_dict(opt))
        for p in params:
            p.grad = torch.empty_like(p)
        if opt.type not in _NO_META_STEP:
            optim.step()
    except Exception as e:  # torch's own error is the finding
        return e
    return None


# step() needs values these meta params do not have: SparseAdam wants sparse gradients;
# Adafactor, ASGD and NAdam call .item() on a param or state value. Only their load is
# tested. (tests/test_check.py runs the load test on a fixture of every torch.optim class, so
# a torch release that changes this fails there, not silently.)
_NO_META_STEP = ("ASGD", "Adafactor", "NAdam", "SparseAdam")


def _meta_state_dict(opt: OptimizerState) -> dict[str, Any]:
    import torch

    def conv(v: Any) -> Any:
        if isinstance(v, (TensorRef, SafeTensor)):  # SafeTensor: a DCP folder's tensors
            if not v.shape and isinstance(v.value, (int, float)):
                return torch.tensor(v.value, dtype=getattr(torch, v.dtype, torch.float32))
            return torch.empty(v.shape, device="meta",
                               dtype=getattr(torch, v.dtype, torch.float32))
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(conv(x) for x in v)
        return v
    return {"state": {k: conv(v) for k, v in opt.raw["state"].items()},
            "param_groups": [conv(g) for g in opt.raw["param_groups"]]}


# ------------------------------------------------------------------------------- --deep

_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "/sum")


def check_deep(ctx: Context) -> Iterator[Finding]:
    """Every record read once: its CRC (zip records), and for the storages of params and
    optimizer state (not metrics: a best score may well be inf) NaN / Inf, negative second
    moments and all-zero moments. The reads run on two worker threads, started and finished
    by :func:`check` before the other checks."""
    if not ctx.deep:
        return
    scan = ctx.deep_scan or DeepScan(ctx)
    if scan.skipped:
        yield Finding("not-judged", WARN, "",
                      f"--deep did not read {scan.skipped} entr"
                      f"{'ies' if scan.skipped != 1 else 'y'} stored through stream transforms "
                      "(compression, encryption) that ckpttool does not decode", "")
    for f, rec, info, (crc, bad, neg, nonzero) in scan.results():
        if getattr(rec, "crc", 0) and crc != rec.crc:
            dcp = ctx.ckpt.kind == "dcp"  # a record of an archive inside a data file
            yield Finding("crc", FAIL, info[0] if dcp and info else
                          join("", f.name) if ctx.ckpt.is_folder else "",
                          f"record {rec.name}{f' (at byte {rec.data_offset})' if dcp else ''} "
                          f"of {f.path} fails its CRC check: its bytes changed after the save "
                          "(torch.load does not check)", "restore the file from another copy")
        if info is None:
            continue
        ptr = info[0]
        if bad:
            yield Finding("nan-inf", FAIL, ptr,
                          f"{bad} value{' is' if bad == 1 else 's are'} NaN or Inf",
                          "the run diverged before this save; resume from an earlier one")
        if neg:
            yield Finding("negative-second-moment", FAIL, ptr,
                          f"{neg} value{'' if neg == 1 else 's'} of a second moment "
                          f"{'is' if neg == 1 else 'are'} negative", "")
        if not nonzero and "/state/" in ptr and not ptr.endswith("/step") and rec.size > 8:
            yield Finding("zero-moment", INFO, ptr, "all values are 0", "")


_CHUNK = 8 << 20


class DeepScan:
    """The reads of ``--deep``: one job per record on two worker threads (``pread``, zlib's
    CRC and numpy all release the GIL), each streaming its record through one reused 8 MB
    buffer per thread. Zip records are read where the archive puts them; a legacy or
    safetensors file has no CRCs, only its storages' values are checked."""

    def __init__(self, ctx: Context) -> None:
        import threading
        from concurrent.futures import ThreadPoolExecutor

        watched = _watched_storages(ctx)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="ckpttool-deep")
        self._fds: list[int] = []
        self._jobs: list[tuple[Any, Any, tuple[str, str] | None,
                               Future[tuple[int, int, int, int]]]] = []
        self.skipped = 0  # DCP entries stored through stream transforms: not read
        if ctx.ckpt.kind == "dcp":
            self._dcp(ctx)
            return
        for f in ctx.ckpt.files:
            if f.archive is not None:
                records = [r for r in f.archive.records.values() if r.method == 0]
            else:
                records = list({id(st.record): st.record for st in f.storages.values()
                                if st.record is not None}.values())
            if not records:
                continue
            fd = os.open(f.path, os.O_RDONLY)
            self._fds.append(fd)
            for rec in records:
                info = watched.get(id(rec))
                second = info is not None and info[0].endswith(_SECOND_MOMENTS)
                job = self._pool.submit(self._scan, fd, rec.data_offset, rec.size,
                                        info[1] if info else None, second)
                self._jobs.append((f, rec, info, job))

    def _dcp(self, ctx: Context) -> None:
        """A DCP folder: every entry of .metadata is a small torch.save archive inside a data
        file; each archive's records are read (CRCs), the chunks of params and optimizer
        state checked for values too."""
        from .checkpoint import _read_zip
        from .formats.nodes import fields
        from .tree import tensors
        f = ctx.ckpt.files[0]
        meta = f.extra.get("dcp_meta")
        if meta is None:
            return
        watched: dict[tuple[str, int], tuple[str, str]] = {}
        roots = [(o.pointer, ctx.ckpt.resolve(o.pointer)) for o in ctx.ckpt.optimizers] + \
            [(m.pointer, ctx.ckpt.resolve(m.pointer)) for m in ctx.ckpt.models]
        for base, root in roots:
            for ptr, t, _ in tensors(root, base):
                if isinstance(t, SafeTensor) and t.dtype in ("float32", "float64", "float16",
                                                             "bfloat16"):
                    for *_, file, off, _ in t.chunks or ():
                        watched.setdefault((file, off), (ptr, t.dtype))
        fds: dict[str, int] = {}
        for info in fields(meta).get("storage_data", {}).values():
            i = fields(info)
            file, off, length = i.get("relative_path"), i.get("offset"), i.get("length")
            if not isinstance(file, str) or type(off) is not int or type(length) is not int:
                continue
            if i.get("transform_descriptors"):  # compressed or encrypted: not decoded
                self.skipped += 1
                continue
            fp = os.path.join(ctx.ckpt.path, file)
            if file not in fds:
                try:
                    fds[file] = os.open(fp, os.O_RDONLY)
                except OSError:
                    continue
                self._fds.append(fds[file])
            part = _read_zip(fp, file, fds[file], off + length)
            if part.archive is None:
                continue
            w = watched.get((file, off))
            for rec in part.archive.records.values():
                if rec.method != 0:
                    continue
                info_ = w if w is not None and rec.name.startswith("data/") else None
                second = info_ is not None and info_[0].endswith(_SECOND_MOMENTS)
                job = self._pool.submit(self._scan, fds[file], rec.data_offset, rec.size,
                                        info_[1] if info_ else None, second)
                self._jobs.append((part, rec, info_, job))

    def _scan(self, fd: int, offset: int, size: int, dtype: str | None,
              second: bool) -> tuple[int, int, int, int]:
        import zlib
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(bytearray(_CHUNK))
        crc = bad = neg = nonzero = done = 0
        while done < size:
            n = os.preadv(fd, [buf[:min(size - done, _CHUNK)]], offset + done)
            if n <= 0:
                break
            chunk = buf[:n]
            crc = zlib.crc32(chunk, crc)
            if dtype is not None:
                b, ng, nz = _value_counts(chunk, dtype, second)
                bad, neg, nonzero = bad + b, neg + ng, nonzero + nz
            done += n
        return crc, bad, neg, nonzero

    def wait(self) -> None:
        """Block until every record has been read."""
        for *_, job in self._jobs:
            job.exception()

    def results(self) -> Iterator[tuple[Any, Any, tuple[str, str] | None,
                                         tuple[int, int, int, int]]]:
        """(file, record, (pointer, dtype) or None, (crc, non-finite, negative, non-zero)),
        in file and record order; the files are closed when all are done."""
        try:
            for f, rec, info, job in self._jobs:
                yield f, rec, info, job.result()
        finally:
            self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _value_counts(chunk: bytes | memoryview, dtype: str,
                  second_moment: bool) -> tuple[int, int, int]:
    """(non-finite, negative, non-zero) counts of a chunk of a storage's elements."""
    np = lazy_numpy()
    x = decode(chunk, dtype)
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    neg = int(np.count_nonzero(x < 0)) if second_moment else 0
    return bad, neg, int(np.count_nonzero(x))


def _watched_storages(ctx: Context) -> dict[int, tuple[str, str]]:
    """id(record) -> (pointer of its first tensor, dtype) for the floating-point storages of
    params and optimizer state."""
    from .tree import tensors
    out: dict[int, tuple[str, str]] = {}
    roots = [(o.pointer, ctx.ckpt.resolve(o.pointer)) for o in ctx.ckpt.optimizers] + \
        [(m.pointer, ctx.ckpt.resolve(m.pointer)) for m in ctx.ckpt.models]
    for base, root in roots:
        for ptr, t, _ in tensors(root, base):
            st = getattr(t, "storage", None)
            if isinstance(t, TensorRef) and st is not None and st.record is not None \
                    and t.dtype in ("float32", "float64", "float16", "bfloat16"):
                out.setdefault(id(st.record), (ptr, t.dtype))
    return out


# ------------------------------------------------------------------------------- live objects

def check_live(ctx: Context) -> Iterator[Finding]:
    """Compare the saved state with the model and optimizer about to load it, position by
    position, as torch's load_state_dict will pair them."""
    if ctx.model is None and ctx.live_optimizer is None:
        return
    live_names = {id(p): n for n, p in ctx.model.named_parameters()} \
        if ctx.model is not None else {}
    if ctx.model is not None:
        yield from _live_model(ctx)
    if ctx.live_optimizer is None:
        return
    if len(ctx.optimizers) != 1:
        yield Finding("live-optimizer", WARN, "", f"the checkpoint has {len(ctx.optimizers)} "
                      "optimizers; pass optimizer= to say which one the live optimizer loads", "")
        return
    saved = ctx.optimizers[0]
    live = ctx.live_optimizer.param_groups
    if len(live) != len(saved.groups):
        yield Finding("live-groups", FAIL, join(saved.pointer, "param_groups"),
                      f"the live optimizer has {len(live)} param groups, the saved one "
                      f"{len(saved.groups)}: load_state_dict will refuse it",
                      "build the optimizer with the saved grouping, or merge-groups the save")
        return
    state = {s.param: s for s in saved.state}
    for sg, lg in zip(saved.groups, live):
        gptr = join(join(saved.pointer, "param_groups"), sg.index)
        lp = lg["params"]
        if len(lp) != len(sg.params):
            extra = [live_names.get(id(p)) or f"#{i}" for i, p in enumerate(lp)][len(sg.params):]
            yield Finding("live-group-size", FAIL, gptr,
                          f"group {sg.index} has {len(lp)} params now and {len(sg.params)} in the "
                          "save (a layer unfrozen or added since?)"
                          + (f"; the live group ends with {', '.join(extra)}" if extra else ""),
                          "build this group as it was saved, then add the new params with "
                          "optimizer.add_param_group after loading")
            continue
        moved, resized = [], []
        for pos, (p, pid) in enumerate(zip(lp, sg.params)):
            lname, sname = live_names.get(id(p)), sg.param_names[pos]
            s = state.get(pid)
            shape = param_shape(saved.type, s.entries) if s else None
            if lname and sname and lname != sname:
                moved.append(f"position {pos}: {lname} now, {sname} saved")
            elif shape is not None and tuple(p.shape) != shape:
                resized.append(f"position {pos} ({lname or 'unnamed'}): {list(p.shape)} now, "
                               f"state {list(shape)}")
        if moved:
            yield Finding("live-order", FAIL, gptr,
                          f"group {sg.index} lists its params in another order ("
                          + "; ".join(moved[:4]) + ("; ..." if len(moved) > 4 else "")
                          + "): their state would load onto the wrong params",
                          "build the optimizer's groups in the saved order")
        if resized:
            yield Finding("live-shape", FAIL, gptr,
                          f"group {sg.index} has params whose shapes differ from their saved "
                          "state (" + "; ".join(resized[:4])
                          + ("; ..." if len(resized) > 4 else "") + ")",
                          "the params were reordered or resized since the save")


def _live_model(ctx: Context) -> Iterator[Finding]:
    ordered = [m for m in ctx.ckpt.models if m.ordered]
    if len(ordered) != 1:
        return
    saved = model_parameters(ordered[0])
    live = [(n, tuple(p.shape)) for n, p in ctx.model.named_parameters()]
    saved_names = [n for n, _ in saved]
    live_names = [n for n, _ in live]
    if sorted(saved_names) == sorted(live_names) and saved_names != live_names:
        first = next(i for i, (a, b) in enumerate(zip(saved_names, live_names)) if a != b)
        yield Finding("live-model-order", FAIL, ordered[0].pointer,
                      f"the live model lists its parameters in another order (position {first}: "
                      f"{live_names[first]} now, {saved_names[first]} saved): an optimizer built "
                      "from model.parameters() pairs the saved state with the wrong params",
                      "register the layers in the saved order, or build the optimizer from "
                      "named parameters in the saved order")
    elif set(saved_names) != set(live_names):
        added = sorted(set(live_names) - set(saved_names))
        gone = sorted(set(saved_names) - set(live_names))
        yield Finding("live-model-params", WARN, ordered[0].pointer,
                      "the live model's parameters differ from the saved model's"
                      + (f"; new: {', '.join(added[:6])}" if added else "")
                      + (f"; gone: {', '.join(gone[:6])}" if gone else ""), "")


CHECKS: list[Check] = [check_loading, check_structure, check_shapes, check_hyperparameters,
                       check_steps, check_schedulers, check_devices, check_load_test,
                       check_deep, check_live]


def check(source: str | os.PathLike[str] | Checkpoint | dict[str, Any], model: Any = None,
          optimizer: Any = None, *, pointer: str | None = None, load_test: bool = True,
          deep: bool = False) -> Report:
    """Check a checkpoint before a resume.

    Args:
        source: a path (file or folder), an opened :class:`Checkpoint`, or a state dict in
            memory (what ``torch.load`` returned; it is serialized to a temporary file with
            ``torch.save`` and read back like any file).
        model: the live ``nn.Module`` about to load it: its parameter order and shapes are
            compared with the saved ones.
        optimizer: the live optimizer about to load it: its groups, their sizes, the params'
            names and shapes are compared with the saved state position by position.
        pointer: only the saved optimizer at this JSON Pointer.
        load_test: build each optimizer over ``meta`` params and load the state into it.
        deep: also read every tensor byte (CRCs, NaN / Inf, negative second moments).

    Returns:
        A :class:`Report`: ``ok``, ``findings`` (most severe first), ``raise_for_problems()``.
    """
    if isinstance(source, dict):
        import tempfile

        import torch
        with tempfile.TemporaryDirectory(prefix="ckpttool-check-") as tmp:
            path = os.path.join(tmp, "state.pt")
            torch.save(source, path)
            report = check(path, model, optimizer, pointer=pointer, load_test=load_test,
                           deep=deep)
            report.path = "<state dict in memory>"
            return report
    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    opts = [ckpt.optimizer(pointer)] if pointer is not None else ckpt.optimizers
    ctx = Context(ckpt, opts, load_test, deep, model, optimizer)
    findings: list[Finding] = []
    if deep:
        # read first, at full speed: overlapped with the load test's import of torch (which
        # holds the GIL) each of the scan's GIL hand-offs waits out a switch interval, and the
        # scan took 3-4x longer
        ctx.deep_scan = DeepScan(ctx)
        ctx.deep_scan.wait()
    try:
        for c in CHECKS:
            findings.extend(c(ctx))
    finally:
        if ctx.deep_scan is not None:
            ctx.deep_scan.close()
    flat = [o for o in opts if o.flattened]
    if flat:  # pointers into the nested form ckpttool built: the keys of the file instead
        findings = [_retarget(f, flat) for f in findings]
    findings.sort(key=lambda f: _ORDER[f.level])
    return Report(ckpt.path, findings)


def _retarget(f: Finding, flat: list[OptimizerState]) -> Finding:
    for o in flat:
        ptr = o.tree_pointer(f.pointer)
        if ptr != f.pointer:
            return Finding(f.id, f.level, ptr, f.message, f.hint)
    return f
