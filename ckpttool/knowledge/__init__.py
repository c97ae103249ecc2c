"""Torch-free knowledge about ``torch.optim`` optimizers and LR schedulers.

The data lives in ``torch_optim.json`` next to this module.  It is generated
from the installed torch by :mod:`ckpttool.knowledge.generate`, which imports
torch (as does :mod:`ckpttool.stats`, for ``show --stats`` only); this module
only uses the standard library, so inspecting a checkpoint never needs torch.

Main entry points:

* :func:`optimizer_types`, :func:`optimizer_info` - what torch writes for each
  optimizer (default hyperparameters, param-group key order, per-parameter
  state keys, state keys added by options such as ``amsgrad=True``).
* :func:`infer_optimizer` - guess an optimizer class from the keys of an
  optimizer ``state_dict()`` (``param_groups`` and ``state``).
* :func:`scheduler_types`, :func:`scheduler_info`, :func:`infer_scheduler`,
  :func:`looks_like_scheduler`, :func:`per_group_scheduler_keys` - the same
  for LR schedulers.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
import os
from typing import Any

__all__ = [
    "IGNORED_GROUP_KEYS",
    "LR_LIKE_GROUP_KEYS",
    "SCHEDULER_ADDED_GROUP_KEYS",
    "HISTORICAL_SCHEDULER_KEYS",
    "UNKNOWN",
    "StateEntryInfo",
    "OptimizerInfo",
    "OptimizerGuess",
    "SchedulerInfo",
    "torch_version",
    "optimizer_types",
    "optimizer_info",
    "infer_optimizer",
    "scheduler_types",
    "scheduler_info",
    "scheduler_candidates",
    "infer_scheduler",
    "looks_like_scheduler",
    "per_group_scheduler_keys",
    "scheduler_added_group_keys",
]

#: Returned as the type when nothing matches.
UNKNOWN = "unknown"

#: Param-group keys that are not hyperparameters (``param_names`` is written
#: by torch >= 2.6 when an optimizer is built from ``named_parameters()``).
IGNORED_GROUP_KEYS: tuple[str, ...] = ("params", "param_names")

#: Param-group keys holding a learning rate (``lr`` plus the keys written by
#: schedulers: OneCycleLR's initial/max/min_lr, SWALR's swa_lr).
LR_LIKE_GROUP_KEYS: tuple[str, ...] = ("lr", "initial_lr", "max_lr", "min_lr", "swa_lr")

#: Param-group keys that LR schedulers add to the optimizer's groups.  The
#: effective set used by :func:`infer_optimizer` is this tuple united with the
#: keys the generator saw being added (see :func:`scheduler_added_group_keys`,
#: which e.g. also contains ``swa_lr`` from ``SWALR``).
SCHEDULER_ADDED_GROUP_KEYS: tuple[str, ...] = ("initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum")

#: At most this many param-group keys that a torch optimizer does not write are taken as a
#: framework's additions (mmengine ``lr_mult`` / ``decay_mult``, timm ``lr_scale``,
#: ultralytics ``param_group``); more mean another optimizer (timm's Lamb, LAMB, Lion...).
MAX_EXTRA_GROUP_KEYS = 3

#: Scheduler state keys written by older torch releases only (``verbose`` was
#: an ``LRScheduler`` attribute until torch 2.2-2.6); ignored when falling back
#: from an exact key-set match.
HISTORICAL_SCHEDULER_KEYS: tuple[str, ...] = ("verbose",)

_DATA_FILE = "torch_optim.json"


@functools.lru_cache(maxsize=1)
def _data() -> dict[str, Any]:
    """Load the JSON knowledge once (lazily; a plain file read next to this module: the
    package is installed as files, and importlib.resources costs ~5 ms of imports)."""
    with open(os.path.join(os.path.dirname(__file__), _DATA_FILE), encoding="utf-8") as f:
        text = f.read()
    data: dict[str, Any] = json.loads(text)
    return data


def weights_only_globals() -> frozenset[str]:
    """The globals ``torch.load(weights_only=True)`` of the torch the knowledge was
    generated from accepts (``torch._weights_only_unpickler._get_allowed_globals``)."""
    return frozenset(_data()["weights_only_globals"])


def torch_version() -> str:
    """Version of the torch the knowledge was generated from."""
    return str(_data()["torch_version"])


# --------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class StateEntryInfo:
    """How one per-parameter state entry (e.g. ``exp_avg``) is stored.

    ``kind`` is ``"tensor"`` or ``"python"``; for tensors ``dtype`` (e.g.
    ``"float32"``) and ``ndim`` (0 for scalar tensors such as ``step``) are
    set, for python values ``type`` is the type name (``"int"``, ``"list"``...).
    """

    kind: str
    dtype: str | None = None
    ndim: int | None = None
    sparse: bool = False
    type: str | None = None

    @property
    def is_tensor(self) -> bool:
        """True if the entry is a tensor."""
        return self.kind == "tensor"

    @property
    def is_scalar_tensor(self) -> bool:
        """True if the entry is a 0-d tensor."""
        return self.kind == "tensor" and self.ndim == 0

    @classmethod
    def _from_json(cls, raw: Mapping[str, Any]) -> StateEntryInfo:
        return cls(
            kind=str(raw["kind"]),
            dtype=raw.get("dtype"),
            ndim=raw.get("ndim"),
            sparse=bool(raw.get("sparse", False)),
            type=raw.get("type"),
        )


@dataclass(frozen=True)
class OptimizerInfo:
    """What torch writes into ``state_dict()`` for one optimizer class.

    Attributes:
        name: class name, e.g. ``"AdamW"``.
        module: defining module, e.g. ``"torch.optim.adamw"``.
        defaults: default hyperparameters, JSON-encoded (tuples as lists,
            ``None`` kept); values without a JSON form are
            ``{"__nonjson__": True, "repr": ...}`` (see ``nonjson_defaults``).
        nonjson_defaults: names of defaults that had no JSON form.
        group_keys: keys of a param group in ``state_dict()["param_groups"]``,
            in the order torch writes them (``params`` last).
        state_keys: per-parameter state keys by parameter dimensionality
            (e.g. Adafactor keeps ``row_var``/``col_var`` for 2-D params and
            ``variance`` for 1-D ones).  A dimensionality is absent when the
            optimizer stores no state for such params (LBFGS keeps all its
            state under the first param; SGD without momentum keeps none).
        state_entries: :class:`StateEntryInfo` per key, by dimensionality.
        conditional_state: extra state keys added by a non-default option,
            keyed by ``"option=json-value"``, e.g. ``{"amsgrad=true":
            ("max_exp_avg_sq",)}``.
        options_tried: every option flip the generator tried -> ``"ok"`` or
            ``"raised"`` (e.g. ``capturable=true`` raises on CPU).
        step: how the ``step`` state entry is stored, or None if there is none.
        supports_param_groups: False if the optimizer refuses several param
            groups (LBFGS).
        param_setup: params the generator used (``"dense-2d-1d"``,
            ``"dense-2d"`` for Muon, ``"sparse-embedding"`` for SparseAdam).
    """

    name: str
    module: str
    defaults: dict[str, Any]
    nonjson_defaults: tuple[str, ...]
    group_keys: tuple[str, ...]
    state_keys: dict[int, tuple[str, ...]]
    state_entries: dict[int, dict[str, StateEntryInfo]]
    conditional_state: dict[str, tuple[str, ...]]
    options_tried: dict[str, str]
    step: StateEntryInfo | None
    supports_param_groups: bool
    param_setup: str

    @property
    def hyperparameter_keys(self) -> frozenset[str]:
        """Keys torch writes into every param group (the ``defaults`` keys)."""
        return frozenset(self.defaults)

    @property
    def unconditional_state_keys(self) -> frozenset[str]:
        """State keys present with default options (union over dimensionalities)."""
        return frozenset(k for keys in self.state_keys.values() for k in keys)

    @property
    def possible_state_keys(self) -> frozenset[str]:
        """Every state key this optimizer can write (unconditional ∪ conditional)."""
        extra = {k for keys in self.conditional_state.values() for k in keys}
        return self.unconditional_state_keys | extra

    @property
    def step_is_python_int(self) -> bool:
        """True if ``step`` is stored as a python int (SparseAdam)."""
        return self.step is not None and self.step.kind == "python" and self.step.type == "int"

    @property
    def step_is_tensor(self) -> bool:
        """True if ``step`` is stored as a tensor (0-d, float32 in current torch)."""
        return self.step is not None and self.step.is_tensor

    @property
    def step_dtype(self) -> str | None:
        """dtype of a tensor ``step`` (e.g. ``"float32"``), else None."""
        return self.step.dtype if self.step is not None and self.step.is_tensor else None

    @property
    def flag_keys(self) -> frozenset[str]:
        """Defaults whose value is a bool or None (implementation switches such
        as ``foreach``, ``fused``, ``capturable``; torch added most of them over
        time, so older checkpoints may lack some)."""
        return frozenset(k for k, v in self.defaults.items() if v is None or isinstance(v, bool))


def _optimizer_from_json(name: str, raw: Mapping[str, Any]) -> OptimizerInfo:
    return OptimizerInfo(
        name=name,
        module=str(raw["module"]),
        defaults=dict(raw["defaults"]),
        nonjson_defaults=tuple(raw["nonjson_defaults"]),
        group_keys=tuple(raw["group_keys"]),
        state_keys={int(dim): tuple(keys) for dim, keys in sorted(raw["state_keys"].items())},
        state_entries={
            int(dim): {k: StateEntryInfo._from_json(v) for k, v in sorted(entries.items())}
            for dim, entries in sorted(raw["state"].items())
        },
        conditional_state={k: tuple(v) for k, v in sorted(raw["conditional_state"].items())},
        options_tried=dict(sorted(raw["options_tried"].items())),
        step=None if raw["step"] is None else StateEntryInfo._from_json(raw["step"]),
        supports_param_groups=bool(raw["supports_param_groups"]),
        param_setup=str(raw["param_setup"]),
    )


@functools.lru_cache(maxsize=1)
def _optimizers() -> dict[str, OptimizerInfo]:
    return {name: _optimizer_from_json(name, raw) for name, raw in sorted(_data()["optimizers"].items())}


def optimizer_types() -> list[str]:
    """Names of all known ``torch.optim`` optimizer classes, sorted."""
    return list(_optimizers())


def optimizer_info(name: str) -> OptimizerInfo:
    """Knowledge about optimizer class ``name`` (e.g. ``"Adam"``).

    Raises:
        KeyError: if ``name`` is not a known torch.optim optimizer.
    """
    try:
        return _optimizers()[name]
    except KeyError:
        raise KeyError(f"unknown optimizer type {name!r}; known: {', '.join(optimizer_types())}") from None


@functools.lru_cache(maxsize=1)
def _all_flag_keys() -> frozenset[str]:
    return frozenset(k for info in _optimizers().values() for k in info.flag_keys)


def scheduler_added_group_keys() -> frozenset[str]:
    """Param-group keys LR schedulers may add: :data:`SCHEDULER_ADDED_GROUP_KEYS`
    plus every key the generator saw a scheduler add (e.g. ``swa_lr``)."""
    seen = {k for raw in _data()["schedulers"].values() for k in raw["group_keys_added"]}
    return frozenset(SCHEDULER_ADDED_GROUP_KEYS) | seen


@dataclass(frozen=True)
class OptimizerGuess:
    """Result of :func:`infer_optimizer`.

    Attributes:
        type: optimizer class name, or ``"unknown"``.
        candidates: every optimizer compatible with the keys (best first);
            more than one means the guess in ``type`` is ambiguous.
        seen_group_keys: group keys considered (sorted; ``params`` /
            ``param_names`` and scheduler-added keys removed).
        seen_state_keys: per-parameter state keys seen (sorted).
        reason: human readable explanation.
        exact: True if the group keys matched the optimizer's key set exactly
            (False for a closest-match fallback or ``"unknown"``).
        extra_keys: group keys the inferred type does not write (added by a framework:
            mmengine ``lr_mult`` / ``decay_mult``, timm ``lr_scale``, ultralytics
            ``param_group``); kept as they are by every edit.
    """

    type: str
    candidates: tuple[str, ...]
    seen_group_keys: tuple[str, ...]
    seen_state_keys: tuple[str, ...]
    reason: str
    exact: bool = field(default=False)
    extra_keys: tuple[str, ...] = field(default=())

    @property
    def is_known(self) -> bool:
        """True if ``type`` is a real optimizer class name."""
        return self.type != UNKNOWN

    @property
    def is_ambiguous(self) -> bool:
        """True if several optimizers are compatible with the keys."""
        return len(self.candidates) > 1


def _disambiguate(
    names: list[str], state_keys: frozenset[str], group_values: Mapping[str, object] | None
) -> tuple[list[str], list[str]]:
    """Narrow and order equally-matching candidates.

    1. For every bool default on which candidates disagree (e.g.
       ``decoupled_weight_decay``: False for Adam, True for AdamW), keep the
       candidates whose default equals the value found in ``group_values``.
    2. Order by how many of the candidate's unconditional state keys were
       seen (more first), then by name.

    Returns the ordered candidates and notes for the reason string.
    """
    notes: list[str] = []
    infos = [optimizer_info(n) for n in names]
    if group_values is not None and len(infos) > 1:
        common = set.intersection(*(set(i.defaults) for i in infos))
        for key in sorted(common):
            defaults = {i.name: i.defaults[key] for i in infos}
            if not all(isinstance(v, bool) for v in defaults.values()) or len(set(defaults.values())) < 2:
                continue
            value = group_values.get(key)
            if not isinstance(value, bool):
                continue
            kept = [i for i in infos if i.defaults[key] == value]
            if kept and len(kept) < len(infos):
                notes.append(f"{key}={value} selects {', '.join(i.name for i in kept)}")
                infos = kept
    infos.sort(key=lambda i: (-len(i.unconditional_state_keys & state_keys), i.name))
    return [i.name for i in infos], notes


def infer_optimizer(
    group_keys: Collection[str],
    state_keys: Collection[str],
    group_values: Mapping[str, object] | None = None,
) -> OptimizerGuess:
    """Guess the torch.optim class that wrote an optimizer ``state_dict()``.

    Args:
        group_keys: keys of the param groups (union over groups).
        state_keys: per-parameter state keys (union over params).
        group_values: optional values of one param group; used to tell apart
            optimizers with identical key sets (Adam vs AdamW via
            ``decoupled_weight_decay``).

    Rules:

    * ``params`` / ``param_names`` and scheduler-added keys (``initial_lr``,
      ``max_lr``, ``min_lr``, ``base_momentum``, ``max_momentum``, ...) are
      ignored.
    * Exact match: the remaining group keys equal the optimizer's default keys
      (torch writes every default into every group) and the state keys are a
      subset of the optimizer's possible state keys.
    * Otherwise (e.g. an older torch that did not write newer switches such
      as ``fused`` or ``decoupled_weight_decay``), a closest match is returned
      when the key sets differ only by flag keys (bool/None defaults of some
      torch optimizer), every non-flag hyperparameter of the optimizer is
      present and the state keys fit; candidates without extra keys are
      preferred, then those missing the fewest keys.  ``exact`` is False then.
    * Anything else is ``"unknown"`` (e.g. timm's Lamb), with the keys seen.
    """
    ignored = set(IGNORED_GROUP_KEYS) | scheduler_added_group_keys()
    seen_g = frozenset(group_keys) - ignored
    seen_s = frozenset(state_keys)
    sg, ss = tuple(sorted(seen_g)), tuple(sorted(seen_s))

    if not seen_g:
        return OptimizerGuess(UNKNOWN, (), sg, ss, "no param-group hyperparameter keys")

    infos = list(_optimizers().values())
    group_match = [i for i in infos if i.hyperparameter_keys - ignored == seen_g]
    exact = [i.name for i in group_match if seen_s <= i.possible_state_keys]
    if exact:
        ordered, notes = _disambiguate(exact, seen_s, group_values)
        if len(ordered) == 1:
            reason = f"group keys match {ordered[0]} exactly and state keys fit"
        else:
            reason = f"group and state keys fit {', '.join(ordered)}; ambiguous, picked {ordered[0]}"
            if group_values is None:
                reason += " (pass group values to distinguish)"
        if notes:
            reason += "; " + "; ".join(notes)
        return OptimizerGuess(ordered[0], tuple(ordered), sg, ss, reason, exact=True)

    if group_match:
        names = ", ".join(i.name for i in group_match)
        bad = sorted(seen_s - frozenset().union(*(i.possible_state_keys for i in group_match)))
        return OptimizerGuess(
            UNKNOWN,
            tuple(i.name for i in group_match),
            sg,
            ss,
            f"group keys match {names} but state keys {bad} are not written by it",
        )

    flags = _all_flag_keys()
    scored: list[tuple[tuple[int, int], OptimizerInfo, list[str], list[str]]] = []
    for info in infos:
        expected = info.hyperparameter_keys - ignored
        missing = sorted(expected - seen_g)
        extra = sorted(seen_g - expected)
        if not set(missing) | set(extra) <= flags:
            continue
        if not (expected - info.flag_keys) <= seen_g:
            continue
        if not seen_s <= info.possible_state_keys:
            continue
        # Newer torch releases add switches, they rarely remove keys, so
        # checkpoints from older torch *lack* keys: prefer candidates without
        # extra keys, then the fewest missing keys.
        scored.append(((len(extra), len(missing)), info, missing, extra))
    if not scored:
        return _infer_with_extra_keys(infos, seen_g, seen_s, group_values, sg, ss)

    best = min(s[0] for s in scored)
    top = [s for s in scored if s[0] == best]
    ordered, notes = _disambiguate([s[1].name for s in top], seen_s, group_values)
    _, _, missing, extra = next(s for s in top if s[1].name == ordered[0])
    parts = []
    if missing:
        parts.append(f"group keys missing {', '.join(missing)}")
    if extra:
        parts.append(f"extra group keys {', '.join(extra)}")
    reason = "closest match: " + "; ".join(parts)
    if len(ordered) > 1:
        reason += f"; ambiguous between {', '.join(ordered)}"
    if notes:
        reason += "; " + "; ".join(notes)
    return OptimizerGuess(ordered[0], tuple(ordered), sg, ss, reason, exact=False)


def _infer_with_extra_keys(infos: list[OptimizerInfo], seen_g: frozenset[str],
                           seen_s: frozenset[str], group_values: Mapping[str, object] | None,
                           sg: tuple[str, ...], ss: tuple[str, ...]) -> OptimizerGuess:
    """The type when frameworks added keys of their own to the groups.

    Every hyperparameter the type writes that is not a flag must be present, the state keys
    must fit (with ``step`` when the type keeps one), and at most
    :data:`MAX_EXTRA_GROUP_KEYS` keys may be left over (those are the "extra keys"; never a
    ``step``, which means an optimizer that counts steps in its groups, like timm's Lamb);
    flags an older torch did not write may be missing. State keys decide between equal
    candidates.
    """
    scored: list[tuple[tuple[int, int, int], OptimizerInfo, list[str]]] = []
    for info in infos:
        expected = info.hyperparameter_keys - set(IGNORED_GROUP_KEYS) - \
            scheduler_added_group_keys()
        if not seen_s <= info.possible_state_keys:
            continue
        if seen_s and info.step is not None and "step" not in seen_s:
            continue
        # a required key may be missing (a damaged state) only when the state entries name
        # the type on their own: all of its unconditional state keys are there
        lacking = (expected - info.flag_keys) - seen_g
        if lacking and not (seen_s and info.unconditional_state_keys <= seen_s
                            and len(lacking) <= 2):
            continue
        extra = sorted(seen_g - expected)
        if len(extra) > MAX_EXTRA_GROUP_KEYS or "step" in extra:
            continue
        missing = len(expected - seen_g) + 10 * len(lacking)
        evidence = -len(info.unconditional_state_keys & seen_s)
        scored.append(((len(extra), missing, evidence), info, extra))
    if not scored:
        return OptimizerGuess(UNKNOWN, (), sg, ss, "keys match no torch.optim optimizer")
    best = min(s[0] for s in scored)
    top = [s for s in scored if s[0] == best]
    ordered, notes = _disambiguate([s[1].name for s in top], seen_s, group_values)
    extra = next(s[2] for s in top if s[1].name == ordered[0])
    info0 = optimizer_info(ordered[0])
    lacking0 = sorted((info0.hyperparameter_keys - info0.flag_keys
                       - set(IGNORED_GROUP_KEYS) - scheduler_added_group_keys()) - seen_g)
    reason = f"group keys of {ordered[0]}"
    if extra:
        reason += f" plus extra keys {', '.join(extra)}"
    if lacking0:
        reason += f", missing {', '.join(lacking0)}"
    reason += "; state keys fit" if seen_s else ""
    if len(ordered) > 1:
        reason += f"; ambiguous between {', '.join(ordered)}"
    if notes:
        reason += "; " + "; ".join(notes)
    return OptimizerGuess(ordered[0], tuple(ordered), sg, ss, reason, exact=False,
                          extra_keys=tuple(extra))


# --------------------------------------------------------------------------
# LR schedulers
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SchedulerInfo:
    """What ``state_dict()`` of one LR scheduler class contains.

    Attributes:
        name: class name, e.g. ``"OneCycleLR"``.
        module: defining module.
        keys: ``state_dict()`` keys, sorted.
        per_group_keys: keys holding a list with one entry per param group.
        group_keys_added: keys the scheduler adds to the optimizer's groups.
        value_types: python type name of each value (``"list"``, ``"Counter"``...).
        nested_scheduler_keys: keys holding a list of nested scheduler
            state_dicts (SequentialLR, ChainedScheduler).
    """

    name: str
    module: str
    keys: tuple[str, ...]
    per_group_keys: tuple[str, ...]
    group_keys_added: tuple[str, ...]
    value_types: dict[str, str]
    nested_scheduler_keys: tuple[str, ...]


@functools.lru_cache(maxsize=1)
def _schedulers() -> dict[str, SchedulerInfo]:
    return {
        name: SchedulerInfo(
            name=name,
            module=str(raw["module"]),
            keys=tuple(raw["keys"]),
            per_group_keys=tuple(raw["per_group_keys"]),
            group_keys_added=tuple(raw["group_keys_added"]),
            value_types=dict(raw["value_types"]),
            nested_scheduler_keys=tuple(raw["nested_scheduler_keys"]),
        )
        for name, raw in sorted(_data()["schedulers"].items())
    }


def scheduler_types() -> list[str]:
    """Names of all known LR scheduler classes, sorted."""
    return list(_schedulers())


def scheduler_info(name: str) -> SchedulerInfo:
    """Knowledge about scheduler class ``name``.

    Raises:
        KeyError: if ``name`` is not a known scheduler.
    """
    try:
        return _schedulers()[name]
    except KeyError:
        raise KeyError(f"unknown scheduler type {name!r}; known: {', '.join(scheduler_types())}") from None


def per_group_scheduler_keys(type: str) -> tuple[str, ...]:  # noqa: A002 - name fixed by the API
    """State keys of scheduler ``type`` that hold one entry per param group
    (e.g. ``("_last_lr", "base_lrs")``); ``()`` for unknown names."""
    info = _schedulers().get(type)
    return info.per_group_keys if info is not None else ()


#: When several classes have the same key set, the first of these wins.
#: LambdaLR and MultiplicativeLR both store exactly the LRScheduler base keys
#: plus ``lr_lambdas`` and cannot be told apart from their state; LambdaLR is
#: far more common.  Remaining ties are broken alphabetically.
_SCHEDULER_PREFERENCE: tuple[str, ...] = ("LambdaLR",)


def _order_schedulers(names: Iterable[str]) -> list[str]:
    pref = {n: i for i, n in enumerate(_SCHEDULER_PREFERENCE)}
    return sorted(names, key=lambda n: (pref.get(n, len(pref)), n))


def _base_keys() -> frozenset[str]:
    return frozenset(_data()["scheduler_base_keys"])


def scheduler_candidates(keys: Collection[str]) -> tuple[str, ...]:
    """All scheduler classes compatible with ``keys``, preferred first.

    Exact key-set matches are returned if there are any.  Otherwise, if the
    keys look like a scheduler (:func:`looks_like_scheduler`) at all (older
    torch versions add/drop base-class bookkeeping keys such as ``verbose``,
    ``_is_initial``), the class-specific keys (keys minus the ``LRScheduler``
    base keys and :data:`HISTORICAL_SCHEDULER_KEYS`) are compared: an exact
    match of those, else the classes whose specific keys are a subset or
    superset of them with Jaccard similarity >= 0.75 (e.g. a torch-2.1
    ReduceLROnPlateau, which lacks ``default_min_lr``), else the class whose keys
    hold every key seen including one no other class has (CyclicLR with
    ``cycle_momentum=False`` leaves its momentum keys out).
    """
    seen = frozenset(keys)
    infos = _schedulers().values()
    exact = [i.name for i in infos if frozenset(i.keys) == seen]
    if exact:
        return tuple(_order_schedulers(exact))
    if not looks_like_scheduler(seen):
        return ()
    strip = _base_keys() | frozenset(HISTORICAL_SCHEDULER_KEYS)
    rest = seen - strip
    if not rest:
        return ()
    specific = {i.name: frozenset(i.keys) - strip for i in infos}
    same = [n for n, s in specific.items() if s and s == rest]
    if same:
        return tuple(_order_schedulers(same))
    close = [
        n
        for n, s in specific.items()
        if s and (s <= rest or rest <= s) and len(s & rest) / len(s | rest) >= 0.75
    ]
    if close:
        return tuple(_order_schedulers(close))
    # options leave keys out (CyclicLR(cycle_momentum=False) keeps no momentum keys): a class
    # whose keys hold all the keys seen, including one that no other class has
    owned = [
        n
        for n, s in specific.items()
        if rest <= s and rest & (s - frozenset().union(*(o for m, o in specific.items() if m != n)))
    ]
    return tuple(_order_schedulers(owned))


def looks_like_scheduler(mapping_keys: Collection[str]) -> bool:
    """True if a mapping with these keys looks like an LR scheduler state_dict.

    That is: its key set is a known scheduler's, or it has ``last_epoch`` and
    a per-group scheduler key (``base_lrs``, ``_last_lr``, ``min_lrs``, ...),
    or it has nested scheduler states (``_schedulers``) and ``_last_lr``
    (ChainedScheduler has no ``last_epoch``).
    """
    seen = frozenset(mapping_keys)
    infos = _schedulers().values()
    if any(frozenset(i.keys) == seen for i in infos):
        return True
    per_group = {k for i in infos for k in i.per_group_keys}
    nested = {k for i in infos for k in i.nested_scheduler_keys}
    if "last_epoch" in seen and seen & per_group:
        return True
    return bool(seen & nested) and "_last_lr" in seen


def infer_scheduler(keys: Collection[str]) -> str | None:
    """Guess the LR scheduler class from its ``state_dict()`` keys.

    Returns the class name; ``"unknown"`` if the keys look like a scheduler
    (see :func:`looks_like_scheduler`) but match no known class; None if they
    do not look like a scheduler at all.  Classes are told apart by their
    exact key set (see :func:`scheduler_candidates` for the fallback used for
    other torch versions).  LambdaLR and MultiplicativeLR share a key set;
    LambdaLR is returned for it.  ReduceLROnPlateau has no ``base_lrs`` and
    is recognised by its own keys (``best``, ``num_bad_epochs``, ...).
    """
    candidates = scheduler_candidates(keys)
    if candidates:
        return candidates[0]
    if looks_like_scheduler(keys):
        return UNKNOWN
    return None
