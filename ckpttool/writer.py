"""The crash-safe save: write a (possibly edited) checkpoint tree back as a torch.save file.

:func:`write_file` never modifies the target in place. It writes a temp file in the target's
directory, fsyncs it, re-reads it with ckpttool's own reader and checks it against what was
meant to be written, and only then ``os.replace``\\ s it onto the target and fsyncs the
directory. On any error (including KeyboardInterrupt) the temp file is removed and the target
is byte-identical to before. A reader sees either the old file or the complete new one.

Decisions:

* Output format: always the torch zip format (``torch.save``'s default). A legacy (non-zip)
  input is converted; :attr:`WriteResult.converted_from` says so.
* Unchanged storages are copied from the source file by the kernel (``os.copy_file_range``),
  with the CRC32 taken from the source's central directory when it is non-zero (the bytes are
  copied verbatim, so the output claims exactly what the source claimed: a corrupt source
  stays detectably corrupt instead of getting a fresh CRC that blesses the damage). A zero
  CRC on a non-empty record (torch saved with CRC computation off) and every legacy storage
  are copied through user space with the CRC computed. ``verify_crc=True`` checks every
  copied record against its source CRC (slower: every byte passes through user space).
* If the edited tree pickles exactly like the source's own data.pkl does once re-read (the
  edit did not touch the pickle), the source's data.pkl bytes are kept verbatim, so a no-op
  rewrite is byte-identical even where a re-pickle could not be (see
  :mod:`ckpttool.formats.pickler` for those corner cases).
* Storage keys are renumbered ``"0"``, ``"1"``, ... in first-use order (what torch.save does;
  the identity for an unchanged torch file), and the ``data/<key>`` records are written in
  that order, which ``torch.load(mmap=True, calculate_storage_offsets=True)`` relies on.
* A symlink target: the file the link points to is replaced (the link is resolved) and the
  link itself is left alone, so ``latest.pt -> run3/epoch10.pt`` keeps pointing at the edited
  file. The temp file is made next to the resolved file (same filesystem, atomic rename).
* ``backup=True``: ``PATH.bak`` is made a hard link to the original before the replace
  (atomically replacing an older ``.bak``); no data is copied and the old inode survives the
  replace. Where hard links are not possible it falls back to a copy (written to a temp file,
  fsynced and renamed into place).
* The replaced file's permission bits (and, when allowed, owner and group) are kept; a new
  file gets ``0666 & ~umask`` like ``torch.save``'s ``open()``.
"""

from __future__ import annotations

import errno
import filecmp
import os
import shutil
import stat
import secrets
import struct
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable

from .checkpoint import CheckpointFile
from .errors import CkptError, UnreadableError, UnsafeCheckpointError, WriteError
from .formats.nodes import Storage
from .formats.pickler import dumps, zip_pid_renumbering
from .formats.torchzip import read_archive, read_record
from .formats.unpickler import unpickle
from .tree import storages
from .formats.torchzip_write import (DEFAULT_ALIGNMENT, Payload, Progress, WrittenRecord,
                                     write_archive)

TMP_SUFFIX = ".ckpttool-tmp"

NewRecord = bytes | bytearray | memoryview | Payload | tuple[int, Iterable[bytes]]


@dataclass
class WriteResult:
    path: str  # the file written (symlinks resolved)
    format: str  # always "torch-zip"
    size: int
    converted_from: str | None = None  # "torch-legacy" when a legacy file was converted
    backup_path: str | None = None
    pickle_reused: bool = False  # the source's data.pkl bytes were kept verbatim
    records: list[WrittenRecord] = field(default_factory=list)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str) -> None:
    """fsync a folder (its entries: a rename into it is durable once this returns)."""
    try:
        dfd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(dfd)


def _as_payload(key: str, value: Any) -> Payload:
    if isinstance(value, Payload):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        p = Payload.from_bytes(value)
    elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], int):
        p = Payload.from_chunks(value[0], value[1])
    else:
        raise CkptError(f"new bytes for storage {key}: expected bytes, a Payload or "
                        f"(size, chunks), got {type(value).__name__}")
    p.src_name = p.src_name or f"data/{key}"
    return p


def _lookup(mapping: dict[Any, Any] | None, st: Storage) -> Any:
    if not mapping:
        return None
    v = mapping.get(st)  # type: ignore[call-overload]
    return mapping.get(st.key) if v is None else v


