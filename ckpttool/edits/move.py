"""``move``: change the device tag of every storage (no tensor bytes are read or written).

torch.save always writes bytes from a CPU copy; the device is only the ``location`` string of
each storage's persistent id (in a TorchScript archive: the storages of ``data.pkl``,
``constants.pkl`` and ``traced_inputs.pkl`` alike). ``step`` stays on the CPU unless its group
is capturable or fused, which is where torch's optimizers keep it. RNG-state files (the Trainer's
``rng_state*.pth``, accelerate's ``random_states_*.pkl``) stay on the CPU too:
``torch.set_rng_state`` only takes a CPU ByteTensor, even for CUDA generators' states.
"""

from __future__ import annotations

import re

from ..checkpoint import Checkpoint
from ..errors import EditError
from ..formats.nodes import TensorRef
from ..formats.safetensors import SafeTensor
from ..tree import opaque_top, storages, walk_all
from . import Plan, TreeEditor

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_RNG_FILE = re.compile(r"^(rng_state.*\.pth|random_states_\d+\.pkl)$")


def normalize_device(device: str) -> str:
    if not _DEVICE.match(device):
        raise EditError(f"device must be cpu, cuda or cuda:N, not {device!r}")
    return "cuda:0" if device == "cuda" else device


def move(ckpt: Checkpoint, device: str, pointer: str = "") -> Plan:
    """Tag every storage under ``pointer`` with ``device``.

    Every storage is reached, including those of tensors inside opaque objects (a pickled
    ``nn.Module``, ultralytics' ``ema``, an FSDP tensor subclass). ``step`` stays on the CPU
    unless its group is capturable or fused; RNG-state files stay on the CPU.

    Args:
        ckpt: the checkpoint (not changed; the plan's ``result`` is the edited one).
        device: ``cpu``, ``cuda`` (``cuda:0``) or ``cuda:N``.
        pointer: only storages under this JSON Pointer (default: all).
    """
    loc = normalize_device(device)
    for ptr, obj, _ in walk_all(ckpt.resolve(pointer), pointer):
        if isinstance(obj, TensorRef) and not obj.plain and obj.is_dtensor:
            raise EditError(f"{ptr or '/'} is a DTensor: its device is its mesh's (the wrapper "
                            "and the DeviceMesh name a device too); moving sharded state is "
                            "not supported yet", path=ckpt.path, pointer=ptr,
                            hint="move it with torch after loading on the target mesh, or "
                                 "save a full state dict (full_state_dict=True) and move that")
    ed = TreeEditor(ckpt, "move")
    if ckpt.kind == "dcp":
        n = sum(1 for _, o, _ in walk_all(ckpt.resolve(pointer), pointer)
                if isinstance(o, SafeTensor))
        return ed.finish(f"move: a DCP folder stores its {n} tensors without a device "
                         "(dcp.load puts each one on the device of the state dict it loads "
                         "into); no changes")
    cpu_steps: set[int] = set()
    for opt in ckpt.optimizers:
        for s in opt.state:
            step = s.entries.get("step")
            g = opt.groups[s.group].hyperparameters if s.group is not None else {}
            if isinstance(step, TensorRef) and not (g.get("capturable") or g.get("fused")):
                cpu_steps.add(id(step.storage))
    found = storages(ckpt.resolve(pointer), pointer)
    moved = kept_steps = kept_rng = 0
    opaque_at: dict[str, int] = {}
    # a TorchScript archive's tree is {"data.pkl": module, "constants.pkl": ...}: say per pickle
    script = not ckpt.is_folder and ckpt.files[0].format == "torchscript"
    per_pickle: dict[str, int] = {}
    for sid, (ptr, st, in_opaque) in found.items():
        rng = ckpt.is_folder and bool(_RNG_FILE.match(ckpt.file_for(ptr).name))
        target = "cpu" if sid in cpu_steps or rng else loc
        if target != loc:
            kept_steps += sid in cpu_steps and not rng
            kept_rng += rng
        if st.location == target:
            continue
        ed.substitute(st, st.retagged(target), ptr, st.location, target)
        moved += 1
        if script:
            pkl = ptr.split("/")[1] if ptr.count("/") else ptr
            per_pickle[pkl] = per_pickle.get(pkl, 0) + 1
        elif in_opaque:
            top = opaque_top(ptr)
            opaque_at[top] = opaque_at.get(top, 0) + 1
    total = len(found)
    stay = [f"{kept_steps} non-capturable step tensors"] if kept_steps else []
    stay += [f"{kept_rng} RNG-state tensors"] if kept_rng else []
    if not moved:
        summary = f"move: all {total} storages are already where they belong; no changes"
    else:
        summary = f"move: {moved} of {total} storages now on {loc}"
        if per_pickle:
            summary += " (" + ", ".join(f"{n} in {p}" for p, n in per_pickle.items()) + \
                " of the TorchScript archive)"
        if opaque_at:
            summary += " (" + ", ".join(f"{n} inside the pickled object at {p}"
                                        for p, n in opaque_at.items()) + ")"
    if stay and loc != "cpu":
        summary += f"; {' and '.join(stay)} stay on cpu"
    return ed.finish(summary)

