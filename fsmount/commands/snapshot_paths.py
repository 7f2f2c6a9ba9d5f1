"""A path inside a snapshot as a user gives it: typed as it is, or copied from `fsmount ls`.

`ls` shows a byte that is not UTF-8 as `\\xNN`, a newline as `\\n` and doubles a backslash, so
that no two names print alike (`output.line_name`). A user may give either form: the name typed
as it is (a shell's `$'\\xff'` gives any byte) or the line copied from a listing. Where both read
as existing, different entries, the path is ambiguous and refused rather than guessed.
"""

from __future__ import annotations

import os

from backend.errors import UsageError
from backend.repository import Repository
from backend.snapshot import Snapshot

from ..output import line_name, name_from_line


def snapshot_path(repo: Repository, snapshot: Snapshot, given: str) -> bytes:
    """The path inside `snapshot` that `given` names (relative, no leading `/`); UsageError
    naming it if it is not there, or if it names two entries."""
    typed = os.fsencode(given).strip(b"/")
    if "\\" not in given:
        repo.find_node(snapshot, typed)  # the error names the path
        return typed
    listed = name_from_line(given).strip(b"/")
    found = [path for path in dict.fromkeys((typed, listed)) if _exists(repo, snapshot, path)]
    if len(found) == 2:
        raise UsageError(f"{given!r} names two entries: {line_name(typed)} as typed and "
                         f"{line_name(listed)} as `fsmount ls` shows names; give it as `ls` shows it")
    if not found:
        repo.find_node(snapshot, typed)
    return found[0]


def _exists(repo: Repository, snapshot: Snapshot, path: bytes) -> bool:
    try:
        repo.find_node(snapshot, path)
    except UsageError:
        return False
    return True