def _check_target(source_path: str | None, out_path: str | None,
                  force: bool) -> tuple[str, bool, os.stat_result | None]:
    """(resolved target path, target is the source file, stat of the existing target);
    ``source_path`` None: a new file with no source."""
    where = out_path if out_path is not None else source_path
    assert where is not None
    target = os.path.realpath(where)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise CkptError("is a folder; give a file name to write to", path=out_path)
    try:
        is_source = st is not None and source_path is not None \
            and os.path.samefile(target, source_path)
    except OSError:
        is_source = False
    if st is not None and not is_source and not force:
        raise CkptError("already exists", path=out_path, hint="use --force to overwrite it")
    if not os.path.isdir(os.path.dirname(target) or "."):
        raise CkptError(f"the folder {os.path.dirname(target)} does not exist", path=out_path)
    return target, is_source, st


def _prefix(target: str) -> str:
    """The archive folder name torch.save gives a new file (its name without extension)."""
    return os.path.splitext(os.path.basename(target))[0] or "archive"


def _content_payload(st: Storage) -> Payload:
    """A new storage's bytes: its content (an edit's description), streamed."""
    p = Payload.from_chunks(st.content.nbytes, st.content.chunks())
    p.src_name = f"new storage ({st.content.describe()})"
    return p


def _write_temp(target: str, target_st: os.stat_result | None, prefix: str,
                records: list[tuple[str, Payload]], *, alignment: int = DEFAULT_ALIGNMENT,
                progress: Progress | None = None, verify_crc: bool = False
                ) -> tuple[str, list[WrittenRecord]]:
    """Write the archive to a synced temp file beside ``target``, with the mode and owner of
    the file it will replace (else the umask's); the temp file is removed on failure."""
    tfd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".",
                                suffix=TMP_SUFFIX, dir=os.path.dirname(target))
    try:
        written = write_archive(tfd, prefix, records, alignment=alignment, progress=progress,
                                verify_crc=verify_crc)
        if target_st is not None:
            os.fchmod(tfd, stat.S_IMODE(target_st.st_mode))
            try:
                os.fchown(tfd, target_st.st_uid, target_st.st_gid)
            except OSError:
                pass
        else:
            os.fchmod(tfd, 0o666 & ~_umask())
        os.fsync(tfd)
    except BaseException:
        os.close(tfd)
        os.unlink(tmp)
        raise
    os.close(tfd)
    return tmp, written


def _fresh_records(data_pkl: bytes, data: list[tuple[str, Payload]]
                   ) -> list[tuple[str, Payload]]:
    """The records of a new torch.save archive, in torch.save's order."""
    serial = "".join(str(b % 10) for b in os.urandom(40))
    return [("data.pkl", Payload.from_bytes(data_pkl)),
            (".format_version", Payload.from_bytes(b"1")),
            (".storage_alignment", Payload.from_bytes(b"64")),
            ("byteorder", Payload.from_bytes(b"little")),
            *data,
            ("version", Payload.from_bytes(b"3\n")),
            (".data/serialization_id", Payload.from_bytes(serial.encode()))]


def write_new(root: Any, out_path: str, *, force: bool = False,
              progress: Progress | None = None) -> WriteResult:
    """Write a tree whose every storage is new (has a ``content``) as a torch.save zip file
    ``out_path``, crash-safely (temp file, verified, renamed into place)."""
    target, _, target_st = _check_target(None, out_path, force)
    order: list[Storage] = []
    data_pkl = dumps(root, protocol=2, storage_pid=zip_pid_renumbering(), storage_order=order)
    data = []
    for i, st in enumerate(order):
        if st.content is None:
            raise CkptError(f"storage {st.key} has no content to write", path=out_path)
        data.append((f"data/{i}", _content_payload(st)))
    directory = os.path.dirname(target)
    tmp: str | None = None
    try:
        tmp, written = _write_temp(target, target_st, _prefix(target),
                                   _fresh_records(data_pkl, data), progress=progress)
        _verify(tmp, written, data_pkl)
        os.replace(tmp, target)
        tmp = None
        fsync_dir(directory)
        size = os.stat(target).st_size
    except OSError as e:
        raise WriteError(f"could not write the checkpoint ({e.strerror or e}); nothing was "
                         "written", path=out_path, hint=_write_hint(e)) from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return WriteResult(target, "torch-zip", size, None, None, False, written)


