"""Statistics of tensor values (``show --stats``); torch is imported only when statistics are
asked for (reading never imports it)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .checkpoint import read_tensor_bytes
from .formats.nodes import TensorRef
from .formats.safetensors import SafeTensor
from .newtensors import contiguous_stride

if TYPE_CHECKING:
    from types import ModuleType

    from .checkpoint import Checkpoint
    from .locate import OptimizerState


def _torch() -> ModuleType:
    """torch, imported without its "Failed to initialize NumPy" warning.

    Without numpy, torch warns on import that it failed to initialize NumPy, although nothing
    here needs numpy: the values are read with ``torch.frombuffer``.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy",
                                category=UserWarning)
        import torch
    return torch


def tensor_stats(t: TensorRef | SafeTensor, raw_bytes: bytes | None = None
                 ) -> dict[str, Any]:
    """Norm, min, max, mean and NaN / Inf counts of a tensor, read from the file.

    Args:
        t: a tensor of a checkpoint opened with :func:`ckpttool.open`.
        raw_bytes: its bytes, when read otherwise (a DCP tensor's gathered chunks).

    Returns:
        ``norm``, ``min``, ``max`` and ``mean`` of the finite elements (as float64; ``None``
        when there are none), ``nan`` and ``inf`` the counts of the others. Complex values
        count by their magnitude.

    Raises:
        UnreadableError: the tensor's bytes are missing from the file.
    """
    torch = _torch()
    raw = bytearray(read_tensor_bytes(t) if raw_bytes is None else raw_bytes)
    dtype = getattr(torch, t.dtype)
    if not raw:
        return {"norm": 0.0, "min": None, "max": None, "mean": None, "nan": 0, "inf": 0}
    flat = torch.frombuffer(raw, dtype=dtype)
    stride = t.stride if isinstance(t, TensorRef) else contiguous_stride(t.shape)
    x = flat.as_strided(t.shape, stride, 0) if t.shape else flat[0]
    if x.is_complex():
        x = x.abs()
    x = x.double()
    finite = x[torch.isfinite(x)]
    return {
        "norm": float(torch.linalg.vector_norm(finite)) if finite.numel() else None,
        "min": float(finite.min()) if finite.numel() else None,
        "max": float(finite.max()) if finite.numel() else None,
        "mean": float(finite.mean()) if finite.numel() else None,
        "nan": int(torch.isnan(x).sum()),
        "inf": int(torch.isinf(x).sum()),
    }


def optimizer_stats(opts: Iterable[OptimizerState], ckpt: Checkpoint | None = None
                    ) -> dict[int, dict[str, Any]]:
    """Statistics of every tensor in the per-parameter state of the optimizers.

    Args:
        opts: optimizer states, as ``Checkpoint.optimizers`` lists them.
        ckpt: the checkpoint they are in (needed for a DCP folder's tensors).

    Returns:
        ``id(tensor)`` -> :func:`tensor_stats` of it, for each tensor once (a tensor shared
        by several entries is read once).

    Raises:
        UnreadableError: a tensor's bytes are missing from the file.
    """
    out: dict[int, dict[str, Any]] = {}
    for o in opts:
        for s in o.state:
            for k, v in s.entries.items():
                if id(v) in out:
                    continue
                if isinstance(v, TensorRef):
                    out[id(v)] = tensor_stats(v)
                elif isinstance(v, SafeTensor) and v.chunks is not None and ckpt is not None \
                        and ckpt.kind == "dcp":  # a DCP folder: its chunks gathered
                    from .dcp_convert import gathered_bytes
                    fqn = f"{o.pointer.strip('/').replace('/', '.')}.state.{s.name}.{k}"
                    out[id(v)] = tensor_stats(v, gathered_bytes(ckpt, fqn, v))
    return out
