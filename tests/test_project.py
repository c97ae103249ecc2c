"""The package as a whole: typed, every command documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ckpttool.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_passes() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy", "ckpttool"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_command_is_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, command in cli.commands.items():
        assert f"`ckpttool {name} " in readme, f"{name} is not in the README's command table"
        assert command.help and "Example: ckpttool " + name in command.help, name
