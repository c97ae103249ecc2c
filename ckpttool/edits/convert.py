"""``convert``: change an optimizer's type and keep what its state knows.

The state of every torch optimizer estimates at most two things per parameter: the gradient's
running mean ``m`` (in units of the gradient) and its running mean square ``v``. Conversion reads
``m`` and ``v`` out of the source state in the source's conventions and writes them into the
target's state in the target's conventions (formulas in the README, section *convert*), then
carries the step count. New tensors are descriptions computed chunk by chunk from the source
records when the file is written (:class:`~ckpttool.newtensors.Derived`), never whole tensors.

``moments="zero"`` keeps no state at all: torch then creates exactly its own initial state at the
next step. Hyperparameters become the target's torch defaults, with the lr, weight decay, flags
such as ``maximize``, ``param_names``, the LR-like keys and any framework keys carried over.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import deepspeed, knowledge
from ..checkpoint import Checkpoint
from ..errors import AmbiguousError, EditError
from ..formats.nodes import TensorRef
from ..locate import OptimizerState
from ..names import param_shape
from ..newtensors import Derived, Fill, Reader, decode, encode, lazy_numpy, new_tensor
from ..tree import join
from . import Plan, TreeEditor, as_number
from .set_hparams import type_ok
from .set_lr import set_lr

if TYPE_CHECKING:
    from numpy import ndarray as Tensor

#: group keys carried from the source (the rest become the target's defaults)
CARRIED_KEYS = ("lr", "weight_decay", "maximize", "foreach", "differentiable")
NOT_TARGETS = ("LBFGS",)  # no per-parameter state to convert to


def targets() -> list[str]:
    """Optimizer classes ``convert`` can write (every torch.optim class with per-parameter
    state, from the shipped knowledge)."""
    return [n for n in knowledge.optimizer_types() if n not in NOT_TARGETS]


# ----------------------------------------------------------------------------- expressions
# Values of a parameter-shaped quantity, computed for a range of flat element indices.

Values = Callable[[int, int, Reader], "Tensor"]


def _load(t: TensorRef) -> Values:
    def values(start: int, n: int, reader: Reader) -> Tensor:
        return decode(reader.read(t, start, n), t.dtype)
    return values


def _const(value: float) -> Values:
    np = lazy_numpy()

    def values(start: int, n: int, reader: Reader) -> Tensor:
        return np.full(n, value, dtype=np.float32)
    return _constant(values)


def _constant(values: Values) -> Values:
    """Mark ``values`` as one value in every element (its bytes are encoded once)."""
    setattr(values, "constant", True)
    return values


def _is_constant(values: Values | None) -> bool:
    return values is None or bool(getattr(values, "constant", False))


def _map(fn: Callable[..., Tensor], *parts: Values) -> Values:
    def values(start: int, n: int, reader: Reader) -> Tensor:
        return fn(*(p(start, n, reader) for p in parts))
    if parts and all(_is_constant(p) for p in parts):
        return _constant(values)
    return values


def _dims(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(leading, rows, cols) of a parameter Adafactor factors over its last two dims."""
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def _factored(row: TensorRef, col: TensorRef, shape: tuple[int, ...]) -> Values:
    """Adafactor's estimate of v: ``row[b, i] * col[b, j] / mean_i(row[b, :])``."""
    np = lazy_numpy()
    lead, rows, cols = _dims(shape)
    cache: dict[str, Tensor] = {}

    def values(start: int, n: int, reader: Reader) -> Tensor:
        if not cache:  # one value per row and per column: small
            r = _load(row)(0, lead * rows, reader).reshape(lead, rows)
            cache["row"] = r.reshape(-1)
            cache["col"] = _load(col)(0, lead * cols, reader)
            cache["mean"] = np.maximum(r.mean(axis=1), np.finfo(np.float32).eps)
        idx = np.arange(start, start + n)
        b, i, j = idx // (rows * cols), (idx // cols) % rows, idx % cols
        return cache["row"][b * rows + i] * cache["col"][b * cols + j] / cache["mean"][b]
    return values


@dataclass
class Moments:
    """What a source state says about one parameter (None: it does not say)."""

    m: Values | None  # running mean of the gradient
    v: Values | None  # running mean of the squared gradient


