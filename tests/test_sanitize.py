"""``ckpttool sanitize``: the result loads with ``torch.load(weights_only=True)`` in a fresh
process (no ``add_safe_globals``), every tensor of the input is in it bit for bit, the optimizer
resumes in the real torch optimizer, and the report lists every value changed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import FIXTURES, run

import ckpttool
from ckpttool.checkpoint import read_tensor_bytes
from ckpttool.edits.sanitize import sanitize
from ckpttool.save import save
from ckpttool.tree import tensors

ROOT = Path(__file__).resolve().parents[1]

# the fresh process: torch.load(weights_only=True) only, then a real optimizer resumes
_LOADER = r"""
import hashlib, json, sys
import torch

def walk(obj, out, seen=None):
    seen = set() if seen is None else seen
    if id(obj) in seen:  # one tensor object stored twice is one tensor (as in ckpttool's walk)
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        out.append([str(obj.dtype).replace("torch.", ""), list(obj.shape),
                    hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()])
    elif isinstance(obj, dict):
        for v in obj.values():
            walk(v, out, seen)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            walk(v, out, seen)

def resolve(obj, tokens):
    for t in tokens:
        obj = obj[int(t)] if isinstance(obj, (list, tuple)) else obj[t]
    return obj

def resume(sd, typ):
    groups = []
    for g in sd["param_groups"]:
        ps = []
        for pid in g["params"]:
            st = sd["state"].get(pid, {})
            like = next((v for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0
                         and k != "step"), None)
            ps.append(torch.nn.Parameter(torch.zeros(like.shape, dtype=like.dtype)
                                         if like is not None else torch.zeros(1)))
        groups.append({**{k: v for k, v in g.items() if k not in ("params", "param_names")},
                       "params": ps})
    opt = getattr(torch.optim, typ)(groups)
    opt.load_state_dict(sd)
    saved = {k: v.clone() for s in opt.state.values() for k, v in s.items()
             if torch.is_tensor(v) and k != "step"}
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.ones_like(p)
    opt.step()
    moved = [k for s in opt.state.values() for k, v in s.items()
             if torch.is_tensor(v) and k != "step" and k in saved]
    return {"type": type(opt).__name__, "states": len(opt.state), "stepped": len(moved) > 0}

jobs = json.loads(sys.argv[1])
out = {}
for job in jobs:
    obj = torch.load(job["file"], weights_only=True, map_location="cpu")
    found = []
    walk(obj, found)
    r = {"tensors": found}
    if job.get("optimizer") is not None:
        r["resume"] = resume(resolve(obj, job["optimizer"]), job["type"])
    out[job["file"]] = r
print(json.dumps(out))
"""


def fresh_load(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Run the loader in a new interpreter that never heard of add_safe_globals."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCH_")}
    r = subprocess.run([sys.executable, "-c", _LOADER, json.dumps(jobs)], capture_output=True,
                       text=True, env=env, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def element_hash(t: Any) -> str:
    """sha256 of a tensor's elements in row-major order, read by ckpttool from its record."""
    raw = read_tensor_bytes(t)
    k = t.itemsize
    if t.numel == 0:
        return hashlib.sha256(b"").hexdigest()
    a = np.frombuffer(raw, dtype=f"V{k}")
    el = np.lib.stride_tricks.as_strided(a, shape=t.shape, strides=[s * k for s in t.stride])
    return hashlib.sha256(el.tobytes()).hexdigest()


def input_tensors(ckpt: ckpttool.Checkpoint) -> Counter[tuple[str, tuple[int, ...], str]]:
    out: Counter[tuple[str, tuple[int, ...], str]] = Counter()
    for f in ckpt.files:
        if f.format not in ("torch-zip", "torch-legacy"):
            continue
        for _, t, _ in tensors(f.root):
            out[(t.dtype, tuple(t.shape), element_hash(t))] += 1
    return out


def pickled_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file()
                  and p.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar"))


