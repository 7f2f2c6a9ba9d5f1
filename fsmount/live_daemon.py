"""A live mount from start to finish: claim the source, mount, serve, and snapshot at the end.

Order matters. The source directory is opened before mounting, so the mount can sit over the
source's own path and still reach it. A lock file in the repository's cache claims the source, so a
second mount of the same folder is refused. After mounting, one event loop runs the FUSE handlers,
the changelog flush (every second), the schedule, the control socket and the signal watcher.
`MOUNT/.snapshots` is the snapshot tree (snapshot_tree.py) of this folder's snapshots; `mkdir`
there takes one. When the file system is unmounted — `fsmount umount`, SIGTERM/SIGINT, or `fusermount3 -u` — the final
snapshot is taken from the source fd: nothing can be written any more, so it is complete. It is
skipped, as a scheduled one is, when the folder's last snapshot shows it as it is (uploader.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from functools import partial

import pyfuse3
import trio

from backend.errors import FsmountError, StoreError, UsageError, shown_name
from backend.fsnode import is_within
from backend.repository import Repository
from backend.stores import local_folders
from backend.stores.backlog import BacklogStore

from . import control, control_server, fuse_fallocate, fuse_loop
from .changelog import Changelog
from .live_tree import LiveTree
from .mountpoint import (
    check_mountpoint,
    freeze_startup_heap,
    is_stale,
    mounted_at,
    raise_readahead,
    type_of_mount,
    write_back,
)
from .snapshot_mount import make_snapshot_tree
from .stop_signals import StopSignals
from .uploader import RETRY_FIRST_S, Uploader

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0
BACKLOG_CHECK_S = 1.0  # how often an empty backlog is looked at
BACKLOG_RETRY_MAX_S = 15.0  # longest pause between attempts to upload the backlog
STORE_PROBE_S = 2.0  # pause between questions to a failing store, each of which may wait out its retry budget


def source_id(source: bytes) -> str:
    """A short stable name for a source folder: its changelog's and backlog's directory name."""
    return hashlib.sha256(os.path.realpath(source)).hexdigest()[:16]


def honoured_like(source_fd: int) -> set[str]:
    """Mount options under which the mount honours setuid bits, devices and execution exactly as
    the source's own file system does: same path, same files. For a root mount only.

    libfuse mounts nosuid,nodev unless told otherwise, which broke device nodes and setuid programs
    in the user's folder. Honouring them is safe only because nothing is granted that the source
    does not grant natively: the options mirror the source's mount flags (a source on a nosuid or
    nodev disk keeps them, and a noexec one passes it on, so a device node or setuid file found on
    a USB stick does not come alive through a root daemon); the kernel makes every decision on
    the caller's credentials, never the daemon's (`default_permissions`; mknod of a device needs
    CAP_MKNOD, chown needs CAP_CHOWN, a chmod's setgid bit is dropped outside one's group, all
    checked before a request reaches us); a file created for another user is never a root-owned
    setuid file, not even for an instant (live_tree.py); and the kernel still clears setuid and
    setgid bits when a non-root user writes to a file. What the mount shows beyond the source,
    `.snapshots`, is data from the repository, which anyone with its passphrase can write: there
    the snapshot tree disarms setuid and setgid bits, file capabilities and device nodes
    (`SnapshotTree`'s `disarmed`), so no snapshot can carry a privilege into the machine
    (`fsmount restore` brings them back as they were). A mount by another user goes through
    fusermount3 and keeps libfuse's nosuid,nodev: it could not have more natively."""
    flags = os.fstatvfs(source_fd).f_flag
    options = set()
    if not flags & os.ST_NOSUID:
        options.add("suid")
    if not flags & os.ST_NODEV:
        options.add("dev")
    if flags & os.ST_NOEXEC:
        options.add("noexec")
    return options


class SourceLock:
    """An exclusive claim on a source folder, held for the life of its mount."""

    def __init__(self, directory: str, source: bytes):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "lock")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip()
            os.close(self._fd)
            raise UsageError(f"{shown_name(source)} is already mounted by another fsmount (pid {holder or '?'}): "
                             "unmount that one first") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        os.close(self._fd)


