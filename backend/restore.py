"""Restore a snapshot, or parts of it, to a new folder or back onto the original as a delta.

Strategy. One algorithm serves both: the calling thread walks the snapshot's trees and the target
side by side through directory fds. A file missing from the target is created and only its data
blocks are written (holes stay holes); a regular file already there is compared block by block, and
only blocks whose XXH3 differs from the snapshot's are fetched and rewritten.

Work is split so the walking thread only reads trees, makes directories and hands out tasks to a
worker pool (bounded by `MAX_TASKS_IN_FLIGHT`): small files go in batches of up to
`BYTES_PER_TASK`, and a task creates, fills and finishes each file of its batch itself, so the
blocks of neighbouring files (which a backup stores next to each other) come in one ranged read
(blob_reader.py) and file creation runs in parallel. A larger file is opened by the walker and
filled by tasks of `BLOCKS_PER_TASK` adjacent blocks; whichever task ends last truncates it, sets
its metadata and closes it. A directory counts what is still pending inside it; the last of those
to finish sets the directory's metadata (the target folder's own is the snapshot's root node), so
it always comes after everything in it.

Safety. Nothing outside the target is touched: every entry is opened relative to its directory fd
with O_NOFOLLOW, a symlink found where the snapshot has a directory or file is replaced, never
followed, and a local file with other hard links is replaced rather than written through.
A file that cannot be restored (for example a corrupt blob) is reported, a half-created copy is
removed, and the rest of the restore goes on. A full target disk (ENOSPC, EDQUOT) is no such
failure, since every later file would fail the same way: the restore stops there, and says so once
(`RestoreResult.disk_full`); what it had not finished stays as it was. A file already there is either restored whole or
left as it was: every block is fetched and authenticated before the first one is written (a large
file's blocks wait in an unlinked spill file), and a file, symlink or special file that replaces
another entry is made under a temporary name and renamed over it once complete (so a full disk
leaves the old entry); a restore killed before the rename leaves that file, and the next one removes it (the name holds its writer's pid, so that the file of a
restore still running into the same folder is not taken from under it). The other names of a hard-link group are linked to the first
once it is complete; a local file that already has other names is kept if it matches, else copied
and the copy changed, never written through. Without `delete`, nothing holding data
is removed: a directory where the snapshot has a file, or a file where it has a directory, is
skipped and reported (`RestoreResult.skipped`).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import xxhash

from .blob_reader import BlobReader
from .errors import FsmountError, UsageError, shown_name
from .fsnode import IS_ROOT, apply_metadata, is_within, make_dir, open_dir, raise_fd_limit, read_xattrs, remove_entry
from .pack import DATA_BLOB
from .progress import Progress
from .repository import Repository
from .snapshot import Snapshot
from .source import key_of
from .stores import local_folders, on_local_disk
from .stores.local import temp_writer, writer_gone
from .tree import BLOCKDEV, CHARDEV, DIR, FIFO, FILE, HOLE, SOCKET, SYMLINK, Node

log = logging.getLogger(__name__)

BLOCKS_PER_TASK = 8  # a worker fetches this many adjacent blocks of a file with one ranged read
BYTES_PER_TASK = 1024 * 1024  # small files are restored in batches of about this many bytes
FILES_PER_TASK = 32
MAX_TASKS_IN_FLIGHT = 32
MAX_FILES_IN_FLIGHT = 128  # large files held open by the walker at once
# From a remote store each request costs a round trip and server work whatever its size (SeaweedFS
# on 127.0.0.1: 1 MiB ranged reads came at 74 MB/s, whole 16 MiB packs at 227 MB/s), so tasks
# there are 8x larger: 8 MiB of adjacent blocks, one ranged read each.
REMOTE_TASK_SCALE = 8

_ALL, _PARTIAL = "all", "partial"  # restore a whole subtree / only toward selected paths
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_LOOKS_FOR_A_RACE = 3  # how often an entry may appear at a name between a look and a create
# What `_make_temp` names an entry, exactly: `.fsmount-restore-<pid space>-<pid>-<16 hex>`, as
# stores/local.py names its temporary files; before, `.fsmount-restore-<16 hex>`, without the writer.
_TEMP_NAME = re.compile(rb"\.fsmount-restore-(?:([0-9a-f]{8}|x)-([1-9][0-9]*)-)?[0-9a-f]{16}")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_FAILURES = (FsmountError, OSError)  # what fails one file; anything else is a bug and stops the restore


@dataclass
class RestoreStats:
    files: int = 0
    dirs: int = 0
    others: int = 0
    bytes_written: int = 0
    blocks_written: int = 0
    blocks_unchanged: int = 0
    deleted: int = 0
    failed: int = 0  # entries not restored (their messages: `RestoreResult.errors`, the first ones)
    skipped: int = 0  # entries in the way, left alone
    duration_ms: int = 0


@dataclass(frozen=True)
class Problem:
    """An entry a restore did not restore (`RestoreResult.errors`) or left alone (`skipped`), and why."""

    path: bytes  # relative to the target, as the snapshot names it
    message: str

    def __str__(self) -> str:
        return f"{shown_name(self.path)}: {self.message}"


@dataclass
class RestoreResult:
    stats: RestoreStats
    errors: list[Problem] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)  # entries in the way, left alone without `delete`
    disk_full: str | None = None  # the target's disk filled (the OS's words): the restore stopped there


class TargetDiskFull(FsmountError):
    """The target's disk filled during a restore, which stopped there (the CLI raises it, with what
    was restored). Storage failed, as when the repository's disk fills (`StoreError`): exit 15,
    never 3, since the restore did not finish."""

    exit_code = 15


class EntryInTheWay(FsmountError):
    """The target has an entry of another type where the snapshot has this one, and replacing it
    would delete data the user did not ask to delete (that is what `delete` is for). The entry is
    skipped, and the restore finishes with warnings."""

    exit_code = 3


class PartlyWritten(FsmountError):
    """Writing a file in place failed after its first block was written (the disk failed, not
    the repository): unlike any other failure, it leaves the file neither old nor restored."""


@dataclass(eq=False)
class _DirJob:
    fd: int
    path: bytes
    nodes: list[Node]
    selection: str
    node: Node | None  # None for the target root, which takes the snapshot's root node (`_finish_root`)
    parent: _DirJob | None
    fresh: bool = False  # made by this restore, so empty: entries need no check before creation
    position: int = 0
    pending: int = 1  # files and directories inside not finished yet, plus one while it is walked


@dataclass(eq=False)
class _OpenFile:
    """A file the walker opened, filled by several tasks; the last one to end finishes it."""

    fd: int
    job: _DirJob
    node: Node
    path: bytes
    compare: bool
    temp: bytes | None = None  # the name it is made under, renamed to node.name once complete
    shared: bool = False  # a local file with other names, compared only: kept if equal, else copied
    pending: int = 1  # tasks not ended yet, plus one while the walker submits them
    failure: Exception | None = None
    end: int = 0  # where the last byte written so far ends
    spill_fd: int | None = None  # in place: fetched blocks wait here until every one has come
    staged: list[int] = field(default_factory=list)  # blocks in the spill file (and holes) to write


@dataclass(eq=False)
class _LinkGroup:
    """A hard-link group of the snapshot: the name restored first, and the other names, which wait
    until it is complete to be linked to it (before, it may still be the local file, or a copy
    under a temporary name)."""

    first: bytes
    restored: bool | None = None  # whether the first name was restored; None until it is finished
    waiting: list[tuple[_DirJob, Node, bytes]] = field(default_factory=list)


@dataclass(eq=False)
class _SmallFile:
    """A file of a small-file batch, opened by the worker that restores the batch."""

    job: _DirJob
    node: Node
    path: bytes
    fd: int
    compare: bool
    temp: bytes | None = None  # as in _OpenFile
    wanted: list[int] = field(default_factory=list)  # blocks to write (to fetch, and holes in place)
    failure: Exception | None = None


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
        self._kept = self._folders_kept()
        self.progress = progress or Progress()
        self.stats = RestoreStats()
        self.errors: list[Problem] = []
        self.skipped: list[Problem] = []
        self._lock = threading.Lock()
        self._block_size = repo.block_size
        scale = 1 if on_local_disk(repo.store) else REMOTE_TASK_SCALE
        self._blocks_per_task = BLOCKS_PER_TASK * scale
        self._bytes_per_task = BYTES_PER_TASK * scale
        self._files_per_task = FILES_PER_TASK * scale
        self._blobs = BlobReader(repo)
        self._workers = ThreadPoolExecutor(workers or _default_workers(repo), thread_name_prefix="restore")
        self._tasks_in_flight = threading.Semaphore(MAX_TASKS_IN_FLIGHT)
        self._files_in_flight = threading.Semaphore(MAX_FILES_IN_FLIGHT)
        self._links: dict[tuple[int, int], _LinkGroup] = {}  # by the snapshot's (dev, ino)
        self._batch: list[tuple[_DirJob, Node, bytes]] = []  # small files not handed out yet
        self._batch_bytes = 0
        self._open: set[_DirJob | _OpenFile] = set()  # what holds an fd, closed at the end if aborted
        self._done = threading.Event()
        self._crash: BaseException | None = None  # an unexpected error in a worker task
        self._disk_full: str | None = None  # set at the first ENOSPC or EDQUOT: nothing more is started

    def run(self) -> RestoreResult:
        started = time.monotonic()
        for path in self.paths:
            self.repo.find_node(self.snapshot, path)  # unknown paths fail before anything is written
        raise_fd_limit()
        try:
            os.makedirs(self.target, exist_ok=True)
            self._root_fd = os.open(self.target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            why = "it is not a folder" if exc.errno in (errno.EEXIST, errno.ENOTDIR) else exc.strerror
            raise UsageError(f"cannot use {shown_name(self.target)} as restore target: {why}") from exc
        if os.fstatvfs(self._root_fd).f_flag & os.ST_RDONLY:  # else every entry fails on its own line
            os.close(self._root_fd)
            raise UsageError(f"cannot use {shown_name(self.target)} as restore target: it is on a "
                             "read-only file system")
        self.progress.start(total_bytes=None if self.paths else self.snapshot.stats.get("size"))
        try:
            root_nodes = self.repo.load_tree(self.snapshot.tree)
            root = _DirJob(self._root_fd, b"", root_nodes, _PARTIAL if self.paths else _ALL, None, None,
                           fresh=not os.listdir(self._root_fd))
            if not root.fresh:
                self._remove_leftovers(root)
            self._walk(root)
            self._done.wait()  # the root's count drops to zero once everything inside is finished
            if self._crash is not None:
                raise self._crash
        finally:
            self._workers.shutdown(wait=True, cancel_futures=True)
            for held in self._open:  # only after an error: tasks that never ran left these open
                os.close(held.fd)
            os.close(self._root_fd)
            self.progress.finish()
        self.stats.duration_ms = int((time.monotonic() - started) * 1000)
        return RestoreResult(self.stats, self.errors, self.skipped, self._disk_full)

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
            if self.delete and job.selection == _ALL and self._disk_full is None:
                self._delete_extra(job)
            if not stack:
                self._submit_batch()
            self._dir_done(job)

    def _visit(self, job: _DirJob, node: Node) -> _DirJob | None:
        if self._disk_full is not None:  # the rest of the snapshot is not restored
            return None
        path = job.path + b"/" + node.name if job.path else node.name
        selection = self._selection(path, job.selection)
        if selection is None:
            return None
        try:
            if node.type == DIR:
                nodes = self.repo.load_tree(node.subtree)
                fd, fresh = self._make_dir(job, node.name)
                self.stats.dirs += 1
                child = _DirJob(fd, path, nodes, selection, node, job, fresh)
                with self._lock:
                    job.pending += 1
                    self._open.add(child)
                if not fresh:
                    self._remove_leftovers(child)
                return child
            if node.type == FILE:
                self._restore_file(job, node, path)
            else:
                self._restore_special(job, node)
        except EntryInTheWay as exc:
            self._skip(path, str(exc))
        except _FAILURES as exc:
            self._failed(path, exc)
        return None

    def _remove_leftovers(self, job: _DirJob) -> None:
        """Remove what a restore killed half-way left in this folder: files, symlinks and special
        files named exactly as `_make_temp` names them, not so named in the snapshot, whose writer
        is gone (another restore into this folder may still be making its own). Done before any
        entry here is restored, so that none of them is this restore's own."""
        in_snapshot = {node.name for node in job.nodes}
        for name in map(os.fsencode, os.listdir(job.fd)):
            temp = _TEMP_NAME.fullmatch(name)
            if not temp or name in in_snapshot:
                continue
            st = os.lstat(name, dir_fd=job.fd)
            if not stat.S_ISDIR(st.st_mode) and _writer_gone(temp, st):
                os.unlink(name, dir_fd=job.fd)

    def _delete_extra(self, job: _DirJob) -> None:
        wanted = {n.name for n in job.nodes}
        for name in os.listdir(job.fd):
            name_b = os.fsencode(name)
            if name_b in wanted or _TEMP_NAME.fullmatch(name_b):
                continue  # a temporary name is a file of this restore still being made (leftovers are gone)
            if self._kept and key_of(os.stat(name_b, dir_fd=job.fd, follow_symlinks=False)) in self._kept:
                continue  # the repository or its cache, or a folder that holds them
            remove_entry(job.fd, name_b)
            self.stats.deleted += 1

    def _folders_kept(self) -> set[tuple[int, int]]:
        """What `delete` must leave however absent from the snapshot (a backup leaves them out): a
        local repository (any replica) and the cache, and every folder between them and the target.
        A target inside one of them is refused (`check_target`)."""
        check_target(self.repo, self.target)
        kept: set[tuple[int, int]] = set()
        target = os.path.realpath(self.target)
        for path in _repository_folders(self.repo):
            while path != target and is_within(path, target):
                try:
                    kept.add(key_of(os.stat(path, follow_symlinks=False)))
                except OSError:
                    pass
                path = os.path.dirname(path)
        return kept

    def _submit(self, fn: Callable[..., None], *args: object) -> None:
        self._tasks_in_flight.acquire()
        try:
            self._workers.submit(fn, *args).add_done_callback(self._task_ended)
        except BaseException:
            self._tasks_in_flight.release()
            raise

    def _task_ended(self, future: Future) -> None:
        if not future.cancelled() and future.exception() is not None:
            self._crash = self._crash or future.exception()
            self._done.set()  # counts may never reach zero now: stop waiting for them

    # -- entries ----------------------------------------------------------------------------------

    def _make_dir(self, job: _DirJob, name: bytes) -> tuple[int, bool]:
        if job.fresh:
            try:
                os.mkdir(name, 0o700, dir_fd=job.fd)
                return open_dir(job.fd, name), True
            except FileExistsError:  # someone else is writing into the target: check from here on
                job.fresh = False
        try:
            self._check_in_the_way(os.lstat(name, dir_fd=job.fd), DIR)
        except FileNotFoundError:
            pass
        return make_dir(job.fd, name), False

    def _check_in_the_way(self, st: os.stat_result, node_type: str) -> None:
        """Refuse, unless `delete`, to replace a local entry whose removal would delete data: a
        directory where the snapshot has anything else, or a regular file where it has a directory
        or a special file. A symlink, fifo, socket or device in the way holds no data and is replaced."""
        if self.delete:
            return
        if stat.S_ISDIR(st.st_mode):
            if node_type != DIR:
                raise EntryInTheWay(f"a directory is where the snapshot has a {_KIND[node_type]}; "
                                    "left as it is (--delete replaces it)")
        elif stat.S_ISREG(st.st_mode) and node_type != FILE:
            raise EntryInTheWay(f"a file is where the snapshot has a {_KIND[node_type]}; "
                                "left as it is (--delete replaces it)")

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
        if st is not None:
            self._check_in_the_way(st, node.type)
        if node.type in (CHARDEV, BLOCKDEV) and not IS_ROOT:
            self._error(job.path + b"/" + node.name, "device files can only be restored as root")
            return
        if st is None:
            _make_special(job.fd, node, node.name)
            apply_metadata(job.fd, node)
        elif _special_matches(job.fd, node, st):
            apply_metadata(job.fd, node)
        else:
            self._replace_with_special(job.fd, node, st)
        self.stats.others += 1

    def _replace_with_special(self, dir_fd: int, node: Node, st: os.stat_result) -> None:
        """Make the special file under a temporary name, with its metadata, and rename it over the
        entry there only then: a failure (a full disk) leaves that entry as it was. A directory
        in the way (with `delete`) cannot be renamed over, and is removed first."""
        if stat.S_ISDIR(st.st_mode):
            self._replace(dir_fd, node.name)
        temp = _make_temp(lambda name: _make_special(dir_fd, node, name))
        try:
            apply_metadata(dir_fd, dataclasses.replace(node, name=temp))
            os.rename(temp, node.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            os.unlink(temp, dir_fd=dir_fd)
            raise

    def _restore_file(self, job: _DirJob, node: Node, path: bytes) -> None:
        group = (node.dev, node.ino)
        if node.is_hardlinked:
            if self._link_later(job, node, path, group):
                return
        elif node.block_count <= self._blocks_per_task:
            self._batch.append((job, node, path))
            with self._lock:
                job.pending += 1
            self._batch_bytes += node.size
            if self._batch_bytes >= self._bytes_per_task or len(self._batch) >= self._files_per_task:
                self._submit_batch()
            return
        self._files_in_flight.acquire()
        try:
            fd, compare, temp = self._open_file(job, node)
        except BaseException:
            self._files_in_flight.release()
            raise
        shared = compare and node.is_hardlinked and os.fstat(fd).st_nlink > 1
        if node.is_hardlinked:
            with self._lock:
                self._links[group] = _LinkGroup(path)
        opened = _OpenFile(fd, job, node, path, compare, temp, shared)
        with self._lock:
            job.pending += 1
            self._open.add(opened)
        try:
            step = self._blocks_per_task
            for first in range(0, node.block_count, step):
                with self._lock:
                    opened.pending += 1
                try:
                    self._submit(self._restore_part, opened, first, min(first + step, node.block_count))
                except BaseException:
                    with self._lock:
                        opened.pending -= 1
                    raise
        finally:
            self._part_done(opened)

    def _link_later(self, job: _DirJob, node: Node, path: bytes, group: tuple[int, int]) -> bool:
        """Whether `node` is another name of a hard-link group already begun: it is linked to the
        first name once that is complete (at once if it is)."""
        with self._lock:
            links = self._links.get(group)
            if links is None:
                return False
            job.pending += 1
            if links.restored is None:
                links.waiting.append((job, node, path))
                return True
        self._link_name(job, node, path, links)
        return True

    def _group_finished(self, node: Node, restored: bool) -> None:
        with self._lock:
            links = self._links[(node.dev, node.ino)]
            links.restored = restored
            waiting, links.waiting = links.waiting, []
        for job, name_node, path in waiting:
            self._link_name(job, name_node, path, links)

    def _link_name(self, job: _DirJob, node: Node, path: bytes, links: _LinkGroup) -> None:
        """Link one more name of a group to its first name, reported as `_visit` reports an entry."""
        try:
            if links.restored:
                self._link(job, node, links.first)
            elif self._disk_full is None:
                self._error(path, f"not restored: its hard link {shown_name(links.first)} was not")
        except EntryInTheWay as exc:
            self._skip(path, str(exc))
        except _FAILURES as exc:
            self._failed(path, exc)
        finally:
            self._dir_done(job)

    def _link(self, job: _DirJob, node: Node, first: bytes) -> None:
        name = node.name
        try:
            st = os.lstat(name, dir_fd=job.fd)
        except FileNotFoundError:
            st = None
        if st is not None:
            if st.st_ino == os.lstat(first, dir_fd=self._root_fd).st_ino:
                return  # already this link
            self._check_in_the_way(st, FILE)
            self._replace(job.fd, name)
        os.link(first, name, src_dir_fd=self._root_fd, dst_dir_fd=job.fd, follow_symlinks=False)
        self._restored_file()

    def _open_file(self, job: _DirJob, node: Node) -> tuple[int, bool, bytes | None]:
        """An fd to write the file's content into, whether it has old content to compare, and the
        temporary name it is made under if it is to replace another entry once complete.

        In place means in the same inode, for a file with no other name: only the blocks that
        differ are written (a large file's delta stays a delta, and programs holding it open, or
        a live mount tracking it, keep the same file). A file with other hard links is not written
        through, since that would change its other names too, perhaps outside the target: it is
        made anew under a temporary name and renamed over it, as is a file replacing a symlink or
        special file, so that a failure leaves the entry there as it was. A directory in the way
        can only be removed first (`delete`), and a snapshot's hard-linked file is made under its
        own name, since its other names are linked to it at once."""
        if job.fresh:
            try:
                return os.open(node.name, _CREATE, 0o600, dir_fd=job.fd), False, None
            except FileExistsError:
                pass
        for _ in range(_LOOKS_FOR_A_RACE):
            try:
                return self._open_looked_up(job, node)
            except FileExistsError:  # another restore into the target made it after our look: look again
                pass
        return self._open_looked_up(job, node)

    def _open_looked_up(self, job: _DirJob, node: Node) -> tuple[int, bool, bytes | None]:
        """`_open_file` for what is at the name now; FileExistsError if an entry appears there
        between the look and the open."""
        name, dir_fd = node.name, job.fd
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            st = None
        regular = st is not None and stat.S_ISREG(st.st_mode)
        if regular and st.st_nlink == 1:
            return os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd), True, None
        if regular and node.is_hardlinked:  # only read: kept if it matches, else copied (`_settle_shared`)
            return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd), True, None
        if st is None:
            return os.open(name, _CREATE, 0o600, dir_fd=dir_fd), False, None
        self._check_in_the_way(st, FILE)
        if stat.S_ISDIR(st.st_mode):
            self._replace(dir_fd, name)
            return os.open(name, _CREATE, 0o600, dir_fd=dir_fd), False, None
        fd, temp = _create_temp(dir_fd)
        return fd, False, temp

    def _submit_batch(self) -> None:
        if self._batch:
            batch, self._batch, self._batch_bytes = self._batch, [], 0
            self._submit(self._restore_small_files, batch)

    # -- worker tasks -----------------------------------------------------------------------------

    def _restore_small_files(self, batch: list[tuple[_DirJob, Node, bytes]]) -> None:
        """Create and fill a batch of small files, their blocks fetched together."""
        opened: list[_SmallFile] = []
        finished = 0  # files of `opened` handed to _finish_file, which closes them
        try:
            for job, node, path in batch:
                if self._disk_full is not None:
                    self._dir_done(job)
                    continue
                try:
                    fd, compare, temp = self._open_file(job, node)
                except EntryInTheWay as exc:
                    self._skip(path, str(exc))
                    self._dir_done(job)
                    continue
                except _FAILURES as exc:
                    self._failed(path, exc)
                    self._dir_done(job)
                    continue
                opened.append(_SmallFile(job, node, path, fd, compare, temp))
            for small in opened:
                try:
                    small.wanted = self._blocks_to_fetch(small.fd, small.node, 0, small.node.block_count,
                                                         small.compare)
                except _FAILURES as exc:
                    small.failure = exc
            wanted_ids = [small.node.block_id(i) for small in opened for i in small.wanted
                          if small.node.block_id(i) != HOLE]
            try:
                fetched = self._blobs.fetch(DATA_BLOB, wanted_ids) if wanted_ids else {}
            except _FAILURES as exc:  # the store failed as a whole: every file of the batch fails
                fetched = dict.fromkeys(wanted_ids, exc)
            for small in opened:
                end = 0
                if small.failure is None and self._disk_full is not None:
                    small.failure = _STOPPED
                if small.failure is None:
                    try:
                        end = self._write_blocks(small.fd, small.node, small.wanted, fetched, small.compare)
                    except _FAILURES as exc:
                        small.failure = exc
                finished += 1
                self._finish_file(small.fd, small.job, small.node, small.path, small.failure,
                                  created=not small.compare, size_reached=end == small.node.size,
                                  temp=small.temp)
        finally:
            for small in opened[finished:]:  # only after a bug: the restore stops, fds must not leak
                os.close(small.fd)
            self._tasks_in_flight.release()

    def _restore_part(self, opened: _OpenFile, first: int, last: int) -> None:
        """Blocks [first, last) of a file the walker opened. In place they are only staged: the
        task that finishes the file writes them, once every block has come and been checked."""
        try:
            if self._disk_full is not None:
                with self._lock:
                    opened.failure = opened.failure or _STOPPED
            if opened.failure is not None:
                return  # another part failed: the file is not restored, nothing more to fetch
            node, fd = opened.node, opened.fd
            wanted = self._blocks_to_fetch(fd, node, first, last, opened.compare)
            ids = [node.block_id(i) for i in wanted if node.block_id(i) != HOLE]
            fetched = self._blobs.fetch(DATA_BLOB, ids) if ids else {}
            if opened.compare:
                self._stage_blocks(opened, wanted, fetched)
            else:
                end = self._write_blocks(fd, node, wanted, fetched, False)
                with self._lock:
                    opened.end = max(opened.end, end)
        except _FAILURES as exc:
            with self._lock:
                opened.failure = opened.failure or exc
        finally:
            self._tasks_in_flight.release()
            self._part_done(opened)

    def _blocks_to_fetch(self, fd: int, node: Node, first: int, last: int, compare: bool) -> list[int]:
        """Of blocks [first, last), those to write: not holes (which a new file leaves unwritten,
        but a file in place must be zeroed at) and, in place, not already equal. Nothing is
        written here, so that a file in place stays as it was until every block has come."""
        wanted: list[int] = []
        done_bytes = unchanged = 0
        for i in range(first, last):
            offset = i * self._block_size
            length = min(self._block_size, node.size - offset)
            if compare:
                local = os.pread(fd, length, offset)
                if len(local) == length and xxhash.xxh3_128_digest(local) == node.block_xxh(i):
                    unchanged += 1
                    done_bytes += length
                    continue
            if node.block_id(i) == HOLE:
                if compare:
                    wanted.append(i)
                done_bytes += length
                continue
            wanted.append(i)
        if unchanged:
            with self._lock:
                self.stats.blocks_unchanged += unchanged
        if done_bytes:
            self.progress.advance(nbytes=done_bytes)
        return wanted

    def _write_blocks(self, fd: int, node: Node, wanted: list[int], fetched: dict, compare: bool) -> int:
        """Write the blocks `wanted` (fetched ones, and in place holes as zeros), every one checked
        before the first is written; returns where the last byte written ends (0: none)."""
        self._check_fetched(node, wanted, fetched)
        if compare:
            _reserve(fd, self._block_size, node.size, wanted)
        written = end = blocks = 0
        try:
            for i in wanted:
                offset = i * self._block_size
                length = min(self._block_size, node.size - offset)
                if node.block_id(i) == HOLE:  # only in place: progress counted it already
                    _pwrite_all(fd, bytes(length), offset)
                    end = offset + length
                    continue
                data = fetched[node.block_id(i)]
                if compare:
                    _pwrite_all(fd, data, offset)
                    end = offset + length
                else:
                    end = max(end, _write_skipping_zero_pages(fd, data, offset))
                written += length
                blocks += 1
        except OSError as exc:
            if compare and (blocks or end):
                raise PartlyWritten(f"{_message(exc)} while writing it; partly restored, restore it again") from exc
            raise
        if blocks:
            self._count_written(blocks, written)
            self.progress.advance(nbytes=written)
        return end

    def _check_fetched(self, node: Node, wanted: list[int], fetched: dict) -> None:
        """Raise the failure of any block of `wanted` (unreadable, failing authentication, of the
        wrong size), before anything of the file is written."""
        for i in wanted:
            if node.block_id(i) == HOLE:
                continue
            data = fetched[node.block_id(i)]
            if isinstance(data, Exception):
                raise data
            length = min(self._block_size, node.size - i * self._block_size)
            if len(data) != length:
                raise FsmountError(f"block {i} has {len(data)} bytes, the snapshot says {length}")

    def _count_written(self, blocks: int, nbytes: int) -> None:
        with self._lock:
            self.stats.blocks_written += blocks
            self.stats.bytes_written += nbytes

    def _stage_blocks(self, opened: _OpenFile, wanted: list[int], fetched: dict) -> None:
        """Keep a part's checked blocks of a file in place in its spill file, at their own offsets,
        until the last part has come. The spill file is unlinked, in the file's own folder (so on
        its file system: the copy back is a copy_file_range, a reflink where the file system can),
        and holds only the blocks that differ: memory stays bounded however large the file."""
        self._check_fetched(opened.node, wanted, fetched)
        data_blocks = [i for i in wanted if opened.node.block_id(i) != HOLE]
        staged = 0
        if data_blocks:
            spill_fd = self._spill_of(opened)
            for i in data_blocks:
                data = fetched[opened.node.block_id(i)]
                _pwrite_all(spill_fd, data, i * self._block_size)
                staged += len(data)
        with self._lock:
            opened.staged.extend(wanted)
        if staged:
            self.progress.advance(nbytes=staged)

    def _spill_of(self, opened: _OpenFile) -> int:
        with self._lock:
            if opened.spill_fd is None:
                opened.spill_fd = _open_spill(opened.job.fd)
            return opened.spill_fd

    def _write_staged(self, opened: _OpenFile) -> None:
        """Every part of a file in place has come and been checked: write the staged blocks into it,
        each run of adjacent ones in one copy from the spill file."""
        node, fd, size = opened.node, opened.fd, self._block_size
        blocks = written = 0
        data_blocks = []
        for i in sorted(opened.staged):
            if node.block_id(i) == HOLE:
                _pwrite_all(fd, bytes(min(size, node.size - i * size)), i * size)
            else:
                data_blocks.append(i)
        for first, last in _runs(data_blocks):
            offset = first * size
            length = min(last * size, node.size) - offset
            assert opened.spill_fd is not None
            _copy_range(opened.spill_fd, fd, offset, length)
            blocks += last - first
            written += length
        if blocks:
            self._count_written(blocks, written)

    # -- finishing --------------------------------------------------------------------------------

    def _part_done(self, opened: _OpenFile) -> None:
        with self._lock:
            opened.pending -= 1
            if opened.pending:
                return
            self._open.discard(opened)
        failure = opened.failure
        untouched = False
        if failure is None and not opened.shared and opened.staged:
            try:
                _reserve(opened.fd, self._block_size, opened.node.size, opened.staged)
            except _FAILURES as exc:  # nothing written yet: the file is as it was
                failure = exc
        try:
            if failure is None and opened.shared:
                untouched = self._settle_shared(opened)
            elif failure is None and opened.staged:
                self._write_staged(opened)
        except _FAILURES as exc:  # past the first write: the file is partly restored, and says so
            failure = exc if opened.shared else PartlyWritten(
                f"{_message(exc)} while writing it; partly restored, restore it again")
        finally:
            if opened.spill_fd is not None:
                os.close(opened.spill_fd)
        try:
            restored = self._finish_file(opened.fd, opened.job, opened.node, opened.path, failure,
                                         created=not opened.compare, size_reached=opened.end == opened.node.size,
                                         temp=opened.temp, untouched=untouched)
        finally:
            self._files_in_flight.release()
        if opened.node.is_hardlinked:
            self._group_finished(opened.node, restored)

    def _settle_shared(self, opened: _OpenFile) -> bool:
        """A local file with other names, compared with a hard-linked file of the snapshot: whether
        it already matches (content and metadata), and is kept as it is. If not, it must not be
        written through (its other names, perhaps outside the target, would change too): a copy
        of it under a temporary name takes the blocks that differ, and is renamed over it."""
        if not opened.staged and _metadata_matches(opened.fd, opened.node):
            return True
        fd, temp = _create_temp(opened.job.fd)
        try:
            _copy_range(opened.fd, fd, 0, min(os.fstat(opened.fd).st_size, opened.node.size))
        except BaseException:
            os.close(fd)
            os.unlink(temp, dir_fd=opened.job.fd)
            raise
        os.close(opened.fd)
        opened.fd, opened.temp, opened.compare = fd, temp, False  # from now on a new file, as any other
        if opened.staged:
            self._write_staged(opened)
        return False

    def _finish_file(self, fd: int, job: _DirJob, node: Node, path: bytes, failure: Exception | None,
                     created: bool, size_reached: bool = False, temp: bytes | None = None,
                     untouched: bool = False) -> bool:
        """Truncate, set metadata, close; or report the failure and remove a half-made copy.
        A new file whose last byte was written has its size already and is not truncated; one
        made under a temporary name takes its own name only now, complete; one `untouched`
        matched already. Returns whether the file is restored."""
        try:
            if untouched:
                self._restored_file()
                return True
            if failure is not None:
                kept = " (not restored)" if created and temp is None else " (left as it was)"
                self._failed(path, failure, kept)
                if created:
                    os.unlink(temp or node.name, dir_fd=job.fd)
                return False
            if not (created and size_reached):
                os.ftruncate(fd, node.size)
            if temp is not None:
                os.rename(temp, node.name, src_dir_fd=job.fd, dst_dir_fd=job.fd)
            apply_metadata(job.fd, node, fd, replace_xattrs=not created)
            self._restored_file()
            return True
        except OSError as exc:
            self._failed(path, exc)
            return False
        finally:
            os.close(fd)
            self._dir_done(job)

    def _dir_done(self, job: _DirJob | None) -> None:
        """One thing inside `job` is finished; the last one finishes the directory, and so upward."""
        while job is not None:
            with self._lock:
                job.pending -= 1
                if job.pending:
                    return
                self._open.discard(job)
            if job.parent is None:  # the target root: last of all, as any directory
                self._finish_root()
                self._done.set()
                return
            try:
                assert job.node is not None
                apply_metadata(job.parent.fd, job.node, job.fd, replace_xattrs=True)
            except OSError as exc:
                self._failed(job.path, exc)
            finally:
                os.close(job.fd)
            job = job.parent

    def _finish_root(self) -> None:
        """Give the target folder the source folder's own metadata (mode, owner as root, xattrs,
        times), as a directory of the snapshot gets its node's: a folder backed up as 0700
        must not come back readable by all. Snapshots from before `Snapshot.root` have none, and
        the target keeps its own then."""
        root = self.snapshot.root
        if root is None:
            return
        try:
            apply_metadata(self._root_fd, dataclasses.replace(root, name=b"."), self._root_fd, replace_xattrs=True)
        except OSError as exc:
            self._failed(self.target, exc)

    def _failed(self, path: bytes, exc: Exception, kept: str = "") -> None:
        """Report why an entry was not restored (`kept`: what became of it), unless the disk is
        full: every entry after would fail alike, and the restore stops instead (`disk_full`). A
        file partly written is a loss of its own, and is reported whatever the cause."""
        if _fills_disk(exc) and not isinstance(exc, PartlyWritten):
            with self._lock:
                if self._disk_full is None:
                    self._disk_full = _message(exc)
                    log.info("%s: %s; the restore stops", shown_name(path), self._disk_full)
        elif isinstance(exc, PartlyWritten):
            self._error(path, str(exc))
        else:
            self._error(path, _message(exc) + kept)

    def _error(self, path: bytes, message: str) -> None:
        with self._lock:
            self.stats.failed += 1
            self._report(self.errors, self.stats.failed, Problem(path, message), logging.ERROR)

    def _skip(self, path: bytes, message: str) -> None:
        with self._lock:
            self.stats.skipped += 1
            self._report(self.skipped, self.stats.skipped, Problem(path, message), logging.WARNING)

    def _restored_file(self) -> None:
        """One more file (or hard link) restored whole: `stats.files` counts no failed nor skipped one."""
        with self._lock:
            self.stats.files += 1

    def _report(self, kept: list[Problem], count: int, problem: Problem, level: int) -> None:
        """Log and keep the first problems of a kind; count the rest. On a full disk every file
        after the first failed and said so, 3,249 lines for a small folder."""
        if count <= MAX_MESSAGES_KEPT:
            kept.append(problem)
        if count <= MAX_MESSAGES_SHOWN:
            log.log(level, "%s: %s", shown_name(problem.path), problem.message)
        elif count == MAX_MESSAGES_SHOWN + 1:
            log.log(level, "more of these are not shown one by one; the summary counts them")


