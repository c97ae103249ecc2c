"""check: every good fixture passes with no FAIL; each planted defect is caught by the right
check id; the live model / optimizer comparison; CLI exit codes and whole outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as S

import ckpttool
from ckpttool.checks import CheckFailed, check
from conftest import FIXTURES, run, train_steps

MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())["fixtures"]
# what a CPU-only machine must refuse: files tagged cuda:0, and the unsafe payloads
EXPECTED_FAILS = {
    "cuda0.pt": {"cuda-unavailable"}, "fsdp1_full_cuda.pt": {"cuda-unavailable"},
    "torch_save_model_cuda.pt": {"cuda-unavailable"},
    "ultralytics/last_cuda.pt": {"cuda-unavailable"},
    "unsafe_exec.pt": {"unsafe"}, "unsafe_os_system.pt": {"unsafe"},
}


@pytest.mark.parametrize("fixture", MANIFEST, ids=lambda f: f["path"])
def test_good_fixtures_have_no_fail(fixture: dict[str, Any]) -> None:
    report = check(FIXTURES / fixture["path"], deep=True)
    fails = {f.id for f in report.findings if f.level == "FAIL"}
    assert fails == EXPECTED_FAILS.get(fixture["path"], set()), report.render()



def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def trained(tmp_path: Path, name: str = "ck.pt", **extra: Any) -> tuple[Path, dict[str, Any]]:
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = S.StepLR(opt, step_size=2, gamma=0.5)
    train_steps(model, opt, sched)
    ck = {"model": model.state_dict(), "optimizer": opt.state_dict(),
          "scheduler": sched.state_dict(), **extra}
    path = tmp_path / name
    torch.save(ck, path)
    return path, ck


def ids(report: Any, level: str = "FAIL") -> list[tuple[str, str]]:
    return [(f.id, f.pointer) for f in report.findings if f.level == level]


def planted(tmp_path: Path, edit: Any) -> Path:
    _, ck = trained(tmp_path)
    edit(ck)
    path = tmp_path / "bad.pt"
    torch.save(ck, path)
    return path


def test_swapped_params_of_different_shapes(tmp_path: Path) -> None:
    def swap(ck: dict[str, Any]) -> None:
        st = ck["optimizer"]["state"]
        st[0], st[2] = st[2], st[0]
    r = check(planted(tmp_path, swap))
    assert ids(r) == [("state-shape", "/optimizer/state/0"), ("state-shape", "/optimizer/state/2")]
    assert r.findings[0].message == ("param 0 is position 0 of the group, which is 0.weight "
                                     "[3, 4] in the model, but its state has shape [2, 3]")


def test_group_with_one_extra_param(tmp_path: Path) -> None:
    r = check(planted(tmp_path, lambda ck: ck["optimizer"]["param_groups"][0]["params"]
                      .append(4)))
    assert ids(r) == [("param-count", "/optimizer")]
    assert r.findings[0].message == ("the optimizer lists 5 params but the model /model has 4 "
                                     "parameter tensors")


def test_orphan_state_and_missing_betas_and_unequal_steps(tmp_path: Path) -> None:
    def edit(ck: dict[str, Any]) -> None:
        ck["optimizer"]["state"][7] = ck["optimizer"]["state"][3]
        del ck["optimizer"]["param_groups"][0]["betas"]
        ck["optimizer"]["state"][1]["step"] = torch.tensor(1.0)
    r = check(planted(tmp_path, edit))
    assert ("orphan-state", "/optimizer/state") in ids(r)
    assert ("missing-hyperparameter", "/optimizer/param_groups/0/betas") in ids(r)
    assert ("unequal-steps", "/optimizer/state") in ids(r, "WARN")
    miss = next(f for f in r.findings if f.id == "missing-hyperparameter")
    assert miss.hint == "ckpttool set PATH betas=0.9,0.999 --group 0"


def test_last_lr_disagrees(tmp_path: Path) -> None:
    r = check(planted(tmp_path, lambda ck: ck["scheduler"].update(_last_lr=[0.5])))
    assert ids(r, "WARN") == [("last-lr", "/scheduler/_last_lr/0")]
    assert r.ok


def test_nan_in_exp_avg_and_flipped_bit(tmp_path: Path) -> None:
    def nan(ck: dict[str, Any]) -> None:
        ck["optimizer"]["state"][2]["exp_avg"][0, 1] = float("nan")
    path = planted(tmp_path, nan)
    assert check(path).ok  # only a deep check reads tensor bytes
    r = check(path, deep=True)
    assert ids(r) == [("nan-inf", "/optimizer/state/2/exp_avg")]
    assert r.findings[0].message == "1 value is NaN or Inf"
    good, _ = trained(tmp_path, "good.pt")
    f = ckpttool.open(good).files[0]
    rec = next(r for n, r in f.archive.records.items() if n.startswith("data/"))
    raw = bytearray(good.read_bytes())
    raw[rec.data_offset] ^= 0x01
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(raw))
    r = check(flipped, deep=True)
    assert [i for i, _ in ids(r)] == ["crc"]
    assert r.findings[0].message.startswith("record data/0 of ")


def test_cuda_file_cli(tmp_path: Path) -> None:
    r = run("check", FIXTURES / "cuda0.pt", code=1)
    assert r.stdout.splitlines()[-1] == "check FAILED: 1 fail, 0 warn, 0 info"
    doc = json.loads(run("check", FIXTURES / "cuda0.pt", "--json", code=1).stdout)
    assert doc["ok"] is False and doc["findings"][0]["id"] == "cuda-unavailable"
    assert doc["findings"][0]["hint"] == f"ckpttool move {FIXTURES / 'cuda0.pt'} cpu"


def test_truncated_and_unsafe_exit_codes(tmp_path: Path) -> None:
    path, _ = trained(tmp_path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:200])
    r = run("check", cut, code=3)
    assert r.stderr.startswith(f"Error: {cut}: ")
    r = run("check", FIXTURES / "unsafe_os_system.pt", code=4)
    assert "unsafe" in r.stdout.splitlines()[2]


def test_strict_and_clean_output(tmp_path: Path) -> None:
    r = run("check", FIXTURES / "imagenet_style.pth")
    assert r.stdout == "no findings\ncheck ok: 0 fail, 0 warn, 0 info\n"
    path = planted(tmp_path, lambda ck: ck["scheduler"].update(_last_lr=[0.5]))
    run("check", path)
    run("check", path, "--strict", code=1)


# ---------------------------------------------------------------- live model and optimizer

class Reordered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Linear(3, 2)  # registered first: parameters() order changes
        self.a = nn.Linear(4, 3)


def test_live_reordered_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("a", nn.Linear(4, 3))
    model.add_module("b", nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    sd = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    live = Reordered()
    live_opt = torch.optim.Adam(live.parameters())
    r = check(sd, live, live_opt)
    assert r.path == "<state dict in memory>"
    assert ids(r) == [("live-model-order", "/model"), ("live-order", "/optimizer/param_groups/0")]
    assert r.findings[1].message == (
        "group 0 lists its params in another order (position 0: b.weight now, a.weight saved; "
        "position 1: b.bias now, a.bias saved; position 2: a.weight now, b.weight saved; "
        "position 3: a.bias now, b.bias saved): their state would load onto the wrong params")
    with pytest.raises(CheckFailed, match="live-model-order at /model"):
        r.raise_for_problems()


def test_live_optimizer_with_one_group_more(tmp_path: Path) -> None:
    path, ck = trained(tmp_path)
    model = mlp()
    live = torch.optim.Adam([{"params": model[0].parameters()},
                             {"params": model[2].parameters()}])
    r = check(torch.load(path), model, live)
    assert ids(r) == [("live-groups", "/optimizer/param_groups")]


def test_live_layer_unfrozen_since_the_save(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    sd = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    for p in model[0].parameters():
        p.requires_grad_(True)
    live = torch.optim.Adam(model.parameters())
    r = check(sd, model, live)
    assert ids(r) == [("live-group-size", "/optimizer/param_groups/0")]
    assert r.findings[0].message == ("group 0 has 4 params now and 2 in the save (a layer "
                                     "unfrozen or added since?); the live group ends with "
                                     "2.weight, 2.bias")


def test_folder_checked_as_a_whole(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-4", folder)
    r = check(folder)
    assert r.ok and [f.id for f in r.findings] == ["weights-only"]


def test_scheduler_ahead_of_the_optimizer(tmp_path: Path) -> None:
    r = check(planted(tmp_path, lambda ck: ck["scheduler"].update(last_epoch=50)))
    assert ids(r, "WARN") == [("step-vs-scheduler", "/scheduler/last_epoch")]
    assert r.findings[0].message == ("the scheduler is at last_epoch 50 but the optimizer at "
                                     "step 3: the schedule ran ahead of the optimizer")


# ---------------------------------------------------------------- the CLI's load test without dynamo

EAGER_SCRIPT = r"""
import json, sys
import torch
from ckpttool.checks import check
from ckpttool.eager_torch import active, eager_only
assert "torch._dynamo" not in sys.modules
out = {}
with eager_only():
    for path in sys.argv[1:]:
        r = check(path)
        out[path] = [[f.id, f.level, f.pointer, f.message] for f in r.findings]
        out.setdefault("stand-in kept", []).append(active())
