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


def test_check_and_edit_a_dcp_folder(dcp_dir: Path) -> None:
    assert run("check", dcp_dir).stdout == "no findings\ncheck ok: 0 fail, 0 warn, 0 info\n"
    r = run("set-lr", dcp_dir, "0.1", code=1)
    assert r.stderr == (f"Error: {dcp_dir}: editing a torch.distributed.checkpoint folder is not "
                        "supported yet; ckpttool show and check read it; to edit, load it with "
                        "torch.distributed.checkpoint.format_utils.dcp_to_torch_save\n")


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
    assert [m["pointer"] for m in doc["models"]] == ["/model"]
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
