"""DeepSpeed checkpoints: ZeRO-1/2/3 partitions per parameter, ranks as one optimizer, and the
copies of hyperparameters DeepSpeed keeps beside the optimizer.

Layout of a tag folder (``global_stepN/``) written by ``engine.save_checkpoint`` on R ranks::

    mp_rank_00_model_states.pt                    # ZeRO-0/1/2: module, optimizer (ZeRO-0
                                                  #   only), lr_scheduler, param_shapes, ds_config
    zero_pp_rank_{r}_mp_rank_00_model_states.pt   # ZeRO-3: one per rank (module tensors empty)
    zero_pp_rank_{r}_mp_rank_00_optim_states.pt   # ZeRO-1/2/3: one per rank

A rank file's ``optimizer_state_dict`` holds this rank's flat fp32 partition of each param
group and a torch optimizer state over it (one flat ``exp_avg`` / ``exp_avg_sq`` per group):

* ZeRO-1/2: ``single_partition_of_fp32_groups`` (saved without the group's padding) and
  ``base_optimizer_state`` (its moments keep the padding at their end). Which elements are
  which parameter is DeepSpeed's own ``param_slice_mappings`` (name -> ``start``, ``numel``
  within this rank's partition). The ranks' partitions, concatenated in rank order, are the
  group's parameters flattened in ``param_shapes`` order (what ``zero_to_fp32`` reads).
* ZeRO-3: ``fp32_flat_groups`` and ``optimizer_state_dict``, no slice mappings. Every
  parameter is split on its own: ``ceil(numel / world)`` elements per rank, the last rank's
  share padded; a rank's flat groups hold its share of each parameter in ``param_shapes``
  order (``zero_to_fp32``'s ``zero3_partitioned_param_info``).

The moments are aligned element for element with the fp32 partition, so the same slices name
them. Everything here is read from the tree only: no tensor byte is read.

The optimizer that resumes is one logical optimizer whose groups every rank file repeats:
:func:`rank_optimizers` gives all of them, so that edits change every rank alike. The lr a
DeepSpeed LR schedule (WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest) gives
at the next step is computed from the config passed at launch; the checkpoint keeps only its
``last_batch_iteration`` (:func:`launch_schedule`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .formats.nodes import Reduce, as_shape, fields
from .tree import join, split

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .locate import OptimizerState, SchedulerState

_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
_MODEL_FILE = re.compile(r"_model_states\.pt$")
# the torch optimizer inside a rank file's optimizer_state_dict (ZeRO-1/2, ZeRO-3)
_INNER = ("base_optimizer_state", "optimizer_state_dict")
# DeepSpeed's own LR schedules and the config keys their lrs come from at launch
SCHEDULE_LR_KEYS: dict[str, tuple[str, ...]] = {
    "WarmupLR": ("warmup_min_lr", "warmup_max_lr"),
    "WarmupDecayLR": ("warmup_min_lr", "warmup_max_lr"),
    "WarmupCosineLR": ("warmup_min_ratio", "cos_min_ratio"),  # ratios of the optimizer's lr
    "OneCycle": ("cycle_min_lr", "cycle_max_lr"),
    "LRRangeTest": ("lr_range_test_min_lr",),
}


@dataclass
class ZeroSlice:
    """One parameter's elements in one rank's flat partition of one group."""

    name: str
    shape: tuple[int, ...] | None  # from the model file's param_shapes
    start: int  # first element within this rank's flat group
    numel: int
    offset: int | None = None  # first element within the flattened parameter


@dataclass
class ZeroGroup:
    """One param group's partition in one rank's file."""

    file: str
    rank: int
    group: int
    stage: int | None
    pointer: str  # the rank file's optimizer_state_dict
    fp32: str | None  # pointer of the flat fp32 master partition
    state: str | None  # pointer of the optimizer state (exp_avg, ...) over that partition
    partition_numel: int | None  # elements of the fp32 partition as saved
    padding: int | None  # ZeRO-1/2: elements of padding at the group's end (last rank)
    slices: list[ZeroSlice] = field(default_factory=list)


def _stage(osd: dict[str, Any]) -> int | None:
    """The ZeRO stage a rank file says (``ZeroStageEnum(n)`` pickles as a call with ``n``)."""
    z = osd.get("zero_stage")
    if isinstance(z, Reduce) and z.args and type(z.args[0]) is int:
        return int(z.args[0])
    if "fp32_flat_groups" in osd:
        return 3
    return None


def param_shapes(ckpt: Checkpoint) -> list[dict[str, tuple[int, ...] | None]]:
    """The model file's ``param_shapes`` (one ordered dict per param group); ZeRO-3 repeats it
    in every rank's model file, the first one is used (as ``zero_to_fp32`` does)."""
    for f in ckpt.files:
        root = ckpt.roots.get(f.name)
        if _MODEL_FILE.search(f.name) and isinstance(root, dict):
            groups = root.get("param_shapes")
            if isinstance(groups, list):
                return [{str(k): as_shape(v) for k, v in g.items()} if isinstance(g, dict)
                        else {} for g in groups]
    return []


