"""The read-only snapshot tree: every snapshot of a repository as a folder, served from the store.

Layout: the root lists one folder per snapshot, named by the snapshot's name or, unnamed, by its
time (`2026-11-25T10:00:00`; a clash gets the short id appended: `folder_names`, whose names `ls`
and `restore` take too), plus `latest`, a symlink to the newest. Below each folder is the
snapshot's tree exactly as it was backed up.

The same object serves two mounts: `fsmount mount-snapshots` (it is the whole file system there)
and the live tree's `MOUNT/.snapshots`, which hands over every request for an inode or handle this
tree owns. Inode numbers therefore live in a range of their own: the top bit set, the rest a hash
of the entry's parent and name (of snapshot, device and inode for hard links, so all names of a
hard-linked file share one number). Numbers are stable for the life of a snapshot, which `find`,
`du` and `cp -a` rely on, and nothing needs a table of all of them: only the inodes the kernel holds
a reference to are kept (`lookups`), the kernel's `forget` drops them, and directory listings come
from the repository's tree cache, so memory does not grow with the size of the snapshot.

Snapshots are immutable, so below the root the kernel may cache entries and attributes for long
and keep file pages; the root itself is re-read from the store at most every `refresh_s` seconds,
so snapshots taken after mounting appear. While the store is known to be failing (`store_failing`:
the live mount's backlog says so until the store answers again), the root is not re-read at all:
it shows the snapshots listed before and those `add`ed since, at once, where each listing would
wait out the store's whole retry budget (a minute on S3) before failing. File content comes
through `SnapshotReader` (block cache, read-ahead). A damaged or missing object fails only the
request that needs it, with EIO and a log line naming the object.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pyfuse3
import trio

from backend.errors import FsmountError
from backend.repository import Repository
from backend.snapshot import BadName, Snapshot, check_name, folder_names
from backend.tree import BLOCKDEV, CHARDEV, DIR, FILE, HOLE, SYMLINK, Node

from .snapshot_reader import SnapshotReader

log = logging.getLogger(__name__)

OWN_RANGE = 1 << 63  # inode numbers with this bit belong to the snapshot tree
HANDLE_BASE = 1 << 48  # file handle numbers, far above those of the live tree
LATEST = b"latest"
FILE_CAPABILITIES = b"security.capability"  # privileges an executable gains, as a setuid bit grants them
DOTS = (b".", b"..")  # the first two entries of every listing, as in any folder
SIBLINGS_AHEAD = 16  # files of a folder fetched ahead of one being read
IMMUTABLE_TIMEOUT_S = 3600.0
ROOT_TIMEOUT_S = 1.0
# BadName.reason -> the errno of mkdir; any other reason is EINVAL
_NAME_ERRNO = {"reserved": errno.EEXIST, "taken": errno.EEXIST, "too long": errno.ENAMETOOLONG}


def _number(*parts: bytes) -> int:
    digest = hashlib.blake2b(b"\0".join(parts), digest_size=8).digest()
    return int.from_bytes(digest, "big") | OWN_RANGE


LATEST_NUMBER = _number(LATEST)  # asked about on every getattr and xattr request: computed once


@dataclass(eq=False)
class _Inode:
    number: int
    node: Node | None  # None for the root and the per-snapshot folders
    snapshot: Snapshot | None  # None for the root
    parent: int
    lookups: int = 0
    siblings: _Siblings | None = None  # directories: how their files are being opened


class _Siblings:
    """The files of one directory in the two orders copying tools open them: by name (tar,
    rsync, `find`) and by inode number (GNU `cp -r` sorts by inode, for disks where that is the
    on-disk order; ours are hashes, so that order is unrelated to the names). For each order,
    the rank of the file opened last and how far ahead its files have been fetched."""

    def __init__(self, files: list[Node], numbers: list[int]):
        by_number = [node for _, node in sorted(zip(numbers, files), key=lambda pair: pair[0])]
        self.orders = (files, by_number)
        self.ranks = tuple({node.name: rank for rank, node in enumerate(order)} for order in self.orders)
        self.last = [-1, -1]
        self.horizon = [0, 0]

    def ahead(self, name: bytes) -> list[Node]:
        """Files to fetch now that `name` is opened: the next ones in each order it follows."""
        wanted: list[Node] = []
        for k, order in enumerate(self.orders):
            rank = self.ranks[k][name]
            step, self.last[k] = rank - self.last[k], rank
            if step != 1:  # not following this order (or jumped): wait for it to resume
                self.horizon[k] = rank + 1
                continue
            if rank + SIBLINGS_AHEAD // 2 < self.horizon[k]:
                continue  # still far enough ahead; topping up in halves makes larger fetches
            start, self.horizon[k] = max(rank + 1, self.horizon[k]), rank + 1 + SIBLINGS_AHEAD
            wanted += order[start : self.horizon[k]]
        return wanted


@dataclass(eq=False)
class _Dir:
    inode: _Inode
    names: list[bytes] = field(default_factory=list)
    nodes: list[Node | None] = field(default_factory=list)


@dataclass(eq=False)
class _File:
    inode: _Inode
    next_offset: int = 0  # where a sequential reader reads next
    streak: int = 0


class SnapshotTree:
    """The snapshot tree's handlers, in pyfuse3's terms, for the inodes and handles it owns.

    `include` picks the snapshots shown (the live tree shows only its own folder's); `on_mkdir`,
    when given, makes `mkdir ROOT/NAME` take a snapshot named NAME and return it; `store_failing`,
    when it says True, keeps the root as last listed instead of listing the store.

    `disarmed` (for a live mount with `suid` or `dev`): no setuid or setgid bit but on folders, no
    file capability, and device nodes without permission bits (only root, who may make any device
    anyway, can open one; type and number still show). Anyone with the repository's passphrase can
    write a snapshot, and a folder's snapshots may hold an old setuid program since fixed: served as
    they are, either would be a privilege the source never grants (live_daemon.honoured_like).
    """

    def __init__(self, repo: Repository, reader: SnapshotReader, *, root_number: int = OWN_RANGE,
                 include: Callable[[Snapshot], bool] | None = None,
                 on_mkdir: Callable[[str], Awaitable[Snapshot]] | None = None, refresh_s: float = 2.0,
                 disarmed: bool = False, store_failing: Callable[[], bool] = lambda: False):
        self.repo = repo
        self.disarmed = disarmed
        self.reader = reader
        self.root_number = root_number
        self.include = include or (lambda snapshot: True)
        self.on_mkdir = on_mkdir
        self.refresh_s = refresh_s
        self.store_failing = store_failing
        self.uid, self.gid = os.getuid(), os.getgid()
        self.mounted_ns = time.time_ns()
        root = _Inode(root_number, None, None, root_number, lookups=1)
        self._inodes: dict[int, _Inode] = {root_number: root}
        self._handles: dict[int, _Dir | _File] = {}
        self._next_handle = HANDLE_BASE
        self._snapshots: dict[str, Snapshot] = {}
        self._labels: dict[bytes, Snapshot] = {}
        self._latest: bytes | None = None
        self._refreshed = -float("inf")
        self._listing_failed = False
        self._listed_once = False
        self._added_at: dict[str, float] = {}  # snapshot id -> when this mount took it (`add`)
        self._refresh_lock = trio.Lock()

    def owns(self, number: int) -> bool:
        return number == self.root_number or bool(number & OWN_RANGE)

    def owns_handle(self, fh: int) -> bool:
        return fh in self._handles

    # -- the root: one folder per snapshot ----------------------------------------------------------

    async def refresh(self, *, force: bool = False) -> None:
        """Re-read the list of snapshots when it is older than `refresh_s` (or now, with force).

        Once a listing succeeded, none is made while the store is failing, and a request that is
        not forced answers from the last listing rather than wait for one under way. A listing
        that failed is not forced again for `refresh_s`: on a store that is down, each one waits
        out the store's whole retry budget."""
        if self._listed_once and not force and self._refresh_lock.locked():
            return
        async with self._refresh_lock:
            age_s = time.monotonic() - self._refreshed
            if age_s < self.refresh_s and (not force or self._listing_failed):
                return
            if self._listed_once and self.store_failing():
                return  # listed again once the store answers: the backlog finds out when
            started = time.monotonic()
            try:
                listed = await trio.to_thread.run_sync(self._list_snapshots, dict(self._snapshots))
            except FsmountError as exc:
                log.error("cannot list snapshots: %s", exc)
                self._listing_failed = True
                if not self._listed_once:
                    raise pyfuse3.FUSEError(errno.EIO) from None
            else:
                self._listing_failed = False
                self._adopt(listed, started)
            self._refreshed = time.monotonic()

    def take_listing(self, snapshots: list[Snapshot]) -> None:
        """Take `snapshots` as the repository's, listed a moment ago (the live mount lists them as
        it starts: `.snapshots` then shows them even if the store is down before its first use)."""
        self._adopt({s.id: s for s in snapshots}, time.monotonic())
        self._refreshed = time.monotonic()

    def add(self, snapshot: Snapshot) -> None:
        """Show `snapshot`, just stored (or staged in the backlog), at once: a listing of the store
        would fail while the store is down, and wait out its retry budget first."""
        self._snapshots[snapshot.id] = snapshot
        self._added_at[snapshot.id] = time.monotonic()
        self._relabel()

    def _list_snapshots(self, known: dict[str, Snapshot]) -> dict[str, Snapshot]:
        """The repository's snapshots, reading only those not in `known` (on a worker thread)."""
        listed = {}
        for snapshot_id in self.repo.snapshot_ids():
            try:
                listed[snapshot_id] = known.get(snapshot_id) or self.repo.load_snapshot(snapshot_id)
            except FsmountError as exc:
                log.warning("%s", exc)
        return listed

    def _adopt(self, listed: dict[str, Snapshot], started: float) -> None:
        """Take `listed` as the snapshots, keeping those added since the listing `started`."""
        for snapshot_id, added_at in list(self._added_at.items()):
            if added_at >= started:
                listed.setdefault(snapshot_id, self._snapshots[snapshot_id])
            else:
                del self._added_at[snapshot_id]
        self._snapshots = listed
        self._listed_once = True
        self._relabel()

    def _relabel(self) -> None:
        # Named among all the repository's snapshots, shown or not: a folder name of .snapshots is
        # the same as in mount-snapshots, and what `ls` and `restore` take (folder_names).
        labels = {os.fsencode(label): snapshot for label, snapshot in folder_names(self._snapshots.values()).items()
                  if self.include(snapshot)}
        self._labels = labels
        self._latest = next((label for label, s in reversed(labels.items())), None)

    def _root_attr(self) -> pyfuse3.EntryAttributes:
        newest = max((s.time_ns for s in self._labels.values()), default=self.mounted_ns)
        return self._make_attr(self.root_number, stat.S_IFDIR | 0o555, 2, 0, newest, ROOT_TIMEOUT_S)

    async def root_entry(self) -> pyfuse3.EntryAttributes:
        """The root as an entry of its parent (the live tree's `.snapshots`)."""
        await self.refresh()
        return self._root_attr()

    def _snapshot_inode(self, label: bytes, snapshot: Snapshot) -> _Inode:
        number = _number(b"snapshot", snapshot.id.encode())
        inode = self._inodes.get(number)
        if inode is None:
            inode = self._inodes[number] = _Inode(number, None, snapshot, self.root_number)
        return inode

    def _latest_attr(self) -> pyfuse3.EntryAttributes:
        target = self._latest or b""
        newest = self._labels[target].time_ns if target else self.mounted_ns
        attr = self._make_attr(LATEST_NUMBER, stat.S_IFLNK | 0o777, 1, len(target), newest, ROOT_TIMEOUT_S)
        return attr

    # -- attributes ---------------------------------------------------------------------------------

    def _make_attr(self, number: int, mode: int, nlink: int, size: int, time_ns: int,
                   timeout: float) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = number
        attr.st_mode = mode
        attr.st_nlink = nlink
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.st_size = size
        attr.st_blksize = self.repo.block_size
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = time_ns
        attr.entry_timeout = attr.attr_timeout = timeout
        return attr

    def _attr(self, inode: _Inode) -> pyfuse3.EntryAttributes:
        if inode.number == self.root_number:
            return self._root_attr()
        node = inode.node
        if node is None:  # a snapshot's folder: the source folder's own metadata, if recorded
            snapshot = inode.snapshot
            assert snapshot is not None
            if snapshot.root is None:
                return self._make_attr(inode.number, stat.S_IFDIR | 0o555, 2, 0, snapshot.time_ns,
                                       IMMUTABLE_TIMEOUT_S)
            node = snapshot.root
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode.number
        attr.st_mode = node.st_mode
        attr.st_nlink = node.nlink if node.type != DIR else 1
        attr.st_uid, attr.st_gid, attr.st_rdev = node.uid, node.gid, node.rdev
        attr.st_size = node.size if node.type in (FILE, SYMLINK) else 0
        attr.st_blksize = self.repo.block_size
        attr.st_blocks = self._allocated(node) // 512
        attr.st_atime_ns = node.atime_ns or node.mtime_ns
        attr.st_mtime_ns = node.mtime_ns
        attr.st_ctime_ns = node.ctime_ns
        attr.entry_timeout = attr.attr_timeout = IMMUTABLE_TIMEOUT_S
        if self.disarmed:
            if node.type in (CHARDEV, BLOCKDEV):
                attr.st_mode = stat.S_IFMT(attr.st_mode)
            elif node.type != DIR:
                attr.st_mode &= ~(stat.S_ISUID | stat.S_ISGID)
        return attr

    def _allocated(self, node: Node) -> int:
        """Bytes an entry occupies: what the source's stat said, else (trees written before that
        was recorded) a file's stored blocks, holes excluded, in 4 KiB units."""
        if node.st_blocks is not None:
            return node.st_blocks * 512
        if node.type != FILE:
            return 0
        block_size, total = self.repo.block_size, 0
        for i, blob_id in enumerate(node.block_ids()):
            if blob_id != HOLE:
                total += min(block_size, node.size - i * block_size)
        return (total + 4095) & ~4095

    def _inode(self, number: int) -> _Inode:
        inode = self._inodes.get(number)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return inode

    async def getattr(self, number: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if number == LATEST_NUMBER:
            return self._latest_attr()
        return self._attr(self._inode(number))

    # -- lookups ------------------------------------------------------------------------------------

    async def _children(self, inode: _Inode) -> list[Node]:
        """The entries of a directory inside a snapshot (loaded lazily, through the tree cache)."""
        tree_id = inode.node.subtree if inode.node is not None else inode.snapshot.tree  # type: ignore[union-attr]
        try:
            return await trio.to_thread.run_sync(self.repo.load_tree, tree_id)
        except FsmountError as exc:
            log.error("%s: %s", self._describe(inode), exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _describe(self, inode: _Inode) -> str:
        snapshot = inode.snapshot
        where = f"snapshot {snapshot.short_id}" if snapshot else "snapshot list"
        return f"{where}, {os.fsdecode(inode.node.name)}" if inode.node else where

    def _child_number(self, parent: _Inode, node: Node) -> int:
        snapshot = parent.snapshot
        assert snapshot is not None
        if node.is_hardlinked:
            return _number(b"link", snapshot.id.encode(), b"%d:%d" % (node.dev, node.ino))
        return _number(parent.number.to_bytes(8, "big"), node.name)

    def _child_inode(self, parent: _Inode, node: Node) -> _Inode:
        snapshot = parent.snapshot
        assert snapshot is not None
        number = self._child_number(parent, node)
        inode = self._inodes.get(number)
        if inode is None:
            inode = self._inodes[number] = _Inode(number, node, snapshot, parent.number)
        return inode

    async def lookup(self, parent_number: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        parent = self._inode(parent_number)
        if name == b".":
            inode = parent
        elif name == b"..":
            inode = self._inode(parent.parent)
        elif parent.number == self.root_number:
            await self.refresh()
            if name not in self._labels and name != LATEST:
                await self.refresh(force=True)  # made a moment ago?
            if name == LATEST and self._latest is not None:
                return self._latest_attr()
            snapshot = self._labels.get(name)
            if snapshot is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            inode = self._snapshot_inode(name, snapshot)
        else:
            children = await self._children(parent)
            names = [child.name for child in children]
            at = bisect_left(names, name)
            if at == len(children) or names[at] != name:
                raise pyfuse3.FUSEError(errno.ENOENT)
            inode = self._child_inode(parent, children[at])
        inode.lookups += 1
        return self._attr(inode)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for number, count in inode_list:
            inode = self._inodes.get(number)
            if inode is None or number == self.root_number:
                continue
            inode.lookups -= count
            if inode.lookups <= 0:
                del self._inodes[number]

    async def readlink(self, number: int, ctx: pyfuse3.RequestContext | None = None) -> bytes:
        if number == LATEST_NUMBER:
            if self._latest is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._latest
        node = self._inode(number).node
        if node is None or node.type != SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    # -- directories --------------------------------------------------------------------------------

    def _new_handle(self, handle: _Dir | _File) -> int:
        fh = self._next_handle
        self._next_handle += 1
        self._handles[fh] = handle
        return fh

    async def opendir(self, number: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        inode = self._inode(number)
        listing = _Dir(inode)
        if number == self.root_number:
            await self.refresh()
            listing.names = [*DOTS, *self._labels, *([LATEST] if self._latest else [])]
            listing.nodes = [None] * len(listing.names)
        else:
            if inode.node is not None and inode.node.type != DIR:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            children = await self._children(inode)
            listing.names = [*DOTS, *(child.name for child in children)]
            listing.nodes = [None, None, *children]
        return self._new_handle(listing)

    def _dot_attr(self, listing: _Dir, name: bytes) -> pyfuse3.EntryAttributes:
        """`.` or `..` of a listing. The kernel keeps nothing of these from a readdirplus reply and
        takes no lookup reference for them: only the inode number and type reach the reader."""
        inode: _Inode | None = listing.inode
        if name == b".." and listing.inode.number == self.root_number:
            if self.root_number != pyfuse3.ROOT_INODE:  # MOUNT/.snapshots: in the live mount's root
                return self._make_attr(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755, 2, 0, self.mounted_ns, ROOT_TIMEOUT_S)
        elif name == b"..":
            inode = self._inodes.get(listing.inode.parent)
            if inode is None:  # forgotten by now: its number and type are all a listing shows
                return self._make_attr(listing.inode.parent, stat.S_IFDIR | 0o555, 2, 0, self.mounted_ns,
                                       IMMUTABLE_TIMEOUT_S)
        return self._attr(inode)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._handles[fh]
        assert isinstance(listing, _Dir)
        for index in range(start_id, len(listing.names)):
            name, node = listing.names[index], listing.nodes[index]
            if index < len(DOTS):
                if not pyfuse3.readdir_reply(token, name, self._dot_attr(listing, name), index + 1):
                    break
                continue
            if node is not None:
                inode = self._child_inode(listing.inode, node)
                attr = self._attr(inode)
            elif name == LATEST:
                inode, attr = None, self._latest_attr()
            else:
                snapshot = self._labels.get(name)
                if snapshot is None:  # gone since the listing began
                    continue
                inode = self._snapshot_inode(name, snapshot)
                attr = self._attr(inode)
            if not pyfuse3.readdir_reply(token, name, attr, index + 1):
                if inode is not None and inode.lookups == 0:
                    self._inodes.pop(inode.number, None)
                break
            if inode is not None:
                inode.lookups += 1

    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    async def mkdir(self, parent_number: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if parent_number != self.root_number or self.on_mkdir is None:
            raise pyfuse3.FUSEError(errno.EROFS)
        if name in self._labels:
            raise pyfuse3.FUSEError(errno.EEXIST)
        try:
            label = check_name(name.decode())
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        except BadName as exc:
            raise pyfuse3.FUSEError(_NAME_ERRNO.get(exc.reason, errno.EINVAL)) from None
        try:
            snapshot = await self.on_mkdir(label)  # refuses a name another snapshot has (check_name_free)
        except BadName as exc:
            log.warning("mkdir %r: %s", label, exc)
            raise pyfuse3.FUSEError(_NAME_ERRNO.get(exc.reason, errno.EINVAL)) from None
        except FsmountError as exc:
            log.error("snapshot %r requested by mkdir failed: %s", label, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        self.add(snapshot)  # in the backlog, while the store is down: no listing would show it
        for shown, candidate in self._labels.items():
            if candidate.id == snapshot.id:
                inode = self._snapshot_inode(shown, snapshot)
                inode.lookups += 1
                return self._attr(inode)
        raise pyfuse3.FUSEError(errno.EIO)

    # -- files --------------------------------------------------------------------------------------

    async def open(self, number: int, flags: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.FileInfo:
        inode = self._inode(number)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        if inode.node is None or inode.node.type != FILE:
            raise pyfuse3.FUSEError(errno.EISDIR if inode.node is None or inode.node.type == DIR else errno.EINVAL)
        self._prefetch_siblings(inode)
        return pyfuse3.FileInfo(fh=self._new_handle(_File(inode)), keep_cache=True)

    def _prefetch_siblings(self, inode: _Inode) -> None:
        """A copy opens a folder's files one after another: while it copies one, fetch the next."""
        parent = self._inodes.get(inode.parent)
        if parent is None or parent.snapshot is None or inode.node is None:
            return
        if parent.siblings is None:
            children = self.repo.cached_tree(parent.node.subtree if parent.node is not None else parent.snapshot.tree)
            if children is None:
                return
            files = [child for child in children if child.type == FILE]
            parent.siblings = _Siblings(files, [self._child_number(parent, child) for child in files])
        if inode.node.name not in parent.siblings.ranks[0]:
            return  # a hard link, opened under a name in another folder
        wanted = [child.block_id(i) for child in parent.siblings.ahead(inode.node.name)
                  for i in range(min(2, child.block_count))]
        self.reader.prefetch(wanted)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._handles[fh]
        assert isinstance(handle, _File) and handle.inode.node is not None
        node = handle.inode.node
        if offset == handle.next_offset:
            handle.streak += 1
        else:
            handle.streak = 0
        try:
            data = await self.reader.read(node, offset, size, sequential=handle.streak)
        except FsmountError as exc:
            log.error("%s: read at %d failed: %s", self._describe(handle.inode), offset, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        handle.next_offset = offset + len(data)
        return data

    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # -- extended attributes ------------------------------------------------------------------------

    def _xattr_node(self, number: int) -> Node | None:
        """The node whose xattrs an inode shows: its own, or a snapshot folder's source folder's."""
        if number == LATEST_NUMBER:
            return None
        inode = self._inode(number)
        return inode.node or (inode.snapshot.root if inode.snapshot is not None else None)

    async def getxattr(self, number: int, name: bytes, ctx: pyfuse3.RequestContext | None = None) -> bytes:
        node = self._xattr_node(number)
        if node is None or name not in node.xattrs or (self.disarmed and name == FILE_CAPABILITIES):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return node.xattrs[name]

    async def listxattr(self, number: int, ctx: pyfuse3.RequestContext | None = None) -> list[bytes]:
        node = self._xattr_node(number)
        names = list(node.xattrs) if node is not None else []
        return [name for name in names if name != FILE_CAPABILITIES] if self.disarmed else names
