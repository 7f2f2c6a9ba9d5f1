"""Mountpoints: is one usable, is something mounted there, is that mount stale."""

from __future__ import annotations

import errno
import os

from backend.errors import UsageError


def check_mountpoint(mountpoint: bytes) -> None:
    """Refuse a missing mountpoint, a stale one, or one where something is mounted already."""
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


def mounted_at(path: bytes) -> bool:
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            if len(fields) > 4 and fields[4].replace(b"\\040", b" ") == path:
                return True
    return False


def is_stale(path: bytes) -> bool:
    """A FUSE mount whose daemon is gone answers with ENOTCONN (statvfs: never from a cache)."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False
