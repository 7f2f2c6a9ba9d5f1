"""What a backup reads a folder through: the folder as it is, or the folder as it was at one instant.

backup.py walks the folder with directory fds and asks a `Source` for every entry's names,
metadata and bytes. `LiveSource` answers from the file system as it is while the backup reads it,
which is what a backup of a plain directory can do: a file that changes under it is caught by
comparing its fstat before and after, reported, and left out (`SourceChanged`).

The live mount sees every change before it happens, so it can do better: it hands the backup a
point-in-time view (fsmount/frozen_view.py) that answers with the state of the instant the snapshot
was frozen, whatever was written, renamed or removed since. Both answer the same questions, and
entries are named by their directory's fd and key (st_dev, st_ino) and their own key, so a view can
recognise an entry wherever it has moved.
"""

from __future__ import annotations

import errno
import os
from typing import Protocol

from .fsnode import at_path, list_dir, open_dir, read_xattrs

Key = tuple[int, int]  # (st_dev, st_ino): an entry's identity, wherever it is now


def key_of(st: os.stat_result) -> Key:
    return st.st_dev, st.st_ino


class SourceChanged(Exception):
    """The entry was replaced or vanished while it was being read; it is left out of this snapshot."""


class SourceFile(Protocol):
    size: int  # the bytes to read
    stat: os.stat_result  # the metadata to record with them

    def read(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes; fewer only where the file now ends (`size` is then cut there)."""

    def next_data(self, offset: int) -> int | None:
        """The next offset at or after `offset` that may hold data, or None if only holes remain
        (`size` is cut where the file now ends if it shrank meanwhile)."""

    def finish(self) -> str | None:
        """Called after the last read: a warning if the reads may not agree with one another (the
        file changed meanwhile; what was read is stored), else None."""

    def close(self) -> None: ...


class Source(Protocol):
    def list(self, dir_fd: int, dir_key: Key) -> list[bytes]:
        """The names in a directory, sorted bytewise."""

    def lstat(self, dir_fd: int, dir_key: Key, name: bytes) -> os.stat_result: ...

    def xattrs(self, dir_fd: int, name: bytes, key: Key) -> dict[bytes, bytes]: ...

    def readlink(self, dir_fd: int, name: bytes, key: Key) -> bytes: ...

    def open_dir(self, dir_fd: int, name: bytes, key: Key) -> int:
        """A new fd of the directory `name` (key `key`) of `dir_fd`; the caller closes it."""

    def open_file(self, dir_fd: int, name: bytes, st: os.stat_result) -> SourceFile: ...

    def verify(self) -> None:
        """Called before the snapshot object is written; raises if the answers cannot be trusted."""


class LiveSource:
    """The file system as it is now: a plain directory backup reads through this."""

    def list(self, dir_fd: int, dir_key: Key) -> list[bytes]:
        return list_dir(dir_fd)

    def lstat(self, dir_fd: int, dir_key: Key, name: bytes) -> os.stat_result:
        return os.lstat(name, dir_fd=dir_fd)

    def xattrs(self, dir_fd: int, name: bytes, key: Key) -> dict[bytes, bytes]:
        return read_xattrs(at_path(dir_fd, name))

    def readlink(self, dir_fd: int, name: bytes, key: Key) -> bytes:
        return os.readlink(name, dir_fd=dir_fd)

    def open_dir(self, dir_fd: int, name: bytes, key: Key) -> int:
        fd = open_dir(dir_fd, name)
        if key_of(os.fstat(fd)) != key:
            os.close(fd)
            raise SourceChanged("was replaced while being read")
        return fd

    def open_file(self, dir_fd: int, name: bytes, st: os.stat_result) -> SourceFile:
        return LiveFile(open_file(dir_fd, name), st)

    def verify(self) -> None:
        pass  # what changed while read was reported file by file


def open_file(dir_fd: int, name: bytes) -> int:
    """Open a file for reading without following a symlink, and without touching atime if we may."""
    try:
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:  # O_NOATIME is only for the owner
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def seek_data(fd: int, offset: int) -> int | None:
    """The next offset holding data at or after `offset`, or None if only holes remain."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        if exc.errno == errno.EINVAL:  # file system without SEEK_DATA: treat everything as data
            return offset
        raise


def _fingerprint(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class LiveFile:
    """A file read as it is; `finish()` tells whether it changed while it was read.

    A file written while it is read (a log, a database) is stored as it was read, with a warning,
    as restic and borg do: leaving it out, as we did, meant a file always being written was in no
    snapshot at all. Its recorded mtime and ctime are those from before the read, so the next
    backup reads it again."""

    def __init__(self, fd: int, expected: os.stat_result):
        self.fd = fd
        try:
            self._before = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if self._before.st_ino != expected.st_ino:
            os.close(fd)
            raise SourceChanged("was replaced while being read")
        self.size = self._before.st_size
        self.stat = self._before
        self._shrank = False

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            self.size = offset + len(data)
            self._shrank = True
        return data

    def next_data(self, offset: int) -> int | None:
        found = seek_data(self.fd, offset)
        if found is None:  # only holes left, or the file was cut short meanwhile: then it ends now
            now = os.fstat(self.fd).st_size
            if now < self.size:
                self.size = max(now, offset)  # what was read before the cut is kept
                self._shrank = True
        return found

    def finish(self) -> str | None:
        if self._shrank:
            return "shrank while being read (stored as far as it was read)"
        if _fingerprint(os.fstat(self.fd)) != _fingerprint(self._before):
            return "changed while being read (stored as read: its parts may not agree)"
        return None

    def close(self) -> None:
        os.close(self.fd)


__all__ = ["Key", "LiveFile", "LiveSource", "Source", "SourceChanged", "SourceFile", "key_of", "open_file",
           "seek_data"]
