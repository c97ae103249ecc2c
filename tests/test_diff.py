"""``ckpttool diff``: differences by pointer, checked against torch's own view of the same
files; tensor bytes by CRC-32 (computed where records have none), views by their own bytes,
optimizer state matched by name; every edit's --dry-run and the diff of its result agree."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpttool
from ckpttool.diff import Difference, diff
from ckpttool.edits import ABSENT
from conftest import FIXTURES, run, train_steps

ROOT = Path(__file__).resolve().parents[1]
LOOP = FIXTURES / "runs" / "loop"


def _torch_differences(a: Any, b: Any, ptr: str = "") -> list[str]:
    """Pointers of the leaves that differ between two torch.load results (tensors by
    torch.equal, everything else by ==), in a's order, then keys only in b."""
    if isinstance(a, torch.Tensor):
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [ptr]
    if isinstance(a, dict):
        out = []
        for k in a:
            out += _torch_differences(a[k], b[k], f"{ptr}/{k}") if k in b else [f"{ptr}/{k}"]
        return out + [f"{ptr}/{k}" for k in b if k not in a]
    if isinstance(a, (list, tuple)):
        return [p for i, (x, y) in enumerate(zip(a, b))
                for p in _torch_differences(x, y, f"{ptr}/{i}")]
    return [] if a == b else [ptr]


@pytest.mark.parametrize("e", [1, 2, 3, 4])
def test_consecutive_epochs_differ_exactly_where_torch_says(e: int) -> None:
    a, b = LOOP / f"epoch_{e}.pt", LOOP / f"epoch_{e + 1}.pt"
    r = diff(a, b)
    want = _torch_differences(torch.load(a, weights_only=True), torch.load(b, weights_only=True))
    assert sorted(d.pointer for d in r.differences) == sorted(want)
    # the step counters, lr, moments, weights and the scheduler: nothing else
    assert {p.split("/")[1] for p in want} == {"epoch", "global_step", "model", "optimizer",
                                               "scheduler"}
    assert {d.pointer.rsplit("/", 1)[1] for d in r.differences if "/state/" in d.pointer} == {
        "step", "exp_avg", "exp_avg_sq"}
    assert [(d.pointer, d.before, d.after) for d in r.differences if d.kind == "value"
            and not d.pointer.startswith(("/optimizer/state", "/model"))] == [
        ("/epoch", e, e + 1), ("/global_step", 2 * e, 2 * e + 2),
        ("/optimizer/param_groups/0/lr", 0.01 * 0.5 ** e, 0.01 * 0.5 ** (e + 1)),
        ("/scheduler/last_epoch", e, e + 1), ("/scheduler/_step_count", e + 1, e + 2),
        ("/scheduler/_last_lr/0", 0.01 * 0.5 ** e, 0.01 * 0.5 ** (e + 1))]
    assert r.by_bytes == 0 and r.bytes_read == 0  # every non-tiny tensor decided by CRC
    assert run("diff", a, b, code=1).stdout.endswith("0 by reading bytes; 0 B read\n")


def test_equal_copies_exit_0() -> None:
    r = run("diff", LOOP / "epoch_5.pt", LOOP / "last.pt")  # another archive name, same data
    assert r.stdout == ("no differences; 16 tensors compared: 7 by their values (tiny), 9 by "
                        "CRC-32, 0 by reading bytes; 0 B read\n")
    r = run("diff", FIXTURES / "runs" / "lightning_topk" / "epoch=4-step=10.ckpt",
            FIXTURES / "runs" / "lightning_topk" / "last.ckpt")
    assert r.stdout.startswith("no differences; ")


