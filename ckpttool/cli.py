"""The ``ckpttool`` command line: a thin click skin over the library.

Each command parses its options, calls one library function and renders the result.
Library errors become one ``Error: ...`` line on stderr and the error's exit code.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .errors import CkptError, ExitCode


def _run(fn: Callable[[], Any], path: str | None = None,
         request_error: ExitCode = ExitCode.ERROR) -> Any:
    """Run a command; a :class:`CkptError` becomes ``Error: ...`` and its exit code (a request
    that cannot be done exits ``request_error``: ``diff`` keeps 1 for "different")."""
    try:
        return fn()
    except CkptError as e:
        if e.path is None and path is not None:  # every error names the file
            e.path = path
            e.args = (e._text(),)
        click.echo(f"Error: {e}", err=True)
        code = e.exit_code
        sys.exit(int(request_error if code == ExitCode.ERROR else code))
    except (KeyboardInterrupt, click.exceptions.Exit, click.ClickException):
        raise
    except Exception:  # a bug in ckpttool: never blame the user's file for it
        traceback.print_exc()
        click.echo(f"Error: internal error in ckpttool {__version__}; this is a bug, please "
                   "report it with the traceback above", err=True)
        sys.exit(int(ExitCode.INTERNAL))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckpttool")
def cli() -> None:
    """Inspect, check and safely edit PyTorch training checkpoints.

    Reading never runs code from the file and never imports torch.
    Exit codes: 0 ok, 1 the request cannot be done as asked, 2 bad command line,
    3 unreadable file, 4 unsafe file, 5 writing failed, 70 internal error
    (diff: 0 equal, 1 different, 2 a request it cannot do).
    """


@cli.command()
@click.argument("path", type=click.Path(readable=False))
@click.option("--json", "as_json", is_flag=True, help="Print the JSON document (schema 1).")
@click.option("--optimizer", "pointer", metavar="POINTER",
              help="Only the optimizer at this JSON Pointer (e.g. /optimizer).")
@click.option("--all", "show_all", is_flag=True, help="List every param, not the first 20.")
@click.option("--stats", is_flag=True,
              help="Read tensor bytes and add norm, min, max, mean, NaN/Inf counts.")
@click.option("--run", "as_run", is_flag=True,
              help="A folder: list its checkpoints, one row each (whatever its layout).")
@click.option("--one", "as_one", is_flag=True,
              help="A folder: read every file in it as parts of one checkpoint.")
def show(path: str, as_json: bool, pointer: str | None, show_all: bool, stats: bool,
         as_run: bool, as_one: bool) -> None:
    """Show the optimizers, schedulers and models in a checkpoint file or folder; a folder
    of independent checkpoints (a run) as a table, one row per checkpoint, sorted by step.

    Example: ckpttool show ckpt.pth
    """
    import os

    from .checkpoint import open_checkpoint
    from .errors import EditError
    from .render import run_json, run_text, show_json, show_text

    def go() -> None:
        if as_run and as_one:
            raise EditError("--run and --one contradict each other; pass one")
        if (as_run or as_one) and not os.path.isdir(path):
            raise EditError(f"--{'run' if as_run else 'one'} is for folders; a file is one "
                            "checkpoint")
        if not as_one and (as_run or _is_run(path)):
            if pointer is not None or show_all or stats:
                raise EditError("--optimizer, --all and --stats are for one checkpoint, and "
                                "this folder is a run of several",
                                hint=f"show one of them: ckpttool show {path}/FILE ...")
            from .run import open_run
            run = open_run(path)
            click.echo(json.dumps(run_json(run), indent=2) if as_json else run_text(run))
            return
        ckpt = open_checkpoint(path, one=True) if as_one else open_checkpoint(path)
        if as_json:
            click.echo(json.dumps(show_json(ckpt, pointer, stats), indent=2))
        else:
            click.echo(show_text(ckpt, pointer, show_all, stats))
    _run(go, path)


def _is_run(path: str) -> bool:
    from .run import is_run
    try:
        return is_run(path)
    except OSError:  # unlistable: open_checkpoint says why
        return False


def _write_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--dry-run", is_flag=True,
                     help="Print a before/after table and write nothing.")(f)
    f = click.option("--backup", is_flag=True, help="Keep the original as PATH.bak.")(f)
    f = click.option("--force", is_flag=True,
                     help="Overwrite an existing --output (set: also unknown keys; "
                          "merge-groups: also merge without the params' model order).")(f)
    f = click.option("-o", "--output", metavar="OUT",
                     help="Write a new file (or folder) instead of editing in place.")(f)
    return f


class _Progress:
    """A progress line on stderr, only for a terminal and only once a rewrite passes 1 s."""

    def __init__(self) -> None:
        import time
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        import time
        if not self.tty or time.monotonic() - self.start < 1.0 or not total:
            return
        self.shown = True
        sys.stderr.write(f"\rwriting {done * 100 // total:3d}% ({done >> 20} of {total >> 20} MiB)")
        sys.stderr.flush()

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")


def _finish(plan: Any, output: str | None, force: bool, backup: bool, dry_run: bool,
            table: bool = False) -> None:
    """Save (or not, with --dry-run) and say what was done; ``table``: the before/after
    table too, printed once the write succeeded."""
    from .save import save
    if dry_run:
        click.echo(plan.render())
        click.echo("dry run: nothing written")
        return
    progress = _Progress()
    try:
        result = save(plan, output, force=force, backup=backup, progress=progress)
    finally:
        progress.close()
    if table:
        click.echo(plan.render().rsplit("\n", 1)[0])
    for note in plan.notes:
        click.echo(f"note: {note}", err=True)
    if plan.source.followed:  # a DeepSpeed run folder: say which checkpoint was edited
        click.echo(f"note: edited {plan.source.path} ({plan.source.followed})", err=True)
    if not result.changed:
        where = f"; {result.output} is a copy" if output is not None else "; nothing written"
        click.echo(f"{plan.summary}{where}")
        return
    extra = [f"{w.path} was in the legacy (non-zip) torch.save format and is now written in "
             "the zip format" for w in result.written if w.converted_from == "torch-legacy"]
    extra += [f"the original is kept as {w.backup_path}" for w in result.written
              if w.backup_path]
    extra += result.details
    if result.copied and not result.details:
        extra.append(f"{len(result.written)} file{'s' if len(result.written) != 1 else ''} "
                     f"rewritten, {len(result.copied)} kept as they were")
    click.echo(f"{plan.summary}; wrote {result.output}"
               + (f" ({'; '.join(extra)})" if extra else ""))


@cli.command("set-lr")
@click.argument("path", type=click.Path(readable=False))
@click.argument("lr", type=float, required=False)
@click.option("--scale", type=float, metavar="F",
              help="Multiply every selected group's lr by F (instead of LR).")
@click.option("--keep-ratios", is_flag=True,
              help="Groups differ in lr: the largest becomes LR, the others keep their ratio.")
@click.option("--same", is_flag=True, help="Groups differ in lr: every group becomes LR.")
@click.option("--group", "groups", type=int, multiple=True, help="Only this group (repeatable).")
@click.option("--optimizer", metavar="POINTER", help="The optimizer, when there are several.")
@click.option("--scheduler", metavar="POINTER", help="The scheduler paired with it.")
@click.option("--no-scheduler", is_flag=True, help="Leave schedulers unchanged.")
@click.option("--base-lr", is_flag=True,
              help="LR is the base LR (initial_lr/base_lrs/max_lr); current lr follows.")
@_write_options
def set_lr_cmd(path: str, lr: float | None, scale: float | None, keep_ratios: bool, same: bool,
               groups: tuple[int, ...], optimizer: str | None, scheduler: str | None,
               no_scheduler: bool, base_lr: bool, output: str | None, force: bool,
               backup: bool, dry_run: bool) -> None:
    """Set the learning rate the next step uses after a normal resume; the scheduler's
    state is scaled to match so the schedule keeps its shape.

    Example: ckpttool set-lr ckpt.pth 1e-4
    """
    from .checkpoint import open_for_edit
    from .edits.set_lr import set_lr
    from .errors import EditError

    def go() -> None:
        if keep_ratios and same:
            raise EditError("--keep-ratios and --same contradict each other; pass one")
        if scale is not None and (keep_ratios or same):
            raise EditError("--scale keeps the ratios by itself; drop --keep-ratios / --same")
        if (lr is None) == (scale is None):
            raise EditError("give the new learning rate LR or --scale F (one of them)",
                            hint="for example `ckpttool set-lr ckpt.pth 1e-4`")
        plan = set_lr(open_for_edit(path, "set-lr"), lr, scale=scale,
                      ratios="keep" if keep_ratios else ("same" if same else None),
                      groups=list(groups) or None, optimizer=optimizer, scheduler=scheduler,
                      no_scheduler=no_scheduler, base_lr=base_lr)
        _finish(plan, output, force, backup, dry_run)
    _run(go, path)


@cli.command("set")
@click.argument("path", type=click.Path(readable=False))
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE...")
@click.option("--group", "groups", type=int, multiple=True, help="Only this group (repeatable).")
@click.option("--optimizer", metavar="POINTER", help="The optimizer, when there are several.")
@_write_options
def set_cmd(path: str, assignments: tuple[str, ...], groups: tuple[int, ...],
            optimizer: str | None, output: str | None, force: bool, backup: bool,
            dry_run: bool) -> None:
    """Set hyperparameters (weight_decay=0.05, betas=0.9,0.95, amsgrad=true, ...), checked
    against the optimizer's type; --force allows unknown keys and odd types.

    Example: ckpttool set ckpt.pth weight_decay=0.05 betas=0.9,0.95
    """
    from .checkpoint import open_for_edit
    from .edits.set_hparams import set_hparams

    def go() -> None:
        values = _parse_assignments(assignments)
        plan = set_hparams(open_for_edit(path, "set"), values, list(groups) or None, optimizer,
                           force)
        _finish(plan, output, force, backup, dry_run)
    _run(go, path)


def _parse_assignments(items: tuple[str, ...]) -> dict[str, Any]:
    from .edits import parse_value
    from .errors import EditError
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise EditError(f"expected KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_value(value)
    return out


@cli.command()
@click.argument("path", type=click.Path(readable=False))
@click.argument("device")
@click.option("--pointer", default="", metavar="POINTER",
              help="Only storages under this JSON Pointer (default: everything).")
@_write_options
def move(path: str, device: str, pointer: str, output: str | None, force: bool, backup: bool,
         dry_run: bool) -> None:
    """Move storages to DEVICE (cpu, cuda, cuda:N) by rewriting their device tags only; no
    GPU needed, no tensor bytes read.

    Example: ckpttool move ckpt.pth cpu
    """
    from .checkpoint import open_for_edit
    from .edits.move import move as move_edit

    def go() -> None:
        _finish(move_edit(open_for_edit(path, "move"), device, pointer), output, force, backup,
                dry_run)
    _run(go, path)


@cli.command("merge-groups")
@click.argument("path", type=click.Path(readable=False))
@click.option("--groups", "groups", metavar="0,2", help="Groups to merge (default: all).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Value for a hyperparameter that differs between the groups.")
@click.option("--optimizer", metavar="POINTER", help="The optimizer, when there are several.")
@click.option("--scheduler", metavar="POINTER", help="The scheduler paired with it.")
@click.option("--no-scheduler", is_flag=True, help="Leave schedulers unchanged.")
@_write_options
def merge_groups_cmd(path: str, groups: str | None, sets: tuple[str, ...],
                     optimizer: str | None, scheduler: str | None, no_scheduler: bool,
                     output: str | None, force: bool, backup: bool, dry_run: bool) -> None:
    """Merge param groups whose hyperparameters agree (params in model order, which needs
    parameter names; --force merges in group order without them) and the scheduler's
    per-group lists with them.

    Example: ckpttool merge-groups ckpt.pth --groups 0,1
    """
    from .checkpoint import open_for_edit
    from .edits.merge_groups import merge_groups
    from .errors import EditError

    def go() -> None:
        try:
            sel = [int(x) for x in groups.split(",")] if groups else None
        except ValueError:
            raise EditError(f"--groups takes indices like 0,2, not {groups!r}") from None
        plan = merge_groups(open_for_edit(path, "merge-groups"), sel, _parse_assignments(sets),
                            optimizer, scheduler, no_scheduler, force)
        _finish(plan, output, force, backup, dry_run)
    _run(go, path)


@cli.command()
@click.argument("path", type=click.Path(readable=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (schema 1).")
@click.option("--deep", is_flag=True,
              help="Also read every tensor byte: CRCs, NaN/Inf, negative second moments.")
@click.option("--strict", is_flag=True, help="Warnings fail too (exit 1).")
@click.option("--optimizer", metavar="POINTER", help="Only the optimizer at this pointer.")
def check(path: str, as_json: bool, deep: bool, strict: bool, optimizer: str | None) -> None:
    """Check a checkpoint before a resume: structure, shapes, hyperparameters, steps,
    schedulers, devices, what torch.load will refuse, and a load test into the real optimizer.
    Exit 0 when nothing fails (1 with a FAIL, or a WARN under --strict).

    Example: ckpttool check ckpt.pth
    """
    from .checks import FAIL, WARN
    from .checks import check as run_check
    from .errors import ExitCode

    from .eager_torch import eager_only

    def go() -> None:
        with eager_only():  # this process never compiles: the load test needs no dynamo
            report = run_check(path, pointer=optimizer, deep=deep)
        if as_json:
            click.echo(json.dumps(report.to_json(), indent=2))
        else:
            click.echo(report.render())
        if any(f.id == "unsafe" for f in report.findings):
            sys.exit(int(ExitCode.UNSAFE))
        failed = report.count(FAIL) or (strict and report.count(WARN))
        sys.exit(int(ExitCode.ERROR) if failed else 0)
    _run(go, path)


@cli.command()
@click.argument("path", type=click.Path(readable=False))
@click.option("--to", "target", required=True, metavar="NAME",
              help="Target optimizer class (SGD, Adam, AdamW, Adagrad, ..., case-insensitive).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="A hyperparameter of the target for every group (--set lr=... also "
                   "scales the scheduler, as set-lr --same does).")
@click.option("--moments", type=click.Choice(["carry", "zero"]), default="carry",
              show_default=True,
              help="carry: map the running moments; zero: keep no state (torch makes it).")
@click.option("--step", type=int, metavar="N", help="Step count when the source kept none.")
@click.option("--optimizer", metavar="POINTER", help="The optimizer, when there are several.")
@_write_options
def convert(path: str, target: str, sets: tuple[str, ...], moments: str, step: int | None,
            optimizer: str | None, output: str | None, force: bool, backup: bool,
            dry_run: bool) -> None:
    """Convert the optimizer state to another torch.optim type, keeping the running moments
    (formulas in the README).

    Example: ckpttool convert ckpt.pth --to adam --set lr=1e-3
    """
    from .checkpoint import open_for_edit
    from .edits.convert import convert as convert_edit

    def go() -> None:
        plan = convert_edit(open_for_edit(path, "convert"), target, sets=_parse_assignments(sets),
                            moments=moments, step=step, optimizer=optimizer)
        _finish(plan, output, force, backup, dry_run)
    _run(go, path)


@cli.command("to-file")
@click.argument("folder", type=click.Path(readable=False))
@click.argument("output", type=click.Path(readable=False))
@click.option("--keep-names", is_flag=True,
              help="Keep name-keyed optimizer state keyed by name (default: by id, with "
                   "param_names, for Optimizer.load_state_dict).")
@click.option("--force", is_flag=True, help="Overwrite an existing OUTPUT.")
def to_file_cmd(folder: str, output: str, keep_names: bool, force: bool) -> None:
    """Write a torch.distributed.checkpoint folder as one torch.save file, one tensor at a
    time.

    Example: ckpttool to-file checkpoint/step-100 step-100.pt
    """
    from .dcp_convert import to_file

    def go() -> None:
        progress = _Progress()
        try:
            r = to_file(folder, output, force=force, keep_names=keep_names, progress=progress)
        finally:
            progress.close()
        keyed = f"; optimizer {', '.join(r.optimizers)} keyed by id (names in param_names)" \
            if r.optimizers else ""
        click.echo(f"to-file: {r.tensors} tensors gathered from {folder}, {r.values} other "
                   f"values kept{keyed}; wrote {output} ({r.size} bytes)")
    _run(go, folder)


@cli.command("to-dcp")
@click.argument("path", type=click.Path(readable=False))
@click.argument("output", type=click.Path(readable=False))
@click.option("--model-order", type=click.Path(exists=True, dir_okay=False),
              help="A text file: the parameter names in the optimizer's param order, one per "
                   "line (when the checkpoint does not tell them).")
@click.option("--force", is_flag=True, help="Replace an existing OUTPUT folder.")
def to_dcp_cmd(path: str, output: str, model_order: str | None, force: bool) -> None:
    """Write a torch.save checkpoint file as a torch.distributed.checkpoint folder (one
    rank), optimizer state keyed by parameter name as get_state_dict keys it.

    Example: ckpttool to-dcp ckpt.pt checkpoint/step-100
    """
    from .dcp_convert import to_dcp

    def go() -> None:
        order = None
        if model_order is not None:
            with open(model_order, encoding="utf-8") as fh:
                order = [ln.strip() for ln in fh if ln.strip()]
        r = to_dcp(path, output, force=force, model_order=order)
        keyed = f"; optimizer {', '.join(r.optimizers)} keyed by parameter name" \
            if r.optimizers else ""
        click.echo(f"to-dcp: {r.tensors} tensors and {r.values} other values written{keyed}; "
                   f"wrote {output} (.metadata and __0_0.distcp, {r.size} bytes)")
    _run(go, path)


@cli.command("diff")
@click.argument("a", type=click.Path(readable=False))
@click.argument("b", type=click.Path(readable=False))
@click.option("--json", "as_json", is_flag=True, help="Print the differences as JSON (schema 1).")
@click.option("--values", is_flag=True,
              help="Read the bytes of tensors that differ: max abs / relative difference, norms.")
@click.option("--optimizer", metavar="POINTER", help="Only the optimizer at this pointer.")
@click.option("--one", "as_one", is_flag=True,
              help="Read folders as one checkpoint whatever their layout.")
def diff_cmd(a: str, b: str, as_json: bool, values: bool, optimizer: str | None,
             as_one: bool) -> None:
    """What changed from checkpoint A to checkpoint B, by JSON Pointer: keys added or
    removed, values, tensors (shape, dtype, device, bytes by CRC-32), optimizer state matched
    by parameter name. Exit 0 when equal, 1 when different (2 for a request it cannot do).

    Example: ckpttool diff epoch_10.pt epoch_11.pt
    """
    from .diff import diff
    from .render import diff_json, diff_text

    def go() -> None:
        result = diff(a, b, values=values, optimizer=optimizer, one=as_one)
        click.echo(json.dumps(diff_json(result), indent=2) if as_json else diff_text(result))
        sys.exit(0 if result.equal else 1)
    _run(go, None, request_error=ExitCode.USAGE)




@cli.command()
@click.argument("path", type=click.Path(readable=False))
@click.option("--keep-unknown", type=click.Choice(["error", "string", "drop"]),
              default="error", show_default=True,
              help="Values with no plain equivalent: stop naming them, write a description "
                   "string instead, or remove them (listed either way).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report as JSON (schema 1): every value changed.")
@_write_options
def sanitize(path: str, keep_unknown: str, as_json: bool, output: str | None, force: bool,
             backup: bool, dry_run: bool) -> None:
    """Rewrite every value torch.load(weights_only=True) refuses (argparse Namespace, numpy
    scalars / arrays / dtypes, paths, enums, dataclasses, ...) into a plain one it accepts,
    listing each (pointer, before, after). Tensors stay byte-identical; an unsafe file is
    refused (exit 4).

    Example: ckpttool sanitize timm_ckpt.pth -o plain.pth
    """
    from .checkpoint import open_for_edit
    from .edits.sanitize import Rewrite
    from .edits.sanitize import sanitize as sanitize_edit

    def go() -> None:
        plan = sanitize_edit(open_for_edit(path, "sanitize"), keep_unknown)
        if not as_json:
            _finish(plan, output, force, backup, dry_run, table=True)
            return
        from .save import save
        written = None
        if not dry_run:
            written = save(plan, output, force=force, backup=backup).output \
                if plan.changed or output is not None else None
        click.echo(json.dumps({"schema": 1, "path": path, "output": written,
                               "dry_run": dry_run, "summary": plan.summary,
                               "changes": [c.to_json() for c in plan.changes
                                           if isinstance(c, Rewrite)]}, indent=2))
    _run(go, path)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
