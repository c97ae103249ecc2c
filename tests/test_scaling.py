"""No step of read, locate, names, render or write is worse than linear in the tensor count.

The work is counted, not timed: the lines of ckpttool's own code executed by open + show +
set-lr + save on checkpoints of 5,000 and 50,000 tensors (AdamW over 1,250 / 12,500 params:
model, exp_avg, exp_avg_sq, step; two groups). Ten times the tensors must cost at most 10.5
times the lines (measured: 8.5-9x); a Python loop over the params inside a per-param step (the
old ``group_of`` written as a loop) already makes it 12x at a tenth of these sizes. (A scan
inside one line, like ``x in some_list``, runs in C and is not counted: the old quadratic
``group_of`` was one of those; it is a dict lookup now.)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

import ckpttool
from ckpttool.edits import set_lr
from ckpttool.render import show_text
from ckpttool.save import save


def _make(n: int, path: Path) -> None:
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(2)) for _ in range(n)]
    opt = torch.optim.AdamW([{"params": ps[: n // 2]}, {"params": ps[n // 2:], "lr": 1e-4}],
                            lr=1e-3)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    model = {f"p.{i}": p.detach() for i, p in enumerate(ps)}
    torch.save({"model": model, "optimizer": opt.state_dict()}, path)


def _lines(path: Path, out: Path) -> int:
    """Lines of ckpttool's own code executed by open + show + set-lr + save (a line tracer
    only on ckpttool's frames: the count is exact and does not depend on the machine)."""
    root = str(Path(ckpttool.__file__).parent)
    count = 0

    def local(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename.startswith(root) else None

    ckpttool.open(path)  # lazy imports happen outside the count
    sys.settrace(tracer)
    try:
        ckpt = ckpttool.open(path)
        show_text(ckpt)
        save(set_lr(ckpt, 1e-5, ratios="keep"), str(out), force=True)
    finally:
        sys.settrace(None)
    return count


def test_work_is_linear_in_the_tensor_count(tmp_path: Path) -> None:
    counts = {}
    for n in (1_250, 12_500):
        path = tmp_path / f"n{n}.pt"
        _make(n, path)
        assert len(ckpttool.open(path).files[0].tensors) == 4 * n
        counts[n] = _lines(path, tmp_path / f"out{n}.pt")
        opt = torch.load(tmp_path / f"out{n}.pt")["optimizer"]
        assert [g["lr"] for g in opt["param_groups"]] == [1e-5, 1e-4 * (1e-5 / 1e-3)]
    assert counts[12_500] <= 10.5 * counts[1_250], counts
