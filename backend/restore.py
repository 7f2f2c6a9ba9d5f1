"""Restore a snapshot, or parts of it, to a new folder or back onto the original as a delta.

Strategy. One algorithm serves both: the calling thread walks the snapshot's trees and the target
side by side through directory fds. A file missing from the target is created and only its data
blocks are written (holes stay holes); a regular file already there is compared block by block, and
only blocks whose XXH3 differs from the snapshot's are fetched and rewritten. Fetching, unsealing
and writing blocks run on a worker pool, in tasks of `BLOCKS_PER_TASK` adjacent blocks fetched
with one ranged read (blob_reader.py), bounded by `MAX_TASKS_IN_FLIGHT`; a single finisher thread
then truncates each file, sets its metadata and closes it, and sets each directory's metadata after
everything inside it (submitted in post-order, so it always comes last).

Safety. Nothing outside the target is touched: every entry is opened relative to its directory fd
with O_NOFOLLOW, a symlink found where the snapshot has a directory or file is replaced, never
followed, and a local file with other hard links is replaced rather than written through.
A file that cannot be restored (for example a corrupt blob) is reported, a half-created copy is
removed, and the rest of the restore goes on.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import xxhash

from .blob_reader import BlobReader
from .errors import FsmountError, UsageError
from .fsnode import IS_ROOT, apply_metadata, make_dir, raise_fd_limit, remove_entry
from .progress import Progress
from .repository import Repository
from .snapshot import Snapshot
from .pack import DATA_BLOB
from .tree import BLOCKDEV, CHARDEV, DIR, FIFO, FILE, HOLE, SOCKET, SYMLINK, Node

log = logging.getLogger(__name__)

BLOCKS_PER_TASK = 8  # a worker fetches this many adjacent blocks of a file with one ranged read
MAX_TASKS_IN_FLIGHT = 16
MAX_FILES_IN_FLIGHT = 128

_ALL, _PARTIAL = "all", "partial"  # restore a whole subtree / only toward selected paths


@dataclass
class RestoreStats:
    files: int = 0
    dirs: int = 0
    others: int = 0
    bytes_written: int = 0
    blocks_written: int = 0
    blocks_unchanged: int = 0
    deleted: int = 0
    duration_ms: int = 0


@dataclass
class RestoreResult:
    stats: RestoreStats
    errors: list[str] = field(default_factory=list)


@dataclass
class _DirJob:
    fd: int
    path: bytes
    nodes: list[Node]
    selection: str
    node: Node | None  # None for the target root, whose own metadata is left alone
    parent_fd: int | None
    position: int = 0


class Restore:
    """One restore run. Call `run()` once."""

    def __init__(self, repo: Repository, snapshot: Snapshot, target: str | bytes, *,
                 paths: list[bytes] | None = None, delete: bool = False, progress: Progress | None = None,
                 workers: int | None = None):
        self.repo = repo
        self.snapshot = snapshot
        self.target = os.path.abspath(os.fsencode(target))
        self.paths = [p.strip(b"/") for p in paths or [] if p.strip(b"/")]
        self.delete = delete
        self.progress = progress or Progress()
        self.stats = RestoreStats()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._block_size = repo.block_size
        self._blobs = BlobReader(repo)
        self._workers = ThreadPoolExecutor(workers or max(4, 2 * (os.cpu_count() or 2)),
                                           thread_name_prefix="restore")
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix="restore-finish")
        self._tasks_in_flight = threading.Semaphore(MAX_TASKS_IN_FLIGHT)
        self._files_in_flight = threading.Semaphore(MAX_FILES_IN_FLIGHT)
        self._links: dict[tuple[int, int], bytes] = {}  # hard-link group -> first restored path

    def run(self) -> RestoreResult:
        started = time.monotonic()
        for path in self.paths:
            self.repo.find_node(self.snapshot, path)  # unknown paths fail before anything is written
        raise_fd_limit()
        try:
            os.makedirs(self.target, exist_ok=True)
            self._root_fd = os.open(self.target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise UsageError(f"cannot use {os.fsdecode(self.target)} as restore target: {exc.strerror}") from exc
        self.progress.start(total_bytes=None if self.paths else self.snapshot.stats.get("size"))
        try:
            root_nodes = self.repo.load_tree(self.snapshot.tree)
            self._walk(_DirJob(self._root_fd, b"", root_nodes, _PARTIAL if self.paths else _ALL, None, None))
            self._finisher.submit(lambda: None).result()  # everything submitted before is finished
        finally:
            self._workers.shutdown(wait=True, cancel_futures=True)
            self._finisher.shutdown(wait=True)
            os.close(self._root_fd)
            self.progress.finish()
        self.stats.duration_ms = int((time.monotonic() - started) * 1000)
        return RestoreResult(self.stats, self.errors)

    # -- walking ----------------------------------------------------------------------------------

    def _selection(self, path: bytes, parent_selection: str) -> str | None:
        if parent_selection == _ALL:
            return _ALL
        for wanted in self.paths:
            if path == wanted or path.startswith(wanted + b"/"):
                return _ALL
        if any(wanted.startswith(path + b"/") for wanted in self.paths):
            return _PARTIAL
        return None

    def _walk(self, root: _DirJob) -> None:
        stack = [root]
        try:
            while stack:
                job = stack[-1]
                if job.position < len(job.nodes):
                    node = job.nodes[job.position]
                    job.position += 1
                    child = self._visit(job, node)
                    if child is not None:
                        stack.append(child)
                    continue
                stack.pop()
                if self.delete and job.selection == _ALL:
                    self._delete_extra(job)
                if job.node is not None:
                    self._finisher.submit(self._finish_dir, job)
        except BaseException:
            for job in stack[1:]:
                os.close(job.fd)
            raise

    def _visit(self, job: _DirJob, node: Node) -> _DirJob | None:
        path = job.path + b"/" + node.name if job.path else node.name
        selection = self._selection(path, job.selection)
        if selection is None:
            return None
        try:
            if node.type == DIR:
                nodes = self.repo.load_tree(node.subtree)
                fd = make_dir(job.fd, node.name)
                self.stats.dirs += 1
                return _DirJob(fd, path, nodes, selection, node, job.fd)
            if node.type == FILE:
                self._restore_file(job, node, path)
            elif node.type == SOCKET:
                pass  # a socket is recreated by the program that listens on it, not by a restore
            else:
                self._restore_special(job, node)
        except FsmountError as exc:
            self._error(path, str(exc))
        except OSError as exc:
            self._error(path, exc.strerror or str(exc))
        return None

    def _delete_extra(self, job: _DirJob) -> None:
        wanted = {n.name for n in job.nodes}
        for name in os.listdir(job.fd):
            name_b = os.fsencode(name)
            if name_b not in wanted:
                remove_entry(job.fd, name_b)
                self.stats.deleted += 1

    # -- entries ----------------------------------------------------------------------------------

    def _replace(self, dir_fd: int, name: bytes) -> None:
        try:
            remove_entry(dir_fd, name)
        except FileNotFoundError:
            pass

    def _restore_special(self, job: _DirJob, node: Node) -> None:
        try:
            st = os.lstat(node.name, dir_fd=job.fd)
        except FileNotFoundError:
            st = None
        if node.type == SYMLINK:
            same = st is not None and stat.S_ISLNK(st.st_mode) and os.readlink(node.name, dir_fd=job.fd) == node.target
            if not same:
                if st is not None:
                    self._replace(job.fd, node.name)
                os.symlink(node.target, node.name, dir_fd=job.fd)
        elif node.type == FIFO:
            if st is None or not stat.S_ISFIFO(st.st_mode):
                if st is not None:
                    self._replace(job.fd, node.name)
                os.mkfifo(node.name, 0o600, dir_fd=job.fd)
        elif node.type in (CHARDEV, BLOCKDEV):
            if not IS_ROOT:
                self._error(job.path + b"/" + node.name, "device files can only be restored as root")
                return
            if st is not None:
                self._replace(job.fd, node.name)
            kind = stat.S_IFCHR if node.type == CHARDEV else stat.S_IFBLK
            os.mknod(node.name, kind | 0o600, node.rdev, dir_fd=job.fd)
        apply_metadata(job.fd, node)
        self.stats.others += 1

    def _restore_file(self, job: _DirJob, node: Node, path: bytes) -> None:
        name = node.name
        try:
            st = os.lstat(name, dir_fd=job.fd)
        except FileNotFoundError:
            st = None
        if node.is_hardlinked:
            group = (node.dev, node.ino)
            first = self._links.get(group)
            if first is not None:
                if st is not None:
                    if st.st_ino == os.lstat(first, dir_fd=self._root_fd).st_ino:
                        return  # already this link
                    self._replace(job.fd, name)
                os.link(first, name, src_dir_fd=self._root_fd, dst_dir_fd=job.fd, follow_symlinks=False)
                self.stats.files += 1
                return
            self._links[group] = path
        compare = st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink == 1
        if compare:
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=job.fd)
        else:
            if st is not None:
                self._replace(job.fd, name)
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=job.fd)
        self._files_in_flight.acquire()
        batches = []
        try:
            for first in range(0, node.block_count, BLOCKS_PER_TASK):
                last = min(first + BLOCKS_PER_TASK, node.block_count)
                self._tasks_in_flight.acquire()
                try:
                    batches.append(self._workers.submit(self._restore_blocks, fd, node, first, last, compare))
                except BaseException:
                    self._tasks_in_flight.release()
                    raise
        finally:
            self._finisher.submit(self._finish_file, fd, job.fd, node, path, batches, created=not compare)
        self.stats.files += 1

    def _restore_blocks(self, fd: int, node: Node, first: int, last: int, compare: bool) -> None:
        """Blocks [first, last) of a file: those that differ are fetched together and written."""
        try:
            wanted: list[int] = []
            done_bytes = 0
            for i in range(first, last):
                offset = i * self._block_size
                length = min(self._block_size, node.size - offset)
                if compare:
                    local = os.pread(fd, length, offset)
                    if len(local) == length and xxhash.xxh3_128_digest(local) == node.block_xxh(i):
                        with self._lock:
                            self.stats.blocks_unchanged += 1
                        done_bytes += length
                        continue
                if node.block_id(i) == HOLE:
                    if compare:
                        os.pwrite(fd, bytes(length), offset)
                    done_bytes += length
                    continue
                wanted.append(i)
            self.progress.advance(nbytes=done_bytes)
            fetched = self._blobs.fetch(DATA_BLOB, [node.block_id(i) for i in wanted]) if wanted else {}
            for i in wanted:
                data = fetched[node.block_id(i)]
                if isinstance(data, FsmountError):
                    raise data
                offset = i * self._block_size
                length = min(self._block_size, node.size - offset)
                if len(data) != length:
                    raise FsmountError(f"block {i} has {len(data)} bytes, the snapshot says {length}")
                if compare:
                    os.pwrite(fd, data, offset)
                else:
                    _write_skipping_zero_pages(fd, data, offset)
                with self._lock:
                    self.stats.blocks_written += 1
                    self.stats.bytes_written += length
                self.progress.advance(nbytes=length)
        finally:
            self._tasks_in_flight.release()

    # -- finisher thread --------------------------------------------------------------------------

    def _finish_file(self, fd: int, dir_fd: int, node: Node, path: bytes, batches: list[Future],
                     created: bool) -> None:
        try:
            failure = None
            for future in batches:
                try:
                    future.result()
                except (FsmountError, OSError) as exc:
                    failure = failure or exc
            if failure is not None:
                self._error(path, str(failure))
                if created:
                    os.unlink(node.name, dir_fd=dir_fd)
                return
            os.ftruncate(fd, node.size)
            apply_metadata(dir_fd, node, fd, replace_xattrs=not created)
        except OSError as exc:
            self._error(path, exc.strerror or str(exc))
        finally:
            os.close(fd)
            self._files_in_flight.release()

    def _finish_dir(self, job: _DirJob) -> None:
        try:
            assert job.node is not None and job.parent_fd is not None
            apply_metadata(job.parent_fd, job.node, job.fd, replace_xattrs=True)
        except OSError as exc:
            self._error(job.path, exc.strerror or str(exc))
        finally:
            os.close(job.fd)

    def _error(self, path: bytes, message: str) -> None:
        text = f"{os.fsdecode(path)}: {message}"
        log.error("%s", text)
        with self._lock:
            self.errors.append(text)


PAGE = 4096
_ZERO_PAGE = bytes(PAGE)


def _write_skipping_zero_pages(fd: int, data: bytes, offset: int) -> None:
    """Write `data` into a new file, leaving all-zero pages as holes (as the original had them)."""
    if data.find(_ZERO_PAGE) < 0:  # the usual case, checked in C: no page can be all zeros
        os.pwrite(fd, data, offset)
        return
    view = memoryview(data)
    run_start = None
    for page in range(0, len(data), PAGE):
        zero = view[page:page + PAGE] == _ZERO_PAGE[: min(PAGE, len(data) - page)]
        if not zero and run_start is None:
            run_start = page
        elif zero and run_start is not None:
            os.pwrite(fd, view[run_start:page], offset + run_start)
            run_start = None
    if run_start is not None:
        os.pwrite(fd, view[run_start:], offset + run_start)


def restore(repo: Repository, snapshot: Snapshot, target: str | bytes, **options: object) -> RestoreResult:
    """Restore `snapshot` into `target`; see `Restore` for the options."""
    return Restore(repo, snapshot, target, **options).run()  # type: ignore[arg-type]