def check_output(src: ckpttool.Checkpoint, out: Path, plan: Any,
                 loaded: dict[str, Any]) -> None:
    """Every input tensor is in the output bit for bit; the only extra tensors are the numpy
    arrays the report lists; the output's own verdict is weights-only."""
    got: Counter[tuple[str, tuple[int, ...], str]] = Counter()
    for f in pickled_files(out):
        for dtype, shape, h in loaded[str(f)]["tensors"]:
            got[(dtype, tuple(shape), h)] += 1
    want = input_tensors(src)
    assert want - got == Counter()
    extra = sorted(f"{d}{list(s)}" for (d, s, _), n in (got - want).items() for _ in range(n))
    new = sorted(c.after.removeprefix("tensor ").removesuffix(" (new record)")
                 for c in plan.changes if c.kind == "numpy-array")
    assert extra == new
    assert ckpttool.open(out).safety.level == "weights-only"
    # every call the input's verdict names outside torch's list is a reported change, or is
    # inside one (an enum inside a converted dataclass: its own row; a numpy dtype inside a
    # numpy scalar: the scalar's row)
    changed = [c.pointer for c in plan.changes]
    for call in src.safety.calls:
        if call.pointer is None:
            continue
        tokens = [t for t in call.pointer.split("/") if t != "@state"]
        at = next((i for i, t in enumerate(tokens) if t.startswith("@")), len(tokens))
        where = "/".join(tokens[:at])
        assert any(where == p or where.startswith(p + "/") for p in changed), (call, changed)


# name -> (fixture, optimizer pointer in the result, torch.optim type, change count)
PROOF = {
    "timm_saver": ("sanitize/timm/last.pth.tar", "/optimizer", "SGD", 1),
    "imagenet": ("imagenet_style.pth", "/optimizer", "SGD", 0),
    "hf_trainer": ("hf_trainer/checkpoint-4", "/optimizer.pt", "AdamW", 11),
    "accelerate": ("accelerate_state", "/optimizer.bin", "AdamW", 1),
    "numpy_metrics": ("sanitize/numpy_metrics.pt", "/optimizer", "Adam", 17),
    "deepspeed": ("deepspeed", ("/zero_pp_rank_0_mp_rank_00_optim_states.pt/"
                                "optimizer_state_dict/base_optimizer_state"), "AdamW", 6),
    "lightning_dataclass": ("sanitize/lightning/epoch=0-step=3.ckpt", "/optimizer_states/0",
                            "AdamW", 2),
    "opaque": ("opaque.pt", "/optimizer", "SGD", 3),
}


@pytest.mark.parametrize("name", sorted(PROOF))
def test_sanitized_output_loads_weights_only_and_resumes(name: str, tmp_path: Path) -> None:
    fixture, pointer, typ, count = PROOF[name]
    src = ckpttool.open_for_edit(FIXTURES / fixture)
    plan = sanitize(src)
    assert len(plan.changes) == count
    out = tmp_path / "out"
    save(plan, str(out))
    files = pickled_files(out)
    first = pointer.split("/")[1]
    jobs: list[dict[str, Any]] = []
    for f in files:
        job: dict[str, Any] = {"file": str(f)}
        if out.is_file() or f.name == first:
            tokens = pointer.split("/")[1:] if out.is_file() else pointer.split("/")[2:]
            job.update(optimizer=tokens, type=typ)
        jobs.append(job)
    loaded = fresh_load(jobs)
    check_output(src, out, plan, loaded)
    resumed = [r["resume"] for r in loaded.values() if "resume" in r]
    assert len(resumed) == 1 and resumed[0]["type"] == typ and resumed[0]["stepped"]
    assert resumed[0]["states"] > 0


