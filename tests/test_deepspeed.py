"""DeepSpeed run folders written by two ranks (fixtures/make_deepspeed_ranks.py): ZeRO-1/2/3
partitions per parameter checked against DeepSpeed's own readings, and set-lr / set editing
every rank's copy of the one optimizer and the ds_config copies.

The resume through DeepSpeed itself (``engine.load_checkpoint`` on two ranks) needs deepspeed,
which the test environment does not have: tests/deepspeed_resume.py does it by hand (README,
"DeepSpeed"). Here the edited files are loaded with torch and compared exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpttool
from ckpttool.edits import TreeEditor, set_lr
from ckpttool.tree import split
from conftest import FIXTURES, run
from torch_json import load_fixture

RANKS = FIXTURES / "deepspeed_ranks"
ZERO = ["zero1", "zero2", "zero2_warmup", "zero3", "zero3_warmup", "zero3_steplr"]
# the ZeRO-3 run whose training is the same as each case's (same optimizer, lr, schedule, data):
# DeepSpeed's own full per-param optimizer state of that run is the reference for the moments
SAME_RUN = {"zero1": "zero3_warmup", "zero2": "zero3", "zero2_warmup": "zero3_warmup",
            "zero3": "zero3", "zero3_warmup": "zero3_warmup", "zero3_steplr": "zero3_steplr"}
OPT = "/zero_pp_rank_{r}_mp_rank_00_optim_states.pt/optimizer_state_dict/{inner}"


def resolve(root: Any, pointer: str) -> Any:
    """The value at a pointer whose first token is the file (``root`` is that file)."""
    for t in split(pointer)[1:]:
        if isinstance(root, list):
            root = root[int(t)]
        else:
            root = root[int(t) if t.isdigit() and int(t) in root else t]
    return root


def per_param(case: str, key: str) -> dict[str, torch.Tensor]:
    """Each parameter rebuilt from ckpttool's ``deepspeed_zero`` slices of every rank's file:
    ``fp32`` from the flat master partitions, else the state key (``exp_avg``, ...)."""
    doc = json.loads(run("show", "--json", RANKS / case).stdout)
    step = RANKS / case / "global_step3"
    roots: dict[str, Any] = {}
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    shapes: dict[str, list[int]] = {}
    for z in doc["deepspeed_zero"]:
        root = roots.setdefault(z["file"], load_fixture(step / z["file"]))
        flat = resolve(root, z["fp32"]) if key == "fp32" else resolve(root, z["state"])[key]
        for p in z["params"]:
            pieces.setdefault(p["name"], []).append(
                (p["offset"], flat[p["start"]:p["start"] + p["numel"]]))
            shapes[p["name"]] = p["shape"]
    out = {}
    for name, parts in pieces.items():
        parts.sort(key=lambda t: t[0])
        at = 0
        for offset, t in parts:  # the slices tile the parameter: no gap, no overlap
            assert offset == at
            at += t.numel()
        out[name] = torch.cat([t for _, t in parts]).view(shapes[name])
    return out


@pytest.mark.parametrize("case", ZERO)
def test_fp32_partitions_are_what_zero_to_fp32_rebuilds(case: str) -> None:
    """Concatenating every rank's slice of a parameter, as ckpttool names them, gives exactly
    DeepSpeed's get_fp32_state_dict_from_zero_checkpoint of the same folder."""
    ref = torch.load(RANKS / f"{case}.reference.pt")["zero_to_fp32"]
    got = per_param(case, "fp32")
    assert sorted(got) == sorted(ref) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    for name, t in got.items():
        assert torch.equal(t, ref[name]), name


