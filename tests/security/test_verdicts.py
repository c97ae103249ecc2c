"""ckpttool's safety verdicts over the security corpus (tests/security/corpus.py), with an audit
hook armed: nothing ckpttool does may spawn, exec a code string, open a socket, resolve a
pickle global or touch a payload's marker.

* every malicious case: ``show`` exits 0 with a ``safety:  UNSAFE:`` line naming the offending
  call; ``check`` and every writing command exit 4 and leave the input byte-identical;
* every benign case: ``needs-trust`` or ``weights-only`` as the corpus says, never ``unsafe``;
* over every fixture and corpus file torch would load: ``weights-only`` exactly when
  ``torch.load(weights_only=True)`` of the installed torch loads it.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402

import ckpttool  # noqa: E402
from ckpttool.checkpoint import read_file  # noqa: E402
from conftest import FIXTURES, run  # noqa: E402

# ------------------------------------------------------------------------------- audit hook

_ARMED: dict[str, Any] = {"on": False, "markers": None, "events": []}
_FORBIDDEN = ("os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
              "subprocess.Popen", "socket.", "pickle.find_class", "ctypes.")


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if not _ARMED["on"]:
        return
    if event.startswith(_FORBIDDEN):
        _ARMED["events"].append((event, repr(args)[:200]))
    elif event == "exec" and args and getattr(args[0], "co_filename", "").startswith("<") \
            and not args[0].co_filename.startswith("<frozen"):  # a code string, not a module
        _ARMED["events"].append((event, args[0].co_filename))
    elif event == "open" and args and isinstance(args[0], (str, bytes, Path)) \
            and str(_ARMED["markers"]) in str(args[0]):
        _ARMED["events"].append((event, str(args[0])))


sys.addaudithook(_hook)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> list[corpus.Case]:
    d = tmp_path_factory.mktemp("corpus")
    return corpus.build(d / "files", d / "markers")


def _warm_up(tmp: Path) -> None:
    """Run every command once on a good file first: their lazy imports (namedtuple and
    dataclass code strings among them) happen before the hook is armed."""
    import shutil
    tmp.mkdir(exist_ok=True)
    good = tmp / "good.pt"
    shutil.copy(FIXTURES / "optim_sgd_momentum.pt", good)
    run("show", good)
    run("show", "--json", good)
    run("check", good)
    for argv in WRITERS:
        run(*(a.format(p=good, o=tmp / "o.pt") for a in argv), code=None)


def _armed(markers: Path) -> Any:
    class Armed:
        def __enter__(self) -> None:
            _warm_up(markers.parent / "warm")
            _ARMED.update(on=True, markers=markers, events=[])

        def __exit__(self, *exc: Any) -> None:
            _ARMED["on"] = False
    return Armed()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


WRITERS = (("set-lr", "{p}", "0.1"), ("set", "{p}", "weight_decay=0.1"), ("move", "{p}", "cpu"),
           ("merge-groups", "{p}"), ("convert", "{p}", "--to", "adam"),
           ("set-lr", "{p}", "0.1", "-o", "{o}"))


def _names_offender(case: corpus.Case, lines: list[str]) -> bool:
    unsafe = [ln for ln in lines if ln.startswith("  unsafe: ")]
    wanted = (case.offending, *case.also)
    return any(f"unsafe: {w}(" in ln or f"unsafe: {w} " in ln or f"unsafe: {w}:" in ln
               or f"computed by {w}" in ln
               for ln in unsafe for w in wanted if w)


def test_malicious_cases_are_unsafe_and_never_written(cases: list[corpus.Case],
                                                      tmp_path: Path) -> None:
    markers = cases[0].path.parents[1] / "markers"
    markers.mkdir(exist_ok=True)
    wrong: dict[str, str] = {}
    with _armed(markers):
        for c in (c for c in cases if c.malicious):
            before = _sha(c.path)
            show = run("show", c.path)
            lines = show.stdout.splitlines()
            safety = next((ln for ln in lines if ln.startswith("safety:  ")), "")
            if not safety.startswith("safety:  UNSAFE: loading it would run "):
                wrong[c.name] = f"show: {safety or lines[:5]}"
                continue
            if not _names_offender(c, lines):
                wrong[c.name] = f"offender {c.offending} not named: {lines[3:8]}"
                continue
            run("check", c.path, code=4)
            out = tmp_path / f"{c.name}.out"
            for argv in WRITERS:
                r = run(*(a.format(p=c.path, o=out) for a in argv), code=4)
                if not r.stderr.startswith(f"Error: {c.path}: refusing to edit: UNSAFE: "):
                    wrong[c.name] = f"{argv[0]}: {r.stderr[:200]}"
            if _sha(c.path) != before or out.exists():
                wrong[c.name] = "the input changed or OUT was written"
    assert wrong == {}
    assert _ARMED["events"] == []
    assert sorted(p.name for p in markers.iterdir()) == []


def test_benign_cases_are_never_unsafe(cases: list[corpus.Case]) -> None:
    markers = cases[0].path.parents[1] / "markers"
    got, want = {}, {}
    with _armed(markers):
        for c in (c for c in cases if not c.malicious):
            got[c.name] = ckpttool.open(c.path).safety.level
            want[c.name] = c.expect_level
            run("show", c.path)
    assert got == want
    assert _ARMED["events"] == []


def _torch_files() -> list[Path]:
    out = []
    for p in sorted(FIXTURES.rglob("*")):
        if p.is_file() and p.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl") \
                and "global_step" not in p.parent.name or p.name.startswith("mp_rank"):
            out.append(p)
    return sorted(set(out))


_LOAD_ALL = r"""
import json, sys, torch
out = {}
for p in sys.argv[1:]:
    try:
        torch.load(p, weights_only=True, map_location="cpu")
        out[p] = True
    except Exception:  # any refusal or failure: not loadable that way
        out[p] = False
