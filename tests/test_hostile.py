"""Hostile and broken inputs: nothing in a file may run, and every failure is one clean error.

Everything here builds real files in ``tmp_path`` (no mocks). Malicious payloads are hand
assembled pickle opcodes, or ``pickle.dumps`` of objects with ``__reduce__``; each is packaged
as a torch.save zip next to a real SGD state_dict, read with ``ckpttool.open`` (and the CLI),
and checked to (1) be reported unsafe with the exact dangerous globals, (2) leave no marker.
A positive control runs a few payloads with the real ``pickle`` in a subprocess to prove they
really would create their marker.

See /work/shared/notes/hostile-inputs.md for the cases.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import pytest

import ckpttool
from ckpttool.errors import CkptError, UnreadableError
from ckpttool.render import show_text
from conftest import FIXTURES

ROOT = FIXTURES.parent
SGD = FIXTURES / "optim_sgd_momentum.pt"
FIXTURE_MARKER = Path("/tmp/ckpttool_pwned_marker")


# --------------------------------------------------------------------------------------------
# building blocks: pickle opcodes and torch zip archives (shared with the security corpus)

sys.path.insert(0, str(Path(__file__).resolve().parent / "security"))
from corpus import (PREFIX, SGD_OTHER, SGD_PKL, SU, G, S, U, call,  # noqa: E402
                    strip_pickle, with_payload)


def write_zip(path: Path, data_pkl: bytes, compress: int = zipfile.ZIP_STORED,
              others: list[tuple[str, bytes]] | None = None, prefix: str = PREFIX) -> Path:
    """A torch.save-style zip: ``prefix/data.pkl`` first, then the SGD file's other records."""
    with zipfile.ZipFile(path, "w", compress) as z:
        z.writestr(f"{prefix}/data.pkl", data_pkl)
        for n, b in SGD_OTHER if others is None else others:
            z.writestr(f"{prefix}/{n}", b)
    return path


def write_payload(path: Path, payload: bytes, proto: int = 2) -> Path:
    return write_zip(path, with_payload(payload, proto))


def cli(*args: str | os.PathLike[str], env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "ckpttool", *map(str, args)],
                          capture_output=True, text=True, env=e, timeout=60, cwd=ROOT)


# --------------------------------------------------------------------------------------------
# 1. malicious pickles