out["real dynamo imported"] = sorted(m for m in sys.modules if m.startswith("torch._dynamo."))
print(json.dumps(out))
"""


def test_cli_load_test_without_dynamo_matches_the_real_one(tmp_path: Path) -> None:
    """``ckpttool check`` runs torch.optim with a stand-in torch._dynamo (1.3 s and ~75 MB
    less): over a fixture of every optimizer class and a state torch refuses, the findings
    are those of the library run in this process, where the real dynamo is imported. The
    good fixtures need no retry with the real module; the refused state is retried with it
    (the stand-in is then gone) and gets torch's own error."""
    import subprocess
    import sys

    import torch._dynamo  # noqa: F401  (this process: the real one)

    def bad_exp_avg(ck: dict[str, Any]) -> None:
        ck["optimizer"]["state"][0]["exp_avg"] = torch.zeros(5)
    refused = planted(tmp_path, bad_exp_avg)
    paths = [str(FIXTURES / f["path"]) for f in MANIFEST
             if Path(f["path"]).name.startswith("optim_")] + [str(refused)]
    assert len(paths) == 20
    proc = subprocess.run([sys.executable, "-c", EAGER_SCRIPT, *paths], capture_output=True,
                          text=True, check=True)
    out = json.loads(proc.stdout)
    assert out.pop("stand-in kept") == [True] * 19 + [False]
    assert out.pop("real dynamo imported") != []  # the retry of the refused state imported it
    expected = {p: [[f.id, f.level, f.pointer, f.message] for f in check(p).findings]
                for p in paths}
    assert out == expected
    assert [f[0] for f in out[str(refused)] if f[1] == "FAIL"] == ["state-shape", "load-test"]


