"""ckpttool: inspect, check and safely edit PyTorch training checkpoints.

Reading never runs code from the file and never imports torch::

    import ckpttool
    ckpt = ckpttool.open("ckpt.pth")
    for opt in ckpt.optimizers:
        print(opt.pointer, opt.type, [g.hyperparameters["lr"] for g in opt.groups])
"""

from __future__ import annotations

from .checkpoint import Checkpoint, CheckpointFile
from .checkpoint import open_checkpoint as open
from .errors import CkptError, EditError, UnreadableError, UnsafeCheckpointError

__version__ = "0.1.0"

__all__ = ["Checkpoint", "CheckpointFile", "CkptError", "EditError", "UnreadableError",
           "UnsafeCheckpointError", "open", "__version__"]
