"""Run folders: a folder of independent checkpoints is a table, one row per checkpoint (each
opened on its own, nothing aligned across them); folders whose layout is one checkpoint stay
one. The rows are checked against torch.load of the same files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import ckpttool
from ckpttool.errors import RunFolderError
from ckpttool.run import is_run, open_run, run_members
from conftest import FIXTURES, run

LOOP = FIXTURES / "runs" / "loop"
TOPK = FIXTURES / "runs" / "lightning_topk"


def _expected_row(path: Path) -> dict[str, object]:
    """What the run table must say about a checkpoint, from torch.load of it."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if "optimizer_states" in ck:  # Lightning
        opt, sched = ck["optimizer_states"][0], ck["lr_schedulers"][0]
        ptr, sptr, stype = "/optimizer_states/0", "/lr_schedulers/0", "StepLR"
    else:
        opt, sched = ck["optimizer"], ck["scheduler"]
        ptr, sptr, stype = "/optimizer", "/scheduler", "ExponentialLR"
    return {"epoch": ck["epoch"], "step": None, "global_step": ck["global_step"],
            "optimizers": [{"pointer": ptr, "type": "Adam",
                            "lrs": [g["lr"] for g in opt["param_groups"]],
                            "step": max(float(s["step"]) for s in opt["state"].values())}],
            "schedulers": [{"pointer": sptr, "type": stype,
                            "last_epoch": sched["last_epoch"]}],
            "safety": "weights-only", "followed": None, "error": None}


@pytest.mark.parametrize("folder, order", [
    (LOOP, ["epoch_1.pt", "epoch_2.pt", "best.pth", "epoch_3.pt", "epoch_4.pt", "epoch_5.pt",
            "last.pt"]),
    (TOPK, ["epoch=3-step=8.ckpt", "epoch=4-step=10.ckpt", "last.ckpt"]),
])
def test_run_rows_are_what_torch_loads(folder: Path, order: list[str]) -> None:
    doc = json.loads(run("show", folder, "--json").stdout)
    assert doc["schema"] == 1 and doc["kind"] == "run" and doc["path"] == str(folder)
    assert [r["path"] for r in doc["checkpoints"]] == order  # sorted by step
    assert doc["other_files"] == []
    for row in doc["checkpoints"]:
        want = _expected_row(folder / row["path"])
        assert row.pop("size") == (folder / row["path"]).stat().st_size
        assert row.pop("format") == "torch-zip"
        assert {k: v for k, v in row.items() if k != "path"} == want


def test_open_refuses_a_run_and_names_its_checkpoints() -> None:
    assert is_run(LOOP) and is_run(TOPK) and is_run(FIXTURES / "runs")
    with pytest.raises(RunFolderError) as e:
        ckpttool.open(LOOP)
    assert e.value.exit_code == 1
    assert e.value.message == ("a folder of 7 independent checkpoints (best.pth, epoch_1.pt, "
                               "epoch_2.pt, epoch_3.pt, ...), not one checkpoint")
    # one of its files is one checkpoint, shown as such
    r = run("show", LOOP / "epoch_2.pt")
    assert r.stdout.splitlines()[:2] == [f"file:    {LOOP / 'epoch_2.pt'}", "format:  torch-zip"]
    # runs inside runs: both sub-runs' files
    assert run_members(str(FIXTURES / "runs")) == [
        "lightning_topk/epoch=3-step=8.ckpt", "lightning_topk/epoch=4-step=10.ckpt",
        "lightning_topk/last.ckpt", "loop/best.pth", "loop/epoch_1.pt", "loop/epoch_2.pt",
        "loop/epoch_3.pt", "loop/epoch_4.pt", "loop/epoch_5.pt", "loop/last.pt"]


@pytest.mark.parametrize("rel, kind", [
    ("hf_trainer/checkpoint-4", "hf-trainer"), ("peft_trainer/checkpoint-4", "hf-trainer"),
    ("accelerate_state", "accelerate"), ("accelerate_two", "accelerate"),
    ("deepspeed/global_step3", "folder"), ("deepspeed", "folder"),
])
def test_folders_that_are_one_checkpoint_stay_one(rel: str, kind: str) -> None:
    ckpt = ckpttool.open(FIXTURES / rel)
    assert ckpt.kind == kind and not is_run(FIXTURES / rel)
    assert run("show", FIXTURES / rel).stdout.startswith("file:    ")


def test_dcp_folder_stays_one(tmp_path: Path) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp
    out = tmp_path / "step-7"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": torch.nn.Linear(2, 2).state_dict(), "step": 7},
                 checkpoint_id=str(out))
    assert ckpttool.open(out).kind == "dcp" and not is_run(out)
    # a run of DCP folders: one row each
    out2 = tmp_path / "step-9"
    shutil.copytree(out, out2)
    r = open_run(tmp_path)
    assert [(e.path, e.format, e.step) for e in r.entries] == [("step-7/", "dcp", 7),
                                                               ("step-9/", "dcp", 7)]