def _source_records(source: CheckpointFile, fd: int, data_pkl: bytes, order: list[Storage],
                    new_records: dict[Any, Any] | None) -> tuple[list[tuple[str, Payload]], int]:
    """The archive's records in torch's order, and the storage alignment."""
    data: list[tuple[str, Payload]] = []
    for i, st in enumerate(order):
        key = str(i)
        new = _lookup(new_records, st)
        if new is not None:
            p = _as_payload(st.key, new)
        elif st.content is not None:  # a new tensor an edit described: streamed
            p = _content_payload(st)
        elif st.record is None:
            raise CkptError(f"storage {st.key} has no bytes: it is new in the edited tree "
                            "but has no content and no entry in new_records",
                            path=source.path)
        else:
            rec = st.record
            crc = getattr(rec, "crc", None)
            if crc == 0 and rec.size:
                crc = None  # saved with CRC computation off: compute it
            if getattr(rec, "method", 0) != 0:
                raise CkptError(f"storage record data/{st.key} is compressed; "
                                "torch never writes that and ckpttool does not rewrite it",
                                path=source.path)
            p = Payload.from_file(fd, rec.data_offset, rec.size, crc,
                                  name=f"{source.path}: data/{st.key}")
        data.append((f"data/{key}", p))

    if source.format == "torch-legacy":
        info = source.extra.get("sys_info")
        if isinstance(info, dict) and info.get("little_endian") is False:
            raise CkptError(f"a big-endian legacy checkpoint; converting it is "
                            "not supported", path=source.path)
        return _fresh_records(data_pkl, data), DEFAULT_ALIGNMENT

    assert source.archive is not None
    alignment = DEFAULT_ALIGNMENT
    out: list[tuple[str, Payload]] = []
    inserted = False
    for name, rec in source.archive.records.items():
        if name == "data.pkl":
            out.append((name, Payload.from_bytes(data_pkl)))
            continue
        if name.startswith("data/"):
            if not inserted:
                out.extend(data)
                inserted = True
            continue
        if not inserted and name in ("version", ".data/serialization_id"):
            out.extend(data)
            inserted = True
        if rec.method != 0:
            raw = read_record(source.path, fd, rec)
            out.append((name, Payload.from_bytes(raw)))
        else:
            crc = None if (rec.crc == 0 and rec.size) else rec.crc
            out.append((name, Payload.from_file(fd, rec.data_offset, rec.size, crc,
                                                name=f"{source.path}: {name}")))
        if name == ".storage_alignment":
            try:
                alignment = int(read_record(source.path, fd, rec, limit=64))
            except ValueError:
                raise UnreadableError(f".storage_alignment is not a number", path=source.path) \
                    from None
            if alignment <= 0 or alignment > 1 << 16 or alignment & (alignment - 1):
                raise UnreadableError(f"unusable .storage_alignment "
                                      f"{alignment}", path=source.path)
    if not inserted:
        out.extend(data)
    return out, alignment


def _torchscript_records(source: CheckpointFile, fd: int, root: Any
                         ) -> tuple[list[tuple[str, Payload]], bytes | None]:
    """The records of a TorchScript archive with its pickles written from ``root`` (``{"data.pkl":
    ..., "constants.pkl": ..., ...}``): a pickle whose tree is unchanged keeps its bytes, an
    edited one (storages retagged by ``move``) is pickled again with the same storage keys, so
    every ``data/``, ``constants/``, ``code/`` record is copied as it is, in the archive's order.
    Also the new data.pkl bytes (None when data.pkl is kept)."""
    from .formats.torchscript import PICKLES
    archive = source.archive
    assert archive is not None and isinstance(root, dict) and isinstance(source.root, dict)
    new: dict[str, bytes] = {}
    for pkl in PICKLES:
        if pkl not in root or root[pkl] is source.root.get(pkl):
            continue
        for st in storages(root[pkl]).values():
            if st[1].content is not None:
                raise CkptError(f"{pkl}: a TorchScript archive only takes new device tags, "
                                "not new tensors", path=source.path)
        src = read_record(source.path, fd, archive.records[pkl])
        try:
            new[pkl] = dumps(root[pkl], protocol=src[1] if src[:1] == b"\x80" else 2)
        except (ValueError, TypeError, AttributeError, RecursionError) as e:
            raise CkptError(f"cannot write the edited {pkl} as a pickle: {e}") from e
    out: list[tuple[str, Payload]] = []
    for name, rec in archive.records.items():
        if name in new:
            out.append((name, Payload.from_bytes(new[name])))
        elif rec.method != 0:
            out.append((name, Payload.from_bytes(read_record(source.path, fd, rec))))
        else:
            crc = None if (rec.crc == 0 and rec.size) else rec.crc
            out.append((name, Payload.from_file(fd, rec.data_offset, rec.size, crc,
                                                name=f"{source.path}: {name}")))
    return out, new.get("data.pkl")


