"""Finding optimizer, LR scheduler and model states anywhere in a checkpoint tree.

Each state is addressed by a JSON Pointer from the checkpoint's root: ``""`` for a bare
optimizer file, ``/optimizer``, ``/optimizer_states/1``; in a folder the first segment is the
file name (``/optimizer.pt``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import knowledge
from .deepspeed import is_rank_optimizer
from .formats.nodes import Reduce, TensorRef
from .formats.safetensors import SafeTensor
from .tree import children, join, split, walk

if TYPE_CHECKING:
    from .checkpoint import Checkpoint


ParamId = int | str  # an int, or the parameter's name in a name-keyed state dict


def is_tensor(obj: Any) -> bool:
    return isinstance(obj, (TensorRef, SafeTensor))


@dataclass
class ParamGroup:
    """One entry of ``param_groups``."""

    index: int
    params: list[ParamId]
    param_names: list[str | None]  # per param: its name when known, else None
    hyperparameters: dict[str, Any]  # every key but params/param_names, in saved order


@dataclass
class ParamState:
    """The ``state`` entry of one parameter."""

    param: ParamId
    name: str | None
    group: int | None  # index of the group listing this id, None if no group does
    entries: dict[str, Any]


@dataclass
class OptimizerState:
    """An optimizer ``state_dict`` found in a checkpoint."""

    pointer: str
    raw: dict[str, Any]
    guess: knowledge.OptimizerGuess
    groups: list[ParamGroup]
    state: list[ParamState]
    extra_keys: list[str] = field(default_factory=list)  # group keys torch's type does not write
    names_source: str | None = None  # where the names come from, when there are names
    names_note: str | None = None  # why there are no names (or only some)
    model_order: dict[ParamId, int] | None = None  # param id -> position in model.parameters()
    names_model: str | None = None  # pointer of the model the names belong to, when known
    # the flattened form (``flatten_optimizer_state_dict=True``): ``raw`` is the nested form
    # ckpttool built from keys ``state.<fqn>.<key>`` / ``param_groups.<fqn>.<key>``;
    # :meth:`tree_pointer` maps a pointer of that nested form to the key in the file
    flattened: bool = False

    def tree_pointer(self, pointer: str) -> str:
        """The pointer in the checkpoint's tree for a pointer into ``raw`` (the same, except for
        the flattened form, where ``/state/<fqn>/<key>`` is ``/state.<fqn>.<key>`` and
        ``/param_groups/<i>/<key>`` is the key of the group's first param)."""
        if not self.flattened or not pointer.startswith(self.pointer + "/"):
            return pointer
        parts = split(pointer[len(self.pointer):])
        if parts[:1] == ["state"] and len(parts) >= 3:
            return join(self.pointer, ".".join(["state", parts[1], parts[2]]))
        if parts[:1] == ["param_groups"] and len(parts) >= 3 and parts[1].isdigit():
            g = int(parts[1])
            if g < len(self.groups) and self.groups[g].params and parts[2] != "params":
                fqn = self.groups[g].params[0]
                return join(self.pointer, f"param_groups.{fqn}.{parts[2]}")
        return self.pointer

    @property
    def type(self) -> str:
        return self.guess.type

    @property
    def param_ids(self) -> list[ParamId]:
        return [p for g in self.groups for p in g.params]

    def group_of(self, param: ParamId) -> int | None:
        """The index of the first group listing ``param`` (a dict built once: O(1))."""
        index = self.__dict__.get("_group_index")
        if index is None:
            index = {}
            for g in reversed(self.groups):
                for p in g.params:
                    try:
                        index[p] = g.index
                    except TypeError:  # an unhashable id (a malformed state): no index
                        return next((g.index for g in self.groups if param in g.params), None)
            self.__dict__["_group_index"] = index
        try:
            return index.get(param)
        except TypeError:
            return None