def test_part_names_are_one_checkpoint_and_the_rest_a_run(tmp_path: Path) -> None:
    """model.pt + optimizer.pt (+ scheduler.pt) are parts of one checkpoint; files of other
    names are independent checkpoints; --one and --run force either reading."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    parts = tmp_path / "parts"
    parts.mkdir()
    torch.save(model.state_dict(), parts / "model.pt")
    torch.save(opt.state_dict(), parts / "optimizer.pt")
    ckpt = ckpttool.open(parts)
    assert ckpt.kind == "folder"
    assert ckpt.optimizer().names_source is not None  # aligned with its own model.pt
    # as a run (forced): one row per file, the optimizer file's lr and nothing aligned
    doc = json.loads(run("show", parts, "--run", "--json").stdout)
    assert [(r["path"], [o["lrs"] for o in r["optimizers"]]) for r in doc["checkpoints"]] == [
        ("model.pt", []), ("optimizer.pt", [[0.1]])]  # no steps stored: by path
    numbered = tmp_path / "numbered"  # model_N.pt: one file per epoch, not parts
    numbered.mkdir()
    for n in (1, 2):
        torch.save({"epoch": n, "model": model.state_dict()}, numbered / f"model_{n}.pt")
    assert is_run(numbered) and [e.epoch for e in open_run(numbered).entries] == [1, 2]
    # two independent files: a run; --one reads them as one folder (as ckpttool did before)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for n in ("bf16.pt", "cuda0.pt"):
        shutil.copy(FIXTURES / n, mixed / n)
    (mixed / "notes.txt").write_text("x")
    (mixed / "broken.pt").write_bytes(b"")
    r = run("show", mixed)
    assert r.stdout.splitlines()[0] == (
        f"run:     {mixed} (3 checkpoints, sorted by step; `ckpttool show {mixed / 'broken.pt'}`"
        " shows one)")
    assert r.stdout.splitlines()[-2:] == [
        "unreadable: broken.pt: an empty file (0 bytes): the save was interrupted or never "
        "happened", "other files: notes.txt"]
    doc = json.loads(run("show", mixed, "--json").stdout)
    rows = {x["path"]: x for x in doc["checkpoints"]}
    assert rows["cuda0.pt"]["optimizers"] == [
        {"pointer": "/optimizer", "type": "Adam", "lrs": [0.01], "step": 3.0}]
    assert rows["broken.pt"]["format"] == "" and rows["broken.pt"]["error"].startswith("an empty")
    for name in ("bf16.pt", "cuda0.pt"):  # each file's names come from its own model
        assert ckpttool.open(mixed / name).optimizer().names_source is not None
    (mixed / "broken.pt").unlink()
    one = ckpttool.open(mixed, one=True)
    assert one.kind == "folder" and len(one.optimizers) == 2


def test_run_flags(tmp_path: Path) -> None:
    r = run("show", LOOP, "--run", "--one", code=1)
    assert r.stderr == f"Error: {LOOP}: --run and --one contradict each other; pass one\n"
    r = run("show", LOOP / "last.pt", "--run", code=1)
    assert r.stderr == f"Error: {LOOP / 'last.pt'}: --run is for folders; a file is one checkpoint\n"
    r = run("show", LOOP, "--all", code=1)
    assert r.stderr == (f"Error: {LOOP}: --optimizer, --all and --stats are for one checkpoint, "
                        f"and this folder is a run of several; show one of them: ckpttool show "
                        f"{LOOP}/FILE ...\n")
    # a Trainer output folder: its checkpoint-N/ folders are the rows, by global_step
    out = tmp_path / "output"
    out.mkdir()
    for n in (8, 4):
        dst = out / f"checkpoint-{n}"
        shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-4", dst)
        st = json.loads((dst / "trainer_state.json").read_text())
        st["global_step"] = n
        (dst / "trainer_state.json").write_text(json.dumps(st))
    (out / "runs").mkdir()  # tensorboard logs: not a checkpoint
    (out / "runs" / "events.out").write_text("x")
    r = open_run(out)
    assert [(e.path, e.format, e.global_step) for e in r.entries] == [
        ("checkpoint-4/", "hf-trainer", 4), ("checkpoint-8/", "hf-trainer", 8)]
    assert r.other_files == ["runs/events.out"]
    # a DeepSpeed run folder is read through `latest`; --run lists its tags
    doc = json.loads(run("show", FIXTURES / "deepspeed", "--run", "--json").stdout)
    assert [(x["path"], x["global_step"]) for x in doc["checkpoints"]] == [("global_step3/", 3)]
    assert doc["other_files"] == ["latest", "zero_to_fp32.py", "zero_to_torch.py"]


def test_a_model_folder_with_checkpoint_folders_inside(tmp_path: Path) -> None:
    """A transformers output folder: the final model on top (one checkpoint), checkpoint-N/
    below: show reads the top and says how to list the rest."""
    out = tmp_path / "output"
    shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-4", out / "checkpoint-4")
    for n in ("config.json", "model.safetensors"):
        shutil.copy(FIXTURES / "hf_trainer" / "checkpoint-4" / n, out / n)
    (out / "runs").mkdir()
    ckpt = ckpttool.open(out)
    assert ckpt.kind == "folder" and ckpt.inner_checkpoints == ["checkpoint-4/"]
    assert ckpt.notes == [f"1 checkpoint folder inside (checkpoint-4/), not part of this one: "
                          f"`ckpttool show --run {out}` lists them"]
    doc = json.loads(run("show", out, "--run", "--json").stdout)
    assert [x["path"] for x in doc["checkpoints"]] == ["checkpoint-4/", "model.safetensors"]
    assert doc["other_files"] == ["config.json"]
