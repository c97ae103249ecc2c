"""ckpttool: inspect, check and safely edit PyTorch training checkpoints.

Reading never runs code from the file and never imports torch::

    import ckpttool
    ckpt = ckpttool.open("ckpt.pth")
    for opt in ckpt.optimizers:
        print(opt.pointer, opt.type, [g.hyperparameters["lr"] for g in opt.groups])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .checkpoint import Checkpoint, CheckpointFile, open_for_edit
from .checkpoint import open_checkpoint as open
# bound here, at import, so that ``ckpttool.diff`` is the function even though the module
# ckpttool/diff.py has the same name
from .diff import Difference, DiffResult, diff
from .errors import CkptError, EditError, RunFolderError, UnreadableError, UnsafeCheckpointError
from .run import Run, RunEntry, open_run

__version__ = "0.1.0"

if TYPE_CHECKING:
    import os

    from .checks import Report, check
    from .edits.plan import Plan


def sanitize(path: str | os.PathLike[str] | Checkpoint, *, keep_unknown: str = "error"
             ) -> Plan:
    """The plan that makes a checkpoint load with ``torch.load(weights_only=True)``: every
    value it refuses (argparse ``Namespace``, numpy values, paths, enums, dataclasses, ...)
    rewritten into a plain one, each listed in ``plan.changes``. Write it with
    ``ckpttool.save.save(plan, out)``. An unsafe file raises :class:`UnsafeCheckpointError`.
    See :mod:`ckpttool.edits.sanitize`."""
    from .edits.sanitize import sanitize as _sanitize
    ckpt = path if isinstance(path, Checkpoint) else open_for_edit(path, "sanitize")
    return _sanitize(ckpt, keep_unknown)


def __getattr__(name: str) -> Any:
    # check pulls in the edits and tabulate: imported on first use, so `show` and `--help`
    # start as fast as before
    if name in ("check", "Report"):
        from . import checks
        return getattr(checks, name)
    raise AttributeError(f"module 'ckpttool' has no attribute {name!r}")


__all__ = ["Checkpoint", "CheckpointFile", "CkptError", "DiffResult", "Difference", "EditError",
           "Report", "Run", "RunEntry", "RunFolderError", "UnreadableError",
           "UnsafeCheckpointError", "__version__", "check", "diff", "open", "open_for_edit",
           "open_run", "sanitize"]
