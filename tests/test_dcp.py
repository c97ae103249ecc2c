"""torch.distributed.checkpoint folders, made by the real DCP engine (dcp.save): read from
``.metadata`` with the restricted unpickler, optimizers found by parameter name, values of
the small entries read from the data files; never edited (yet); a hostile .metadata is judged
and nothing else of the folder is read."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ckpttool
from conftest import run


@pytest.fixture(scope="module")
def dcp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
    msd, osd = get_state_dict(model, opt)
    out = tmp_path_factory.mktemp("dcp") / "ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is not initialized": one process
        dcp.save({"model": msd, "optim": osd, "step": 7}, checkpoint_id=str(out))
    return out


def test_show_a_dcp_folder(dcp_dir: Path) -> None:
    r = run("show", dcp_dir)
    lines = r.stdout.splitlines()
    assert lines[1:2] == ["format:  dcp"]
    assert lines[4:9] == ["keys:", "  model  model state (4 tensors)",
                           "  optim  optimizer state (1 groups, 4 params with state)",
                           "  step   7",
                           "note:    a torch.distributed.checkpoint folder: .metadata and 1 data "
                           f"file (__0_0.distcp {(dcp_dir / '__0_0.distcp').stat().st_size} "
                           "bytes)"]
    assert lines[9] == "note:    16 tensors in 16 chunks (16 in __0_0.distcp)"
    doc = json.loads(run("show", "--json", dcp_dir).stdout)
    [opt] = doc["optimizers"]
    assert (opt["pointer"], opt["type"], opt["names_source"]) == (
        "/optim", "AdamW", "param ids (name-keyed)")
    assert opt["param_groups"][0]["hyperparameters"]["lr"] == 1e-3
    assert opt["param_groups"][0]["params"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    st = opt["state"][0]
    assert st["name"] == "0.weight"
    assert st["entries"]["step"]["value"] == 3.0
    assert st["entries"]["exp_avg"]["shape"] == [3, 4]
    [chunk] = st["entries"]["exp_avg"]["chunks"]
    assert (chunk["offsets"], chunk["sizes"], chunk["file"]) == ([0, 0], [3, 4], "__0_0.distcp")
    assert doc["safety"]["level"] == "needs-trust"
    assert not any(c["level"] == "unsafe" for c in doc["safety"]["calls"])


def test_check_a_dcp_folder(dcp_dir: Path) -> None:
    assert run("check", dcp_dir).stdout == "no findings\ncheck ok: 0 fail, 0 warn, 0 info\n"


def test_hostile_metadata(dcp_dir: Path, tmp_path: Path) -> None:
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(dcp_dir, bad)
    marker = tmp_path / "pwned"
    (bad / ".metadata").write_bytes(
        b"\x80\x02cposix\nsystem\nq\x00X" + len(f"touch {marker}").to_bytes(4, "little")
        + f"touch {marker}".encode() + b"\x85q\x01Rq\x02.")
    before = (bad / ".metadata").read_bytes()
    r = run("show", bad)
    assert r.stdout.splitlines()[3].startswith(
        "safety:  UNSAFE: loading it would run posix.system at / of .metadata")
    run("set-lr", bad, "0.1", code=4)
    run("check", bad, code=4)
    assert not marker.exists() and (bad / ".metadata").read_bytes() == before
    assert ckpttool.open(bad).optimizers == []


@pytest.fixture(scope="module")
def dcp2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import subprocess
    import sys
    out = tmp_path_factory.mktemp("dcp2") / "ckpt"
    subprocess.run([sys.executable, str(Path(__file__).with_name("make_dcp2.py")), str(out)],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def dcp2_loaded(dcp2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What torch itself loads from the unedited two-rank folder on two ranks (make_dcp2.py
    --load: dcp.load + set_state_dict, then the full state gathered on rank 0)."""
    import subprocess
    import sys
    out = tmp_path_factory.mktemp("dcp2load") / "full.pt"
    subprocess.run([sys.executable, str(Path(__file__).with_name("make_dcp2.py")), "--load",
                    str(dcp2_dir), str(out)], check=True, capture_output=True)
    return torch.load(out)


