"""The uploader: turns the changelog into snapshots, one at a time.

A snapshot freezes the changelog's current epoch on the event loop thread and hands the live tree a point-in-time
view of that instant (frozen_view.py). Writers wait only for that: a flush, a counter, and an
lstat per file written in the epoch. The engine's change-driven backup then runs on a worker
thread, reading the folder through the view while the user keeps working: it lists only
directories on changed paths, reads only the written blocks, and reuses the parent snapshot
everywhere else (backend/backup.py); whatever changes meanwhile, it records the folder as it was.

The instant is the daemon's: with the kernel's writeback cache, bytes written to a file that is
still open and not yet fsync'd may still sit in the kernel and belong to the next snapshot (closing
a file writes it back; `fsmount snapshot` has the kernel write everything back before asking). The first
snapshot after a mount starts, and any after a failed one, is a full metadata scan instead, which
finds edits made while unmounted or lost in a crash (changelog.py says why that is enough).

When the store fails (unreachable, down, out of space), what the snapshot writes waits in the
repository's backlog on local disk (backend/stores/backlog.py) and the snapshot is done; the mount
uploads the backlog, in order, once the store is back. When even that cannot be (the backlog is
full, or a tree the snapshot must read is only in the store), the snapshot is not given up: its
view keeps its instant while the user keeps working at local speed, and the same snapshot is tried
again with growing pauses until it is stored (status shows it as pending, with the error). Only a
view that cannot hold its instant any longer (spill limit) abandons it; the next one rescans.

Snapshots are taken on demand (`fsmount snapshot`, `mkdir .snapshots/NAME`), on a schedule
(`--every`), and at unmount. The last two are skipped when nothing changed since the folder's last
snapshot, as restic's `--skip-if-unchanged`: the frozen epoch holds no record (any mark counts, a
chmod as much as a write), or, when the snapshot is a full scan (the first one of a mount, which
finds what changed while unmounted), the scan found the parent's tree and root entry again. A
snapshot on demand is always taken.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from backend.backup import Backup, BackupResult
from backend.errors import FsmountError, StoreError
from backend.repository import Repository
from backend.snapshot import Snapshot, check_name, check_name_free

from .changelog import Changelog
from .frozen_view import FrozenView

log = logging.getLogger(__name__)

LIVE_TAG = "live"
SPILL_LIMIT_BYTES = 4 << 30  # what a running snapshot may keep aside of blocks overwritten meanwhile
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 15.0  # pauses between attempts to store a pending snapshot


@dataclass
class UploaderStatus:
    snapshots_taken: int = 0
    snapshots_skipped: int = 0  # scheduled or final snapshots not taken: nothing had changed
    last_snapshot: str | None = None
    last_snapshot_time: float | None = None
    last_duration_s: float | None = None
    last_bytes_added: int = 0
    bytes_added: int = 0  # by the snapshots of this mount, and the seconds they took: the upload rate
    seconds_taking: float = 0.0
    last_full_scan: bool = False
    last_error: str | None = None
    running: bool = False
    pending_since: float | None = None  # the instant of a snapshot waiting for the store
    attempts: int = 0  # failed attempts to store it


class Uploader:
    def __init__(self, repo: Repository, changelog: Changelog, source: bytes, source_fd: int, host: str,
                 spill_dir: str | None = None, spill_limit_bytes: int = SPILL_LIMIT_BYTES):
        self.repo = repo
        self.spill_dir = spill_dir or repo.cache_dir
        self.spill_limit_bytes = spill_limit_bytes
        self.live_tree: object | None = None  # has `frozen`: told of each running snapshot's view
        self.changelog = changelog
        self.source = source
        self.source_fd = source_fd
        self.host = host
        # Every snapshot of the repository seen so far: a name is checked against these while the
        # store is down (_check_name).
        self._known: dict[str, Snapshot] = {s.id: s for s in self._first_listing()}
        self.parent: Snapshot | None = self._latest()
        self.status = UploaderStatus()
        if self.parent is not None:  # until this mount takes one, status shows the folder's last snapshot
            self.status.last_snapshot = self.parent.id
            self.status.last_snapshot_time = self.parent.time_ns / 1e9
            self.status.last_duration_s = self.parent.stats.get("duration_ms", 0) / 1000
            self.status.last_bytes_added = self.parent.stats.get("bytes_added", 0)
        self.on_snapshot: Callable[[Snapshot], None] | None = None  # told of every snapshot stored
        self._lock = trio.Lock()
        self._no_more_retries = trio.Event()

    def _first_listing(self) -> list[Snapshot]:
        """The repository's snapshots: the store's, or, while it does not answer (the mount may
        have opened without it), those known here, among them this folder's last, the parent."""
        backlog = self.repo.backlog
        if backlog is None or backlog.store_failing_since() is None:
            try:
                return self.repo.snapshots()
            except StoreError as exc:
                if backlog is None:
                    raise
                log.warning("cannot list the store's snapshots (%s); starting from those known here", exc)
        return self.repo.snapshots_known_here()

    def known_snapshots(self) -> list[Snapshot]:
        """The repository's snapshots as last listed here, with this mount's since."""
        return list(self._known.values())

    def _latest(self) -> Snapshot | None:
        mine = [s for s in self._known.values() if s.host == self.host and s.source == self.source]
        return mine[-1] if mine else None

    async def snapshot(self, name: str | None = None, *, retry: bool = True) -> Snapshot:
        """Take a snapshot of the folder as it is now and store it, trying again while the store
        fails (unless not `retry`); raises FsmountError if it cannot be stored."""
        snapshot = await self._take(name, retry, skip_if_unchanged=False)
        assert snapshot is not None
        return snapshot

    async def snapshot_if_changed(self, *, retry: bool = True) -> Snapshot | None:
        """As `snapshot`, but None, and nothing stored, when the folder's last snapshot shows it as
        it is (a debug line says so)."""
        return await self._take(None, retry, skip_if_unchanged=True)

    async def _take(self, name: str | None, retry: bool, skip_if_unchanged: bool) -> Snapshot | None:
        async with self._lock:
            if name is not None:  # mkdir .snapshots/NAME and the control socket alike, before the freeze
                await self._check_name(name)
            # The freeze: nothing below awaits until the view is in place.
            frozen = self.changelog.freeze()
            full_scan = frozen.full_scan or self.parent is None
            try:
                if skip_if_unchanged and not full_scan and frozen.is_empty():
                    # Nothing to forget: the epoch closed without a record, and the next one is
                    # still relative to the same parent.
                    frozen.close()
                    self._skipped("nothing changed since snapshot")
                    return None
                view = FrozenView.at_freeze(self.source_fd, self.repo.block_size, self.spill_dir,
                                            self.spill_limit_bytes, None if full_scan else frozen.written_paths())
            except (OSError, sqlite3.Error) as exc:  # no room for the spill file, an unreadable changelog
                frozen.close()
                self.changelog.snapshot_failed(frozen)
                self.status.last_error = f"cannot start a snapshot: {exc}"
                raise FsmountError(self.status.last_error) from exc
            instant_ns = time.time_ns()
            if self.live_tree is not None:
                self.live_tree.frozen = view  # type: ignore[attr-defined]
            self.status.running = True
            started = time.monotonic()
            try:
                result = await self._store(frozen, view, instant_ns, name, full_scan, retry, skip_if_unchanged)
            except FsmountError as exc:
                self.changelog.snapshot_failed(frozen)
                self.status.last_error = str(exc)
                raise
            finally:
                self.status.pending_since = None
                self.status.attempts = 0
                if self.live_tree is not None:
                    self.live_tree.frozen = None  # type: ignore[attr-defined]
                view.close()
                frozen.close()
                self.status.running = False
            self.changelog.snapshot_done(frozen, result.snapshot.id)
            if result.unchanged:  # the scan found the parent again: later epochs are relative to it
                self.status.last_error = None
                self._skipped("the scan found no change since snapshot")
                return None
            self.parent = result.snapshot
            self._known[result.snapshot.id] = result.snapshot
            if self.on_snapshot is not None:
                self.on_snapshot(result.snapshot)
            self.status.snapshots_taken += 1
            self.status.last_snapshot = result.snapshot.id
            self.status.last_snapshot_time = time.time()
            self.status.last_duration_s = time.monotonic() - started
            self.status.last_bytes_added = result.stats.bytes_added
            self.status.bytes_added += result.stats.bytes_added
            self.status.seconds_taking += self.status.last_duration_s
            self.status.last_full_scan = full_scan
            self.status.last_error = None
            for warning in result.warnings:
                log.warning("snapshot %s: %s", result.snapshot.short_id, warning)
            return result.snapshot

    async def _check_name(self, name: str) -> None:
        """Refuse `name` (BadName) unless it is valid and free.

        Free among the store's snapshots while the store takes writes. While it does not (the
        backlog holds what it could not take, or the store failed its last read), or when its
        listing fails, free among the snapshots known here instead (`_snapshots_known_here`).
        Asking a store that is down held the snapshot's instant for the whole retry budget and then
        failed it, where an unnamed one waits on local disk; a listing that fails here makes the
        snapshot's writes wait on local disk at once. What this misses is a snapshot another machine
        named so since the last listing; the two then get folders apart (`folder_names` appends the
        short id), as when two machines take one name at the same moment with the store up."""
        check_name(name)
        backlog = self.repo.backlog
        if backlog is None or backlog.writes_go_to_store():
            try:
                listed = await trio.to_thread.run_sync(self.repo.snapshots)
            except StoreError as exc:
                log.warning("cannot list the store's snapshots (%s); checking the name %r against those "
                            "known here", exc, name)
            else:
                self._known = {s.id: s for s in listed}
                check_name_free(name, listed)
                return
        check_name_free(name, await trio.to_thread.run_sync(self._snapshots_known_here))

    def _snapshots_known_here(self) -> list[Snapshot]:
        """The snapshots known without the store: `_known`, and those this machine keeps copies of
        or holds in this mount's backlog (`Repository.snapshots_known_here`: another mount of the
        same repository here took some of them, perhaps while the store was down too)."""
        known = dict(self._known)
        known.update((snapshot.id, snapshot) for snapshot in self.repo.snapshots_known_here())
        return list(known.values())

    def _skipped(self, why: str) -> None:
        assert self.parent is not None
        self.status.snapshots_skipped += 1
        log.debug("snapshot skipped: %s %s", why, self.parent.short_id)

    async def _store(self, frozen: object, view: FrozenView, instant_ns: int, name: str | None,
                     full_scan: bool, retry: bool, skip_if_unchanged: bool) -> BackupResult:
        while True:
            try:
                return await trio.to_thread.run_sync(self._backup, frozen, view, instant_ns, name, full_scan,
                                                     skip_if_unchanged)
            except StoreError as exc:
                self.status.attempts += 1
                self.status.pending_since = instant_ns / 1e9
                self.status.last_error = str(exc)
                if not retry or view.overrun is not None or self._no_more_retries.is_set():
                    raise
                pause_s = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (self.status.attempts - 1))
                log.warning("snapshot not stored (%s); its instant is kept, trying again in %.0f s", exc, pause_s)
                with trio.move_on_after(pause_s):
                    await self._no_more_retries.wait()

    def stop_retrying(self) -> None:
        """A snapshot waiting for the store gives up after its current attempt (at unmount)."""
        self._no_more_retries.set()

    def _backup(self, frozen: object, view: FrozenView, instant_ns: int, name: str | None,
                full_scan: bool, skip_if_unchanged: bool) -> BackupResult:
        try:
            return self._backup_from(self.parent, frozen, view, instant_ns, name, full_scan, skip_if_unchanged)
        except StoreError as exc:
            backlog = self.repo.backlog
            if not full_scan or self.parent is None or backlog is None or backlog.store_failing_since() is None:
                raise
            # The parent's trees are in the store (a mount that started without it): read every
            # file instead. Blocks the index knows are not stored again.
            log.warning("the parent snapshot's trees cannot be read (%s); this snapshot reads every file", exc)
            return self._backup_from(None, frozen, view, instant_ns, name, full_scan, skip_if_unchanged)

    def _backup_from(self, parent: Snapshot | None, frozen: object, view: FrozenView, instant_ns: int,
                     name: str | None, full_scan: bool, skip_if_unchanged: bool) -> BackupResult:
        return Backup(self.repo, self.source, host=self.host, tags=[LIVE_TAG], name=name, parent=parent,
                      changes=None if full_scan else frozen, source_fd=self.source_fd,  # type: ignore[arg-type]
                      view=view, time_ns=instant_ns, skip_if_unchanged=skip_if_unchanged).run()

    async def run_schedule(self, every_s: float) -> None:
        """Take a snapshot every `every_s` seconds unless nothing changed; failures are logged and
        retried next time."""
        while True:
            await trio.sleep(every_s)
            try:
                await self.snapshot_if_changed()
            except FsmountError as exc:
                log.error("scheduled snapshot failed: %s", exc)

    def describe(self) -> dict:
        doc = dict(vars(self.status))
        doc.update(self.changelog.statistics())
        doc["source"] = os.fsdecode(self.source)
        taking = self.status.seconds_taking
        doc["upload_rate_bytes_per_s"] = self.status.bytes_added / taking if taking else None
        return doc