class LiveMount:
    def __init__(self, repo: Repository, source: bytes, mountpoint: bytes, *, every_s: float | None = None,
                 host: str | None = None, cache_bytes: int = 1 << 30,
                 missed_by_replicas: Callable[[], list[dict]] = list, record_missed: Callable[[], object] = int):
        self.repo = repo
        # What --degraded writes of this mount left out, per replica (AppContext.missed_by_replicas),
        # and how it is recorded for `fsmount replicas sync` (AppContext.record_degraded_writes)
        self.missed_by_replicas = missed_by_replicas
        self._record_missed = record_missed
        self._recording = threading.Lock()  # objects reach the store from several threads
        self.cache_bytes = cache_bytes  # bound of the block cache behind .snapshots
        self.source = os.path.realpath(source)
        self.mountpoint = os.path.realpath(mountpoint)
        self.every_s = every_s
        self.host = host or socket.gethostname()
        self.final_snapshot: str | None = None  # the snapshot showing the folder as it was left
        self.final_unchanged = False  # no final snapshot was needed: final_snapshot is an earlier one
        self.final_error: str | None = None
        self.lazy = False  # `umount --lazy`: the final snapshot stays in the backlog for the next mount
        self.backlog_error: str | None = None  # why the backlog could not be uploaded at unmount
        self.unmounting = False  # unmounted, busy with the final snapshot and upload

    def run(self, ready: Callable[[], None]) -> None:
        """Mount, call `ready()`, serve until unmounted, take the final snapshot."""
        self._refuse_covering_own_files()
        live_dir = os.path.join(self.repo.cache_dir, "live", source_id(self.source))
        lock = SourceLock(live_dir, self.source)  # held: no other daemon serves this source
        try:
            source_fd = self._open_source()
        except BaseException:
            lock.release()
            raise
        changelog = Changelog(os.path.join(live_dir, "changelog.sqlite"), self.repo.block_size)
        try:
            changelog.require_full_scan("mount start: the folder may have changed while unmounted")
            self.uploader = Uploader(self.repo, changelog, self.source, source_fd, self.host, spill_dir=live_dir)
            self.changelog = changelog
            options = {"fsname=fsmount", "subtype=fsmount", "default_permissions"}
            if os.geteuid() == 0:
                options |= {"allow_other", *honoured_like(source_fd)}
            # On a mount with `suid` or `dev`, .snapshots grants neither (SnapshotTree's `disarmed`).
            snapshot_tree = make_snapshot_tree(
                self.repo, self.cache_bytes, on_mkdir=self.uploader.snapshot,
                include=lambda s: s.host == self.host and s.source == self.source,
                disarmed=bool(options & {"suid", "dev"}), store_failing=self._store_failing)
            snapshot_tree.take_listing(self.uploader.known_snapshots())
            self.uploader.on_snapshot = snapshot_tree.add
            if self.repo.backlog is not None:
                self.repo.backlog.on_stored = self._record_what_replicas_missed
            self.operations = LiveTree(source_fd, changelog, snapshot_tree)
            self.uploader.live_tree = self.operations
            os.umask(0)
            # Nothing may touch the mountpoint's path once mounted: the event loop that would answer
            # is this thread. Everything path-based is resolved now.
            self._socket_path = control.socket_path(self.mountpoint)
            stops = StopSignals()
            stops.hold()
            pyfuse3.init(self.operations, os.fsdecode(self.mountpoint), options)
            fuse_fallocate.install(self.operations.fallocate)
            freeze_startup_heap()
            trio.run(self._serve, ready, stops)
        finally:
            changelog.close(clean=True)
            lock.release()
            os.close(source_fd)

    def _store_failing(self) -> bool:
        backlog = self.repo.backlog
        return backlog is not None and backlog.store_failing_since() is not None

    def _record_what_replicas_missed(self) -> None:
        """Record, as each object reaches the store, what a replica left behind by --degraded lacks:
        recorded at exit only, a kill -9 of the daemon lost it, and with it `replicas sync`'s hint."""
        with self._recording:
            self._record_missed()

    def _refuse_covering_own_files(self) -> None:
        """The mount must not cover the daemon's own files. Its event loop would wait on itself to
        reach its control socket or changelog (the mount hung at start), and a repository inside
        the folder would back itself up with every snapshot, without end."""
        own = [("the repository", root, "keep it elsewhere") for root in local_folders(self.repo.store)]
        own += [("fsmount's cache", self.repo.cache_dir, "put it elsewhere with --cache-dir or XDG_CACHE_HOME"),
                ("fsmount's control sockets", control.runtime_dir(), "put them elsewhere with XDG_RUNTIME_DIR")]
        for covered in {self.source, self.mountpoint}:
            for what, path, how in own:
                real = os.path.realpath(os.fsencode(path))
                if is_within(real, covered):
                    raise UsageError(f"cannot mount {os.fsdecode(covered)}: it holds {what} "
                                     f"({os.fsdecode(real)}); {how}")

    def _open_source(self) -> int:
        """Open the source before mounting over it, clearing a mount its dead daemon left behind."""
        for path in {self.source, self.mountpoint}:
            if mounted_at(path) and is_stale(path):
                # We hold the source's lock, so no daemon serves this mount any more.
                log.warning("%s was left mounted by a daemon that died; unmounting it", os.fsdecode(path))
                subprocess.run(["umount", "-l", path] if os.geteuid() == 0 else ["fusermount3", "-uz", path],
                               check=False, capture_output=True)
        try:
            source_fd = os.open(self.source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise UsageError(f"cannot open source {os.fsdecode(self.source)}: {exc.strerror}") from None
        try:
            if self.mountpoint != self.source:
                check_mountpoint(self.mountpoint)
            elif (kind := type_of_mount(self.mountpoint) or "").startswith("fuse"):
                # A disk or tmpfs mounted there is fine: the source fd reaches it under the mount.
                raise UsageError(f"{os.fsdecode(self.mountpoint)} is a FUSE mount ({kind}) already; "
                                 "unmount it first")
        except BaseException:
            os.close(source_fd)
            raise
        return source_fd

    async def _serve(self, ready: Callable[[], None], stops: StopSignals) -> None:
        self._final_done = trio.Event()
        stop_control = trio.Event()
        async with trio.open_nursery() as outer:
            await outer.start(partial(control_server.serve, self._socket_path, self._handle, stop=stop_control))
            async with trio.open_nursery() as nursery:
                await nursery.start(stops.watch, self._stop_on_signal)
                nursery.start_soon(self._flush_changelog)
                nursery.start_soon(raise_readahead, self.mountpoint)
                if self.repo.backlog is not None:
                    nursery.start_soon(self._upload_backlog, self.repo.backlog)
                    nursery.start_soon(self._probe_failing_store, self.repo.backlog)
                if self.every_s:
                    nursery.start_soon(self.uploader.run_schedule, self.every_s)
                served = not stops.received
                try:
                    if served:
                        ready()
                        await fuse_loop.serve()
                    else:  # nothing went through the mount; the next one scans the folder anyway
                        log.info("received %s while mounting: unmounting, no final snapshot",
                                 signal.Signals(stops.received[0]).name)
                finally:
                    pyfuse3.close(unmount=True)
                    self.uploader.stop_retrying()  # a pending snapshot must not hold up the final one
                    self.unmounting = True
                if served:
                    await self._final_snapshot()
                self._final_done.set()
                nursery.cancel_scope.cancel()
            stop_control.set()  # the control server ends once pending replies (`umount`) are sent

    async def _unmount(self, *, lazy: bool) -> None:
        """`fsmount umount`: `fusermount3 -u`, which refuses while a program uses the mount (an open
        file, a shell inside, a mount within). Detached under it, that program's files would lose
        what the kernel still caches for them, and all it writes later. `--lazy` detaches anyway,
        once the kernel has written back what it holds. The unmount runs beside the event loop,
        which serves the write-back it causes."""
        where = os.fsdecode(self.mountpoint)
        if self.unmounting:
            return  # stopped already (a signal, `fusermount3 -u`): the caller waits for the final snapshot
        if lazy:
            self.lazy = True
            await trio.to_thread.run_sync(write_back, self.mountpoint)
            fuse_loop.stop()
            return
        done = await trio.run_process(["fusermount3", "-u", where], capture_stderr=True, check=False)
        if done.returncode != 0 and not self.unmounting:
            message = done.stderr.decode(errors="replace").strip().removeprefix("fusermount3: ")
            if "busy" in message:
                raise FsmountError(f"{where} is busy: a program still uses it (an open file, a shell inside it); "
                                   "close it, or detach the mount now with `fsmount umount --lazy`")
            raise FsmountError(message or f"cannot unmount {where}")

    def _stop_on_signal(self, signum: int) -> None:
        """SIGTERM/SIGINT: the kernel writes back what it caches for open files, then the mount is
        detached (a signal cannot be refused, busy or not)."""
        async def stop() -> None:
            await trio.to_thread.run_sync(write_back, self.mountpoint)
            fuse_loop.stop_on_signal(signum)
        trio.lowlevel.spawn_system_task(stop)

    async def _final_snapshot(self) -> None:
        """Snapshot what the folder holds now that nothing can change it, and (unless lazy) upload
        the backlog. One attempt each: `umount` waits for them; the next mount catches up."""
        backlog = self.repo.backlog
        if self.lazy and backlog is not None:
            backlog.hold()
        log.info("unmounted %s; taking the final snapshot", os.fsdecode(self.mountpoint))
        try:
            final = await self.uploader.snapshot_if_changed(retry=False)
            if final is None:
                self.final_unchanged = True
                parent = self.uploader.parent
                assert parent is not None  # skipped only when a snapshot shows the folder as it is
                log.info("nothing changed since snapshot %s: no final snapshot needed", parent.short_id)
                final = parent
            self.final_snapshot = final.id
        except FsmountError as exc:
            self.final_error = str(exc)
            log.error("final snapshot failed: %s (the next mount will catch up)", exc)
        if backlog is None or self.lazy or backlog.is_empty():
            return
        log.info("uploading the backlog before exiting")
        try:
            await trio.to_thread.run_sync(backlog.drain)
        except StoreError as exc:
            self.backlog_error = str(exc)
            log.error("the backlog stays on local disk for the next mount: %s", exc)

    async def _upload_backlog(self, backlog: BacklogStore) -> None:
        """Keep the store taking the backlog, pausing longer after each failure."""
        failures = 0
        while True:
            if backlog.is_empty():
                await trio.sleep(BACKLOG_CHECK_S)
                continue
            try:
                # Abandoned (still running) at unmount; the final upload waits for it in drain().
                drained = await trio.to_thread.run_sync(backlog.drain, abandon_on_cancel=True)
            except StoreError as exc:
                failures += 1
                pause_s = min(BACKLOG_RETRY_MAX_S, RETRY_FIRST_S * 2 ** (failures - 1))
                log.warning("backlog not uploaded (%s); trying again in %.0f s", exc, pause_s)
                await trio.sleep(pause_s)
                continue
            if drained:
                log.info("backlog uploaded (%d bytes)", drained)
            else:
                await trio.sleep(BACKLOG_CHECK_S)  # held for the next mount (`umount --lazy`)
            failures = 0

    async def _probe_failing_store(self, backlog: BacklogStore) -> None:
        """Find out when a failing store answers again, so that `.snapshots` lists it again (and
        shows what other machines stored meanwhile) even when no backlog is left to upload."""
        while True:
            await trio.sleep(STORE_PROBE_S)
            if backlog.store_failing_since() is not None:
                # Abandoned at unmount: it may be waiting out the store's retry budget.
                await trio.to_thread.run_sync(backlog.probe, abandon_on_cancel=True)

    async def _flush_changelog(self) -> None:
        while True:
            await trio.sleep(FLUSH_INTERVAL_S)
            self.changelog.flush()

    async def _handle(self, request: dict) -> dict:
        op = request["op"]
        if op == "status":
            backlog = self.repo.backlog
            return {"mountpoint": os.fsdecode(self.mountpoint), "pid": os.getpid(),
                    "every_s": self.every_s, "unmounting": self.unmounting,
                    **self.uploader.describe(),
                    "backlog": vars(backlog.status()) if backlog is not None else None,
                    "missed_by_replicas": self.missed_by_replicas()}
        if op == "snapshot":
            snapshot = await self.uploader.snapshot(request.get("name"))
            backlog = self.repo.backlog
            return {"id": snapshot.id, "short_id": snapshot.short_id, "label": snapshot.label(),
                    "in_backlog": backlog is not None and f"snapshots/{snapshot.id}" in backlog}
        if op == "unmount":
            await self._unmount(lazy=bool(request.get("lazy")))
            await self._final_done.wait()
            backlog = self.repo.backlog
            return {"final_snapshot": self.final_snapshot, "final_unchanged": self.final_unchanged,
                    "final_error": self.final_error,
                    "backlog_error": self.backlog_error,
                    "missed_by_replicas": self.missed_by_replicas(),
                    "backlog": vars(backlog.status()) if backlog is not None else None}
        raise UsageError(f"unknown control request {op!r}")
