"""Generate ``torch_optim.json`` by introspecting the installed torch.

Besides :mod:`ckpttool.stats` (tensor statistics for ``show --stats``), this
is the only module of :mod:`ckpttool` that imports torch; reading a checkpoint
never does.  It builds every optimizer exported by :mod:`torch.optim` and
every LR scheduler exported by :mod:`torch.optim.lr_scheduler` for real, steps
them, and records what their ``state_dict()`` looks like.  No keys are
hand-written here: the only hand-kept table is :data:`SCHEDULER_ARGS`, which
holds *constructor arguments* for schedulers that cannot be built from an
optimizer alone.

Usage::

    python -m ckpttool.knowledge.generate            # rewrite the JSON file
    python -m ckpttool.knowledge.generate --check    # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import collections.abc
import difflib
import inspect
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.optim
import torch.optim.lr_scheduler as lr_scheduler

FORMAT_VERSION = 1
JSON_PATH = Path(__file__).with_name("torch_optim.json")

#: Value a "momentum-like" numeric default that is 0 is flipped to.
MOMENTUM_FLIP_VALUE = 0.9
#: Number of optimizer / scheduler steps taken before recording state.
N_STEPS = 2


# --------------------------------------------------------------------------
# JSON encoding helpers
# --------------------------------------------------------------------------


def _encode(value: Any) -> Any:
    """Encode a python value as deterministic JSON data.

    Tuples become lists, ``None`` becomes null.  Values that have no JSON
    representation (callables, tensors, non-finite floats, arbitrary objects)
    become ``{"__nonjson__": true, "repr": ...}`` where ``repr`` is chosen to
    be deterministic (no memory addresses).
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"__nonjson__": True, "repr": repr(value)}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return {"__nonjson__": True, "repr": f"Tensor(dtype={value.dtype}, shape={list(value.shape)})"}
    if callable(value):
        name = getattr(value, "__qualname__", None) or type(value).__qualname__
        module = getattr(value, "__module__", None) or type(value).__module__
        return {"__nonjson__": True, "repr": f"{module}.{name}"}
    return {"__nonjson__": True, "repr": f"<{type(value).__module__}.{type(value).__qualname__}>"}


def _option_label(key: str, value: Any) -> str:
    """Label like ``amsgrad=true`` / ``momentum=0.9`` (JSON spelling of the value)."""
    return f"{key}={json.dumps(value)}"


def _describe_entry(value: Any) -> dict[str, Any]:
    """Describe one per-parameter state entry (tensor vs python value)."""
    if isinstance(value, torch.Tensor):
        return {
            "kind": "tensor",
            "dtype": str(value.dtype).removeprefix("torch."),
            "ndim": value.dim(),
            "sparse": bool(value.is_sparse),
        }
    return {"kind": "python", "type": type(value).__name__}


# --------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------


def optimizer_classes() -> dict[str, type[torch.optim.Optimizer]]:
    """All public ``Optimizer`` subclasses exported by :mod:`torch.optim`."""
    found: dict[str, type[torch.optim.Optimizer]] = {}
    for name in sorted(getattr(torch.optim, "__all__", dir(torch.optim))):
        obj = getattr(torch.optim, name, None)
        if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer:
            found[name] = obj
    return found


def _dense_params_1d_2d() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(3, 4, generator=g)),
        torch.nn.Parameter(torch.randn(3, generator=g)),
    ]


def _dense_params_2d() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(3, 4, generator=g))]


def _sparse_embedding_params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(5, 3, sparse=True)
    return list(emb.parameters())


def _loss(params: list[torch.nn.Parameter], setup: str) -> torch.Tensor:
    if setup == "sparse-embedding":
        (weight,) = params
        idx = torch.tensor([0, 2, 4])
        return (torch.nn.functional.embedding(idx, weight, sparse=True) ** 2).sum()
    return sum(((p - 0.5) ** 2).sum() for p in params)  # type: ignore[return-value]


#: Parameter setups tried in order; the first one with which the optimizer can
#: be built and stepped is used (dense 2-D + 1-D; 2-D only, e.g. Muon; a
#: sparse embedding, e.g. SparseAdam).
PARAM_SETUPS: dict[str, Callable[[], list[torch.nn.Parameter]]] = {
    "dense-2d-1d": _dense_params_1d_2d,
    "dense-2d": _dense_params_2d,
    "sparse-embedding": _sparse_embedding_params,
}


