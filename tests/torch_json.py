"""What `show --json` must say about a value, computed from what torch itself loads."""

from __future__ import annotations

import collections
import math
import pickle
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


# ---------------------------------------------------------------------------------------
# loading our own fixtures with torch when their classes' packages are not installed

class _StubMeta(type):
    def __getattr__(cls, name: str) -> Any:  # getattr(HistoryBuffer, "min") in mmengine
        if name.startswith("__"):
            raise AttributeError(name)
        return f"<{cls.__name__}.{name}>"


class Stub(metaclass=_StubMeta):
    """Stands in for a class whose package (ultralytics, mmengine, deepspeed) is not installed
    in the test environment: it takes any constructor arguments and keeps its pickled state in
    ``__dict__``, so torch's own unpickling (persistent ids, storages, device restoring,
    tensor rebuilds) runs for real around it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state


class _StubUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (Stub,), {"__module__": module})


class stub_pickle:  # noqa: N801 - used as a module by torch.load(pickle_module=...)
    Unpickler = _StubUnpickler
    load = pickle.load
    __name__ = "stub_pickle"


def load_fixture(path: Any, **kw: Any) -> Any:
    """torch.load of one of OUR fixtures (trusted: made by fixtures/make_fixtures.py), with
    classes of packages that are not installed replaced by :class:`Stub`."""
    return torch.load(path, weights_only=False, pickle_module=stub_pickle, **kw)


def module_state_dict(m: Any) -> dict[str, Any]:
    """``state_dict()`` of a loaded module, real (``nn.Module``) or stubbed."""
    if isinstance(m, torch.nn.Module):
        return m.state_dict()
    out: dict[str, Any] = {}

    def visit(mod: Any, prefix: str) -> None:
        d = mod.__dict__
        for k, v in d.get("_parameters", {}).items():
            if v is not None:
                out[prefix + k] = v
        skip = d.get("_non_persistent_buffers_set", set())
        for k, v in d.get("_buffers", {}).items():
            if v is not None and k not in skip:
                out[prefix + k] = v
        for k, sub in d.get("_modules", {}).items():
            if sub is not None:
                visit(sub, f"{prefix}{k}.")
    visit(m, "")
    return out
