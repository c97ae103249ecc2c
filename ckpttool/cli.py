"""The ``ckpttool`` command line: a thin click skin over the library.

Each command parses its options, calls one library function and renders the result.
Library errors become one ``Error: ...`` line on stderr and the error's exit code.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .errors import CkptError


def _run(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except CkptError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(e.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckpttool")
def cli() -> None:
    """Inspect, check and safely edit PyTorch training checkpoints.

    Reading never runs code from the file and never imports torch.
    Exit codes: 0 ok, 1 edit or usage error, 2 bad command line, 3 unreadable file,
    4 unsafe file.
    """


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the JSON document (schema 1).")
@click.option("--optimizer", "pointer", metavar="POINTER",
              help="Only the optimizer at this JSON Pointer (e.g. /optimizer).")
@click.option("--all", "show_all", is_flag=True, help="List every param, not the first 20.")
@click.option("--stats", is_flag=True,
              help="Read tensor bytes and add norm, min, max, mean, NaN/Inf counts.")
def show(path: str, as_json: bool, pointer: str | None, show_all: bool, stats: bool) -> None:
    """Show the optimizers, schedulers and models in a checkpoint file or folder.

    Example: ckpttool show ckpt.pth
    """
    from .checkpoint import open_checkpoint
    from .render import show_json, show_text

    def go() -> None:
        ckpt = open_checkpoint(path)
        if as_json:
            click.echo(json.dumps(show_json(ckpt, pointer, stats), indent=2))
        else:
            click.echo(show_text(ckpt, pointer, show_all, stats))
    _run(go)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