@pytest.mark.parametrize("case", ZERO)
@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
def test_moment_partitions_per_param(case: str, key: str) -> None:
    """The same slices of the moments are each parameter's exp_avg / exp_avg_sq: equal to
    DeepSpeed's safe_get_full_optimizer_state in the live ZeRO-3 engine of the same training
    (zero_to_fp32 drops the moments; in ZeRO-1/2 on the CPU that DeepSpeed call fails)."""
    ref = torch.load(RANKS / f"{SAME_RUN[case]}.reference.pt")["full"]
    got = per_param(case, key)
    assert sorted(got) == sorted(ref)
    for name, t in got.items():
        assert torch.equal(t, ref[name][key]), name
    fp32 = per_param(case, "fp32")  # and the same run's master weights agree, too
    assert all(torch.equal(fp32[n], ref[n]["fp32"]) for n in fp32)


def test_show_zero3_partitions() -> None:
    r = run("show", RANKS / "zero3")
    table = r.stdout[r.stdout.index("DeepSpeed ZeRO-3"):r.stdout.index("\nmodels:")]
    assert table == """\
DeepSpeed ZeRO-3 partitions (param_shapes, ceil(numel / ranks) elements of each param per rank): \
each param's elements in each rank's flat fp32 partition and its moments (exp_avg, ...):
    rank    group  param     shape    param elements    partition elements
  ------  -------  --------  -------  ----------------  --------------------
       0        0  0.weight  [3, 4]   [0, 6)            [0, 6)
       0        0  0.bias    [3]      [0, 2)            [6, 8)
       0        0  2.weight  [2, 3]   [0, 3)            [8, 11)
       0        0  2.bias    [2]      [0, 1)            [11, 12)
       1        0  0.weight  [3, 4]   [6, 12)           [0, 6)
       1        0  0.bias    [3]      [2, 3)            [6, 7)
       1        0  2.weight  [2, 3]   [3, 6)            [8, 11)
       1        0  2.bias    [2]      [1, 2)            [11, 12)
"""


def test_show_zero1_json() -> None:
    doc = json.loads(run("show", "--json", RANKS / "zero1").stdout)
    z = doc["deepspeed_zero"][2]
    assert z == {
        "file": "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rank": 1, "group": 0, "stage": 1,
        "fp32": "/zero_pp_rank_1_mp_rank_00_optim_states.pt/optimizer_state_dict/"
                "single_partition_of_fp32_groups/0",
        "state": "/zero_pp_rank_1_mp_rank_00_optim_states.pt/optimizer_state_dict/"
                 "base_optimizer_state/state/0",
        "partition_numel": 8, "padding": 2,
        "params": [{"name": "0.weight", "shape": [3, 4], "start": 0, "numel": 2, "offset": 10},
                   {"name": "2.weight", "shape": [2, 3], "start": 2, "numel": 6, "offset": 0}]}


# ------------------------------------------------------------------------------ edits

def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if hasattr(a, "__dict__") and type(a).__name__ == type(b).__name__:
        return same(vars(a), vars(b))
    return bool(a == b)


def files(folder: Path) -> dict[str, Any]:
    return {p.name: load_fixture(p) for p in sorted((folder / "global_step3").glob("*.pt"))}


def changed_only(before: dict[str, Any], after: dict[str, Any], expect: dict[str, Any]) -> None:
    """``after`` is ``before`` with exactly the values at ``expect``'s pointers replaced."""
    for ptr, value in expect.items():
        f, *rest = split(ptr)
        holder = after[f]
        for t in rest[:-1]:
            holder = holder[int(t)] if isinstance(holder, list) else holder[t]
        last = int(rest[-1]) if isinstance(holder, list) else rest[-1]
        got = holder[last]
        assert type(got) is type(value) and got == value, ptr
        old = before[f]
        for t in rest[:-1]:
            old = old[int(t)] if isinstance(old, list) else old[t]
        old[last] = value  # now the whole trees must be equal
    assert sorted(before) == sorted(after)
    for f in before:
        assert same(before[f], after[f]), f