def test_values_against_torch() -> None:
    a, b = LOOP / "epoch_1.pt", LOOP / "epoch_2.pt"
    r = diff(a, b, values=True)
    ta, tb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    got = {d.pointer: d.values for d in r.differences if d.kind == "bytes"}
    assert sorted(got) == ["/model/0.bias", "/model/0.weight", "/model/2.weight",
                           "/optimizer/state/0/exp_avg", "/optimizer/state/0/exp_avg_sq",
                           "/optimizer/state/1/exp_avg", "/optimizer/state/1/exp_avg_sq",
                           "/optimizer/state/2/exp_avg", "/optimizer/state/2/exp_avg_sq"]
    for ptr, v in got.items():
        x, y = ta, tb
        for k in ptr.strip("/").split("/"):
            x, y = (x[int(k)], y[int(k)]) if k.isdigit() else (x[k], y[k])
        x, y = x.double(), y.double()
        assert v is not None
        # float32 arithmetic, as the tensors are: to float32 precision
        assert v["max_abs"] == pytest.approx(float((y - x).abs().max()), rel=1e-6)
        assert v["norm_before"] == pytest.approx(float(x.norm()), rel=1e-6)
        assert v["norm_after"] == pytest.approx(float(y.norm()), rel=1e-6)
        assert v["rel"] == pytest.approx(float((y - x).norm() / x.norm()), rel=1e-5)
    out = run("diff", a, b, "--values", code=1).stdout.splitlines()
    assert out[0].split() == ["pointer", "change", "before", "after", "max_abs", "rel", "norm",
                              "before", "norm", "after"]


def _rewrite_unchanged(src: Path, dst: Path) -> None:
    """A no-op rewrite by ckpttool's writer (the tree re-pickled, records copied; a legacy
    input comes out in the zip format)."""
    from ckpttool.save import save
    ckpt = ckpttool.open_for_edit(src)
    save(ckpt.derive(dict(ckpt.root)), str(dst))


def test_no_op_rewrite_and_legacy_vs_zip_rewrite_are_equal(tmp_path: Path) -> None:
    _rewrite_unchanged(LOOP / "epoch_3.pt", tmp_path / "same.pt")
    assert diff(LOOP / "epoch_3.pt", tmp_path / "same.pt").equal
    legacy = FIXTURES / "imagenet_style_legacy.pth"
    _rewrite_unchanged(legacy, tmp_path / "zip.pth")
    assert ckpttool.open(tmp_path / "zip.pth").format == "torch-zip"
    r = diff(legacy, tmp_path / "zip.pth")
    assert r.equal and r.notes == ["formats differ (torch-legacy and torch-zip): contents "
                                   "compared"]
    assert (r.by_value, r.by_crc, r.by_bytes, r.bytes_read) == (7, 0, 2, 96)  # legacy CRCs
    # an edit of the legacy file: only what the edit changed
    run("set-lr", legacy, "1e-4", "-o", tmp_path / "edited.pth")
    r = diff(legacy, tmp_path / "edited.pth")
    assert [(d.pointer, d.kind, d.before, d.after) for d in r.differences] == [
        ("/optimizer/param_groups/0/lr", "value", pytest.approx(0.01), 0.0001),
        ("/optimizer/param_groups/0/initial_lr", "value", 0.1, pytest.approx(0.001)),
        ("/scheduler/base_lrs/0", "value", 0.1, pytest.approx(0.001)),
        ("/scheduler/_last_lr/0", "value", pytest.approx(0.01), 0.0001)]


def test_records_without_crc_and_flipped_bytes(tmp_path: Path) -> None:
    from torch.utils.serialization import config as torch_config
    torch.manual_seed(0)
    sd = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    torch.save(sd, tmp_path / "crc.pt")
    old = torch_config.save.compute_crc32
    torch_config.save.compute_crc32 = False
    try:
        torch.save(sd, tmp_path / "nocrc.pt")
        sd2 = {"w": sd["w"].clone(), "b": sd["b"]}
        sd2["w"][10, 3] += 1e-3
        torch.save(sd2, tmp_path / "nocrc2.pt")
    finally:
        torch_config.save.compute_crc32 = old
    r = diff(tmp_path / "crc.pt", tmp_path / "nocrc.pt")
    assert r.equal and (r.by_crc, r.by_bytes) == (0, 2)
    r = diff(tmp_path / "crc.pt", tmp_path / "nocrc2.pt", values=True)
    assert [(d.pointer, d.kind) for d in r.differences] == [("/w", "bytes")]
    v = r.differences[0].values
    assert v is not None and v["max_abs"] == float((sd2["w"] - sd["w"]).abs().max())