def test_numpy_values_keep_their_values(tmp_path: Path) -> None:
    """The numpy arrays are the same values as tensors; the RNG states restore the same
    sequences through numpy's own set_state / state setter."""
    out = tmp_path / "out.pt"
    save(sanitize(ckpttool.open_for_edit(FIXTURES / "sanitize/numpy_metrics.pt")), str(out))
    code = r"""
import json, random, sys
import numpy as np, torch
d = torch.load(sys.argv[1], weights_only=True)
np.random.set_state(d["rng"]["numpy"])
legacy = np.random.rand(3).tolist() == np.random.RandomState(0).rand(3).tolist()
g = np.random.Generator(np.random.PCG64())
g.bit_generator.state = d["rng"]["numpy_generator"]
gen = g.random(2).tolist() == np.random.default_rng(7).random(2).tolist()
random.setstate(d["rng"]["python"])
torch.set_rng_state(d["rng"]["torch"])
m = d["metrics"]
print(json.dumps({"legacy": legacy, "generator": gen, "losses": m["losses"].tolist(),
                  "losses_dtype": str(m["losses"].dtype), "confusion": m["confusion"].tolist(),
                  "confusion_stride": list(m["confusion"].stride()), "loss": m["loss"],
                  "top1": m["top1"], "improved": m["improved"], "epoch": d["epoch"],
                  "rest": [d[k] for k in ("best_metric", "output_dir", "run_id", "started",
                                          "elapsed", "tags", "class_counts", "recent_losses",
                                          "dtype")]}))
"""
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "legacy": True, "generator": True,
        "losses": [float(np.float32(0.9)), float(np.float32(0.7)), float(np.float32(0.55))],
        "losses_dtype": "torch.float32", "confusion": [[0, 1, 2], [3, 4, 5]],
        "confusion_stride": [1, 2], "loss": float(np.float32(0.7166666388511658)),
        "top1": 75.5, "improved": True, "epoch": 3,
        "rest": [0.8125, "/runs/tiny/ckpt", "12345678-1234-5678-1234-567812345678",
                 "2026-11-25T14:00:05+00:00", 90.5, ["baseline", "tiny"],
                 {"cat": 3, "dog": 2}, [0.7, 0.55], "float32"]}


def _every_fixture() -> list[str]:
    from ckpttool.run import is_run, run_members
    names = []
    for p in sorted(FIXTURES.iterdir()):
        if p.name in ("sanitize", "peft_trainer", "hf_trainer") or p.name.startswith(".") \
                or p.suffix in (".py", ".md", ".json"):
            continue
        if is_run(p):  # a folder of independent checkpoints: each of them
            names += [f"{p.name}/{m.rstrip('/')}" for m in run_members(str(p))]
        else:
            names.append(p.name)
    names += ["hf_trainer/checkpoint-4", "peft_trainer/checkpoint-4", "sanitize/lightning/epoch=0-step=3.ckpt",
              "sanitize/numpy_metrics.pt",
              "sanitize/timm/last.pth.tar"]
    return names


def test_every_fixture(tmp_path: Path) -> None:
    """Every fixture is sanitized (or refused: unsafe -> 4, values without a plain form ->
    1); each output loads weights-only in one fresh process with every input tensor in it."""
    outcomes: dict[str, int] = {}
    done: list[tuple[ckpttool.Checkpoint, Path, Any]] = []
    for i, name in enumerate(_every_fixture()):
        out = tmp_path / f"{i}_{Path(name).name}"
        r = run("sanitize", FIXTURES / name, "-o", out, code=None)
        outcomes[name] = r.exit_code
        if r.exit_code == 0:
            src = ckpttool.open_for_edit(FIXTURES / name)
            done.append((src, out, sanitize(src)))
        else:
            assert not out.exists()
    assert {n: c for n, c in outcomes.items() if c} == {
        "mmengine/iter_4.pth": 1, "unsafe_exec.pt": 4, "unsafe_os_system.pt": 4,
        "wild/scripted.pt": 1, "wild/traced.pt": 1}  # TorchScript: only move applies
    loaded = fresh_load([{"file": str(f)} for _, out, _ in done for f in pickled_files(out)])
    for src, out, plan in done:
        check_output(src, out, plan, loaded)


