"""Errors the CLI turns into one-line messages and documented exit codes.

Stages raise these with a message written for the user; anything else that escapes is a bug and
is reported as an internal error (``--debug`` shows the traceback).
"""

from __future__ import annotations

import errno


class TalkError(Exception):
    """A failure the user can act on. ``exit_code`` is what the ``talk`` command returns."""

    exit_code = 1


class InputError(TalkError):
    """The input file is missing, unreadable, truncated or has no usable content."""


class UsageError(TalkError):
    """Bad option values or combinations."""

    exit_code = 2


class NotAvailable(TalkError):
    """A stage or backend that this version of talkcli does not provide (yet)."""

    exit_code = 2


class WorkspaceLocked(TalkError):
    """Another run holds the workspace lock."""

    exit_code = 3


class StorageError(TalkError):
    """The workspace cannot be written: permissions, not a directory, disk full."""

    exit_code = 4


class MissingModel(TalkError):
    """An optional model file the user asked for is not where it should be."""

    exit_code = 5


def storage_error(exc: OSError, what: str) -> StorageError:
    """Translate an OSError raised while writing ``what`` into a message that says what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason = "disk full" if exc.errno != errno.EFBIG else "file size limit reached"
        return StorageError(f"{reason} while writing {what}; free some space and rerun (finished stages are kept)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"cannot write {what}: permission denied or read-only file system")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return StorageError(f"cannot write {what}: a file is in the way of a directory")
    return StorageError(f"cannot write {what}: {exc.strerror or exc}")