def test_two_rank_fsdp2_folder(dcp2_dir: Path) -> None:
    """Every tensor's global shape, dtype and chunks (offsets, sizes, file) are what torch's
    own metadata reader says; the state is found by name; check passes."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    meta = FileSystemReader(str(dcp2_dir)).read_metadata()  # torch's own reader: our file
    want = {}
    for fqn, md in meta.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            want[fqn] = (list(md.size), str(md.properties.dtype).removeprefix("torch."),
                         sorted((list(c.offsets), list(c.sizes),
                                 meta.storage_data[_index(meta, fqn, c.offsets)].relative_path)
                                for c in md.chunks))
    doc = json.loads(run("show", "--json", dcp2_dir).stdout)
    assert [m["pointer"] for m in doc["models"]] == ["/model", "/extra"]
    got = {}
    ckpt = ckpttool.open(dcp2_dir)
    for ptr, t in _tensors(ckpt.root):
        got[ptr] = (list(t.shape), t.dtype,
                    sorted((list(o), list(z), f) for o, z, f, _, _ in t.chunks))
    assert got == want
    assert any(len(v[2]) == 2 for v in got.values())  # really sharded across the two ranks
    [opt] = doc["optimizers"]
    assert [s["name"] for s in opt["state"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert {s["entries"]["step"]["value"] for s in opt["state"]} == {2.0}
    assert run("check", dcp2_dir).stdout == "no findings\ncheck ok: 0 fail, 0 warn, 0 info\n"


def _index(meta: Any, fqn: str, offsets: Any) -> Any:
    from torch.distributed.checkpoint.metadata import MetadataIndex
    return next(k for k in meta.storage_data
                if k == MetadataIndex(fqn, offsets) or (k.fqn == fqn and k.offset == offsets))


def _tensors(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    from ckpttool.formats.safetensors import SafeTensor
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _tensors(v, f"{prefix}.{i}")
    elif isinstance(node, SafeTensor):
        out.append((prefix, node))
    return out


def _state_dicts(flatten: bool) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-3},
                             {"params": model[2].parameters(), "lr": 1e-4}])
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(
        flatten_optimizer_state_dict=flatten))
    return {"model": msd, "optim": osd}


@pytest.mark.parametrize("flatten", [False, True])
def test_get_state_dict_files(tmp_path: Path, flatten: bool) -> None:
    """Name-keyed optimizer state as get_state_dict writes it, nested and flattened."""
    path = tmp_path / "sd.pt"
    torch.save(_state_dicts(flatten), path)
    doc = json.loads(run("show", "--json", path).stdout)
    [opt] = doc["optimizers"]
    assert (opt["type"], opt["flattened"]) == ("AdamW", flatten)
    assert [(g["params"], g["hyperparameters"]["lr"]) for g in opt["param_groups"]] == [
        (["0.weight", "0.bias"], 1e-3), (["2.weight", "2.bias"], 1e-4)]
    assert [s["name"] for s in opt["state"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert {s["entries"]["step"]["value"] for s in opt["state"]} == {1.0}
    assert run("check", path).stdout == "no findings\ncheck ok: 0 fail, 0 warn, 0 info\n"


def test_flattened_check_pointers_and_no_edit(tmp_path: Path) -> None:
    sd = _state_dicts(True)
    for fqn in ("2.weight", "2.bias"):
        sd["optim"][f"param_groups.{fqn}.eps"] = -1.0
    path = tmp_path / "flat.pt"
    torch.save(sd, path)
    r = ckpttool.check(path)
    assert [(f.id, f.pointer) for f in r.findings] == [
        ("hyperparameter-range", "/optim/param_groups.2.weight.eps")]
    e = run("set-lr", path, "0.1", code=1)
    assert e.stderr == (
        f"Error: {path}: the optimizer state at /optim is in the flattened form "
        "(flatten_optimizer_state_dict=True): ckpttool reads it but does not edit it yet; save "
        "it again with get_state_dict(...) without flatten_optimizer_state_dict, then edit that "
        "file\n")


def test_fsdp2_dtensor_file(tmp_path: Path) -> None:
    """A torch.save of an FSDP2 model and optimizer (every tensor a DTensor): read as tensors
    with global and local shapes, placements and mesh; names by model alignment; set-lr edits
    it and torch loads the result; new sharded tensors and device moves are refused."""
    import shutil
    src = Path(__file__).parent / "security" / "fsdp2_dtensor.pt"  # tests/security/make_dtensor.py
    path = tmp_path / "fsdp2.pt"
    shutil.copy(src, path)
    doc = json.loads(run("show", "--json", path).stdout)
    [opt] = doc["optimizers"]
    assert [s["name"] for s in opt["state"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert opt["state"][0]["entries"]["exp_avg"]["dtensor"] == {
        "global_shape": [4, 3], "local_shape": [4, 3], "placements": ["Shard(0)"],
        "mesh_device": "cpu"}
    assert doc["storages"]["count"] == 17  # the mesh's rank map inside the spec counted too
    assert [f.id for f in ckpttool.check(path).findings] == ["weights-only"]
    assert run("set-lr", path, "1e-4").stdout == (
        "set-lr: lr 0.0001 in optimizer /optimizer (group 0 x0.1); no scheduler; 1 value "
        f"changed; wrote {path}\n")
    import torch.distributed.tensor  # noqa: F401  (DTensor's classes, to load our own file)
    loaded = torch.load(path, weights_only=False)
    assert loaded["optimizer"]["param_groups"][0]["lr"] == 1e-4
    orig = torch.load(src, weights_only=False)
    for k, v in orig["optimizer"]["state"][0].items():
        assert torch.equal(loaded["optimizer"]["state"][0][k].to_local(), v.to_local()) \
            if hasattr(v, "to_local") else torch.equal(loaded["optimizer"]["state"][0][k], v)
    r = run("convert", path, "--to", "sgd", "--set", "momentum=0.9", code=1)
    assert r.stderr == (
        f"Error: {path}: the state holds DTensors (FSDP2 / tensor parallel): making new sharded "
        "tensors is not supported yet; convert or add state before sharding, or on a full state "
        "dict (get_state_dict with full_state_dict=True)\n")
    r = run("move", path, "cuda:0", code=1)
    assert r.stderr == (
        f"Error: {path}: /model/0.weight is a DTensor: its device is its mesh's (the wrapper and "
        "the DeviceMesh name a device too); moving sharded state is not supported yet; move it "
        "with torch after loading on the target mesh, or save a full state dict "
        "(full_state_dict=True) and move that\n")


# ------------------------------------------------------------------------- editing DCP folders

def _sched_model() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-3},
                             {"params": model[2].parameters(), "lr": 1e-4}])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


@pytest.fixture(scope="module")
def dcp_sched_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two param groups, a StepLR, three steps; saved by dcp.save from get_state_dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model, opt, sched = _sched_model()
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        sched.step()
    msd, osd = get_state_dict(model, opt)
    out = tmp_path_factory.mktemp("dcps") / "ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": msd, "optim": osd, "sched": sched.state_dict(), "step": 3},
                 checkpoint_id=str(out))
    return out


def _resume(folder: Path) -> tuple[dict[str, Any], list[float]]:
    """Resume from ``folder`` the way a training script does (dcp.load into the
    get_state_dict layout, set_state_dict, the scheduler's load_state_dict), take one step;
    return the loaded state dict and the lr each group used in that step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model, opt, sched = _sched_model()
    model(torch.ones(2, 4)).sum().backward()
    opt.step()  # state to load into
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd, "sched": sched.state_dict(), "step": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, checkpoint_id=str(folder))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    sched.load_state_dict(sd["sched"])
    used = [g["lr"] for g in opt.param_groups]
    import copy
    sd = copy.deepcopy(sd)  # as loaded (the step below changes the live tensors)
    opt.zero_grad()
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    sched.step()
    return sd, used


