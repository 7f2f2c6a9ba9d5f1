"""Mountpoints: is one usable, is something mounted there, is that mount stale; and the tuning
every mount daemon does before it serves (kernel read-ahead, the collector's view of the heap)."""

from __future__ import annotations

import ctypes
import errno
import gc
import logging
import os
import re
from collections.abc import Iterator

from backend.errors import UsageError
from backend.fsnode import is_within

log = logging.getLogger(__name__)

_MOUNTINFO_ESCAPE = re.compile(rb"\\([0-7]{3})")
READAHEAD_KIB = 2048  # measured: cp of a large file out of the snapshot mount 116 -> 170 MB/s


def check_mountpoint(mountpoint: bytes) -> None:
    """Refuse a missing mountpoint, a stale one, one where something is mounted already, or one
    with files in it (the mount would hide them)."""
    shown = os.fsdecode(mountpoint)
    try:
        os.statvfs(mountpoint)
    except FileNotFoundError:
        raise UsageError(f"mountpoint {shown} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise UsageError(f"{shown} is a stale mount left by a process that died; "
                             f"run `fusermount3 -u {shown}` and mount again") from None
        raise UsageError(f"cannot use {shown} as mountpoint: {exc.strerror}") from None
    if not os.path.isdir(mountpoint):
        raise UsageError(f"mountpoint {shown} is not a directory")
    real = os.path.realpath(mountpoint)
    if os.path.ismount(real) or mounted_at(real):
        raise UsageError(f"{shown} is already a mountpoint (unmount it first)")
    if os.listdir(mountpoint):
        raise UsageError(f"mountpoint {shown} is not empty: mounting would hide its files")


def mounted_at(path: bytes) -> bool:
    return device_of_mount(path) is not None


def is_stale(path: bytes) -> bool:
    """A FUSE mount whose daemon is gone answers with ENOTCONN (statvfs: never from a cache)."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def device_of_mount(path: bytes) -> str | None:
    """`major:minor` of the file system mounted at `path`, from mountinfo (the mount is not touched:
    a FUSE daemon must not make requests to its own mount from the thread that answers them)."""
    top = _top_mount(path)
    return top[0] if top else None


def type_of_mount(path: bytes) -> str | None:
    """The type (`ext4`, `tmpfs`, `fuse.fsmount`...) of the file system mounted at `path`."""
    top = _top_mount(path)
    return top[1] if top else None


def type_of_enclosing_mount(path: bytes) -> str | None:
    """The type of the file system that `path` (a real path) lies in: the deepest mount above it."""
    found = enclosing_mount(path)
    return found[1] if found else None


def enclosing_mount(path: bytes) -> tuple[bytes, str] | None:
    """(mountpoint, type) of the deepest mount above `path`, an absolute path: read from
    mountinfo, so it works for a path inside a mount whose daemon is gone."""
    found = None
    for where, _, fstype in mounts():
        if is_within(path, where) and (found is None or len(where) >= len(found[0])):  # >=: stacked, the last
            found = (where, fstype)
    return found


def processes_inside(folder: bytes, *, ignore: frozenset[int] = frozenset()) -> dict[str, list[tuple[int, str]]]:
    """Processes that have their current directory (`cwd`), root directory (`root`) or an open
    file (`fd`) inside `folder`, a real path: {kind: [(pid, command), ...]}, from /proc.

    Best effort: a process that exits meanwhile, or that we may not look at, is left out, and so
    are `ignore` and this process. Reads only links (some 20 ms for 300 descriptors here)."""
    found: dict[str, list[tuple[int, str]]] = {"cwd": [], "root": [], "fd": []}
    skip = ignore | {os.getpid()}
    try:
        entries = [entry.name for entry in os.scandir(b"/proc") if entry.name.isdigit()]
    except OSError:
        return found
    for name in entries:
        pid = int(name)
        if pid in skip:
            continue
        kinds = [kind for kind in ("cwd", "root") if _links_inside(b"/proc/%s/%s" % (name, kind.encode()), folder)]
        if _any_fd_inside(b"/proc/%s/fd" % name, folder):
            kinds.append("fd")
        for kind in kinds:
            found[kind].append((pid, _command(name)))
    return found


def _links_inside(link: bytes, folder: bytes) -> bool:
    try:
        return is_within(os.readlink(link), folder)
    except OSError:  # gone, or not ours to look at
        return False


def _any_fd_inside(fd_dir: bytes, folder: bytes) -> bool:
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    return any(_links_inside(fd_dir + b"/" + fd, folder) for fd in fds)


def _command(pid: bytes) -> str:
    try:
        with open(b"/proc/%s/comm" % pid, "rb") as f:
            return f.read().strip().decode(errors="replace") or "?"
    except OSError:
        return "?"


def write_back(path: bytes | str) -> None:
    """syncfs(2) on the file system at `path`: the kernel sends a FUSE daemon what its writeback
    cache holds. In a daemon, never from its event loop's thread, which must serve those writes.
    Through libc, not pyfuse3: importing pyfuse3 costs more than a no-change snapshot itself."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        log.debug("no write-back of %r: %s", path, exc)
        return
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            log.warning("write-back of the cached data of %r failed: %s", path, os.strerror(ctypes.get_errno()))
    finally:
        os.close(fd)


def _top_mount(path: bytes) -> tuple[str, str] | None:
    """(device, type) of the file system mounted at `path`: the last one, since mounts stack."""
    found = None
    for where, device, fstype in mounts():
        if where == path:
            found = (device, fstype)
    return found


def mounts() -> Iterator[tuple[bytes, str, str]]:
    """(mountpoint, `major:minor`, type) of each mount of this process, from mountinfo."""
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            if len(fields) > 4:
                fstype = line.partition(b" - ")[2].split(b" ")[0].decode(errors="replace")
                yield unescape_mountinfo(fields[4]), fields[2].decode(), fstype


def unescape_mountinfo(field: bytes) -> bytes:
    """A path as mountinfo writes it, back to its bytes: the kernel escapes space, tab, newline and
    backslash as octal (`\\040`, `\\011`, `\\012`, `\\134`)."""
    return _MOUNTINFO_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), field)


async def raise_readahead(mountpoint: bytes, kib: int = READAHEAD_KIB) -> None:
    """Let the kernel read ahead `kib` KiB on this mount (root only; the default, 128 KiB, keeps a
    sequential reader waiting on every request). Best effort: other users keep the default.

    Run as a task of the serving loop: the kernel sets the value from the FUSE INIT reply, so it is
    changed only once that handshake is over."""
    import trio  # here: the CLI imports this module for its checks, and trio takes a while

    await trio.sleep(0.5)
    device = device_of_mount(mountpoint)
    if device is None or os.geteuid() != 0:
        return
    await trio.to_thread.run_sync(_write_sysfs, f"/sys/class/bdi/{device}/read_ahead_kb", str(kib))


def _write_sysfs(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        pass


def freeze_startup_heap() -> None:
    """Take everything allocated so far (modules, the repository, the mount's tables) out of the
    garbage collector's sight.

    A full collection holds the GIL, so the event loop, and every writer waiting on a FUSE reply,
    waits for it: with the ~40k objects a mount starts with, one took 40-60 ms during a snapshot
    (a writer's max stall 53-65 ms); frozen, 15-30 ms in the same runs, and 23-45 ms over nine runs
    of `scripts/bench.py --only pressure` (46-58 ms before). Frozen objects are still freed when
    their last reference goes; only cycles among them are never collected, which is why this runs
    once, at start."""
    gc.collect()
    gc.freeze()
