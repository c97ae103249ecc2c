"""Parameter names for optimizer state: stored ``param_names``, or a certain model alignment.

torch matches optimizer state to parameters by position only. A model ``state_dict`` lists
parameters in ``model.parameters()`` order (interleaved with buffers). When an optimizer has
no ``param_names``, its param ids are aligned with a model's parameters by order and shape:
each group is taken to list its params in model order (groups may interleave, as decay /
no-decay splits do), and a name is given only when exactly one assignment fits every known
shape. Anything less certain gives no names and says why; a wrong name is never shown.
"""

from __future__ import annotations

from typing import Any

from .locate import ModelState, OptimizerState

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
_FLOAT_DTYPES = ("float", "bfloat16", "complex")
MAX_STATES = 20_000


def model_parameters(model: ModelState) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the entries that can be parameters, in order.

    Skips BatchNorm buffers, non-floating tensors (never parameters) and tied duplicates
    (entries sharing storage, offset, shape and stride with an earlier one, which
    ``model.parameters()`` lists once).
    """
    out = []
    seen: set[tuple[Any, ...]] = set()
    for name, t in model.tensors.items():
        if name.rsplit(".", 1)[-1] in BUFFER_SUFFIXES:
            continue
        if not t.dtype.startswith(_FLOAT_DTYPES):
            continue
        st = getattr(t, "storage", None)
        if st is not None:
            key = (id(st), t.offset, t.shape, t.stride)
            if key in seen:
                continue
            seen.add(key)
        out.append((name, tuple(t.shape)))
    return out


def param_shape(opt_type: str, entries: dict[str, Any]) -> tuple[int, ...] | None:
    """The parameter's shape as its state shows it, or None if the state cannot tell."""
    distinct = set(state_shapes(opt_type, entries).values())
    return distinct.pop() if len(distinct) == 1 else None


def state_shapes(opt_type: str, entries: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The param shape each non-scalar entry of one param's state implies (Adafactor's
    factored ``row_var`` / ``col_var`` together as ``<factored>``); empty for LBFGS."""
    if opt_type in ("LBFGS", "unknown"):
        return {}
    shapes = {}
    for k, v in entries.items():
        shape = getattr(v, "shape", None)
        if shape is not None and len(shape) > 0:
            shapes[k] = tuple(shape)
    if "row_var" in shapes and "col_var" in shapes:  # Adafactor's factored second moment
        r, c = shapes.pop("row_var"), shapes.pop("col_var")
        if len(r) == len(c) >= 2:
            shapes["<factored>"] = (*r[:-1], c[-1])
    return shapes


def align(groups: list[list[tuple[int, ...] | None]],
          model: list[tuple[str, tuple[int, ...]]]) -> list[list[int]] | str:
    """Assign model positions to each group's params, or say why it is not certain.

    Returns per group the model index of each param, when exactly one interleaving of the
    groups (each in its own order) matches the model's shapes; otherwise a reason.
    """
    total = sum(len(g) for g in groups)
    if total != len(model):
        return (f"the optimizer has {total} params but the model has {len(model)} "
                "parameter tensors (buffers and tied copies excluded)")
    fast = _align_by_owner(groups, model)
    if fast is not None:
        return fast
    # forward DP over states (index into each group); ways capped at 2
    start = tuple(0 for _ in groups)
    layer: dict[tuple[int, ...], tuple[int, Any]] = {start: (1, None)}
    history: list[dict[tuple[int, ...], tuple[int, Any]]] = [layer]
    visited = 0
    for pos in range(len(model)):
        shape = model[pos][1]
        nxt: dict[tuple[int, ...], tuple[int, Any]] = {}
        for state, (ways, _) in layer.items():
            for g, i in enumerate(state):
                if i < len(groups[g]) and groups[g][i] in (None, shape):
                    ns = state[:g] + (i + 1,) + state[g + 1:]
                    prev = nxt.get(ns)
                    nxt[ns] = (min(2, ways + (prev[0] if prev else 0)),
                               (state, g) if prev is None else None)
        visited += len(nxt)
        if not nxt:
            return (f"no order of the groups fits the model: {model[pos][0]} has shape "
                    f"{list(shape)} where no param of that shape can come next")
        if visited > MAX_STATES:
            return "too many ways to align the groups with the model (ambiguous)"
        layer = nxt
        history.append(layer)
    end = tuple(len(g) for g in groups)
    ways, _ = layer.get(end, (0, None))
    if ways != 1:
        return ("more than one assignment of params to model parameters fits the shapes "
                "(groups hold params of the same shapes); names would be a guess")
    result = [[0] * len(g) for g in groups]
    state = end
    for pos in range(len(model), 0, -1):
        _, back = history[pos][state]
        prev_state, g = back
        result[g][prev_state[g]] = pos - 1
        state = prev_state
    return result


def _align_by_owner(groups: list[list[tuple[int, ...] | None]],
                    model: list[tuple[str, tuple[int, ...]]]) -> list[list[int]] | str | None:
    """The common case in linear time: every shape belongs to one group only, so each model
    position's shape names its group. None when shapes are shared or unknown (use the DP)."""
    owner: dict[tuple[int, ...], int] = {}
    for g, shapes in enumerate(groups):
        for s in shapes:
            if s is None or owner.setdefault(s, g) != g:
                return None
    result: list[list[int]] = [[] for _ in groups]
    for pos, (name, shape) in enumerate(model):
        owned = owner.get(shape)
        if owned is None or len(result[owned]) >= len(groups[owned]) \
                or groups[owned][len(result[owned])] != shape:
            return (f"no order of the groups fits the model: {name} has shape {list(shape)} "
                    "where no param of that shape can come next")
        result[owned].append(pos)
    return result