def test_unsafe_is_refused_and_nothing_written(copy_fixture: Any, tmp_path: Path) -> None:
    path = copy_fixture("unsafe_os_system.pt")
    before = path.read_bytes()
    r = run("sanitize", path, "-o", tmp_path / "clean.pt", code=4)
    assert r.stdout == ""
    assert r.stderr == (
        f"Error: {path}: refusing to edit: UNSAFE: loading it would run posix.system at /payload: "
        "module posix runs code, touches files or the network, or loads pickles. Nothing was "
        "written.\n")
    r = run("sanitize", path, code=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unsafe_os_system.pt"]
    assert path.read_bytes() == before
    with pytest.raises(ckpttool.UnsafeCheckpointError):
        ckpttool.sanitize(FIXTURES / "unsafe_exec.pt")


def test_keep_unknown_modes(tmp_path: Path) -> None:
    src = FIXTURES / "mmengine" / "iter_4.pth"
    r = run("sanitize", src, "-o", tmp_path / "x", code=1)
    assert r.stderr == (
        f"Error: {src}: 4 values have no plain equivalent sanitize knows: "
        "/message_hub/log_scalars/train~1base_lr/statistics_methods/min: "
        "__builtin__.getattr(mmengine.logging.history_buffer.HistoryBuffer, 'min'); "
        "/message_hub/log_scalars/train~1base_lr/statistics_methods/max: "
        "__builtin__.getattr(mmengine.logging.history_buffer.HistoryBuffer, 'max'); "
        "/message_hub/log_scalars/train~1base_lr/statistics_methods/current: "
        "__builtin__.getattr(mmengine.logging.history_buffer.HistoryBuffer, 'current'); "
        "/message_hub/log_scalars/train~1base_lr/statistics_methods/mean: "
        "__builtin__.getattr(mmengine.logging.history_buffer.HistoryBuffer, 'mean'); pass "
        "--keep-unknown string to write a description of each, or --keep-unknown drop to "
        "remove them (both listed)\n")
    assert not (tmp_path / "x").exists()
    ckpt = ckpttool.open_for_edit(src)
    ptr = "/message_hub/log_scalars/train~1base_lr/statistics_methods"
    as_string = sanitize(ckpt, "string")
    assert as_string.result.resolve(ptr) == {
        k: f"__builtin__.getattr(mmengine.logging.history_buffer.HistoryBuffer, '{k}')"
        for k in ("min", "max", "current", "mean")}
    dropped = sanitize(ckpt, "drop")
    assert dropped.result.resolve(ptr) == {}
    assert [(c.pointer, c.kind) for c in dropped.changes if c.kind == "unknown"] == [
        (f"{ptr}/{k}", "unknown") for k in ("min", "max", "current", "mean")]
    for i, plan in enumerate((as_string, dropped)):
        out = tmp_path / f"o{i}"
        save(plan, str(out))
        loaded = fresh_load([{"file": str(f)} for f in pickled_files(out)])
        check_output(ckpt, out, plan, loaded)


def test_json_report(tmp_path: Path) -> None:
    out = tmp_path / "o.pt"
    r = run("sanitize", FIXTURES / "opaque.pt", "-o", out, "--json")
    assert json.loads(r.stdout) == {
        "schema": 1, "path": str(FIXTURES / "opaque.pt"), "output": str(out), "dry_run": False,
        "summary": "sanitize: 3 values made plain (object 1, path 1, numpy-scalar 1); "
                   "torch.load(weights_only=True) loads the result",
        "changes": [
            {"pointer": "/args", "kind": "object", "before": "argparse.Namespace object",
             "after": "dict of lr, arch"},
            {"pointer": "/path", "kind": "path", "before": "pathlib.PosixPath('/tmp/x')",
             "after": "/tmp/x"},
            {"pointer": "/np_scalar", "kind": "numpy-scalar",
             "before": "numpy.float64(0.5)", "after": 0.5}]}
    assert ckpttool.open(out).safety.level == "weights-only"
    r = run("sanitize", out, "--json", "--dry-run")
    assert json.loads(r.stdout) == {
        "schema": 1, "path": str(out), "output": None, "dry_run": True,
        "summary": "sanitize: nothing to change; torch.load(weights_only=True) already loads "
                   "it", "changes": []}


def test_tensors_untouched_records_copied(tmp_path: Path) -> None:
    """Tensor records of the input are copied byte for byte (the zip records are equal)."""
    import zipfile
    src = FIXTURES / "sanitize/timm/last.pth.tar"
    out = tmp_path / "o.pth"
    run("sanitize", src, "-o", out)
    a, b = zipfile.ZipFile(src), zipfile.ZipFile(out)
    data_a = {n.split("/", 1)[1]: a.read(n) for n in a.namelist() if "/data/" in n}
    data_b = {n.split("/", 1)[1]: b.read(n) for n in b.namelist() if "/data/" in n}
    assert data_a == data_b and len(data_a) == 8


def test_deepspeed_slices_still_read(tmp_path: Path) -> None:
    """DeepSpeed's fragment_address objects become dicts; show still maps each param."""
    from ckpttool.deepspeed import zero_groups
    out = tmp_path / "ds"
    save(sanitize(ckpttool.open_for_edit(FIXTURES / "deepspeed")), str(out))
    before = zero_groups(ckpttool.open(FIXTURES / "deepspeed"))
    after = zero_groups(ckpttool.open(out))
    assert [(g.group, [(s.name, s.start, s.numel) for s in g.slices]) for g in after] == \
        [(g.group, [(s.name, s.start, s.numel) for s in g.slices]) for g in before] == [
            (0, [("0.weight", 0, 12), ("2.weight", 12, 6)]),
            (1, [("0.bias", 0, 3), ("2.bias", 3, 2)])]


@pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning")
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before")
def test_lightning_resumes_from_sanitized(tmp_path: Path) -> None:
    """The Trainer resumes from the sanitized checkpoint (weights_only load, plain
    hyper_parameters); load_from_checkpoint hands the dataclass over as a dict."""
    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(L.LightningModule):
        def __init__(self, optim: Any, mode: Any = "finetune", hidden: int = 3) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(),
                                           torch.nn.Linear(hidden, 2))

        def training_step(self, batch: Any, _: int) -> Any:
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            cfg = self.hparams.optim
            opt = torch.optim.AdamW(self.parameters(), lr=cfg["lr"], betas=cfg["betas"],
                                    weight_decay=cfg["weight_decay"])
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    src = FIXTURES / "sanitize/lightning/epoch=0-step=3.ckpt"
    out = tmp_path / "plain.ckpt"
    run("sanitize", src, "-o", out)
    model = Tiny.load_from_checkpoint(out, weights_only=True)
    assert model.hparams.optim == {"lr": 0.01, "betas": (0.9, 0.95), "weight_decay": 0.1}
    assert model.hparams.mode == "finetune"
    g = torch.Generator().manual_seed(1234)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", devices=1, enable_progress_bar=False,
                        logger=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=str(tmp_path))
    saved = torch.load(out, weights_only=True)["optimizer_states"][0]["state"]
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=2), ckpt_path=str(out))
    opt = trainer.optimizers[0]
    assert trainer.global_step == 5
    assert [float(opt.state[p]["step"]) for p in model.parameters()] == [5.0] * 4
    assert len(saved) == 4 and float(saved[0]["step"]) == 3.0
    assert opt.param_groups[0]["lr"] == 0.01 * 0.5 ** 2


