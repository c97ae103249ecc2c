"""Saving an edited torch.distributed.checkpoint (DCP) folder.

A DCP folder is ``.metadata`` (where every value lies) plus ``__R_N.distcp`` data files. An
edit of non-tensor values (param-group hyperparameters, scheduler fields, counters) rewrites
only those values, in the order that keeps the folder loadable by ``dcp.load`` at every
instant:

1. the new values, each a small torch.save archive as DCP writes them, go into a NEW data
   file (``__ckpttool_N.distcp``), synced; nothing the old ``.metadata`` references is touched;
2. a new ``.metadata`` (the original pickle with only the moved values' storage entries, and
   any added or removed keys, changed) is written beside it, synced, read back and checked,
   then renamed over ``.metadata``: that rename is the commit;
3. data files that only the old ``.metadata`` referenced (an earlier edit's file) are removed
   last; kept with ``backup``, and whenever a ``.metadata.bak`` (an earlier backup) still
   references them.

A crash before 3 leaves the old checkpoint or the new one, both complete; after it, at most
an unreferenced file. Tensor values of a DCP folder are not edited (their chunks are spread
over the ranks' files): an edit that changes one is refused.

With ``output`` the whole folder is reproduced under a temporary name beside it (every file
copied byte for byte), the commit is made there, and the folder is renamed into place.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import Checkpoint, CheckpointFile, _read_zip, read_file
from .errors import CkptError, WriteError
from .formats.nodes import Reduce, fields
from .formats.pickler import dumps
from .formats.safetensors import SafeTensor
from .formats.torchzip_write import Payload, write_archive
from .tree import is_tensor_node, pointer_of, walk_all
from .writer import TMP_SUFFIX, WriteResult, fsync_dir

_MISSING: Any = object()


def _tensorish(value: Any) -> bool:
    if isinstance(value, SafeTensor) or is_tensor_node(value):
        return True
    if isinstance(value, (dict, list, tuple, Reduce)):
        return any(is_tensor_node(o) for _, o, _ in walk_all(value))
    return False


def changed_values(f: CheckpointFile, new_root: Any) -> tuple[list[tuple[str, tuple[Any, ...],
                                                                          Any]],
                                                               list[tuple[str, tuple[Any, ...],
                                                                          Any]], list[str]]:
    """What an edit changed in a DCP tree: (changed, added, removed) entries, each changed or
    added one ``(fqn, keys, new value)``; removed ones by fqn.

    Raises :class:`CkptError` for changes DCP values cannot take here (a tensor, a new
    nested container)."""
    meta = fields(f.extra["dcp_meta"])
    planner: dict[Any, Any] = meta["planner_data"] \
        if isinstance(meta.get("planner_data"), dict) else {}
    sdm = meta["state_dict_metadata"]
    paths: dict[tuple[Any, ...], str] = {}
    for fqn in sdm:
        keys = planner.get(fqn)
        paths[tuple(keys) if isinstance(keys, (tuple, list)) and keys else (fqn,)] = fqn
    prefixes = {k[:i] for k in paths for i in range(1, len(k))}
    changed: list[tuple[str, tuple[Any, ...], Any]] = []
    added: list[tuple[str, tuple[Any, ...], Any]] = []
    seen: set[str] = set()

    def refuse(keys: tuple[Any, ...], why: str) -> CkptError:
        return CkptError(f"{pointer_of(keys)}: {why}; ckpttool edits only the non-tensor values "
                         "of a DCP folder (hyperparameters, scheduler fields, counters)",
                         path=f.path.rsplit(os.sep, 1)[0], pointer=pointer_of(keys),
                         hint="convert it with `ckpttool to-file`, edit the file, and "
                              "`ckpttool to-dcp` it back")

    def walk(new: Any, old: Any, keys: tuple[Any, ...]) -> None:
        fqn = paths.get(keys)
        if fqn is not None:
            seen.add(fqn)
            if new is not old:
                if _tensorish(new) or _tensorish(old):
                    raise refuse(keys, "a tensor value would change")
                changed.append((fqn, keys, new))
            return
        if keys and keys not in prefixes:  # a key DCP does not have
            if _tensorish(new):
                raise refuse(keys, "a new tensor would be added")
            if isinstance(new, (dict, list)):
                raise refuse(keys, "a new nested value would be added")
            added.append((".".join(str(k) for k in keys), keys, new))
            return
        if isinstance(new, dict):
            for k, v in new.items():
                o = old.get(k, _MISSING) if isinstance(old, dict) else _MISSING
                walk(v, o, keys + (k,))
        elif isinstance(new, list):
            for i, v in enumerate(new):
                o = old[i] if isinstance(old, list) and i < len(old) else _MISSING
                walk(v, o, keys + (i,))
        elif new is not old:
            raise refuse(keys, "a value that holds other values would be replaced")

    walk(new_root, f.root, ())
    removed = [fqn for fqn in sdm if fqn not in seen]
    return changed, added, removed


def value_archive(value: Any) -> bytes:
    """``value`` (no tensors in it) as the torch.save archive DCP stores for a non-tensor
    entry (records in torch.save's order)."""
    serial = "".join(str(secrets.randbelow(10)) for _ in range(40))
    records = [("data.pkl", dumps(value, protocol=2)), (".format_version", b"1"),
               (".storage_alignment", b"64"), ("byteorder", b"little"), ("version", b"3\n"),
               (".data/serialization_id", serial.encode())]
    with tempfile.TemporaryFile() as tf:
        write_archive(tf.fileno(), "archive", [(n, Payload.from_bytes(b)) for n, b in records])
        tf.seek(0)
        return tf.read()


def _with_state(node: Reduce, **changes: Any) -> Reduce:
    new = node.copy()
    new.state = {**node.state, **changes}
    if "relative_path" in changes:  # a value ckpttool wrote: plain bytes, no transforms
        new.state.pop("transform_descriptors", None)  # (compression) of the entry it replaces
    return new


def new_metadata(meta_node: Reduce, moved: dict[str, tuple[str, int, int]],
                 added: list[tuple[str, tuple[Any, ...], Any]], removed: list[str]) -> Reduce:
    """The Metadata node with the storage entries of ``moved`` fqns (and added ones) pointing
    at (file, offset, length), added keys declared, removed keys gone."""
    m = fields(meta_node)
    sdm, storage = m["state_dict_metadata"], m["storage_data"]
    planner: dict[Any, Any] = m["planner_data"] if isinstance(m.get("planner_data"), dict) \
        else {}
    gone = set(removed)
    bytes_md = next((v for v in sdm.values()
                     if isinstance(v, Reduce) and v.qualname.endswith(".BytesStorageMetadata")),
                    None)
    key_tpl = info_tpl = None
    new_storage: dict[Any, Any] = {}
    for idx, info in storage.items():
        fqn = fields(idx).get("fqn")
        if fqn in gone:
            continue
        if fqn in moved and isinstance(info, Reduce) and isinstance(info.state, dict):
            file, off, length = moved[fqn]
            info = _with_state(info, relative_path=file, offset=off, length=length)
            key_tpl, info_tpl = idx, info
        elif isinstance(sdm.get(fqn), Reduce) and sdm[fqn] is bytes_md:
            key_tpl, info_tpl = key_tpl or idx, info_tpl or info
        new_storage[idx] = info
    new_sdm = {k: v for k, v in sdm.items() if k not in gone}
    new_planner = {k: v for k, v in planner.items() if k not in gone}
    if added:
        if bytes_md is None or not isinstance(key_tpl, Reduce) \
                or not isinstance(info_tpl, Reduce):
            raise CkptError("cannot add a key to a DCP folder that holds no non-tensor value "
                            "to model it on")
        for fqn, keys, _ in added:
            file, off, length = moved[fqn]
            new_storage[_with_state(key_tpl, fqn=fqn)] = _with_state(
                info_tpl, relative_path=file, offset=off, length=length)
            new_sdm[fqn] = bytes_md
            new_planner[fqn] = keys
    state = dict(meta_node.state)
    state.update(state_dict_metadata=new_sdm, storage_data=new_storage)
    if "planner_data" in state and isinstance(state["planner_data"], dict):
        state["planner_data"] = new_planner
    out = meta_node.copy()
    out.state = state
    return out


def _referenced(meta_node: Reduce) -> set[str]:
    out = set()
    for info in fields(meta_node).get("storage_data", {}).values():
        name = fields(info).get("relative_path")
        if isinstance(name, str):
            out.add(name)
    return out


def _backup_references(folder: str) -> set[str] | None:
    """The data files an earlier ``--backup``'s ``.metadata.bak`` references (kept, so the
    backup stays loadable); None when it exists but cannot be read (then nothing is
    removed)."""
    bak = os.path.join(folder, ".metadata.bak")
    if not os.path.lexists(bak):
        return set()
    try:
        f = read_file(bak, ".metadata.bak")
    except CkptError:
        return None
    return _referenced(f.root) if isinstance(f.root, Reduce) else None


def _fsync_write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class DcpCommit:
    """What one commit to a DCP folder did."""

    data_file: str | None  # the new data file, if values were written
    written: list[str]  # fqns of the values written (changed or added)
    removed: list[str]  # fqns of the keys removed
    dropped: list[str]  # data files no .metadata references any more, removed (or left out)
    copied: list[str] = field(default_factory=list)  # -o: the folder's other files, copied

    def details(self, output: bool, backup: bool) -> list[str]:
        """The parts of the command's one-line report."""
        out = [".metadata replaced"]
        n = len(self.written)
        if n:
            out.append(f"{n} value{'s' if n != 1 else ''} written to {self.data_file}")
        if self.removed:
            k = len(self.removed)
            out.append(f"{k} key{'s' if k != 1 else ''} removed")
        if self.dropped:
            out.append(f"{', '.join(self.dropped)} no longer used and "
                       + ("left out" if output else "removed"))
        if backup and not output:
            out.append("the original .metadata is kept as .metadata.bak")
        if output:
            c = len(self.copied)
            out.append(f"{c} file{'s' if c != 1 else ''} copied as they were")
        return out


def commit(folder: str, f: CheckpointFile, new_root: Any, *, backup: bool = False
           ) -> DcpCommit:
    """Apply an edit of ``f``'s tree to the DCP folder ``folder`` (in place, crash-safely)."""
    changed, added, removed = changed_values(f, new_root)
    meta_node: Reduce = f.extra["dcp_meta"]
    entries = changed + added
    moved: dict[str, tuple[str, int, int]] = {}
    blobs, pos = [], 0
    data_name = None
    if entries:
        names = set(os.listdir(folder))
        n = 0
        while f"__ckpttool_{n}.distcp" in names:
            n += 1
        data_name = f"__ckpttool_{n}.distcp"
        for fqn, _, value in entries:
            blob = value_archive(value)
            moved[fqn] = (data_name, pos, len(blob))
            blobs.append(blob)
            pos += len(blob)
    meta = new_metadata(meta_node, moved, added, removed)
    protocol = f.extra.get("dcp_protocol", 2)
    pickled = dumps(meta, protocol=protocol)
    target = os.path.join(folder, ".metadata")
    tfd, tmp, wrote_data = -1, "", False
    try:
        if data_name is not None:
            _fsync_write(os.path.join(folder, data_name), b"".join(blobs))
            wrote_data = True
        tfd, tmp = tempfile.mkstemp(prefix=".metadata.", suffix=TMP_SUFFIX, dir=folder)
        view = memoryview(pickled)
        while view:
            view = view[os.write(tfd, view):]
        os.fchmod(tfd, stat.S_IMODE(os.stat(target).st_mode))
        os.fsync(tfd)
        os.close(tfd)
        tfd = -1
        _verify(folder, tmp, pickled, protocol, entries, moved)
        if backup:
            shutil.copy2(target, target + ".bak")
        os.replace(tmp, target)
        tmp = ""
        fsync_dir(folder)
    except BaseException as e:
        if tfd >= 0:
            os.close(tfd)
        if tmp:
            os.unlink(tmp)
        if wrote_data and data_name is not None:  # unreferenced: the old .metadata is in place
            try:
                os.unlink(os.path.join(folder, data_name))
            except OSError:
                pass
        if isinstance(e, OSError):
            raise WriteError(f"could not write the folder ({e.strerror or e}); the checkpoint "
                             "is unchanged", path=folder) from e
        raise
    dropped: list[str] = []
    kept_for_backup = _backup_references(folder)
    if not backup and kept_for_backup is not None:
        keep = _referenced(meta) | kept_for_backup
        for name in sorted(_referenced(meta_node) - keep):
            try:
                os.unlink(os.path.join(folder, name))
                dropped.append(name)
            except OSError:
                pass
        if dropped:
            fsync_dir(folder)
    return DcpCommit(data_name, [e[0] for e in entries], removed, dropped)


def _verify(folder: str, meta_path: str, pickled: bytes, protocol: int,
            entries: list[tuple[str, tuple[Any, ...], Any]],
            moved: dict[str, tuple[str, int, int]]) -> None:
    """Read the new .metadata and every new value back with the reader, before the commit."""
    back = read_file(meta_path, ".metadata")
    if back.root is None or dumps(back.root, protocol=protocol) != pickled:
        raise WriteError("the new .metadata does not read back as written; nothing was "
                         "replaced", path=folder)
    for fqn, _, value in entries:
        file, off, length = moved[fqn]
        fp = os.path.join(folder, file)
        fd = os.open(fp, os.O_RDONLY)
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            part = _read_zip(fp, file, fd, off + length)
        finally:
            os.close(fd)
        if dumps(part.root) != dumps(value):
            raise WriteError(f"the new value of {fqn} does not read back as written; nothing "
                             "was replaced", path=folder)


def save_dcp(ckpt: Checkpoint, output: str | None, *, force: bool = False,
             backup: bool = False) -> DcpCommit:
    """Write an edited DCP checkpoint in place or as a new folder ``output``."""
    f = ckpt.files[0]
    new_root = ckpt.roots[f.name]
    if output is None:
        return commit(ckpt.path, f, new_root, backup=backup)
    from .save import copy_folder
    done: list[DcpCommit] = []
    copied = copy_folder(ckpt.path, output, force,
                         lambda tmp: done.append(commit(tmp, f, new_root)))
    result = done[0]
    result.copied = [c for c in copied if c not in result.dropped and c != ".metadata"]
    return result
