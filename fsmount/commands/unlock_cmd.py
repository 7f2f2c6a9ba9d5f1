"""`fsmount unlock`: remove stale repository locks (backend/lock.py), or with --remove-all every lock."""

from __future__ import annotations

import click

from ..context import AppContext
from ..output import emit_json, json_option, say


@click.command()
@click.option("--remove-all", is_flag=True,
              help="Remove every lock, also those of processes still running: only when you know "
                   "none is at work on the repository (such a process then stops writing).")
@json_option
@click.pass_obj
def unlock(app: AppContext, remove_all: bool) -> None:
    """Remove stale locks, and list the locks that remain.

    \b
      fsmount unlock                  stale locks only: safe at any time
      fsmount unlock --remove-all     every lock

    Every command that reads or writes the repository holds a lock in it while it runs (`locks/`
    in the store): shared for backup, restore, verify, ls, snapshots and the mounts; exclusive for
    `migrate --delete-source` and `verify --repair`, which delete or rewrite objects. A command
    refused with "the repository is locked" (exit 11) names the holder: its host, pid, command and
    age. Locks are removed when their command ends, even on Ctrl-C or SIGTERM. A process that was
    killed (`kill -9`, a crash, a machine that went down) leaves its lock behind: it is stale once
    not refreshed for 30 minutes (holders refresh theirs every 5), or at once when it comes from
    this host and its process is gone. The next command ignores and removes stale locks itself;
    this command removes them too, and shows what remains.
    """
    from backend.lock import list_locks, remove_lock, replica_stores, stale_after_s

    with app.open_repository() as repo:
        copies = replica_stores(repo.store)
        removed: list[dict] = []
        kept: list[dict] = []
        for name, info in list_locks(copies, repo.key):
            stale = "it cannot be read" if info is None else info.stale_because(stale_after_s())
            entry = {"lock": name, "holder": info.describe() if info is not None else None, "stale": stale}
            if remove_all or stale is not None:
                remove_lock(copies, name)
                removed.append(entry)
            else:
                kept.append(entry)
    if app.json:
        emit_json({"removed": removed, "kept": kept})
        return
    for entry in removed:
        say(f"removed {entry['lock']}: {entry['holder'] or 'unreadable'}"
            + (f" (stale: {entry['stale']})" if entry["stale"] else ""))
    for entry in kept:
        say(f"kept {entry['lock']}: {entry['holder']} (still refreshed; --remove-all removes it)")
    if not app.quiet:
        say(f"removed {len(removed)} lock{'s' if len(removed) != 1 else ''}"
            + (f", {len(kept)} still held" if kept else ""))


COMMANDS = [unlock]
