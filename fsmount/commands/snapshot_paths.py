"""A path inside a snapshot as a user gives it: copied from `fsmount ls`, or typed as it is.

`ls` shows a byte that is not UTF-8 as `\\xNN`, a newline as `\\n` and doubles a backslash, so
that no two names print alike (`output.line_name`): a path is read that way first, since that
form names one entry whatever else the folder holds. A path that reads as nothing that way is
taken as typed (a shell's `$'\\xff'` gives any byte), so a name with a backslash in it may also be
typed as it is.
"""

from __future__ import annotations

import os

from backend.errors import UsageError
from backend.repository import Repository
from backend.snapshot import Snapshot

from ..output import name_from_line


def snapshot_path(repo: Repository, snapshot: Snapshot, given: str) -> bytes:
    """The path inside `snapshot` that `given` names (relative, no leading `/`); UsageError
    naming it if it is not there."""
    typed = _normal(os.fsencode(given))
    if "\\" in given:
        listed = _normal(name_from_line(given))
        try:
            repo.find_node(snapshot, listed)
            return listed
        except UsageError:
            pass
    repo.find_node(snapshot, typed)  # the error names the path
    return typed


def _normal(path: bytes) -> bytes:
    """`path` without empty or `.` components: `./docs//a` is `docs/a` (`ls` printed `/./docs`)."""
    return b"/".join(part for part in path.split(b"/") if part and part != b".")