def _payloads(m: Path) -> dict[str, tuple[bytes, set[str]]]:
    """name -> (payload opcodes, exact dangerous globals). Each would create file ``m``."""
    cmd = f"touch {m}"
    py = f"open({str(m)!r}, 'w').close()"
    pyexpr = f"__import__('os').system({cmd!r})"
    touch_list = b"](" + U("touch") + U(str(m)) + b"e"
    return {
        "global_os_system": (call(G("os", "system"), U(cmd)), {"os.system"}),
        "global_posix_system": (call(G("posix", "system"), U(cmd)), {"posix.system"}),
        "global_nt_system": (call(G("nt", "system"), U(cmd)), {"nt.system"}),
        "subprocess_popen": (G("subprocess", "Popen") + touch_list + b"\x85R",
                             {"subprocess.Popen"}),
        "subprocess_check_call": (G("subprocess", "check_call") + touch_list + b"\x85R",
                                  {"subprocess.check_call"}),
        "builtins_eval": (call(G("builtins", "eval"), U(pyexpr)), {"builtins.eval"}),
        "builtin_eval_py2_name": (call(G("__builtin__", "eval"), U(pyexpr)),
                                  {"__builtin__.eval"}),
        "builtins_exec": (call(G("builtins", "exec"), U(py)), {"builtins.exec"}),
        "builtins_open": (call(G("builtins", "open"), U(str(m)), U("w")), {"builtins.open"}),
        "getattr_import": (call(call(G("builtins", "getattr"),
                                     call(G("builtins", "__import__"), U("os")),
                                     U("system")), U(cmd)),
                           {"builtins.getattr", "builtins.__import__",
                            "<result of builtins.getattr>"}),
        # STACK_GLOBAL fed through the memo: the strings are BINPUT, popped, then BINGET
        "stack_global_memo": (U("os") + b"q\x10" + b"0" + U("system") + b"q\x11" + b"0"
                              + b"h\x10h\x11\x93(" + U(cmd) + b"tR", {"os.system"}),
        "stack_global_long_memo": (SU("posix") + b"r\x00\x00\x01\x00" + b"0" + SU("system")
                                   + b"\x94" + b"0" + b"j\x00\x00\x01\x00" + b"h\x01" + b"\x93("
                                   + SU(cmd) + b"tR", {"posix.system"}),
        "stack_global_string": (S("os") + S("system") + b"\x93(" + S(cmd) + b"tR",
                                {"os.system"}),
        "stack_global_builtins_exec": (SU("builtins") + SU("exec") + b"\x93" + SU(py)
                                       + b"\x85R", {"builtins.exec"}),
        "inst": (b"(" + S(cmd) + b"ios\nsystem\n", {"os.system"}),
        "inst_popen": (b"(" + touch_list + b"isubprocess\nPopen\n", {"subprocess.Popen"}),
        "obj": (b"(" + G("os", "system") + U(cmd) + b"o", {"os.system"}),
        "obj_stack_global": (b"(" + SU("posix") + SU("system") + b"\x93" + SU(cmd) + b"o",
                             {"posix.system"}),
        "newobj": (G("subprocess", "Popen") + b"(" + touch_list + b"t\x81",
                   {"subprocess.Popen"}),
        # gadgets through modules that look harmless
        "runpy_run_code": (call(G("runpy", "_run_code"), U(f"import os; os.system({cmd!r})"),
                                b"}"), {"runpy._run_code"}),
        "cprofile_run": (call(G("cProfile", "run"), U(f"import os; os.system({cmd!r})")),
                         {"cProfile.run"}),
        "pip_main": (call(G("pip", "main"), b"](" + U("install") + U("evil-package") + b"e"),
                     {"pip.main"}),
        "pip_internal": (call(G("pip._internal.cli.main", "main"),
                              b"](" + U("install") + U("evil") + b"e"),
                         {"pip._internal.cli.main.main"}),
        "torch_inductor_compile": (call(G("torch._inductor.cpp_builder", "run_compile_cmd"),
                                        U(cmd), U("/")),
                                   {"torch._inductor.cpp_builder.run_compile_cmd"}),
        "codecs_and_os": (call(G("os", "system"),
                               call(G("codecs", "decode"),
                                    U(cmd.translate(str.maketrans(
                                        "abcdefghijklmnopqrstuvwxyz",
                                        "nopqrstuvwxyzabcdefghijklm"))), U("rot13"))),
                          {"os.system", "codecs.decode"}),
        "allowed_codecs_encode_into_os": (call(G("os", "system"),
                                               call(G("_codecs", "encode"), U(cmd),
                                                    U("latin1"))), {"os.system"}),
        "partial_torch_load": (call(call(G("functools", "partial"), G("torch", "load"),
                                         U(str(m.with_suffix(".pt"))),
                                         )), {"<result of functools.partial>", "torch.load"}),
        "torch_serialization_load": (call(G("torch.serialization", "load"), U("/x.pt")),
                                     {"torch.serialization.load"}),
        "attrgetter": (call(call(G("operator", "attrgetter"), U("system")),
                            G("posixpath", "os")),
                       {"operator.attrgetter", "<result of operator.attrgetter>", "posixpath.os"}),
        "methodcaller": (call(call(G("operator", "methodcaller"), U("system"), U(cmd)),
                              G("posixpath", "os")),
                         {"operator.methodcaller", "<result of operator.methodcaller>",
                          "posixpath.os"}),
        "pathlib_dotted_method": (call(G("pathlib", "Path.touch"),
                                       call(G("pathlib", "Path"), U(str(m)))),
                                  {"pathlib.Path.touch"}),
        "dunder_name": (call(G("collections", "__builtins__")), {"collections.__builtins__"}),
        # protocol-2 readers map py2 module names (fix_imports): cPickle is pickle
        "cpickle_loads": (call(G("cPickle", "loads"), b"C\x03abc"), {"cPickle.loads"}),
        "commands_getoutput": (call(G("commands", "getoutput"), U(cmd)),
                               {"commands.getoutput"}),
        "numpy_load_real_module": (call(G("numpy.lib._npyio_impl", "load"), U("/x.npy")),
                                   {"numpy.lib._npyio_impl.load"}),
    }


