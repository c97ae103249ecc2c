"""Opening a checkpoint: one file or a trainer folder, as a tree of plain values and references.

``open`` reads only metadata: the zip central directory, data.pkl, safetensors headers and the
bytes of tiny tensors (``step`` and other 0-d values). Tensor bytes are read on request.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from .errors import AmbiguousError, CkptError, PickleError, UnreadableError
from .formats.legacy import read_legacy
from .formats.nodes import Global, Storage, TensorRef
from .formats.safety import Safety
from .formats.safetensors import SafeTensor, read_safetensors
from .formats.torchscript import PICKLES as TS_PICKLES
from .formats.torchscript import is_torchscript
from .formats.torchscript import verdict as ts_verdict
from .formats.torchzip import Archive, read_archive, read_record
from .formats.unpickler import PickleTruncated, Unpickled, unpickle
from .tree import join, opaque_top, resolve, split, storages, tensors

if TYPE_CHECKING:
    from .formats.torchscript import ScriptModule
    from .locate import Found, ModelState, OptimizerState, SchedulerState

TINY_NUMEL = 8  # tensors with at most this many elements have their values read
# Python 2 strings that are not UTF-8 (numpy scalars and arrays pickled by Python 2 hold their
# bytes in one): torch.load's default encoding fails on them
LATIN1_NOTE = ("Python 2 strings that are not UTF-8 (the first at byte {} of {}): a "
               "plain torch.load fails on them (its default encoding='utf-8'); "
               "torch.load(..., encoding='latin1') reads them as shown here, and a file "
               "ckpttool rewrites holds them as Python 3 strings")
_SNIFF = 64

# files inside a folder that ckpttool reads, by suffix
_FOLDER_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".json", ".pkl", ".tar")


def latin1_note(f: CheckpointFile) -> str:
    """The note for a file whose pickle holds Python 2 strings that are not UTF-8."""
    return LATIN1_NOTE.format(f.extra["latin1_at"],
                              "data.pkl" if f.format == "torch-zip" else "the file")


@dataclass
class CheckpointFile:
    """One file of a checkpoint, parsed into a tree."""

    name: str  # "" for a single-file checkpoint, else the file name inside the folder
    path: str
    format: str  # "torch-zip", "torch-legacy", "torchscript", "safetensors", "json", "pickle"
    size: int
    root: Any
    archive: Archive | None = None
    globals: dict[str, Global] = field(default_factory=dict)
    storages: dict[str, Storage] = field(default_factory=dict)
    tensors: list[Any] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # format-specific (sys_info, metadata)
    # what torch.load of this file would run (JSON and safetensors files: nothing)
    safety: Safety = field(default_factory=Safety)

    @property
    def unsafe_globals(self) -> list[str]:
        return self.safety.unsafe_globals

    @property
    def opaque_globals(self) -> list[str]:
        trust = self.safety.trust_globals
        return [g for g in trust if g != "torch.jit.load"] if self.format == "torchscript" \
            else trust


class Checkpoint:
    """A checkpoint: its files as read from disk, and its tree (as read, or as edited).

    Use :func:`ckpttool.open`. The tree (``root``) is a single file's unpickled object, or for
    a folder a dict from file name to each file's object, so JSON Pointers such as
    ``/optimizer``, ``/optimizer_states/0`` or ``/optimizer.pt`` address every part.

    A checkpoint never changes. An edit (:mod:`ckpttool.edits`) returns a plan whose
    ``result`` is a new :class:`Checkpoint` over the same files with a new tree; its views
    (``optimizers``, ``schedulers``, ``models``, names) are derived from that tree, so edits
    chain. ``files`` always describe the files on disk, where unchanged tensor bytes are
    copied from when the result is saved.
    """

    def __init__(self, path: str, kind: str, files: list[CheckpointFile],
                 roots: dict[str, Any] | None = None, other_files: list[str] | None = None
                 ) -> None:
        self.path = path
        self.kind = kind  # "file", "hf-trainer", "accelerate", "folder"
        self.files = files
        # the tree of each file by name; the files' own roots unless this is an edit's result
        self.roots: dict[str, Any] = roots if roots is not None else \
            {f.name: f.root for f in files}
        # files and folders (relative paths) of a folder that ckpttool did not parse; they are
        # kept as they are by every write
        self.other_files: list[str] = other_files or []
        # how this checkpoint was reached from the path the user gave, if not directly (a
        # DeepSpeed run folder's ``latest``)
        self.followed: str | None = None
        # the pickle protocol to write a file in, by file name, where an edit chose one
        # (sanitize: 2, the only one torch's weights-only unpickler reads); else the file's own
        self.protocols: dict[str, int] = {}

    def derive(self, root: Any) -> Checkpoint:
        """A checkpoint over the same files whose tree is ``root`` (an edit's result)."""
        roots = dict(root) if self.is_folder else {self.files[0].name: root}
        out = Checkpoint(self.path, self.kind, self.files, roots, self.other_files)
        out.followed = self.followed
        out.protocols = dict(self.protocols)
        return out

    # -- the tree --------------------------------------------------------------------------
    @property
    def is_folder(self) -> bool:
        """A folder of files, each its own tree (a DCP folder is one tree: not here)."""
        return self.kind not in ("file", "dcp")

    @cached_property
    def root(self) -> Any:
        if not self.is_folder:
            return self.roots[self.files[0].name]
        return dict(self.roots)

    @property
    def touched(self) -> list[str]:
        """Names of the files whose tree differs from the file on disk (``""`` for a single
        file), in file order."""
        return [f.name for f in self.files if self.roots[f.name] is not f.root]

    @property
    def format(self) -> str:
        return self.kind if self.is_folder or self.kind == "dcp" else self.files[0].format

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def resolve(self, pointer: str) -> Any:
        """The object at a JSON Pointer (``""`` is the root)."""
        return resolve(self.root, pointer)

    def file_for(self, pointer: str) -> CheckpointFile:
        """The file holding the object at ``pointer``."""
        if not self.is_folder:
            return self.files[0]
        first = split(pointer)[0] if pointer else ""
        for f in self.files:
            if f.name == first:
                return f
        raise CkptError(f"no file {first!r} in the folder (pointer {pointer!r})",
                        path=self.path, pointer=pointer,
                        hint="a pointer into a folder starts with a file name, like "
                             "/optimizer.pt/param_groups/0")

    # -- safety ----------------------------------------------------------------------------
    @property
    def unsafe_globals(self) -> list[str]:
        return sorted({g for f in self.files for g in f.unsafe_globals})

    @property
    def opaque_globals(self) -> list[str]:
        return sorted({g for f in self.files for g in f.opaque_globals})

    @property
    def unsafe(self) -> bool:
        return self.safety.unsafe

    @property
    def notes(self) -> list[str]:
        """What is odd about the files: a pickle followed by bytes torch never reads, a pickle
        that breaks, archive tricks (CRC, names, duplicates), read-only formats."""
        out = []
        for f in self.files:
            who = f"{f.name}: " if self.is_folder else ""
            if "broken" in f.extra:
                out.append(f"{who}{f.extra['broken']} (torch.load runs what comes before, then "
                           "fails)")
            if f.extra.get("trailing"):
                out.append(f"{who}{f.extra['trailing']} bytes after the pickle ("
                           f"{f.extra['trailing_kind']}) are never read by torch.load"
                           + (": a pickle-then-zip polyglot; torch.load runs the pickle in "
                              "front" if f.extra["trailing_kind"] == "a zip archive" else ""))
            for trick in f.extra.get("tricks", ()):
                out.append(f"{who}{trick}")
            if "latin1_at" in f.extra:
                out.append(f"{who}{latin1_note(f)}")
            if "dcp_files" in f.extra:
                df = f.extra["dcp_files"]
                out.append("a torch.distributed.checkpoint folder: .metadata and "
                           f"{len(df)} data file{'s' if len(df) != 1 else ''} ("
                           + ", ".join(f"{n} {s} bytes" for n, s in df.items()) + ")")
                out += f.extra.get("dcp_notes", [])
        inner = self.inner_checkpoints
        if inner:
            out.append(f"{len(inner)} checkpoint folder{'s' if len(inner) != 1 else ''} inside ("
                       + ", ".join(inner[:4]) + (", ..." if len(inner) > 4 else "")
                       + f"), not part of this one: `ckpttool show --run {self.path}` lists "
                       "them")
        return out

    @cached_property
    def inner_checkpoints(self) -> list[str]:
        """Subfolders of a folder checkpoint that hold checkpoints of their own (a
        transformers output folder with the final model on top and ``checkpoint-N/`` below)."""
        if not self.is_folder:
            return []
        from .run import run_members
        out = []
        for o in self.other_files:
            p = os.path.join(self.path, o.rstrip("/"))
            if not o.endswith("/") or os.path.islink(p):
                continue
            try:
                names = sorted(os.listdir(p))
            except OSError:
                continue
            if folder_layout(p, names) not in ("run", "deepspeed-run") or run_members(p):
                out.append(o)
        return out

    @cached_property
    def safety(self) -> Safety:
        """The verdict over every file torch.load would unpickle, with the tree pointer of
        each call that built an object in the tree (the others keep their byte offset)."""
        from .tree import walk_all
        out = Safety()
        for f in self.files:
            part = f.safety
            if any(c.node is not None for c in part.calls):
                where = {id(c.node): c for c in part.calls if c.node is not None}
                base = join("", f.name) if self.is_folder else ""
                for ptr, obj, _ in walk_all(f.root, base):
                    c = where.get(id(obj))
                    if c is not None and c.pointer is None:
                        c.pointer = ptr
            out.merge(part, f.name)
        return out

    # -- what is inside --------------------------------------------------------------------
    @cached_property
    def _found(self) -> Found:
        from .locate import locate
        return locate(self)

    @property
    def optimizers(self) -> list[OptimizerState]:
        """Every optimizer state_dict in the checkpoint, in tree order."""
        return self._found.optimizers

    @property
    def schedulers(self) -> list[SchedulerState]:
        """Every LR scheduler state_dict in the checkpoint (known types and scheduler-like
        states of unknown types), in tree order."""
        return self._found.schedulers

    @property
    def models(self) -> list[ModelState]:
        """Every model state_dict (names to tensors) in the checkpoint, in tree order."""
        return self._found.models

    @cached_property
    def storages(self) -> list[StorageUse]:
        """Every storage of every file, wherever its tensors are (inside opaque objects too)."""
        out = []
        for f in self.files:
            root = self.roots[f.name]
            base = join("", f.name) if self.is_folder else ""
            for ptr, st, opaque in storages(root, base).values():
                out.append(StorageUse(f.name, ptr, st, opaque))
        return out

    @cached_property
    def devices(self) -> dict[str, int]:
        """How many storages are tagged with each device."""
        out: dict[str, int] = {}
        for f in self.files:  # without building the per-storage list of ``storages``
            for _, st, _ in storages(self.roots[f.name], "").values():
                out[st.location] = out.get(st.location, 0) + 1
        return out

    @cached_property
    def opaque_holders(self) -> list[OpaqueHolder]:
        """Tensors held inside opaque objects, by the outermost object that holds them."""
        groups: dict[str, OpaqueHolder] = {}
        seen: set[int] = set()
        for f in self.files:
            base = join("", f.name) if self.is_folder else ""
            for ptr, t, opaque in tensors(self.roots[f.name], base):
                if not opaque:
                    continue
                top = opaque_top(ptr)
                h = groups.get(top)
                if h is None:
                    obj = self.resolve(top)
                    h = groups[top] = OpaqueHolder(top, getattr(obj, "qualname", "?"), 0, 0, {})
                h.tensors += 1
                st = t.storage
                if st is not None and id(st) not in seen:
                    seen.add(id(st))
                    h.bytes += st.nbytes
                    h.devices[st.location] = h.devices.get(st.location, 0) + 1
        return list(groups.values())

    @cached_property
    def torchscript(self) -> ScriptModule | None:
        """For a TorchScript archive (``torch.jit.save``): its module class, tensors by
        qualified name and code files; None for anything else."""
        if self.is_folder or self.files[0].format != "torchscript":
            return None
        from .formats.torchscript import describe
        return describe(self.root, self.files[0].extra["torchscript"])

    def optimizer(self, pointer: str | None = None) -> OptimizerState:
        """The optimizer at ``pointer``, or the only one when ``pointer`` is None."""
        where = ", ".join(repr(o.pointer) for o in self.optimizers) or "nowhere"
        if pointer is None:
            if len(self.optimizers) == 1:
                return self.optimizers[0]
            if not self.optimizers:
                raise CkptError("no optimizer state found", path=self.path)
            raise AmbiguousError(f"{len(self.optimizers)} optimizers ({where})",
                                 path=self.path, hint="pick one with --optimizer POINTER")
        for o in self.optimizers:
            if o.pointer == pointer:
                return o
        raise CkptError(f"no optimizer at {pointer!r}; optimizers are at {where}",
                        path=self.path, pointer=pointer)

    # -- tensor bytes ----------------------------------------------------------------------
    def read_bytes(self, tensor: Any) -> bytes:
        """The bytes of a tensor's elements (contiguous views only as stored)."""
        return read_tensor_bytes(tensor)

    def __repr__(self) -> str:
        return f"<Checkpoint {self.path!r} {self.format}>"


@dataclass
class OpaqueHolder:
    """An opaque object (a pickled ``nn.Module``, say) holding tensors: where it is, its
    class, how many tensors, the bytes of their storages and the storages per device."""

    pointer: str
    object: str
    tensors: int
    bytes: int
    devices: dict[str, int]


@dataclass(frozen=True)
class StorageUse:
    """A storage and where it is: its file, the pointer of its first tensor, and whether
    that tensor is inside an opaque object (a pickled module, say)."""

    file: str
    pointer: str
    storage: Storage
    in_opaque: bool


# --------------------------------------------------------------------------------------------
# reading one file

def _sniff_error(path: str, head: bytes, size: int) -> UnreadableError:
    """Say what a file that is not a checkpoint looks like."""
    h = head.lstrip()
    if size == 0:
        what = "an empty file (0 bytes): the save was interrupted or never happened"
    elif size < 22 and (b"PK\x03\x04".startswith(head) or head.startswith(b"PK")
                        or _LEGACY_MAGIC.startswith(head)):
        what = (f"only {size} bytes, the start of a checkpoint: truncated (the save was "
                "interrupted or the copy is incomplete)")
    elif h.startswith(b"version https://git-lfs"):
        what = ("a Git LFS pointer, not the checkpoint itself: run `git lfs pull` to fetch "
                "the real file")
    elif h[:15].lower().startswith((b"<!doctype html", b"<html")) or b"<html" in h[:64].lower():
        what = "an HTML page, not a checkpoint: the download probably fetched an error page"
    elif head.startswith(b"\x89PNG"):
        what = "a PNG image, not a checkpoint"
    elif head.startswith(b"\x93NUMPY"):
        what = "a NumPy .npy array, not a torch checkpoint (load it with numpy.load)"
    elif head.startswith(b"\x1f\x8b"):
        what = "a gzip file, not a torch checkpoint (decompress it first)"
    elif len(head) > 262 and head[257:262] == b"ustar":
        what = "a tar archive (the pre-1.0 torch tar format is not supported)"
    elif head.startswith(b"PK"):
        what = "a zip archive that is truncated or corrupt"
    elif head[:1] == b"\x80":
        what = "a plain pickle, not a torch.save checkpoint"
    elif all(32 <= c < 127 or c in (9, 10, 13) for c in head[:_SNIFF]):
        what = "a text file, not a checkpoint"
    else:
        what = f"not a checkpoint (it starts with bytes {head[:8].hex(' ')})"
    return UnreadableError(f"{what}", path=path)


_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _looks_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 10:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def read_file(path: str, name: str = "") -> CheckpointFile:
    """Parse one file into a :class:`CheckpointFile`, reading metadata only."""
    try:
        return _read_file(path, name)
    except (struct.error, EOFError, UnicodeError) as e:
        # what the format parsers raise when bytes run short or a name does not decode; any
        # other exception is a bug in ckpttool and must not be blamed on the file
        raise UnreadableError(f"corrupt or not a checkpoint "
                              f"({type(e).__name__}: {e})", path=path) from None
    except OSError as e:  # e.g. a read at an offset the file's metadata made up, or EIO
        raise UnreadableError(f"cannot read the file ({e.strerror or e})", path=path) from None


def _read_file(path: str, name: str) -> CheckpointFile:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise UnreadableError(f"no such file or folder", path=path) from None
    except PermissionError:
        raise UnreadableError(f"permission denied (cannot read the file)", path=path) from None
    except IsADirectoryError:
        raise UnreadableError(f"a folder where a file was expected", path=path) from None
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 300, 0)
        if head.startswith(b"PK\x03\x04") or (head.startswith(b"PK") and size > 22):
            return _read_zip(path, name, fd, size)
        if head.startswith(_LEGACY_MAGIC):
            return _read_legacy(path, name, fd, size)
        if _looks_safetensors(head, size):
            tensors, meta = read_safetensors(path, fd, size)
            return CheckpointFile(name, path, "safetensors", size, tensors,
                                  tensors=list(tensors.values()), extra={"metadata": meta})
        if name.endswith(".json") or (name and head.lstrip()[:1] in (b"{", b"[")):
            return _read_json(path, name, fd, size)
        if len(head) > 262 and head[257:262] == b"ustar":
            return _read_tar(path, name, fd, size)
        # anything else torch.load treats as the legacy format: it unpickles the front
        return _read_pickle(path, name, fd, size, head)
    finally:
        os.close(fd)