print(json.dumps(out))
"""


def _weights_only_loads(paths: list[str]) -> dict[str, bool]:
    """torch.load(weights_only=True) of each path in a fresh process: the installed torch
    as a user's script meets it (no module imported that registers more safe globals)."""
    import json
    import subprocess
    proc = subprocess.run([sys.executable, "-c", _LOAD_ALL, *paths], capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout)


def test_weights_only_level_matches_the_installed_torch(cases: list[corpus.Case]) -> None:
    """A file is ``weights-only`` exactly when torch.load(weights_only=True) loads it: every
    fixture torch.load reads (zip, legacy, plain pickles of a folder) and every benign case."""
    paths = _torch_files() + [c.path for c in cases if not c.malicious]
    got = {}
    for p in paths:
        f = read_file(str(p))
        if f.format in ("torch-zip", "torch-legacy", "pickle", "torch-tar"):
            got[str(p)] = f.safety.level == "weights-only"
    want = _weights_only_loads(list(got))
    assert len(got) >= 60
    assert got == want


# ------------------------------------------------------------------------------- the rules

def _verdict(tmp_path: Path, payload: bytes) -> tuple[str, list[tuple[str, str]]]:
    path = tmp_path / "x.pt"
    path.write_bytes(corpus.with_payload(payload))
    sf = ckpttool.open(path).safety
    return sf.level, [(c.global_, c.level) for c in sf.calls]


def test_shapes_not_names(tmp_path: Path) -> None:
    """What decides: a never-listed stdlib or numpy function called at load time is unsafe,
    the same function referenced is not; a library class constructed needs trust; bytes fed to
    a library function is unsafe; calling the result of any call is unsafe."""
    G, U, call = corpus.G, corpus.U, corpus.call
    assert _verdict(tmp_path, call(G("calendar", "setfirstweekday"), U("1"))) == (
        "unsafe", [("calendar.setfirstweekday", "unsafe")])
    assert _verdict(tmp_path, call(G("numpy.lib.recfunctions", "stack_arrays"), U("a"))) == (
        "unsafe", [("numpy.lib.recfunctions.stack_arrays", "unsafe")])
    assert _verdict(tmp_path, G("calendar", "setfirstweekday")) == (
        "needs-trust", [("calendar.setfirstweekday", "needs-trust")])
    assert _verdict(tmp_path, call(G("my_lib.config", "TrainConfig"), U("a"))) == (
        "needs-trust", [("my_lib.config.TrainConfig", "needs-trust")])
    assert _verdict(tmp_path, call(G("my_lib.io", "restore"), corpus.BB(b"\x80\x04."))) == (
        "unsafe", [("my_lib.io.restore", "unsafe")])
    assert _verdict(tmp_path, call(call(G("my_lib.registry", "lookup"), U("x")), U("y"))) == (
        "unsafe", [("<result of my_lib.registry.lookup>", "unsafe"),
                   ("my_lib.registry.lookup", "needs-trust")])
    assert _verdict(tmp_path, G("my_lib.compat", "system")) == (
        "unsafe", [("my_lib.compat.system", "unsafe")])