def _same_tensors(a: Any, b: Any, ordered: bool = True) -> None:
    if isinstance(a, dict):
        assert list(a) == list(b) if ordered else sorted(a) == sorted(b)
        for k in a:
            _same_tensors(a[k], b[k], ordered)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_set_lr_on_a_dcp_folder_resumes(dcp_sched_dir: Path, tmp_path: Path) -> None:
    """set-lr rewrites only the param-group and scheduler values: a new data file, then a new
    .metadata; the tensors' data file is untouched; dcp.load + set_state_dict resumes with the
    new lr and every tensor as it was."""
    import shutil
    folder = tmp_path / "ckpt"
    shutil.copytree(dcp_sched_dir, folder)
    data = (folder / "__0_0.distcp").read_bytes()
    before, used_before = _resume(folder)
    assert used_before == [5e-4, 5e-5]  # StepLR halved both after two steps
    r = run("set-lr", folder, "1e-3", "--keep-ratios")
    assert r.stdout == (
        "set-lr: largest lr 0.001, ratios kept in optimizer /optim (groups 0, 1 x2); scheduler "
        "/sched (StepLR) scaled to match; 8 values changed; wrote "
        f"{folder} (.metadata replaced; 6 values written to __ckpttool_0.distcp)\n")
    assert _listing(folder) == [".metadata", "__0_0.distcp", "__ckpttool_0.distcp"]
    assert (folder / "__0_0.distcp").read_bytes() == data
    after, used = _resume(folder)
    assert used == [1e-3, 1e-4]
    assert after["sched"]["base_lrs"] == [2e-3, 2e-4]
    assert after["optim"]["param_groups"][0]["initial_lr"] == 2e-3
    _same_tensors(before["model"], after["model"])
    _same_tensors(before["optim"]["state"], after["optim"]["state"])
    assert after["step"] == 3
    # a second edit of the same values leaves the first edit's data file unused: removed
    r = run("set", folder, "weight_decay=0.05")
    assert r.stdout.endswith(f"wrote {folder} (.metadata replaced; 2 values written to "
                             "__ckpttool_1.distcp)\n")
    r = run("set-lr", folder, "3e-4", "--same")
    assert r.stdout.endswith(
        f"wrote {folder} (.metadata replaced; 6 values written to __ckpttool_2.distcp; "
        "__ckpttool_0.distcp no longer used and removed)\n")
    assert _listing(folder) == [".metadata", "__0_0.distcp", "__ckpttool_1.distcp",
                                "__ckpttool_2.distcp"]
    after, used = _resume(folder)
    assert used == [3e-4, 3e-4]
    assert [g["weight_decay"] for g in after["optim"]["param_groups"]] == [0.05, 0.05]
    _same_tensors(before["model"], after["model"])
    doc = json.loads(run("show", "--json", folder).stdout)
    assert [g["hyperparameters"]["lr"] for g in doc["optimizers"][0]["param_groups"]] == [
        3e-4, 3e-4]
    assert run("check", folder).stdout == "no findings\ncheck ok: 0 fail, 0 warn, 0 info\n"


def test_dcp_output_folder_and_refusals(dcp_sched_dir: Path, tmp_path: Path) -> None:
    """-o writes a whole new folder and leaves the source as it was; move says why there is
    nothing to move; convert is refused with what to do instead."""
    import shutil
    src = tmp_path / "src"
    shutil.copytree(dcp_sched_dir, src)
    snapshot = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "out"
    r = run("set-lr", src, "2e-3", "--keep-ratios", "-o", out)
    assert r.stdout.endswith(f"wrote {out} (.metadata replaced; 6 values written to "
                             "__ckpttool_0.distcp; 1 file copied as they were)\n")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == snapshot
    assert _listing(out) == [".metadata", "__0_0.distcp", "__ckpttool_0.distcp"]
    assert _resume(out)[1] == [2e-3, 2e-4]
    r = run("move", src, "cuda:0", "-o", tmp_path / "moved")
    assert r.stdout == (
        "move: a DCP folder stores its 16 tensors without a device (dcp.load puts each one on "
        f"the device of the state dict it loads into); no changes; {tmp_path / 'moved'} is a "
        "copy\n")
    assert {p.name: p.read_bytes() for p in (tmp_path / "moved").iterdir()} == snapshot
    r = run("sanitize", src, "--dry-run", code=1)
    assert r.stderr == (
        f"Error: {src}: a torch.distributed.checkpoint folder is loaded by dcp.load, not by "
        "torch.load; sanitize rewrites torch.save files; `ckpttool to-file` it and sanitize the "
        "file\n")
    r = run("convert", src, "--to", "sgd", code=1)
    assert r.stderr == (
        f"Error: {src}: convert makes and reshapes state tensors, and a DCP folder's tensors are "
        "chunks spread over its ranks' files: convert is not done in place on DCP folders; "
        "`ckpttool to-file` it, convert the file, and `ckpttool to-dcp` the result\n")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == snapshot


