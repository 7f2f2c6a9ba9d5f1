"""The source folder as it was at the instant a snapshot was frozen, while the folder keeps changing.

The uploader freezes the changelog's epoch at instant T and backs that epoch up while the user
keeps working. The backup reads the folder through this view (a backend `Source`), and the live
tree calls the view's `before_*` hooks before every change reaches the source, so the view can
keep what the snapshot still needs of T:

- names: before the first change to a directory's entries, its names at T (`before_entries`);
- metadata: before the first change to an entry, its stat, xattrs and symlink target;
- reachability: before an entry is renamed or removed, an fd of it, so the walk still finds it
  by its name at T (and a removed file keeps its bytes);
- bytes: before a write or truncate first reaches a block the snapshot may read, a copy of the
  block in a spill file (copy-on-write). Only files the snapshot will read are copied from: those
  written in the frozen epoch (`needed`), or every file when the snapshot rescans everything.

Nothing counts as read until the snapshot is stored: a snapshot whose upload fails (the store is
down) is read again, through the same view, when it is retried. Invariant: for every entry, the
view answers with its state at T — either nothing changed it since (and the live answer is T's),
or a hook kept T's answer before the first change. Hooks run on the event loop thread and the walk on the
uploader's thread; one lock makes each hook's "check and keep" and each of the walk's "check and
read" atomic, and every change is made only after its hook returns.

The spill file is bounded (`limit_bytes`), and so are the fds kept (`MAX_KEPT_FDS`, so the daemon
never runs out of descriptors for the user's own files). Past either, the view stops keeping and
the snapshot fails with `SnapshotOverrun` before its snapshot object is written; the next one
rescans.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import tempfile
import threading
from dataclasses import dataclass

from backend.errors import FsmountError
from backend.fsnode import at_path, open_dir, read_xattrs
from backend.source import Key, LiveSource, SourceChanged, key_of, open_file, seek_data

log = logging.getLogger(__name__)

HOLE = -1
MAX_KEPT_FDS = 10_000


class SnapshotOverrun(FsmountError):
    """The folder changed more during a snapshot than the spill file may hold."""

    exit_code = 15


def _never_fails(hook):
    """A hook must never fail the user's change: if it cannot keep T, the snapshot is abandoned."""

    @functools.wraps(hook)
    def wrapper(self: FrozenView, *args: object) -> None:
        try:
            hook(self, *args)
        except OSError as exc:
            self.give_up(f"cannot keep what {hook.__name__} changes: {exc.strerror or exc}")

    return wrapper


@dataclass(frozen=True)
class _Kept:
    """An entry's metadata at T."""

    stat: os.stat_result
    xattrs: dict[bytes, bytes]
    target: bytes | None  # symlinks


