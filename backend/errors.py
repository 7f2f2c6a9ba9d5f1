"""The engine's exceptions: a small hierarchy, each class carrying the exit code the CLI reports.

Errors are raised where something goes wrong and gain context on the way up (`raise ... from exc`);
only `fsmount/cli.py` turns them into a one-line message and an exit code, and only the FUSE adapters
turn them into an errno. `exit_code` values follow restic's where restic has one. A message names
a path or name as `fsmount ls` prints it (`shown_name`), so that a user can copy it from either.
"""

from __future__ import annotations


class FsmountError(Exception):
    """Base of every error the engine raises on purpose."""

    exit_code = 1


class UsageError(FsmountError):
    """The request itself cannot be carried out as given (bad path, unknown snapshot, bad option)."""

    exit_code = 2


class RepositoryNotFound(FsmountError):
    """There is no repository at the given location."""

    exit_code = 10


class RepositoryExists(FsmountError):
    """`init` found a repository already at the location (restic exits 1 there too; 10 means
    the opposite, no repository)."""

    exit_code = 1


class LockedError(FsmountError):
    """Another process holds an exclusive lock on the repository."""

    exit_code = 11


class WrongPassword(FsmountError):
    """No key of the repository opens with the given passphrase."""

    exit_code = 12


class UnsupportedFormat(FsmountError):
    """The repository was written by a newer (or unknown) format version."""

    exit_code = 13


class IntegrityError(FsmountError):
    """An object is missing, or its content does not match its id or fails authentication."""

    exit_code = 14


class StoreError(FsmountError):
    """The object store failed: unreachable, out of space, permission denied, or a permanent error."""

    exit_code = 15


class LocationMissing(StoreError):
    """The location holds no store at all: its bucket does not exist, or it is a file where the
    repository's folder would be. No repository can be there (`Repository.open` says so)."""


class FolderMissing(LocationMissing):
    """A local repository's folder is not there: deleted, moved, or on a disk that is not mounted.
    No repository is there now (exit 10, as for any missing location), but unlike a missing bucket
    it may come back as it was: a live mount takes it for a store that does not answer."""


class TransientStoreError(StoreError):
    """A store failure worth retrying (throttling, 5xx, timeouts, dropped connections)."""


class StoreUnreachable(StoreError):
    """A call kept failing with transient errors for its whole retry budget: the store is down, frozen
    or cut off, as far as this process can tell. Not a `TransientStoreError`, so no outer layer retries
    it again; a caller with many calls to make may take it as a sign to stop (migrate.py)."""


class ObjectNotFound(StoreError):
    """The store has no object under the requested key."""


CONTROL_ESCAPES = {**{c: f"\\x{c:02x}" for c in (*range(32), 127)}, ord("\n"): "\\n", ord("\t"): "\\t"}
"""For `str.translate`: a control character as its escape (a newline as \\n)."""


def shown_name(name: bytes) -> str:
    """A name or path as one line of text shows it, in messages as in `fsmount ls`: a byte that is
    not UTF-8 as \\xNN, a control character escaped (a newline as \\n), and a backslash doubled,
    so that no name reads as another's escape."""
    return name.replace(b"\\", b"\\\\").decode("utf-8", errors="backslashreplace").translate(CONTROL_ESCAPES)