def _rank_files(ckpt: Checkpoint) -> list[tuple[int, str, dict[str, Any]]]:
    out = []
    for f in ckpt.files:
        m = _RANK_FILE.search(f.name)
        root = ckpt.roots.get(f.name)
        osd = root.get("optimizer_state_dict") if isinstance(root, dict) else None
        if m is not None and isinstance(osd, dict):
            out.append((int(m.group(1)), f.name, osd))
    return sorted(out, key=lambda t: t[0])


def _numel(shape: tuple[int, ...] | None) -> int | None:
    return math.prod(shape) if shape is not None else None


def _state_pointer(base: str, osd: dict[str, Any], g: int) -> str | None:
    """The state entry of group ``g`` of the torch optimizer inside a rank file."""
    for key in _INNER:
        inner = osd.get(key)
        if isinstance(inner, dict) and isinstance(inner.get("param_groups"), list) \
                and g < len(inner["param_groups"]):
            params = inner["param_groups"][g].get("params")
            if isinstance(params, list) and params and params[0] in inner.get("state", {}):
                return join(join(join(base, key), "state"), params[0])
    return None


def zero_groups(ckpt: Checkpoint) -> list[ZeroGroup]:
    """Every ZeRO-1/2/3 partition of a DeepSpeed checkpoint folder, by rank and group, each
    with the parameters it holds (empty for anything else)."""
    if not ckpt.is_folder:
        return []
    shapes = param_shapes(ckpt)
    ranks = _rank_files(ckpt)
    out: list[ZeroGroup] = []
    for rank, name, osd in ranks:
        base = join(join("", name), "optimizer_state_dict")
        stage = _stage(osd)
        if isinstance(osd.get("param_slice_mappings"), list):
            out += _zero12(rank, name, base, stage, osd, shapes)
        elif isinstance(osd.get("fp32_flat_groups"), list):
            out += _zero3(rank, name, base, stage, osd, shapes, len(ranks))
    # ZeRO-1/2: where each slice starts in its parameter follows from the lower ranks' slices
    seen: dict[str, int] = {}
    for z in sorted(out, key=lambda z: (z.rank, z.group)):
        if z.stage == 3:
            continue
        for s in z.slices:
            s.offset = seen.get(s.name, 0)
            seen[s.name] = s.offset + s.numel
    return out


def _zero12(rank: int, name: str, base: str, stage: int | None, osd: dict[str, Any],
            shapes: list[dict[str, tuple[int, ...] | None]]) -> list[ZeroGroup]:
    every = {k: v for g in shapes for k, v in g.items()}
    parts = osd.get("single_partition_of_fp32_groups")
    pads = osd.get("group_paddings")
    out = []
    for g, mapping in enumerate(osd["param_slice_mappings"]):
        if not isinstance(mapping, dict):
            continue
        slices = []
        for pname, addr in mapping.items():
            a = fields(addr) if isinstance(addr, Reduce) else addr
            if isinstance(a, dict) and type(a.get("start")) is int \
                    and type(a.get("numel")) is int:
                slices.append(ZeroSlice(str(pname), every.get(str(pname)), a["start"],
                                        a["numel"]))
        slices.sort(key=lambda s: s.start)
        part = parts[g] if isinstance(parts, list) and g < len(parts) else None
        shape = getattr(part, "shape", None)
        pad = pads[g] if isinstance(pads, list) and g < len(pads) and type(pads[g]) is int \
            else None
        out.append(ZeroGroup(name, rank, g, stage, base,
                             join(join(base, "single_partition_of_fp32_groups"), g)
                             if part is not None else None,
                             _state_pointer(base, osd, g), shape[0] if shape else None, pad,
                             slices))
    return out