MAX_MESSAGES_SHOWN = 20  # failures (and skips) logged one by one; the rest are counted
MAX_MESSAGES_KEPT = 1000  # of them kept in RestoreResult, whatever the restore's size

_KIND = {DIR: "directory", FILE: "file", SYMLINK: "symlink", FIFO: "fifo", CHARDEV: "device",
         BLOCKDEV: "device", SOCKET: "socket"}


def check_target(repo: Repository, target: bytes) -> None:
    """Refuse a target that is a local repository (any replica) or the cache, or lies inside one:
    the restore would write among its objects. The CLI checks it before it looks for a snapshot,
    so that a target among the repository's objects is what the user hears about first."""
    real = os.path.realpath(os.path.abspath(target))
    for folder in _repository_folders(repo):
        if is_within(real, folder):
            raise UsageError(f"cannot restore into {shown_name(os.path.abspath(target))}: it is "
                             f"{shown_name(folder)} (the repository or its cache) or inside it")


def _repository_folders(repo: Repository) -> list[bytes]:
    """The real paths of a local repository (each replica) and of the cache."""
    return [os.path.realpath(os.fsencode(folder)) for folder in (*local_folders(repo.store), repo.cache_dir)
            if folder]


def _metadata_matches(fd: int, node: Node) -> bool:
    """Whether the open file has the size, mode, owner (as root), mtime and xattrs of `node`."""
    st = os.fstat(fd)
    owner_matches = not IS_ROOT or (st.st_uid, st.st_gid) == (node.uid, node.gid)
    return (st.st_size == node.size and stat.S_IMODE(st.st_mode) == node.mode and owner_matches
            and st.st_mtime_ns == node.mtime_ns and read_xattrs(fd) == node.xattrs)