def test_dcp_edit_crash_before_commit(dcp_sched_dir: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure at the commit (the rename of the new .metadata) leaves the folder exactly as
    it was: the new data file is removed again and the old .metadata still loads."""
    import os
    import shutil

    import ckpttool.dcp_save as dcp_save
    folder = tmp_path / "ckpt"
    shutil.copytree(dcp_sched_dir, folder)
    snapshot = {p.name: p.read_bytes() for p in folder.iterdir()}

    def no_rename(a: str, b: str) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(dcp_save.os, "replace", no_rename)
    r = run("set-lr", folder, "1e-2", "--same", code=5)
    assert r.stderr == (f"Error: {folder}: could not write the folder (No space left on "
                        "device); the checkpoint is unchanged\n")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == snapshot
    monkeypatch.setattr(dcp_save.os, "replace", os.replace)
    assert _resume(folder)[1] == [5e-4, 5e-5]


def test_merge_groups_on_a_dcp_folder(dcp_sched_dir: Path, tmp_path: Path) -> None:
    """merge-groups only changes non-tensor values (the groups' lists and hyperparameters):
    group 1's keys leave .metadata and the merged folder resumes into a one-group optimizer."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    folder = tmp_path / "ckpt"
    shutil.copytree(dcp_sched_dir, folder)
    r = run("merge-groups", folder, "--set", "lr=1e-4", "--no-scheduler")
    assert r.stdout == (
        "merge-groups: groups 0, 1 of optimizer /optim merged into group 0 (4 params, in model "
        f"order); wrote {folder} (.metadata replaced; 3 values written to __ckpttool_0.distcp; "
        "13 keys removed)\n")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, checkpoint_id=str(folder))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    assert [g["lr"] for g in opt.param_groups] == [1e-4]
    assert opt.state[model[2].weight]["step"].item() == 3.0


def test_two_rank_folder_edit_loads_on_two_ranks(dcp2_dir: Path, dcp2_loaded: dict[str, Any],
                                                 tmp_path: Path) -> None:
    """set-lr on the FSDP2 folder; dcp.load on two ranks (gloo) resumes with the new lr and
    every gathered tensor equal to the unedited folder's."""
    import shutil
    import subprocess
    import sys
    folder = tmp_path / "ckpt"
    shutil.copytree(dcp2_dir, folder)
    run("set-lr", folder, "2e-4")
    subprocess.run([sys.executable, str(Path(__file__).with_name("make_dcp2.py")), "--load",
                    str(folder), str(tmp_path / "after.pt")], check=True, capture_output=True)
    before, after = dcp2_loaded, torch.load(tmp_path / "after.pt")
    assert (before["lrs"], after["lrs"]) == ([1e-3], [2e-4])
    _same_tensors(before["model"], after["model"])
    _same_tensors(before["optim"]["state"], after["optim"]["state"])
    assert after["optim"]["param_groups"][0]["lr"] == 2e-4


def test_edits_on_name_keyed_files(tmp_path: Path) -> None:
    """set-lr, set, move, merge-groups and convert on get_state_dict's name-keyed layout;
    each result resumes through set_state_dict into the optimizer the edit asked for."""
    from torch.distributed.checkpoint.state_dict import set_state_dict
    path = tmp_path / "sd.pt"
    torch.save(_state_dicts(False), path)

    def resume(file: Path, make: Any) -> tuple[torch.optim.Optimizer, nn.Module]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        opt = make(model)
        sd = torch.load(file, map_location="cpu")
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        return opt, model

    def two_groups(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW([{"params": model[0].parameters()},
                                  {"params": model[2].parameters()}])

    out = tmp_path / "lr.pt"
    run("set-lr", path, "1e-2", "--same", "-o", out)
    opt, model = resume(out, two_groups)
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-2]
    assert opt.state[model[0].weight]["step"].item() == 2.0
    out = tmp_path / "wd.pt"
    run("set", path, "weight_decay=0.1", "--group", "1", "-o", out)
    opt, _ = resume(out, two_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.1]
    out = tmp_path / "cuda.pt"
    run("move", path, "cuda:1", "-o", out)
    assert _locations(out) == {"cuda:1", "cpu"}  # steps stay on the cpu
    out = tmp_path / "merged.pt"
    run("merge-groups", path, "--set", "lr=1e-3", "-o", out)
    opt, model = resume(out, lambda m: torch.optim.AdamW(m.parameters()))
    assert [g["lr"] for g in opt.param_groups] == [1e-3]
    assert opt.state[model[2].bias]["step"].item() == 2.0
    out = tmp_path / "sgd.pt"
    run("convert", path, "--to", "sgd", "--set", "momentum=0.9", "-o", out)
    sd = torch.load(out)
    assert sorted(sd["optim"]["state"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert torch.equal(sd["optim"]["state"]["0.weight"]["momentum_buffer"],
                       torch.load(path)["optim"]["state"]["0.weight"]["exp_avg"])
    opt, model = resume(out, lambda m: torch.optim.SGD([{"params": m[0].parameters()},
                                                        {"params": m[2].parameters()}],
                                                       lr=0.1, momentum=0.9))
    assert type(opt).__name__ == "SGD" and [g["lr"] for g in opt.param_groups] == [1e-3, 1e-4]


def _locations(path: Path) -> set[str]:
    """The device every storage of a file is saved on (read by torch.load's map_location
    hook, so no GPU is needed)."""
    seen: set[str] = set()

    def loc(storage: Any, location: str) -> Any:
        seen.add(location)
        return storage
    torch.load(path, map_location=loc)
    return seen


# ------------------------------------------------------------------ to-file and to-dcp

def test_to_file_of_a_two_rank_folder(dcp2_dir: Path, dcp2_loaded: dict[str, Any],
                                      tmp_path: Path) -> None:
    """to-file gathers every tensor from both ranks' chunks (rows and columns) into one file
    that torch.load(weights_only=True) loads, equal to what torch itself gathers on two ranks,
    and that resumes a one-process run through Optimizer.load_state_dict."""
    import subprocess
    import sys
    out = tmp_path / "full.pt"
    r = run("to-file", dcp2_dir, out)
    assert r.stdout == (f"to-file: 17 tensors gathered from {dcp2_dir}, 12 other values kept; "
                        "optimizer /optim keyed by id (names in param_names); wrote "
                        f"{out} ({out.stat().st_size} bytes)\n")
    sd = torch.load(out, weights_only=True)
    ref = dcp2_loaded
    _same_tensors(ref["model"], sd["model"])
    names = sd["optim"]["param_groups"][0]["param_names"]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert sd["optim"]["param_groups"][0]["params"] == [0, 1, 2, 3]
    for i, name in enumerate(names):  # torch's gathered state orders a param's entries otherwise
        _same_tensors(ref["optim"]["state"][name], sd["optim"]["state"][i], ordered=False)
    assert torch.equal(sd["extra"]["col"], torch.arange(24.0).reshape(4, 6))
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    model.load_state_dict(sd["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    opt.load_state_dict(sd["optim"])
    model(torch.ones(3, 4)).sum().backward()
    opt.step()
    assert opt.param_groups[0]["lr"] == 1e-3
    assert opt.state[model[0].weight]["step"].item() == 3.0


def test_to_file_and_back_to_dcp(dcp_sched_dir: Path, tmp_path: Path) -> None:
    """DCP -> file -> DCP: the file resumes with torch.load + load_state_dict, equals
    torch's own dcp_to_torch_save tensor for tensor, and the folder made from it resumes
    through dcp.load exactly like the original folder."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    f = tmp_path / "one.pt"
    run("to-file", dcp_sched_dir, f)
    sd = torch.load(f, weights_only=True)
    ref = tmp_path / "ref.pt"
    dcp_to_torch_save(str(dcp_sched_dir), str(ref))
    want = torch.load(ref, weights_only=True)
    _same_tensors(want["model"], sd["model"])
    order = [n for g in want["optim"]["param_groups"] for n in g["params"]]
    for i, name in enumerate(order):  # format_utils orders a param's entries otherwise
        _same_tensors(want["optim"]["state"][name], sd["optim"]["state"][i], ordered=False)
    model, opt, sched = _sched_model()
    model.load_state_dict(sd["model"])
    opt.load_state_dict(sd["optim"])
    sched.load_state_dict(sd["sched"])
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 5e-5]
    back = tmp_path / "back"
    r = run("to-dcp", f, back)
    assert r.stdout == (
        "to-dcp: 16 tensors and 35 other values written; optimizer /optim keyed by parameter "
        f"name; wrote {back} (.metadata and __0_0.distcp, "
        f"{sum(p.stat().st_size for p in back.iterdir())} bytes)\n")
    original, used = _resume(dcp_sched_dir)
    again, used_again = _resume(back)
    assert used_again == used
    _same_tensors(original["model"], again["model"])
    _same_tensors(original["optim"]["state"], again["optim"]["state"])
    assert again["sched"] == original["sched"] and again["step"] == 3


def test_to_dcp_names_from_the_model_or_a_list(tmp_path: Path) -> None:
    """A classic id-keyed checkpoint: names from aligning the model state; an optimizer-only
    file needs --model-order, and says so."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model, opt, _ = _sched_model()
    train_steps_here(model, opt)
    path = tmp_path / "classic.pt"
    torch.save({"epoch": 3, "model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    out = tmp_path / "dcp"
    run("to-dcp", path, out)
    m2, o2, _ = _sched_model()
    train_steps_here(m2, o2, 1)
    msd, osd = get_state_dict(m2, o2)
    sd = {"epoch": 0, "model": msd, "optimizer": osd}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, checkpoint_id=str(out))
    set_state_dict(m2, o2, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
    assert sd["epoch"] == 3
    for p, q in zip(model.parameters(), m2.parameters()):
        assert torch.equal(p, q)
        _same_tensors(opt.state[p], o2.state[q])
    only = tmp_path / "optim_only.pt"
    torch.save(opt.state_dict(), only)
    r = run("to-dcp", only, tmp_path / "o", code=1)
    assert r.stderr == (
        f"Error: {only}: the parameter names of optimizer / are not known (no param_names "
        "stored and no model state in the checkpoint); a DCP checkpoint keys optimizer state by name; "
        "pass --model-order FILE: the names in the optimizer's param order, one per line (e.g. "
        "from [n for n, _ in model.named_parameters()])\n")
    order = tmp_path / "names.txt"
    order.write_text("\n".join(n for n, _ in model.named_parameters()) + "\n")
    run("to-dcp", only, tmp_path / "o", "--model-order", order)
    doc = json.loads(run("show", "--json", tmp_path / "o").stdout)
    assert [s["name"] for s in doc["optimizers"][0]["state"]] == [
        "0.weight", "0.bias", "2.weight", "2.bias"]


def train_steps_here(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()


def test_to_file_refuses_hostile_chunks(dcp_dir: Path, tmp_path: Path) -> None:
    """A chunk archive whose pickle would run code: judged before anything is written."""
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(dcp_dir, bad)
    data = bytearray((bad / "__0_0.distcp").read_bytes())
    # the first tensor chunk's data.pkl: replaced by a same-length pickle calling os.system
    ckpt = ckpttool.open(bad)
    t = ckpt.resolve("/model/0.weight")
    _, _, file, off, length = t.chunks[0]
    import zipfile
    import io
    z = zipfile.ZipFile(io.BytesIO(bytes(data[off:off + length])))
    info = z.getinfo("archive/data.pkl")
    local = off + info.header_offset
    start = local + 30 + int.from_bytes(data[local + 26:local + 28], "little") \
        + int.from_bytes(data[local + 28:local + 30], "little")
    evil = b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00trueR."
    evil += b"." * (info.file_size - len(evil))  # padding after STOP: never read
    data[start:start + info.file_size] = evil
    (bad / "__0_0.distcp").write_bytes(bytes(data))
    out = tmp_path / "out.pt"
    r = run("to-file", bad, out, code=4)
    assert r.stderr.startswith(f"Error: {bad}: refusing to convert: the chunk of "
                               "model.0.weight in __0_0.distcp: UNSAFE: loading it would run "
                               "posix.system")
    assert not out.exists()


def test_check_deep_reads_every_rank_s_chunks(dcp2_dir: Path, tmp_path: Path) -> None:
    """check --deep reads every archive of every data file: CRCs, and the values of params and
    optimizer state (a negative second moment on rank 0, a NaN weight on rank 1)."""
    import os
    import shutil
    import struct

    from ckpttool.checkpoint import _read_zip
    folder = tmp_path / "ckpt"
    shutil.copytree(dcp2_dir, folder)
    assert run("check", "--deep", folder).stdout == (
        "no findings\ncheck ok: 0 fail, 0 warn, 0 info\n")
    ckpt = ckpttool.open(folder)
    where = {}
    for ptr, chunk, value in (("/optim/state/0.weight/exp_avg_sq", 0, -1.0),
                              ("/model/0.weight", 1, float("nan"))):
        _, _, file, off, length = ckpt.resolve(ptr).chunks[chunk]
        fp = str(folder / file)
        fd = os.open(fp, os.O_RDONLY)
        try:
            rec = _read_zip(fp, file, fd, off + length).archive.records["data/0"]
        finally:
            os.close(fd)
        with open(fp, "r+b") as fh:
            fh.seek(rec.data_offset)
            fh.write(struct.pack("<f", value))
        where[ptr] = (rec.data_offset, fp)
    r = run("check", "--deep", folder, code=1)
    (o1, f1), (o2, f2) = where["/optim/state/0.weight/exp_avg_sq"], where["/model/0.weight"]
    doc = json.loads(run("check", "--deep", "--json", folder, code=1).stdout)
    assert [(f["id"], f["pointer"], f["message"]) for f in doc["findings"]] == [
        ("crc", "/optim/state/0.weight/exp_avg_sq", f"record data/0 (at byte {o1}) of {f1} fails "
         "its CRC check: its bytes changed after the save (torch.load does not check)"),
        ("negative-second-moment", "/optim/state/0.weight/exp_avg_sq",
         "1 value of a second moment is negative"),
        ("crc", "/model/0.weight", f"record data/0 (at byte {o2}) of {f2} fails its CRC check: "
         "its bytes changed after the save (torch.load does not check)"),
        ("nan-inf", "/model/0.weight", "1 value is NaN or Inf")]
    assert r.stdout.splitlines()[-1] == "check FAILED: 4 fail, 0 warn, 0 info"


def test_dcp_backup_stays_loadable(dcp_sched_dir: Path, tmp_path: Path) -> None:
    """--backup keeps .metadata.bak; later edits never remove a data file it references, so
    putting it back restores the checkpoint it was."""
    import shutil
    folder = tmp_path / "ckpt"
    shutil.copytree(dcp_sched_dir, folder)
    run("set-lr", folder, "1e-3", "--keep-ratios")  # lr values -> __ckpttool_0
    r = run("set", folder, "weight_decay=0.05", "--backup")  # .bak references __ckpttool_0
    assert r.stdout.endswith("the original .metadata is kept as .metadata.bak)\n")
    run("set-lr", folder, "3e-4", "--same")  # moves the lr values on: __ckpttool_0 unused
    assert _listing(folder) == [".metadata", ".metadata.bak", "__0_0.distcp",
                                "__ckpttool_0.distcp", "__ckpttool_1.distcp",
                                "__ckpttool_2.distcp"]
    assert _resume(folder)[1] == [3e-4, 3e-4]
    restored = tmp_path / "restored"
    shutil.copytree(folder, restored)
    (restored / ".metadata.bak").replace(restored / ".metadata")
    sd, used = _resume(restored)
    assert used == [1e-3, 1e-4]
    assert [g["weight_decay"] for g in sd["optim"]["param_groups"]] == [0.01, 0.01]


def test_show_stats_of_a_two_rank_folder(dcp2_dir: Path, dcp2_loaded: dict[str, Any]) -> None:
    """show --stats gathers each state tensor from both ranks' chunks: the numbers are those
    of the tensors torch itself gathers."""
    doc = json.loads(run("show", "--json", "--stats", dcp2_dir).stdout)
    [opt] = doc["optimizers"]
    seen = 0
    for st in opt["state"]:
        for key, entry in st["entries"].items():
            ref = dcp2_loaded["optim"]["state"][st["name"]][key].double()
            assert entry["stats"] == {
                "norm": pytest.approx(float(torch.linalg.vector_norm(ref)), rel=1e-12),
                "min": pytest.approx(float(ref.min()), rel=1e-12),
                "max": pytest.approx(float(ref.max()), rel=1e-12),
                "mean": pytest.approx(float(ref.mean()), rel=1e-12),
                "nan": 0, "inf": 0}, (st["name"], key)
            seen += 1
    assert seen == 12


def test_diff_of_dcp_folders(dcp_sched_dir: Path, tmp_path: Path) -> None:
    """diff compares DCP tensors chunk by chunk by the CRCs of their records (no tensor byte
    read) and, with --values, from their gathered bytes; a folder and its to-file / to-dcp
    round trip are equal."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    edited = tmp_path / "edited"
    shutil.copytree(dcp_sched_dir, edited)
    run("set-lr", edited, "1e-3", "--keep-ratios")
    r = run("diff", dcp_sched_dir, edited, code=1)
    assert r.stdout.splitlines()[-1] == (
        "8 differences (8 values); 16 tensors compared: 13 by their values (tiny), 3 by "
        "CRC-32, 0 by reading bytes; 0 B read")
    one, back = tmp_path / "one.pt", tmp_path / "back"
    run("to-file", dcp_sched_dir, one)
    run("to-dcp", one, back)
    # the file keys the optimizer by id (with param_names): the same params, keyed otherwise
    assert run("diff", dcp_sched_dir, one, code=1).stdout == (
        "pointer    change    before                   after\n"
        "---------  --------  -----------------------  ------------\n"
        "(root)     safety    needs-trust              weights-only\n"
        "/optim     rekey     keyed by parameter name  keyed by id\n"
        "note: formats differ (dcp and torch-zip): contents compared\n"
        "2 differences (1 safety level, 1 optimizers keyed otherwise); 16 tensors compared: 13 "
        "by their values (tiny), 0 by CRC-32, 3 by reading bytes; 288 B read\n")
    assert run("diff", dcp_sched_dir, back).stdout == (
        "no differences; 16 tensors compared: 13 by their values (tiny), 3 by CRC-32, 0 by "
        "reading bytes; 0 B read\n")
    # one more training step on another input, saved the same way
    model, opt, sched = _sched_model()
    sd = _resume(dcp_sched_dir)[0]
    import copy
    from torch.distributed.checkpoint.state_dict import set_state_dict
    loaded = copy.deepcopy(sd)  # set_state_dict keeps these very tensors, which the step changes
    set_state_dict(model, opt, model_state_dict=loaded["model"],
                   optim_state_dict=loaded["optim"])
    opt.zero_grad()
    model(torch.linspace(-1, 1, 8).reshape(2, 4)).pow(2).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    later = tmp_path / "later"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": msd, "optim": osd, "sched": sd["sched"], "step": 3},
                 checkpoint_id=str(later))
    want = {f"/model/{k}" for k, v in sd["model"].items() if not torch.equal(v, msd[k])}
    want |= {f"/optim/state/{n}/{k}" for n, st in sd["optim"]["state"].items()
             for k, v in st.items() if k != "step" and not torch.equal(v, osd["state"][n][k])}
    assert len(want) == 12  # four weights and biases, their exp_avg and exp_avg_sq
    doc = json.loads(run("diff", "--json", "--values", dcp_sched_dir, later, code=1).stdout)
    by = {d["pointer"]: d for d in doc["differences"]}
    assert {p for p in by if p.startswith(("/model/", "/optim/state/"))
            and not p.endswith("/step")} == want
    w = by["/model/0.weight"]
    assert w["kind"] == "bytes"
    before = sd["model"]["0.weight"].double()
    after = msd["0.weight"].detach().double()
    assert w["values"]["max_abs"] == pytest.approx(float((after - before).abs().max()),
                                                   rel=1e-6)
    assert w["values"]["norm_before"] == pytest.approx(float(before.norm()), rel=1e-6)
    # the tensors of more than 8 elements are told apart by their chunks' CRCs (no byte read
    # to decide), then their values computed from their gathered bytes
    big = [d for d in doc["differences"] if d["kind"] == "bytes"]
    assert doc["compared"]["by_crc"] == 3 and doc["compared"]["by_bytes"] == 0
    assert doc["compared"]["bytes_read"] == sum(2 * 12 * 4 for _ in big)




def test_to_file_and_to_dcp_refusals(dcp_dir: Path, tmp_path: Path) -> None:
    from conftest import FIXTURES
    f = FIXTURES / "imagenet_style.pth"
    assert run("to-file", f, tmp_path / "x.pt", code=1).stderr == (
        f"Error: {f}: not a torch.distributed.checkpoint folder (no .metadata); to-dcp writes a "
        "DCP folder from a file\n")
    d = FIXTURES / "hf_trainer" / "checkpoint-4"
    assert run("to-dcp", d, tmp_path / "d", code=1).stderr == (
        f"Error: {d}: to-dcp converts one torch.save file; a DCP folder is already one; for a "
        "Trainer or accelerate folder give its model or optimizer file\n")
    u = FIXTURES / "unsafe_exec.pt"
    run("to-dcp", u, tmp_path / "u", code=4)
    out = tmp_path / "one.pt"
    out.write_bytes(b"keep")
    assert run("to-file", dcp_dir, out, code=1).stderr == (
        f"Error: {out}: already exists; use --force to overwrite it\n")
    assert out.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.pt"]
    run("to-file", dcp_dir, out, "--force")
    assert torch.load(out, weights_only=True)["step"] == 7


def _zlib_extension() -> Any:
    """A DCP stream transform (what _extensions=[ZStandard()] does), in zlib."""
    import io
    import zlib

    from torch.distributed.checkpoint._extension import StreamTransformExtension

    class Zlib(StreamTransformExtension):
        @staticmethod
        def registry_name() -> str:
            return "stream.zlibtest"

        @staticmethod
        def from_descriptor(version: str) -> Any:
            return Zlib()

        def get_descriptor(self) -> str:
            return f"{self.registry_name()}/1"

        def transform_to(self, output: Any) -> Any:
            class Writer(io.RawIOBase):
                def __init__(self) -> None:
                    self.c = zlib.compressobj()

                def writable(self) -> bool:
                    return True

                def write(self, b: Any) -> int:
                    output.write(self.c.compress(bytes(b)))
                    return len(b)

                def close(self) -> None:
                    if not self.closed:
                        output.write(self.c.flush())
                    super().close()
            return Writer()

        def transform_from(self, input: Any) -> Any:
            return io.BytesIO(zlib.decompress(input.read()))
    return Zlib()


def test_stream_transformed_values_are_not_judged(tmp_path: Path) -> None:
    """A folder saved through a stream transform (DCP _extensions): its compressed values are
    not read; the verdict, a note and check say they are not judged; nothing writes from it."""
    from torch.distributed.checkpoint import FileSystemWriter
    import torch.distributed.checkpoint as dcp
    folder = tmp_path / "z"
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": 3},
                 storage_writer=FileSystemWriter(str(folder), _extensions=[_zlib_extension()]))
    lines = run("show", folder).stdout.splitlines()
    assert lines[3].endswith("; 11 values not read and not judged: optim.param_groups.0.lr "
                             "(stream.zlibtest/1), optim.param_groups.0.momentum "
                             "(stream.zlibtest/1), optim.param_groups.0.dampening "
                             "(stream.zlibtest/1) ...")
    assert ("note:    13 entries are stored through stream transforms (stream.zlibtest/1: "
            "compression or encryption) that ckpttool does not decode; 11 values among them "
            "are not read (shown as None)") in lines
    r = run("check", folder)
    assert r.stdout.splitlines()[-1] == "check ok: 0 fail, 1 warn, 0 info"
    [finding] = json.loads(run("check", "--json", folder).stdout)["findings"]
    assert (finding["id"], finding["level"], finding["message"]) == (
        "not-judged", "WARN", "11 values stored through stream transforms (compression, "
        "encryption) that ckpttool does not decode could not be read, so not judged: "
        "optim.param_groups.0.lr (stream.zlibtest/1), optim.param_groups.0.momentum "
        "(stream.zlibtest/1), optim.param_groups.0.dampening (stream.zlibtest/1), "
        "optim.param_groups.0.weight_decay (stream.zlibtest/1) ...")
    deep = json.loads(run("check", "--deep", "--json", folder).stdout)["findings"]
    assert [(f["id"], f["message"]) for f in deep][1:] == [
        ("not-judged", "--deep did not read 13 entries stored through stream transforms "
         "(compression, encryption) that ckpttool does not decode")]
    r = run("set-lr", folder, "0.01", code=1)
    assert r.stderr.startswith(f"Error: {folder}: 11 values of this DCP folder are stored "
                               "through stream transforms ckpttool does not decode")
    run("to-file", folder, tmp_path / "x.pt", code=1)
    assert not (tmp_path / "x.pt").exists()


def test_a_dcp_folder_in_a_run(dcp_sched_dir: Path, tmp_path: Path) -> None:
    """A run folder holding a DCP checkpoint and its to-file copy: both rows read the
    optimizer's step and lrs (a DCP step is a tensor read from its chunk)."""
    import shutil
    shutil.copytree(dcp_sched_dir, tmp_path / "step-3")
    run("to-file", dcp_sched_dir, tmp_path / "step-3.pt")
    doc = json.loads(run("show", "--json", tmp_path).stdout)
    rows = {c["path"]: c for c in doc["checkpoints"]}
    assert sorted(rows) == ["step-3.pt", "step-3/"]
    for c in rows.values():
        assert [(o["type"], o["step"], o["lrs"]) for o in c["optimizers"]] == [
            ("AdamW", 3.0, [5e-4, 5e-5])]
        assert c["step"] == 3
