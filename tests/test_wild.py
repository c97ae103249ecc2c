"""Checkpoints from the wild (fixtures/wild/, made by fixtures/make_wild.py).

Real files registry packages ship (lpips 2018 weights saved on a GPU under Python 2, DISTS
2020), a Python 2-era training checkpoint written opcode by opcode, and TorchScript archives.
``show`` outputs are golden files (tests/test_golden.py); here: the forms as read, ``move``
followed by a plain ``torch.load`` in a fresh process, ``set-lr`` and a real Adam resume, and
TorchScript archives moved and loaded back with ``torch.jit.load``.
"""

from __future__ import annotations

import collections
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, run

import ckpttool
from ckpttool.formats.nodes import Global, Reduce, TensorRef
from ckpttool.formats.unpickler import unpickle

WILD = FIXTURES / "wild"
pytestmark = pytest.mark.filterwarnings(
    "ignore:'torch.load' received a zip file that looks like a TorchScript archive:UserWarning",
    "ignore:`torch.jit.load` is deprecated:DeprecationWarning")
PY2_IDS = [140230000000000 + 48 * i for i in range(4)]


def fresh(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new Python process (no state of this one: a plain torch.load)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=120)


# ------------------------------------------------------------------------------ lpips, DISTS

@pytest.mark.parametrize("name", ["lpips_v0.1_alex.pth", "lpips_v0.0_alex.pth"])
def test_lpips_py2_ordered_dict_is_a_model_state(name: str) -> None:
    ckpt = ckpttool.open(WILD / name)
    assert type(ckpt.root) is collections.OrderedDict
    assert [m.pointer for m in ckpt.models] == [""]
    assert list(ckpt.root) == [f"lin{i}.model.1.weight" for i in range(5)]
    assert [list(t.shape) for t in ckpt.root.values()] == \
        [[1, 64, 1, 1], [1, 192, 1, 1], [1, 384, 1, 1], [1, 256, 1, 1], [1, 256, 1, 1]]
    assert ckpt.devices == {"cuda:0": 5}
    assert ckpt.safety.level == "weights-only"
    rebuild = {t.qualname for t in ckpt.root.values()}
    assert rebuild == {"torch._utils._rebuild_tensor" if "v0.0" in name
                       else "torch._utils._rebuild_tensor_v2"}


@pytest.mark.parametrize("name", ["lpips_v0.1_alex.pth", "lpips_v0.0_alex.pth"])
def test_lpips_move_cpu_then_plain_torch_load(name: str, tmp_path: Path) -> None:
    src, out = WILD / name, tmp_path / "alex_cpu.pth"
    before = fresh(f"import torch; torch.load({str(src)!r})")
    assert before.returncode != 0
    assert "Attempting to deserialize object on a CUDA device" in before.stderr
    r = run("move", src, "cpu", "-o", out)
    assert r.stdout == (f"move: 5 of 5 storages now on cpu; wrote {out} ({out} was in the "
                        "legacy (non-zip) torch.save format and is now written in the zip "
                        "format)\n")
    after = fresh(f"import torch; sd = torch.load({str(out)!r}); "
                  "print(type(sd).__name__, [(k, tuple(v.shape), str(v.device)) "
                  "for k, v in sd.items()])")
    assert after.returncode == 0, after.stderr
    want = torch.load(src, map_location="cpu", weights_only=True)
    assert after.stdout == f"OrderedDict {[(k, tuple(v.shape), 'cpu') for k, v in want.items()]}\n"
    got = torch.load(out, weights_only=True)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_dists_move_cpu_is_a_copy(tmp_path: Path) -> None:
    out = tmp_path / "w.pt"
    r = run("move", WILD / "dists_weights.pt", "cpu", "-o", out)
    assert r.stdout == ("move: all 2 storages are already where they belong; no changes; "
                        f"{out} is a copy\n")
    assert out.read_bytes() == (WILD / "dists_weights.pt").read_bytes()


# ------------------------------------------------------------------------------ Python 2 forms

