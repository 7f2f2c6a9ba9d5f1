"""`mount`, `snapshot`, `status`: working in a folder that backs itself up continuously."""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
import stat
import sys
from concurrent.futures import Future, ThreadPoolExecutor, wait

import click

from backend.errors import FsmountError, StoreError, UsageError
from backend.fsnode import is_within

from .. import background
from ..context import AppContext
from ..output import console, emit_json, human_bytes, json_option, json_path, line_name, parse_size, path_line, say
from .names import host_option, snapshot_name_option

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in a duration like 90, 30s, 15m, 2h or 1d."""
    match = _DURATION.match(text.strip().lower())
    if not match or float(match.group(1)) <= 0:
        raise click.BadParameter(f"{text!r} is not a duration like 30s, 15m or 2h", param_hint="--every")
    return float(match.group(1)) * _SECONDS[match.group(2)]


@click.command()
@click.argument("source", type=click.Path(path_type=str))  # checked below: it may be a stale mount
@click.argument("mountpoint", required=False, type=click.Path(path_type=str))
@click.option("--every", metavar="DURATION", help="Also take a snapshot every DURATION (e.g. 15m, 1h) when something changed.")
@click.option("-f", "--foreground", is_flag=True, help="Stay in the foreground (logs go to the terminal).")
@click.option("--host", callback=host_option, help="Record this host name in snapshots instead of this machine's.")
@click.option("--backlog-limit", default="4G", show_default=True, metavar="SIZE",
              help="Local disk that snapshots may take while the store cannot take them.")
@json_option
@click.pass_obj
def mount(app: AppContext, source: str, mountpoint: str | None, every: str | None, foreground: bool,
          host: str | None, backlog_limit: str) -> None:
    """Mount SOURCE so that everything written to it is backed up continuously.

    \b
      fsmount mount ~/projects --every 15m      over the folder itself: same path, same files
      fsmount mount ~/projects ~/work           or at another mountpoint

    Every write, rename and deletion is recorded as it happens, so a snapshot reads only what
    changed. Snapshots are taken with `fsmount snapshot MOUNT`, with `mkdir MOUNT/.snapshots/NAME`,
    every DURATION with --every, and at `fsmount umount MOUNT` (the last two only when something
    changed since the folder's last snapshot). Every snapshot of the folder can be
    browsed, read-only, in MOUNT/.snapshots/ (hidden from listings; reach it by its path).

    When the store is slow or unreachable, work goes on at local speed: snapshots wait in a
    backlog on local disk (up to --backlog-limit; past it, snapshots wait and `fsmount status`
    says why) and are uploaded, in order, once the store is back.
    """
    from .. import control
    _check_source(source)
    every_s = parse_duration(every) if every else None
    try:
        backlog_bytes = parse_size(backlog_limit)
    except ValueError:
        raise click.BadParameter(f"{backlog_limit!r} is not a size like 512M or 2G", param_hint="--backlog-limit")
    source = os.path.realpath(source)  # as the messages, the log and the daemon name it
    target = os.path.realpath(mountpoint) if mountpoint else source
    _check_writable_source(source)
    # Found now, said once mounted: a mount that fails (already mounted...) says only why.
    warnings = [] if background.is_daemon() else [*_hidden_snapshots(source), *_bypassing_programs(source, target)]
    if not foreground:
        log_path = os.path.join(control.runtime_dir(), control.mount_id(target) + ".log")
        argv = [*(arg for loc in app.locations() for arg in ("-r", loc)), "mount", "-f", source, target]
        if app.cache_dir:
            argv = ["--cache-dir", app.cache_dir, *argv]
        if app.degraded:  # the daemon writes to the replicas: without it, one failing sent all to the backlog
            argv = ["--degraded", *argv]
        if every:
            argv += ["--every", every]
        if host:
            argv += ["--host", host]
        argv += ["--backlog-limit", backlog_limit]
        pid, daemon_warnings = background.start(argv, log_path, app.passphrase())
        if app.json:
            emit_json({**json_path("mountpoint", target), **json_path("source", source), "pid": pid,
                       **json_path("log", log_path)})
        elif not app.quiet:
            say(f"mounted {path_line(source)} at {path_line(target)} (daemon pid {pid}, log {log_path})")
        if not app.quiet:
            _warn_if_cwd_is_underneath(target)
        for warning in [*(f"warning: {w}" for w in daemon_warnings), *warnings]:
            say(warning, err=True)
        return
    from ..live_daemon import LiveMount, source_id

    with app.open_repository(backlog=source_id(os.fsencode(source)), backlog_limit_bytes=backlog_bytes) as repo:
        live = LiveMount(repo, os.fsencode(source), os.fsencode(target), every_s=every_s, host=host,
                         missed_by_replicas=app.missed_by_replicas,
                         record_missed=app.record_degraded_writes)

        def ready() -> None:
            background.report_ready()
            if app.json:
                emit_json({**json_path("mountpoint", target), **json_path("source", source), "pid": os.getpid()})
                sys.stdout.flush()
            elif not app.quiet:
                say(f"mounted {path_line(source)} at {path_line(target)}; Ctrl-C or `fsmount umount {path_line(target)}` unmounts")
            if not app.quiet:
                _warn_if_cwd_is_underneath(target)
            for warning in warnings:
                say(warning, err=True)

        live.run(ready)
    if live.final_error:
        raise FsmountError(f"unmounted, but the final snapshot failed: {live.final_error}")


def _check_source(source: str) -> None:
    """SOURCE must be a folder, or a folder left mounted by a daemon that died (the mount clears it)."""
    _is_live_folder(source)


def _is_live_folder(path: str) -> bool:
    """Whether `path`, a folder, answers: False for a mount whose daemon died (every stat there
    fails with ENOTCONN). A UsageError if it is missing or not a folder."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such folder") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return False
        raise UsageError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path}: not a folder")
    return True


