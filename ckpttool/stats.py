"""Statistics of tensor values (``show --stats``): the one part of reading that uses torch."""

from __future__ import annotations

from typing import Any

from .checkpoint import read_tensor_bytes
from .formats.nodes import TensorRef


def tensor_stats(t: TensorRef) -> dict[str, Any]:
    """norm, min, max, mean and NaN / Inf counts of a tensor, read from the file."""
    import torch

    raw = bytearray(read_tensor_bytes(t))
    dtype = getattr(torch, t.dtype)
    if not raw:
        return {"norm": 0.0, "min": None, "max": None, "mean": None, "nan": 0, "inf": 0}
    flat = torch.frombuffer(raw, dtype=dtype)
    x = flat.as_strided(t.shape, t.stride, 0) if t.shape else flat[0]
    if x.is_complex():
        x = x.abs()
    x = x.double() if x.is_floating_point() or x.dtype == torch.bool else x.double()
    finite = x[torch.isfinite(x)]
    return {
        "norm": float(torch.linalg.vector_norm(finite)) if finite.numel() else None,
        "min": float(finite.min()) if finite.numel() else None,
        "max": float(finite.max()) if finite.numel() else None,
        "mean": float(finite.mean()) if finite.numel() else None,
        "nan": int(torch.isnan(x).sum()),
        "inf": int(torch.isinf(x).sum()),
    }