def _read_growing(fd: int, size: int, parse: Any) -> Any:
    """``parse(prefix)`` on a growing prefix of the file (1 MB, x8) until it needs no more."""
    limit = 1 << 20
    while True:
        data = os.pread(fd, min(size, limit), 0)
        try:
            return parse(data)
        except PickleTruncated:  # only a cut-off pickle can parse with a longer prefix
            if limit >= size:
                raise
            limit *= 8


def _broken(path: str, name: str, fmt: str, size: int, e: PickleError,
            what: str) -> CheckpointFile:
    """A pickle that breaks after a dangerous call: torch.load runs the call, then fails.
    The file is kept (its verdict is the point); its tree is empty."""
    safety = getattr(e, "safety", None)
    if safety is None or not safety.unsafe:
        raise UnreadableError(f"{what}: {e}", path=path) from None
    return CheckpointFile(name, path, fmt, size, None, safety=safety,
                          extra={"broken": f"{what}: {e}"})


def _read_pickle(path: str, name: str, fd: int, size: int, head: bytes) -> CheckpointFile:
    """A plain pickle (``pickle.dump`` output), or a file torch.load would unpickle anyway:
    the front of a pickle-then-zip polyglot. The verdict is about that front."""
    try:
        u = _read_growing(fd, size, unpickle)
    except PickleError as e:
        safety = getattr(e, "safety", None)
        if safety is None or not safety.calls:
            if head[:1] == b"\x80":  # a pickle's protocol opcode: a broken plain pickle
                raise UnreadableError(f"a plain pickle that does not parse ({e.message})",
                                      path=path) from None
            raise _sniff_error(path, head, size) from None  # not a pickle: say what it is
        return _broken(path, name, "pickle", size, e, "a plain pickle that breaks")
    extra: dict[str, Any] = {"end": u.end}
    if u.latin1_at is not None:
        extra["latin1_at"] = u.latin1_at
    if u.end < size:
        tail = os.pread(fd, 4, u.end)
        extra["trailing"] = size - u.end
        extra["trailing_kind"] = ("a zip archive" if tail == b"PK\x03\x04" else "other bytes")
    return CheckpointFile(name, path, "pickle", size, u.root, None, u.globals, u.storages,
                          _tensors(u), extra=extra, safety=u.safety)


