"""The library's edit API: a checkpoint in, a plan out (exact changes), nothing mutated; plans
chain and are saved once; new tensors are streamed descriptions; -o always writes OUT."""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.optim import lr_scheduler as S

import ckpttool
from ckpttool.checkpoint import Checkpoint
from ckpttool.cli import cli
from ckpttool.edits import ABSENT, Plan
from ckpttool.edits.merge_groups import merge_groups
from ckpttool.edits.move import move
from ckpttool.edits.set_hparams import set_hparams
from ckpttool.edits.set_lr import set_lr
from ckpttool.errors import AmbiguousError, EditError
from ckpttool.formats.nodes import TensorRef
from ckpttool.newtensors import Zeros
from ckpttool.save import save

from conftest import FIXTURES, run, train_steps


def changes(plan: Plan) -> list[tuple[str, Any, Any]]:
    """(pointer, before, after) with tensors shown as (dtype, shape, device)."""
    def show(v: Any) -> Any:
        if isinstance(v, TensorRef):
            return (v.dtype, list(v.shape), v.device)
        return v
    return [(c.pointer, show(c.before), show(c.after)) for c in plan.changes]


def snapshot(ckpt: Checkpoint) -> str:
    """Everything the views of a checkpoint say, as text (to prove nothing was mutated)."""
    from ckpttool.render import show_json
    import json
    return json.dumps(show_json(ckpt), sort_keys=True, default=str)



# ---------------------------------------------------------------------- tree in, plan out

def test_set_lr_plan_exact_and_source_untouched() -> None:
    ckpt = ckpttool.open(FIXTURES / "imagenet_style.pth")
    before = snapshot(ckpt)
    plan = set_lr(ckpt, 1e-3)
    assert changes(plan) == [
        ("/optimizer/param_groups/0/lr", 0.010000000000000002, 1e-3),
        ("/optimizer/param_groups/0/initial_lr", 0.1, 0.1 * (1e-3 / 0.010000000000000002)),
        ("/scheduler/_last_lr/0", 0.010000000000000002, 1e-3),
        ("/scheduler/base_lrs/0", 0.1, 0.1 * (1e-3 / 0.010000000000000002)),
    ]
    assert plan.source is ckpt and plan.touched == [""]
    assert snapshot(ckpt) == before  # the checkpoint given is never changed
    assert ckpt.touched == []
    new = plan.result.optimizers[0]
    assert new.groups[0].hyperparameters["lr"] == 1e-3
    assert plan.result.schedulers[0].raw["base_lrs"] == [0.1 * (1e-3 / 0.010000000000000002)]
    # unchanged parts are shared, not copied
    assert plan.result.root["state_dict"] is ckpt.root["state_dict"]
    assert plan.result.root["optimizer"]["state"] is ckpt.root["optimizer"]["state"]


def test_set_plan_adds_state_as_descriptions() -> None:
    ckpt = ckpttool.open(FIXTURES / "optim_adam.pt")
    plan = set_hparams(ckpt, {"amsgrad": True}, groups=[1])
    assert changes(plan) == [
        ("/param_groups/1/amsgrad", False, True),
        ("/state/2/max_exp_avg_sq", ABSENT, "zeros[2, 3]"),
        ("/state/3/max_exp_avg_sq", ABSENT, "zeros[2]"),
    ]
    t = plan.result.optimizers[0].raw["state"][2]["max_exp_avg_sq"]
    assert (t.dtype, t.shape, t.device) == ("float32", (2, 3), "cpu")
    assert t.storage is not None and t.storage.record is None
    assert t.storage.content == Zeros(24)
    assert "max_exp_avg_sq" not in ckpt.optimizers[0].raw["state"][2]
    off = set_hparams(plan.result, {"amsgrad": False}, groups=[1])
    assert changes(off) == [
        ("/param_groups/1/amsgrad", True, False),
        ("/state/2/max_exp_avg_sq", ("float32", [2, 3], "cpu"), ABSENT),
        ("/state/3/max_exp_avg_sq", ("float32", [2], "cpu"), ABSENT),
    ]


def test_set_to_the_same_value_is_no_change(tmp_path: Path) -> None:
    ckpt = ckpttool.open(FIXTURES / "optim_adam.pt")
    plan = set_hparams(ckpt, {"eps": 1e-8})
    assert plan.changes == [] and not plan.changed and plan.result is ckpt


def test_move_plan_counts_every_storage() -> None:
    ckpt = ckpttool.open(FIXTURES / "cuda0.pt")
    plan = move(ckpt, "cpu")
    assert changes(plan) == [(f"/model/{n}", "cuda:0", "cpu") for n in
                             ("0.weight", "0.bias", "2.weight", "2.bias")] + [
        (f"/optimizer/state/{i}/{k}", "cuda:0", "cpu") for i in range(4)
        for k in ("exp_avg", "exp_avg_sq")]
    assert plan.summary == "move: 12 of 16 storages now on cpu"
    again = move(plan.result, "cpu")
    assert again.changes == [] and again.summary == \
        "move: all 16 storages are already where they belong; no changes"


