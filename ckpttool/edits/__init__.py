"""Edits: functions from an opened checkpoint to a :class:`~.plan.Plan` of changes.

Each edit takes a :class:`~ckpttool.checkpoint.Checkpoint` and returns a plan whose ``result``
is the edited checkpoint; the checkpoint given is never changed, so edits chain
(``plan.then(edit, ...)``) and a plan is also a diff. Edits never touch files:
:func:`ckpttool.save.save` writes a plan.

* :func:`~.set_lr.set_lr` - the lr the next step uses after a normal resume, schedule scaled;
* :func:`~.set_hparams.set_hparams` - hyperparameters checked against the optimizer's type;
* :func:`~.move.move` - device tags of storages (every storage, in opaque objects too);
* :func:`~.merge_groups.merge_groups` - param groups merged, state and scheduler following;
* :func:`~.convert.convert` - another optimizer type, running moments carried over;
* :func:`~.sanitize.sanitize` - values ``torch.load(weights_only=True)`` refuses made plain.
"""

from __future__ import annotations

import ast
import math
from typing import Any

from ..formats.nodes import TensorRef
from .plan import ABSENT, Change, Plan, TreeEditor


def as_number(v: Any) -> float | None:
    """A numeric hyperparameter as a float: a number, or a 0-d tensor whose value was read."""
    if isinstance(v, TensorRef):
        return float(v.value) if isinstance(v.value, (int, float)) and not v.shape else None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


def close(a: float, b: float) -> bool:
    """Equal up to float rounding (values read back from a file, products of factors)."""
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


def parse_value(text: str) -> Any:
    """A command-line value: a Python literal (0.9, (0.9, 0.95), True, None), ``a,b`` as a
    tuple, true/false/null as JSON spells them, else the string itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    try:
        v = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if "," in text:
            return tuple(parse_value(p) for p in text.split(","))
        return text
    return v


# the edits themselves (imported last: they use the helpers above)
from .convert import convert  # noqa: E402
from .merge_groups import merge_groups  # noqa: E402
from .move import move  # noqa: E402
from .sanitize import sanitize  # noqa: E402
from .set_hparams import set_hparams  # noqa: E402
from .set_lr import set_lr  # noqa: E402

__all__ = ["ABSENT", "Change", "Plan", "TreeEditor", "as_number", "close", "convert", "merge_groups",
           "move", "parse_value", "sanitize", "set_hparams", "set_lr"]
