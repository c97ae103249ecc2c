"""``move``: change the device tag of storages (no tensor bytes are read or written).

torch.save always writes bytes from a CPU copy; the device is only the ``location`` string of
each storage's persistent id. ``step`` stays on the CPU unless its group is capturable or
fused, which is where torch's optimizers keep it. RNG-state files (the Trainer's
``rng_state*.pth``, accelerate's ``random_states_*.pkl``) stay on the CPU too:
``torch.set_rng_state`` only takes a CPU ByteTensor, even for CUDA generators' states.
"""

from __future__ import annotations

import re

from ..checkpoint import Checkpoint
from ..errors import EditError
from ..formats.nodes import Storage, TensorRef
from ..tree import walk
from . import Change, EditPlan

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_RNG_FILE = re.compile(r"^(rng_state.*\.pth|random_states_\d+\.pkl)$")


def normalize_device(device: str) -> str:
    if not _DEVICE.match(device):
        raise EditError(f"device must be cpu, cuda or cuda:N, not {device!r}")
    return "cuda:0" if device == "cuda" else device


def move(ckpt: Checkpoint, device: str, pointer: str = "") -> EditPlan:
    """Tag every storage under ``pointer`` with ``device`` (``step`` stays on the CPU unless
    its group is capturable or fused)."""
    loc = normalize_device(device)
    root = ckpt.resolve(pointer)
    plan = EditPlan(ckpt, "move")
    # step tensors that must stay on the CPU
    cpu_steps: set[int] = set()
    for opt in ckpt.optimizers:
        for s in opt.state:
            step = s.entries.get("step")
            g = opt.groups[s.group].hyperparameters if s.group is not None else {}
            if isinstance(step, TensorRef) and not (g.get("capturable") or g.get("fused")):
                cpu_steps.add(id(step.storage))
    storages: dict[int, tuple[str, Storage]] = {}
    for ptr, obj in _tensor_holders(root, pointer):
        t = obj
        st = t.storage
        if st is not None and id(st) not in storages:
            storages[id(st)] = (ptr, st)
    rng = {sid for sid, (ptr, _) in storages.items()
           if ckpt.is_folder and _RNG_FILE.match(ckpt.file_for(ptr).name)}
    moved = 0
    for sid, (ptr, st) in storages.items():
        target = "cpu" if sid in cpu_steps or sid in rng else loc
        if st.location != target:
            plan.changes.append(Change(ptr, st.location, target))
            st.pid = st.with_location(target)
            plan.touch(ptr)
            moved += 1
    kept = sum(1 for sid in storages if sid in cpu_steps and sid not in rng)
    kept_rng = sum(1 for sid in storages if sid in rng)
    stay = [f"{kept} non-capturable step tensors"] if kept else []
    stay += [f"{kept_rng} RNG-state tensors"] if kept_rng else []
    plan.summary = (f"move: {moved} of {len(storages)} storages now on {loc}"
                    + (f" ({' and '.join(stay)} stay on cpu)" if stay and loc != "cpu"
                       else ""))
    return plan


def _tensor_holders(root: object, pointer: str) -> list[tuple[str, TensorRef]]:
    out = []
    if isinstance(root, TensorRef):
        return [(pointer, root)]
    for ptr, obj in walk(root, pointer):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for k, v in items:
            if isinstance(v, TensorRef):
                out.append((f"{ptr}/{k}", v))
    return out
