"""`fsmount backup`: a scan-based snapshot of a folder."""

from __future__ import annotations

import os

import click

from backend.backup import Backup
from backend.snapshot import check_name_free, check_text, resolve_snapshot

from ..context import AppContext
from ..output import BarProgress, emit_json, human_bytes, json_option, say
from .names import host_option, snapshot_name_option
from .repository_cmds import snapshot_doc


def _tags(given: tuple[str, ...]) -> tuple[str, ...]:
    tags = tuple(tag.strip() for value in given for tag in value.split(","))
    if any(not tag for tag in tags):
        raise click.BadParameter("a tag may not be empty", param_hint="--tag")
    return tuple(check_text("a tag", tag) for tag in tags)


@click.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--tag", "tags", multiple=True, callback=lambda _ctx, _param, value: _tags(value),
              help="Tag the snapshot (repeatable; `--tag a,b` gives two tags, as in restic).")
@click.option("--name", callback=snapshot_name_option,
              help="A name for the snapshot, shown in listings and mounted snapshot folders; `ls`, "
                   "`restore` and `--parent` take it in place of an id. One no other snapshot has.")
@click.option("--host", callback=host_option, help="Record this host name instead of this machine's.")
@click.option("--parent", "parent_ref", metavar="SNAPSHOT",
              help="Compare against this snapshot instead of the latest of the same host and folder.")
@click.option("--force", is_flag=True, help="Read every file again, even ones whose metadata did not change.")
@json_option
@click.pass_obj
def backup(app: AppContext, source: str, tags: tuple[str, ...], name: str | None, host: str | None,
           parent_ref: str | None, force: bool) -> int:
    """Back up the folder SOURCE into a new snapshot.

    The first backup reads everything. Later ones read only files whose size, mtime, ctime or
    inode changed since the latest snapshot of the same host and folder, and store only the blocks
    that are new to the repository. Files that vanish or cannot be read are reported and left out;
    the exit code is then 3.
    """
    with app.open_repository() as repo:
        snapshots = None  # loaded once, for the name's check and the parent alike
        if name is not None:
            snapshots = repo.snapshots()
            check_name_free(name, snapshots)
        parent: object = "auto"
        if force:
            parent = None
        elif parent_ref:
            parent = resolve_snapshot(repo, parent_ref)
        progress = BarProgress("backup", enabled=not app.quiet and not app.json)
        # The real path, so that a folder backed up through a symlink is the same folder (its
        # parent snapshot, `restore --in-place`).
        result = Backup(repo, os.path.realpath(os.fsencode(source)), host=host, tags=list(tags), name=name,
                        parent=parent, progress=progress, count_totals=progress.enabled,
                        snapshots=snapshots).run()  # type: ignore[arg-type]
    s = result.stats
    # A replica that --degraded left behind lacks this snapshot until `replicas sync` (the CLI's edge
    # says so on stderr, adds `missed_by_replicas` to the JSON and exits 3).
    warnings = result.warnings + [f"replica {m['replica']} missed {m['objects']} objects of this snapshot "
                                  "(--degraded): run `fsmount replicas sync`" for m in app.missed_by_replicas()]
    if app.json:
        emit_json(snapshot_doc(result.snapshot) | {"warnings": warnings})
    elif not app.quiet:
        say(f"snapshot {result.snapshot.short_id} saved: {s.files_new} new, {s.files_changed} changed, "
            f"{s.files_unchanged} unchanged files, {s.dirs} dirs; read {human_bytes(s.bytes_read)}, "
            f"added {human_bytes(s.bytes_added)} in {s.duration_ms / 1000:.1f} s"
            + (f"; {len(warnings)} warning{'s' if len(warnings) != 1 else ''}" if warnings else ""))
    return 3 if warnings else 0


COMMANDS = [backup]
