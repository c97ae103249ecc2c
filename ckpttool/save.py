"""Writing an edit plan: each touched file rewritten crash-safely, the optimizer file last."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

from .edits import EditPlan
from .errors import CkptError, UnsafeCheckpointError
from .writer import WriteResult, write_file

Progress = Callable[[int, int], None]


@dataclass
class SaveResult:
    plan: EditPlan
    written: list[WriteResult] = field(default_factory=list)
    output: str = ""

    @property
    def messages(self) -> list[str]:
        return [w.message for w in self.written]


def _order(plan: EditPlan) -> list[str]:
    """Touched files, optimizer files last (a crash between files leaves the old optimizer)."""
    opt_files = {plan.ckpt.file_for(o.pointer).name for o in plan.ckpt.optimizers}
    return sorted(plan.touched, key=lambda n: (n in opt_files, n))


def save(plan: EditPlan, output: str | None = None, *, force: bool = False,
         backup: bool = False, progress: Progress | None = None) -> SaveResult:
    """Write the files ``plan`` touched: in place (default) or to ``output``.

    For a folder checkpoint, ``output`` is a new folder: untouched files are copied into it.
    Nothing is written from an unsafe checkpoint.
    """
    ckpt = plan.ckpt
    if ckpt.unsafe:
        raise UnsafeCheckpointError(
            f"{ckpt.path}: refusing to write: the checkpoint references "
            f"{', '.join(ckpt.unsafe_globals)}, which would run code when loaded. Nothing was "
            "written.")
    result = SaveResult(plan, output=output or ckpt.path)
    if not plan.touched:
        return result
    if ckpt.is_folder:
        dest = output or ckpt.path
        if output is not None:
            if os.path.exists(output) and not force:
                raise CkptError(f"{output} already exists; pass --force to overwrite it")
            os.makedirs(output, exist_ok=True)
            for f in ckpt.files:
                if f.name not in plan.touched:
                    shutil.copy2(f.path, os.path.join(output, f.name))
        for name in _order(plan):
            f = next(x for x in ckpt.files if x.name == name)
            out = os.path.join(dest, name) if output is not None else None
            result.written.append(write_file(f, f.root, out, new_records=plan.new_records.get(name),
                                             force=True if output is not None else force,
                                             backup=backup, progress=progress))
        return result
    f = ckpt.files[0]
    result.written.append(write_file(f, f.root, output, new_records=plan.new_records.get(""),
                                     force=force, backup=backup, progress=progress))
    return result