def write_file(source: CheckpointFile, root: Any = None, out_path: str | None = None, *,
               new_records: dict[Any, NewRecord] | None = None,
               force: bool = False, backup: bool = False,
               progress: Progress | None = None,
               verify_crc: bool = False, protocol: int | None = None) -> WriteResult:
    """Write ``root`` (default: ``source.root``) as a torch.save zip file, crash-safely.

    ``source``: the file the tree was read from (where unchanged tensor bytes are copied
    from). ``out_path``: default the source itself (edit in place); an existing other file is
    refused unless ``force``. ``new_records``: new bytes for storages, keyed by the
    :class:`Storage` object or its key as read (bytes, a :class:`Payload` or ``(size,
    chunks)``); a storage that is new in the tree must be given here. A new device tag is an edit
    of the tree (``storage.pid``, see :mod:`ckpttool.edits.move`). ``progress(done, total)``
    is called as payload bytes are written. ``protocol``: the pickle protocol of the new
    ``data.pkl`` (default: the source's). Returns a :class:`WriteResult`.
    """
    if source.safety.unsafe:
        raise UnsafeCheckpointError(
            f"{source.path}: refusing to write from an unsafe checkpoint: it references "
            f"{', '.join(source.unsafe_globals)}, which would run code when loaded. Nothing "
            "was written.")
    if source.format not in ("torch-zip", "torch-legacy", "torchscript"):
        raise CkptError(f"writing {source.format} files is not supported "
                        "(only torch.save files)", path=source.path)
    if root is None:
        root = source.root
    target, is_source, target_st = _check_target(source.path, out_path, force)

    fd = os.open(source.path, os.O_RDONLY)
    tmp: str | None = None
    try:
        if os.fstat(fd).st_size != source.size:
            raise CkptError(f"the file changed since it was read; open it "
                            "again and redo the edit", path=source.path)
        # -- the pickle ----------------------------------------------------------------------
        if source.format == "torchscript":
            records, data_pkl = _torchscript_records(source, fd, root)
            alignment, reused = DEFAULT_ALIGNMENT, data_pkl is None
            if data_pkl is None:
                assert source.archive is not None
                data_pkl = read_record(source.path, fd, source.archive.records["data.pkl"])
        else:
            if source.format == "torch-zip":
                assert source.archive is not None
                src_pkl = read_record(source.path, fd, source.archive.records["data.pkl"])
                if protocol is None:  # the source's, unless the edit chose one
                    protocol = src_pkl[1] if src_pkl[:1] == b"\x80" else 2
            else:
                src_pkl, protocol = b"", protocol or 2
            order: list[Storage] = []
            try:
                canon = dumps(root, protocol=protocol,
                              storage_pid=zip_pid_renumbering(),
                              storage_order=order)
            except (ValueError, TypeError, AttributeError, RecursionError) as e:
                raise CkptError(f"cannot write the edited tree as a pickle: {e}") from e
            data_pkl = canon
            reused = False
            # the original data.pkl is kept when the new pickle is the same, byte for byte; an
            # edit (a new root) never parses it again. Only for the file's own tree (root None:
            # possibly changed in place by a caller of this low-level function) is the original
            # parsed again, to tell "unchanged, though ckpttool's pickle of it differs in memo
            # details" from "changed".
            if src_pkl and canon == src_pkl:
                data_pkl, reused = src_pkl, True
            elif src_pkl and root is source.root:
                fresh = unpickle(src_pkl).root
                if dumps(fresh, protocol=protocol, storage_pid=zip_pid_renumbering()) == canon:
                    data_pkl, reused = src_pkl, True
            records, alignment = _source_records(source, fd, data_pkl, order, new_records)

        # -- the temp file -------------------------------------------------------------------
        directory = os.path.dirname(target)
        prefix = source.archive.prefix if source.archive is not None else _prefix(target)
        tmp, written = _write_temp(target, target_st, prefix, records, alignment=alignment,
                                   progress=progress, verify_crc=verify_crc)

        # -- verify --------------------------------------------------------------------------
        _verify(tmp, written, data_pkl)

        # -- backup, replace -----------------------------------------------------------------
        backup_path = None
        if backup and target_st is not None:
            backup_path = _make_backup(target)
        os.replace(tmp, target)
        tmp = None
        fsync_dir(directory)
        size = os.stat(target).st_size
    except OSError as e:
        raise WriteError(f"could not write the checkpoint ({e.strerror or e}); the original "
                         "file is unchanged", path=out_path or source.path,
                         hint=_write_hint(e)) from e
    finally:
        os.close(fd)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return WriteResult(target, "torchscript" if source.format == "torchscript" else "torch-zip",
                       size,
                       "torch-legacy" if source.format == "torch-legacy" else None,
                       backup_path, reused, written)