def _zero3(rank: int, name: str, base: str, stage: int | None, osd: dict[str, Any],
           shapes: list[dict[str, tuple[int, ...] | None]], n_files: int) -> list[ZeroGroup]:
    """ZeRO-3: each parameter's share of ``ceil(numel / world)`` elements, laid out in
    ``param_shapes`` order over this rank's flat groups taken one after the other."""
    world = osd.get("partition_count")
    world = world if type(world) is int and world > 0 else n_files
    flats = osd["fp32_flat_groups"]
    sizes = [t.shape[0] if getattr(t, "shape", None) else 0 for t in flats]
    groups = [ZeroGroup(name, rank, g, stage, base, join(join(base, "fp32_flat_groups"), g),
                        _state_pointer(base, osd, g), sizes[g], None) for g in range(len(flats))]
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    pos = 0
    for group in shapes:
        for pname, shape in group.items():
            numel = _numel(shape)
            if numel is None:
                return groups  # a shape not read: the layout after it is unknown
            share = math.ceil(numel / world)
            real = max(0, min(share, numel - rank * share))  # the last shares hold padding
            # a share may cross from one flat group into the next (zero_to_fp32's
            # GatheredTensor); each piece is listed in its group
            lo, hi = pos, pos + share
            for g in range(len(sizes)):
                a, b = max(lo, bounds[g]), min(hi, bounds[g + 1])
                if a < b:
                    used = max(0, min(b, lo + real) - a)
                    if used:
                        groups[g].slices.append(ZeroSlice(pname, shape, a - bounds[g], used,
                                                          rank * share + a - lo))
            pos = hi
    return groups


# ------------------------------------------------------------------------- one optimizer

def _rank_and_suffix(pointer: str) -> tuple[int, str] | None:
    tokens = split(pointer)
    if len(tokens) == 3 and tokens[1] == "optimizer_state_dict" and tokens[2] in _INNER:
        m = _RANK_FILE.search(tokens[0])
        if m is not None:
            return int(m.group(1)), "/".join(tokens[1:])
    return None


def is_rank_optimizer(pointer: str) -> bool:
    """Is ``pointer`` the torch optimizer inside a ZeRO rank file?"""
    return _rank_and_suffix(pointer) is not None


def rank_optimizers(ckpt: Checkpoint, opt: OptimizerState) -> list[OptimizerState]:
    """Every rank's copy of the logical optimizer ``opt`` is one of (rank order), or
    ``[opt]`` when ``opt`` is not a DeepSpeed ZeRO rank file's optimizer."""
    me = _rank_and_suffix(opt.pointer)
    if me is None or not ckpt.is_folder:
        return [opt]
    found = []
    for o in ckpt.optimizers:
        other = _rank_and_suffix(o.pointer)
        if other is not None and other[1] == me[1]:
            found.append((other[0], o))
    return [o for _, o in sorted(found, key=lambda t: t[0])]


def only_logical_optimizer(ckpt: Checkpoint) -> OptimizerState | None:
    """Rank 0's optimizer when every optimizer of ``ckpt`` is a rank's copy of one DeepSpeed
    ZeRO optimizer (and there are several), else None."""
    opts = ckpt.optimizers
    if len(opts) < 2:
        return None
    ranks = rank_optimizers(ckpt, opts[0])
    return ranks[0] if len(ranks) == len(opts) else None


# ------------------------------------------------------------------------- ds_config copies

@dataclass
class ConfigCopy:
    """``ds_config["optimizer"]["params"]`` of one file (DeepSpeed stores the config in the
    model file and in every rank file)."""

    pointer: str  # of the params dict
    params: dict[str, Any]


def config_copies(ckpt: Checkpoint) -> list[ConfigCopy]:
    """Every copy of the DeepSpeed config's optimizer params in the checkpoint."""
    if not ckpt.is_folder:
        return []
    out = []
    for f in ckpt.files:
        root = ckpt.roots.get(f.name)
        cfg = root.get("ds_config") if isinstance(root, dict) else None
        optc = cfg.get("optimizer") if isinstance(cfg, dict) else None
        params = optc.get("params") if isinstance(optc, dict) else None
        if isinstance(params, dict):
            out.append(ConfigCopy(join(join(join(join("", f.name), "ds_config"), "optimizer"),
                                       "params"), params))
    return out