@click.command()
@click.argument("mountpoint", type=click.Path(path_type=str))  # checked by _check_mount_folder
@click.option("--name", callback=snapshot_name_option,
              help="A name for the snapshot (shown in .snapshots/ and `fsmount snapshots`).")
@json_option
@click.pass_obj
def snapshot(app: AppContext, mountpoint: str, name: str | None) -> None:
    """Take a snapshot of a live mount now.

    It shows the folder at this instant; writers are held only while the change log is switched to
    a new epoch, not during the upload. The same as `mkdir MOUNTPOINT/.snapshots/NAME`, except
    that this first has the kernel write back what it still caches of files open for writing.
    """
    # From this process, not the daemon: a daemon blocked in syncfs on its own mount deadlocked
    # against an fsync through the mount while `mkdir .snapshots/NAME` waited for the snapshot.
    from ..mountpoint import write_back

    _check_mount_folder(mountpoint)
    write_back(mountpoint)  # not a live mount, or a dead one: the request below says which
    reply = _ask(mountpoint, {"op": "snapshot", "name": name}, timeout=None)
    if app.json:
        emit_json(reply)
    elif not app.quiet:
        say(f"snapshot {reply['short_id']} taken ({reply['label']})" +
            ("; the store cannot take it now: it waits on local disk and is uploaded when the store is back"
             if reply.get("in_backlog") else ""))