def test_set_lr_zero2_every_rank_and_ds_config(copy_fixture: Callable[[str], Path]) -> None:
    folder = copy_fixture("deepspeed_ranks/zero2")
    before = files(folder)
    r = run("set-lr", folder, "1e-3")
    assert r.stdout == (
        "set-lr: lr 0.001 in optimizer /zero_pp_rank_0_mp_rank_00_optim_states.pt/"
        "optimizer_state_dict/base_optimizer_state (group 0 x0.2) and its copy in every other "
        "rank's file (DeepSpeed ZeRO-2: one optimizer over 2 rank files); ds_config optimizer "
        f"lr 0.001 in 3 files; no scheduler; 5 values changed; wrote {folder / 'global_step3'}"
        "\n")
    assert r.stderr == (f"note: edited {folder / 'global_step3'} ({folder / 'latest'} names "
                        "global_step3)\n")
    inner = "base_optimizer_state"
    changed_only(before, files(folder), {
        OPT.format(r=0, inner=inner) + "/param_groups/0/lr": 1e-3,
        OPT.format(r=1, inner=inner) + "/param_groups/0/lr": 1e-3,
        "/mp_rank_00_model_states.pt/ds_config/optimizer/params/lr": 1e-3,
        "/zero_pp_rank_0_mp_rank_00_optim_states.pt/ds_config/optimizer/params/lr": 1e-3,
        "/zero_pp_rank_1_mp_rank_00_optim_states.pt/ds_config/optimizer/params/lr": 1e-3})


def test_set_zero3_every_rank_and_ds_config(copy_fixture: Callable[[str], Path]) -> None:
    folder = copy_fixture("deepspeed_ranks/zero3")
    before = files(folder)
    r = run("set", folder, "weight_decay=0.1", "betas=0.8,0.9", "--dry-run")
    inner = "optimizer_state_dict"
    o0, o1 = OPT.format(r=0, inner=inner), OPT.format(r=1, inner=inner)
    cfg = "/zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt/ds_config/optimizer/params/weight_decay"
    def row(ptr: str, before: str, after: str) -> str:
        return f"{ptr:<112}  {before:<12}  {after}"

    assert r.stdout.splitlines()[2:] == [
        row(f"{o0}/param_groups/0/weight_decay", "0.01", "0.1"),
        row(f"{o0}/param_groups/0/betas", "(0.9, 0.999)", "(0.8, 0.9)"),
        row(f"{o1}/param_groups/0/weight_decay", "0.01", "0.1"),
        row(f"{o1}/param_groups/0/betas", "(0.9, 0.999)", "(0.8, 0.9)"),
        row(cfg.format(r=0, kind="model"), "0.01", "0.1"),
        row(cfg.format(r=0, kind="optim"), "0.01", "0.1"),
        row(cfg.format(r=1, kind="model"), "0.01", "0.1"),
        row(cfg.format(r=1, kind="optim"), "0.01", "0.1"),
        f"set: weight_decay=0.1, betas=(0.8, 0.9) in group 0 of optimizer {o0} (AdamW) and its "
        "copy in every other rank's file (DeepSpeed ZeRO-3: one optimizer over 2 rank files); "
        "ds_config optimizer weight_decay in 4 files; 8 values changed",
        "dry run: nothing written"]
    run("set", folder, "weight_decay=0.1", "betas=0.8,0.9")
    changed_only(before, files(folder), {
        **{f"{o}/param_groups/0/{k}": v for o in (o0, o1)
           for k, v in (("weight_decay", 0.1), ("betas", (0.8, 0.9)))},
        **{cfg.format(r=r, kind=kind): 0.1 for r in (0, 1) for kind in ("model", "optim")}})


WARMUP_ERROR = (
    "DeepSpeed's WarmupLR schedule (warmup_min_lr=0.0, warmup_max_lr=0.01 in the saved "
    "ds_config) drives this optimizer. DeepSpeed rebuilds it from the config given at launch; "
    "the checkpoint keeps only its last_batch_iteration ({where}): the first step after "
    "resuming uses the groups' lr, every later step the lr the schedule computes from that "
    "config; change scheduler.params.warmup_min_lr / warmup_max_lr in the DeepSpeed config you "
    "launch with; pass --no-scheduler to change the groups anyway\n")