def _writer_gone(temp: re.Match[bytes], st: os.stat_result) -> bool:
    """Whether the restore that made the temporary file `temp` has ended (`writer_gone`). A name
    without a writer is an older fsmount's, from before restores named it: removed, as those were."""
    space, pid = temp.group(1), temp.group(2)
    return pid is None or writer_gone(space.decode(), pid.decode(), st.st_mtime)


def _special_matches(dir_fd: int, node: Node, st: os.stat_result) -> bool:
    """Whether the entry `st` already is the snapshot's special file `node`, and is kept: a symlink
    to the same target, or a fifo or socket (as `cp -a` does, a socket keeps its file: nothing
    listens on it until its program binds it again, and one already there may be in use). A
    device is always made anew."""
    if node.type == SYMLINK:
        return stat.S_ISLNK(st.st_mode) and os.readlink(node.name, dir_fd=dir_fd) == node.target
    if node.type == FIFO:
        return stat.S_ISFIFO(st.st_mode)
    return node.type == SOCKET and stat.S_ISSOCK(st.st_mode)


def _make_special(dir_fd: int, node: Node, name: bytes) -> None:
    """Make the symlink, fifo, socket or device `node` as `name` in `dir_fd` (mode 0600 until its
    metadata is applied)."""
    if node.type == SYMLINK:
        os.symlink(node.target, name, dir_fd=dir_fd)
    elif node.type == FIFO:
        os.mkfifo(name, 0o600, dir_fd=dir_fd)
    elif node.type == SOCKET:
        os.mknod(name, stat.S_IFSOCK | 0o600, dir_fd=dir_fd)
    else:
        kind = stat.S_IFCHR if node.type == CHARDEV else stat.S_IFBLK
        os.mknod(name, kind | 0o600, node.rdev, dir_fd=dir_fd)