@click.command()
@click.argument("mountpoint", type=click.Path(path_type=str))  # checked by _check_mount_folder
@json_option
@click.pass_obj
def status(app: AppContext, mountpoint: str) -> None:
    """Show what a live mount has pending and how its snapshots are going."""
    _check_mount_folder(mountpoint)
    reply = _ask(mountpoint, {"op": "status"})
    if app.json:  # the daemon's paths come as os.fsdecode made them: as every --json path, instead
        doc: dict = {}
        for key, value in reply.items():
            doc |= json_path(key, value) if key in ("mountpoint", "source") and value else {key: value}
        emit_json(doc)
        return
    if reply.get("last_snapshot_time"):
        when = dt.datetime.fromtimestamp(reply["last_snapshot_time"]).strftime("%Y-%m-%d %H:%M:%S")
        last = (f"{reply['last_snapshot'][:8]} at {when}, {reply['last_duration_s']:.1f} s, "
                f"added {human_bytes(reply['last_bytes_added'])}")
    else:
        last = f"{reply['last_snapshot'][:8]} (before this mount)" if reply.get("last_snapshot") else "none yet"
    waiting = (reply.get("backlog") or {}).get("objects")
    uploaded = reply.get("upload_rate_bytes_per_s") and (
        f"{'saved' if waiting else 'uploaded':<13}{human_bytes(reply['bytes_added'])} by "
        f"{_count(reply['snapshots_taken'], 'snapshot')} of this mount, "
        f"{human_bytes(reply['upload_rate_bytes_per_s'])}/s while they ran"
        + (" (what the store has not taken yet waits in the backlog, below)" if waiting else ""))
    lines = [
        (f"mount        {line_name(os.fsencode(reply['mountpoint']))} (pid {reply['pid']}) of "
         f"{line_name(os.fsencode(reply['source']))}"),
        f"pending      {reply['pending_files']} files, {human_bytes(reply['pending_bytes'])} in dirty blocks",
        f"last         {last}",
        *([uploaded] if uploaded else []),
        f"schedule     every {reply['every_s']:.0f} s" if reply.get("every_s") else "schedule     on demand",
    ]
    if reply.get("snapshots_skipped"):
        lines.append(f"skipped      {_count(reply['snapshots_skipped'], 'scheduled snapshot')} "
                     "(nothing had changed)")
    if reply.get("pending_since"):
        since = dt.datetime.fromtimestamp(reply["pending_since"]).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"behind       the snapshot of {since} is waiting "
                     f"({reply['attempts']} failed attempts; it keeps its instant)")
    elif reply.get("running"):
        lines.append("now          a snapshot is being uploaded")
    backlog = reply.get("backlog") or {}
    if backlog.get("store_failing_since"):
        since = dt.datetime.fromtimestamp(backlog["store_failing_since"]).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"store        not answering since {since}: snapshots wait on local disk, and .snapshots "
                     "shows those known here")
    if backlog.get("objects"):
        lines.append(f"backlog      {_count(backlog['snapshots'], 'snapshot')}, {human_bytes(backlog['bytes'])} on "
                     f"local disk waiting for the store (limit {human_bytes(backlog['limit_bytes'])})")
    if backlog.get("last_error"):
        lines.append(f"store error  {backlog['last_error']}")
    for missed in reply.get("missed_by_replicas") or ():
        lines.append(f"replica      {missed['replica']} missed {_count(missed['objects'], 'object')} of this mount "
                     "(--degraded): run `fsmount replicas sync`")
    if reply.get("tracking"):
        lines.append(f"tracking     {reply['tracking']}")
    if reply.get("last_error"):
        lines.append(f"error        {reply['last_error']}")
    for line in lines:
        say(line)


def _check_mount_folder(mountpoint: str) -> None:
    """MOUNTPOINT must be a folder that answers. A dead mount was reported by click's own check as
    "does not exist", and by realpath as a traceback."""
    from .. import control
    if not _is_live_folder(mountpoint):
        raise control.dead_mount_error(mountpoint)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _ask(mountpoint: str, request: dict, *, timeout: float | None = 30.0) -> dict:
    from .. import control
    reply = control.request(mountpoint, request, timeout=timeout)
    if not reply.get("ok"):
        error = FsmountError(reply.get("error", "the mount refused the request"))
        error.exit_code = reply.get("exit_code", 1)
        raise error
    return reply


def unmount_live(mountpoint: str, app: AppContext, *, lazy: bool = False) -> int | None:
    """Unmount a live mount through its control socket: the exit code (3 when a replica missed
    objects of the mount, --degraded), or None if MOUNTPOINT is not a live mount."""
    from .. import control
    try:
        control.request(mountpoint, {"op": "status"}, timeout=10)
    except UsageError:
        return None
    with ThreadPoolExecutor(1) as waiter:
        unmounted = waiter.submit(_ask, mountpoint, {"op": "unmount", "lazy": lazy}, timeout=None)
        if sys.stderr.isatty() and not app.quiet:
            _show_final_upload(mountpoint, unmounted, lazy)
        reply = unmounted.result()
    backlog = reply.get("backlog") or {"objects": 0, "bytes": 0, "snapshots": 0}
    left = _left_on_local_disk(backlog)
    if reply.get("final_error"):
        raise FsmountError(f"unmounted {mountpoint}, but the final snapshot failed: {reply['final_error']}" +
                           (f"; {left} stay on local disk, and the next mount of this folder uploads them"
                            if backlog["objects"] else ""))
    final = reply.get("final_snapshot")
    if backlog["objects"] and not lazy:
        raise StoreError(f"unmounted {mountpoint}, but the store did not take the backlog "
                         f"({reply.get('backlog_error')}): {left} stay on local disk, and the next "
                         f"mount of this folder uploads them")
    missed = reply.get("missed_by_replicas") or []
    for replica in missed:
        say(f"warning: replica {replica['replica']} missed {_count(replica['objects'], 'object')} of this mount "
            "(--degraded): run `fsmount replicas sync`", err=True)
    if app.json:
        emit_json({**json_path("mountpoint", os.path.abspath(mountpoint)), "kind": "live", "final_snapshot": final,
                   "final_unchanged": bool(reply.get("final_unchanged")),
                   "backlog_objects": backlog["objects"], "backlog_bytes": backlog["bytes"],
                   **({"missed_by_replicas": missed} if missed else {})})
    elif not app.quiet:
        if final and reply.get("final_unchanged"):
            said = f"nothing changed since snapshot {final[:8]}"
        elif final:
            said = f"final snapshot {final[:8]}"
        else:
            said = "no final snapshot (the next mount catches up)"
        if backlog["objects"]:
            said += f"; snapshots wait on local disk for the next mount to upload ({left})"
        say(f"unmounted {path_line(mountpoint)}; {said}")
    return 3 if missed else 0  # finished with a warning, as the --degraded run that left the replica behind