def test_show_of_a_polyglot_and_a_nullifai_pickle(tmp_path: Path) -> None:
    G, U, call = corpus.G, corpus.U, corpus.call
    poly = tmp_path / "poly.pt"
    front = corpus.bare(call(G("os", "system"), U("true")))
    poly.write_bytes(front + (FIXTURES / "optim_sgd.pt").read_bytes())
    r = run("show", poly)
    assert r.stdout.splitlines()[:6] == [
        f"file:    {poly}", "format:  pickle", f"size:    {r.stdout.splitlines()[2][9:]}",
        "safety:  UNSAFE: loading it would run os.system at /: module os runs code, touches "
        "files or the network, or loads pickles. Do not torch.load it with weights_only=False; "
        "ckpttool will not write from it",
        "  unsafe: os.system('true') at /: module os runs code, touches files or the network, "
        "or loads pickles",
        f"note:    {(FIXTURES / 'optim_sgd.pt').stat().st_size} bytes after the pickle (a zip "
        "archive) are never read by torch.load: a pickle-then-zip polyglot; torch.load runs "
        "the pickle in front"]
    broken = tmp_path / "nullifai.pkl"
    broken.write_bytes(b"\x80\x02" + call(G("os", "system"), U("true")) + b"0\xff")
    r = run("show", broken)
    assert r.stdout == (
        f"file:    {broken}\nformat:  pickle\nsize:    {broken.stat().st_size} B "
        f"({broken.stat().st_size} bytes)\n"
        "safety:  UNSAFE: loading it would run os.system (byte 24 of the pickle): module os runs "
        "code, touches files or the network, or loads pickles. Do not torch.load it with "
        "weights_only=False; ckpttool will not write from it\n"
        "  unsafe: os.system('true') at byte 24: module os runs code, touches files or the "
        "network, or loads pickles\n"
        "note:    a plain pickle that breaks: malformed pickle at byte 26: unsupported opcode "
        "0xff (torch.load runs what comes before, then fails)\n"
        "\nno optimizer, scheduler or model state found\n")


def test_stdlib_objects_real_checkpoints_hold(tmp_path: Path) -> None:
    """A pickled Logger (``logging.getLogger(name)``) and a datetime with a ZoneInfo (a
    classmethod called through ``getattr(ZoneInfo, "_unpickle")``) need trust, nothing more;
    the same getattr-then-call shape on anything else stays unsafe."""
    import datetime
    import logging
    import zoneinfo
    path = tmp_path / "objs.pt"
    torch.save({"log": logging.getLogger("train"), "w": torch.ones(2),
                "when": datetime.datetime(2024, 1, 1, tzinfo=zoneinfo.ZoneInfo("UTC"))}, path)
    sf = ckpttool.open(path).safety
    assert [(c.global_, c.level) for c in sf.calls] == [
        ("logging.getLogger", "needs-trust"), ("__builtin__.getattr", "needs-trust"),
        ("zoneinfo.ZoneInfo._unpickle", "needs-trust"), ("datetime.datetime", "needs-trust"),
        ("zoneinfo.ZoneInfo", "needs-trust")]
    G, U, call = corpus.G, corpus.U, corpus.call
    assert _verdict(tmp_path, call(call(G("builtins", "getattr"), G("zoneinfo", "ZoneInfo"),
                                        U("clear_cache")))) == (
        "unsafe", [("<result of builtins.getattr>", "unsafe"),
                   ("builtins.getattr", "needs-trust"), ("zoneinfo.ZoneInfo", "needs-trust")])


def _legacy_tar(path: Path, numel: int = 2) -> None:
    """A pre-1.0 torch.save tar file, as torch's legacy_load reads it: one float storage and
    one tensor on it, and an object referencing the tensor by key (pickles assembled from
    opcodes: nothing is imported)."""
    import io
    import pickle
    import struct
    import tarfile
    G, U = corpus.G, corpus.U

    def p2(body: bytes) -> bytes:
        return b"\x80\x02" + body + b"."
    storages = (pickle.dumps(1, protocol=2)
                + p2(b"K\x00" + U("cpu") + G("torch", "FloatStorage") + b"\x87")
                + struct.pack("<q", numel) + struct.pack(f"<{max(numel, 0)}f",
                                                         *range(max(numel, 0)))
                + pickle.dumps([], protocol=2))
    tensors = (pickle.dumps(1, protocol=2)
               + p2(b"K\x01K\x00" + G("torch", "FloatTensor") + b"\x87")
               + struct.pack("<ii", 1, 0) + struct.pack("<qqq", 2, 1, 0))
    main = p2(b"}(" + U("epoch") + b"K\x03" + U("w") + U("1") + b"Qu")
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("sys_info", pickle.dumps({}, protocol=2)), ("storages", storages),
                           ("tensors", tensors), ("pickle", main)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_legacy_tar_format(tmp_path: Path) -> None:
    """Read and judged (torch refuses weights_only=True for it: needs-trust at best), never
    written; a negative storage size is a clean error, not a loop."""
    path = tmp_path / "old.pt"
    _legacy_tar(path)
    loaded = torch.load(path, weights_only=False)  # our own file: torch reads it as ours does
    assert loaded["epoch"] == 3 and loaded["w"].tolist() == [0.0, 1.0]
    ckpt = ckpttool.open(path)
    assert (ckpt.format, ckpt.safety.level) == ("torch-tar", "needs-trust")
    assert ckpt.root["epoch"] == 3
    r = run("set-lr", path, "0.1", code=1)
    assert r.stderr == (f"Error: {path}: {path} is the pre-1.0 torch tar format: ckpttool reads "
                        "it but does not write it; load it with torch (if you trust it) and "
                        "torch.save it, then edit the new file\n")
    _legacy_tar(path, numel=-5)
    with pytest.raises(ckpttool.UnreadableError,
                       match="tar member 'storages' declares a negative storage size"):
        ckpttool.open(path)
