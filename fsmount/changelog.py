"""The changelog: what changed in the live tree since the last snapshot, in epochs.

The live tree's handlers call `mark_*` on the event loop thread; marks land in memory first and are
flushed to SQLite (WAL) at least every second, at fsync, and before every rename, so a
burst of writes grows the database, not the daemon's memory. A snapshot `freeze()`s the current
epoch (flush, then start the next epoch: writers wait only for that) and hands the frozen epoch to
the engine as a `ChangeSet` (backend/changes.py), read through its own SQLite connection while new
marks go into the next epoch.

What is durable when. Marks are committed without fsync (synchronous=NORMAL): a crash may lose the
last second of marks. That is safe because every mount start runs a full metadata scan of the
source against the last snapshot (size, mtime, ctime, inode), which finds those edits and everything
done while unmounted; DESIGN asks for that scan anyway, and fsync'ing a record before each file's
first write would cost a disk flush per created file.

When the changelog cannot be written (the disk holding it is full, or it fails), it loses track
instead of failing the user's work: marks are dropped, nothing grows in memory, and the next
snapshot rescans the whole folder; at each freeze it tries to start afresh.

Paths are bytes relative to the source root (b"" is the root). Records of one epoch:

    changes(epoch, path, flags)     flags: CONTENT some blocks written (see blocks), ALL whole
                                    content, META metadata, ENTRIES a directory's entries changed,
                                    NEW created in this epoch (no match by name in the parent)
    blocks(epoch, path, block)      block numbers written
    origins(epoch, path, origin)    path was at `origin` in the parent snapshot (renamed)

A rename moves the current epoch's records under the old path to the new one, so records always
name current paths, and `origin` always names a path of the parent snapshot.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any

from backend.changes import ALL, CLEAN, Content

log = logging.getLogger(__name__)

CONTENT, WHOLE, META, ENTRIES, NEW = 1, 2, 4, 8, 16

_SCHEMA = """
CREATE TABLE IF NOT EXISTS changes (epoch INTEGER, path BLOB, flags INTEGER, PRIMARY KEY (epoch, path))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blocks (epoch INTEGER, path BLOB, block INTEGER, PRIMARY KEY (epoch, path, block))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS origins (epoch INTEGER, path BLOB, origin BLOB, PRIMARY KEY (epoch, path))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value);
"""


def parent_of(path: bytes) -> bytes:
    return path.rpartition(b"/")[0]


def _below(path: bytes) -> tuple[bytes, bytes]:
    """Bounds of the paths strictly below a non-root `path`: (path + "/", path + "0"), as "0" = "/" + 1."""
    assert path, "the root has no bounds; every other path is below it"
    return path + b"/", path + b"0"


def _unless_lost(method: Callable) -> Callable:
    """Skip the call while the changelog has lost track; lose track if SQLite fails in it."""

    @functools.wraps(method)
    def wrapper(self: Changelog, *args: Any, **kwargs: Any) -> Any:
        if self.lost is not None:
            return None
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            self._lose_track(exc)
            return None

    return wrapper


def _rollback(db: sqlite3.Connection) -> None:
    """End a failed transaction, if SQLite has not already (a failed COMMIT may have)."""
    if db.in_transaction:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the error that brought us here is the one worth reporting


def _connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


class Changelog:
    """Marks from the live tree, grouped in epochs; one per mounted source."""

    def __init__(self, path: str, block_size: int):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.block_size = block_size
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            # A damaged changelog is never a reason to refuse to mount: start a fresh one; its
            # state says "rescan everything", which finds whatever the old one knew.
            log.warning("changelog %s is damaged (%s); starting a new one and rescanning", path, exc)
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.replace(path + suffix, path + ".damaged" + suffix)
            self._db = self._open()
        self.lost: str | None = None  # why marks are not being kept (the next snapshot rescans)
        self.epoch = int(self._get("epoch", 1))
        self.clean_shutdown = bool(self._get("clean_shutdown", 1))
        self._set("clean_shutdown", 0)
        # Not yet flushed marks of the current epoch.
        self._flags: dict[bytes, int] = {}
        self._blocks: dict[bytes, set[int]] = {}
        self._removed: list[bytes] = []

    def _open(self) -> sqlite3.Connection:
        db = _connect(self.path)
        try:
            db.executescript(_SCHEMA)
            db.execute("PRAGMA quick_check").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    # -- state ------------------------------------------------------------------------------------

    def _get(self, key: str, default: object) -> object:
        row = self._db.execute("SELECT value FROM state WHERE key=?", (key,)).fetchone()
        return default if row is None else row[0]

    def _set(self, key: str, value: object) -> None:
        self._db.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (key, value))

    def close(self, *, clean: bool) -> None:
        self.flush()
        if clean and self.lost is None:
            try:
                self._set("clean_shutdown", 1)
            except sqlite3.Error as exc:
                log.warning("changelog %s: cannot record the clean stop: %s", self.path, exc)
        self._db.close()

    def _lose_track(self, exc: Exception) -> None:
        if self.lost is None:
            log.warning("changelog %s cannot be written (%s): the next snapshot rescans the folder", self.path, exc)
        self.lost = str(exc)
        self._flags.clear()
        self._blocks.clear()
        self._removed.clear()
        _rollback(self._db)

    def _start_afresh(self) -> bool:
        """After losing track: forget every record and ask for a rescan, if SQLite lets us now."""
        try:
            self._db.execute("BEGIN")
            for table in ("changes", "blocks", "origins"):
                self._db.execute(f"DELETE FROM {table}")
            self._set("needs_full_scan", 1)
            self._db.execute("COMMIT")
        except sqlite3.Error:
            _rollback(self._db)
            return False
        log.info("changelog %s is writable again", self.path)
        self.lost = None
        return True

    # -- marks (event loop thread) ----------------------------------------------------------------

    def _mark(self, path: bytes, flags: int) -> None:
        self._flags[path] = self._flags.get(path, 0) | flags

    @_unless_lost
    def mark_written(self, path: bytes, offset: int, length: int) -> None:
        if length <= 0:
            return
        self._mark(path, CONTENT)
        first, last = offset // self.block_size, (offset + length - 1) // self.block_size
        blocks = self._blocks.get(path)
        if blocks is None:
            blocks = self._blocks[path] = set()
        if first == last:
            blocks.add(first)
        else:
            blocks.update(range(first, last + 1))

    @_unless_lost
    def mark_truncated(self, path: bytes) -> None:
        self._mark(path, WHOLE)

    @_unless_lost
    def mark_metadata(self, path: bytes) -> None:
        self._mark(path, META)

    @_unless_lost
    def mark_created(self, path: bytes) -> None:
        self._mark(path, NEW | WHOLE | META)
        self._mark(parent_of(path), ENTRIES)

    @_unless_lost
    def mark_removed(self, path: bytes, *, is_dir: bool = False) -> None:
        # Forget marks held in memory now; those already in SQLite go at the next flush, before
        # anything marked afterwards is written (a path may be removed and created again).
        for held in (self._flags, self._blocks):
            held.pop(path, None)
            if is_dir:
                low, high = path + b"/", path + b"0"
                for key in [k for k in held if low < k < high]:
                    del held[key]
        self._removed.append(path)
        self._mark(parent_of(path), ENTRIES)

    @_unless_lost
    def mark_renamed(self, old: bytes, new: bytes, *, exchange: bool = False) -> None:
        """`old` now lives at `new` (and with `exchange`, `new` at `old`)."""
        self.flush()
        epoch = self.epoch
        old_origin, new_origin = self._parent_path(old), self._parent_path(new) if exchange else None
        moved_old = self._take_records(old, epoch)
        moved_new = self._take_records(new, epoch)  # replaced (or, with exchange, moved to `old`)
        self._put_records(moved_old, old, new, epoch)
        self._set_origin(new, old_origin, epoch)
        if exchange:
            self._put_records(moved_new, new, old, epoch)
            self._set_origin(old, new_origin, epoch)
        self._mark(new, META)
        if exchange:
            self._mark(old, META)
        self._mark(parent_of(old), ENTRIES)
        self._mark(parent_of(new), ENTRIES)

    def _set_origin(self, path: bytes, origin: bytes | None, epoch: int) -> None:
        if origin is None:
            self._mark(path, NEW | WHOLE | META)
            self.flush()
            self._db.execute("DELETE FROM origins WHERE epoch=? AND path=?", (epoch, path))
        else:
            self._db.execute("INSERT OR REPLACE INTO origins VALUES (?, ?, ?)", (epoch, path, origin))

    def _parent_path(self, path: bytes) -> bytes | None:
        """Where `path` was in the parent snapshot, or None if it was created since."""
        db, epoch = self._db, self.epoch
        prefix = path
        while True:
            row = db.execute("SELECT flags FROM changes WHERE epoch=? AND path=?", (epoch, prefix)).fetchone()
            if row is not None and row[0] & NEW:
                return None
            row = db.execute("SELECT origin FROM origins WHERE epoch=? AND path=?", (epoch, prefix)).fetchone()
            if row is not None:
                return row[0] + path[len(prefix):]
            if not prefix:
                return path
            prefix = parent_of(prefix)

    def _take_records(self, path: bytes, epoch: int) -> list[tuple[str, tuple]]:
        low, high = _below(path)
        taken: list[tuple[str, tuple]] = []
        for table, columns in (("changes", "path, flags"), ("blocks", "path, block"), ("origins", "path, origin")):
            for condition, values in (("path=?", (path,)), ("path>? AND path<?", (low, high))):
                rows = self._db.execute(f"SELECT {columns} FROM {table} WHERE epoch=? AND {condition}",
                                        (epoch, *values)).fetchall()
                taken += [(table, row) for row in rows]
        self._delete_records([path], epoch)
        return taken

    def _put_records(self, records: Iterable[tuple[str, tuple]], old: bytes, new: bytes, epoch: int) -> None:
        for table, (path, value) in records:
            moved = new + path[len(old):]
            self._db.execute(f"INSERT OR REPLACE INTO {table} VALUES (?, ?, ?)", (epoch, moved, value))

    def _delete_records(self, paths: Iterable[bytes], epoch: int) -> None:
        # Two statements, not one with OR: SQLite uses the (epoch, path) key for each, while the OR
        # made every delete scan the epoch (10k unlinks: 600/s instead of thousands).
        for path in paths:
            low, high = _below(path)
            for table in ("changes", "blocks", "origins"):
                self._db.execute(f"DELETE FROM {table} WHERE epoch=? AND path=?", (epoch, path))
                self._db.execute(f"DELETE FROM {table} WHERE epoch=? AND path>? AND path<?", (epoch, low, high))

    @_unless_lost
    def flush(self) -> None:
        """Move the marks held in memory into SQLite."""
        if not self._flags and not self._blocks and not self._removed:
            return
        db, epoch = self._db, self.epoch
        db.execute("BEGIN")
        try:
            self._delete_records(self._removed, epoch)
            db.executemany(
                "INSERT INTO changes VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET flags = flags | excluded.flags",
                ((epoch, path, flags) for path, flags in self._flags.items()))
            db.executemany("INSERT OR IGNORE INTO blocks VALUES (?, ?, ?)",
                           ((epoch, path, b) for path, blocks in self._blocks.items() for b in blocks))
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        self._flags.clear()
        self._blocks.clear()
        self._removed.clear()

    # -- snapshots --------------------------------------------------------------------------------

    @property
    def needs_full_scan(self) -> bool:
        return bool(self._get("needs_full_scan", 1))

    @_unless_lost
    def require_full_scan(self, why: str) -> None:
        if not self.needs_full_scan:
            log.info("next snapshot will rescan the whole folder: %s", why)
        self._set("needs_full_scan", 1)

    def freeze(self) -> FrozenEpoch:
        """Close the current epoch and start the next; returns the closed one's changes."""
        self.flush()
        frozen = self.epoch
        self.epoch += 1
        if self.lost is not None and not self._start_afresh():
            return FrozenEpoch(self.path, frozen, full_scan=True)
        try:
            self._set("epoch", self.epoch)
            return FrozenEpoch(self.path, frozen, full_scan=self.needs_full_scan)
        except sqlite3.Error as exc:
            self._lose_track(exc)
            return FrozenEpoch(self.path, frozen, full_scan=True)

    @_unless_lost
    def snapshot_done(self, frozen: FrozenEpoch, snapshot_id: str) -> None:
        for table in ("changes", "blocks", "origins"):
            self._db.execute(f"DELETE FROM {table} WHERE epoch<=?", (frozen.epoch,))
        self._set("last_snapshot", snapshot_id)
        if frozen.full_scan:
            self._set("needs_full_scan", 0)

    @_unless_lost
    def snapshot_failed(self, frozen: FrozenEpoch) -> None:
        # Its changes and the next epoch's are relative to different parents: rescan to be sure.
        self.require_full_scan(f"snapshot of epoch {frozen.epoch} failed")

    def statistics(self) -> dict[str, object]:
        self.flush()
        if self.lost is not None:
            return {"epoch": self.epoch, "pending_files": 0, "pending_blocks": 0, "pending_bytes": 0,
                    "tracking": f"lost ({self.lost}): the next snapshot rescans the folder"}
        (paths,) = self._db.execute("SELECT count(*) FROM changes WHERE flags & ?", (CONTENT | WHOLE,)).fetchone()
        (blocks,) = self._db.execute("SELECT count(*) FROM blocks").fetchone()
        return {"epoch": self.epoch, "pending_files": paths, "pending_blocks": blocks,
                "pending_bytes": blocks * self.block_size}