def _left_on_local_disk(backlog: dict) -> str:
    """What a backlog holds, for a user: "2 snapshots (3.1 MiB)"."""
    if not backlog.get("snapshots"):
        return f"{human_bytes(backlog['bytes'])} of snapshot data"
    return f"{_count(backlog['snapshots'], 'snapshot')} ({human_bytes(backlog['bytes'])})"


def _show_final_upload(mountpoint: str, unmounted: Future, lazy: bool) -> None:
    """A progress bar of the final snapshot and backlog upload, until `unmounted` is done."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                  TimeElapsedColumn(), console=console(err=True), transient=True) as bar:
        task = bar.add_task(f"unmounting {mountpoint}" + ("" if lazy else ": final snapshot"), total=None)
        most = 0
        while not unmounted.done():
            try:
                reply = _ask(mountpoint, {"op": "status"}, timeout=5)
            except FsmountError:
                break  # gone: the reply to `unmount` says how it ended
            backlog = reply.get("backlog") or {"bytes": 0}
            if reply.get("unmounting") and not reply.get("running") and backlog["bytes"] and not lazy:
                most = max(most, backlog["bytes"])
                bar.update(task, description=_uploading(backlog), total=most, completed=most - backlog["bytes"])
            wait([unmounted], timeout=0.25)


def _uploading(backlog: dict) -> str:
    if not backlog.get("store_failing_since"):
        return "uploading the backlog"
    since = dt.datetime.fromtimestamp(backlog["store_failing_since"]).strftime("%H:%M:%S")
    return f"uploading the backlog (the store has not answered since {since}; if it does not, the backlog stays on local disk)"


def _check_writable_source(source: str) -> None:
    """Refuse a folder nothing could be written to."""
    try:
        read_only = os.statvfs(source).f_flag & os.ST_RDONLY
    except OSError:
        return  # the daemon says what is wrong with it
    from ..mountpoint import type_of_enclosing_mount

    in_snapshots = ".snapshots" in source.split("/") and (
        type_of_enclosing_mount(os.fsencode(source)) or "").startswith("fuse.fsmount")
    if read_only or in_snapshots:
        raise UsageError(f"cannot mount {source}: it is read-only (a snapshot, a read-only disk); "
                         "back it up with `fsmount backup` instead")


def _hidden_snapshots(source: str) -> list[str]:
    """The warning for a `.snapshots` of the user's own, which the mount's would hide."""
    if not os.path.lexists(os.path.join(source, ".snapshots")):
        return []
    return [(f"warning: {source}/.snapshots is hidden while mounted: the mount shows its snapshots there "
             "(the folder is still backed up; rename it to see it)")]


BYPASSING = {  # kind of hold (mountpoint.processes_inside) -> what it has there, and what ends it
    "cwd": ("their current directory", "they change directory (`cd .` will do)"),
    "root": ("their root directory", "they are restarted"),
    "fd": ("files open", "they reopen their files"),
}


def _bypassing_programs(source: str, target: str) -> list[str]:
    """Warnings naming the programs that hold something inside the folder before it is mounted
    over: they keep the folder underneath, so what they write there goes past the mount, into
    no snapshot until the next mount's scan. A shell inside by its own `cd`, or a file opened
    before the mount (an editor, a log), is how a user gets there without noticing."""
    if source != target:
        return []  # the source stays where it is, beside the mount: writes there always go past it
    from ..mountpoint import processes_inside

    ignore = {os.getppid()} if _cwd_is_underneath(target) else set()  # the shell: the `cd .` note is for it
    found = processes_inside(os.fsencode(source), ignore=frozenset(ignore))
    warnings = []
    for kind, (what, until) in BYPASSING.items():
        if found[kind]:
            named = ", ".join(f"{command} (pid {pid})" for pid, command in found[kind][:4])
            more = f" and {len(found[kind]) - 4} more" if len(found[kind]) > 4 else ""
            warnings.append(f"warning: programs with {what} in {source}: {named}{more}; what they write "
                            "there bypasses the mount (no snapshot has it until the next mount's scan) "
                            f"until {until}")
    return warnings


def _cwd_is_underneath(target: str) -> bool:
    try:
        return is_within(os.getcwd(), target)  # the directory underneath, if we were in it before the mount
    except OSError:
        return False


def _warn_if_cwd_is_underneath(target: str) -> None:
    """A shell that was in the folder before it was mounted over stays in the folder underneath:
    what it writes by relative path goes past the mount, and no snapshot sees it until the next
    mount's scan. Say so while that shell (our parent) can still `cd .`."""
    if _cwd_is_underneath(target):
        say("note: this shell's current directory is still the folder underneath the mount; "
            "run `cd .` so that its work goes through the mount", err=True)