def _betas(group: dict[str, Any]) -> tuple[float, float]:
    betas = group.get("betas")
    if isinstance(betas, (tuple, list)) and len(betas) == 2:
        b1, b2 = as_number(betas[0]), as_number(betas[1])
        return (0.9 if b1 is None else b1), (0.999 if b2 is None else b2)
    return 0.9, 0.999


def _bias(beta: float, t: float) -> float:
    return 1.0 - beta ** t if t > 0 else 1.0


def _num(group: dict[str, Any], key: str, default: float) -> float:
    x = as_number(group.get(key))
    return default if x is None else x


def read_moments(kind: str, entries: dict[str, Any], group: dict[str, Any],
                 step: float, numel: int) -> Moments:
    """``m`` and ``v`` of one parameter (``numel`` elements) from a source state of type
    ``kind``."""
    np = lazy_numpy()
    t = max(step, 1.0)

    def ten(key: str) -> TensorRef | None:
        x = entries.get(key)
        return x if isinstance(x, TensorRef) and x.shape else None

    m = v = None
    b1, b2 = _betas(group)
    if kind in ("Adam", "AdamW", "NAdam", "RAdam", "SparseAdam", "Adamax"):
        if (e := ten("exp_avg")) is not None:
            m = _map(lambda x, c=_bias(b1, t): x / c, _load(e))
        if kind == "Adamax":
            if (e := ten("exp_inf")) is not None:
                v = _map(lambda x: x * x, _load(e))
        elif (e := ten("exp_avg_sq")) is not None:
            v = _map(lambda x, c=_bias(b2, t): x / c, _load(e))
    elif kind == "SGD":
        mu, d = _num(group, "momentum", 0.0), _num(group, "dampening", 0.0)
        if (e := ten("momentum_buffer")) is not None and mu > 0 and d < 1:
            m = _map(lambda x, c=(1 - mu) / (1 - d): x * c, _load(e))
    elif kind == "RMSprop":
        alpha, eps = _num(group, "alpha", 0.99), _num(group, "eps", 1e-8)
        if (e := ten("square_avg")) is not None:
            v = _map(lambda x, c=_bias(alpha, t): x / c, _load(e))
        if (e := ten("grad_avg")) is not None:
            m = _map(lambda x, c=_bias(alpha, t): x / c, _load(e))
        elif (e := ten("momentum_buffer")) is not None and v is not None:
            mu = _num(group, "momentum", 0.0)
            # buf ~ g / (sqrt(v) + eps) / (1 - mu) at steady state
            m = _map(lambda b, s, c=1 - mu: b * c * (np.sqrt(s) + eps), _load(e), v)
    elif kind == "Adagrad":
        init = _num(group, "initial_accumulator_value", 0.0)
        if (e := ten("sum")) is not None:
            v = _map(lambda x: np.maximum((x - init) / t, 0), _load(e))
    elif kind == "Adadelta":
        rho = _num(group, "rho", 0.9)
        if (e := ten("square_avg")) is not None:
            v = _map(lambda x, c=_bias(rho, t): x / c, _load(e))
    elif kind == "Rprop":
        if (e := ten("prev")) is not None:
            m = _load(e)  # the last gradient: a one-sample estimate of m
    elif kind == "Adafactor":
        row, col, var = ten("row_var"), ten("col_var"), ten("variance")
        if row is not None and col is not None:
            v = _factored(row, col, (*row.shape[:-1], col.shape[-1]))
        elif var is not None:
            v = _load(var)
    elif kind == "Muon":
        if (e := ten("momentum_buffer")) is not None:
            m = _load(e)  # an EMA of the gradient (lerp with 1 - momentum)
    # ASGD keeps no moment (eta, mu, ax are averaging state)
    if v is None and m is not None:
        # no second moment kept: every element gets the tensor's mean square of m, so the
        # first updates point where m points, with an rms size of lr (never a division by 0)
        m = _SumOfSquares(m)
        v = _mean_square(m, numel)
    return Moments(m, v)


def _sum_sq(x: Tensor) -> float:
    """``sum(x ** 2)`` accumulated in float64. Not ``np.dot``: that is BLAS, and OpenBLAS's
    worker threads busy-wait after every call (measured: twice the CPU time of the whole
    convert, on 2 CPUs shared with the kernel's writeback)."""
    np = lazy_numpy()
    xd = x.astype(np.float64)
    return float(np.einsum("i,i->", xd, xd))