def _read_tar(path: str, name: str, fd: int, size: int) -> CheckpointFile:
    from .formats.tar import read_tar
    with os.fdopen(os.dup(fd), "rb") as f:
        try:
            main, safety = read_tar(path, f)
        except PickleError as e:
            return _broken(path, name, "torch-tar", size, e, "pre-1.0 tar checkpoint")
    return CheckpointFile(name, path, "torch-tar", size, main.root, None, main.globals,
                          safety=safety, extra={"read_only": "the pre-1.0 tar format"})


def _read_json(path: str, name: str, fd: int, size: int) -> CheckpointFile:
    if size > 64 << 20:
        raise UnreadableError(f"JSON file too large ({size} bytes)", path=path)
    try:
        root = json.loads(os.pread(fd, size, 0))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnreadableError(f"not valid JSON ({e})", path=path) from None
    return CheckpointFile(name, path, "json", size, root)


def _read_zip(path: str, name: str, fd: int, size: int) -> CheckpointFile:
    try:
        archive = read_archive(path, fd, size)
    except (EOFError, struct.error):
        raise UnreadableError(f"a zip archive that is truncated or corrupt", path=path) from None
    if is_torchscript(archive.records):
        return _read_torchscript(path, name, fd, size, archive)
    pkl = archive.records["data.pkl"]
    data = read_record(path, fd, pkl, check_crc=False)  # torch.load does not check it either
    tricks = list(archive.tricks)
    bad_crc = bool(pkl.crc) and zlib.crc32(data) != pkl.crc
    if bad_crc:
        tricks.append("data.pkl fails its CRC check (torch.load does not check): its bytes "
                      "changed after the save")
    try:
        u = unpickle(data)
    except PickleError as e:
        what = "data.pkl fails its CRC check (corrupt: a flipped bit or a bad copy) and " \
            "does not parse" if bad_crc else "data.pkl"
        f = _broken(path, name, "torch-zip", size, e, what)
        f.extra["tricks"] = tricks
        return f
    for key, st in u.storages.items():
        rec = archive.records.get(f"data/{key}")
        if rec is None:
            raise UnreadableError(f"storage data/{key} is missing from the archive "
                                  "(truncated or corrupt)", path=path)
        if rec.size < st.nbytes:
            raise UnreadableError(f"storage data/{key} holds {rec.size} bytes but the "
                                  f"pickle declares {st.nbytes} (corrupt)", path=path)
        st.record = rec
    f = CheckpointFile(name, path, "torch-zip", size, u.root, archive, u.globals, u.storages,
                       _tensors(u), safety=u.safety, extra={"tricks": tricks} if tricks else {})
    if u.latin1_at is not None:
        f.extra["latin1_at"] = u.latin1_at
    _read_tiny_values(fd, f)
    return f