WARMUP_NOTE = (
    "note: DeepSpeed's WarmupLR schedule (warmup_min_lr=0.0, warmup_max_lr=0.01 in the saved "
    "ds_config) drives this optimizer and DeepSpeed rebuilds it from the config given at launch "
    "(the checkpoint keeps only its last_batch_iteration): only the first step after resuming "
    "uses the edited groups' lr, later steps the schedule's; change scheduler.params."
    "warmup_min_lr / warmup_max_lr in the DeepSpeed config you launch with\n")


@pytest.mark.parametrize("case", ["zero1", "zero3_warmup"])
def test_warmup_lr_says_where_the_lr_comes_from(case: str,
                                               copy_fixture: Callable[[str], Path]) -> None:
    folder = copy_fixture(f"deepspeed_ranks/{case}")
    before = files(folder)
    r = run("set-lr", folder, "1e-3", code=1)
    where = ("/mp_rank_00_model_states.pt/lr_scheduler" if case == "zero1" else
             "/zero_pp_rank_0_mp_rank_00_model_states.pt/lr_scheduler and 1 more model file")
    assert r.stderr == f"Error: {folder / 'global_step3'}: " + WARMUP_ERROR.format(where=where)
    r = run("set-lr", folder, "1e-3", "--no-scheduler")
    stage = "ZeRO-1" if case == "zero1" else "ZeRO-3"
    inner = "base_optimizer_state" if case == "zero1" else "optimizer_state_dict"
    assert r.stdout == (
        f"set-lr: lr 0.001 in optimizer {OPT.format(r=0, inner=inner)} (groups 0, 1 x0.1) and "
        f"its copy in every other rank's file (DeepSpeed {stage}: one optimizer over 2 rank "
        "files); schedulers left unchanged (--no-scheduler); 4 values changed; wrote "
        f"{folder / 'global_step3'}\n")
    assert r.stderr == WARMUP_NOTE + (f"note: edited {folder / 'global_step3'} "
                                      f"({folder / 'latest'} names global_step3)\n")
    changed_only(before, files(folder), {
        f"{OPT.format(r=r, inner=inner)}/param_groups/{g}/lr": 1e-3
        for r in (0, 1) for g in (0, 1)})
    r = run("set", folder, "lr=2e-3", "--dry-run")  # set says it too
    assert r.stdout.endswith("4 values changed\n" + WARMUP_NOTE + "dry run: nothing written\n")


def test_zero0_model_file_optimizer_and_ds_config(copy_fixture: Callable[[str], Path]) -> None:
    folder = copy_fixture("deepspeed_ranks/zero0")
    before = files(folder)
    r = run("set-lr", folder, "1e-3", "--no-scheduler")
    assert r.stdout == (
        "set-lr: lr 0.001 in optimizer /mp_rank_00_model_states.pt/optimizer (group 0 x0.2); "
        "ds_config optimizer lr 0.001 in 1 file; schedulers left unchanged (--no-scheduler); "
        f"2 values changed; wrote {folder / 'global_step3'}\n")
    changed_only(before, files(folder), {
        "/mp_rank_00_model_states.pt/optimizer/param_groups/0/lr": 1e-3,
        "/mp_rank_00_model_states.pt/ds_config/optimizer/params/lr": 1e-3})


def test_ranks_that_disagree_are_refused() -> None:
    ckpt = ckpttool.open(RANKS / "zero2")
    ed = TreeEditor(ckpt, "test")
    ed.set_number(OPT.format(r=1, inner="base_optimizer_state") + "/param_groups/0/lr", 0.5)
    odd = ed.finish("rank 1 alone").result
    with pytest.raises(ckpttool.EditError) as e:
        set_lr(odd, 1e-3)
    assert e.value.message == (
        f"group 0 of optimizer {OPT.format(r=1, inner='base_optimizer_state')} differs from "
        f"rank {OPT.format(r=0, inner='base_optimizer_state')}'s in lr; the ranks of one "
        "DeepSpeed optimizer must agree")