def build_two_groups(tmp_path: Path) -> Path:
    """Adam over (head, backbone) groups of different lr + StepLR, 3 real steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = torch.optim.Adam([{"params": model[2].parameters(), "lr": 0.01},
                            {"params": model[0].parameters(), "lr": 0.01}])
    sched = S.StepLR(opt, step_size=2, gamma=0.5)
    train_steps(model, opt, sched)
    path = tmp_path / "two.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict()}, path)
    return path


def test_merge_groups_plan_exact(tmp_path: Path) -> None:
    ckpt = ckpttool.open(build_two_groups(tmp_path))
    plan = merge_groups(ckpt)
    assert changes(plan) == [
        ("/optimizer/param_groups", "2 groups [2, 2]", "1 groups [4]"),
        ("/optimizer/state", "4 entries", "4 entries renumbered"),
        ("/scheduler/_last_lr", [0.005, 0.005], [0.005]),
        ("/scheduler/base_lrs", [0.01, 0.01], [0.01]),
    ]
    new = plan.result.optimizers[0]
    assert [g.params for g in new.groups] == [[0, 1, 2, 3]]
    assert [g.param_names for g in new.groups] == [["0.weight", "0.bias", "2.weight", "2.bias"]]
    # the state followed its param: 0.weight's moments (old id 2) are now under id 0
    old = ckpt.optimizers[0].raw["state"]
    assert new.raw["state"][0] is old[2] and new.raw["state"][2] is old[0]


def test_chained_edits_saved_once(tmp_path: Path) -> None:
    """Defect 4: edits used to mutate the opened tree under cached views, so set_lr after
    merge_groups on the same checkpoint raised IndexError."""
    path = build_two_groups(tmp_path)
    ckpt = ckpttool.open(path)
    before = path.read_bytes()
    plan = merge_groups(ckpt).then(set_lr, 1e-3).then(move, "cuda:1")
    assert plan.command == "merge-groups + set-lr + move"
    assert [p.command for p in plan.steps] == ["merge-groups", "set-lr", "move"]
    assert plan.changes[:4] == merge_groups(ckpt).changes
    out = tmp_path / "out.pt"
    result = save(plan, str(out))
    assert result.changed and path.read_bytes() == before
    tags: list[str] = []
    ck = torch.load(out, map_location=lambda s, loc: tags.append(loc) or s)
    assert set(tags) == {"cuda:1", "cpu"}  # steps stay on the cpu
    assert [len(g["params"]) for g in ck["optimizer"]["param_groups"]] == [4]
    assert ck["optimizer"]["param_groups"][0]["lr"] == 1e-3
    assert ck["scheduler"]["base_lrs"] == [pytest.approx(0.002, rel=1e-12)]
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    opt.load_state_dict(ck["optimizer"])
    for p, name in zip(model.parameters(), ["0.weight", "0.bias", "2.weight", "2.bias"]):
        assert opt.state[p]["exp_avg"].shape == p.shape, name


def test_chained_plan_renders_as_dry_run_table(tmp_path: Path) -> None:
    ckpt = ckpttool.open(FIXTURES / "imagenet_style.pth")
    plan = set_lr(ckpt, 1e-3).then(set_hparams, {"momentum": 0.8})
    assert plan.render() == (
        "pointer                                 before    after\n"
        "------------------------------------  --------  -------\n"
        "/optimizer/param_groups/0/lr              0.01    0.001\n"
        "/optimizer/param_groups/0/initial_lr      0.1     0.01\n"
        "/scheduler/_last_lr/0                     0.01    0.001\n"
        "/scheduler/base_lrs/0                     0.1     0.01\n"
        "/optimizer/param_groups/0/momentum        0.9     0.8\n"
        "set-lr: lr 0.001 in optimizer /optimizer (group 0 x0.1); scheduler /scheduler "
        "(StepLR) scaled to match; 4 values changed; set: momentum=0.8 in group 0 of "
        "optimizer /optimizer (SGD); 1 value changed")


def test_set_lr_errors_carry_fields(tmp_path: Path) -> None:
    ckpt = ckpttool.open(build_two_groups(tmp_path))
    with pytest.raises(EditError) as e:
        set_lr(ckpt, 1e-3, groups=[5])
    assert (e.value.path, e.value.pointer) == (ckpt.path, "/optimizer")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": model[2].parameters(), "lr": 0.01}])
    torch.save({"optimizer": opt.state_dict()}, tmp_path / "d.pt")
    with pytest.raises(AmbiguousError) as a:
        set_lr(ckpttool.open(tmp_path / "d.pt"), 1e-3)
    assert a.value.exit_code == 1 and a.value.hint is not None and "--keep-ratios" in a.value.hint


# ---------------------------------------------------------------------- -o always writes OUT

def test_output_of_a_no_op_is_a_copy(tmp_path: Path) -> None:
    """Defect 3: `-o OUT` on an edit that changed nothing printed "wrote OUT" and wrote
    nothing."""
    src = FIXTURES / "imagenet_style.pth"
    out = tmp_path / "out.pth"
    r = run("move", src, "cpu", "-o", out)
    assert r.stdout == ("move: all 9 storages are already where they belong; no changes; "
                        f"{out} is a copy\n")
    assert out.read_bytes() == src.read_bytes()
    out2 = tmp_path / "out2.pth"
    r = run("set", src, "momentum=0.9", "-o", out2)
    assert r.stdout == ("set: momentum=0.9 in group 0 of optimizer /optimizer (SGD); 0 values "
                        f"changed; {out2} is a copy\n")
    assert out2.read_bytes() == src.read_bytes()
    r = run("set", src, "momentum=0.9", "-o", out2, code=1)
    assert r.stderr == f"Error: {out2}: already exists; use --force to overwrite it\n"


def test_in_place_no_op_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.pth"
    shutil.copy(FIXTURES / "imagenet_style.pth", path)
    mtime = path.stat().st_mtime_ns
    r = run("move", path, "cpu")
    assert r.stdout == ("move: all 9 storages are already where they belong; no changes; "
                        "nothing written\n")
    assert path.stat().st_mtime_ns == mtime


def tree_files(root: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + str(p.readlink())
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = "<dir>"
    return out


def test_folder_output_keeps_every_file(tmp_path: Path) -> None:
    """Defect 1: -o on a folder dropped every file ckpttool did not parse."""
    src = tmp_path / "checkpoint-4"
    shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-4", src)
    (src / "README.md").write_text("# adapter card\n")
    (src / "vocab.txt").write_text("a\nb\n")
    (src / "latest").write_text("global_step4")
    (src / "global_step4").mkdir()
    (src / "global_step4" / "notes.txt").write_text("x")
    (src / "spiece.model").write_bytes(b"\x00\x01binary")
    (src / "link.json").symlink_to("config.json")
    before = tree_files(src)
    out = tmp_path / "edited"
    r = run("set-lr", src, "1e-4", "--base-lr", "-o", out)
    assert r.stdout.endswith(f"; wrote {out} (2 files rewritten, 12 kept as they were)\n")
    assert tree_files(src) == before
    got = tree_files(out)
    assert sorted(got) == sorted(before)
    differ = sorted(k for k in got if got[k] != before[k])
    assert differ == ["optimizer.pt", "scheduler.pt"]
    # no-op: the whole folder is copied
    out2 = tmp_path / "copy"
    r = run("move", src, "cpu", "-o", out2)
    assert r.stdout.endswith(f"no changes; {out2} is a copy\n")
    assert tree_files(out2) == before
    # in place: only touched files are replaced
    run("set-lr", src, "1e-4", "--base-lr")
    now = tree_files(src)
    assert sorted(k for k in now if now[k] != before[k]) == differ
    for name in ("README.md", "vocab.txt", "latest", "global_step4/notes.txt"):
        assert filecmp.cmp(src / name, out / name, shallow=False)


# ---------------------------------------------------------------------- exit codes

def test_write_failure_has_its_own_exit_code(tmp_path: Path) -> None:
    """Disk full (RLIMIT_FSIZE) while writing OUT: exit 5, the message says the original is
    unchanged, and no temp file is left."""
    import os
    import resource
    import signal
    import subprocess
    import sys
    src = tmp_path / "in.pt"
    shutil.copy(FIXTURES / "cuda0.pt", src)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    out = tmp_path / "out.pt"
    r = subprocess.run([sys.executable, "-m", "ckpttool", "move", str(src), "cpu", "-o", str(out)],
                       capture_output=True, text=True, preexec_fn=limit,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert r.returncode == 5, r.stderr
    assert r.stdout == ""
    assert r.stderr == (f"Error: {out}: could not write the checkpoint (File too large); the "
                        "original file is unchanged; free some space (the new file is written "
                        "beside the target before it replaces it) or write elsewhere with -o\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pt"]
    assert src.read_bytes() == (FIXTURES / "cuda0.pt").read_bytes()


def test_internal_error_is_not_blamed_on_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in ckpttool surfaces as one (exit 70), with its traceback, not as a corrupt file."""
    import ckpttool.checkpoint

    def broken(path: str) -> None:
        raise TypeError("a bug")

    monkeypatch.setattr(ckpttool.checkpoint, "open_checkpoint", broken)
    result = CliRunner().invoke(cli, ["show", str(FIXTURES / "optim_adam.pt")])
    assert result.exit_code == 70
    assert result.stderr.splitlines()[-2:] == [
        "TypeError: a bug",
        f"Error: internal error in ckpttool {ckpttool.__version__}; this is a bug, please report "
        "it with the traceback above"]
