"""Every error ckpttool raises on purpose, and the exit codes the command line uses for them.

An error carries fields as well as its message: the ``path`` of the checkpoint, the JSON
``pointer`` and ``key`` it concerns, and a ``hint`` naming what to do next. ``str(error)`` is
the whole sentence the CLI prints after ``Error:``; programs read the fields.

The CLI turns a :class:`CkptError` into one ``Error: ...`` line on stderr and exits with the
error's ``exit_code``. The codes (also in the README):

====  ==========================================================================================
code  meaning
====  ==========================================================================================
0     success
1     the request cannot be done as asked (bad value, unknown key, ambiguous pairing, ...)
2     bad command line (click's usage errors)
3     the path cannot be read as a checkpoint (missing, empty, truncated, not a checkpoint)
4     the file is unsafe: it references code that would run on load; nothing is written
5     writing failed (disk full, permission denied, read-only filesystem); the original is intact
70    an internal error: a bug in ckpttool (the traceback is printed; please report it)
====  ==========================================================================================
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit codes of the ``ckpttool`` command (one place for all of them)."""

    OK = 0
    ERROR = 1
    USAGE = 2
    UNREADABLE = 3
    UNSAFE = 4
    WRITE_FAILED = 5
    INTERNAL = 70


class CkptError(Exception):
    """Base class of every error ckpttool raises on purpose.

    Args:
        message: what is wrong, in a sentence (without the path; it is prefixed).
        path: the checkpoint file or folder concerned.
        pointer: the JSON Pointer of the part concerned, if any.
        key: the key concerned (a hyperparameter, a state entry), if any.
        hint: what to do next (appended to the message).
    """

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, *, path: str | None = None, pointer: str | None = None,
                 key: str | None = None, hint: str | None = None) -> None:
        self.message = message
        self.path = path
        self.pointer = pointer
        self.key = key
        self.hint = hint
        super().__init__(self._text())

    def _text(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.hint:
            text = f"{text}; {self.hint}"
        return text


class UnreadableError(CkptError):
    """The path is not a checkpoint ckpttool can read (missing, empty, truncated, wrong kind)."""

    exit_code = ExitCode.UNREADABLE


class PickleError(UnreadableError):
    """data.pkl (or a legacy pickle) is malformed or exceeds a safety bound. ``safety`` is the
    verdict on what loading would have run before the break (a ``formats.safety.Safety``)."""

    safety: object = None


class CRCMismatchError(UnreadableError):
    """A record's bytes do not match the CRC32 its archive claims (corrupt source)."""


class UnsafeCheckpointError(CkptError):
    """The checkpoint references dangerous callables; it is described but never written from."""

    exit_code = ExitCode.UNSAFE


class RunFolderError(CkptError):
    """The path is a folder of independent checkpoints (a run), where one checkpoint was
    needed: the message lists them and says how to pick one."""


class EditError(CkptError):
    """An edit cannot be applied as asked (unknown key, bad value, impossible change)."""


class AmbiguousError(EditError):
    """The request has more than one reasonable meaning; the message lists the options."""


class WriteError(CkptError):
    """Writing failed (disk full, permission, read-only filesystem); nothing was replaced."""

    exit_code = ExitCode.WRITE_FAILED
