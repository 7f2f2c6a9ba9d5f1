"""`mount-snapshots`: every snapshot of the repository as a read-only folder; restoring is a copy."""

from __future__ import annotations

import os
import sys

import click

from .. import background
from ..context import AppContext
from ..output import emit_json, json_option, json_path, parse_size, path_line, say


@click.command("mount-snapshots")
@click.argument("mountpoint", type=click.Path(path_type=str))
@click.option("-f", "--foreground", is_flag=True, help="Stay in the foreground (logs go to the terminal).")
@click.option("--cache-size", default="1G", show_default=True, metavar="SIZE",
              help="Bound of the on-disk cache of blocks fetched from a remote store (encrypted, in the cache "
                   "dir); 0 turns it off. A repository on local disk needs none.")
@click.option("--allow-other", is_flag=True,
              help="Let other users read the mount too (as far as each file's own permissions allow; "
                   "the folders above the backed-up folder no longer guard it). Needs root or "
                   "`user_allow_other` in /etc/fuse.conf.")
@json_option
@click.pass_obj
def mount_snapshots(app: AppContext, mountpoint: str, foreground: bool, cache_size: str, allow_other: bool) -> None:
    """Mount every snapshot of the repository, read-only, at MOUNTPOINT.

    \b
      fsmount mount-snapshots ~/snaps
      ls ~/snaps                                  one folder per snapshot, and `latest`
      cp -a ~/snaps/latest/report.odt ~/projects/ restoring is an ordinary copy
      fsmount umount ~/snaps                      (or fusermount3 -u ~/snaps)

    A folder is named by its snapshot's name, or by its time when it has none. Only what is read
    is fetched from the repository; fetched blocks stay in a bounded local cache. Snapshots taken
    after mounting appear within seconds. Only the user who mounts can read it, unless
    --allow-other.
    """
    from .. import control
    try:
        cache_bytes = parse_size(cache_size)
    except ValueError:
        raise click.BadParameter(f"{cache_size!r} is not a size like 512M or 2G", param_hint="--cache-size")
    if not foreground:
        log_path = os.path.join(control.runtime_dir(), control.mount_id(mountpoint) + ".log")
        argv = [*(arg for loc in app.locations() for arg in ("-r", loc)), "mount-snapshots", "-f",
                "--cache-size", cache_size, *(["--allow-other"] if allow_other else []), mountpoint]
        if app.cache_dir:
            argv = ["--cache-dir", app.cache_dir, *argv]
        pid, daemon_warnings = background.start(argv, log_path, app.passphrase())
        if app.json:
            emit_json({**json_path("mountpoint", os.path.abspath(mountpoint)), "pid": pid, **json_path("log", log_path)})
        elif not app.quiet:
            say(f"snapshots mounted at {path_line(mountpoint)} (daemon pid {pid}, log {log_path})")
        for warning in daemon_warnings:
            say(f"warning: {warning}", err=True)
        return
    from ..snapshot_mount import SnapshotMount

    with app.open_repository() as repo:
        mount = SnapshotMount(repo, os.fsencode(mountpoint), cache_bytes=cache_bytes, allow_other=allow_other)

        def ready() -> None:
            background.report_ready()
            if app.json:
                emit_json({**json_path("mountpoint", os.path.abspath(mountpoint)), "pid": os.getpid()})
                sys.stdout.flush()
            elif not app.quiet:
                say(f"snapshots mounted at {path_line(mountpoint)}; Ctrl-C or `fsmount umount {path_line(mountpoint)}` unmounts")

        mount.run(ready)


COMMANDS = [mount_snapshots]
