"""Turning a Checkpoint into the ``show`` JSON document and text tables, and a plan into its
``--dry-run`` table. Presentation only: what is shown is computed elsewhere.

JSON values: tensors become ``{"shape", "dtype", "device"}`` (plus ``"value"`` when the reader
read it), tuples become lists, non-finite floats the strings ``"inf"``, ``"-inf"``, ``"nan"``,
bytes ``{"bytes": N}``, opaque objects ``{"opaque": "module.name", "args": [...]}`` (plus
``"state"`` when it has one), globals ``{"global": "module.name"}``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

from .checkpoint import Checkpoint
from .formats.nodes import Global, Reduce, Storage, TensorRef
from .formats.safetensors import SafeTensor
from .locate import (ModelState, OptimizerState, SchedulerState, flattened_to_nested,
                     is_flattened_optimizer, is_model_state,
                     is_optimizer_state)
from .deepspeed import zero_groups
from .tree import join

if TYPE_CHECKING:
    from .edits.plan import Plan
    from .diff import DiffResult
    from .run import Run

SCHEMA_VERSION = 1
DEFAULT_ROWS = 20


def tensor_json(t: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"shape": list(t.shape), "dtype": t.dtype, "device": t.device}
    if t.value is not None:
        d["value"] = to_json(t.value)
    dt = getattr(t, "dtensor", None)
    if dt is not None:  # a DTensor: shape is global; its shard, placements and mesh
        d["dtensor"] = dt
    chunks = getattr(t, "chunks", None)
    if chunks is not None:  # a DCP tensor: how it is sharded, and where
        d["chunks"] = [{"offsets": list(o or ()), "sizes": list(z or ()), "file": f,
                        "offset": off, "length": n} for o, z, f, off, n in chunks]
    return d


def to_json(v: Any, depth: int = 0) -> Any:
    """A JSON-ready copy of a tree value (see the module docstring)."""
    if depth > 50:
        return "..."
    if v is None or isinstance(v, (bool, str, int)):
        return v
    if isinstance(v, float):
        if math.isfinite(v):
            return v
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (TensorRef, SafeTensor)):
        return tensor_json(v)
    if isinstance(v, dict):
        return {str(k): to_json(x, depth + 1) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_json(x, depth + 1) for x in v]
    if isinstance(v, (set, frozenset)):
        return sorted((to_json(x, depth + 1) for x in v), key=repr)
    if isinstance(v, complex):
        return [v.real, v.imag]
    if isinstance(v, (bytes, bytearray)):
        return {"bytes": len(v)}
    if isinstance(v, Global):
        return {"global": v.qualname}
    if isinstance(v, Storage):
        return {"storage": v.key, "device": v.location}
    if isinstance(v, Reduce):
        d: dict[str, Any] = {"opaque": v.qualname, "args": to_json(list(v.args), depth + 1)}
        if v.has_state:
            d["state"] = to_json(v.state, depth + 1)
        if v.items:
            d["items"] = to_json(v.items, depth + 1)
        if v.dictitems:
            d["dictitems"] = to_json([list(kv) for kv in v.dictitems], depth + 1)
        return d
    return repr(v)


def optimizer_json(opt: OptimizerState, stats: dict[int, dict[str, Any]] | None = None
                   ) -> dict[str, Any]:
    state = []
    for s in opt.state:
        entries = {str(k): to_json(v) for k, v in s.entries.items()}
        if stats:
            for k, v in s.entries.items():
                st = stats.get(id(v))
                if st is not None:
                    entries[str(k)]["stats"] = st
        state.append({"param": s.param, "name": s.name, "group": s.group, "entries": entries})
    return {
        "pointer": opt.pointer,
        "type": opt.type,
        "type_candidates": list(opt.guess.candidates),
        "type_reason": opt.guess.reason,
        "flattened": opt.flattened,
        "extra_keys": opt.extra_keys,
        "names_source": opt.names_source,
        "names_note": opt.names_note,
        "param_groups": [{"index": g.index, "params": g.params, "param_names": g.param_names,
                          "hyperparameters": to_json(g.hyperparameters)} for g in opt.groups],
        "state": state,
    }


def scheduler_json(s: SchedulerState) -> dict[str, Any]:
    d: dict[str, Any] = {"pointer": s.pointer, "type": s.type, "known": s.known,
                         "state": to_json(s.raw)}
    if not s.known:
        d["reason"] = s.reason
    return d


def model_json(m: ModelState) -> dict[str, Any]:
    return {"pointer": m.pointer, "tensors": len(m.tensors), "elements": m.elements,
            "bytes": m.nbytes, "dtypes": m.dtypes, "pickled_module": m.pickled}


def summary(v: Any, tensors_held: int = 0) -> str:
    """A short description of a top-level value, such as ``3`` or ``model (4 tensors)``."""
    if isinstance(v, (TensorRef, SafeTensor)):
        val = f" = {fmt(v.value)}" if v.value is not None else ""
        return f"tensor {v.dtype}{list(v.shape)}{val}"
    if is_optimizer_state(v):
        return f"optimizer state ({len(v['param_groups'])} groups, {len(v['state'])} params with state)"
    if is_flattened_optimizer(v):
        nested = flattened_to_nested(v)
        return (f"optimizer state, flattened ({len(nested['param_groups'])} groups, "
                f"{len(nested['state'])} params with state)")
    if is_model_state(v):
        return f"model state ({len(v)} tensors)"
    if isinstance(v, dict):
        keys = ", ".join(str(k) for k in list(v)[:4])
        return f"dict of {len(v)} ({keys}{', ...' if len(v) > 4 else ''})"
    if isinstance(v, (list, tuple)):
        return f"{type(v).__name__} of {len(v)}"
    if isinstance(v, Reduce):
        func = v.func
        unsafe = isinstance(func, Global) and func.safety == "dangerous"
        n = tensors_held
        held = f", {n} tensor{'s' if n != 1 else ''}" if n else ""
        return f"{v.qualname} ({'UNSAFE: runs code on load' if unsafe else 'opaque'}{held})"
    return fmt(v)


def top_level(ckpt: Checkpoint) -> dict[str, str]:
    root = ckpt.root
    if ckpt.is_folder:
        return {f.name: f"{f.format}, {f.size} bytes" for f in ckpt.files}
    if isinstance(root, dict) and all(isinstance(k, str) for k in root):
        held = {h.pointer: h.tensors for h in ckpt.opaque_holders}
        return {k: summary(v, held.get(join("", k), 0)) for k, v in root.items()}
    return {}


def show_json(ckpt: Checkpoint, pointer: str | None = None, stats: bool = False
              ) -> dict[str, Any]:
    """The ``show --json`` document (schema version 1, documented in the README)."""
    opts = [ckpt.optimizer(pointer)] if pointer is not None else ckpt.optimizers
    tensor_stats = compute_stats(ckpt, opts) if stats else None
    return {
        "schema": SCHEMA_VERSION,
        "path": ckpt.path,
        "followed": ckpt.followed,
        "format": ckpt.format,
        "size": ckpt.size,
        "files": [{"name": f.name, "format": f.format, "size": f.size} for f in ckpt.files]
        if ckpt.is_folder else [],
        "safety": ckpt.safety.to_json(),
        "notes": ckpt.notes,
        "unsafe": ckpt.unsafe,
        "unsafe_globals": ckpt.unsafe_globals,
        "opaque_globals": ckpt.opaque_globals,
        "top_level": top_level(ckpt),
        "other_files": ckpt.other_files,
        "storages": {"count": len(ckpt.storages), "devices": ckpt.devices},
        "opaque_tensors": [vars(h) for h in ckpt.opaque_holders],
        "optimizers": [optimizer_json(o, tensor_stats) for o in opts],
        "schedulers": [scheduler_json(s) for s in ckpt.schedulers],
        "models": [model_json(m) for m in ckpt.models],
        "torchscript": _torchscript_json(ckpt),
        "deepspeed_zero": [{"file": z.file, "rank": z.rank, "group": z.group,
                            "stage": z.stage, "fp32": z.fp32, "state": z.state,
                            "partition_numel": z.partition_numel, "padding": z.padding,
                            "params": [{"name": s.name, "shape": list(s.shape)
                                        if s.shape is not None else None,
                                        "start": s.start, "numel": s.numel,
                                        "offset": s.offset} for s in z.slices]}
                           for z in zero_groups(ckpt)],
    }


def _torchscript_json(ckpt: Checkpoint) -> dict[str, Any] | None:
    ts = ckpt.torchscript
    if ts is None:
        return None
    return {"module": ts.cls, "code": ts.code, "constants": ts.constants,
            "tensors": [{"name": m.name, "kind": m.kind, "pointer": m.pointer,
                         "shape": list(m.tensor.shape), "dtype": m.tensor.dtype,
                         "device": m.tensor.device} for m in ts.members]}


def compute_stats(ckpt: Checkpoint, opts: list[OptimizerState]) -> dict[int, dict[str, Any]]:
    from .stats import optimizer_stats
    return optimizer_stats(opts, ckpt)


def plan_text(plan: Plan) -> str:
    """The ``--dry-run`` report: a before/after table of the changes, then the summary."""
    rows = [[c.pointer or "(root)", fmt(c.before), fmt(c.after)] for c in plan.changes]
    table = tabulate(rows, ["pointer", "before", "after"]) if rows else "(no changes)"
    return "\n".join([table, plan.summary] + [f"note: {n}" for n in plan.notes])


# ------------------------------------------------------------------------------ text

def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (TensorRef, SafeTensor)):
        return f"tensor({fmt(v.value)})" if v.value is not None else repr(v)
    if isinstance(v, (list, tuple)):
        inner = ", ".join(fmt(x) for x in list(v)[:6])
        more = ", ..." if len(v) > 6 else ""
        return f"({inner}{more})" if isinstance(v, tuple) else f"[{inner}{more}]"
    if isinstance(v, Reduce):
        return f"<{v.qualname}>"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {fmt(x)}" for k, x in list(v.items())[:4]) + \
            (", ...}" if len(v) > 4 else "}")
    return str(v)


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def safety_lines(ckpt: Checkpoint) -> list[str]:
    """The ``safety:`` line, then for an unsafe file each unsafe call, where and why."""
    sf = ckpt.safety
    head = sf.headline()
    if sf.unsafe:
        head += ". Do not torch.load it with weights_only=False; ckpttool will not write from it"
    out = [f"safety:  {head}"]
    if sf.unsafe:
        for c in sf.calls:
            if c.level == "unsafe":
                args = f"({c.args_summary})" if c.args_summary else ""
                where = (f" at {c.pointer or '/'}" if c.pointer is not None
                         else f" at byte {c.offset}" if c.offset >= 0 else "")
                of = f" of {c.file}" if c.file else ""
                n = f" (x{c.count})" if c.count > 1 else ""
                out.append(f"  unsafe: {c.global_}{args}{where}{of}{n}: {c.why}")
    return out


def show_text(ckpt: Checkpoint, pointer: str | None = None, show_all: bool = False,
              stats: bool = False) -> str:
    """The ``show`` text report."""
    lines = [f"file:    {ckpt.path}"] + ([f"via:     {ckpt.followed}"] if ckpt.followed else [])
    lines += [f"format:  {ckpt.format}",
             f"size:    {_human(ckpt.size)} ({ckpt.size} bytes)"]
    lines += safety_lines(ckpt)
    if ckpt.torchscript is not None:
        return "\n".join(lines + _torchscript_text(ckpt))
    tl = top_level(ckpt)
    if tl:
        lines.append("files:" if ckpt.is_folder else "keys:")
        width = max(len(k) for k in tl)
        lines += [f"  {k:<{width}}  {v}" for k, v in tl.items()]
    for note in ckpt.notes:
        lines.append(f"note:    {note}")
    if ckpt.is_folder and ckpt.other_files:
        lines.append("other files (kept as they are): " + ", ".join(ckpt.other_files))
    if ckpt.opaque_globals:
        lines.append("opaque objects (kept as data, never imported): "
                     + ", ".join(ckpt.opaque_globals))
    devs = ckpt.devices
    if devs:
        lines.append(f"storages: {sum(devs.values())} (" + ", ".join(
            f"{d} x{n}" for d, n in sorted(devs.items())) + ")")
    held = ckpt.opaque_holders
    if held:
        lines.append("tensors inside opaque objects:")
        rows = [[h.pointer or "(root)", h.object, h.tensors, _human(h.bytes),
                 ", ".join(f"{d} x{n}" for d, n in sorted(h.devices.items()))]
                for h in held]
        lines.append(_indent(tabulate(rows, ["pointer", "object", "tensors", "bytes",
                                             "devices"])))
    opts = [ckpt.optimizer(pointer)] if pointer is not None else ckpt.optimizers
    tstats = compute_stats(ckpt, opts) if stats else {}
    for o in opts:
        lines += ["", *_optimizer_text(o, show_all, tstats)]
    for s in ckpt.schedulers if pointer is None else []:
        if not s.known:
            lines += ["", f"scheduler {s.pointer or '(root)'}: unknown type ({s.reason}); "
                          "edits that change lrs refuse to leave it behind",
                      "  " + "  ".join(f"{k}={fmt(v)}" for k, v in list(s.raw.items())[:6])]
            continue
        lines += ["", f"scheduler {s.pointer or '(root)'}: {s.type}",
                  f"  last_epoch={fmt(s.last_epoch)}  base_lrs={fmt(s.base_lrs)}  "
                  f"last_lr={fmt(s.last_lr)}"]
    zero = zero_groups(ckpt) if pointer is None else []
    if zero:
        stages = sorted({z.stage for z in zero if z.stage is not None})
        how = ("param_slice_mappings" if 3 not in stages else
               "param_shapes, ceil(numel / ranks) elements of each param per rank")
        name = "/".join(f"ZeRO-{s}" for s in stages) or "ZeRO"
        lines += ["", f"DeepSpeed {name} partitions ({how}): each param's elements in each "
                      "rank's flat fp32 partition and its moments (exp_avg, ...):"]
        rows = [[f"{z.rank}", z.group, s.name, list(s.shape) if s.shape is not None else "?",
                 f"[{s.offset}, {s.offset + s.numel})" if s.offset is not None else "?",
                 f"[{s.start}, {s.start + s.numel})"]
                for z in zero for s in z.slices]
        lines.append(_indent(tabulate(rows, ["rank", "group", "param", "shape",
                                             "param elements", "partition elements"])))
    if ckpt.models and pointer is None:
        rows = [[m.pointer or "(root)", len(m.tensors), f"{m.elements:,}", _human(m.nbytes),
                 ", ".join(f"{k} x{n}" for k, n in m.dtypes.items())] for m in ckpt.models]
        lines += ["", "models:", tabulate(rows, ["pointer", "tensors", "elements", "bytes",
                                                 "dtypes"])]
    if not (ckpt.optimizers or ckpt.schedulers or ckpt.models):
        lines += ["", "no optimizer, scheduler or model state found"]
    return "\n".join(lines)


def _torchscript_text(ckpt: Checkpoint) -> list[str]:
    """A TorchScript archive: the module, its tensors by qualified name, the code files."""
    ts = ckpt.torchscript
    assert ts is not None
    lines = [f"module:  {ts.cls} (TorchScript)"]
    lines += [f"note:    {n}" for n in ckpt.notes]
    devs = ckpt.devices
    if devs:
        lines.append(f"storages: {sum(devs.values())} (" + ", ".join(
            f"{d} x{n}" for d, n in sorted(devs.items())) + ")")
    lines += ["", f"code ({len(ts.code)} files, TorchScript that torch.jit.load compiles and "
                  "runs):"] + [f"  {c}" for c in ts.code]
    rows = [[m.name, m.kind, list(m.tensor.shape), m.tensor.dtype, m.tensor.device]
            for m in ts.members]
    consts = f"; {ts.constants} constant tensor{'s' if ts.constants != 1 else ''} in " \
        "constants.pkl" if ts.constants else ""
    lines += ["", f"tensors ({len(ts.members)}{consts}):"]
    if rows:
        lines.append(_indent(tabulate(rows, ["name", "kind", "shape", "dtype", "device"])))
    return lines


def _optimizer_text(o: OptimizerState, show_all: bool, tstats: dict[int, dict[str, Any]]
                    ) -> list[str]:
    head = f"optimizer {o.pointer or '(root)'}: {o.type}"
    if o.guess.candidates and len(o.guess.candidates) > 1:
        head += f" (or {', '.join(c for c in o.guess.candidates if c != o.type)})"
    if o.type == "unknown":
        head += f" - {o.guess.reason}"
    if o.extra_keys:
        head += f" (extra group keys, kept: {', '.join(o.extra_keys)})"
    if o.flattened:
        head += (" (flattened form, flatten_optimizer_state_dict=True: groups are the runs of "
                 "params with equal hyperparameters; read-only)")
    lines = [head]
    keys: list[str] = []
    for g in o.groups:
        keys += [k for k in g.hyperparameters if k not in keys]
    rows = [[g.index, len(g.params), *(fmt(g.hyperparameters.get(k, "")) for k in keys)]
            for g in o.groups]
    lines += ["param groups:", _indent(tabulate(rows, ["group", "params", *keys]))]
    names = (f"names from {o.names_source}" if o.names_source
             else f"no names: {o.names_note}")
    lines.append(f"state: {len(o.state)} of {len(o.param_ids)} params have state; {names}")
    shown = o.state if show_all else o.state[:DEFAULT_ROWS]
    srows = []
    for s in shown:
        tensors = [v for v in s.entries.values() if isinstance(v, (TensorRef, SafeTensor))]
        big = max(tensors, key=lambda t: t.numel, default=None)
        step = s.entries.get("step")
        row = [s.param, s.name or "", list(big.shape) if big else "", big.dtype if big else "",
               big.device if big else "", ", ".join(str(k) for k in s.entries),
               fmt(step.value if isinstance(step, (TensorRef, SafeTensor)) else step) if step is not None
               else ""]
        if tstats:
            st = tstats.get(id(big)) if big is not None else None
            row += [fmt(st["norm"]) if st else "", fmt(st["min"]) if st else "",
                    fmt(st["max"]) if st else "", fmt(st["mean"]) if st else "",
                    st["nan"] + st["inf"] if st else ""]
        srows.append(row)
    if srows:
        hdr = ["id", "name", "shape", "dtype", "device", "state", "step"]
        if tstats:
            hdr += ["norm", "min", "max", "mean", "nan+inf"]
        lines.append(_indent(tabulate(srows, hdr)))
    if len(shown) < len(o.state):
        lines.append(f"  ... {len(o.state) - len(shown)} more params; use --all to see all")
    return lines


def _indent(s: str) -> str:
    return "\n".join("  " + line for line in s.splitlines())


# ------------------------------------------------------------------------------ runs

def run_json(run: Run) -> dict[str, Any]:
    """The ``show --json`` document of a run folder (schema 1, ``"kind": "run"``)."""
    rows = []
    for e in run.entries:
        d: dict[str, Any] = {"path": e.path, "format": e.format, "size": e.size,
                             "epoch": to_json(e.epoch), "step": to_json(e.step),
                             "global_step": to_json(e.global_step),
                             "optimizers": [{"pointer": o.pointer, "type": o.type,
                                             "lrs": to_json(o.lrs), "step": to_json(o.step)}
                                            for o in e.optimizers],
                             "schedulers": [{"pointer": s.pointer, "type": s.type,
                                             "last_epoch": to_json(s.last_epoch)}
                                            for s in e.schedulers],
                             "safety": e.safety, "followed": e.followed, "error": e.error}
        rows.append(d)
    return {"schema": SCHEMA_VERSION, "kind": "run", "path": run.path, "checkpoints": rows,
            "other_files": run.other_files}


def _lrs(lrs: list[Any]) -> str:
    return ",".join(fmt(x) for x in lrs)


def run_text(run: Run) -> str:
    """The ``show`` table of a run folder: one row per checkpoint, sorted by step."""
    import os
    n = len(run.entries)
    example = os.path.join(run.path, run.entries[-1].path.rstrip("/"))
    lines = [f"run:     {run.path} ({n} checkpoint{'s' if n != 1 else ''}, sorted by step; "
             f"`ckpttool show {example}` shows one)"]
    rows = []
    for e in run.entries:
        if e.error is not None:
            rows.append([e.path, "unreadable", "", "", "", "", "", "", ""])
            continue
        many = len(e.optimizers) > 1
        opts = "; ".join((f"{o.pointer}: " if many else "") + o.type
                         + (f" step={fmt(o.step)}" if o.step is not None else "")
                         + f" lr={_lrs(o.lrs)}" for o in e.optimizers)
        many = len(e.schedulers) > 1
        scheds = "; ".join((f"{s.pointer}: " if many else "") + s.type
                           + (f" last_epoch={fmt(s.last_epoch)}" if s.last_epoch is not None
                              else "") for s in e.schedulers)
        rows.append([e.path, e.format, _human(e.size),
                     *("" if v is None else fmt(v) for v in (e.epoch, e.step, e.global_step)),
                     opts, scheds, e.safety])
    lines.append(tabulate(rows, ["path", "format", "size", "epoch", "step", "global_step",
                                 "optimizers", "schedulers", "safety"]))
    for e in run.entries:
        if e.error is not None:
            lines.append(f"unreadable: {e.path}: {e.error}")
        if e.followed:
            lines.append(f"via:     {e.path}: {e.followed}")
    if run.other_files:
        lines.append("other files: " + ", ".join(run.other_files))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ diff

_KIND_WORDS = {"added": "added", "removed": "removed", "value": "values", "type": "types",
               "tensor": "tensor shape/dtype/device", "bytes": "tensors' bytes",
               "order": "key orders", "reorder": "optimizer reorders",
               "rekey": "optimizers keyed otherwise", "file": "files",
               "safety": "safety level"}


def _cell(v: Any, kind: str, before: bool) -> str:
    if v is None and kind in ("added", "removed") and (kind == "added") == before:
        return "(absent)"
    text = summary(v) if kind in ("added", "removed", "type") else fmt(v)
    return text if len(text) <= 80 else text[:77] + "..."


def diff_summary(result: DiffResult) -> str:
    """The last line of ``diff``: what differs, and how the tensors' bytes were compared."""
    counts: dict[str, int] = {}
    for d in result.differences:
        counts[d.kind] = counts.get(d.kind, 0) + 1
    n = len(result.differences)
    head = "no differences" if not n else (
        f"{n} difference{'s' if n != 1 else ''} ("
        + ", ".join(f"{c} {_KIND_WORDS.get(k, k)}" for k, c in counts.items()) + ")")
    how = (f"{result.tensors} tensor{'s' if result.tensors != 1 else ''} compared: "
           + (f"{result.by_value} by their values (tiny), " if result.by_value else "")
           + f"{result.by_crc} by CRC-32, {result.by_bytes} by reading bytes")
    if result.reshaped:
        how += f", {result.reshaped} of another shape or dtype"
    if result.unread:
        how += f", {result.unread} by metadata only (bytes not comparable)"
    how += f"; {_human(result.bytes_read)} read"
    return f"{head}; {how}"