def test_views_compare_their_own_bytes(tmp_path: Path) -> None:
    """A slice is saved with its whole base storage: when the storages differ only outside
    the slice, the slices are equal; a view equals its contiguous copy."""
    base = torch.arange(40, dtype=torch.float32)
    other = base.clone()
    other[0] = -1.0  # outside [2:14] and outside the strided view's elements
    torch.save({"v": base[2:14], "t": base.reshape(8, 5)[:, 1:3]}, tmp_path / "a.pt")
    torch.save({"v": other[2:14], "t": other.reshape(8, 5)[:, 1:3].contiguous()},
               tmp_path / "b.pt")
    r = diff(tmp_path / "a.pt", tmp_path / "b.pt")
    assert r.equal and r.by_bytes == 2
    inside = base.clone()
    inside[5] = 99.0
    torch.save({"v": inside[2:14], "t": inside.reshape(8, 5)[:, 1:3]}, tmp_path / "c.pt")
    r = diff(tmp_path / "a.pt", tmp_path / "c.pt", values=True)
    assert [(d.pointer, d.kind) for d in r.differences] == [("/v", "bytes")]
    assert r.differences[0].values == {"max_abs": 94.0, "rel": pytest.approx(94 / float(
        base[2:14].norm())), "norm_before": pytest.approx(float(base[2:14].norm())),
        "norm_after": pytest.approx(float(inside[2:14].norm()))}
    # a strided view that changed, with --values
    torch.save({"v": base[2:14], "t": inside.reshape(8, 5)[:, 0:3]}, tmp_path / "d.pt")
    r = diff(tmp_path / "a.pt", tmp_path / "d.pt", values=True)
    assert [(d.pointer, d.kind, d.before, d.after) for d in r.differences] == [
        ("/t", "tensor", "float32[8, 2] cpu", "float32[8, 3] cpu")]
    changed = base.clone()
    changed[6] = 0.0  # element [1, 1] of the strided view
    torch.save({"v": base[2:14], "t": changed.reshape(8, 5)[:, 1:3]}, tmp_path / "e.pt")
    r = diff(tmp_path / "a.pt", tmp_path / "e.pt", values=True)
    assert [(d.pointer, d.kind) for d in r.differences] == [("/t", "bytes")]
    assert r.differences[0].values is not None and r.differences[0].values["max_abs"] == 6.0


def _named_run(tmp_path: Path, name: str, reverse: bool) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    named = list(model.named_parameters())
    opt = torch.optim.Adam(named[::-1] if reverse else named, lr=1e-2)
    train_steps(model, opt)
    path = tmp_path / name
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    return path


def test_permuted_param_order_is_a_reorder(tmp_path: Path) -> None:
    a = _named_run(tmp_path, "a.pt", reverse=False)
    b = _named_run(tmp_path, "b.pt", reverse=True)
    ta, tb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert not torch.equal(ta["optimizer"]["state"][0]["exp_avg"],
                           tb["optimizer"]["state"][0]["exp_avg"].reshape(-1)[:1])
    r = diff(a, b)
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [(d.pointer, d.kind, d.before, d.after) for d in r.differences] == [
        ("/optimizer", "reorder", names, names[::-1])]
    assert run("diff", a, b, code=1).stdout.splitlines()[2].split()[:2] == ["/optimizer",
                                                                          "reorder"]
    # a real change under the reorder is reported at both ids, with the name
    sd = torch.load(b, weights_only=True)
    sd["optimizer"]["state"][0]["exp_avg"] += 1.0  # id 0 is 2.bias in b
    torch.save(sd, tmp_path / "c.pt")
    r = diff(a, tmp_path / "c.pt")
    assert [(d.pointer, d.kind, d.name, d.pointer_after) for d in r.differences] == [
        ("/optimizer", "reorder", None, None),
        ("/optimizer/state/3/exp_avg", "value", "2.bias", "/optimizer/state/0/exp_avg")]


# ---------------------------------------------------------------- --dry-run and diff agree