@dataclass
class SchedulerState:
    """An LR scheduler ``state_dict``: the scheduler's ``__dict__`` without the optimizer::

        {"base_lrs": [0.1, 0.01], "last_epoch": 3, "_step_count": 4, "_last_lr": [...],
         "step_size": 2, "gamma": 0.5, ...}          # plus per-class keys
        {"_schedulers": [{...}, {...}], "_milestones": [5], "_last_lr": [...], ...}
                                                     # SequentialLR / ChainedScheduler

    Lists such as ``base_lrs`` hold one entry per param group (which keys do is per class, in
    :mod:`ckpttool.knowledge`); ``initial_lr`` (and OneCycleLR's ``max_lr`` / ``min_lr``)
    live in the optimizer's groups instead.

    ``known`` is False for a scheduler-like state of a type ckpttool does not know (mmengine's
    ``base_values`` / ``last_step`` schedulers, DeepSpeed's ``{"last_batch_iteration": N}``, a
    pickled object whose class name ends in ``LR`` or ``Scheduler``): it is shown, and edits
    that would leave it inconsistent refuse to go on without being told (``--no-scheduler``).
    ``type`` is then ``"unknown"`` and ``reason`` says what made it look like a scheduler.
    """

    pointer: str
    type: str
    raw: dict[str, Any]
    known: bool = True
    reason: str = ""

    @property
    def last_epoch(self) -> Any:
        return self.raw.get("last_epoch")

    @property
    def base_lrs(self) -> Any:
        return self.raw.get("base_lrs")

    @property
    def last_lr(self) -> Any:
        return self.raw.get("_last_lr")