@click.command()
@click.argument("mountpoint", type=click.Path(path_type=str))
@click.option("--lazy", is_flag=True,
              help="Detach the mount now, even while programs still use it. A live mount first has the "
                   "kernel write back what it caches, and does not wait for the upload: the final "
                   "snapshot and the backlog stay on local disk, and the next mount of the folder "
                   "uploads them.")
@json_option
@click.pass_obj
def umount(app: AppContext, mountpoint: str, lazy: bool) -> int:
    """Unmount a live mount, after its final snapshot is stored, or a snapshot mount.

    A live mount takes a final snapshot (unless nothing changed since the folder's last one) and
    uploads it, with whatever else waits in its backlog, before this returns (a progress bar shows how far it is). If the store cannot take it, the
    snapshots stay on local disk for the next mount and the exit code says so (15); with the store
    down, finding that out takes one retry budget (FSMOUNT_STORE_RETRY_S, a minute on S3), which
    --lazy does not wait for.
    A mount that a program still uses (an open file, a shell in it, a copy running) is not
    unmounted (exit 1) unless --lazy; a live mount detached so first has the kernel write back
    what it caches, and what the program writes afterwards is lost. A mount whose daemon died is
    cleared (exit 3 for a live mount: it took no final snapshot).
    """
    import subprocess

    from ..mountpoint import is_stale, mounted_at

    if is_stale(os.fsencode(mountpoint)):
        return _clear_dead_mount(mountpoint, app)
    code = unmount_live(mountpoint, app, lazy=lazy)
    if code is not None:
        return code

    if not mounted_at(os.path.realpath(os.fsencode(mountpoint))):
        raise UsageError(f"{mountpoint} is not mounted")
    proc = subprocess.run(["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        message = proc.stderr.strip().removeprefix("fusermount3: ") or f"cannot unmount {mountpoint}"
        if "busy" in message:
            message += " (a program still uses it: close it, or detach it now with `fsmount umount --lazy`)"
        raise FsmountError(message)
    if app.json:
        emit_json({**json_path("mountpoint", os.path.abspath(mountpoint)), "kind": "snapshots"})
    elif not app.quiet:
        say(f"unmounted {path_line(mountpoint)}")
    return 0


def _clear_dead_mount(path: str, app: AppContext) -> int:
    """Detach a mount whose daemon died (kill -9, a crash), saying what that cost a live mount.

    Lazily (`fusermount3 -uz`): nothing is left to write back through a dead connection, and a
    shell still inside, the usual way to find a mount dead, would make a plain unmount fail."""
    import subprocess

    from ..mountpoint import enclosing_mount

    found = enclosing_mount(os.path.abspath(os.fsencode(path)))
    if found is None:
        raise UsageError(f"{path} is not mounted")
    where, kind = os.fsdecode(found[0]), found[1]
    live = kind == "fuse.fsmount"  # mount-snapshots' is fuse.fsmount-snapshots: it had nothing to save
    if live:
        say(f"warning: the daemon of {path_line(where)} had died: no final snapshot was taken; the next mount of the "
            "folder scans it and picks up the changes", err=True)
    proc = subprocess.run(["fusermount3", "-uz", where], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise FsmountError(proc.stderr.strip().removeprefix("fusermount3: ") or f"cannot unmount {where}")
    if app.json:
        emit_json({**json_path("mountpoint", where), "kind": "live" if live else "snapshots", "daemon_was_gone": True,
                   "final_snapshot": None})
    elif not app.quiet:
        say(f"unmounted {path_line(where)} (its daemon was gone)")
    return 3 if live else 0


COMMANDS = [mount, snapshot, status, umount]