def _create_temp(dir_fd: int) -> tuple[int, bytes]:
    """A new file in `dir_fd` under a temporary name, for an entry to be renamed over once complete.
    A restore killed before the rename leaves it; the next one removes it (`_remove_leftovers`)."""
    fd = -1

    def create(temp: bytes) -> None:
        nonlocal fd
        fd = os.open(temp, _CREATE, 0o600, dir_fd=dir_fd)

    temp = _make_temp(create)
    return fd, temp


def _make_temp(make: Callable[[bytes], None]) -> bytes:
    """The temporary name (`_TEMP_NAME`) under which `make` made an entry, trying another name if
    one is taken."""
    writer = temp_writer().encode()
    while True:
        temp = b".fsmount-restore-" + writer + os.urandom(8).hex().encode()
        try:
            make(temp)
            return temp
        except FileExistsError:
            continue


def _open_spill(dir_fd: int) -> int:
    """An unlinked file for blocks waiting to be written: in the folder `dir_fd` (O_TMPFILE), or
    where that cannot be (no O_TMPFILE there, a folder we may not write to), in the temporary
    folder, never under a name in the user's folder."""
    try:
        return os.open(b".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError:
        fd, name = tempfile.mkstemp(prefix="fsmount-spill-")
        os.unlink(name)
        return fd


def _fills_disk(exc: BaseException | None) -> bool:
    """Whether `exc`, or what caused it, is a full disk (or an exhausted quota)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return True
        exc = exc.__cause__
    return False


_STOPPED = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a file begun before the disk filled fails with


def _reserve(fd: int, block_size: int, size: int, blocks: list[int]) -> None:
    """Allocate the space the blocks about to be written into a file in place take, before the
    first one is: on a full disk the file then fails as it was, not partly written. A reservation
    past the end grows the file, which gets its size back if one fails. Where a file system
    cannot reserve, the writes find out."""
    old_size = os.fstat(fd).st_size
    try:
        for first, last in _runs(sorted(blocks)):
            offset = first * block_size
            os.posix_fallocate(fd, offset, min(last * block_size, size) - offset)
    except OSError as exc:
        os.ftruncate(fd, old_size)
        if exc.errno in _DISK_FULL:
            raise


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted block indices as [first, last) runs of adjacent ones."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Copy [offset, offset + length) of one file to the same offsets of another, in the kernel
    where it can (copy_file_range), else through a buffer."""
    end = offset + length
    while offset < end:
        try:
            copied = os.copy_file_range(src_fd, dst_fd, end - offset, offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            copied = 0
        if copied <= 0:  # no kernel copy here (or a short source): through a buffer instead
            data = os.pread(src_fd, min(end - offset, 1 << 20), offset)
            if not data:
                raise FsmountError(f"the spill file ends at {offset}, {end - offset} bytes early")
            copied = os.pwrite(dst_fd, data, offset)
        offset += copied


def _default_workers(repo: Repository) -> int:
    """One worker per core when the store is a local disk: the work is then CPU (unsealing,
    hashing, file creation), and more threads only fight over the GIL (measured on 2 cores:
    8 workers 3.8 s, 2 workers 2.7 s for 0.5 GiB). A remote store needs requests in flight."""
    cores = os.cpu_count() or 2
    return max(2, cores) if on_local_disk(repo.store) else max(8, 4 * cores)


def _message(exc: Exception) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, FsmountError):
        return exc.strerror or str(exc)
    return str(exc)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of `data` at `offset`. A write that meets a full disk may write part of it and
    say how much; the rest then raises ENOSPC, rather than leaving a file short of its data."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


PAGE = 4096
_ZERO_PAGE = bytes(PAGE)


def _write_skipping_zero_pages(fd: int, data: bytes, offset: int) -> int:
    """Write `data` into a new file, leaving all-zero pages as holes (as the original had them).
    Returns where the last byte written ends (`offset` if all of it was zeros)."""
    if data.find(_ZERO_PAGE) < 0:  # the usual case, checked in C: no page can be all zeros
        _pwrite_all(fd, data, offset)
        return offset + len(data)
    view = memoryview(data)
    run_start = None
    end = offset
    for page in range(0, len(data), PAGE):
        zero = view[page:page + PAGE] == _ZERO_PAGE[: min(PAGE, len(data) - page)]
        if not zero and run_start is None:
            run_start = page
        elif zero and run_start is not None:
            _pwrite_all(fd, view[run_start:page], offset + run_start)
            end = offset + page
            run_start = None
    if run_start is not None:
        _pwrite_all(fd, view[run_start:], offset + run_start)
        end = offset + len(data)
    return end


def restore(repo: Repository, snapshot: Snapshot, target: str | bytes, **options: object) -> RestoreResult:
    """Restore `snapshot` into `target`; see `Restore` for the options."""
    return Restore(repo, snapshot, target, **options).run()  # type: ignore[arg-type]