def _read_torchscript(path: str, name: str, fd: int, size: int,
                      archive: Archive) -> CheckpointFile:
    """A ``torch.jit.save`` archive: its pickles as one tree ``{"data.pkl": module,
    "constants.pkl": ..., ...}`` (see :mod:`.formats.torchscript`), its code files as text."""
    root: dict[str, Any] = {}
    parts: dict[str, Safety] = {}
    globals_: dict[str, Global] = {}
    all_storages: dict[str, Storage] = {}
    all_tensors: list[TensorRef] = []
    for pkl in TS_PICKLES:
        rec = archive.records.get(pkl)
        if rec is None:
            continue
        try:
            u = unpickle(read_record(path, fd, rec, check_crc=False))
        except PickleError as e:
            raise UnreadableError(f"{pkl} of a TorchScript archive does not parse "
                                  f"({e.message})", path=path) from None
        folder = pkl[:-len(".pkl")]
        for key, st in u.storages.items():
            srec = archive.records.get(f"{folder}/{key}")
            # torch.jit.save writes traced_inputs/<key> records empty (torch.jit.load does not
            # read them); the others hold the bytes
            if srec is None or (srec.size < st.nbytes and pkl != "traced_inputs.pkl"):
                raise UnreadableError(f"storage {folder}/{key} of {pkl} is missing from the "
                                      "archive or too short (truncated or corrupt)", path=path)
            st.record = srec
            all_storages[f"{folder}/{key}"] = st
        root[pkl] = u.root
        parts[pkl] = u.safety
        for q, g in u.globals.items():
            globals_.setdefault(q, g)
        all_tensors += _tensors(u)
    code: dict[str, str] = {}
    for rname, rec in archive.records.items():
        if rname.startswith("code/") and not rname.endswith(".debug_pkl"):
            code[rname] = read_record(path, fd, rec, limit=16 << 20,
                                      check_crc=False).decode("utf-8", "replace")
    extra: dict[str, Any] = {"torchscript": code}
    if archive.tricks:
        extra["tricks"] = list(archive.tricks)
    f = CheckpointFile(name, path, "torchscript", size, root, archive, globals_, all_storages,
                       all_tensors, extra=extra, safety=ts_verdict(parts, len(code)))
    _read_tiny_values(fd, f)
    return f


