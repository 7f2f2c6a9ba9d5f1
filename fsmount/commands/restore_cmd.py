"""`fsmount restore`: a snapshot, or part of it, to a new folder or back onto the original."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

import click

from backend.errors import IntegrityError, UsageError
from backend.restore import Problem, Restore, RestoreResult, TargetDiskFull, check_target
from backend.snapshot import resolve_snapshot

from ..context import AppContext
from ..output import BarProgress, counted, emit_json, human_bytes, json_option, json_path, line_name, path_line, say
from .snapshot_paths import snapshot_path

if TYPE_CHECKING:
    from backend.repository import Repository
    from backend.snapshot import Snapshot


@click.command()
@click.argument("snapshot_ref", metavar="SNAPSHOT")
@click.argument("paths", nargs=-1, metavar="[PATH]...")
@click.option("--target", metavar="DIR", help="Restore into DIR (created if needed).")
@click.option("--in-place", "in_place", metavar="DIR",
              help="Restore onto DIR, the original folder, rewriting only blocks that differ.")
@click.option("--delete", is_flag=True,
              help="Remove files in the target that are not in the snapshot, and replace entries of "
                   "another type (a directory where the snapshot has a file, or a file where it has a directory).")
@click.option("--from-other-folder", "from_other_folder", is_flag=True,
              help="With --in-place: allow a snapshot (by id or name) whose source is another folder than DIR.")
@json_option
@click.pass_obj
def restore(app: AppContext, snapshot_ref: str, paths: tuple[str, ...], target: str | None,
            in_place: str | None, delete: bool, from_other_folder: bool) -> int:
    """Restore SNAPSHOT (an id prefix, a snapshot's name, its folder in the snapshot mounts, or
    `latest`) into a folder.

    \b
      fsmount restore latest --target ~/restored                 everything, to a new folder
      fsmount restore 1a2b3c4d --target ~/r docs/report.odt      one file (as ~/r/docs/report.odt)
      fsmount restore latest --in-place ~/projects --delete      put ~/projects back as it was

    With --in-place, `latest` is the newest snapshot of DIR itself, and a snapshot of another
    folder is refused unless --from-other-folder is given. Files already in the target are
    compared block by block (XXH3) and only differing blocks are rewritten; a file is either
    restored whole or left as it was. Nothing outside the target is touched; symlinks inside it
    are never followed. Without --delete nothing that holds data is deleted: a file or folder
    where the snapshot has something else is left and reported (a symlink, fifo or device in
    the way holds none, and is replaced). Files that cannot be restored or are skipped are
    reported and the exit code is 3. A full target disk stops the restore at once, with one
    line saying how much was restored (exit 15); what it had not finished is as it was.
    """
    if (target is None) == (in_place is None):
        raise UsageError("give exactly one of --target DIR or --in-place DIR")
    destination = target if target is not None else in_place
    if not destination:
        raise UsageError("--target and --in-place need a folder")
    if from_other_folder and in_place is None:
        raise UsageError("--from-other-folder goes with --in-place")
    with app.open_repository() as repo:
        check_target(repo, os.fsencode(destination))
        if in_place is None:
            snap = resolve_snapshot(repo, snapshot_ref)
        else:
            snap = _snapshot_of_folder(repo, snapshot_ref, os.fsencode(in_place), from_other_folder)
        progress = BarProgress("restore", enabled=not app.quiet and not app.json)
        result = Restore(repo, snap, os.fsencode(destination), paths=[snapshot_path(repo, snap, p) for p in paths],
                         delete=delete, progress=progress).run()
    s = result.stats
    full = _disk_full_message(result, destination) if result.disk_full else None
    if app.json:
        emit_json({"snapshot": snap.id, **json_path("target", os.path.abspath(destination)), "stats": vars(s),
                   "errors": [_problem_doc(p, "error") for p in result.errors],
                   "skipped": [_problem_doc(p, "reason") for p in result.skipped]}
                  | ({"error": full} if full else {}))
    if full:
        raise TargetDiskFull(full)
    if not app.json and not app.quiet:
        say(f"restored snapshot {snap.short_id} to {path_line(destination)}: {s.files} files, {s.dirs} dirs; "
            f"wrote {human_bytes(s.bytes_written)}, {s.blocks_unchanged} blocks already matched"
            + (f", deleted {s.deleted}" if s.deleted else "")
            + f" in {s.duration_ms / 1000:.1f} s"
            + (f"; {s.failed} failed" if s.failed else "")
            + (f"; {s.skipped} skipped" if s.skipped else ""))
    return 3 if s.failed or s.skipped else 0


def _disk_full_message(result: RestoreResult, destination: str) -> str:
    s = result.stats
    return (f"the disk of {path_line(destination)} is full ({result.disk_full}): the restore stopped after "
            f"{counted(s.files, 'file')} and {counted(s.dirs, 'folder')}, {human_bytes(s.bytes_written)} written"
            + (f" ({s.failed} failed otherwise)" if s.failed else "")
            + "; what it had not finished is as it was. Free some space and run it again")


def _problem_doc(problem: Problem, key: str) -> dict:
    """An entry not restored (`error`) or left alone (`reason`), for --json: {path, path_hex when
    the text is not the path's bytes, key: why}."""
    return {**json_path("path", problem.path), key: problem.message}


def _snapshot_of_folder(repo: Repository, ref: str, folder: bytes, from_other_folder: bool) -> Snapshot:
    """The snapshot to put back onto `folder` in place. `latest` of the whole repository may be
    another folder's (backed up later), and restoring that in place, above all with --delete,
    overwrites the folder with something else: so `latest` is the newest snapshot of `folder`
    itself, this machine's if it has one (as `backup` picks its parent), and a snapshot of another
    folder needs --from-other-folder. Older backups recorded the source's path as given, which
    may go through a symlink, so both that and the real path count."""
    names = {os.path.abspath(folder), os.path.realpath(folder)}
    shown = line_name(os.path.abspath(folder))
    if ref == "latest":
        found = [s for s in repo.snapshots() if s.source in names]
        if not found and repo.damaged_snapshots:
            raise IntegrityError(f"no readable snapshot of {shown}: {len(repo.damaged_snapshots)} snapshots "
                                 "are damaged (`fsmount verify` says more)")
        if not found:
            hint = ("give its id or name and --from-other-folder" if not from_other_folder
                    else "--from-other-folder takes an id or a name, not `latest`")
            raise UsageError(f"no snapshot of {shown} in the repository (to put another folder's snapshot "
                             f"there, {hint})")
        here = [s for s in found if s.host == socket.gethostname()]
        return max(here or found, key=lambda s: (s.time_ns, s.id))
    snap = resolve_snapshot(repo, ref)
    if not from_other_folder and snap.source not in names and os.path.realpath(snap.source) not in names:
        raise UsageError(f"snapshot {snap.short_id} is of {line_name(snap.source)}, not of {shown}; "
                         "add --from-other-folder to restore it there in place")
    return snap


COMMANDS = [restore]