def test_in_place_with_backup(copy_fixture: Any) -> None:
    path = copy_fixture("sanitize/timm/last.pth.tar")
    before = path.read_bytes()
    r = run("sanitize", path, "--backup")
    assert r.stdout.splitlines()[-1] == (
        f"sanitize: 1 value made plain (object 1); torch.load(weights_only=True) loads the "
        f"result; wrote {path} (the original is kept as {path}.bak)")
    assert Path(f"{path}.bak").read_bytes() == before
    assert ckpttool.open(path).safety.level == "weights-only"
    r = run("sanitize", path)
    assert r.stdout == ("(no changes)\nsanitize: nothing to change; "
                        "torch.load(weights_only=True) already loads it; nothing written\n")


def test_check_suggests_sanitize() -> None:
    report = ckpttool.check(FIXTURES / "opaque.pt")
    (f,) = [f for f in report.findings if f.id == "weights-only"]
    assert f.hint == (
        f"`ckpttool sanitize {FIXTURES / 'opaque.pt'} -o OUT` rewrites them into plain values "
        "torch accepts (--dry-run lists each), without running the file; or load with "
        "torch.serialization.add_safe_globals([...]) for classes you trust")


def test_rng_objects_and_zoned_datetime(tmp_path: Path) -> None:
    """A pickled torch.Generator, numpy RandomState and a ZoneInfo datetime: the plain forms
    restore the same streams (torch / numpy's own set_state) and name the zone."""
    import datetime
    import zoneinfo

    import torch
    src = tmp_path / "rngs.pt"
    torch.save({"gen": torch.Generator().manual_seed(3), "rs": np.random.RandomState(5),
                "at": datetime.datetime(2026, 1, 2, 3, 4, 5,
                                        tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))}, src)
    plan = sanitize(ckpttool.open_for_edit(src))
    assert [(c.pointer, c.kind, c.before, c.after) for c in plan.changes] == [
        ("/gen", "torch-generator", "torch.Generator", "its get_state() tensor uint8[5056]"),
        ("/rs", "numpy-random", "numpy.random.RandomState (MT19937)", "its state dict"),
        ("/rs/state/key", "numpy-array", "numpy.ndarray uint32[624]",
         "tensor uint32[624] (new record)"),
        ("/at", "datetime", "datetime.datetime('2026-01-02T03:04:05[Europe/Paris]')",
         "2026-01-02T03:04:05[Europe/Paris]")]
    out = tmp_path / "plain.pt"
    save(plan, str(out))
    code = r"""
import json, sys
import numpy as np, torch
d = torch.load(sys.argv[1], weights_only=True)
g = torch.Generator()
g.set_state(d["gen"])
rs = np.random.RandomState()
rs.set_state(d["rs"])
print(json.dumps({
    "torch": torch.rand(3, generator=g).tolist()
             == torch.rand(3, generator=torch.Generator().manual_seed(3)).tolist(),
    "numpy": rs.rand(3).tolist() == np.random.RandomState(5).rand(3).tolist(),
    "at": d["at"]}))
"""
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"torch": True, "numpy": True,
                                    "at": "2026-01-02T03:04:05[Europe/Paris]"}