def test_py2_adam_forms_as_read() -> None:
    ckpt = ckpttool.open(WILD / "py2_adam.pth")
    root = ckpt.root
    assert root["arch"] == "tiny_mlp" and root["epoch"] == 3 and root["seen_samples"] == 15
    sd, ema = root["state_dict"], root["ema"]
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert type(sd) is collections.OrderedDict and list(sd) == names  # [k, v] lists
    assert type(ema) is collections.OrderedDict and list(ema) == names  # (k, v) tuples
    assert [v.qualname for v in ema.values()] == [
        "torch.nn.parameter.Parameter", "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state", "torch._utils._rebuild_parameter"]
    assert all(isinstance(v, TensorRef) and v.is_parameter for v in ema.values())
    assert [v.requires_grad for v in ema.values()] == [True, True, True, False]
    assert [list(v.shape) for v in ema.values()] == [[3, 4], [3], [2, 3], [2]]
    assert [v.base.qualname for v in ema.values()] == ["torch._utils._rebuild_tensor_v2"] * 3 \
        + ["torch._utils._rebuild_tensor"]
    scale = root["loss_scale"]
    assert (scale.qualname, scale.dtype, scale.shape, scale.value) == \
        ("torch._utils._rebuild_tensor", "float16", (), 1024.0)
    assert isinstance(scale.storage.storage_type, Global)
    assert scale.storage.storage_type.qualname == "torch.HalfStorage"
    assert {s.storage.storage_type.qualname for s in sd.values()} == {"torch.cuda.FloatStorage"}
    opt = ckpt.optimizer("/optimizer")
    assert opt.type == "Adam"
    assert [s.param for s in opt.state] == PY2_IDS
    assert {s.entries["step"] for s in opt.state} == {3}
    assert ckpt.devices == {"cpu": 2, "cuda:0": 15}
    assert ckpt.safety.level == "weights-only"
    # what torch reads, for the same file
    t = torch.load(WILD / "py2_adam.pth", map_location="cpu", weights_only=True)
    assert list(t["ema"]) == names and isinstance(t["ema"]["0.weight"], torch.nn.Parameter)
    assert t["optimizer"]["state"][PY2_IDS[0]]["step"] == 3


RESUME = """
import torch
ckpt = torch.load({path!r})
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
model.load_state_dict(ckpt["state_dict"])
opt = torch.optim.Adam(model.parameters(), lr=0.5)
opt.load_state_dict(ckpt["optimizer"])
x, y = torch.randn(5, 4), torch.randn(5, 2)
torch.nn.functional.mse_loss(model(x), y).backward()
opt.step()
print(opt.param_groups[0]["lr"], [float(s["step"]) for s in opt.state.values()])
print([p.detach().flatten().tolist() for p in model.parameters()])
"""


def test_py2_adam_move_set_lr_and_resume(tmp_path: Path) -> None:
    src, a, b = WILD / "py2_adam.pth", tmp_path / "a.pth", tmp_path / "b.pth"
    r = run("move", src, "cpu", "-o", a)
    assert r.stdout == (f"move: 15 of 17 storages now on cpu; wrote {a} ({a} was in the "
                        "legacy (non-zip) torch.save format and is now written in the zip "
                        "format)\n")
    r = run("set-lr", a, "1e-3", "-o", b)
    assert r.stdout == ("set-lr: lr 0.001 in optimizer /optimizer (group 0 x0.1); no "
                        f"scheduler; 1 value changed; wrote {b}\n")
    got = fresh(RESUME.format(path=str(b)))
    assert got.returncode == 0, got.stderr
    # the same resume by hand from the original, read by torch with map_location
    ref = torch.load(src, map_location="cpu", weights_only=True)
    ref["optimizer"]["param_groups"][0]["lr"] = 1e-3
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    model.load_state_dict(ref["state_dict"])
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    opt.load_state_dict(ref["optimizer"])
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert got.stdout == (f"0.001 {[4.0] * 4}\n"
                          f"{[p.detach().flatten().tolist() for p in model.parameters()]}\n")


