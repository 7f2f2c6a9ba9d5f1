"""Reading an entry's metadata into a `Node`, and applying a `Node`'s metadata to an entry.

Everything works relative to an open directory file descriptor, never on absolute paths, so trees
deeper than PATH_MAX and names of 255 bytes behave as they do natively, and a symlink planted in a
tree can never redirect an operation elsewhere: entries are opened with O_NOFOLLOW, and calls that
have no `*at` form go through `/proc/self/fd/<dirfd>/<name>`, which resolves only the last component.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
from typing import AnyStr

from .tree import DIR, FILE, SYMLINK, Node, node_type_of_mode

IS_ROOT = os.geteuid() == 0


def at_path(dir_fd: int, name: bytes) -> bytes:
    """A path naming `name` inside the directory `dir_fd`, usable by calls without a dir_fd form."""
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)


def is_within(path: AnyStr, folder: AnyStr) -> bool:
    """Whether `path` is `folder` or lies below it (both absolute, symlinks resolved)."""
    sep = os.sep if isinstance(path, str) else os.sep.encode()
    return path == folder or path.startswith(folder.rstrip(sep) + sep)


def raise_fd_limit() -> None:
    """Deep trees keep one descriptor open per level: allow as many as the hard limit permits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def node_from_stat(name: bytes, st: os.stat_result) -> Node:
    node_type = node_type_of_mode(st.st_mode)
    return Node(
        name=name, type=node_type, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
        mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,  # atime: not recorded, see tree.py
        size=st.st_size if node_type in (FILE, SYMLINK) else 0,
        dev=st.st_dev, ino=st.st_ino, nlink=st.st_nlink,
        rdev=st.st_rdev if node_type in ("c", "b") else 0, st_blocks=st.st_blocks,
    )


def read_xattrs(target: bytes | int) -> dict[bytes, bytes]:
    """Extended attributes of an open fd or a `/proc/self/fd` path (not following symlinks)."""
    follow = isinstance(target, int)
    try:
        names = os.listxattr(target, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return {}
        raise
    attrs = {}
    for name in names:
        try:
            attrs[os.fsencode(name)] = os.getxattr(target, name, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
                raise
    return attrs


def write_xattrs(target: bytes | int, attrs: dict[bytes, bytes], *, replace_existing: bool) -> None:
    follow = isinstance(target, int)
    if replace_existing:
        for name in os.listxattr(target, follow_symlinks=follow):
            if os.fsencode(name) not in attrs:
                os.removexattr(target, name, follow_symlinks=follow)
    for name, value in attrs.items():
        if not IS_ROOT and not name.startswith(b"user."):
            continue  # trusted.*/security.* need privileges we do not have; not an error
        os.setxattr(target, name, value, follow_symlinks=follow)


def apply_metadata(dir_fd: int, node: Node, fd: int | None = None, *, replace_xattrs: bool = False) -> None:
    """Give the entry `node.name` in `dir_fd` the owner, xattrs, mode and times of `node`.

    Order matters: chown clears setuid bits and file capabilities, so it comes first; times last,
    since setting anything else touches ctime and setting xattrs may touch mtime on some systems.
    Pass `fd` when the entry is open (files, directories) to act on it without any path lookup.
    """
    name = node.name
    target: bytes | int = fd if fd is not None else at_path(dir_fd, name)
    if IS_ROOT:
        if fd is not None:
            os.fchown(fd, node.uid, node.gid)
        else:
            os.chown(name, node.uid, node.gid, dir_fd=dir_fd, follow_symlinks=False)
    if node.xattrs or replace_xattrs:  # a symlink's too (SELinux labels): through a path, not followed
        write_xattrs(target, node.xattrs, replace_existing=replace_xattrs)
    if node.type != SYMLINK:  # a symlink has no mode of its own
        if fd is not None:
            os.fchmod(fd, node.mode)
        else:
            os.chmod(at_path(dir_fd, name), node.mode)
    os.utime(name, ns=(node.atime_ns or node.mtime_ns, node.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


def open_dir(dir_fd: int | None, name: bytes) -> int:
    """Open a directory entry without following a symlink in its place."""
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def list_dir(dir_fd: int) -> list[bytes]:
    """Names in a directory, as bytes, sorted bytewise."""
    return sorted(os.fsencode(n) for n in os.listdir(dir_fd))


def remove_entry(dir_fd: int, name: bytes) -> None:
    """Remove a file, link or whole directory tree, never following symlinks."""
    st = os.lstat(name, dir_fd=dir_fd)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    # Iterative post-order removal with directory fds: no recursion limit, no path length limit.
    fd = open_dir(dir_fd, name)
    stack = [(dir_fd, name, fd, iter(os.listdir(fd)))]
    while stack:
        parent_fd, dir_name, fd, children = stack[-1]
        for child in children:
            if stat.S_ISDIR(os.lstat(child, dir_fd=fd).st_mode):
                child_fd = open_dir(fd, os.fsencode(child))
                stack.append((fd, os.fsencode(child), child_fd, iter(os.listdir(child_fd))))
                break
            os.unlink(child, dir_fd=fd)
        else:
            stack.pop()
            os.close(fd)
            os.rmdir(dir_name, dir_fd=parent_fd)


def make_dir(dir_fd: int, name: bytes) -> int:
    """Ensure `name` is a real directory (replacing anything else there) and open it."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        remove_entry(dir_fd, name)
        st = None
    if st is None:
        os.mkdir(name, 0o700, dir_fd=dir_fd)
    return open_dir(dir_fd, name)


__all__ = ["DIR", "FILE", "IS_ROOT", "Node", "apply_metadata", "at_path", "list_dir", "make_dir",
           "node_from_stat", "open_dir", "raise_fd_limit", "read_xattrs", "remove_entry"]