def test_a_protocol_4_save_is_written_again_in_protocol_2(tmp_path: Path) -> None:
    """torch.save(..., pickle_protocol=4) writes opcodes torch's weights-only unpickler does
    not read (FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL): the verdict says so, and
    sanitize writes the file again in protocol 2, which loads weights-only."""
    import argparse
    import warnings

    import torch
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    plain, with_args = tmp_path / "p4.pt", tmp_path / "p4_args.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, plain,
               pickle_protocol=4)
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, with_args,
               pickle_protocol=4)
    with pytest.raises(Exception, match="Weights only load failed"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Detected pickle protocol 4"
        torch.load(plain, weights_only=True)
    assert ckpttool.open(plain).safety.headline() == (
        "needs-trust: the pickle uses opcodes torch.load(weights_only=True) does not read "
        "(FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL)")
    out = tmp_path / "p2.pt"
    r = run("sanitize", plain, "-o", out)
    assert r.stdout.splitlines()[2:] == [
        "(root)     a pickle with opcodes FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL  a "
        "protocol 2 pickle",
        "sanitize: 1 value made plain (pickle-protocol 1); torch.load(weights_only=True) loads "
        f"the result; wrote {out}"]
    out2 = tmp_path / "p2_args.pt"
    r = run("sanitize", with_args, "-o", out2)
    assert r.stdout.splitlines()[-1] == (
        "sanitize: 2 values made plain (object 1, pickle-protocol 1); "
        f"torch.load(weights_only=True) loads the result; wrote {out2}")
    loaded = fresh_load([{"file": str(out), "optimizer": ["optimizer"], "type": "SGD"},
                         {"file": str(out2)}])
    assert loaded[str(out)]["resume"] == {"type": "SGD", "states": 2, "stepped": True}
    assert ckpttool.open(out).safety.headline() == \
        "weights-only: torch.load(weights_only=True) loads it"
    src = torch.load(plain, weights_only=False)  # our own file
    got = torch.load(out, weights_only=True)
    for k, v in src["model"].items():
        assert torch.equal(v, got["model"][k])