def _p2(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def test_ordered_dict_of_pairs_both_ways() -> None:
    od = b"ccollections\nOrderedDict\n"
    lists = _p2(od + b"((](U\x01aK\x01e](U\x01bK\x02eltR")  # OrderedDict([["a", 1], ["b", 2]])
    tuples = _p2(od + b"(((U\x01aK\x01t(U\x01bK\x02tttR")  # OrderedDict((("a", 1), ("b", 2)))
    for data in (lists, tuples):
        root = unpickle(data).root
        assert type(root) is collections.OrderedDict and list(root.items()) == \
            [("a", 1), ("b", 2)]
        assert root == pickle_loads(data)
    # a key torch could not hash either: the call stays recorded, as torch.load would fail
    bad = unpickle(_p2(od + b"((](](K\x01eK\x01eltR")).root
    assert isinstance(bad, Reduce) and bad.qualname == "collections.OrderedDict"


def pickle_loads(data: bytes) -> object:
    """Python's own loader on a pickle this test wrote by hand (only OrderedDicts in it)."""
    import pickle
    return pickle.loads(data, encoding="utf-8")


def test_py2_strings_and_longs() -> None:
    # SHORT_BINSTRING, BINSTRING, STRING in UTF-8; LONG1, LONG4 (Python 2 longs)
    data = _p2(b"(U\x04h\xc3\xa9!T\x03\x00\x00\x00abcS'x\\n'\n\x8a\x02\x00\x01"
               b"\x8b\x09\x00\x00\x00" + (2**64).to_bytes(9, "little") + b"t")
    assert unpickle(data).root == ("hé!", "abc", "x\n", 256, 2**64)
    assert unpickle(data).root == pickle_loads(data)
    # not UTF-8: torch.load (encoding="utf-8", strict) fails; read as encoding="latin1" reads
    for op in (b"U\x02\xe9\xe9", b"T\x02\x00\x00\x00\xe9\xe9", b"S'\\xe9\\xe9'\n"):
        u = unpickle(_p2(b"(K\x01" + op + b"t"))
        assert u.root == (1, "\xe9\xe9") and u.latin1_at == 5  # the opcode's offset
        with pytest.raises(UnicodeDecodeError):
            pickle_loads(_p2(op))
        assert pickle.loads(_p2(op), encoding="latin1") == "\xe9\xe9"


def test_py2_latin1_string_noted_in_show_and_check(tmp_path: Path) -> None:
    """A Python 2 numpy scalar holds its bytes in a str: torch.load fails without
    encoding='latin1'; show says so and check fails."""
    path = tmp_path / "py2_numpy.pt"
    value = b"\x00\x00\x00\x00\x00\xe0\x6f\x40"  # float64 255.0, not UTF-8
    dtype = (b"cnumpy\ndtype\n(U\x02f8K\x00K\x01tR(K\x03U\x01<NNNJ\xff\xff\xff\xff"
             b"J\xff\xff\xff\xffK\x00tb")
    main = _p2(b"}(U\x04bestcnumpy.core.multiarray\nscalar\n(" + dtype + b"U\x08" + value
               + b"tRu")
    head = b"".join(pickle.dumps(v, protocol=2) for v in (
        0x1950A86A20F9469CFC6C, 1001,
        {"protocol_version": 1001, "little_endian": True,
         "type_sizes": {"short": 2, "int": 4, "long": 4}}))
    path.write_bytes(head + main + pickle.dumps([], protocol=2))
    at = len(head) + main.index(b"U\x08")
    with pytest.raises(UnicodeDecodeError):
        torch.load(path, weights_only=False)
    got = torch.load(path, weights_only=False, encoding="latin1")
    assert float(got["best"]) == 255.0
    note = ("note:    Python 2 strings that are not UTF-8 (the first at byte {} of the file): "
            "a plain torch.load fails on them (its default encoding='utf-8'); torch.load(..., "
            "encoding='latin1') reads them as shown here, and a file ckpttool rewrites holds "
            "them as Python 3 strings\n")
    r = run("show", path)
    assert note.format(at) in r.stdout
    r = run("check", path, "--json", code=1)
    doc = json.loads(r.stdout)
    assert [(f["id"], f["level"]) for f in doc["findings"]][:1] == [("py2-encoding", "FAIL")]
    assert doc["findings"][0]["message"] == note[len("note:    "):-1].format(at)


def test_parameter_newobj_form() -> None:
    """``Parameter.__new__(cls, data, requires_grad)`` by NEWOBJ, which torch's weights_only
    loader reads as a Parameter too."""
    pid = b"(U\x07storagectorch\nFloatStorage\nU\x010U\x03cpuK\x02tQ"
    tensor = b"ctorch._utils\n_rebuild_tensor\n(" + pid + b"K\x00K\x02\x85K\x01\x85tR"
    data = _p2(b"ctorch.nn.parameter\nParameter\n(" + tensor + b"\x89t\x81")
    root = unpickle(data).root
    assert isinstance(root, TensorRef) and root.is_parameter and root.kind == "newobj"
    assert (root.shape, root.dtype, root.requires_grad) == ((2,), "float32", False)


# ------------------------------------------------------------------------------ TorchScript

def test_torchscript_verdict_and_json() -> None:
    ckpt = ckpttool.open(WILD / "scripted.pt")
    assert ckpt.format == "torchscript" and ckpt.safety.level == "needs-trust"
    assert [c.global_ for c in ckpt.safety.calls] == ["torch.jit.load"]
    assert ckpt.opaque_globals == [] and ckpt.unsafe_globals == []
    with pytest.raises(RuntimeError, match="Cannot use ``weights_only=True`` with TorchScript"):
        torch.load(WILD / "scripted.pt", weights_only=True)
    doc = json.loads(run("show", WILD / "traced.pt", "--json").stdout)
    assert doc["torchscript"] == {
        "module": "__torch__.wild_ts_models.Traced",
        "code": ["code/__torch__/torch/nn/modules/linear.py", "code/__torch__/wild_ts_models.py"],
        "constants": 1,
        "tensors": [
            {"name": "lin.weight", "kind": "parameter", "pointer":
             "/data.pkl/@state/lin/@state/weight", "shape": [2, 3], "dtype": "float32",
             "device": "cpu"},
            {"name": "lin.bias", "kind": "parameter", "pointer": "/data.pkl/@state/lin/@state/bias",
             "shape": [2], "dtype": "float32", "device": "cpu"}]}
    assert doc["safety"]["level"] == "needs-trust"


def test_torchscript_keeps_other_unsafe_calls(tmp_path: Path) -> None:
    """Only TorchScript's own names are TorchScript's: any other global is judged as usual."""
    import zipfile
    src = WILD / "traced.pt"
    out = tmp_path / "evil.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/constants.pkl"):
                data = b"\x80\x02cposix\nsystem\nU\x04true\x85R\x85."
            zout.writestr(info, data)
    ckpt = ckpttool.open(out)
    assert ckpt.safety.level == "unsafe" and ckpt.unsafe_globals == ["posix.system"]
    r = run("move", out, "cuda", "-o", tmp_path / "x.pt", code=4)
    assert not (tmp_path / "x.pt").exists() and r.stdout == ""


