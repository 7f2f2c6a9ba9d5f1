"""Which repository lock each command takes (backend/lock.py), in one table.

The lock is taken when the command first opens the repository's store (`AppContext.open_store`),
after its config and key are read, and released when the command ends, however it ends (cli.py).

- shared: `backup`, `restore`, `verify`, `ls`, `snapshots`, `mount-snapshots`, the live `mount`
  (its daemon, for as long as it runs; it takes a new lock if it loses its own), `migrate` without
  `--delete-source` (it only reads the source), `replicas sync` (it only adds copies of objects,
  but must not bring back what a repair or migration is deleting);
- exclusive: `migrate --delete-source` (for the whole migration: a backup during the copy would
  add objects the copy lacks, which the deletion would then orphan), `verify --repair` (it deletes
  and rewrites index objects and packs); and every `migrate` on its destination, besides its lock
  on the source (migrate_cmd.py: a half-copied repository is nobody's to use);
- none: `init` (no repository yet), `unlock` (it removes locks), plain `replicas` (it only lists
  and compares copies, and is how one finds a replica that is down, where a lock could not be
  written), and the commands that only talk to a running mount (`snapshot`, `status`, `umount`).

`--no-lock` skips it for read-only work on a repository this process may not write (restic's
`--no-lock`); it is refused for the exclusive commands.
"""

from __future__ import annotations

from dataclasses import dataclass

import click


@dataclass(frozen=True)
class LockMode:
    exclusive: bool
    retake: bool = False  # take a new lock when this one is lost, rather than stop (the live mount)


SHARED = LockMode(exclusive=False)
EXCLUSIVE = LockMode(exclusive=True)


def lock_mode(ctx: click.Context | None) -> LockMode | None:
    """The lock the command running in `ctx` takes, or None."""
    if ctx is None:
        return None
    path = tuple(ctx.command_path.split()[1:])
    params = ctx.params
    if path == ("verify",):
        return EXCLUSIVE if params.get("repair") else SHARED
    if path == ("migrate",):
        return EXCLUSIVE if params.get("delete_source") else SHARED
    if path == ("mount",):
        return LockMode(exclusive=False, retake=True)
    if path in {("backup",), ("restore",), ("ls",), ("snapshots",), ("mount-snapshots",), ("replicas", "sync")}:
        return SHARED
    return None
