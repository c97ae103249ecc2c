"""Saving an edited checkpoint: each changed file rewritten crash-safely, everything else kept.

* **In place** (no ``output``): only the files whose tree changed are rewritten, each one
  atomically (:func:`ckpttool.writer.write_file`), optimizer files last, so a crash between
  files leaves the old optimizer beside at most some new files it does not depend on.
* **A file to ``output``**: the rewritten file, or a byte-identical copy when nothing changed.
* **A folder to ``output``**: the whole folder is reproduced (every file and subfolder,
  symlinks as symlinks): unchanged files are copied byte for byte, changed ones rewritten.
  The new folder is built under a temporary name beside ``output`` and renamed into place
  only when complete, so a crash leaves no half-written ``output``. Files are copied, not
  hard-linked: a trainer that later writes into the new folder in place (``torch.save`` opens
  with truncation) must not change the original run's files.

Nothing is written from an unsafe checkpoint.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

from .checkpoint import Checkpoint
from .edits import Plan
from .errors import CkptError, UnsafeCheckpointError, WriteError
from .writer import TMP_SUFFIX, WriteResult, copy_file, fsync_dir, write_file

Progress = Callable[[int, int], None]


@dataclass
class SaveResult:
    """What :func:`save` did."""

    output: str  # the file or folder written, as given (the checkpoint's path when in place)
    changed: bool  # False: nothing to change (in place: nothing written; -o: a copy)
    written: list[WriteResult] = field(default_factory=list)  # files rewritten
    copied: list[str] = field(default_factory=list)  # files and links kept unchanged (relative)
    details: list[str] = field(default_factory=list)  # what else was done, for people


def _order(ckpt: Checkpoint) -> list[str]:
    """Changed files, optimizer files last (a crash between files leaves the old optimizer)."""
    opt_files = {ckpt.file_for(o.pointer).name for o in ckpt.optimizers}
    return sorted(ckpt.touched, key=lambda n: (n in opt_files, n))


def save(edited: Plan | Checkpoint, output: str | None = None, *, force: bool = False,
         backup: bool = False, progress: Progress | None = None) -> SaveResult:
    """Write an edited checkpoint: in place (default) or to ``output``.

    Args:
        edited: a plan (its ``result`` is written) or an edited checkpoint.
        output: a new file (for a file checkpoint) or folder (for a folder checkpoint);
            always written, as a byte-identical copy when nothing changed.
        force: overwrite an existing ``output``.
        backup: keep each replaced file as ``NAME.bak`` (in place only).
        progress: called as ``progress(done_bytes, total_bytes)`` while writing.

    Raises:
        UnsafeCheckpointError: the checkpoint would run code when loaded; nothing is written.
        WriteError: writing failed; the original is unchanged.
    """
    ckpt = edited.result if isinstance(edited, Plan) else edited
    if ckpt.unsafe:
        raise UnsafeCheckpointError(
            f"refusing to write: the checkpoint references {', '.join(ckpt.unsafe_globals)}, "
            "which would run code when loaded. Nothing was written.", path=ckpt.path)
    if ckpt.kind == "dcp":
        return _save_dcp(ckpt, output, force, backup)
    touched = ckpt.touched
    files = {f.name: f for f in ckpt.files}
    if not ckpt.is_folder:
        f = ckpt.files[0]
        if not touched:
            if output is None:
                return SaveResult(ckpt.path, False)
            copy_file(f.path, output, force=force)
            return SaveResult(output, False, copied=[os.path.basename(f.path)])
        w = write_file(f, ckpt.roots[f.name], output, force=force, backup=backup,
                       progress=progress, protocol=ckpt.protocols.get(f.name))
        return SaveResult(output if output is not None else ckpt.path, True, [w])
    if output is None:
        result = SaveResult(ckpt.path, bool(touched))
        for name in _order(ckpt):
            result.written.append(write_file(files[name], ckpt.roots[name], None, force=force,
                                             backup=backup, progress=progress,
                                             protocol=ckpt.protocols.get(name)))
        return result
    return _save_folder(ckpt, output, force, progress)


def _save_dcp(ckpt: Checkpoint, output: str | None, force: bool, backup: bool) -> SaveResult:
    """A DCP folder: only the changed values are written (see :mod:`ckpttool.dcp_save`)."""
    from .dcp_save import save_dcp
    if not ckpt.touched:
        if output is None:
            return SaveResult(ckpt.path, False)
        return SaveResult(output, False, copied=copy_folder(ckpt.path, output, force))
    done = save_dcp(ckpt, output, force=force, backup=backup)
    return SaveResult(output if output is not None else ckpt.path, True, copied=done.copied,
                      details=done.details(output is not None, backup))


def _save_folder(ckpt: Checkpoint, output: str, force: bool,
                 progress: Progress | None) -> SaveResult:
    touched = set(ckpt.touched)
    files = {f.name: f for f in ckpt.files}
    result = SaveResult(output, bool(touched))

    def write_top(name: str, dest: str) -> bool:
        if name not in touched:
            return False
        result.written.append(write_file(files[name], ckpt.roots[name], dest, force=True,
                                         progress=progress, protocol=ckpt.protocols.get(name)))
        return True
    result.copied = copy_folder(ckpt.path, output, force, write_top=write_top)
    return result


def copy_folder(source: str, output: str, force: bool,
                fill: Callable[[str], None] | None = None,
                write_top: Callable[[str, str], bool] | None = None) -> list[str]:
    """Reproduce folder ``source`` as ``output``, crash-safely: built under a temporary name
    beside ``output`` and renamed into place only when complete. Each top-level file for which
    ``write_top(name, dest)`` returns True was written by it; every other file, link and
    subfolder is copied (links as links). ``fill(tmp)`` may then change the copy before the
    rename. Returns the files and links copied (relative paths)."""
    src = os.path.realpath(source)
    dest = os.path.abspath(output)
    if os.path.realpath(dest) == src or os.path.realpath(dest).startswith(src + os.sep):
        raise CkptError("the output folder is inside the checkpoint folder", path=output,
                        hint="write the new folder somewhere else")
    if os.path.lexists(dest):
        if not force:
            raise CkptError("already exists", path=output, hint="use --force to replace it")
        if not os.path.isdir(dest) or os.path.islink(dest):
            raise CkptError("exists and is not a folder", path=output,
                            hint="remove it or pick another name")
    parent = os.path.dirname(dest)
    if not os.path.isdir(parent):
        raise CkptError(f"the folder {parent} does not exist", path=output)
    copied: list[str] = []
    tmp = old = None
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.", suffix=TMP_SUFFIX,
                               dir=parent)
        os.chmod(tmp, stat.S_IMODE(os.stat(src).st_mode))
        for here, dirs, names in os.walk(src):
            rel = os.path.relpath(here, src)
            there = tmp if rel == "." else os.path.join(tmp, rel)
            for d in list(dirs):
                s = os.path.join(here, d)
                if os.path.islink(s):  # a link to a folder: kept as a link, not followed
                    os.symlink(os.readlink(s), os.path.join(there, d))
                    dirs.remove(d)
                    copied.append(d if rel == "." else os.path.join(rel, d))
                    continue
                os.mkdir(os.path.join(there, d))
                shutil.copystat(s, os.path.join(there, d))
            for n in sorted(names):
                s, t = os.path.join(here, n), os.path.join(there, n)
                relname = n if rel == "." else os.path.join(rel, n)
                if rel == "." and write_top is not None and write_top(n, t):
                    continue
                if os.path.islink(s):
                    os.symlink(os.readlink(s), t)
                else:
                    _copy_synced(s, t)
                copied.append(relname)
        if fill is not None:
            fill(tmp)
        _fsync_tree(tmp)
        if os.path.lexists(dest):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.old.", suffix=TMP_SUFFIX,
                                   dir=parent)
            os.rename(dest, os.path.join(old, "x"))
        os.rename(tmp, dest)
        tmp = None
        fsync_dir(parent)
    except OSError as e:
        if old is not None and not os.path.lexists(dest):
            os.rename(os.path.join(old, "x"), dest)  # put the replaced folder back
        raise WriteError(f"could not write the folder ({e.strerror or e}); the checkpoint is "
                         "unchanged", path=output) from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return copied


def _copy_synced(src: str, dst: str) -> None:
    with open(src, "rb") as fs, open(dst, "xb") as fd:
        shutil.copyfileobj(fs, fd, 8 << 20)
        fd.flush()
        os.fsync(fd.fileno())
    shutil.copystat(src, dst)


def _fsync_tree(root: str) -> None:
    for here, _, _ in os.walk(root):
        fsync_dir(here)