def test_deep_on_a_legacy_file(tmp_path: Path) -> None:
    """The pre-zip format has no CRCs, but its storages' values are checked."""
    _, ck = trained(tmp_path)
    ck["optimizer"]["state"][1]["exp_avg_sq"][0] = -1.0
    ck["model"]["2.bias"][1] = float("inf")
    path = tmp_path / "legacy.pt"
    torch.save(ck, path, _use_new_zipfile_serialization=False)
    assert ckpttool.open(path).files[0].format == "torch-legacy"
    r = check(path, deep=True)
    assert ids(r) == [("nan-inf", "/model/2.bias"),
                      ("negative-second-moment", "/optimizer/state/1/exp_avg_sq")]
    assert [f.message for f in r.findings] == ["1 value is NaN or Inf",
                                               "1 value of a second moment is negative"]


def test_load_test_on_a_name_keyed_state(tmp_path: Path) -> None:
    """torch's load_state_dict maps saved ids to params by position, whatever the ids: a
    name-keyed state (FSDP1's full optim state dict) gets the load test too."""
    _, ck = trained(tmp_path)
    names = list(ck["model"])
    osd = ck["optimizer"]
    osd["state"] = {names[k]: v for k, v in osd["state"].items()}
    osd["param_groups"][0]["params"] = [names[i] for i in osd["param_groups"][0]["params"]]
    path = tmp_path / "named.pt"
    torch.save(ck, path)
    assert check(path).findings == []
    del osd["state"]["2.bias"]["exp_avg_sq"]
    torch.save(ck, path)
    r = check(path)
    assert [(f.id, f.pointer, f.message) for f in r.findings] == [
        ("load-test", "/optimizer", "torch.optim.Adam over params of these shapes refuses the "
         "state: KeyError: 'exp_avg_sq'")]
