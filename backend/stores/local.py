"""A store in a local directory: the embedded default.

Every object is written to a temporary file in the same directory, fsync'd, renamed over its final
name, and the directory is fsync'd, so a crash leaves either the old state or the whole new object.
Temporary files carry the `.tmp-` prefix and `list` never reports them. A writer killed mid-put leaves
its temporary file behind; `list`, walking the folders anyway, removes those it passes whose writer
is gone. A temporary file is named `.tmp-<pid space>-<pid>-<random>`, the pid space telling which
processes a pid names (this boot of this machine, this pid namespace): one of this pid space is
stale once its process has died, any other (another machine on a shared folder, another container,
an older fsmount) once it is `STALE_TMP_S` old. So a live writer's file is never taken from under
it, even when two backups write one repository at once.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import secrets
import time
from collections.abc import Iterator

from ..errors import FolderMissing, LocationMissing, ObjectNotFound, StoreError, UsageError

_TMP_PREFIX = ".tmp-"
STALE_TMP_S = 3600.0  # a temporary file of a writer this process cannot see: no put lasts this long


@functools.cache
def pid_space() -> str:
    """Which processes a pid names here (this boot of this machine, this pid namespace): a hash of
    the boot id and the pid namespace, 8 hex digits, or "" where that cannot be told. A temporary
    file's name holds it with its writer's pid, here and in restore.py, so that a later process
    can tell whether that writer may still be running (`process_exists`) or only guess by age."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return hashlib.blake2b(f"{boot_id} {namespace}".encode(), digest_size=4).hexdigest()



class LocalStore:
    """Objects as files under `root`; keys map to relative paths."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = os.path.abspath(os.fspath(root))

    @property
    def location(self) -> str:
        return self.root

    def _path(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"invalid object key {key!r}")
        return os.path.join(self.root, key)

    def create_if_missing(self) -> bool:
        """Create the repository's folder (and its parents) unless it exists; True if it was created."""
        try:
            os.makedirs(self.root)
        except FileExistsError:
            if not os.path.isdir(self.root):
                raise UsageError(f"cannot make a repository at {self.root}: it is a file, not a folder") from None
            return False
        except OSError as exc:
            raise _store_error(f"creating {self.root}", exc) from exc
        return True

    def remove_empty_folders(self) -> None:
        """Remove the folders under the root that hold nothing (what is left of a repository whose
        objects were all deleted, by `migrate --delete-source`). The root stays: it is the user's."""
        for directory, _, _ in os.walk(self.root, topdown=False):  # a folder after what it holds
            if directory == self.root:
                continue
            try:
                os.rmdir(directory)
            except OSError:
                pass  # not empty (a file of the user's), or gone already

    def _missing_root(self) -> FolderMissing:
        return FolderMissing(f"the repository folder {self.root} is missing (deleted, moved, or on a disk "
                             "that is not mounted)")

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        directory = os.path.dirname(path)
        tmp = os.path.join(directory, f"{_TMP_PREFIX}{temp_writer()}{secrets.token_hex(8)}")
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileNotFoundError:
                if not os.path.isdir(self.root):  # deleted, or a disk not mounted: never start an empty one
                    raise self._missing_root() from None
                os.makedirs(directory, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            fsync_dir(directory)
        except OSError as exc:
            _remove_quietly(tmp)
            raise _store_error(f"writing {key} to {self.root}", exc) from exc

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as f:
                if length is None:
                    f.seek(offset)
                    return f.read()
                return os.pread(f.fileno(), length, offset)
        except FileNotFoundError as exc:
            if not os.path.isdir(self.root):  # not a missing object: the repository is not there
                raise self._missing_root() from exc
            raise ObjectNotFound(f"object {key} not found in {self.root}") from exc
        except NotADirectoryError as exc:
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise LocationMissing(f"{self.root} is a file, not a folder") from exc
            raise _store_error(f"reading {key} from {self.root}", exc) from exc
        except OSError as exc:
            raise _store_error(f"reading {key} from {self.root}", exc) from exc

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        # Walk only the directories the prefix can match: "data/ab" lists data/ab*, not all of data/.
        base, _, leaf = prefix.rpartition("/")
        start = os.path.join(self.root, base) if base else self.root
        yield from self._walk(start, base, leaf)

    def _walk(self, directory: str, key_dir: str, leaf_prefix: str) -> Iterator[tuple[str, int]]:
        try:
            entries = os.scandir(directory)
        except FileNotFoundError:
            if not os.path.isdir(self.root):  # not an empty listing: the repository is gone
                raise self._missing_root() from None
            return
        except OSError as exc:
            raise _store_error(f"listing {directory}", exc) from exc
        with entries:
            for entry in entries:
                if entry.name.startswith(_TMP_PREFIX):
                    _remove_if_stale(entry)
                    continue
                if not entry.name.startswith(leaf_prefix):
                    continue
                key = f"{key_dir}/{entry.name}" if key_dir else entry.name
                if entry.is_dir(follow_symlinks=False):
                    yield from self._walk(entry.path, key, "")
                elif entry.is_file(follow_symlinks=False):
                    yield key, entry.stat(follow_symlinks=False).st_size

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _store_error(f"deleting {key} from {self.root}", exc) from exc

    def close(self) -> None:
        pass


def fsync_dir(directory: str) -> None:
    """Make the entries of `directory` durable (a file created or renamed in it)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_writer() -> str:
    """The part of a temporary file's name that names its writer, `<pid space>-<pid>-` (here and
    in restore.py): what `writer_gone` reads back."""
    return f"{pid_space() or 'x'}-{os.getpid()}-"


def writer_gone(space: str, pid: str, mtime: float) -> bool:
    """Whether the writer a temporary file's name names (`temp_writer`) has ended: its process is
    gone, or, for one this process cannot see (another machine or pid namespace), the file, last
    written at `mtime`, is `STALE_TMP_S` old."""
    if pid_space() and space == pid_space() and pid.isdigit():
        return not process_exists(int(pid))
    return time.time() - mtime > STALE_TMP_S


def _remove_if_stale(entry: os.DirEntry[str]) -> None:
    """Remove the temporary file `entry` if its writer is gone (see the module docstring)."""
    space, _, rest = entry.name.removeprefix(_TMP_PREFIX).partition("-")
    pid, _, _ = rest.partition("-")
    try:
        stale = writer_gone(space, pid, entry.stat(follow_symlinks=False).st_mtime)
    except OSError:
        return
    if stale:
        _remove_quietly(entry.path)  # a folder only read (another user's, read-only) keeps it


def process_exists(pid: int) -> bool:
    """Whether a process of this pid namespace has `pid` (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _store_error(doing: str, exc: OSError) -> StoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"{doing}: no space left on the repository's disk")
    return StoreError(f"{doing}: {exc.strerror or exc}")