class _SumOfSquares:
    """``m``, also summing the squares of what it returns while it is asked for its elements
    in order from 0 (the ``exp_avg`` pass): the mean square is then known without reading the
    source tensor a second time."""

    def __init__(self, m: Values) -> None:
        self.m = m
        self.done = 0  # elements 0 .. done - 1 are summed
        self.total = 0.0

    def __call__(self, start: int, n: int, reader: Reader) -> Tensor:
        x = self.m(start, n, reader)
        if start == self.done:
            self.total += _sum_sq(x)
            self.done = start + n
        return x


def _mean_square(m: Values, numel: int) -> Values:
    """``mean(m ** 2)`` over the whole tensor (from an earlier full pass over ``m`` when
    there was one, else one streaming pass, the first time)."""
    np = lazy_numpy()
    cache: list[float] = []

    def values(start: int, n: int, reader: Reader) -> Tensor:
        if not cache:
            if isinstance(m, _SumOfSquares) and m.done == numel:
                total = m.total
            else:
                total = 0.0
                step = Derived.chunk_elements
                for q in range(0, numel, step):
                    k = min(step, numel - q)
                    total += _sum_sq(m(q, k, reader))
            cache.append(max(total / max(numel, 1), float(np.finfo(np.float32).tiny)))
        return np.full(n, cache[0], dtype=np.float32)
    return _constant(values)


# ----------------------------------------------------------------------------- targets

def _nadam_mu_product(b1: float, momentum_decay: float, t: int) -> float:
    prod = 1.0
    for i in range(1, t + 1):
        prod *= b1 * (1.0 - 0.5 * 0.96 ** (i * momentum_decay))
    return prod


def target_values(kind: str, key: str, mo: Moments, group: dict[str, Any], t: int,
                  shape: tuple[int, ...]) -> Values | float | None:
    """The values of state entry ``key`` of the target ``kind`` (a float for 0-d entries,
    None when the entry keeps torch's initial zeros)."""
    np = lazy_numpy()
    b1, b2 = _betas(group)
    m, v = mo.m, mo.v
    if key == "exp_avg":
        return _map(lambda x, c=_bias(b1, t): x * c, m) if m else None
    if key in ("exp_avg_sq", "max_exp_avg_sq"):
        return _map(lambda x, c=_bias(b2, t): x * c, v) if v else None
    if key == "exp_inf":
        return _map(np.sqrt, v) if v else None
    if key == "mu_product":
        return _nadam_mu_product(b1, _num(group, "momentum_decay", 4e-3), t)
    if key == "momentum_buffer":
        if kind == "SGD":
            mu, d = _num(group, "momentum", 0.0), _num(group, "dampening", 0.0)
            return _map(lambda x, c=(1 - d) / (1 - mu): x * c, m) if m and mu < 1 else None
        if kind == "RMSprop":
            mu, eps = _num(group, "momentum", 0.0), _num(group, "eps", 1e-8)
            if m is None or v is None or mu >= 1:
                return None
            return _map(lambda x, s, c=1 / (1 - mu): x / (np.sqrt(s) + eps) * c, m, v)
        return m  # Muon: an EMA of the gradient
    if key == "grad_avg":
        return m
    if key == "square_avg":
        return v
    if key == "sum":
        init = _num(group, "initial_accumulator_value", 0.0)
        return _map(lambda x: x * t + init, v) if v else \
            (None if init == 0 else _const(init))
    if key == "acc_delta" or key == "ax":
        return None
    if key == "prev":
        return m
    if key == "step_size":  # Rprop starts every element at lr
        return _const(_num(group, "lr", 1e-2))
    if key == "eta":
        return _num(group, "lr", 1e-2)
    if key == "mu":
        return 1.0
    if key in ("row_var", "col_var"):
        if v is None:
            return None
        return _row_mean(v, shape) if key == "row_var" else _col_mean(v, shape)
    if key == "variance":
        return v
    raise EditError(f"convert does not know how to fill {kind} state {key!r}")


def _row_mean(v: Values, shape: tuple[int, ...]) -> Values:
    """Adafactor's row_var from v: the mean over the last dim, one value per row."""
    cols = shape[-1]

    def values(start: int, n: int, reader: Reader) -> Tensor:
        return v(start * cols, n * cols, reader).reshape(n, cols).mean(axis=1)
    return values