PAYLOAD_NAMES = sorted(_payloads(Path("/m")))


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_malicious_payload_is_flagged_and_never_runs(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    payload, expected = _payloads(marker)[name]
    path = write_payload(tmp_path / f"{name}.pt", payload)
    ckpt = ckpttool.open(path)
    assert ckpt.unsafe is True
    assert set(ckpt.unsafe_globals) == expected
    assert ckpt.format == "torch-zip"
    assert [o.pointer for o in ckpt.optimizers] == ["/optimizer"]  # the real data still reads
    text = show_text(ckpt, None, False, False)
    assert "UNSAFE:" in text
    assert not marker.exists()
    assert not marker.with_suffix(".pt").exists()


class _Reduce:
    def __init__(self, func: object, args: tuple[object, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args


def _reduce_objects(m: Path) -> dict[str, tuple[_Reduce, dict[int, set[str]]]]:
    import builtins
    cmd = f"touch {m}"
    b2 = lambda n: {0: {f"__builtin__.{n}"}, 2: {f"__builtin__.{n}"}, 4: {f"builtins.{n}"}}
    same = lambda q: {0: {q}, 2: {q}, 4: {q}}
    return {
        "os.system": (_Reduce(os.system, (cmd,)), same(f"{os.system.__module__}.system")),
        # protocols < 3 write Python 2 names (pickle's REVERSE_IMPORT_MAPPING)
        "subprocess.Popen": (_Reduce(subprocess.Popen, (["touch", str(m)],)),
                             {0: {"commands.Popen"}, 2: {"commands.Popen"},
                              4: {"subprocess.Popen"}}),
        "eval": (_Reduce(builtins.eval, (f"__import__('os').system({cmd!r})",)), b2("eval")),
        "exec": (_Reduce(builtins.exec, (f"open({str(m)!r}, 'w').close()",)), b2("exec")),
        "open": (_Reduce(builtins.open, (str(m), "w")),
                 same("io.open")),  # open.__module__ is "io"
        "__import__": (_Reduce(builtins.__import__, ("antigravity",)), b2("__import__")),
        "getattr": (_Reduce(builtins.getattr, (pathlib_obj(), "touch")), {
            0: {"__builtin__.getattr"}, 2: {"__builtin__.getattr"},
            4: {"builtins.getattr"}}),
    }


def pathlib_obj() -> object:
    return Path("/nonexistent/ckpttool_never")


@pytest.mark.parametrize("proto", [0, 2, 4])
def test_reduce_payloads_all_protocols(tmp_path: Path, proto: int) -> None:
    marker = tmp_path / "pwned"
    for name, (obj, expected) in _reduce_objects(marker).items():
        body = strip_pickle(pickle.dumps(obj, protocol=proto))
        path = write_payload(tmp_path / "p.pt", body, proto=max(proto, 2))
        ckpt = ckpttool.open(path)
        assert ckpt.unsafe, name
        assert set(ckpt.unsafe_globals) == expected[proto], name
        assert [o.pointer for o in ckpt.optimizers] == ["/optimizer"]
        assert not marker.exists()


@pytest.mark.parametrize("proto", [2, 4])
def test_torch_save_of_reduce_object(tmp_path: Path, proto: int) -> None:
    """The real thing: torch.save of a state_dict plus an object whose __reduce__ is evil."""
    import torch
    marker = tmp_path / "pwned"
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(3)
    opt.step()
    path = tmp_path / "evil.pt"
    torch.save({"optimizer": opt.state_dict(),
                "x": _Reduce(subprocess.Popen, (["touch", str(marker)],)),
                "y": _Reduce(os.system, (f"touch {marker}",))}, path, pickle_protocol=proto)
    ckpt = ckpttool.open(path)
    popen = "commands.Popen" if proto < 3 else "subprocess.Popen"
    assert ckpt.unsafe_globals == sorted({popen, f"{os.system.__module__}.system"})
    assert [o.type for o in ckpt.optimizers] == ["SGD"]
    assert not marker.exists()


def test_payloads_are_real_positive_control(tmp_path: Path) -> None:
    """The plain pickle module *does* run these payloads (proves the tests above mean something).

    Runs in a throwaway subprocess; each payload only creates a file in tmp_path.
    """
    names = ["global_os_system", "global_posix_system", "subprocess_check_call", "builtins_eval",
             "builtins_exec", "builtins_open", "getattr_import", "stack_global_memo",
             "stack_global_long_memo", "stack_global_string", "stack_global_builtins_exec",
             "inst", "obj", "obj_stack_global", "runpy_run_code", "cprofile_run",
             "codecs_and_os", "allowed_codecs_encode_into_os", "methodcaller"]
    script = ["import pickle, sys"]
    for n in names:
        marker = tmp_path / f"pwned_{n}"
        payload, _ = _payloads(marker)[n]
        blob = b"\x80\x04" + payload + b"."
        script.append(f"pickle.loads({blob!r})")
    r = subprocess.run([sys.executable, "-c", "\n".join(script)], capture_output=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    missing = [n for n in names if not (tmp_path / f"pwned_{n}").exists()]
    assert missing == []


def test_nested_pickle_in_bytes_stays_bytes(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    inner = pickle.dumps(_Reduce(os.system, (f"touch {marker}",)), protocol=4)
    path = write_payload(tmp_path / "nested.pt",
                         b"B" + struct.pack("<I", len(inner)) + inner)
    ckpt = ckpttool.open(path)
    assert ckpt.unsafe is False
    assert ckpt.unsafe_globals == []
    assert ckpt.resolve("/x") == inner
    assert isinstance(ckpt.resolve("/x"), bytes)
    assert not marker.exists()


@pytest.mark.parametrize("fixture,qualname", [
    ("unsafe_os_system.pt", "posix.system"), ("unsafe_exec.pt", "__builtin__.exec")])
def test_unsafe_fixtures_through_cli(fixture: str, qualname: str) -> None:
    for m in (FIXTURE_MARKER, Path(str(FIXTURE_MARKER) + "_exec")):
        m.unlink(missing_ok=True)
    for env in (None, {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}):
        r = cli("show", FIXTURES / fixture, env=env)
        assert r.returncode == 0, r.stderr
        unsafe = [ln for ln in r.stdout.splitlines() if ln.startswith("safety:  UNSAFE:")]
        assert len(unsafe) == 1 and qualname in unsafe[0]
        assert "Traceback" not in r.stderr
        assert not FIXTURE_MARKER.exists()
        assert not Path(str(FIXTURE_MARKER) + "_exec").exists()
    assert ckpttool.open(FIXTURES / fixture).unsafe_globals == [qualname]


def test_force_no_weights_only_env_changes_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    pay = _payloads(marker)
    for name in ("global_os_system", "stack_global_memo", "partial_torch_load"):
        path = write_payload(tmp_path / f"{name}.pt", pay[name][0])
        plain = cli("show", path)
        forced = cli("show", path, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
        assert plain.returncode == forced.returncode == 0
        assert plain.stdout == forced.stdout
        assert "UNSAFE:" in forced.stdout
        assert not marker.exists()


# --------------------------------------------------------------------------------------------
# 2. legitimate opaque globals

def test_opaque_fixture_is_not_unsafe() -> None:
    ckpt = ckpttool.open(FIXTURES / "opaque.pt")
    assert ckpt.unsafe is False
    assert ckpt.opaque_globals == ["argparse.Namespace", "numpy._core.multiarray.scalar",
                                   "numpy.dtype", "pathlib.PosixPath"]


def test_hf_training_args_is_not_unsafe() -> None:
    ckpt = ckpttool.open(FIXTURES / "hf_trainer" / "checkpoint-4")
    assert ckpt.unsafe is False
    assert "transformers.training_args.TrainingArguments" in ckpt.opaque_globals
    f = ckpttool.checkpoint.read_file(str(FIXTURES / "hf_trainer/checkpoint-4/training_args.bin"),
                                      "training_args.bin")
    assert f.unsafe_globals == []
    assert "transformers.trainer_utils.IntervalStrategy" in f.opaque_globals


def test_legit_opaque_classes_handmade(tmp_path: Path) -> None:
    globs = [("argparse", "Namespace"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
             ("numpy", "float64"), ("numpy.core.multiarray", "scalar"),
             ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
             ("numpy", "dtype"), ("omegaconf.dictconfig", "DictConfig"),
             ("omegaconf.base", "ContainerMetadata"), ("omegaconf.nodes", "AnyNode"),
             ("enum", "Enum"), ("my_project.config", "Mode"),
             ("collections", "defaultdict"), ("copy_reg", "_reconstructor"),
             ("copyreg", "_reconstructor"), ("__builtin__", "object"), ("builtins", "set"),
             ("datetime", "datetime"), ("decimal", "Decimal"), ("fractions", "Fraction")]
    # called (a class constructed, a known data constructor run), and referenced only
    payload = b"(" + b"".join(call(G(m, n), U("a")) for m, n in globs) \
        + G("typing", "Any") + G("torch._C._nn", "gelu") + b"l"
    ckpt = ckpttool.open(write_payload(tmp_path / "opaque.pt", payload))
    assert ckpt.unsafe is False
    assert ckpt.unsafe_globals == []
    assert ckpt.safety.level == "needs-trust"
    assert set(ckpt.opaque_globals) == {f"{m}.{n}" for m, n in globs} - {"builtins.set"} \
        | {"typing.Any", "torch._C._nn.gelu"}


# --------------------------------------------------------------------------------------------
# 3. zip tricks

def _open_error(path: Path) -> str:
    t0 = time.monotonic()
    with pytest.raises(UnreadableError) as ei:
        ckpttool.open(path)
    # a bound against bombs that would run for hours (2^60 hashing, memo expansion), not a
    # speed test: the 1M-opcode cases take ~1 s, ~2 s on a loaded 2-CPU machine
    assert time.monotonic() - t0 < 10
    msg = str(ei.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_zip_duplicate_data_pkl(tmp_path: Path) -> None:
    path = tmp_path / "dup.pt"
    write_zip(path, SGD_PKL)
    with pytest.warns(UserWarning), zipfile.ZipFile(path, "a") as z:
        z.writestr(f"{PREFIX}/data.pkl", with_payload(call(G("os", "system"), U("x"))))
    ckpt = ckpttool.open(path)  # torch.load reads the first data.pkl: so does ckpttool
    assert [o.type for o in ckpt.optimizers] == ["SGD"] and not ckpt.unsafe
    assert ckpt.notes == [f"zip member '{PREFIX}/data.pkl' appears twice: torch.load reads the "
                          "first, ckpttool too"]
    r = cli("set-lr", path, "0.1")
    assert r.returncode == 1 and "ckpttool reads such an archive but does not write" in r.stderr


@pytest.mark.parametrize("name", ["../data.pkl", "archive/../../etc/passwd",
                                  "archive/data/../../x", "/abs/data.pkl", "a\\b/data.pkl"])
def test_zip_dotdot_and_odd_names(tmp_path: Path, name: str) -> None:
    path = tmp_path / "dotdot.pt"
    others = [*SGD_OTHER]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", SGD_PKL)
        for n, b in others:
            z.writestr(f"archive/{n}", b)
        zi = zipfile.ZipInfo("x")
        zi.filename = name  # bypass zipfile's own sanitising
        z.writestr(zi, b"evil")
    msg = _open_error(path)
    assert "not a torch record name" in msg or "two archive folders" in msg


def _patch(path: Path, old: bytes, new: bytes, nth: int = 0) -> None:
    data = bytearray(path.read_bytes())
    pos = -1
    for _ in range(nth + 1):
        pos = data.index(old, pos + 1)
    data[pos:pos + len(old)] = new
    path.write_bytes(bytes(data))


def test_zip_local_central_name_mismatch(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "mismatch.pt", SGD_PKL)
    # the first occurrence is the local header's name, the second the central directory's
    _patch(path, f"{PREFIX}/data.pkl".encode(), f"{PREFIX}/data.pkx".encode(), nth=0)
    ckpt = ckpttool.open(path)  # torch.load goes by the central directory: so does ckpttool
    assert [o.type for o in ckpt.optimizers] == ["SGD"]
    assert ckpt.notes == [f"zip member '{PREFIX}/data.pkl' is named '{PREFIX}/data.pkx' in its "
                          "local header: torch.load goes by the central directory's name, "
                          "ckpttool too (other zip tools may read another member)"]
    path2 = write_zip(tmp_path / "mismatch2.pt", SGD_PKL)
    _patch(path2, f"{PREFIX}/data.pkl".encode(), f"{PREFIX}/evil.pkl".encode(), nth=1)
    assert _open_error(path2)  # central says evil.pkl: no data.pkl in the directory


def _central_entries(data: bytes) -> list[int]:
    out, pos = [], data.find(b"PK\x01\x02")
    while pos >= 0:
        out.append(pos)
        pos = data.find(b"PK\x01\x02", pos + 4)
    return out


def test_zip_encrypted_flag(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "enc.pt", SGD_PKL)
    data = bytearray(path.read_bytes())
    cd = _central_entries(bytes(data))[0]
    data[cd + 8] |= 1
    path.write_bytes(bytes(data))
    assert "encrypted" in _open_error(path)


def test_zip_member_size_past_eof(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "past.pt", SGD_PKL)
    data = bytearray(path.read_bytes())
    cd = _central_entries(bytes(data))[-1]  # the last record, .data/serialization_id
    struct.pack_into("<II", data, cd + 20, 10_000_000, 10_000_000)
    path.write_bytes(bytes(data))
    assert "past the end" in _open_error(path)
    # the same for data.pkl itself
    path2 = write_zip(tmp_path / "past2.pt", SGD_PKL)
    data = bytearray(path2.read_bytes())
    cd = _central_entries(bytes(data))[0]
    struct.pack_into("<II", data, cd + 20, 0x7FFFFFF0, 0x7FFFFFF0)
    path2.write_bytes(bytes(data))
    assert "past the end" in _open_error(path2)


def _zero_deflate(n_mib: int) -> bytes:
    """A raw deflate stream of ``n_mib`` MiB of zeros, built without compressing them all."""
    mib = bytes(1 << 20)
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = co.compress(mib) + co.flush(zlib.Z_SYNC_FLUSH)
    again = co.compress(mib) + co.flush(zlib.Z_SYNC_FLUSH)  # window is all zeros: repeatable
    return first + again * (n_mib - 1) + co.flush()


def _replace_data_pkl(path: Path, raw: bytes, usize: int, method: int = 8) -> None:
    """Rewrite ``path`` with data.pkl's stored bytes ``raw`` declaring ``usize``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{PREFIX}/data.pkl", b"\0" * len(raw))
        for n, b in SGD_OTHER:
            z.writestr(f"{PREFIX}/{n}", b)
    data = bytearray(buf.getvalue())
    local = data.index(b"PK\x03\x04")
    nlen = struct.unpack_from("<H", data, local + 26)[0]
    start = local + 30 + nlen
    data[start:start + len(raw)] = raw
    struct.pack_into("<H", data, local + 8, method)
    struct.pack_into("<I", data, local + 22, usize)
    cd = _central_entries(bytes(data))[0]
    struct.pack_into("<H", data, cd + 10, method)
    struct.pack_into("<I", data, cd + 24, usize)
    path.write_bytes(bytes(data))


def test_zip_bomb_data_pkl(tmp_path: Path) -> None:
    bomb = _zero_deflate(600)  # 600 MiB of zeros in about 600 KB
    assert len(bomb) < 1 << 20
    # honest declared size: refused for its ratio before inflating anything
    path = tmp_path / "bomb.pt"
    _replace_data_pkl(path, bomb, 600 << 20)
    assert "zip bomb" in _open_error(path)
    # declared size lies (small): inflation stops just past it
    path2 = tmp_path / "bomb2.pt"
    _replace_data_pkl(path2, bomb, 1000)
    msg = _open_error(path2)
    assert "inflates past" in msg
    # declared size over the limit
    path3 = tmp_path / "bomb3.pt"
    _replace_data_pkl(path3, bomb, 0xFFFFFFF0)
    assert "limit" in _open_error(path3)


def test_deflated_data_pkl_reads(tmp_path: Path) -> None:
    """A legitimately deflated archive (re-zipped by a user) still reads."""
    path = write_zip(tmp_path / "deflated.pt", SGD_PKL, compress=zipfile.ZIP_DEFLATED)
    ckpt = ckpttool.open(path)
    assert [o.type for o in ckpt.optimizers] == ["SGD"]


def test_data_pkl_crc(tmp_path: Path) -> None:
    # a flipped bit inside a string of data.pkl would unpickle silently: the CRC catches it
    path = write_zip(tmp_path / "flip.pt", SGD_PKL)
    _patch(path, b"momentum_buffer", b"momentum_bufger")
    ckpt = ckpttool.open(path)  # torch.load does not check CRCs: read, and said
    assert ckpt.notes == ["data.pkl fails its CRC check (torch.load does not check): its "
                          "bytes changed after the save"]
    assert [(f.id, f.level) for f in ckpttool.check(path).findings if f.level == "FAIL"] == [
        ("crc", "FAIL")]
    # files written without CRCs (crc 0) are not flagged
    path2 = write_zip(tmp_path / "nocrc.pt", SGD_PKL)
    data = bytearray(path2.read_bytes())
    for cd in _central_entries(bytes(data)):
        struct.pack_into("<I", data, cd + 16, 0)
    struct.pack_into("<I", data, 14, 0)
    path2.write_bytes(bytes(data))
    assert [o.type for o in ckpttool.open(path2).optimizers] == ["SGD"]


# --------------------------------------------------------------------------------------------
# 4. resource attacks

def _timed_error(tmp_path: Path, data_pkl: bytes, name: str = "res.pt") -> str:
    path = write_zip(tmp_path / name, data_pkl)
    return _open_error(path)


def test_memo_bomb_lists(tmp_path: Path) -> None:
    # L0 = []; L(i+1) = [Li, Li]: 2**40 lists once expanded
    body = b"]q\x000"
    for _ in range(40):
        body += b"(h\x00h\x00lq\x000"
    body += b"h\x00"
    msg = _timed_error(tmp_path, b"\x80\x02}(" + U("x") + body + b"u.")
    assert "memo bomb" in msg


def test_dup_bomb_tuples(tmp_path: Path) -> None:
    body = b")" + b"2\x86" * 40
    msg = _timed_error(tmp_path, b"\x80\x02}(" + U("x") + body + b"u.")
    assert "memo bomb" in msg


def test_dup_bomb_tuple_as_dict_key(tmp_path: Path) -> None:
    # hashing a tuple that shares its parts costs its expanded size: 2**60 here
    body = b")" + b"2\x86" * 60
    msg = _timed_error(tmp_path, b"\x80\x02}" + body + b"Ns.")
    assert "hash" in msg


@pytest.mark.parametrize("kind", ["tuple_key", "frozenset", "set_additems", "set_builtin"])
def test_deep_tuple_hashing_does_not_crash(tmp_path: Path, kind: str) -> None:
    # CPython's tuple hash recurses in C: 10**6 levels would overflow the C stack (segfault)
    deep = b")" + b"\x85" * 1_000_000
    body = {
        "tuple_key": b"}" + deep + b"Ns",
        "frozenset": b"(" + deep + b"\x91",
        "set_additems": b"\x8f(" + deep + b"\x90",
        "set_builtin": G("builtins", "set") + b"](" + deep + b"e\x85R",
    }[kind]
    msg = _timed_error(tmp_path, b"\x80\x04}(" + U("x") + body + b"u.")
    assert "deep" in msg


@pytest.mark.parametrize("op", [b"X", b"B", b"T", b"\x8d", b"\x8e", b"\x96", b"\x8b"])
def test_huge_declared_lengths(tmp_path: Path, op: bytes) -> None:
    n = b"\xf0\xff\xff\x7f" if op in (b"T", b"\x8b", b"X", b"B") else b"\xf0" + b"\xff" * 7
    msg = _timed_error(tmp_path, b"\x80\x04}(" + U("x") + op + n + b"abc" + b"u.")
    assert "malformed pickle" in msg


def test_deeply_nested_lists(tmp_path: Path) -> None:
    n = 100_000
    msg = _timed_error(tmp_path, b"\x80\x02}(" + U("x") + b"]" * n + b"a" * (n - 1) + b"u.")
    assert "deeper than" in msg
    msg = _timed_error(tmp_path, b"\x80\x02}(" + U("x") + b"(" * n + b"u.", "marks.pt")
    assert "nested MARK" in msg


def test_deep_dict_nesting(tmp_path: Path) -> None:
    n = 100_000
    # d0 = {}; d(i+1) = {"k": d(i)}, each kept in memo slot 0
    parts = [b"}q\x000"]
    for _ in range(n):
        parts.append(b"}" + U("k") + b"h\x00" + b"sq\x00" + b"0")
    parts.append(b"h\x00")
    msg = _timed_error(tmp_path, b"\x80\x02}(" + U("x") + b"".join(parts) + b"u.")
    assert "deeper than" in msg


def test_huge_storage_numel_vs_small_record(tmp_path: Path) -> None:
    pkl = SGD_PKL.replace(b"cpu", b"cpu", 1)
    # the first storage pid: ("storage", FloatStorage, "0", "cpu", 12) -> numel 2**62
    i = pkl.index(U("0") + b"q")
    j = pkl.index(U("cpu"), i)
    k = j + len(U("cpu"))
    # skip an optional BINPUT after "cpu"
    if pkl[k:k + 1] == b"q":
        k += 2
    assert pkl[k:k + 1] == b"K"
    bad = pkl[:k] + b"\x8a\x08" + struct.pack("<q", 1 << 62) + pkl[k + 2:]
    path = write_zip(tmp_path / "numel.pt", bad)
    msg = _open_error(path)
    assert "declares" in msg


# --------------------------------------------------------------------------------------------
# 5. broken inputs through the CLI

def _cli_error(path: Path | str, *words: str) -> str:
    r = cli("show", path)
    assert r.returncode == 3, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("Error: ")
    assert str(path) in lines[0]
    assert "Traceback" not in r.stderr
    low = lines[0].lower()
    assert any(w.lower() in low for w in words), lines[0]
    return lines[0]


def _broken_files(tmp_path: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    real = SGD.read_bytes()
    out: dict[str, tuple[bytes | None, tuple[str, ...]]] = {
        "empty": (b"", ("empty",)),
        "one_byte": (real[:1], ("truncated",)),
        "half": (real[:len(real) // 2], ("truncated",)),
        "minus1": (real[:-1], ("truncated",)),
        "minus22": (real[:-22], ("truncated",)),
        "text": (b"epoch: 3\nloss: 0.25\n", ("text",)),
        "html": (b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>\n",
                 ("HTML",)),
        "lfs": (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"a" * 64
                + b"\nsize 123456\n", ("Git LFS",)),
        "random": (random.Random(7).randbytes(4096), ("not a checkpoint",)),
        "png": (b"\x89PNG\r\n\x1a\n" + bytes(100), ("PNG",)),
        "prepended": (b"garbage!" * 16 + real, ("not a checkpoint", "corrupt")),
    }
    res = {}
    for name, (data, words) in out.items():
        p = tmp_path / f"{name}.pt"
        p.write_bytes(data)
        res[name] = (p, words)
    return res


def test_broken_inputs_cli(tmp_path: Path) -> None:
    for name, (p, words) in _broken_files(tmp_path).items():
        _cli_error(p, *words)


def test_npy_cli(tmp_path: Path) -> None:
    import numpy as np
    p = tmp_path / "arr.pt"
    with open(p, "wb") as fh:
        np.save(fh, np.arange(10))
    _cli_error(p, "NumPy")


def test_safetensors_named_pt_is_read(tmp_path: Path) -> None:
    src = FIXTURES / "hf_trainer" / "checkpoint-4" / "model.safetensors"
    p = tmp_path / "model.pt"
    shutil.copy(src, p)
    r = cli("show", p)
    assert r.returncode == 0, r.stderr
    assert any(ln.split() == ["format:", "safetensors"] for ln in r.stdout.splitlines())


def test_directory_missing_and_permission(tmp_path: Path) -> None:
    d = tmp_path / "empty_dir"
    d.mkdir()
    (d / "notes.txt").write_text("hi")
    _cli_error(d, "no checkpoint")
    _cli_error(tmp_path / "missing.pt", "no such file")
    # A file its reader may not read. Root reads mode-0 files anyway, so as root the CLI
    # runs without the capabilities that override file permissions (util-linux setpriv).
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="ckpttool-perm-"))
    try:
        folder.chmod(0o755)
        locked = folder / "locked.pt"
        shutil.copy(SGD, locked)
        locked.chmod(0)
        drop = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"] \
            if os.geteuid() == 0 else []
        r = subprocess.run([*drop, sys.executable, "-m", "ckpttool", "show", str(locked)],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 3, (r.stdout, r.stderr)
        assert r.stderr == f"Error: {locked}: permission denied (cannot read the file)\n"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_flipped_bit_in_data_pkl_cli(tmp_path: Path) -> None:
    real = SGD.read_bytes()
    pos = real.index(b"\x80\x02}q\x00(") + 2  # the EMPTY_DICT opcode of data.pkl
    flipped = bytearray(real)
    flipped[pos] ^= 0x01  # '}' -> '|', not an opcode
    p = tmp_path / "flip.pt"
    p.write_bytes(bytes(flipped))
    _cli_error(p, "CRC", "corrupt")


def test_appended_garbage_still_reads(tmp_path: Path) -> None:
    p = tmp_path / "appended.pt"
    p.write_bytes(SGD.read_bytes() + b"\0garbage" * 100)
    r = cli("show", p)
    assert r.returncode == 0, r.stderr
    assert "SGD" in r.stdout


def test_prepended_garbage_library(tmp_path: Path) -> None:
    p = tmp_path / "prepended.pt"
    p.write_bytes(b"garbage!" * 16 + SGD.read_bytes())
    try:
        ckpt = ckpttool.open(p)
    except UnreadableError as e:
        assert str(p) in str(e)
    else:
        assert [o.type for o in ckpt.optimizers] == ["SGD"]


# --------------------------------------------------------------------------------------------
# 6. fuzzing

FUZZ_SEEDS = ["optim_sgd_momentum.pt", "optim_adam.pt", "imagenet_style.pth",
              "imagenet_style_legacy.pth", "opaque.pt", "unsafe_os_system.pt", "bf16.pt"]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del b[rng.randrange(len(b)):]
    elif kind == 2:
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.randbytes(rng.randint(1, 8))
    else:
        i = rng.randrange(len(b))
        b[i] = rng.choice(b"().]}ahq0123456789KMNXBstuelRbQ\x80\x85\x86\x87\x8c\x93\x94")
    return bytes(b)


def _check_one(path: Path) -> None:
    """Only CkptError may escape open(); every tensor the reader returns has sane metadata."""
    t0 = time.monotonic()
    try:
        ckpt = ckpttool.open(path)
    except CkptError as e:
        assert str(path) in str(e)
    else:
        for f in ckpt.files:
            for t in f.tensors:
                assert all(d >= 0 for d in t.shape) and len(t.stride) == len(t.shape)
                assert t.offset >= 0 and isinstance(t.dtype, str) and t.numel >= 0
    dt = time.monotonic() - t0
    assert dt < 1, (path, dt)


def test_fuzz(tmp_path: Path) -> None:
    rng = random.Random(20240601)
    seeds = {n: (FIXTURES / n).read_bytes() for n in FUZZ_SEEDS}
    pkls = {}
    for n, data in seeds.items():
        if data[:2] == b"PK":
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                names = z.namelist()
                pkls[n] = (names, {m: z.read(m) for m in names})
    p = tmp_path / "fuzz.pt"
    for i in range(300):
        name = rng.choice(FUZZ_SEEDS)
        if i % 2 and name in pkls:
            # mutate data.pkl and repack with a correct CRC, so the unpickler sees it
            names, members = pkls[name]
            with zipfile.ZipFile(p, "w") as z:
                for m in names:
                    b = members[m]
                    z.writestr(m, _mutate(rng, b) if m.endswith("/data.pkl") else b)
        else:
            p.write_bytes(_mutate(rng, seeds[name]))
        try:
            _check_one(p)
        except BaseException:
            shutil.copy(p, tmp_path / f"crash_{i}.pt")
            raise


# --------------------------------------------------------------------------------------------
# legacy (non-zip) files: every one of the five pickles is unpickled by torch.load

LEGACY = FIXTURES / "imagenet_style_legacy.pth"


def _legacy_parts() -> list[bytes]:
    from ckpttool.formats.unpickler import unpickle
    data = LEGACY.read_bytes()
    parts, pos = [], 0
    for _ in range(5):
        end = unpickle(data, pos).end
        parts.append(data[pos:end])
        pos = end
    return [*parts, data[pos:]]


@pytest.mark.parametrize("which", [0, 2, 3, 4])  # magic, sys_info, main object, storage keys
def test_legacy_malicious_pickle_in_any_part(tmp_path: Path, which: int) -> None:
    marker = tmp_path / "pwned"
    parts = _legacy_parts()
    evil = call(G("os", "system"), U(f"touch {marker}")) + b"0"  # run it, drop the result
    p = parts[which]
    # torch.load would run the call, then go on with the original value
    if which == 0:
        # keep the exact leading bytes torch sniffs: push the magic, pop it, call
        # os.system, pop, push the magic again
        parts[0] = p[:14] + b"0" + evil + p[2:]
    else:
        parts[which] = p[:2] + evil + p[2:]
    path = tmp_path / "legacy_evil.pth"
    path.write_bytes(b"".join(parts))
    ckpt = ckpttool.open(path)
    assert ckpt.format == "torch-legacy"
    assert ckpt.unsafe_globals == ["os.system"]
    assert [o.type for o in ckpt.optimizers] == ["SGD"]
    assert not marker.exists()


def test_legacy_truncated_names_file(tmp_path: Path) -> None:
    data = LEGACY.read_bytes()
    for n, cut in enumerate((30, 500, 1700, len(data) - 5)):
        p = tmp_path / f"legacy_cut{n}.pth"
        p.write_bytes(data[:cut])
        msg = _open_error(p)
        assert "truncated" in msg


def test_folder_with_malicious_raw_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    d = tmp_path / "acc"
    shutil.copytree(FIXTURES / "accelerate_state", d)
    evil = b"\x80\x04" + call(G("posix", "system"), U(f"touch {marker}")) + b"."
    (d / "random_states_1.pkl").write_bytes(evil)
    ckpt = ckpttool.open(d)
    assert ckpt.unsafe_globals == ["posix.system"]
    assert not marker.exists()
    # truncated before the call: os.system is still named (a known-dangerous callable), and
    # the break is said
    (d / "random_states_1.pkl").write_bytes(evil[:-3])
    ckpt = ckpttool.open(d)
    assert ckpt.unsafe_globals == ["posix.system"]
    broken = next(f for f in ckpt.files if f.name == "random_states_1.pkl")
    assert broken.root is None
    assert broken.extra["broken"] == ("a plain pickle that breaks: malformed pickle at byte 96: "
                                      "pickle ends without STOP (truncated)")


def test_dcp_folder_metadata_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    d = tmp_path / "dcp"
    d.mkdir()
    (d / ".metadata").write_bytes(b"\x80\x04" + call(G("os", "system"), U(f"touch {marker}"))
                                  + b".")
    (d / "__0_0.distcp").write_bytes(b"\0" * 16)
    ckpt = ckpttool.open(d)  # judged by the restricted interpreter; nothing else read
    assert ckpt.format == "dcp" and ckpt.unsafe_globals == ["os.system"]
    assert ckpt.optimizers == [] and not marker.exists()


@pytest.mark.parametrize("pkl", [b"V\\u12\n.", b"S'\\x4'\n.", b"I99999999999999999999" + b"9" * 5000
                                 + b"\n.", b"\x80\x02}\x8a\x01\x01\x8f\x8fs."])
def test_unpickler_raises_only_pickle_error(pkl: bytes) -> None:
    from ckpttool.errors import PickleError
    from ckpttool.formats.unpickler import unpickle
    with pytest.raises(PickleError):
        unpickle(pkl)


def test_empty_frozenset_opcode() -> None:
    from ckpttool.formats.unpickler import unpickle
    assert unpickle(b"\x80\x02(\x91.").root == frozenset()