def is_deepspeed(ckpt: Checkpoint) -> bool:
    """A DeepSpeed tag folder (its model file holds ``ds_config`` / ``param_shapes``)."""
    return ckpt.is_folder and any(
        _MODEL_FILE.search(f.name) and isinstance(r := ckpt.roots.get(f.name), dict)
        and ("ds_config" in r or "param_shapes" in r) for f in ckpt.files)


# ------------------------------------------------------------------------- LR schedules

@dataclass
class LaunchSchedule:
    """A DeepSpeed LR schedule that is rebuilt from the config at launch."""

    type: str | None  # WarmupLR, ... as the checkpoint's ds_config names it
    params: dict[str, Any]  # its params in the checkpoint's ds_config
    pointers: list[str]  # the saved states ({"last_batch_iteration": N}), one per model file

    def lr_source(self) -> str:
        """Which config values the schedule's next lr comes from, with their saved values."""
        keys = SCHEDULE_LR_KEYS.get(self.type or "", ())
        have = [f"{k}={self.params[k]!r}" for k in keys if k in self.params]
        what = f"DeepSpeed's {self.type} schedule" if self.type else "a DeepSpeed LR schedule"
        return what + (f" ({', '.join(have)} in the saved ds_config)" if have else "")

    def config_keys(self) -> str:
        """The keys of the launch config that set the schedule's lrs."""
        if self.type == "WarmupCosineLR":  # ratios of the lr the optimizer is built with
            return "optimizer.params.lr"
        keys = SCHEDULE_LR_KEYS.get(self.type or "", ("warmup_max_lr",))
        return "scheduler.params." + " / ".join(keys)

    def message(self) -> str:
        where = self.pointers[0] + (f" and {len(self.pointers) - 1} more model file"
                                    f"{'s' if len(self.pointers) > 2 else ''}"
                                    if len(self.pointers) > 1 else "")
        return (f"{self.lr_source()} drives this optimizer. DeepSpeed rebuilds it from the "
                "config given at launch; the checkpoint keeps only its last_batch_iteration "
                f"({where}): the first step after resuming uses the groups' lr, every later "
                "step the lr the schedule computes from that config")

    def hint(self) -> str:
        return (f"change {self.config_keys()} in the DeepSpeed config you launch with; pass "
                "--no-scheduler to change the groups anyway")

    def note(self) -> str:
        """What an edit that changed the groups' lr with --no-scheduler must say."""
        return (f"{self.lr_source()} drives this optimizer and DeepSpeed rebuilds it from the "
                "config given at launch (the checkpoint keeps only its last_batch_iteration): "
                "only the first step after resuming uses the edited groups' lr, later steps "
                f"the schedule's; change {self.config_keys()} in the DeepSpeed config you "
                "launch with")


def launch_schedule(ckpt: Checkpoint, schedulers: list[SchedulerState] | None = None
                    ) -> LaunchSchedule | None:
    """The DeepSpeed LR schedule saved in ``ckpt`` (among ``schedulers``, default all)."""
    if not ckpt.is_folder:
        return None
    found = [s for s in (ckpt.schedulers if schedulers is None else schedulers)
             if set(s.raw) == {"last_batch_iteration"} and _MODEL_FILE.search(
                 split(s.pointer)[0] if s.pointer else "")]
    if not found:
        return None
    root = ckpt.roots.get(split(found[0].pointer)[0])
    cfg = root.get("ds_config") if isinstance(root, dict) else None
    sch = cfg.get("scheduler") if isinstance(cfg, dict) else None
    typ = sch.get("type") if isinstance(sch, dict) else None
    params = sch.get("params") if isinstance(sch, dict) else None
    return LaunchSchedule(typ if isinstance(typ, str) else None,
                          params if isinstance(params, dict) else {},
                          [s.pointer for s in found])


# ------------------------------------------------------------------------- edits

def _same(a: Any, b: Any) -> bool:
    from .edits import as_number
    na, nb = as_number(a), as_number(b)
    if na is not None or nb is not None:
        return na == nb
    return bool(a == b)