def _col_mean(v: Values, shape: tuple[int, ...]) -> Values:
    """Adafactor's col_var from v: the mean over the second-last dim (one streaming pass over
    v, the first time it is asked for; the result holds one value per column)."""
    np = lazy_numpy()
    lead, rows, cols = _dims(shape)
    cache: list[Tensor] = []

    def values(start: int, n: int, reader: Reader) -> Tensor:
        if not cache:
            total = np.zeros((lead, cols), dtype=np.float64)
            step = max(1, (1 << 20) // cols)
            for q in range(0, lead * rows, step):
                k = min(step, lead * rows - q)
                chunk = v(q * cols, k * cols, reader).reshape(k, cols).astype(np.float64)
                np.add.at(total, np.arange(q, q + k) // rows, chunk)
            cache.append((total / rows).astype(np.float32).reshape(-1))
        return cache[0][start:start + n]
    return values


# ----------------------------------------------------------------------------- the edit

def _resolve_name(name: str) -> str:
    by_lower = {n.lower(): n for n in targets()}
    found = by_lower.get(name.lower())
    if found is None:
        raise EditError(f"cannot convert to {name!r}", key=name,
                        hint="pick one of " + ", ".join(targets()))
    return found


def _defaults(info: knowledge.OptimizerInfo) -> dict[str, Any]:
    out = {}
    for k, v in info.defaults.items():
        if k in info.nonjson_defaults:
            raise EditError(f"{info.name}'s default {k} has no data form", key=k,
                            hint=f"give it with --set {k}=VALUE")
        out[k] = tuple(v) if isinstance(v, list) else v
    return out


def convert(ckpt: Checkpoint, to: str, *, sets: dict[str, Any] | None = None,
            moments: str = "carry", step: int | None = None,
            optimizer: str | None = None) -> Plan:
    """Convert an optimizer's state to another torch.optim type.

    Args:
        ckpt: the checkpoint (not changed; the plan's ``result`` is the edited one).
        to: the target class name (case-insensitive): SGD, Adam, AdamW, Adagrad, Adadelta,
            Adamax, NAdam, RAdam, RMSprop, Rprop, ASGD, Adafactor, Muon, SparseAdam.
        sets: hyperparameters to set in every group (checked against the target's keys).
        moments: ``"carry"`` maps the running moments, ``"zero"`` keeps no state.
        step: the step count to write when the source kept none.
        optimizer: JSON Pointer of the optimizer when the checkpoint has several.

    Returns:
        The plan. ``--set lr=`` is applied like ``set-lr --same`` (the scheduler follows).
    """
    sets = dict(sets or {})
    if moments not in ("carry", "zero"):
        raise EditError(f"moments must be carry or zero, not {moments!r}")
    target = _resolve_name(to)
    if ckpt.kind == "dcp":
        raise EditError("convert makes and reshapes state tensors, and a DCP folder's tensors "
                        "are chunks spread over its ranks' files: convert is not done in place "
                        "on DCP folders", path=ckpt.path,
                        hint="`ckpttool to-file` it, convert the file, and `ckpttool to-dcp` the "
                             "result")
    deepspeed.refuse_zero(ckpt, optimizer, "convert the optimizer")
    opt = ckpt.optimizer(optimizer)
    where = f"optimizer {opt.pointer or '(root)'}"
    if opt.type == knowledge.UNKNOWN or opt.type in NOT_TARGETS:
        raise EditError(f"the type of {where} is {opt.type} ({opt.guess.reason}); convert "
                        "reads torch.optim states only", path=ckpt.path, pointer=opt.pointer)
    if step is not None and step < 0:
        raise EditError(f"--step must be >= 0, not {step}")
    info = knowledge.optimizer_info(target)
    src_info = knowledge.optimizer_info(opt.type)
    defaults = _defaults(info)
    for key, value in sets.items():
        if key in ("params", "param_names"):
            raise EditError(f"{key} cannot be set", key=key)
        if key not in defaults and key not in knowledge.LR_LIKE_GROUP_KEYS:
            raise EditError(f"{target} has no hyperparameter {key!r} (it has "
                            f"{', '.join(defaults)})", key=key, path=ckpt.path)
        if not type_ok(defaults.get(key), value):
            raise EditError(f"{target}.{key} expects a value like {defaults.get(key)!r}, got "
                            f"{value!r}", key=key, path=ckpt.path)
    lr_set = sets.pop("lr", None)
    lrs = sorted({x for g in opt.groups
                  if (x := as_number(g.hyperparameters.get("lr"))) is not None})
    if lr_set is not None and len(lrs) > 1:
        raise AmbiguousError(f"the groups of {where} have different lrs "
                             f"({', '.join(f'{x:g}' for x in lrs)}); --set lr would give "
                             "every group the same one",
                             path=ckpt.path, pointer=opt.pointer, key="lr",
                             hint="convert without --set lr, then run ckpttool set-lr with "
                                  "--keep-ratios or --same")
    shapes = _shapes(opt)
    if target == "Muon":
        unknown = [p for p in opt.param_ids if p not in shapes]
        if unknown:
            raise EditError(f"Muon takes 2-D parameters only, and the shapes of {len(unknown)} "
                            f"of the {len(opt.param_ids)} params cannot be told from the "
                            f"{opt.type} state", path=ckpt.path, pointer=opt.pointer,
                            hint="convert to AdamW instead, or resume with the optimizer "
                                 "built anew")
        bad = [p for p in opt.param_ids if p in shapes and len(shapes[p]) != 2]
        if bad:
            names = ", ".join(f"{p} ({n})" if (n := _name_of(opt, p)) else str(p) for p in bad)
            raise EditError(f"Muon takes 2-D parameters only; params {names} are not 2-D",
                            path=ckpt.path, pointer=opt.pointer,
                            hint="convert to AdamW instead, or keep those params in an "
                                 "optimizer of their own (Muon is for the 2-D weights)")
    ed = TreeEditor(ckpt, "convert")
    src_keys = set(src_info.defaults) | set(knowledge.IGNORED_GROUP_KEYS)
    state_ptr = join(opt.pointer, "state")
    new_state = type(opt.raw["state"])()
    for g_index, g in enumerate(opt.raw["param_groups"]):
        group: dict[str, Any] = {}
        if "param_names" in g:
            group["param_names"] = g["param_names"]
        for k in info.group_keys:
            if k == "params":
                continue
            group[k] = g[k] if k in CARRIED_KEYS and k in g else defaults.get(k)
        for k, x in g.items():  # LR-like keys, scheduler-added and framework keys
            if k not in group and k != "params" and (k not in src_keys or k in CARRIED_KEYS):
                group[k] = x
        group.update({k: tuple(x) if isinstance(x, list) else x for k, x in sets.items()})
        group["params"] = g["params"]
        ed.set(join(join(opt.pointer, "param_groups"), g_index), group,
               shown=f"{target} group ({len(g['params'])} params)",
               shown_before=f"{opt.type} group ({len(g['params'])} params)")
        if moments == "zero":
            continue
        for pid in g["params"]:
            entries = opt.raw["state"].get(pid)
            if not isinstance(entries, dict) or not entries:
                continue  # torch creates this param's state at its next step
            converted = _convert_entries(ckpt, opt, target, info, pid, entries, g, group,
                                         shapes, step)
            if converted:  # SGD without momentum keeps no state
                new_state[pid] = converted
    for pid, entries in opt.raw["state"].items():  # state of ids in no group: kept
        if pid not in opt.param_ids:
            new_state[pid] = entries
    ed.set(state_ptr, new_state, shown=f"{target} state of {len(new_state)} params"
           + (" (moments carried)" if moments == "carry" else " (torch makes it at the next step)"),
           shown_before=f"{opt.type} state of {len(opt.raw['state'])} params")
    plan = ed.finish(f"convert: {where} {opt.type} -> {target} ({len(opt.groups)} group"
                     f"{'s' if len(opt.groups) != 1 else ''}, moments {moments}"
                     + (f", step {step}" if step is not None else "") + ")")
    if lr_set is not None:
        plan = plan.then(set_lr, float(lr_set), ratios="same", optimizer=opt.pointer)
    return plan


def _name_of(opt: OptimizerState, pid: Any) -> str | None:
    for g in opt.groups:
        for p, n in zip(g.params, g.param_names):
            if p == pid:
                return n
    return None


def _shapes(opt: OptimizerState) -> dict[Any, tuple[int, ...]]:
    """Each param's shape as its state shows it."""
    out = {}
    for s in opt.state:
        shape = param_shape(opt.type, s.entries)
        if shape is not None:
            out[s.param] = shape
    return out


def _step_of(entries: dict[str, Any]) -> float | None:
    s = entries.get("step")
    if isinstance(s, TensorRef):
        return float(s.value) if isinstance(s.value, (int, float)) else None
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return float(s)
    return None


def default_step(info: knowledge.OptimizerInfo, group: dict[str, Any]) -> int:
    """The step written when the source kept none: the longest horizon ``1 / (1 - r)`` of the
    target's decay rates (betas, alpha, rho), so bias corrections are past their steep start."""
    rates = []
    betas = group.get("betas")
    if isinstance(betas, (tuple, list)):
        rates += [as_number(b) for b in betas]
    rates += [as_number(group.get(k)) for k in ("alpha", "rho")]
    horizons = [math.ceil(1 / (1 - r)) for r in rates if r is not None and 0 <= r < 1]
    return max(horizons, default=1)


def _convert_entries(ckpt: Checkpoint, opt: OptimizerState, target: str,
                     info: knowledge.OptimizerInfo, pid: Any, entries: dict[str, Any],
                     src_group: dict[str, Any], group: dict[str, Any],
                     shapes: dict[Any, tuple[int, ...]], step: int | None) -> dict[str, Any]:
    shape = shapes.get(pid)
    like = next((x for k, x in entries.items() if isinstance(x, TensorRef) and x.shape
                 and k != "step"), None)
    if shape is None or like is None:
        raise EditError(f"cannot tell the shape of param {pid} from its {opt.type} state",
                        path=ckpt.path, pointer=join(join(opt.pointer, "state"), pid),
                        hint="convert with --moments zero (torch makes the state at the "
                             "next step)")
    src_step = _step_of(entries)
    t = int(src_step) if src_step is not None else \
        (step if step is not None else default_step(info, group))
    mo = read_moments(opt.type, entries, src_group, float(src_step or 0), math.prod(shape))
    keys = info.state_keys.get(len(shape)) or info.state_keys.get(2) or ()
    for option, extra in info.conditional_state.items():
        key, _, want = option.partition("=")
        val = group.get(key)
        on = bool(val) == (want == "true") if want in ("true", "false") else bool(val)
        if on:
            keys = (*keys, *extra)
    ordered = (["step"] if "step" in keys else []) + sorted(k for k in keys if k != "step")
    out: dict[str, Any] = {}
    fused = bool(group.get("capturable") or group.get("fused"))
    for key in ordered:
        if key == "step":
            if info.step_is_python_int:
                out[key] = t
            else:
                st = new_tensor(like, (), Fill("float32", 1, float(t)), dtype="float32",
                                device=like.device if fused else "cpu")
                st.value = float(t)
                out[key] = st
            continue
        val = target_values(target, key, mo, group, t, shape)
        if isinstance(val, float):
            scalar = new_tensor(like, (), Fill("float32", 1, val), dtype="float32")
            scalar.value = val
            out[key] = scalar
            continue
        eshape = _entry_shape(key, shape)
        numel = math.prod(eshape)
        dtype = like.dtype
        label = f"{key} from {opt.type}" if val is not None else "zeros"
        fn = val
        memo: dict[int, bytes | memoryview] = {}

        def compute(start: int, n: int, reader: Reader, fn: Values | None = fn,
                    dtype: str = dtype, numel: int = numel,
                    memo: dict[int, bytes | memoryview] = memo) -> bytes | memoryview:
            if not _is_constant(fn):
                return encode(fn(start, n, reader) if fn is not None else 0.0, dtype, n)
            # one value everywhere (exp_avg_sq from SGD, zeros): the same bytes every chunk
            out = memo.get(n)
            if out is None:
                out = encode(fn(start, n, reader) if fn is not None else 0.0, dtype, n)
            if start + n < numel:
                memo[n] = out
            else:
                memo.clear()  # the last chunk: nothing kept once the tensor is written
            return out
        out[key] = new_tensor(like, eshape, Derived(dtype, numel, compute, label))
    return out


def _entry_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if key == "row_var":
        return (*shape[:-1], 1)
    if key == "col_var":
        return (*shape[:-2], 1, shape[-1])
    return shape