def _merge_fixture(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW([{"params": [model[0].weight, model[2].weight]},
                             {"params": [model[0].bias, model[2].bias]}], lr=1e-2)
    train_steps(model, opt)
    path = tmp_path / "merge.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    return path


def _under(p: str, q: str) -> bool:
    return p == q or p.startswith(q + "/")


def _same_story(plan_changes: list[Any], diffs: list[Difference]) -> None:
    ptrs = [c.pointer for c in plan_changes]
    for d in diffs:
        assert any(_under(d.pointer, p) or (d.kind == "reorder" and _under(p, d.pointer))
                   for p in ptrs), f"diff says {d} and the dry run does not"
    for c in plan_changes:
        # (a renumbering of params is one reorder at the optimizer, above the state it moved)
        assert any(_under(d.pointer, c.pointer) or (d.kind == "reorder"
                                                    and _under(c.pointer, d.pointer))
                   for d in diffs), f"dry run says {c}, diff not"
        at = [d for d in diffs if d.pointer == c.pointer]
        if not at:
            continue
        d = at[0]
        if c.before is ABSENT:
            assert d.kind == "added"
        elif c.after is ABSENT:
            assert d.kind == "removed"
        elif isinstance(c.before, (bool, int, float)) and isinstance(c.after, (bool, int, float)):
            assert (d.kind, d.before, d.after) == ("value", c.before, c.after)
        elif d.kind == "tensor":  # move: devices
            assert d.before.endswith(f" {c.before}") and d.after.endswith(f" {c.after}")


EDITS = {
    "set-lr": ("imagenet_style.pth", ["set-lr", "1e-4"]),
    "set-lr-legacy": ("imagenet_style_legacy.pth", ["set-lr", "1e-4"]),
    "set": ("optim_adam.pt", ["set", "amsgrad=true", "weight_decay=0.1"]),
    "move": ("cuda0.pt", ["move", "cpu"]),
    "move-module": ("torch_save_model_cuda.pt", ["move", "cpu"]),
    "merge-groups": ("", ["merge-groups"]),
    "convert": ("imagenet_style.pth", ["convert", "--to", "adam", "--set", "lr=1e-3"]),
    "convert-back": ("optim_adamw_named.pt", ["convert", "--to", "sgd", "--set",
                                              "momentum=0.9"]),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_dry_run_and_diff_of_the_result_agree(edit: str, tmp_path: Path) -> None:
    name, argv = EDITS[edit]
    src = _merge_fixture(tmp_path) if not name else tmp_path / name
    if name:
        shutil.copy(FIXTURES / name, src)
    cmd, *rest = argv
    dry = run(cmd, src, *rest, "--dry-run").stdout.splitlines()
    out = tmp_path / ("out" + src.suffix)
    run(cmd, src, *rest, "-o", out)
    # the dry run's table, as the plan has it
    from ckpttool.cli import _parse_assignments
    from ckpttool.edits import convert, merge_groups, move, set_hparams, set_lr
    ckpt = ckpttool.open(src)
    plan = {"set-lr": lambda: set_lr(ckpt, 1e-4), "set": lambda: set_hparams(
        ckpt, _parse_assignments(tuple(rest))), "move": lambda: move(ckpt, "cpu"),
        "merge-groups": lambda: merge_groups(ckpt),
        "convert": lambda: convert(ckpt, rest[1], sets=_parse_assignments((rest[3],)))}[cmd]()
    assert [line.split()[0] for line in dry[2:2 + len(plan.changes)]] == \
        [c.pointer for c in plan.changes]
    assert dry[2 + len(plan.changes):] == [plan.summary, "dry run: nothing written"]
    r = diff(src, out)
    assert not r.equal
    _same_story(plan.changes, r.differences)


def test_merge_groups_is_a_reorder_of_named_params(tmp_path: Path) -> None:
    src = _merge_fixture(tmp_path)
    run("merge-groups", src, "-o", tmp_path / "m.pt")
    r = diff(src, tmp_path / "m.pt")
    assert [(d.pointer, d.kind) for d in r.differences] == [
        ("/optimizer", "reorder"), ("/optimizer/param_groups/0/params", "value"),
        ("/optimizer/param_groups/1", "removed")]
    assert r.differences[0].before == ["0.weight", "2.weight", "0.bias", "2.bias"]
    assert r.differences[0].after == ["0.weight", "0.bias", "2.weight", "2.bias"]


# ---------------------------------------------------------------- CLI, folders, exit codes

def test_exit_codes_and_errors(tmp_path: Path) -> None:
    r = run("diff", LOOP / "epoch_1.pt", tmp_path / "missing.pt", code=3)
    assert r.stderr == f"Error: {tmp_path / 'missing.pt'}: no such file or folder\n"
    r = run("diff", LOOP, LOOP / "last.pt", code=2)  # a run folder is not a checkpoint
    assert r.stderr.startswith(f"Error: {LOOP}: a folder of 7 independent checkpoints")
    r = run("diff", LOOP / "epoch_1.pt", FIXTURES / "hf_trainer" / "checkpoint-4", code=1)
    assert [line.split() for line in r.stdout.splitlines()[2:4]] == [
        ["(root)", "safety", "weights-only", "needs-trust"],
        ["(root)", "type", "file", "(torch-zip)", "folder", "(hf-trainer)"]]
    r = run("diff", LOOP / "epoch_1.pt", LOOP / "epoch_2.pt", "--optimizer", "/optimizer",
            "--json", code=1)
    import json
    doc = json.loads(r.stdout)
    assert doc["equal"] is False and doc["a"] == str(LOOP / "epoch_1.pt")
    assert {d["pointer"].split("/")[2] for d in doc["differences"]} == {"state", "param_groups"}
    assert doc["compared"] == {"tensors": 12, "by_value": 6, "by_crc": 6, "by_bytes": 0,
                               "shape_or_dtype": 0, "metadata_only": 0, "bytes_read": 0}
    r = run("diff", FIXTURES / "bf16.pt", FIXTURES / "cuda0.pt", code=1)
    assert r.stdout.splitlines()[-1] == (
        "12 differences (12 tensor shape/dtype/device); 16 tensors compared: 4 by their values "
        "(tiny), 0 by CRC-32, 0 by reading bytes, 12 of another shape or dtype; 0 B read")
    assert doc["differences"][0] == {"pointer": "/optimizer/state/0/step", "kind": "value",
                                     "before": {"shape": [], "dtype": "float32",
                                                "device": "cpu", "value": 2.0},
                                     "after": {"shape": [], "dtype": "float32",
                                               "device": "cpu", "value": 4.0},
                                     "name": None, "pointer_after": None, "values": None}


def test_folders(tmp_path: Path) -> None:
    src = tmp_path / "checkpoint-4"
    shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-4", src)
    out = tmp_path / "edited"
    run("set-lr", src, "1e-4", "--base-lr", "-o", out)
    (out / "vocab.txt").write_text("a\n")
    (out / "config.json").write_text((src / "config.json").read_text().replace("8", "9", 1))
    r = diff(src, out)
    kinds = [(d.pointer.split("/")[1], d.kind) for d in r.differences]
    assert ("vocab.txt", "added") in kinds and ("config.json", "value") in kinds
    assert {p for p, _ in kinds} == {"config.json", "optimizer.pt", "scheduler.pt",
                                     "vocab.txt"}
    assert diff(src, FIXTURES / "hf_trainer" / "checkpoint-4").equal


def test_plain_diff_imports_neither_torch_nor_numpy() -> None:
    code = ("import sys, ckpttool.cli\n"
            "try:\n    ckpttool.cli.cli(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    assert e.code == 1, e.code\n"
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'imported'\n")
    r = subprocess.run([sys.executable, "-c", code, "diff", str(LOOP / "epoch_1.pt"),
                        str(LOOP / "epoch_2.pt")], capture_output=True, text=True, cwd=ROOT,
                       check=False)
    assert r.returncode == 0, r.stderr


def test_nan_equals_nan(tmp_path: Path) -> None:
    t = torch.tensor([1.0, math.nan] * 8)
    torch.save({"x": t, "loss": math.nan}, tmp_path / "a.pt")
    torch.save({"x": t.clone(), "loss": math.nan}, tmp_path / "b.pt")
    assert diff(tmp_path / "a.pt", tmp_path / "b.pt").equal


def test_dcp_folders_by_chunk_crcs(tmp_path: Path) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict(), "step": 7}, checkpoint_id=str(tmp_path / "a"))
        dcp.save({"model": model.state_dict(), "step": 8}, checkpoint_id=str(tmp_path / "b"))
    r = diff(tmp_path / "a", tmp_path / "b")
    assert [(d.pointer, d.kind, d.before, d.after) for d in r.differences] == [
        ("/step", "value", 7, 8)]
    # the weight's bytes are in a chunk: compared by its record's CRC (nothing read); the bias
    # is tiny (values)
    assert (r.tensors, r.by_value, r.by_crc, r.unread, r.bytes_read) == (2, 1, 1, 0, 0)