def run_optimizer(
    cls: type[torch.optim.Optimizer],
    setup: str,
    options: dict[str, Any] | None = None,
    n_steps: int = N_STEPS,
) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    """Build ``cls`` over the tiny params of ``setup`` and step it ``n_steps`` times.

    A closure is always passed to ``step`` (LBFGS requires one; the others
    accept it).  Raises whatever torch raises for unsupported combinations.
    """
    params = PARAM_SETUPS[setup]()
    opt = cls(params, **(options or {}))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _loss(params, setup)
        loss.backward()
        return loss

    for _ in range(n_steps):
        opt.step(closure)  # type: ignore[arg-type]  # LBFGS closures return the loss tensor
    return opt, params


def _state_by_dim(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for p in params:
        st = opt.state.get(p)
        if not st:
            continue
        entries = {k: _describe_entry(v) for k, v in st.items()}
        key = str(p.dim())
        if key in out and out[key] != entries:  # pragma: no cover - not seen in practice
            raise RuntimeError(f"{type(opt).__name__}: state differs between {p.dim()}-d params")
        out[key] = entries
    return out


def _state_key_union(state: dict[str, dict[str, Any]]) -> set[str]:
    return {k for entries in state.values() for k in entries}


def _flip_candidates(defaults: dict[str, Any]) -> list[tuple[str, Any]]:
    """Options that may add state: every bool default flipped, and every
    momentum-like numeric default that is 0 set to :data:`MOMENTUM_FLIP_VALUE`."""
    flips: list[tuple[str, Any]] = []
    for key, value in defaults.items():
        if isinstance(value, bool):
            flips.append((key, not value))
        elif isinstance(value, (int, float)) and "momentum" in key and value == 0:
            flips.append((key, MOMENTUM_FLIP_VALUE))
    return sorted(flips)


def _supports_two_groups(cls: type[torch.optim.Optimizer], setup: str) -> bool:
    params = PARAM_SETUPS[setup]()
    if len(params) < 2:
        params = params + PARAM_SETUPS[setup]()
    try:
        cls([{"params": [params[0]]}, {"params": [params[1]]}])  # type: ignore[call-arg]
    except Exception:
        return False
    return True


def describe_optimizer(cls: type[torch.optim.Optimizer]) -> dict[str, Any]:
    """Record everything ckpttool needs to know about one optimizer class."""
    errors: list[str] = []
    for setup in PARAM_SETUPS:
        try:
            opt, params = run_optimizer(cls, setup)
        except Exception as exc:  # noqa: BLE001 - any failure means "try next setup"
            errors.append(f"{setup}: {type(exc).__name__}: {exc}")
            continue
        break
    else:
        raise RuntimeError(f"cannot build/step {cls.__name__}: " + "; ".join(errors))

    defaults = dict(opt.defaults)
    sd = opt.state_dict()
    group_keys = list(sd["param_groups"][0].keys())
    state = _state_by_dim(opt, params)
    base_keys = _state_key_union(state)

    step_info: dict[str, Any] | None = None
    for entries in state.values():
        if "step" in entries:
            step_info = entries["step"]
            break

    conditional: dict[str, list[str]] = {}
    options_tried: dict[str, str] = {}
    for key, value in _flip_candidates(defaults):
        label = _option_label(key, value)
        try:
            opt2, params2 = run_optimizer(cls, setup, {key: value})
        except Exception:  # noqa: BLE001 - combos that raise are skipped
            options_tried[label] = "raised"
            continue
        options_tried[label] = "ok"
        extra = _state_key_union(_state_by_dim(opt2, params2)) - base_keys
        if extra:
            conditional[label] = sorted(extra)

    nonjson = sorted(k for k, v in defaults.items() if isinstance(_encode(v), dict) and _encode(v).get("__nonjson__"))
    return {
        "module": cls.__module__,
        "defaults": {k: _encode(v) for k, v in defaults.items()},
        "nonjson_defaults": nonjson,
        "group_keys": group_keys,
        "param_setup": setup,
        "supports_param_groups": _supports_two_groups(cls, setup),
        "state": state,
        "state_keys": {dim: sorted(entries) for dim, entries in state.items()},
        "conditional_state": conditional,
        "options_tried": options_tried,
        "step": step_info,
    }


# --------------------------------------------------------------------------
# LR schedulers
# --------------------------------------------------------------------------


def _lambda_factor(epoch: int) -> float:
    return 0.9**epoch


def _lambda_mult(epoch: int) -> float:
    return 0.9


#: Constructor arguments (besides the optimizer) for scheduler classes that
#: cannot be built from an optimizer alone.  Only ARGS live here: every key
#: recorded in the JSON comes from a real ``state_dict()``.
SCHEDULER_ARGS: dict[str, Callable[[torch.optim.Optimizer], dict[str, Any]]] = {
    "LambdaLR": lambda opt: {"lr_lambda": _lambda_factor},
    "MultiplicativeLR": lambda opt: {"lr_lambda": _lambda_mult},
    "StepLR": lambda opt: {"step_size": 2},
    "MultiStepLR": lambda opt: {"milestones": [1, 3]},
    "ExponentialLR": lambda opt: {"gamma": 0.9},
    "CosineAnnealingLR": lambda opt: {"T_max": 10},
    "CosineAnnealingWarmRestarts": lambda opt: {"T_0": 5},
    "CyclicLR": lambda opt: {"base_lr": 0.01, "max_lr": 0.1},
    "OneCycleLR": lambda opt: {"max_lr": 0.1, "total_steps": 10},
    "SWALR": lambda opt: {"swa_lr": 0.05},
    "SequentialLR": lambda opt: {
        "schedulers": [lr_scheduler.ConstantLR(opt), lr_scheduler.ExponentialLR(opt, gamma=0.9)],
        "milestones": [2],
    },
    # ChainedScheduler takes its optimizer from the sub-schedulers.
    "ChainedScheduler": lambda opt: {
        "schedulers": [lr_scheduler.ConstantLR(opt), lr_scheduler.ExponentialLR(opt, gamma=0.9)],
    },
}
#: Schedulers whose constructor does not take the optimizer positionally.
_NO_OPTIMIZER_ARG = {"ChainedScheduler"}


def scheduler_classes() -> dict[str, type]:
    """LR scheduler classes: every ``LRScheduler`` subclass exported by
    :mod:`torch.optim.lr_scheduler` (plus ``ReduceLROnPlateau``, which is not
    an ``LRScheduler`` in older torch) and ``torch.optim.swa_utils.SWALR``."""
    base = lr_scheduler.LRScheduler
    found: dict[str, type] = {}
    modules = [lr_scheduler]
    try:
        import torch.optim.swa_utils as swa_utils

        modules.append(swa_utils)
    except ImportError:  # pragma: no cover
        pass
    for module in modules:
        for name in sorted(getattr(module, "__all__", dir(module))):
            obj = getattr(module, name, None)
            if inspect.isclass(obj) and (issubclass(obj, base) or name == "ReduceLROnPlateau"):
                found[name] = obj
    return found


def _tiny_sgd(n_groups: int) -> torch.optim.Optimizer:
    g = torch.Generator().manual_seed(0)
    groups = [{"params": [torch.nn.Parameter(torch.randn(3, generator=g))]} for _ in range(n_groups)]
    return torch.optim.SGD(groups, lr=0.1, momentum=0.9)


def build_scheduler(name: str, cls: type, opt: torch.optim.Optimizer) -> Any:
    """Construct scheduler ``name`` over ``opt`` using :data:`SCHEDULER_ARGS`."""
    kwargs = SCHEDULER_ARGS.get(name, lambda o: {})(opt)
    if name in _NO_OPTIMIZER_ARG:
        return cls(**kwargs)
    return cls(opt, **kwargs)


def _needs_metrics(sched: Any) -> bool:
    try:
        sig = inspect.signature(sched.step)
    except (TypeError, ValueError):  # pragma: no cover
        return False
    return any(
        p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in sig.parameters.values()
    )


def run_scheduler(name: str, cls: type, n_groups: int, n_steps: int = N_STEPS) -> tuple[Any, torch.optim.Optimizer]:
    """Build ``name`` over a tiny SGD with ``n_groups`` groups and step it."""
    opt = _tiny_sgd(n_groups)
    sched = build_scheduler(name, cls, opt)
    metrics = _needs_metrics(sched)
    for _ in range(n_steps):
        opt.step()
        if metrics:
            sched.step(1.0)
        else:
            sched.step()
    return sched, opt


def _scheduler_base_keys() -> list[str]:
    """State keys written by the ``LRScheduler`` base class itself (recorded
    from a trivial subclass, since ``LRScheduler`` is abstract)."""

    class _Probe(lr_scheduler.LRScheduler):
        def get_lr(self) -> list[float]:  # type: ignore[override]
            return [group["lr"] for group in self.optimizer.param_groups]

    opt = _tiny_sgd(1)
    sched = _Probe(opt)
    opt.step()
    sched.step()
    return sorted(sched.state_dict())


def describe_scheduler(name: str, cls: type) -> dict[str, Any]:
    """Record the ``state_dict()`` shape of one scheduler class."""
    opt0 = _tiny_sgd(2)
    before = {k for g in opt0.param_groups for k in g}
    sched2, opt2 = run_scheduler(name, cls, 2)
    sched3, _ = run_scheduler(name, cls, 3)
    sd2 = sched2.state_dict()
    sd3 = sched3.state_dict()
    if set(sd2) != set(sd3):  # pragma: no cover
        raise RuntimeError(f"{name}: state_dict keys depend on the number of param groups")
    per_group = sorted(
        k
        for k in sd2
        if isinstance(sd2[k], list) and isinstance(sd3[k], list) and len(sd2[k]) == 2 and len(sd3[k]) == 3
    )
    added = sorted({k for g in opt2.param_groups for k in g} - before)
    value_types = {k: type(v).__name__ for k, v in sd2.items()}
    # Keys holding a list of nested scheduler state_dicts (SequentialLR,
    # ChainedScheduler); OneCycleLR's ``_schedule_phases`` is a list of plain
    # dicts and is not nested scheduler state.
    nested = sorted(
        k
        for k, v in sd2.items()
        if isinstance(v, list)
        and v
        and all(isinstance(x, collections.abc.Mapping) and "_last_lr" in x for x in v)
    )
    return {
        "module": cls.__module__,
        "is_lrscheduler_subclass": issubclass(cls, lr_scheduler.LRScheduler),
        "keys": sorted(sd2),
        "per_group_keys": per_group,
        "group_keys_added": added,
        "value_types": dict(sorted(value_types.items())),
        "nested_scheduler_keys": nested,
    }


# --------------------------------------------------------------------------
# Top level
# --------------------------------------------------------------------------


def generate() -> dict[str, Any]:
    """Introspect the installed torch and return the knowledge as JSON data."""
    optimizers: dict[str, Any] = {}
    schedulers: dict[str, Any] = {}
    skipped_opt: list[str] = []
    skipped_sched: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, cls in optimizer_classes().items():
            try:
                optimizers[name] = describe_optimizer(cls)
            except Exception:  # noqa: BLE001 - anything that cannot be built is skipped
                skipped_opt.append(name)
        for name, cls in scheduler_classes().items():
            try:
                schedulers[name] = describe_scheduler(name, cls)
            except Exception:  # noqa: BLE001
                skipped_sched.append(name)
        base_keys = _scheduler_base_keys()
    from torch._weights_only_unpickler import _get_allowed_globals
    return {
        "format_version": FORMAT_VERSION,
        "torch_version": torch.__version__,
        # what torch.load(weights_only=True) accepts: ckpttool's safety verdicts judge a
        # pickle against this list without importing torch
        "weights_only_globals": sorted(_get_allowed_globals()),
        "optimizers": optimizers,
        "schedulers": schedulers,
        "scheduler_base_keys": base_keys,
        "skipped": {"optimizers": sorted(skipped_opt), "schedulers": sorted(skipped_sched)},
    }


def dumps(data: dict[str, Any]) -> str:
    """Serialise deterministically (sorted keys, 2-space indent, trailing newline)."""
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckpttool.knowledge.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs from the installed torch")
    parser.add_argument("--output", type=Path, default=JSON_PATH, help=f"JSON file (default: {JSON_PATH})")
    args = parser.parse_args(argv)

    text = dumps(generate())
    if args.check:
        try:
            current = args.output.read_text(encoding="utf-8")
        except FileNotFoundError:
            print(f"{args.output} does not exist; run without --check to create it", file=sys.stderr)
            return 1
        if current == text:
            print(f"{args.output} is up to date (torch {torch.__version__})")
            return 0
        diff = list(
            difflib.unified_diff(
                current.splitlines(), text.splitlines(), "committed", f"torch {torch.__version__}", lineterm="", n=1
            )
        )
        changed = sum(1 for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---")))
        print(f"{args.output} is stale: {changed} changed lines vs torch {torch.__version__}", file=sys.stderr)
        for line in diff[:80]:
            print(line, file=sys.stderr)
        if len(diff) > 80:
            print(f"... ({len(diff) - 80} more diff lines)", file=sys.stderr)
        return 1
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} (torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