class FrozenEpoch:
    """A closed epoch's changes, read on the uploader's thread through its own connection."""

    def __init__(self, path: str, epoch: int, *, full_scan: bool):
        self.db_path = path
        self.epoch = epoch
        self.full_scan = full_scan
        self._db: sqlite3.Connection | None = None
        # A closed epoch's records never change, and a backup asks about an entry twice in a row
        # (is it new, then what changed): the last answer is kept. Most epochs rename nothing.
        self._last_flags: tuple[bytes, int] | None = None
        self._has_origins: bool | None = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = _connect(self.db_path)
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _flags(self, path: bytes) -> int:
        if self._last_flags is not None and self._last_flags[0] == path:
            return self._last_flags[1]
        row = self.db.execute("SELECT flags FROM changes WHERE epoch=? AND path=?", (self.epoch, path)).fetchone()
        flags = 0 if row is None else row[0]
        self._last_flags = (path, flags)
        return flags

    def written_paths(self) -> list[bytes]:
        """Paths whose bytes changed in this epoch: the files its snapshot will read."""
        return [path for (path,) in self.db.execute(
            "SELECT path FROM changes WHERE epoch=? AND flags & ?", (self.epoch, CONTENT | WHOLE | NEW))]

    def is_empty(self) -> bool:
        return self.db.execute("SELECT 1 FROM changes WHERE epoch=? LIMIT 1", (self.epoch,)).fetchone() is None

    # -- backend.changes.ChangeSet ----------------------------------------------------------------

    def subtree_dirty(self, path: bytes) -> bool:
        if self._flags(path) & (ENTRIES | NEW):
            return True
        if not path:  # the root: any record of a path below it
            query, args = "path != x''", ()
        else:
            query, args = "path > ? AND path < ?", _below(path)
        return self.db.execute(f"SELECT 1 FROM changes WHERE epoch=? AND {query} LIMIT 1",
                               (self.epoch, *args)).fetchone() is not None

    def content(self, path: bytes) -> Content:
        flags = self._flags(path)
        if flags & (WHOLE | NEW):
            return ALL
        if flags & CONTENT:
            rows = self.db.execute("SELECT block FROM blocks WHERE epoch=? AND path=? ORDER BY block",
                                   (self.epoch, path)).fetchall()
            return [b for (b,) in rows]
        return CLEAN

    def origin(self, path: bytes) -> bytes | None:
        if self._has_origins is None:
            self._has_origins = self.db.execute("SELECT 1 FROM origins WHERE epoch=? LIMIT 1",
                                                (self.epoch,)).fetchone() is not None
        if not self._has_origins:
            return None
        row = self.db.execute("SELECT origin FROM origins WHERE epoch=? AND path=?", (self.epoch, path)).fetchone()
        return None if row is None else row[0]

    def is_new(self, path: bytes) -> bool:
        return bool(self._flags(path) & NEW)