@dataclass
class ModelState:
    """A model ``state_dict``: ``{"0.weight": tensor, "0.bias": tensor, ...}``, names in
    ``model.state_dict()`` order (parameters and buffers of each module, then its children),
    or the ``state_dict()`` of a whole pickled ``nn.Module`` (``pickled`` is its class)."""

    pointer: str
    tensors: dict[str, Any]
    # False when the file sorts names (safetensors), so the order is not the module's
    ordered: bool = True
    pickled: str | None = None  # the class of a whole pickled nn.Module, else None

    @property
    def elements(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def dtypes(self) -> dict[str, int]:
        return dict(Counter(t.dtype for t in self.tensors.values()))


@dataclass
class Found:
    optimizers: list[OptimizerState] = field(default_factory=list)
    schedulers: list[SchedulerState] = field(default_factory=list)
    models: list[ModelState] = field(default_factory=list)


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_optimizer_state(obj: Any) -> bool:
    """A mapping shaped like ``Optimizer.state_dict()``::

        {"state": {0: {"step": tensor, "exp_avg": tensor, ...}, 1: {...}},
         "param_groups": [{"lr": ..., ..., "params": [0, 1]}, {..., "params": [2]}]}

    Param ids are ints counting up across groups; state is keyed by the same ids (params that
    never stepped have no entry). Name-keyed state dicts, as written by
    ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` and FSDP1's
    ``optim_state_dict``, use parameter names (FQNs) for both instead.
    """
    if not (isinstance(obj, dict) and isinstance(obj.get("state"), dict)
            and isinstance(obj.get("param_groups"), list)
            and all(isinstance(g, dict) and all(isinstance(k, str) for k in g)
                    and isinstance(g.get("params"), list) for g in obj["param_groups"])):
        return False
    ids = [p for g in obj["param_groups"] for p in g["params"]] + list(obj["state"])
    return all(_is_id(p) for p in ids) or (bool(ids) and all(isinstance(p, str) for p in ids))


def is_name_keyed(opt: OptimizerState) -> bool:
    """Are the param ids of ``opt`` parameter names (FQNs) rather than ints?"""
    return any(isinstance(p, str) for p in opt.param_ids)


def module_tensors(node: Any, prefix: str = "", depth: int = 0) -> dict[str, Any] | None:
    """The ``state_dict()`` of a whole pickled ``nn.Module`` (parameters, then persistent
    buffers, then each submodule's, as torch orders them), or None if ``node`` is not one.

    A pickled module is a recorded ``cls.__new__`` whose BUILD state is the module's
    ``__dict__``, holding ``_parameters``, ``_buffers`` and ``_modules``.
    """
    state = node.state if isinstance(node, Reduce) and not isinstance(node, TensorRef) \
        else None
    if not (isinstance(state, dict) and isinstance(state.get("_parameters"), dict)
            and isinstance(state.get("_modules"), dict)) or depth > 100:
        return None
    out: dict[str, Any] = {}
    for name, t in state["_parameters"].items():
        if is_tensor(t):
            out[prefix + str(name)] = t
    skip = state.get("_non_persistent_buffers_set")
    skip = skip if isinstance(skip, (set, frozenset)) else set()
    buffers = state.get("_buffers")
    for name, t in (buffers.items() if isinstance(buffers, dict) else ()):
        if is_tensor(t) and name not in skip:
            out[prefix + str(name)] = t
    for name, sub in state["_modules"].items():
        inner = module_tensors(sub, f"{prefix}{name}.", depth + 1)
        if inner:
            out.update(inner)
    return out


def is_model_state(obj: Any) -> bool:
    return (isinstance(obj, dict) and len(obj) > 0
            and all(isinstance(k, str) for k in obj) and all(is_tensor(v) for v in obj.values()))


def _scheduler_type(obj: Any) -> str | None:
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        return None
    if not knowledge.looks_like_scheduler(obj.keys()):
        return None
    return knowledge.infer_scheduler(obj.keys())


_STEP_KEYS = ("last_epoch", "last_step", "last_batch_iteration")
_BASE_KEYS = ("base_lrs", "base_values")


def unknown_scheduler_reason(obj: Any) -> str | None:
    """Why ``obj`` looks like the state of an LR scheduler ckpttool does not know, or None."""
    if isinstance(obj, Reduce) and not isinstance(obj, TensorRef):
        name = obj.qualname.rsplit(".", 1)[-1]
        if name.endswith(("LR", "Scheduler")) and name != "OrderedDict":
            return f"a pickled {obj.qualname} object"
        return None
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        return None
    step = [k for k in _STEP_KEYS if k in obj]
    base = [k for k in _BASE_KEYS if k in obj]
    if step and base:
        return f"keys {', '.join(step + base)}"
    if list(obj) == ["last_batch_iteration"]:
        return "key last_batch_iteration (a DeepSpeed LR schedule; the schedule itself is in " \
               "the DeepSpeed config)"
    return None


def is_flattened_optimizer(obj: Any) -> bool:
    """``get_state_dict(..., flatten_optimizer_state_dict=True)``: keys ``state.<fqn>.<key>``
    and ``param_groups.<fqn>.<key>`` (every param listed with its group's hyperparameters)."""
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        return False
    if not all(k.startswith(("state.", "param_groups.")) and k.count(".") >= 2 for k in obj):
        return False
    return any(k.startswith("param_groups.") and k.endswith(".lr") for k in obj)


def flattened_to_nested(obj: dict[str, Any]) -> dict[str, Any]:
    """The nested ``{"state", "param_groups"}`` form of a flattened optimizer state. The
    groups are the runs of consecutive params (in key order) with equal hyperparameters: the
    flattened form does not say more (torch rebuilds them from the live optimizer)."""
    state: dict[str, dict[str, Any]] = {}
    hparams: dict[str, dict[str, Any]] = {}
    for k, v in obj.items():
        head, rest = k.split(".", 1)
        fqn, key = rest.rsplit(".", 1)
        (state if head == "state" else hparams).setdefault(fqn, {})[key] = v
    groups: list[dict[str, Any]] = []
    last: Any = None
    for fqn, hp in hparams.items():
        sig = [(k, repr(v)) for k, v in hp.items()]
        if groups and sig == last:
            groups[-1]["params"].append(fqn)
        else:
            groups.append({**hp, "params": [fqn]})
            last = sig
    return {"state": state, "param_groups": groups}


def optimizer_from_raw(pointer: str, raw: dict[str, Any]) -> OptimizerState:
    groups = []
    group_keys: set[str] = set()
    for i, g in enumerate(raw["param_groups"]):
        hp = {k: v for k, v in g.items() if k not in ("params", "param_names")}
        group_keys.update(g.keys())
        names = g.get("param_names")
        if not isinstance(names, list) and g["params"] and \
                all(isinstance(p, str) for p in g["params"]):
            names = g["params"]  # a name-keyed state dict: the ids are the names
        pn: list[str | None] = list(names) if isinstance(names, list) \
            and len(names) == len(g["params"]) else [None] * len(g["params"])
        groups.append(ParamGroup(i, list(g["params"]), pn, hp))
    state_keys: set[str] = set()
    states = []
    for pid, entries in raw["state"].items():
        ent = entries if isinstance(entries, dict) else {"<value>": entries}
        state_keys.update(str(k) for k in ent)
        states.append(ParamState(pid, None, None, ent))
    first = raw["param_groups"][0] if raw["param_groups"] else {}
    guess = knowledge.infer_optimizer(group_keys, state_keys, first)
    opt = OptimizerState(pointer, raw, guess, groups, states, extra_keys=list(guess.extra_keys))
    for s in states:
        s.group = opt.group_of(s.param)
    if groups and all(any(n is not None for n in g.param_names) for g in groups):
        opt.names_source = "param ids (name-keyed)" if is_name_keyed(opt) else "param_names"
    return opt


def locate(ckpt: Checkpoint) -> Found:
    """Find every optimizer, scheduler and model state in ``ckpt``."""
    found = Found()
    claimed: set[int] = set()
    for ptr, obj in walk(ckpt.root):
        if id(obj) in claimed:
            continue
        if is_optimizer_state(obj):
            found.optimizers.append(optimizer_from_raw(ptr, obj))
            _claim(obj, claimed)
            continue
        if is_flattened_optimizer(obj):
            opt = optimizer_from_raw(ptr, flattened_to_nested(obj))
            opt.flattened = True
            found.optimizers.append(opt)
            _claim(obj, claimed)
            continue
        stype = _scheduler_type(obj)
        if stype is not None:
            found.schedulers.append(SchedulerState(ptr, stype, obj, known=stype != "unknown",
                                                   reason="" if stype != "unknown" else
                                                   "scheduler keys of no torch class"))
            _claim(obj, claimed)
            continue
        why = unknown_scheduler_reason(obj)
        if why is not None:
            found.schedulers.append(SchedulerState(ptr, knowledge.UNKNOWN, obj, known=False,
                                                   reason=why))
            _claim(obj, claimed)
            continue
        for key, value in children(obj):
            if id(value) in claimed or not isinstance(value, Reduce):
                continue
            why = unknown_scheduler_reason(value)
            if why is not None:
                state = value.state if isinstance(value.state, dict) else {}
                found.schedulers.append(SchedulerState(join(ptr, key), knowledge.UNKNOWN, state,
                                                       known=False, reason=why))
                claimed.add(id(value))
                continue
            tensors = module_tensors(value)
            if tensors:
                found.models.append(ModelState(join(ptr, key), tensors, pickled=value.qualname))
                claimed.add(id(value))
        if is_model_state(obj):
            fmt = ckpt.file_for(ptr).format if ckpt.is_folder else ckpt.files[0].format
            found.models.append(ModelState(ptr, obj, ordered=fmt != "safetensors"))
            _claim(obj, claimed)
    from .names import attach_names
    for opt in found.optimizers:
        attach_names(opt, found.models)
        if opt.names_source is None and is_rank_optimizer(opt.pointer):
            opt.names_note = ("a DeepSpeed ZeRO rank file: each param id is one group's flat "
                              "partition of several parameters (see the DeepSpeed ZeRO "
                              "partitions)")
    return found


def _claim(obj: Any, claimed: set[int]) -> None:
    for _, sub in walk(obj):
        claimed.add(id(sub))