def attach_names(opt: OptimizerState, models: list[ModelState]) -> None:
    """Fill names on ``opt``'s groups and state from param_names or a certain alignment."""
    if opt.names_source is not None:  # param_names, or the ids of a name-keyed state dict
        _spread(opt)
        for m in models:
            if m.ordered:
                pos = {n: i for i, (n, _) in enumerate(model_parameters(m))}
                ids = {p: n for g in opt.groups for p, n in zip(g.params, g.param_names)}
                if all(n in pos for n in ids.values()):
                    opt.model_order = {p: pos[n] for p, n in ids.items()}  # type: ignore[index]
                    opt.names_model = m.pointer
                    break
        return
    if not models:
        opt.names_note = "no param_names stored and no model state in the checkpoint"
        return
    by_param = {s.param: s for s in opt.state}
    shapes = [[param_shape(opt.type, by_param[p].entries) if p in by_param else None
               for p in g.params] for g in opt.groups]
    known = sum(s is not None for g in shapes for s in g)
    total = sum(len(g) for g in shapes)
    results: list[tuple[ModelState, list[list[int]]]] = []
    reasons = []
    for m in models:
        if not m.ordered:
            reasons.append(f"{m.pointer or '/'}: names are sorted in the file, not in model order")
            continue
        params = model_parameters(m)
        if known == 0 and len(opt.groups) > 1:
            reasons.append(f"{m.pointer}: the optimizer keeps no state, so shapes cannot "
                           "confirm an alignment")
            continue
        r = align(shapes, params)
        if isinstance(r, str):
            reasons.append(f"{m.pointer}: {r}")
        else:
            results.append((m, r))
    if len(results) != 1:
        if results:
            opt.names_note = ("the params fit several models (" + ", ".join(
                m.pointer for m, _ in results) + "); names would be a guess")
        else:
            opt.names_note = "; ".join(reasons) or "no model to align with"
        return
    model, assignment = results[0]
    params = model_parameters(model)
    opt.model_order = {}
    opt.names_model = model.pointer
    for g, idxs in zip(opt.groups, assignment):
        g.param_names = [params[i][0] for i in idxs]
        opt.model_order.update(zip(g.params, idxs))
    opt.names_source = (f"model {model.pointer} (order and shape; {known} of {total} "
                        "shapes checked)")
    _spread(opt)


def _spread(opt: OptimizerState) -> None:
    names = {p: n for g in opt.groups for p, n in zip(g.params, g.param_names)}
    for s in opt.state:
        s.name = names.get(s.param)