def logical_optimizer(ckpt: Checkpoint, pointer: str | None
                      ) -> tuple[OptimizerState, list[OptimizerState]]:
    """The optimizer an edit selects (``pointer``, or the only one; the ranks of one DeepSpeed
    ZeRO optimizer count as one) and every rank's copy of it, checked to agree."""
    from .errors import EditError
    opt = only_logical_optimizer(ckpt) if pointer is None else None
    opt = opt or ckpt.optimizer(pointer)
    ranks = rank_optimizers(ckpt, opt)
    for o in ranks:
        if len(o.groups) != len(opt.groups):
            raise EditError(f"optimizer {o.pointer} has {len(o.groups)} param groups but "
                            f"{opt.pointer} has {len(opt.groups)}; the ranks of one DeepSpeed "
                            "optimizer must agree", path=ckpt.path, pointer=o.pointer,
                            hint="check that every rank file comes from the same save")
        for g, (a, b) in enumerate(zip(opt.groups, o.groups)):
            ha, hb = a.hyperparameters, b.hyperparameters
            diff = sorted(k for k in set(ha) | set(hb)
                          if k not in ("params", "param_names") and not _same(ha.get(k),
                                                                              hb.get(k)))
            if diff:
                raise EditError(f"group {g} of optimizer {o.pointer} differs from rank "
                                f"{ranks[0].pointer}'s in {', '.join(diff)}; the ranks of one "
                                "DeepSpeed optimizer must agree", path=ckpt.path,
                                pointer=join(join(o.pointer, "param_groups"), g), key=diff[0],
                                hint="check that every rank file comes from the same save")
    return opt, ranks


def ranks_text(ckpt: Checkpoint, ranks: list[OptimizerState]) -> str:
    """`` and its copy in every other rank's file (DeepSpeed ZeRO-2: one optimizer over 2 rank
    files)`` for an edit's summary, or ``""``."""
    if len(ranks) < 2:
        return ""
    stages = {z.stage for z in zero_groups(ckpt)} - {None}
    stage = f"ZeRO-{stages.pop()}" if len(stages) == 1 else "ZeRO"
    return (f" and its copy in every other rank's file (DeepSpeed {stage}: one optimizer over "
            f"{len(ranks)} rank files)")


def refuse_zero(ckpt: Checkpoint, pointer: str | None, what: str) -> None:
    """An edit that cannot keep a ZeRO rank file's flat partitions loadable stops here."""
    from .errors import EditError
    opt = only_logical_optimizer(ckpt) if pointer is None else None
    if opt is None:
        opt = next((o for o in ckpt.optimizers if o.pointer == pointer), None) \
            if pointer is not None else (ckpt.optimizers[0] if len(ckpt.optimizers) == 1
                                         else None)
    if opt is not None and _rank_and_suffix(opt.pointer) is not None:
        raise EditError(f"optimizer {opt.pointer} is a DeepSpeed ZeRO rank file's optimizer: "
                        "each of its param groups is one flat partition of the model's "
                        f"parameters, laid out by DeepSpeed, so ckpttool cannot {what} in it",
                        path=ckpt.path, pointer=opt.pointer,
                        hint="make the change in the training script or DeepSpeed config and "
                             "resume with engine.load_checkpoint(..., load_optimizer_states="
                             "False): the weights still load")


def engine_schedulers(ckpt: Checkpoint) -> list[SchedulerState]:
    """The engine's ``lr_scheduler`` as saved in each model file (ZeRO-3 saves one per rank:
    copies of one scheduler), in file order."""
    if not ckpt.is_folder:
        return []
    out = []
    for s in ckpt.schedulers:
        tokens = split(s.pointer)
        if len(tokens) == 2 and tokens[1] == "lr_scheduler" and _MODEL_FILE.search(tokens[0]):
            out.append(s)
    return out


def scheduler_copies(ckpt: Checkpoint, sched: SchedulerState) -> list[SchedulerState]:
    """Every model file's copy of the engine's scheduler ``sched`` (``[sched]`` otherwise)."""
    eng = engine_schedulers(ckpt) if is_deepspeed(ckpt) else []
    return eng if any(s.pointer == sched.pointer for s in eng) else [sched]