class FrozenView:
    def __init__(self, block_size: int, spill_dir: str, limit_bytes: int, needed: set[Key] | None):
        self.block_size = block_size
        self.limit_bytes = limit_bytes
        self._needed = needed  # files the snapshot reads bytes of; None: any file
        self._lock = threading.Lock()
        self._listings: dict[Key, dict[bytes, Key]] = {}
        self._kept: dict[Key, _Kept] = {}
        self._fds: dict[Key, int] = {}
        # key -> block -> (offset in the spill file, length); offset HOLE: the block was a hole at T
        self._spilled: dict[Key, dict[int, tuple[int, int]]] = {}
        # Unlinked from the start: nothing to clean up after a crash. Closed by close().
        self._spill_file = tempfile.TemporaryFile(dir=spill_dir)  # noqa: SIM115
        self._spill_fd = self._spill_file.fileno()
        self._spill_end = 0
        self.overrun: str | None = None
        self._live = LiveSource()

    @classmethod
    def at_freeze(cls, root_fd: int, block_size: int, spill_dir: str, limit_bytes: int,
                  written: list[bytes] | None) -> FrozenView:
        """The view of a frozen epoch, called at the freeze: `written` lists the paths whose bytes
        changed in the epoch (the snapshot reads only those), or is None for a full rescan."""
        needed: set[Key] | None = None
        if written is not None:
            needed = set()
            for path in written:
                try:
                    st = os.lstat(path, dir_fd=root_fd)
                except OSError:
                    continue  # removed in the same epoch: the snapshot does not read it
                if stat.S_ISREG(st.st_mode):
                    needed.add(key_of(st))
        return cls(block_size, spill_dir, limit_bytes, needed)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._spill_file.close()

    # -- hooks: the live tree calls these before it changes the source (event loop thread) ------

    @_never_fails
    def before_entries(self, dir_key: Key, dir_fd: int) -> None:
        """The entries of directory `dir_fd` are about to change."""
        with self._lock:
            # Even if the walk listed it already: it looks its names up one by one afterwards.
            if dir_key in self._listings:
                return
            fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                with os.scandir(fd) as entries:
                    self._listings[dir_key] = {os.fsencode(e.name): (dir_key[0], e.inode()) for e in entries}
            finally:
                os.close(fd)

    @_never_fails
    def before_metadata(self, key: Key, dir_fd: int, name: bytes) -> None:
        """The entry `name` of `dir_fd` (key `key`) is about to change its metadata."""
        with self._lock:
            self._keep(key, dir_fd, name)

    @_never_fails
    def before_move(self, key: Key, dir_fd: int, name: bytes) -> None:
        """The entry is about to be renamed or removed: keep its metadata and a way to reach it."""
        with self._lock:
            kept = self._keep(key, dir_fd, name)
            if kept is None or key in self._fds:
                return
            mode = kept.stat.st_mode
            if len(self._fds) >= MAX_KEPT_FDS:
                self.give_up(f"more than {MAX_KEPT_FDS} entries were moved or removed meanwhile")
                return
            try:
                if stat.S_ISDIR(mode):
                    self._fds[key] = open_dir(dir_fd, name)
                elif stat.S_ISREG(mode):  # even if unchanged: a damaged parent means reading it all
                    self._fds[key] = open_file(dir_fd, name)
            except OSError as exc:
                self.give_up(f"cannot keep {os.fsdecode(name)!r} open: {exc.strerror}")

    @_never_fails
    def before_write(self, key: Key, fd: int, offset: int, length: int) -> None:
        """`length` bytes at `offset` of the open file `fd` are about to be overwritten."""
        if length <= 0:
            return
        with self._lock:
            kept = self._keep_open(key, fd)
            first, last = offset // self.block_size, (offset + length - 1) // self.block_size
            self._spill(key, fd, kept.stat.st_size, range(first, last + 1))

    @_never_fails
    def before_truncate(self, key: Key, fd: int, size: int) -> None:
        """The file open as `fd` (readable) is about to be cut (or extended) to `size` bytes."""
        with self._lock:
            kept = self._keep_open(key, fd)
            old_size = kept.stat.st_size
            if size < old_size:
                first, last = size // self.block_size, (old_size - 1) // self.block_size
                self._spill(key, fd, old_size, range(first, last + 1))

    def _keep(self, key: Key, dir_fd: int, name: bytes) -> _Kept | None:
        kept = self._kept.get(key)
        if kept is not None:
            return kept
        try:
            st = os.lstat(name, dir_fd=dir_fd)
            target = os.readlink(name, dir_fd=dir_fd) if stat.S_ISLNK(st.st_mode) else None
            xattrs = read_xattrs(at_path(dir_fd, name))
        except OSError:
            return None  # it is not there: the change will fail the same way
        kept = self._kept[key] = _Kept(st, xattrs, target)
        return kept

    def _keep_open(self, key: Key, fd: int) -> _Kept:
        kept = self._kept.get(key)
        if kept is None:
            kept = self._kept[key] = _Kept(os.fstat(fd), read_xattrs(fd), None)
        return kept

    def _may_read(self, key: Key) -> bool:
        return self._needed is None or key in self._needed

    def _spill(self, key: Key, fd: int, size_at_t: int, blocks: range) -> None:
        spilled = self._spilled.setdefault(key, {})
        # Only blocks the file had at its instant: a range may reach far past them (fallocate).
        for block in range(blocks.start, min(blocks.stop, -(-size_at_t // self.block_size))):
            offset = block * self.block_size
            if offset >= size_at_t or block in spilled or not self._may_read(key):
                continue
            if self.overrun is not None:
                return
            length = min(self.block_size, size_at_t - offset)
            data_at = seek_data(fd, offset)
            if data_at is None or data_at >= offset + length:
                spilled[block] = (HOLE, length)  # nothing to copy
                continue
            if self._spill_end + length > self.limit_bytes:
                self.give_up(f"more than {self.limit_bytes >> 20} MiB changed while the snapshot was taken")
                return
            data = os.pread(fd, length, offset)
            try:
                os.pwrite(self._spill_fd, data, self._spill_end)
            except OSError as exc:
                self.give_up(f"cannot keep changed blocks aside: {exc.strerror}")
                return
            spilled[block] = (self._spill_end, len(data))
            self._spill_end += len(data)

    def give_up(self, why: str) -> None:
        """The view cannot hold its instant any longer: its snapshot will be abandoned."""
        if self.overrun is None:
            log.warning("the running snapshot cannot hold its instant: %s; it will be retried", why)
            self.overrun = why

    # -- backend.source.Source: the walk reads through these (uploader thread) --------------------

    def verify(self) -> None:
        if self.overrun is not None:
            raise SnapshotOverrun(f"snapshot abandoned: {self.overrun}")

    def list(self, dir_fd: int, dir_key: Key) -> list[bytes]:
        with self._lock:
            listing = self._listings.get(dir_key)
            if listing is not None:
                return sorted(listing)
            return self._live.list(dir_fd, dir_key)

    def lstat(self, dir_fd: int, dir_key: Key, name: bytes) -> os.stat_result:
        with self._lock:
            listing = self._listings.get(dir_key)
            if listing is not None:
                key = listing.get(name)
                if key is None:
                    raise FileNotFoundError(errno.ENOENT, "not in the snapshot's listing", name)
                if key in self._kept:
                    return self._kept[key].stat
            st = os.lstat(name, dir_fd=dir_fd)
            kept = self._kept.get(key_of(st))
            if kept is not None:
                return kept.stat
            if listing is not None and key_of(st) != listing[name]:
                raise SourceChanged("was replaced while the snapshot was taken")
            return st

    def xattrs(self, dir_fd: int, name: bytes, key: Key) -> dict[bytes, bytes]:
        with self._lock:
            kept = self._kept.get(key)
            return kept.xattrs if kept is not None else self._live.xattrs(dir_fd, name, key)

    def readlink(self, dir_fd: int, name: bytes, key: Key) -> bytes:
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None and kept.target is not None:
                return kept.target
            return self._live.readlink(dir_fd, name, key)

    def open_dir(self, dir_fd: int, name: bytes, key: Key) -> int:
        with self._lock:
            if key in self._fds:
                return os.dup(self._fds[key])
            return self._live.open_dir(dir_fd, name, key)

    def open_file(self, dir_fd: int, name: bytes, st: os.stat_result) -> FrozenFile:
        key = key_of(st)
        with self._lock:
            fd = os.dup(self._fds[key]) if key in self._fds else open_file(dir_fd, name)
        if key_of(os.fstat(fd)) != key:
            os.close(fd)
            raise SourceChanged("was replaced while the snapshot was taken")
        return FrozenFile(self, fd, key, st)

    # -- for FrozenFile ---------------------------------------------------------------------------

    def _read(self, key: Key, fd: int, offset: int, length: int) -> bytes:
        with self._lock:
            spilled = self._spilled.get(key, {}).get(offset // self.block_size)
            if spilled is not None:
                where, kept_length = spilled
                data = bytes(kept_length) if where == HOLE else os.pread(self._spill_fd, kept_length, where)
            else:
                data = os.pread(fd, length, offset)
        if len(data) != length:
            raise SourceChanged("shrank while the snapshot was taken (left out of it)")
        return data

    def _next_data(self, key: Key, fd: int, offset: int) -> int | None:
        with self._lock:
            if key not in self._kept:  # unchanged since T: the live file's holes are T's
                return seek_data(fd, offset)
            # Changed: blocks not kept aside are as they were; kept ones may be data.
            kept = [b * self.block_size for b, (where, _) in self._spilled.get(key, {}).items()
                    if where != HOLE and b * self.block_size >= offset]
            live = seek_data(fd, offset)
            candidates = [o for o in (live, *kept) if o is not None]
            return min(candidates) if candidates else None



class FrozenFile:
    """A file's bytes at T: blocks kept aside where they were overwritten since, the file elsewhere."""

    def __init__(self, view: FrozenView, fd: int, key: Key, st: os.stat_result):
        self._view, self._fd, self._key = view, fd, key
        self.stat = st
        self.size = st.st_size

    def read(self, offset: int, length: int) -> bytes:
        return self._view._read(self._key, self._fd, offset, length)

    def next_data(self, offset: int) -> int | None:
        return self._view._next_data(self._key, self._fd, offset)

    def finish(self) -> None:
        pass

    def close(self) -> None:
        os.close(self._fd)
