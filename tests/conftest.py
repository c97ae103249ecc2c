from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture
def copy_fixture(tmp_path: Path):
    """Copy a fixture file or folder into tmp_path and return the copy's path."""
    def copy(name: str) -> Path:
        src = FIXTURES / name
        dst = tmp_path / src.name
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return dst
    return copy


def run(*args: Any, code: int | None = 0) -> Result:
    """Run the CLI in-process with ``args`` (str()-ed); check the exit code (unless ``code``
    is None); return the click Result (``stdout`` and ``stderr`` apart)."""
    from ckpttool.cli import cli
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert code is None or result.exit_code == code, (result.stdout, result.stderr)
    return result


def train_steps(model: Any, opt: Any, sched: Any = None, steps: int = 3) -> None:
    """``steps`` real optimizer (and scheduler) steps of ``model`` on a fixed 4x4 input."""
    import torch
    x = torch.linspace(-1, 1, 16).reshape(4, 4)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()
