"""Exceptions raised by ckpttool. Every message names the file and says what to do next.

The CLI turns a :class:`CkptError` into one ``Error: ...`` line on stderr and exits with the
error's ``exit_code`` (documented in the README):

====  =====================================================================
code  meaning
====  =====================================================================
1     usage or edit error (bad value, unknown key, ambiguous scheduler, ...)
2     command-line usage error (click)
3     the path cannot be read as a checkpoint (missing, empty, truncated, not a checkpoint)
4     the file is unsafe: it references code that would run on load; nothing is written
5     ``check`` found problems (reserved for the check command)
====  =====================================================================
"""

from __future__ import annotations


class CkptError(Exception):
    """Base class of every error ckpttool raises on purpose."""

    exit_code = 1


class UnreadableError(CkptError):
    """The path is not a checkpoint ckpttool can read (missing, empty, truncated, wrong kind)."""

    exit_code = 3


class UnsafeCheckpointError(CkptError):
    """The checkpoint references dangerous callables; it is described but never written from."""

    exit_code = 4


class PickleError(UnreadableError):
    """data.pkl (or a legacy pickle) is malformed or exceeds a safety bound."""


class EditError(CkptError):
    """An edit cannot be applied as asked (unknown key, ambiguous pairing, bad value)."""