def _read_legacy(path: str, name: str, fd: int, size: int) -> CheckpointFile:
    # The pickles come first; read a growing prefix until they parse.
    try:
        main, meta = _read_growing(fd, size, lambda data: read_legacy(path, data, size))
    except PickleTruncated as e:  # the whole file was read and a pickle is still cut off
        return _broken(path, name, "torch-legacy", size, e,
                       "legacy torch file, truncated or corrupt")
    except PickleError as e:
        return _broken(path, name, "torch-legacy", size, e, "legacy torch file")
    except UnreadableError as e:
        if e.path is not None:  # the legacy reader named the file itself
            raise
        raise UnreadableError(f"legacy torch file: {e.message}", path=path) from None
    f = CheckpointFile(name, path, "torch-legacy", size, main.root, None, meta.pop("globals"),
                       main.storages, _tensors(main), extra=meta, safety=meta.pop("safety"))
    _read_tiny_values(fd, f)
    return f


def _tensors(u: Unpickled) -> list[TensorRef]:
    return [t for t in u.tensors if not t.is_parameter]  # wrappers read through .base


_STRUCT = {
    "float32": "f", "float64": "d", "float16": "e", "int8": "b", "uint8": "B", "int16": "h",
    "int32": "i", "int64": "q", "uint16": "H", "uint32": "I", "uint64": "Q", "bool": "?",
}