def test_set_lr_zero3_scales_every_copy_of_the_engine_scheduler(
        copy_fixture: Callable[[str], Path]) -> None:
    """ZeRO-3 saves the engine's (client torch StepLR) scheduler in every rank's model file:
    set-lr scales each copy, as it changes each rank's optimizer. tests/deepspeed_resume.py on
    the result (by hand): every rank's steps use 0.001, 0.0005, 0.0005, 0.00025."""
    folder = copy_fixture("deepspeed_ranks/zero3_steplr")
    before = files(folder)
    r = run("set-lr", folder, "1e-3")
    o0 = OPT.format(r=0, inner="optimizer_state_dict")
    assert r.stdout == (
        f"set-lr: lr 0.001 in optimizer {o0} (groups 0, 1 x0.2) and its copy in every other "
        "rank's file (DeepSpeed ZeRO-3: one optimizer over 2 rank files); scheduler "
        "/zero_pp_rank_0_mp_rank_00_model_states.pt/lr_scheduler (StepLR) and its copy in "
        "every other rank's model file scaled to match; 16 values changed; wrote "
        f"{folder / 'global_step3'}\n")
    after = files(folder)
    model = "/zero_pp_rank_{r}_mp_rank_00_model_states.pt/lr_scheduler"
    expect: dict[str, Any] = {}
    for r_ in (0, 1):
        o = OPT.format(r=r_, inner="optimizer_state_dict")
        for g in (0, 1):
            expect[f"{o}/param_groups/{g}/lr"] = 1e-3
            expect[f"{o}/param_groups/{g}/initial_lr"] = 0.01 * (1e-3 / 0.005)
            expect[f"{model.format(r=r_)}/_last_lr/{g}"] = 1e-3
            expect[f"{model.format(r=r_)}/base_lrs/{g}"] = 0.01 * (1e-3 / 0.005)
    changed_only(before, after, expect)
    # the scaled schedule on torch's own StepLR: the lrs of the next steps are 1/5 of before
    for r_ in (0, 1):
        opt = torch.optim.AdamW([{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)]}])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        opt.load_state_dict(after[f"zero_pp_rank_{r_}_mp_rank_00_optim_states.pt"][
            "optimizer_state_dict"]["optimizer_state_dict"] | {"state": {}})
        sched.load_state_dict(after[f"zero_pp_rank_{r_}_mp_rank_00_model_states.pt"][
            "lr_scheduler"])
        lrs = []
        for _ in range(4):
            lrs.append([g["lr"] for g in opt.param_groups])
            opt.step()
            sched.step()
        assert lrs == [[1e-3, 1e-3], [5e-4, 5e-4], [5e-4, 5e-4], [2.5e-4, 2.5e-4]]


@pytest.mark.parametrize("args", [["merge-groups"], ["convert", "--to", "SGD"]])
def test_flat_partitions_are_not_merged_or_converted(args: list[str]) -> None:
    r = run(*args, RANKS / "zero1", "--dry-run", code=1)
    what = "merge param groups" if args[0] == "merge-groups" else "convert the optimizer"
    assert r.stderr == (
        f"Error: {RANKS / 'zero1' / 'global_step3'}: optimizer "
        f"{OPT.format(r=0, inner='base_optimizer_state')} is a DeepSpeed ZeRO rank file's "
        "optimizer: each of its param groups is one flat partition of the model's parameters, "
        f"laid out by DeepSpeed, so ckpttool cannot {what} in it; make the change in the "
        "training script or DeepSpeed config and resume with engine.load_checkpoint(..., "
        "load_optimizer_states=False): the weights still load\n")
