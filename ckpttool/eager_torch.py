"""Run torch.optim in eager mode without importing ``torch._dynamo`` (for the CLI only).

Every ``torch.optim`` entry point (``Optimizer.__init__`` via ``add_param_group``,
``load_state_dict``, ``step``) is wrapped by ``torch._disable_dynamo`` or calls
``torch._dynamo.graph_break()``, and the first call imports ``torch._dynamo``: 1.3 s and
~75 MB on top of ``import torch`` (1.4 s, ~220 MB), measured on the 2-core bench machine.
Outside ``torch.compile`` both are no-ops: ``disable`` only matters while dynamo traces a frame,
``graph_break`` only inside a traced frame.

:func:`eager_only` gives a process that will never compile (``ckpttool check``) a stand-in
``torch._dynamo`` holding just those two no-ops, so the check's load test runs torch's real
optimizer code at the cost of ``import torch`` alone. It is never used when ``torch._dynamo``
is already imported, and never by the library: in a training script the functions of
torch.optim cache the ``disable`` wrapper they were first given, and a later
``torch.compile`` must find dynamo's own. If the stand-in lacks something a torch release
needs, :func:`real` removes it so the caller can retry with the real module.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

_NAME = "torch._dynamo"


class _StandIn(types.ModuleType):
    """``torch._dynamo`` for eager-only use: ``disable`` and ``graph_break`` as no-ops."""

    @staticmethod
    def disable(fn: Callable[..., Any] | None = None, recursive: bool = True,
                **kwargs: Any) -> Any:
        return fn if fn is not None else (lambda f: f)

    @staticmethod
    def graph_break(*args: Any, **kwargs: Any) -> None:
        return None


def active() -> bool:
    """True while the stand-in is what ``import torch._dynamo`` returns."""
    return isinstance(sys.modules.get(_NAME), _StandIn)


def real() -> None:
    """Remove the stand-in: the next ``import torch._dynamo`` imports the real module."""
    if active():
        del sys.modules[_NAME]
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(torch.__dict__.get("_dynamo"), _StandIn):
            del torch.__dict__["_dynamo"]


@contextmanager
def eager_only() -> Iterator[None]:
    """Within the block, ``import torch._dynamo`` yields the stand-in (unless the real module
    is already imported). Only for a process that exits after the block without compiling."""
    if _NAME in sys.modules:
        yield
        return
    sys.modules[_NAME] = _StandIn(_NAME)
    try:
        yield
    finally:
        real()
