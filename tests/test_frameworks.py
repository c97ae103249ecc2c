"""The nine defects of "Edits that compose and never lose data", each on a checkpoint written by
the real library it came from (fixtures/make_fixtures.py: mmengine, ultralytics, peft +
transformers Trainer, DeepSpeed, FSDP1, timm, accelerate) or by torch.save(model) with cuda
tags. Each test failed on the edit engine before the plan rewrite."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as S

import ckpttool
from ckpttool.edits import merge_groups, set_lr
from conftest import FIXTURES, run
from torch_json import load_fixture



def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


# ------------------------------------------------ 1. -o on a folder keeps every file

def test_peft_folder_output_keeps_readme_and_tokenizer(tmp_path: Path,
                                                        copy_fixture: Callable[[str], Path]
                                                        ) -> None:
    src = copy_fixture("peft_trainer/checkpoint-4")
    before = tree(src)
    assert {"README.md", "tokenizer.json", "tokenizer_config.json",
            "adapter_config.json"} <= set(before)
    out = tmp_path / "edited"
    r = run("set-lr", src, "1e-4", "--base-lr", "-o", out)
    assert r.stdout == (
        "set-lr: base lr 0.0001 in optimizer /optimizer.pt (groups 0, 1 x0.1); "
        "scheduler /scheduler.pt (LambdaLR) scaled to match; 4 values changed; wrote "
        f"{out} (2 files rewritten, 8 kept as they were)\n")
    got = tree(out)
    assert sorted(got) == sorted(before)
    assert sorted(k for k in got if got[k] != before[k]) == ["optimizer.pt", "scheduler.pt"]
    assert tree(src) == before


def test_deepspeed_step_folder_copy(tmp_path: Path, copy_fixture: Callable[[str], Path]) -> None:
    """-o of an edit that changes nothing reproduces the folder byte for byte."""
    src = copy_fixture("deepspeed/global_step3")
    out = tmp_path / "copy"
    r = run("move", src, "cpu", "-o", out)
    assert r.stdout == ("move: all 10 storages are already where they belong; no changes; "
                        f"{out} is a copy\n")
    assert tree(out) == tree(src)


# ------------------------------------------------ 2. move cpu reaches every storage

CUDA_FILES = {
    # file: (summary of `move cpu`, how to load it plainly)
    "torch_save_model_cuda.pt": (
        "move: 21 of 27 storages now on cpu (9 inside the pickled object at /model)",
        lambda p: torch.load(p, weights_only=False)),
    "ultralytics/last_cuda.pt": (
        "move: 148 of 185 storages now on cpu (74 inside the pickled object at /ema)",
        lambda p: load_fixture(p)),
    "fsdp1_full_cuda.pt": (
        "move: 6 of 7 storages now on cpu",
        lambda p: torch.load(p)),
}


@pytest.mark.parametrize("name", sorted(CUDA_FILES))
def test_move_cpu_then_plain_torch_load(name: str, tmp_path: Path) -> None:
    """After `move cpu` a CPU machine loads the file with plain torch.load (no map_location);
    before, tensors inside pickled objects kept their cuda:0 tags and the summary did not
    count them. (ultralytics' classes are not installed here: they are stubbed, and torch's
    own unpickling, device restoring included, runs for real.)"""
    summary, load = CUDA_FILES[name]
    src = FIXTURES / name
    with pytest.raises(RuntimeError, match="Attempting to deserialize object on a CUDA device"):
        load(src)
    out = tmp_path / "cpu.pt"
    r = run("move", src, "cpu", "-o", out)
    assert r.stdout == f"{summary}; wrote {out}\n"
    tags: list[str] = []
    load_fixture(out, map_location=lambda s, loc: tags.append(loc) or s)
    assert set(tags) == {"cpu"}
    load(out)
    again = ckpttool.open(out)
    assert {u.storage.location for u in again.storages} == {"cpu"}


def test_move_cuda_reaches_pickled_modules(tmp_path: Path) -> None:
    out = tmp_path / "cuda.pt"
    run("move", FIXTURES / "torch_save_model_cuda.pt", "cpu", "-o", tmp_path / "cpu.pt")
    r = run("move", tmp_path / "cpu.pt", "cuda:1", "-o", out)
    assert r.stdout == ("move: 21 of 27 storages now on cuda:1 (9 inside the pickled object at "
                        f"/model); 6 non-capturable step tensors stay on cpu; wrote {out}\n")
    tags: dict[str, str] = {}
    ck = torch.load(out, weights_only=False,
                    map_location=lambda s, loc: tags.setdefault(str(len(tags)), loc) and s)
    assert sorted(tags.values()).count("cuda:1") == 21
    assert isinstance(ck["model"], torch.nn.Sequential)


def test_show_lists_tensors_in_opaque_objects() -> None:
    r = run("show", FIXTURES / "ultralytics" / "last_cuda.pt")
    lines = r.stdout.splitlines()
    i = lines.index("tensors inside opaque objects:")
    assert lines[i + 1:i + 4] == [
        "  pointer    object                                 tensors  bytes    devices",
        "  ---------  -----------------------------------  ---------  -------  ----------",
        "  /ema       ultralytics.nn.tasks.DetectionModel         74  30.5 KB  cuda:0 x74",
    ]
    assert "storages: 185 (cpu x37, cuda:0 x148)" in lines


# ------------------------------------------------ 5. merge-groups needs the model order
# (the Trainer folder case is in test_edits.py: test_merge_groups_refuses_without_model_order)

def test_merge_groups_onecycle_fixture() -> None:
    """OneCycleLR's two _schedule_phases are not per-group lists (the optimizer has 2 groups
    too); its groups differ in their lrs, so the merge asks for --set lr and then works."""
    ckpt = ckpttool.open(FIXTURES / "onecycle_two_groups.pt")
    with pytest.raises(ckpttool.EditError, match="differ in initial_lr: group 0=0.0004, "
                                                 "group 1=4e-05; lr: "):
        merge_groups(ckpt)
    plan = merge_groups(ckpt, sets={"lr": 1e-3})
    phases = [c for c in plan.changes if "_schedule_phases" in c.pointer]
    assert phases == []
    assert plan.result.schedulers[0].raw["_schedule_phases"] == \
        ckpt.schedulers[0].raw["_schedule_phases"]
    assert [len(g.params) for g in plan.result.optimizers[0].groups] == [4]


# ------------------------------------------------ 6. set-lr keeps layer-decay ratios

def timm_resume(path: Path, steps: int = 4) -> list[list[float]]:
    """Resume the timm layer-decay AdamW + CosineAnnealingLR the usual way: the optimizer
    built over params of the saved shapes, both state dicts loaded, then real steps."""
    ck = load_fixture(path)
    sd = ck["optimizer"]
    groups = []
    for g in sd["param_groups"]:
        params = [torch.zeros(sd["state"][p]["exp_avg"].shape, requires_grad=True)
                  for p in g["params"]]
        groups.append({"params": params, "lr": g["lr"], "lr_scale": g["lr_scale"],
                       "weight_decay": g["weight_decay"]})
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = S.CosineAnnealingLR(opt, T_max=10, eta_min=1e-6)
    opt.load_state_dict(sd)
    sched.load_state_dict(ck["lr_scheduler"])
    lrs = []
    for _ in range(steps):
        for g in opt.param_groups:
            for p in g["params"]:
                p.grad = torch.ones_like(p)
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return lrs


def test_timm_layer_decay_keep_ratios(tmp_path: Path) -> None:
    src = FIXTURES / "timm_layer_decay.pth"
    out = tmp_path / "keep.pth"
    r = run("set-lr", src, "4e-4", "--keep-ratios", "-o", out)
    assert r.stdout == ("set-lr: largest lr 0.0004, ratios kept in optimizer /optimizer (groups "
                        "0, 1, 2, 3, 4, 5, 6, 7 x0.503716); scheduler "
                        "/lr_scheduler (CosineAnnealingLR) scaled to match; 33 values changed; "
                        f"wrote {out}\n")
    a, b = timm_resume(src), timm_resume(out)
    top = max(a[0])
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert v == pytest.approx(u * 4e-4 / top, rel=1e-9)
    assert max(b[0]) == pytest.approx(4e-4, rel=1e-12)
    ck = torch.load(out, weights_only=False)
    assert [g["lr_scale"] for g in ck["optimizer"]["param_groups"]] == \
        [g["lr_scale"] for g in torch.load(src, weights_only=False)["optimizer"]["param_groups"]]


# ------------------------------------------------ 7. extra group keys keep the type

@pytest.mark.parametrize("name, extra", [
    ("mmengine/iter_4.pth", ["decay_mult", "lr_mult"]),
    ("ultralytics/last.pt", ["param_group"]),
    ("timm_layer_decay.pth", ["lr_scale"]),
])
def test_extra_group_keys_keep_the_type(name: str, extra: list[str], tmp_path: Path) -> None:
    ckpt = ckpttool.open(FIXTURES / name)
    opt = ckpt.optimizer()
    assert (opt.type, opt.extra_keys) == ("AdamW", extra)
    shutil.copy(FIXTURES / name, tmp_path / "c.pt")
    r = run("set", tmp_path / "c.pt", "eps=1e-6")  # no --force needed
    assert r.stdout.startswith("set: eps=1e-06 in groups 0, 1, 2")
    after = load_fixture(tmp_path / "c.pt")["optimizer"]["param_groups"]
    before = load_fixture(FIXTURES / name)["optimizer"]["param_groups"]
    for g0, g1 in zip(before, after):
        assert g1["eps"] == 1e-6
        assert {k: g1.get(k) for k in extra} == {k: g0.get(k) for k in extra}
    # names were looked for (an unknown type used to skip that and claim "no state"): the
    # model's own module order is used, and the answer is honest about ambiguity
    assert opt.names_note is not None and opt.names_note.endswith(
        "more than one assignment of params to model parameters fits the shapes (groups hold "
        "params of the same shapes); names would be a guess")


# ------------------------------------------------ 8. unknown schedulers are not left behind

def test_mmengine_param_schedulers_stop_set_lr(tmp_path: Path) -> None:
    path = tmp_path / "iter_4.pth"
    shutil.copy(FIXTURES / "mmengine" / "iter_4.pth", path)
    before = path.read_bytes()
    err = run("set-lr", path, "1e-4", "--keep-ratios", code=1).stderr
    assert err == (
        f"Error: {path}: schedulers of a type ckpttool does not know may drive this optimizer: "
        "/param_schedulers/0 (keys last_step, base_values); /param_schedulers/1 (keys "
        "last_step, base_values). ckpttool cannot scale the learning rates in them, and at "
        "their next step they would undo the edit; edit them yourself (or rebuild them from "
        "your config at resume) and pass --no-scheduler to change only the optimizer\n")
    assert path.read_bytes() == before
    r = run("set-lr", path, "1e-4", "--keep-ratios", "--no-scheduler")
    assert "schedulers left unchanged (--no-scheduler); 12 values changed" in r.stdout
    ck = load_fixture(path)
    assert max(g["lr"] for g in ck["optimizer"]["param_groups"]) == 1e-4
    assert ck["param_schedulers"] == load_fixture(FIXTURES / "mmengine" / "iter_4.pth")[
        "param_schedulers"]


def test_deepspeed_warmup_lr_stops_set_lr() -> None:
    ckpt = ckpttool.open(FIXTURES / "deepspeed" / "global_step3")
    [s] = ckpt.schedulers
    assert (s.pointer, s.type, s.known) == ("/mp_rank_00_model_states.pt/lr_scheduler",
                                            "unknown", False)
    with pytest.raises(ckpttool.EditError, match="last_batch_iteration") as e:
        set_lr(ckpt, 1e-4)
    assert e.value.pointer == s.pointer and e.value.hint is not None
    plan = set_lr(ckpt, 1e-4, ratios="keep", no_scheduler=True)
    assert plan.touched == ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]


# ------------------------------------------------ 9. names pair optimizers and schedulers

def test_accelerate_suffixes_pair(tmp_path: Path, copy_fixture: Callable[[str], Path]) -> None:
    folder = copy_fixture("accelerate_two")
    r = run("set-lr", folder, "1e-4", "--optimizer", "/optimizer_1.bin")
    assert r.stdout == (
        "set-lr: lr 0.0001 in optimizer /optimizer_1.bin (group 0 x0.04); scheduler "
        f"/scheduler_1.bin (StepLR) scaled to match; 4 values changed; wrote {folder}\n")
    sched = torch.load(folder / "scheduler_1.bin")
    assert sched["base_lrs"] == [pytest.approx(2e-4, rel=1e-12)]
    assert same(torch.load(folder / "scheduler.bin"),
                torch.load(FIXTURES / "accelerate_two" / "scheduler.bin"))


def test_gan_dict_keys_pair(tmp_path: Path) -> None:
    path = tmp_path / "gan.pt"
    shutil.copy(FIXTURES / "gan_sched.pt", path)
    old = torch.load(path)
    r = run("set-lr", path, "5e-5", "--optimizer", "/opt_D")
    assert r.stdout.endswith("scheduler /sched_D (StepLR) scaled to match; 4 values changed; "
                             f"wrote {path}\n")
    new = torch.load(path)
    k = 5e-5 / old["opt_D"]["param_groups"][0]["lr"]
    assert new["sched_D"]["base_lrs"] == [pytest.approx(old["sched_D"]["base_lrs"][0] * k)]
    assert same(new["sched_G"], old["sched_G"]) and same(new["opt_G"], old["opt_G"])


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return bool(a == b)


def test_deepspeed_run_folder_follows_latest(tmp_path: Path) -> None:
    """A DeepSpeed run folder is opened through its ``latest`` file; edits go to the
    checkpoint it names, and every output says which one."""
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES / "deepspeed", run_dir)
    r = run("show", run_dir)
    assert r.stdout.splitlines()[:2] == [f"file:    {run_dir / 'global_step3'}",
                                         f"via:     {run_dir / 'latest'} names global_step3"]
    r = run("set-lr", run_dir, "1e-4", "--no-scheduler")
    assert r.stderr.splitlines()[1:] == [f"note: edited {run_dir / 'global_step3'} "
                                         f"({run_dir / 'latest'} names global_step3)"]
    assert r.stderr.startswith("note: DeepSpeed's WarmupLR schedule")  # tests/test_deepspeed
    assert r.stdout == (
        "set-lr: lr 0.0001 in optimizer /zero_pp_rank_0_mp_rank_00_optim_states.pt/"
        "optimizer_state_dict/base_optimizer_state (groups 0, 1 x0.01); schedulers left "
        f"unchanged (--no-scheduler); 2 values changed; wrote {run_dir / 'global_step3'}\n")
    osd = load_fixture(run_dir / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
                       )["optimizer_state_dict"]["base_optimizer_state"]
    assert [g["lr"] for g in osd["param_groups"]] == [1e-4, 1e-4]
    (run_dir / "latest").write_text("global_step9")  # names nothing here: not followed
    from ckpttool.errors import RunFolderError
    with pytest.raises(RunFolderError) as e:  # a run folder of one checkpoint: name it
        ckpttool.open(run_dir)
    assert str(e.value) == (
        f"{run_dir}: a folder of 1 independent checkpoint (global_step3/), not one checkpoint; "
        f"name one (for example {run_dir / 'global_step3'}/); `ckpttool show {run_dir}` lists "
        "them (show --one and diff --one, library: one=True, read every file in it as parts of "
        "one checkpoint)")


def test_deepspeed_zero_partitions_per_param() -> None:
    """Each param's slice of the flat fp32 partition, as show gives it, is that param: the
    slice of DeepSpeed's own master copy equals the model file's weight, exactly."""
    doc = json.loads(run("show", "--json", FIXTURES / "deepspeed").stdout)
    zero = doc["deepspeed_zero"]
    assert [(z["rank"], z["group"], [(p["name"], p["shape"], p["start"], p["numel"])
                                     for p in z["params"]]) for z in zero] == [
        (0, 0, [("0.weight", [3, 4], 0, 12), ("2.weight", [2, 3], 12, 6)]),
        (0, 1, [("0.bias", [3], 0, 3), ("2.bias", [2], 3, 2)])]
    step = FIXTURES / "deepspeed" / "global_step3"
    model = load_fixture(step / "mp_rank_00_model_states.pt")["module"]
    osd = load_fixture(step / "zero_pp_rank_0_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
    for z in zero:
        flat = osd["single_partition_of_fp32_groups"][z["group"]]
        for p in z["params"]:
            part = flat[p["start"]:p["start"] + p["numel"]].view(p["shape"])
            assert torch.equal(part, model[p["name"]].float())