def diff_text(result: DiffResult) -> str:
    """The ``diff`` report: a table of differences by pointer, notes, then the summary."""
    rows = []
    with_values = any(d.values for d in result.differences)
    for d in result.differences:
        where = d.pointer or "(root)"
        if d.pointer_after is not None:
            where += f" -> {d.pointer_after}"
        if d.name is not None and d.pointer_after is not None:
            where += f" ({d.name})"
        row = [where, d.kind, _cell(d.before, d.kind, True), _cell(d.after, d.kind, False)]
        if with_values:
            v = d.values or {}
            row += ([v["skipped"], "", "", ""] if "skipped" in v else
                    [fmt(v[k]) if k in v else "" for k in ("max_abs", "rel", "norm_before",
                                                         "norm_after")])
        rows.append(row)
    lines = []
    if rows:
        hdr = ["pointer", "change", "before", "after"]
        if with_values:
            hdr += ["max_abs", "rel", "norm before", "norm after"]
        lines.append(tabulate(rows, hdr))
    lines += [f"note: {n}" for n in result.notes]
    lines.append(diff_summary(result))
    return "\n".join(lines)


def diff_json(result: DiffResult) -> dict[str, Any]:
    """The ``diff --json`` document (schema 1)."""
    return {
        "schema": SCHEMA_VERSION, "a": result.a, "b": result.b, "equal": result.equal,
        "differences": [{"pointer": d.pointer, "kind": d.kind, "before": to_json(d.before),
                         "after": to_json(d.after), "name": d.name,
                         "pointer_after": d.pointer_after,
                         "values": to_json(d.values) if d.values is not None else None}
                        for d in result.differences],
        "notes": result.notes,
        "compared": {"tensors": result.tensors, "by_value": result.by_value,
                     "by_crc": result.by_crc,
                     "by_bytes": result.by_bytes, "shape_or_dtype": result.reshaped,
                     "metadata_only": result.unread,
                     "bytes_read": result.bytes_read},
    }
