"""`fsmount restore`: a snapshot, or part of it, to a new folder or back onto the original."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import click

from backend.errors import UsageError
from backend.restore import Restore

from ..context import AppContext
from ..output import BarProgress, emit_json, human_bytes, json_option, name_from_line, say

if TYPE_CHECKING:
    from backend.repository import Repository
    from backend.snapshot import Snapshot


@click.command()
@click.argument("snapshot_ref", metavar="SNAPSHOT")
@click.argument("paths", nargs=-1, metavar="[PATH]...")
@click.option("--target", metavar="DIR", help="Restore into DIR (created if needed).")
@click.option("--in-place", "in_place", metavar="DIR",
              help="Restore onto DIR, the original folder, rewriting only blocks that differ.")
@click.option("--delete", is_flag=True, help="Remove files in the target that are not in the snapshot.")
@json_option
@click.pass_obj
def restore(app: AppContext, snapshot_ref: str, paths: tuple[str, ...], target: str | None,
            in_place: str | None, delete: bool) -> int:
    """Restore SNAPSHOT (an id prefix or `latest`) into a folder.

    \b
      fsmount restore latest --target ~/restored                 everything, to a new folder
      fsmount restore 1a2b3c4d --target ~/r docs/report.odt      one file (as ~/r/docs/report.odt)
      fsmount restore latest --in-place ~/projects --delete      put ~/projects back as it was

    Files already in the target are compared block by block (XXH3) and only differing blocks are
    rewritten. Nothing outside the target is touched; symlinks inside it are never followed.
    Files that cannot be restored are reported and the exit code is 3.
    """
    if (target is None) == (in_place is None):
        raise UsageError("give exactly one of --target DIR or --in-place DIR")
    destination = target if target is not None else in_place
    if not destination:
        raise UsageError("--target and --in-place need a folder")
    with app.open_repository() as repo:
        snap = repo.resolve_snapshot(snapshot_ref)
        progress = BarProgress("restore", enabled=not app.quiet and not app.json)
        result = Restore(repo, snap, os.fsencode(destination), paths=[_snapshot_path(repo, snap, p) for p in paths],
                         delete=delete, progress=progress).run()
    s = result.stats
    if app.json:
        emit_json({"snapshot": snap.id, "target": os.path.abspath(destination), "stats": vars(s),
                   "errors": result.errors})
    elif not app.quiet:
        say(f"restored snapshot {snap.short_id} to {destination}: {s.files} files, {s.dirs} dirs; "
            f"wrote {human_bytes(s.bytes_written)}, {s.blocks_unchanged} blocks already matched"
            + (f", deleted {s.deleted}" if s.deleted else "")
            + f" in {s.duration_ms / 1000:.1f} s"
            + (f"; {len(result.errors)} failed" if result.errors else ""))
    return 3 if result.errors else 0


def _snapshot_path(repo: Repository, snapshot: Snapshot, given: str) -> bytes:
    """PATH as `fsmount ls` shows it (`\\xNN` for a byte that is not UTF-8, `\\n` for a newline,
    `\\\\` for a backslash), which is what a user copies from a listing; else PATH as given."""
    raw = os.fsencode(given)
    if "\\" not in given:
        return raw
    unescaped = name_from_line(given)
    try:
        repo.find_node(snapshot, unescaped)
        return unescaped
    except UsageError:
        repo.find_node(snapshot, raw)  # neither: the error names the path
        return raw


COMMANDS = [restore]
