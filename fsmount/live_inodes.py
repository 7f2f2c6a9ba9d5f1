"""The live tree's inode table: FUSE inode numbers for the source's files, and how to reach them.

Each source inode (st_dev, st_ino) the kernel knows gets one FUSE inode number, so hard links share
one inode as they do natively. An inode records the names it is known by — (parent inode, name)
pairs — which give its current paths for the changelog, and reach it for system calls: every call
goes through the parent directory's fd and the name, never through an absolute path, because the
source is hidden under the mount and may be deeper than PATH_MAX.

Directory fds are O_PATH descriptors opened on demand and kept in a bounded LRU (the process may
hold ~20,000 descriptors, and a large tree has more directories than that); an evicted one is
reopened from its parent. The root's descriptor was opened before mounting and is never closed.
The table is used only on the event loop thread.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import pyfuse3

ROOT = pyfuse3.ROOT_INODE
MAX_DIR_FDS = 2048
_SEVERAL = object()  # see InodeTable._single_path


@dataclass
class Inode:
    number: int
    key: tuple[int, int]
    file_type: int  # the S_IFMT bits of its mode
    names: set[tuple[int, bytes]] = field(default_factory=set)
    nlink: int = 1
    lookups: int = 0
    # When (time.monotonic) the kernel was last given its entry, and its attributes; see
    # `attributes_dropped` and LiveTree.readdir.
    entry_shown_at: float = -math.inf
    attrs_shown_at: float = -math.inf
    open_fds: set[int] = field(default_factory=set)

    @property
    def is_dir(self) -> bool:
        return self.file_type == stat.S_IFDIR

    def shown(self, now: float, *, entry: bool = True) -> None:
        """The kernel was just given its attributes (and, with `entry`, its entry: a lookup reply)."""
        self.attrs_shown_at = now
        if entry:
            self.entry_shown_at = now

    def attributes_dropped(self) -> None:
        """Something happened after which the kernel asks for its attributes again (it was opened,
        closed, written, renamed, unlinked, or its xattrs changed): conservatively, since which
        events make the kernel drop them is the kernel's business."""
        self.attrs_shown_at = -math.inf


