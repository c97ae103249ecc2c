"""What `show --json` must say about a value, computed from what torch itself loads."""

from __future__ import annotations

import collections
import math
from typing import Any

import torch

TINY = 8


def expected(v: Any, device: bool = True) -> Any:
    if isinstance(v, torch.Tensor):
        d: dict[str, Any] = {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        if device:
            d["device"] = str(v.device)
        if 0 < v.numel() <= TINY and v.dtype not in (torch.float8_e4m3fn,):
            d["value"] = expected(v.item() if v.dim() == 0 else v.tolist())
        return d
    if isinstance(v, float):
        if math.isfinite(v):
            return v
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {str(k): expected(x, device) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [expected(x, device) for x in v]
    if isinstance(v, collections.abc.Set):
        return sorted((expected(x, device) for x in v), key=repr)
    return v


def strip_device(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: strip_device(x) for k, x in v.items() if k != "device"}
    if isinstance(v, list):
        return [strip_device(x) for x in v]
    return v