TS_CHECK = """
import torch
a = torch.jit.load({src!r})
b = torch.jit.load({out!r})
torch.manual_seed(0)
x = torch.randn({shape})
print(torch.equal(a(x), b(x)), sorted(n for n, _ in b.named_parameters()),
      sorted(n for n, _ in b.named_buffers()))
"""


@pytest.mark.parametrize("name,shape,n", [("scripted.pt", "4, 2, 5", 9),
                                          ("traced.pt", "4, 3", 4)])
def test_torchscript_move_round_trip(name: str, shape: str, n: int, tmp_path: Path) -> None:
    src, cuda, cpu = WILD / name, tmp_path / "cuda.pt", tmp_path / "cpu.pt"
    run("move", src, "cuda", "-o", cuda)
    moved = ckpttool.open(cuda)
    assert moved.format == "torchscript" and moved.devices == {"cuda:0": n}
    failed = fresh(f"import torch; torch.jit.load({str(cuda)!r})")
    assert failed.returncode != 0 and "CUDA" in failed.stderr
    run("move", cuda, "cpu", "-o", cpu)
    assert ckpttool.open(cpu).devices == {"cpu": n}
    got = fresh(TS_CHECK.format(src=str(src), out=str(cpu), shape=shape))
    assert got.returncode == 0, got.stderr
    m = torch.jit.load(src)
    assert got.stdout == (f"True {sorted(n for n, _ in m.named_parameters())} "
                          f"{sorted(n for n, _ in m.named_buffers())}\n")


@pytest.mark.parametrize("argv,command", [
    (["set-lr", "{P}", "1e-3"], "set-lr"),
    (["set", "{P}", "lr=0.1"], "set"),
    (["merge-groups", "{P}"], "merge-groups"),
    (["convert", "{P}", "--to", "adam"], "convert"),
])
def test_torchscript_other_edits_refused(argv: list[str], command: str) -> None:
    path = WILD / "scripted.pt"
    r = run(*[a.replace("{P}", str(path)) for a in argv], code=1)
    assert r.stderr == (f"Error: {path}: a TorchScript archive (torch.jit.save) holds a compiled "
                        f"module, with no optimizer or scheduler state: {command} does not apply "
                        "to it; only move does; to change the module, torch.jit.load it (if you "
                        "trust it), edit it and torch.jit.save it again\n")


def test_torchscript_check_warns_weights_only() -> None:
    r = run("check", WILD / "traced.pt")
    assert r.stdout == (
        "level    id            pointer    message                                        "
        "              hint\n"
        "-------  ------------  ---------  -----------------------------------------------"
        "------------  -------------------------------------------\n"
        "WARN     weights-only  (root)     a TorchScript archive: torch.load hands it to  "
        "              load it with torch.jit.load if you trust it\n"
        "                                  torch.jit.load, which runs its TorchScript code"
        " and refuses\n"
        "                                  weights_only=True\n"
        "check ok: 0 fail, 1 warn, 0 info\n")