class InodeTable:
    def __init__(self, root_fd: int):
        self.root_fd = root_fd
        st = os.fstat(root_fd)
        root = Inode(ROOT, (st.st_dev, st.st_ino), stat.S_IFDIR, lookups=1)
        self._by_number: dict[int, Inode] = {ROOT: root}
        self._by_key: dict[tuple[int, int], Inode] = {root.key: root}
        self._by_name: dict[tuple[int, bytes], Inode] = {}
        self._next = ROOT + 1
        self._dir_fds: OrderedDict[int, int] = OrderedDict()

    def __getitem__(self, number: int) -> Inode:
        try:
            return self._by_number[number]
        except KeyError:
            raise pyfuse3.FUSEError(2) from None  # ENOENT: the kernel asked about a forgotten inode

    def get(self, number: int) -> Inode | None:
        return self._by_number.get(number)

    def __len__(self) -> int:
        return len(self._by_number)

    # -- knowing entries --------------------------------------------------------------------------

    def remember(self, parent: int, name: bytes, st: os.stat_result, *, lookup: bool = True) -> Inode:
        """The inode for entry `name` of `parent` (created if new); with `lookup`, counts the kernel's
        lookup reference and that it was shown the entry now."""
        key = (st.st_dev, st.st_ino)
        inode = self._by_key.get(key)
        if inode is None:
            inode = Inode(self._next, key, stat.S_IFMT(st.st_mode))
            self._next += 1
            self._by_number[inode.number] = inode
            self._by_key[key] = inode
        self._name(inode, (parent, name))
        inode.nlink = st.st_nlink
        if lookup:
            inode.lookups += 1
            inode.shown(time.monotonic())
        return inode

    def known(self, parent: int, name: bytes) -> Inode | None:
        """The inode known to be called `name` in `parent`, if any."""
        return self._by_name.get((parent, name))

    def forget(self, number: int, count: int) -> None:
        inode = self._by_number.get(number)
        if inode is None or number == ROOT:
            return
        inode.lookups -= count
        self._drop_if_unused(inode)

    def _name(self, inode: Inode, entry: tuple[int, bytes]) -> None:
        previous = self._by_name.get(entry)
        if previous is inode:
            return  # known by that name already: every lookup and listing comes through here
        if previous is not None:
            previous.names.discard(entry)
        self._by_name[entry] = inode
        inode.names.add(entry)

    def _unname(self, inode: Inode, entry: tuple[int, bytes]) -> None:
        inode.names.discard(entry)
        if self._by_name.get(entry) is inode:
            del self._by_name[entry]

    def _drop_if_unused(self, inode: Inode) -> None:
        if inode.lookups <= 0 and not inode.open_fds:
            for entry in list(inode.names):
                self._unname(inode, entry)
            del self._by_number[inode.number]
            if self._by_key.get(inode.key) is inode:
                del self._by_key[inode.key]
            fd = self._dir_fds.pop(inode.number, None)
            if fd is not None:
                os.close(fd)

    def unlinked(self, parent: int, name: bytes) -> Inode | None:
        """Forget that `name` in `parent` names anything (after unlink, rmdir, or being replaced)."""
        inode = self._by_name.get((parent, name))
        if inode is not None:
            self._unname(inode, (parent, name))
            inode.attributes_dropped()  # its link count and ctime
            if inode.is_dir:
                self._close_dir_fd(inode.number)
        return inode

    def renamed(self, old: tuple[int, bytes], new: tuple[int, bytes], *, exchange: bool) -> None:
        moving, other = self._by_name.get(old), self._by_name.get(new)
        for inode in (moving, other):
            if inode is not None:
                inode.attributes_dropped()  # their ctime, and the link count of one replaced
        if other is not None:
            self._unname(other, new)
        if moving is not None:
            self._unname(moving, old)
            self._name(moving, new)
        if other is not None and exchange:
            self._name(other, old)
        for inode in (moving, other):
            if inode is not None and inode.is_dir:
                self._close_dir_fd(inode.number)  # reopened through its new name when needed

    # -- reaching entries -------------------------------------------------------------------------

    def where(self, number: int) -> tuple[int, bytes]:
        """(directory fd, name) through which inode `number` is reached; the root is (its fd, ".")."""
        if number == ROOT:
            return self.root_fd, b"."
        parent, name = self._entry_of(number)
        return self.dir_fd(parent), name

    def _entry_of(self, number: int) -> tuple[int, bytes]:
        """The (parent, name) through which a non-root inode is reached."""
        names = self[number].names
        if not names:
            raise pyfuse3.FUSEError(116)  # ESTALE: it has no name left (unlinked)
        return min(names) if len(names) > 1 else next(iter(names))

    def dir_fd(self, number: int) -> int:
        """The directory's O_PATH fd, opened (and cached) from its nearest ancestor that has one.

        A loop, not a recursion through where(): a tree may be deeper than Python's recursion limit
        (the daemon died of a RecursionError at a 980-deep `mkdir -p`)."""
        to_open: list[tuple[int, bytes]] = []  # (inode, name in its parent), deepest first
        while True:
            fd = self.root_fd if number == ROOT else self._dir_fds.get(number)
            if fd is not None:
                break
            if len(to_open) > len(self._by_number):
                raise pyfuse3.FUSEError(errno.ELOOP)  # names that loop: a bug, never a hang
            parent, name = self._entry_of(number)
            to_open.append((number, name))
            number = parent
        if number != ROOT:
            self._dir_fds.move_to_end(number)
        for number, name in reversed(to_open):
            fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            self._dir_fds[number] = fd  # the most recent: never the one evicted next
            if len(self._dir_fds) > MAX_DIR_FDS:
                _, evicted = self._dir_fds.popitem(last=False)
                os.close(evicted)
        return fd

    def cached_dir_fd(self, number: int) -> int | None:
        """The directory's fd if it is open already (an O_PATH fd: enough for fstat)."""
        return self.root_fd if number == ROOT else self._dir_fds.get(number)

    def _close_dir_fd(self, number: int) -> None:
        fd = self._dir_fds.pop(number, None)
        if fd is not None:
            os.close(fd)

    def paths(self, number: int) -> list[bytes]:
        """Every current path of an inode relative to the source root (empty if unlinked).

        Loops, not recursion: a tree may be deeper than Python's recursion limit (the daemon died
        of a RecursionError at a 980-deep `mkdir -p`). Every write asks, so the usual case, where
        each directory above has one name, is a walk up the chain."""
        inode = self._by_number.get(number)
        if number == ROOT or inode is None:
            return [b""] if number == ROOT else []
        found = []
        for parent, name in inode.names:
            parent_path = self._single_path(parent)
            if parent_path is _SEVERAL:
                return self._all_paths(number)
            if parent_path is not None:
                found.append(parent_path + b"/" + name if parent_path else name)
        return found

    def _single_path(self, number: int) -> bytes | object | None:
        """The one path of a directory, None if it has none, or _SEVERAL if a directory on the way
        up has more than one name (a rename made beside the mount, seen through a new lookup)."""
        names: list[bytes] = []
        while number != ROOT:
            inode = self._by_number.get(number)
            if inode is None or not inode.names or len(names) > len(self._by_number):
                return None  # forgotten, unlinked, or names that loop (a bug: no path, never a hang)
            if len(inode.names) > 1:
                return _SEVERAL
            number, name = next(iter(inode.names))
            names.append(name)
        return b"/".join(reversed(names))

    def _all_paths(self, number: int) -> list[bytes]:
        """paths() where directories have several names: each inode's paths from the root down,
        with a stack of its own."""
        found: dict[int, list[bytes]] = {ROOT: [b""]}
        pending, visiting = [number], set()
        while pending:
            current = pending[-1]
            if current in found:
                pending.pop()
                continue
            inode = self._by_number.get(current)
            names = inode.names if inode is not None else set()
            unknown = [parent for parent, _ in names if parent not in found and parent not in visiting]
            if unknown:
                visiting.add(current)
                pending.extend(unknown)
                continue
            pending.pop()
            visiting.discard(current)
            found[current] = [parent_path + b"/" + name if parent_path else name
                              for parent, name in names for parent_path in found.get(parent, ())]
        return found[number]

    def path_of(self, parent: int, name: bytes) -> bytes:
        parents = self.paths(parent)
        if not parents:
            raise pyfuse3.FUSEError(2)
        return parents[0] + b"/" + name if parents[0] else name

    def close(self) -> None:
        for fd in self._dir_fds.values():
            os.close(fd)
        self._dir_fds.clear()