def _write_hint(e: OSError) -> str | None:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "free some space (the new file is written beside the target before it " \
               "replaces it) or write elsewhere with -o"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "the folder is not writable; write elsewhere with -o OUT"
    return None


def copy_file(src: str, out_path: str, *, force: bool = False) -> str:
    """Copy ``src`` to ``out_path`` byte for byte, crash-safely (temp file, fsync, replace).

    Returns the path written. An existing ``out_path`` is refused unless ``force``.
    """
    target, is_source, _ = _check_target(src, out_path, force)
    if is_source:
        return target
    directory = os.path.dirname(target)
    tmp: str | None = None
    try:
        tfd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".",
                                    suffix=TMP_SUFFIX, dir=directory)
        with os.fdopen(tfd, "wb") as dst, open(src, "rb") as fsrc:
            shutil.copyfileobj(fsrc, dst, 8 << 20)
            dst.flush()
            os.fchmod(dst.fileno(), stat.S_IMODE(os.stat(src).st_mode))
            os.fsync(dst.fileno())
        if not filecmp.cmp(src, tmp, shallow=False):
            raise WriteError("the copy does not match the source; nothing was replaced",
                             path=out_path)
        os.replace(tmp, target)
        tmp = None
        fsync_dir(directory)
    except OSError as e:
        raise WriteError(f"could not copy the checkpoint ({e.strerror or e})", path=out_path,
                         hint=_write_hint(e)) from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return target


def _verify(tmp: str, written: list[WrittenRecord], data_pkl: bytes) -> None:
    """Re-read the temp file's zip directory and data.pkl and compare them with what was
    meant: every record's name, offset, size and CRC, and data.pkl's bytes (which were
    pickled from the tree and checked to be the tree's pickle before writing). Tensor bytes
    are not re-read: the writer checked their CRCs as it copied them."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        try:
            archive = read_archive(tmp, fd, size)
            back = read_record(tmp, fd, archive.records["data.pkl"])
        except (UnreadableError, EOFError, struct.error) as e:
            raise WriteError(f"the new file did not read back ({e}); nothing was "
                             "replaced") from e
    finally:
        os.close(fd)
    got = [(r.name, r.data_offset, r.size, r.crc, r.method) for r in archive.records.values()]
    want = [(r.name, r.data_offset, r.size, r.crc, 0) for r in written]
    if got != want or archive.tricks:
        raise WriteError("the new file's records differ from what was written (sizes, "
                        "offsets or CRCs); nothing was replaced")
    if back != data_pkl:
        raise WriteError("the new file's data.pkl is not the pickle that was written; "
                         "nothing was replaced")


def _make_backup(target: str) -> str:
    bak = target + ".bak"
    directory = os.path.dirname(target)
    tmp_link = os.path.join(directory, f".{os.path.basename(bak)}.{secrets.token_hex(6)}"
                                       f"{TMP_SUFFIX}")
    try:
        try:
            os.link(target, tmp_link)
        except OSError:
            # no hard links here: copy, fsync, then rename into place
            with open(target, "rb") as src, open(tmp_link, "xb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            shutil.copystat(target, tmp_link)
        os.replace(tmp_link, bak)
    except BaseException:
        try:
            os.unlink(tmp_link)
        except OSError:
            pass
        raise
    fsync_dir(directory)
    return bak


__all__ = ["WriteResult", "write_file", "copy_file", "Payload", "TMP_SUFFIX"]
