"""The live tree: a passthrough over the source folder that records every change in the changelog.

Each handler checks, calls the source through directory fds (live_inodes.py), marks the changelog,
and replies; no SQL and no repository work happen here. Native semantics: created entries belong
to the caller (when mounted by root), the kernel checks permissions (`default_permissions`) and has
already applied the caller's umask (the daemon runs with umask 0), and operations on an open file
go through its descriptor, so a file unlinked while open keeps working.

The mount owns its source while mounted, so the kernel may cache boldly: long entry and attribute
timeouts, the writeback cache, `keep_cache`. Blocking calls run on worker threads so one slow file
does not stall the others: fsync always, writes over 1 MiB, and reads the page cache cannot serve
at once (RWF_NOWAIT tells which).

While a snapshot is being read, `frozen` is its point-in-time view (frozen_view.py), and every
handler that changes the source first tells the view (`_keep_*`), so the snapshot still reads the
folder as it was at its instant.

`MOUNT/.snapshots` is not in the source: it is the read-only snapshot view, hidden from listings.
On a mount that honours setuid bits or devices (live_daemon.honoured_like), it shows neither: what
a snapshot holds comes from the repository, not from the source's file system (SnapshotTree's
`disarmed`).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import math
import os
import stat
import time
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

from backend.source import key_of

from .bare_entries import BareEntries
from .changelog import Changelog
from .frozen_view import FrozenView
from .live_inodes import ROOT, InodeTable

log = logging.getLogger(__name__)

SNAPSHOTS_DIR = b".snapshots"
POSIX_ACL_ACCESS = b"system.posix_acl_access"  # its entries are the mode's bits (see _drop_attributes_if_acl)
TIMEOUT_S = 300.0  # entry/attribute cache: nothing but this mount changes the source
THREAD_THRESHOLD = 256 * 1024  # writes of this size and more go to a worker thread
FALLOCATE_BLOCKS_MARKED = 64  # a larger fallocate marks its file whole (see fallocate)

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
SYNC_FILE_RANGE_WRITE = 2


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def write_and_start_writeback(fd: int, data: bytes, offset: int) -> int:
    """pwrite, then have the kernel start writing those pages to the disk (sync_file_range).

    With the writeback cache a large file reaches the daemon only as the kernel writes it back, and
    the source's pages would then all go to the disk at the file's fsync, after the last of them
    arrived: one after the other. Started as they come, the disk writes overlap the transfer. For
    256 MiB written in 1 MiB writes and fsync'd (the bench's sequential write, timed by hand), the
    fsync went from 0.35-0.48 s to 0.06-0.29 s, the whole from 0.88-0.92 s to 0.59-0.85 s (native
    0.41-0.50 s).
    """
    written = os.pwrite(fd, data, offset)
    _sync_file_range(fd, offset, written, SYNC_FILE_RANGE_WRITE)  # advice only: its errors are fsync's to report
    return written


def renameat2(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int) -> None:
    if _renameat2(old_dir, old, new_dir, new, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _fuse_errors(method: Callable) -> Callable:
    """Turn OSError into the FUSEError the kernel understands, and a bug into EIO for that one
    request: raised out of a handler, it ended pyfuse3's loop and the mount with it (a
    RecursionError in a deep tree left "Transport endpoint is not connected" for everyone)."""

    async def wrapper(self: LiveTree, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(self, *args, **kwargs)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("%s failed (an internal error; the request got EIO)", method.__name__)
            self.changelog.require_full_scan(f"an internal error in {method.__name__}")  # it may have changed the source
            raise pyfuse3.FUSEError(errno.EIO) from None

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper




class _Handle:
    __slots__ = ("entries", "fd", "inode", "write_end")

    def __init__(self, fd: int, inode: int, entries: list | None = None):
        self.fd, self.inode, self.entries = fd, inode, entries
        self.write_end = 0  # where the last write ended: the next one starting there streams on


class LiveTree(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, root_fd: int, changelog: Changelog, snapshots: Any = None):
        super().__init__()
        self.inodes = InodeTable(root_fd)
        self.changelog = changelog
        self.snapshots = snapshots  # the .snapshots view, or None
        self.frozen: FrozenView | None = None  # the running snapshot's view of its instant
        self.as_root = os.geteuid() == 0
        self._own_ids = (os.geteuid(), os.getegid())
        self._handles: dict[int, _Handle] = {}
        self._next_handle = 1
        self.limiter = trio.CapacityLimiter(8)
        self.read_nowait = True  # whether the source answers preadv(RWF_NOWAIT)
        self._read_buffer = bytearray(0)  # see read()
        self._bare = BareEntries() if BareEntries.available else None  # see readdir()

    # -- helpers ----------------------------------------------------------------------------------

    def _attr(self, number: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        # Spelled out: a loop of setattr(getattr()) cost a third of a getattr request's handler.
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = number
        attr.st_mode = st.st_mode
        attr.st_nlink = st.st_nlink
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = st.st_rdev
        attr.st_size = st.st_size
        attr.st_blksize = st.st_blksize
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        attr.entry_timeout = TIMEOUT_S
        attr.attr_timeout = TIMEOUT_S
        return attr

    def _entry(self, parent: int, name: bytes, *, lookup: bool = True) -> pyfuse3.EntryAttributes:
        st = os.lstat(name, dir_fd=self.inodes.dir_fd(parent))
        inode = self.inodes.remember(parent, name, st, lookup=lookup)
        return self._attr(inode.number, st)

    def _stat(self, number: int) -> os.stat_result:
        inode = self.inodes[number]
        if number == ROOT:
            return os.fstat(self.inodes.root_fd)
        if inode.open_fds:
            return os.fstat(next(iter(inode.open_fds)))
        if inode.is_dir:
            fd = self.inodes.cached_dir_fd(number)
            if fd is not None:
                return os.fstat(fd)
        dir_fd, name = self.inodes.where(number)
        return os.lstat(name, dir_fd=dir_fd)

    def _paths(self, number: int) -> list[bytes]:
        paths = self.inodes.paths(number)
        inode = self.inodes[number]
        if not inode.is_dir and paths and inode.nlink > len(paths):
            # a name the kernel never looked up shares this inode: only a rescan finds it
            self.changelog.require_full_scan("a hard-linked file changed through one of its names")
        return paths

    def _owner(self, parent: int, ctx: pyfuse3.RequestContext) -> tuple[int, int]:
        """Owner for a new entry: the caller, or the parent's group in a setgid directory."""
        parent_st = os.fstat(self.inodes.dir_fd(parent))
        gid = parent_st.st_gid if parent_st.st_mode & stat.S_ISGID else ctx.gid
        return ctx.uid, gid

    # Before a change reaches the source, the running snapshot keeps what it still needs of it.

    def _keep_metadata(self, inode: int) -> None:
        record = self.inodes[inode]
        if self.frozen is not None and inode != ROOT and record.names:
            dir_fd, name = self.inodes.where(inode)
            self.frozen.before_metadata(record.key, dir_fd, name)

    def _keep_entries(self, parent: int) -> None:
        """The entries of `parent` are about to change (and with them its times)."""
        if self.frozen is not None:
            self.frozen.before_entries(self.inodes[parent].key, self.inodes.dir_fd(parent))
            self._keep_metadata(parent)

    def _keep_entry(self, parent: int, name: bytes) -> None:
        """The entry `name` of `parent`, if there is one, is about to be moved, replaced or removed."""
        if self.frozen is not None:
            dir_fd = self.inodes.dir_fd(parent)
            try:
                st = os.lstat(name, dir_fd=dir_fd)
            except FileNotFoundError:
                return
            self.frozen.before_move(key_of(st), dir_fd, name)

    async def _in_thread(self, fn: Callable, *args: Any, meanwhile: Callable[[], object] | None = None) -> Any:
        """fn(*args) on a worker thread, at most `limiter`'s tokens at once; `meanwhile()`, if given,
        runs on the event loop while it does.

        trio.lowlevel.start_thread_soon, not trio.to_thread.run_sync: the latter's checkpoints,
        context copy and thread renaming cost about twice the CPU per call (measured 210-290 vs
        115-130 us on these machines), and every fsync pays it. As with to_thread's default, the
        call cannot be abandoned: a cancelled caller waits for it to return.
        """
        try:
            self.limiter.acquire_nowait()
        except trio.WouldBlock:
            await self.limiter.acquire()
        try:
            task, token = trio.lowlevel.current_task(), trio.lowlevel.current_trio_token()
            # The thread's result reaches this task through the loop, so only once it waits below.
            trio.lowlevel.start_thread_soon(
                functools.partial(fn, *args),
                lambda result: token.run_sync_soon(trio.lowlevel.reschedule, task, result))
            try:
                if meanwhile is not None:
                    meanwhile()
            finally:
                result = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
            return result
        finally:
            self.limiter.release()

    def _new_handle(self, fd: int, inode: int, entries: list | None = None) -> int:
        handle = self._next_handle
        self._next_handle += 1
        self._handles[handle] = _Handle(fd, inode, entries)
        if entries is None:
            self.inodes[inode].open_fds.add(fd)
        return handle

    def _is_snapshots(self, parent: int, name: bytes) -> bool:
        return parent == ROOT and name == SNAPSHOTS_DIR and self.snapshots is not None

    # -- lookups and attributes -------------------------------------------------------------------

    @_fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self._is_snapshots(parent_inode, name):
            return await self.snapshots.root_entry()
        if self.snapshots is not None and self.snapshots.owns(parent_inode):
            return await self.snapshots.lookup(parent_inode, name, ctx)
        return self._entry(parent_inode, name)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for number, count in inode_list:
            if self.snapshots is not None and self.snapshots.owns(number):
                await self.snapshots.forget([(number, count)])
            else:
                self.inodes.forget(number, count)

    @_fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.snapshots is not None and self.snapshots.owns(inode):
            return await self.snapshots.getattr(inode, ctx)
        attr = self._attr(inode, self._stat(inode))
        self.inodes[inode].shown(time.monotonic(), entry=False)
        return attr

    @_fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._refuse_snapshots(inode)
        handle = self._handles.get(fh) if fh is not None else None
        record = self.inodes[inode]
        if inode != ROOT and not record.names and not record.open_fds:
            # Unlinked and closed: the kernel is only writing back cached times. Nothing to keep.
            return attr
        if fields.update_size:
            if handle is not None:
                if self.frozen is not None:
                    self.frozen.before_truncate(record.key, handle.fd, attr.st_size)
                os.ftruncate(handle.fd, attr.st_size)
            else:
                dir_fd, name = self.inodes.where(inode)
                # read and write, so the running snapshot can keep the blocks it is about to lose
                try:
                    fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                except PermissionError:
                    fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    if self.frozen is not None:
                        self.frozen.before_truncate(record.key, fd, attr.st_size)
                    os.ftruncate(fd, attr.st_size)
                finally:
                    os.close(fd)
            for path in self._paths(inode):
                self.changelog.mark_truncated(path)
        if fields.update_mode or fields.update_uid or fields.update_gid or fields.update_atime or fields.update_mtime:
            self._keep_metadata(inode)
            self._set_metadata(inode, attr, fields, handle)
            for path in self._paths(inode):
                self.changelog.mark_metadata(path)
        reply = self._attr(inode, self._stat(inode))
        record.shown(time.monotonic(), entry=False)
        return reply

    def _set_metadata(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      handle: _Handle | None) -> None:
        record = self.inodes[inode]
        fd = handle.fd if handle is not None and handle.fd >= 0 else None  # the writeback cache's time updates come with one
        if fd is None and inode != ROOT and not record.names:
            fd = next(iter(record.open_fds))  # unlinked while open (a temporary file): only its fds reach it
        if fd is None:
            dir_fd, name = self.inodes.where(inode)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if fd is not None:
                os.fchown(fd, uid, gid)
            else:
                os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        if fields.update_mode:
            if fd is not None:
                os.fchmod(fd, stat.S_IMODE(attr.st_mode))
            else:
                os.chmod(b"/proc/self/fd/%d/%s" % (dir_fd, name), stat.S_IMODE(attr.st_mode))
        if fields.update_atime or fields.update_mtime:
            current = self._stat(inode)
            atime = attr.st_atime_ns if fields.update_atime else current.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns
            if fd is not None:
                os.utime(fd, ns=(atime, mtime))
            else:
                os.utime(name, ns=(atime, mtime), dir_fd=dir_fd, follow_symlinks=False)

    def _refuse_snapshots(self, inode: int) -> None:
        if self.snapshots is not None and self.snapshots.owns(inode):
            raise pyfuse3.FUSEError(errno.EROFS)

    @_fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        if self.snapshots is not None and self.snapshots.owns(inode):
            return await self.snapshots.readlink(inode, ctx)
        dir_fd, name = self.inodes.where(inode)
        return os.readlink(name, dir_fd=dir_fd)

    @_fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(f"/proc/self/fd/{self.inodes.root_fd}")
        data = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                     "f_favail", "f_namemax"):
            setattr(data, name, getattr(st, name))
        return data

    # -- directories ------------------------------------------------------------------------------

    @_fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if self.snapshots is not None and self.snapshots.owns(inode):
            return await self.snapshots.opendir(inode, ctx)
        fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.inodes.dir_fd(inode))
        try:
            names = sorted(os.fsencode(n) for n in os.listdir(fd))
        finally:
            os.close(fd)
        if inode == ROOT:
            names = [n for n in names if n != SNAPSHOTS_DIR]
        return self._new_handle(-1, inode, [b".", b"..", *names])

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._handles.get(fh)
        if handle is None and self.snapshots is not None:
            return await self.snapshots.readdir(fh, start_id, token)
        assert handle is not None and handle.entries is not None
        # _entry() spelled out: this loop runs once per name of every listing (a stat walk).
        # A file whose entry and attributes the kernel was given lately, and still holds, goes bare,
        # unstatted (bare_entries.py), and the kernel takes no lookup reference for it. Directories
        # always come with attributes: the kernel drops those of a directory at every change in it.
        entries, parent, dir_fd, bare = handle.entries, handle.inode, None, self._bare
        now = time.monotonic()
        shown_since = now - TIMEOUT_S / 2 if bare is not None else math.inf
        for index in range(start_id, len(entries)):
            name = entries[index]
            try:
                if index < 2:  # "." and "..": the kernel takes no lookup reference for these
                    if not pyfuse3.readdir_reply(token, name, self._attr(parent, self._stat(parent)), index + 1):
                        break
                    continue
                known = self.inodes.known(parent, name)
                if (known is not None and known.entry_shown_at > shown_since and known.attrs_shown_at > shown_since
                        and known.file_type != stat.S_IFDIR):
                    if not pyfuse3.readdir_reply(token, name, bare.entry(known.number, known.file_type), index + 1):
                        break
                    continue
                if dir_fd is None:
                    dir_fd = self.inodes.dir_fd(parent)
                st = os.lstat(name, dir_fd=dir_fd)
            except FileNotFoundError:
                continue
            inode = self.inodes.remember(parent, name, st, lookup=False)
            if not pyfuse3.readdir_reply(token, name, self._attr(inode.number, st), index + 1):
                break
            inode.lookups += 1
            inode.shown(now)

    async def releasedir(self, fh: int) -> None:
        if self._handles.pop(fh, None) is None and self.snapshots is not None:
            await self.snapshots.releasedir(fh)

    @_fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self._is_snapshots(parent_inode, name):
            raise pyfuse3.FUSEError(errno.EEXIST)
        if self.snapshots is not None and self.snapshots.owns(parent_inode):
            return await self.snapshots.mkdir(parent_inode, name, mode, ctx)
        dir_fd = self.inodes.dir_fd(parent_inode)
        self._keep_entries(parent_inode)
        os.mkdir(name, mode, dir_fd=dir_fd)
        self._chown_new(parent_inode, dir_fd, name, ctx)
        self.changelog.mark_created(self.inodes.path_of(parent_inode, name))
        return self._entry(parent_inode, name)

    def _made_for_another(self, ctx: pyfuse3.RequestContext) -> bool:
        """Whether an entry the caller creates must be given to the caller after we make it."""
        return self.as_root and (ctx.uid, ctx.gid) != self._own_ids

    def _first_mode(self, mode: int, ctx: pyfuse3.RequestContext) -> int:
        """The mode a new file is made with: without setuid and setgid bits if it is made for
        another user, which it gets once it is theirs (_chown_new). It is never a setuid file of
        ours, not even for an instant, and the chown would have cleared them anyway (natively a
        file created with mode 6755 has them)."""
        return mode & ~(stat.S_ISUID | stat.S_ISGID) if self._made_for_another(ctx) else mode

    def _chown_new(self, parent: int, dir_fd: int, name: bytes, ctx: pyfuse3.RequestContext,
                   fd: int | None = None, mode: int = 0) -> None:
        if not self._made_for_another(ctx):
            return  # the kernel gave it our ids (or a setgid parent's group), as it would the caller's
        uid, gid = self._owner(parent, ctx)
        if fd is not None:
            os.fchown(fd, uid, gid)
        else:
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        privileges = mode & (stat.S_ISUID | stat.S_ISGID)
        if privileges and not stat.S_ISDIR(mode):  # the kernel has dropped what the caller may not set
            target: int | bytes = fd if fd is not None else b"/proc/self/fd/%d/%s" % (dir_fd, name)
            os.chmod(target, stat.S_IMODE(mode))

    @_fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._refuse_snapshots(parent_inode)
        if self._is_snapshots(parent_inode, name):
            raise pyfuse3.FUSEError(errno.EROFS)
        path = self.inodes.path_of(parent_inode, name)
        self._keep_entries(parent_inode)
        self._keep_entry(parent_inode, name)
        os.rmdir(name, dir_fd=self.inodes.dir_fd(parent_inode))
        self.inodes.unlinked(parent_inode, name)
        self.changelog.mark_removed(path, is_dir=True)

    # -- names ------------------------------------------------------------------------------------

    @_fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._refuse_snapshots(parent_inode)
        path = self.inodes.path_of(parent_inode, name)
        self._keep_entries(parent_inode)
        self._keep_entry(parent_inode, name)
        os.unlink(name, dir_fd=self.inodes.dir_fd(parent_inode))
        self.inodes.unlinked(parent_inode, name)
        self.changelog.mark_removed(path)

    @_fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        for parent, name in ((parent_inode_old, name_old), (parent_inode_new, name_new)):
            self._refuse_snapshots(parent)
            if self._is_snapshots(parent, name):
                raise pyfuse3.FUSEError(errno.EROFS)
        old_path = self.inodes.path_of(parent_inode_old, name_old)
        new_path = self.inodes.path_of(parent_inode_new, name_new)
        for parent, name in ((parent_inode_old, name_old), (parent_inode_new, name_new)):
            self._keep_entries(parent)
            self._keep_entry(parent, name)
        renameat2(self.inodes.dir_fd(parent_inode_old), name_old, self.inodes.dir_fd(parent_inode_new),
                  name_new, flags)
        exchange = bool(flags & pyfuse3.RENAME_EXCHANGE)
        self.inodes.renamed((parent_inode_old, name_old), (parent_inode_new, name_new), exchange=exchange)
        self.changelog.mark_renamed(old_path, new_path, exchange=exchange)

    @_fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.snapshots is not None and self.snapshots.owns(inode):
            # A snapshot's file is in no source folder to link from: as across file systems (the
            # inode table, which knows only the source's, said ENOENT). `ln` says so, `cp -l` too.
            raise pyfuse3.FUSEError(errno.EXDEV)
        self._refuse_snapshots(new_parent_inode)
        self._keep_entries(new_parent_inode)
        self._keep_metadata(inode)  # its link count and ctime
        dir_fd, name = self.inodes.where(inode)
        os.link(name, new_name, src_dir_fd=dir_fd, dst_dir_fd=self.inodes.dir_fd(new_parent_inode),
                follow_symlinks=False)
        self.changelog.mark_created(self.inodes.path_of(new_parent_inode, new_name))
        entry = self._entry(new_parent_inode, new_name)
        self.inodes[inode].attributes_dropped()  # the kernel drops them once linked: the link count
        return entry

    @_fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._refuse_snapshots(parent_inode)
        dir_fd = self.inodes.dir_fd(parent_inode)
        self._keep_entries(parent_inode)
        os.symlink(target, name, dir_fd=dir_fd)
        self._chown_new(parent_inode, dir_fd, name, ctx)
        self.changelog.mark_created(self.inodes.path_of(parent_inode, name))
        return self._entry(parent_inode, name)

    @_fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._refuse_snapshots(parent_inode)
        dir_fd = self.inodes.dir_fd(parent_inode)
        self._keep_entries(parent_inode)
        os.mknod(name, self._first_mode(mode, ctx), rdev, dir_fd=dir_fd)
        self._chown_new(parent_inode, dir_fd, name, ctx, mode=mode)
        self.changelog.mark_created(self.inodes.path_of(parent_inode, name))
        return self._entry(parent_inode, name)

    # -- files ------------------------------------------------------------------------------------

    @staticmethod
    def _open_flags(flags: int) -> int:
        """The flags the source file is opened with, for a caller's `flags`.

        With the writeback cache the kernel may read back pages of a write-only file and does
        O_APPEND itself (libfuse's passthrough_hp does the same). O_DIRECT stays with the kernel:
        it sends such a caller's reads and writes straight to us, past the mount's page cache, in
        buffers of Python's that no alignment rule holds for, and the source refused every one
        with EINVAL (`dd oflag=direct`); a source that cannot do O_DIRECT at all (tmpfs) failed
        the create itself after making the file. The source's page cache then holds what the
        caller's bypassed, which costs nothing it was promised: O_DIRECT never meant durable
        (fsync and O_SYNC do, and they pass through)."""
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return (flags & ~(os.O_APPEND | os.O_DIRECT)) | os.O_NOFOLLOW | os.O_CLOEXEC

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.snapshots is not None and self.snapshots.owns(inode):
            return await self.snapshots.open(inode, flags, ctx)
        dir_fd, name = self.inodes.where(inode)
        if flags & os.O_TRUNC and self.frozen is not None:
            try:
                old = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except PermissionError:  # a write-only file we may not read: the snapshot cannot keep it
                self.frozen.give_up(f"cannot read {os.fsdecode(name)!r} to keep it before it is truncated")
            else:
                try:
                    self.frozen.before_truncate(self.inodes[inode].key, old, 0)
                finally:
                    os.close(old)
        fd = os.open(name, self._open_flags(flags) & ~os.O_CREAT, dir_fd=dir_fd)
        self.inodes[inode].attributes_dropped()
        if flags & os.O_TRUNC:
            for path in self._paths(inode):
                self.changelog.mark_truncated(path)
        return pyfuse3.FileInfo(fh=self._new_handle(fd, inode), keep_cache=True)

    @_fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._refuse_snapshots(parent_inode)
        if self._is_snapshots(parent_inode, name):
            raise pyfuse3.FUSEError(errno.EROFS)
        dir_fd = self.inodes.dir_fd(parent_inode)
        self._keep_entries(parent_inode)
        fd = os.open(name, self._open_flags(flags) | os.O_CREAT, self._first_mode(mode, ctx), dir_fd=dir_fd)
        try:
            self._chown_new(parent_inode, dir_fd, name, ctx, fd, mode=stat.S_IFREG | mode)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self.changelog.mark_created(self.inodes.path_of(parent_inode, name))
        number = self.inodes.remember(parent_inode, name, st).number
        return pyfuse3.FileInfo(fh=self._new_handle(fd, number), keep_cache=True), self._attr(number, st)

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        handle = self._handles.get(fh)
        if handle is None and self.snapshots is not None:
            return await self.snapshots.read(fh, off, size)
        assert handle is not None
        # From the page cache without blocking the loop; only reads that must wait for the disk
        # pay for a worker thread (measured: a thread per 128 KiB request halves sequential reads).
        if self.read_nowait:
            # Into one reused buffer, replied from without a copy: pyfuse3 (fuse_read_async) sends the
            # reply as soon as this returns, with no await in between, so no other read can touch the
            # buffer first.
            # (A fresh 1 MiB buffer per request, and the copies out of it, cost more than the read.)
            if len(self._read_buffer) < size:
                self._read_buffer = bytearray(size)
            view = memoryview(self._read_buffer)[:size]
            got = 0
            try:
                got = os.preadv(handle.fd, [view], off, os.RWF_NOWAIT)
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
                self.read_nowait = False  # the source's file system cannot say (tmpfs): use threads
            if got == size or (got and off + got >= os.fstat(handle.fd).st_size):
                return view[:got]
        # The whole range again on a thread (what came without waiting is in the page cache).
        return await self._in_thread(os.pread, handle.fd, size, off)

    @_fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles[fh]
        paths = self._paths(handle.inode)
        self.inodes[handle.inode].attributes_dropped()
        if self.frozen is not None:
            self.frozen.before_write(self.inodes[handle.inode].key, handle.fd, off, len(buf))
        streaming, handle.write_end = off == handle.write_end, off + len(buf)
        if len(buf) >= THREAD_THRESHOLD:
            # A file written in order goes to the disk as it comes, not all at its fsync (see
            # write_and_start_writeback); a block rewritten at random keeps to the page cache.
            written = await self._in_thread(write_and_start_writeback if streaming else os.pwrite,
                                            handle.fd, buf, off)
        else:
            written = os.pwrite(handle.fd, buf, off)
        for path in paths:
            self.changelog.mark_written(path, off, written)
        return written

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on an open file. Not a pyfuse3 handler: fuse_fallocate.py calls it, on the
        event loop's thread, outside any trio task, so it may not await. The kernel passes on
        only KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE (no range moves)."""
        handle = self._handles[fh]
        record = self.inodes[handle.inode]
        paths = self._paths(handle.inode)
        if self.frozen is not None:
            self.frozen.before_write(record.key, handle.fd, offset, length)
        fallocate(handle.fd, mode, offset, length)
        record.attributes_dropped()
        if mode & FALLOC_FL_KEEP_SIZE and not mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            for path in paths:
                self.changelog.mark_metadata(path)  # space reserved within the size: only st_blocks
            return
        # A range of more blocks than a write brings marks the whole file: no set of block numbers
        # in memory as large as the range.
        for path in paths:
            if length > FALLOCATE_BLOCKS_MARKED * self.changelog.block_size:
                self.changelog.mark_truncated(path)
            else:
                self.changelog.mark_written(path, offset, length)

    @_fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handles.get(fh)
        if handle is None and self.snapshots is not None and self.snapshots.owns_handle(fh):
            return  # a snapshot's file, open for reading: nothing to write back (it was an internal error)
        assert handle is not None
        # The changelog's marks are committed while the source file goes to disk, not after: the
        # order never mattered, since a commit is not fsync'd (changelog.py) and a write whose mark
        # a crash lost is found by the scan every mount starts with.
        await self._in_thread(os.fdatasync if datasync else os.fsync, handle.fd, meanwhile=self.changelog.flush)

    async def flush(self, fh: int) -> None:
        # Nothing to do at close(2): the kernel has written the file back (and reported any write
        # error) before it asks. ENOSYS makes it stop asking: one round trip less per close.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_fuse_errors
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            if self.snapshots is not None:
                await self.snapshots.release(fh)
            return
        os.close(handle.fd)
        inode = self.inodes.get(handle.inode)
        if inode is not None:
            inode.open_fds.discard(handle.fd)
            inode.attributes_dropped()
            self.inodes.forget(handle.inode, 0)

    # -- extended attributes ----------------------------------------------------------------------

    def _xattr_target(self, inode: int) -> bytes:
        dir_fd, name = self.inodes.where(inode)
        return b"/proc/self/fd/%d/%s" % (dir_fd, name)

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if self.snapshots is not None and self.snapshots.owns(inode):
            return await self.snapshots.getxattr(inode, name, ctx)
        # The kernel asks for security.capability before every write(2) to a file, which is open
        # then: through its fd, not a /proc path, is half the cost.
        open_fds = self.inodes[inode].open_fds
        try:
            if open_fds:
                return os.getxattr(next(iter(open_fds)), name)
            return os.getxattr(self._xattr_target(inode), name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if self.snapshots is not None and self.snapshots.owns(inode):
            return await self.snapshots.listxattr(inode, ctx)
        return [os.fsencode(n) for n in os.listxattr(self._xattr_target(inode), follow_symlinks=False)]

    @_fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._refuse_snapshots(inode)
        self._keep_metadata(inode)
        self.inodes[inode].attributes_dropped()
        os.setxattr(self._xattr_target(inode), name, value, follow_symlinks=False)
        for path in self._paths(inode):
            self.changelog.mark_metadata(path)
        await self._drop_attributes_if_acl(inode, name)

    @_fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._refuse_snapshots(inode)
        self._keep_metadata(inode)
        self.inodes[inode].attributes_dropped()
        try:
            os.removexattr(self._xattr_target(inode), name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise
        for path in self._paths(inode):
            self.changelog.mark_metadata(path)
        await self._drop_attributes_if_acl(inode, name)

    async def _drop_attributes_if_acl(self, inode: int, name: bytes) -> None:
        """After an access ACL changed, have the kernel drop the inode's attributes before we reply.

        The ACL holds the mode's bits, so the source changed the mode, but the kernel asks for no
        attributes after an xattr change and showed (and enforced, with default_permissions) the
        old mode for the attribute timeout: after `setfacl -m o::---`, others could still read the
        file. From a worker thread, as pyfuse3 asks with the writeback cache; for attributes only
        the kernel has no page to write back, but the loop stays free to serve whatever it asks."""
        if name != POSIX_ACL_ACCESS:
            return
        try:
            await self._in_thread(pyfuse3.invalidate_inode, inode, True)
        except OSError as exc:  # ENOENT: the kernel holds no such inode, so no attributes either
            log.debug("no attributes dropped for inode %d: %s", inode, exc)
