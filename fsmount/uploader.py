"""The uploader: turns the changelog into snapshots, one at a time.

A snapshot first has the kernel write back what it caches for the mount (`sync_kernel`: with the
writeback cache, just-written bytes and times may not have reached the daemon yet), then freezes
the changelog's current epoch on the event loop thread (writers wait only for that: a flush and a
counter), then runs the engine's change-driven backup on a worker thread, through
the source fd opened before mounting: it lists only directories on changed paths, reads only the
written blocks, and reuses the parent snapshot everywhere else (backend/backup.py). The first
snapshot after a mount starts, and any after a failed one, is a full metadata scan instead, which
finds edits made while unmounted or lost in a crash (changelog.py says why that is enough).

Snapshots are taken on demand (`fsmount snapshot`, `mkdir .snapshots/NAME`), on a schedule
(`--every`), and at unmount.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from backend.backup import Backup, BackupResult
from backend.errors import FsmountError
from backend.repository import Repository
from backend.snapshot import Snapshot

from .changelog import Changelog

log = logging.getLogger(__name__)

LIVE_TAG = "live"


@dataclass
class UploaderStatus:
    snapshots_taken: int = 0
    last_snapshot: str | None = None
    last_snapshot_time: float | None = None
    last_duration_s: float | None = None
    last_bytes_added: int = 0
    last_full_scan: bool = False
    last_error: str | None = None
    running: bool = False


class Uploader:
    def __init__(self, repo: Repository, changelog: Changelog, source: bytes, source_fd: int, host: str,
                 sync_kernel: Callable[[], None] | None = None):
        self.repo = repo
        self.sync_kernel = sync_kernel
        self.changelog = changelog
        self.source = source
        self.source_fd = source_fd
        self.host = host
        self.parent: Snapshot | None = self._latest()
        self.status = UploaderStatus(last_snapshot=self.parent.id if self.parent else None)
        self.on_snapshot: Callable[[Snapshot], None] | None = None  # told of every snapshot stored
        self._lock = trio.Lock()

    def _latest(self) -> Snapshot | None:
        mine = [s for s in self.repo.snapshots() if s.host == self.host and s.source == self.source]
        return mine[-1] if mine else None

    async def snapshot(self, name: str | None = None) -> Snapshot:
        """Take a snapshot of the folder as it is now; raises FsmountError if it cannot be stored."""
        async with self._lock:
            if self.sync_kernel is not None:
                # on a worker thread: the write-back it causes is served by the event loop meanwhile
                await trio.to_thread.run_sync(self.sync_kernel)
            frozen = self.changelog.freeze()
            full_scan = frozen.full_scan or self.parent is None
            self.status.running = True
            started = time.monotonic()
            try:
                result = await trio.to_thread.run_sync(self._backup, frozen, name, full_scan)
            except FsmountError as exc:
                self.changelog.snapshot_failed(frozen)
                self.status.last_error = str(exc)
                raise
            finally:
                frozen.close()
                self.status.running = False
            self.changelog.snapshot_done(frozen, result.snapshot.id)
            self.parent = result.snapshot
            if self.on_snapshot is not None:
                self.on_snapshot(result.snapshot)
            self.status.snapshots_taken += 1
            self.status.last_snapshot = result.snapshot.id
            self.status.last_snapshot_time = time.time()
            self.status.last_duration_s = time.monotonic() - started
            self.status.last_bytes_added = result.stats.bytes_added
            self.status.last_full_scan = full_scan
            self.status.last_error = None
            for warning in result.warnings:
                log.warning("snapshot %s: %s", result.snapshot.short_id, warning)
            return result.snapshot

    def _backup(self, frozen: object, name: str | None, full_scan: bool) -> BackupResult:
        return Backup(self.repo, self.source, host=self.host, tags=[LIVE_TAG], name=name, parent=self.parent,
                      changes=None if full_scan else frozen, source_fd=self.source_fd).run()  # type: ignore[arg-type]

    async def run_schedule(self, every_s: float) -> None:
        """Take a snapshot every `every_s` seconds; failures are logged and retried next time."""
        while True:
            await trio.sleep(every_s)
            try:
                await self.snapshot()
            except FsmountError as exc:
                log.error("scheduled snapshot failed: %s", exc)

    def describe(self) -> dict:
        doc = dict(vars(self.status))
        doc.update(self.changelog.statistics())
        doc["source"] = os.fsdecode(self.source)
        return doc