def decode_values(raw: bytes, dtype: str) -> list[Any] | None:
    """Element values of ``raw`` bytes in ``dtype`` (little endian), or None if unsupported."""
    if dtype == "bfloat16":
        halves = struct.unpack(f"<{len(raw) // 2}H", raw)
        return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in halves]
    if dtype in ("complex64", "complex128"):
        c = "f" if dtype == "complex64" else "d"
        parts = struct.unpack(f"<{len(raw) // struct.calcsize(c)}{c}", raw)
        return [complex(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
    code = _STRUCT.get(dtype)
    if code is None:
        return None
    return list(struct.unpack(f"<{len(raw) // struct.calcsize(code)}{code}", raw))


def _element_offsets(t: TensorRef) -> list[int]:
    offs = [t.offset]
    for n, st in zip(t.shape, t.stride):
        offs = [o + i * st for o in offs for i in range(n)]
    return offs


def _nest(flat: list[Any], shape: tuple[int, ...]) -> list[Any]:
    """``flat`` (row-major) as nested lists of ``shape``, like ``Tensor.tolist()``."""
    if len(shape) <= 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [_nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def _read_tiny_values(fd: int, f: CheckpointFile) -> None:
    """Read the values of 0-d and tiny tensors (``step``...). Their bytes are read in few
    preads: the spans are sorted and nearby ones (gaps under 64 KB, up to 8 MB a read) share
    one read, so a file of 400k tiny tensors costs a few dozen reads, not 400k."""
    spans = []
    for t in f.tensors:
        st = t.storage
        if st is None or st.record is None:
            continue
        shape = t.shape
        n = math.prod(shape)
        if n == 0 or n > TINY_NUMEL:
            continue
        offs = _element_offsets(t) if n > 1 else [t.offset]
        lo, hi = min(offs), max(offs)
        size = t.itemsize
        if (hi + 1) * size > st.record.size:
            continue
        a = st.record.data_offset + lo * size
        spans.append((a, a + (hi - lo + 1) * size, t, offs, lo, shape))
    spans.sort(key=lambda x: x[0])
    i = 0
    while i < len(spans):
        j, start, end = i, spans[i][0], spans[i][1]
        while j + 1 < len(spans) and spans[j + 1][0] - end < (64 << 10) \
                and spans[j + 1][1] - start <= (8 << 20):
            j += 1
            end = max(end, spans[j][1])
        buf = os.pread(fd, end - start, start)
        for a, b, t, offs, lo, shape in spans[i:j + 1]:
            vals = decode_values(buf[a - start:b - start], t.dtype)
            if vals is None or len(vals) * t.itemsize != b - a:
                continue
            picked = [vals[o - lo] for o in offs]
            t.value = picked[0] if shape == () else _nest(picked, shape)
        i = j + 1


def read_tensor_bytes(tensor: Any) -> bytes:
    """The bytes of the storage span a tensor covers (from its offset to its last element)."""
    if isinstance(tensor, SafeTensor):
        rec_path, start, n = tensor.path, tensor.data_offset, tensor.nbytes
    else:
        st = tensor.storage
        if st is None or st.record is None:
            raise UnreadableError("tensor has no storage record to read")
        span = 1 + sum((d - 1) * s for d, s in zip(tensor.shape, tensor.stride)) \
            if tensor.numel else 0
        rec_path = st.record.path
        start = st.record.data_offset + tensor.offset * tensor.itemsize
        n = span * tensor.itemsize
    with open(rec_path, "rb") as fh:
        fh.seek(start)
        raw = fh.read(n)
    if len(raw) != n:
        raise UnreadableError(f"{rec_path}: tensor bytes end early (truncated)")
    return raw


# --------------------------------------------------------------------------------------------
# folders

# files that can be checkpoints of their own in a run folder (timm writes ``.pth.tar``)
CKPT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar")
# the files of a DeepSpeed tag folder (global_stepN/): model, ZeRO rank and pipeline layer files
_DEEPSPEED_PART = re.compile(r"(mp_rank_\d+_model_states|(bf16_)?zero_pp_rank_\d+_mp_rank_\d+"
                             r"_optim_states|layer_\d+-model_\d+-model_states)\.pt$")
# file stems that name a part of one checkpoint, not a checkpoint (sharded weights add
# ``-00001-of-00002``; a number alone, ``model_3.pt``, is an epoch: accelerate's ``model_1``
# files come with its ``optimizer.bin`` and are told by that)
_PART_STEM = re.compile(r"(model|optimizer|optim|scheduler|lr_scheduler|sched|ema|model_ema|"
                        r"scaler|grad_scaler|amp|rng_state|rng_state_\d+|random_states|"
                        r"training_args|trainer_state|pytorch_model|adapter_model|generator|"
                        r"discriminator)(-\d+-of-\d+)?$")


def folder_layout(path: str, names: list[str]) -> str:
    """How a folder is read, from its layout (see the README, *Folders: one checkpoint or a
    run*): ``"deepspeed-run"`` (a ``latest`` file naming a ``global_stepN/``),
    ``"hf-trainer"``, ``"accelerate"``, ``"dcp"``, ``"folder"`` (another layout of one
    checkpoint: a DeepSpeed tag folder, a model folder, files named as parts of one
    checkpoint) or ``"run"`` (a folder of independent checkpoints)."""
    if _latest_tag(path, names) is not None:
        return "deepspeed-run"
    kind = _folder_kind(set(names))
    if kind != "folder":
        return kind
    files = [n for n in names if os.path.isfile(os.path.join(path, n))]
    if any(_DEEPSPEED_PART.match(n) for n in files):
        return "folder"
    if any(n.endswith(".index.json") for n in files) or (
            ("config.json" in files or "adapter_config.json" in files)
            and any(n.endswith((".safetensors", ".bin")) for n in files)):
        return "folder"  # a save_pretrained model folder (sharded or not)
    ckpts = [n for n in files if n.endswith(CKPT_SUFFIXES)]
    if ckpts and all(_PART_STEM.fullmatch(_stem(n)) for n in ckpts):
        return "folder"
    return "run"


def _stem(name: str) -> str:
    for suffix in (".pth.tar", *CKPT_SUFFIXES):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def _folder_kind(names: set[str]) -> str:
    if "trainer_state.json" in names or {"optimizer.pt", "scheduler.pt"} <= names:
        return "hf-trainer"
    if "optimizer.bin" in names or any(n.startswith("random_states_") for n in names):
        return "accelerate"
    if ".metadata" in names:
        return "dcp"
    return "folder"


def refuse_torchscript(ckpt: Checkpoint, command: str) -> None:
    """A TorchScript archive takes ``move`` only: any other edit raises :class:`EditError`."""
    from .errors import EditError
    if any(f.format == "torchscript" for f in ckpt.files):
        raise EditError(f"a TorchScript archive (torch.jit.save) holds a compiled module, "
                        f"with no optimizer or scheduler state: {command} does not apply to "
                        "it; only move does", path=ckpt.path,
                        hint="to change the module, torch.jit.load it (if you trust it), edit "
                             "it and torch.jit.save it again")


def open_for_edit(path: str | os.PathLike[str], command: str = "") -> Checkpoint:
    """Open a checkpoint that is about to be edited and saved: an unsafe one is refused here,
    before any edit (:class:`UnsafeCheckpointError`), and so is a format ckpttool reads but
    does not write (a plain pickle, the pre-1.0 tar format, a pickle that breaks). A
    TorchScript archive takes ``move`` only: ``command`` names the edit (the CLI's command)."""
    from .errors import EditError, UnsafeCheckpointError
    ckpt = open_checkpoint(path)
    if ckpt.unsafe:
        raise UnsafeCheckpointError(
            "refusing to edit: " + ckpt.safety.headline() + ". Nothing was written.",
            path=ckpt.path)
    if command and command != "move":
        refuse_torchscript(ckpt, command)
    if ckpt.kind == "dcp" and ckpt.safety.unjudged:
        raise CkptError(f"{len(ckpt.safety.unjudged)} values of this DCP folder are stored "
                        "through stream transforms ckpttool does not decode ("
                        + ", ".join(ckpt.safety.unjudged[:3]) + "): it does not write from it",
                        path=ckpt.path, hint="load it with dcp.load and the extension registry "
                        "it was saved with, and save it again without _extensions")
    flat = [o.pointer or "/" for o in ckpt.optimizers if o.flattened]
    if flat:
        raise CkptError(f"the optimizer state at {', '.join(flat)} is in the flattened form "
                        "(flatten_optimizer_state_dict=True): ckpttool reads it but does not "
                        "edit it yet", path=ckpt.path,
                        hint="save it again with get_state_dict(...) without "
                             "flatten_optimizer_state_dict, then edit that file")
    for f in ckpt.files:
        if f.extra.get("tricks"):
            raise CkptError(f"{f.path}: " + "; ".join(f.extra["tricks"]) + ": ckpttool reads "
                            "such an archive but does not write from it", path=ckpt.path,
                            hint="if you trust it, load it with torch and torch.save it, then "
                                 "edit the new file")
        if f.root is None or f.format in ("pickle", "torch-tar"):
            what = {"pickle": "a plain pickle (not a torch.save file)",
                    "torch-tar": "the pre-1.0 torch tar format"}.get(f.format, "broken")
            raise CkptError(f"{f.path} is {what}: ckpttool reads it but does not write it",
                            path=ckpt.path,
                            hint="load it with torch (if you trust it) and torch.save it, then "
                                 "edit the new file")
    return ckpt


def _open_dcp(path: str, names: list[str]) -> Checkpoint:
    """A torch.distributed.checkpoint folder as one tree (see :mod:`.formats.dcp`)."""
    from .formats.dcp import build_tree, data_files
    meta = read_file(os.path.join(path, ".metadata"), ".metadata")
    files = data_files(path, names)
    safety = Safety()
    safety.merge(meta.safety, ".metadata")
    if meta.root is None or meta.safety.unsafe:  # never read further into a hostile folder
        meta.extra["dcp_files"] = files
        return Checkpoint(path, "dcp", [meta], other_files=sorted(files))

    def read_value(file: str, offset: int, length: int) -> tuple[Any, Safety]:
        fp = os.path.join(path, file)
        if file not in files or offset < 0 or offset + length > files[file]:
            raise UnreadableError(f"a value lies at bytes {offset}..{offset + length} of "
                                  f"{file}, outside the folder's data files", path=path)
        fd = os.open(fp, os.O_RDONLY)
        try:
            part = _read_zip(fp, file, fd, offset + length)
        finally:
            os.close(fd)
        return part.root, part.safety

    root, values_safety, notes = build_tree(path, meta.root, read_value)
    safety.merge(values_safety)
    size = meta.size + sum(files.values())
    f = CheckpointFile(".metadata", os.path.join(path, ".metadata"), "dcp", size, root,
                       globals=meta.globals, safety=safety,
                       extra={"dcp_files": files, "dcp_notes": notes, "dcp_meta": meta.root,
                              "dcp_protocol": _pickle_protocol(meta.path)})
    return Checkpoint(path, "dcp", [f], other_files=sorted(files))


def _pickle_protocol(path: str) -> int:
    with open(path, "rb") as fh:
        head = fh.read(2)
    return head[1] if head[:1] == b"\x80" else 0


def _latest_tag(path: str, names: list[str]) -> str | None:
    """The subfolder a DeepSpeed ``latest`` file names (``global_step3``), if this is a run
    folder: ``latest`` is a short text file, the folder it names exists here, and this folder
    holds no checkpoint file of its own (a Trainer folder with a DeepSpeed ``latest`` inside is
    read as the Trainer folder)."""
    if "latest" not in names or not os.path.isfile(os.path.join(path, "latest")):
        return None
    if any(n.endswith((".pt", ".pth", ".bin", ".ckpt", ".safetensors"))
           and os.path.isfile(os.path.join(path, n)) for n in names):
        return None
    try:
        with open(os.path.join(path, "latest"), "rb") as f:
            raw = f.read(257)
        tag = raw.decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not tag or len(raw) > 256 or "/" in tag or "\\" in tag or tag in (".", "..") \
            or tag not in names or not os.path.isdir(os.path.join(path, tag)):
        return None
    return tag


def open_checkpoint(path: str | os.PathLike[str], *, one: bool = False) -> Checkpoint:
    """Open a checkpoint file or folder for reading (metadata only; nothing of it runs).

    A folder is one checkpoint when its layout says so (:func:`folder_layout`); a folder of
    independent checkpoints (a run: ``epoch_1.pt``, ``epoch_2.pt``, ...) raises
    :class:`~ckpttool.errors.RunFolderError` (open one of its files, or list them with
    :func:`ckpttool.open_run`), unless ``one`` asks to read every file in it as parts of one
    checkpoint."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise UnreadableError(f"no such file or folder", path=p) from None
    except PermissionError:
        raise UnreadableError(f"permission denied", path=p) from None
    if not stat.S_ISDIR(st.st_mode):
        return Checkpoint(p, "file", [read_file(p)])
    names = sorted(os.listdir(p))
    layout = folder_layout(p, names)
    if layout == "deepspeed-run":  # `latest` names the checkpoint to resume
        tag = _latest_tag(p, names)
        assert tag is not None
        ckpt = open_checkpoint(os.path.join(p, tag))
        ckpt.followed = f"{os.path.join(p, 'latest')} names {tag}"
        return ckpt
    if layout == "run" and not one:
        from .errors import RunFolderError
        from .run import run_members
        members = run_members(p)
        if members:
            shown = ", ".join(m for m in members[:4]) + (", ..." if len(members) > 4 else "")
            raise RunFolderError(
                f"a folder of {len(members)} independent checkpoint"
                f"{'s' if len(members) != 1 else ''} ({shown}), not one checkpoint", path=p,
                hint=f"name one (for example {os.path.join(p, members[-1])}); `ckpttool show "
                     f"{p}` lists them (show --one and diff --one, library: one=True, read "
                     "every file in it as parts of one checkpoint)")
    if layout == "dcp":
        return _open_dcp(p, names)
    kind = layout if layout in ("hf-trainer", "accelerate") else "folder"
    files = []
    other: list[str] = []
    for n in names:
        fp = os.path.join(p, n)
        if n.endswith(_FOLDER_SUFFIXES) and os.path.isfile(fp):
            files.append(read_file(fp, n))
        else:
            other.append(n + "/" if os.path.isdir(fp) and not os.path.islink(fp) else n)
    if not any(f.format in ("torch-zip", "torch-legacy", "safetensors") for f in files):
        raise UnreadableError(f"a folder with no checkpoint files in it (looked for "
                              "optimizer.pt / optimizer.bin / *.pt / *.pth / *.safetensors)",
                              path=p)
    return Checkpoint(p, kind, files, other_files=other)
