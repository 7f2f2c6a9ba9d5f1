"""A folder's files and bytes, counted while its backup runs, so that a progress bar has a total.

restic's scanner does the same: a second walk of the folder, names and lstat only, on a thread of
its own, started with the backup; once it is done the bar shows a total and an ETA. The backup
reads only what changed, so its bytes read say nothing about how far it is: it counts every
file's size as done once the file is (read or reused), against this total.

The count goes through directory fds of its own (an `openat` of each folder, never a path, so a
deep tree does not run into PATH_MAX), and leaves out the folders the backup leaves out. It is an
estimate: whatever changes between the two walks is counted as the count saw it. Folders it
cannot open or list are left out of it, not reported (the backup reports them).
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class FolderCount:
    """Counts the regular files below `root_fd` (every name of a hard-linked file, as a snapshot's
    size does) and their bytes, on a thread started here. `close()` stops it; `totals()` is None
    until it has finished."""

    def __init__(self, root_fd: int, excluded: set[tuple[int, int]]):
        self.files = 0
        self.bytes = 0
        self._excluded = excluded
        self._stop = threading.Event()
        self._done = threading.Event()
        fd = os.open(b".", _DIR_FLAGS, dir_fd=root_fd)  # its own open folder: no offset shared with the walk
        self._thread = threading.Thread(target=self._count, args=(fd,), name="backup-count", daemon=True)
        self._thread.start()

    def totals(self) -> tuple[int, int] | None:
        """(bytes, files) once the count has finished, else None."""
        return (self.bytes, self.files) if self._done.is_set() else None

    def close(self) -> None:
        """Stop counting (if not done yet) and wait for the thread."""
        self._stop.set()
        self._thread.join()

    def _count(self, root_fd: int) -> None:
        stack = [(root_fd, self._list(root_fd))]  # (folder fd, its subfolders not counted yet)
        try:
            while stack:
                if self._stop.is_set():
                    return
                fd, subdirs = stack[-1]
                if not subdirs:
                    os.close(stack.pop()[0])
                    continue
                try:
                    child = os.open(subdirs.pop(), _DIR_FLAGS, dir_fd=fd)
                except OSError:
                    continue
                st = os.fstat(child)
                if (st.st_dev, st.st_ino) in self._excluded:
                    os.close(child)
                    continue
                stack.append((child, self._list(child)))
            self._done.set()
        except BaseException:  # the count only informs a progress bar: it never fails a backup
            log.debug("counting the folder for the progress bar failed", exc_info=True)
        finally:
            for fd, _ in stack:
                os.close(fd)

    def _list(self, fd: int) -> list[str]:
        """Count the files of the folder at `fd`; its subfolders' names."""
        subdirs = []
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            subdirs.append(entry.name)
                        elif entry.is_file(follow_symlinks=False):
                            self.bytes += entry.stat(follow_symlinks=False).st_size
                            self.files += 1
                    except OSError:
                        pass
        except OSError:
            pass
        return subdirs
