"""Mounts for tests: started with the real CLI, always cleaned up, even after a failure.

`with live_mount(cli, source) as mnt:` mounts (over the source itself unless a mountpoint is
given), yields the mountpoint, and unmounts with `fsmount umount` (which takes the final snapshot).
`with snapshot_mount(cli, mountpoint) as (mnt, pid):` does the same for `mount-snapshots`.
If the test left the mount broken, the FUSE connection is aborted and the daemon killed, so one
failing test cannot hang the rest of the suite.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IN_CI

from fsmount import mountpoint as mountpoint_module


def require_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        if IN_CI:
            pytest.fail("/dev/fuse is missing: FUSE tests must run in CI")
        pytest.skip("/dev/fuse is missing")


def _fuse_mounts() -> dict[str, str]:
    """mountpoint -> fs type for FUSE mounts of this machine."""
    found = {}
    for mountpoint, _device, fstype in mountpoint_module.mounts():
        if fstype.startswith("fuse"):
            found[os.fsdecode(mountpoint)] = fstype
    return found


def _fuse_connection(mountpoint: Path) -> int | None:
    """The FUSE connection number of a mount (its device's minor), read from the mount table: a
    mount whose daemon is gone cannot be stat()ed (ENOTCONN)."""
    wanted = os.fsencode(mountpoint.resolve())
    for found, device, fstype in mountpoint_module.mounts():
        if found == wanted and fstype.startswith("fuse"):
            return int(device.partition(":")[2])
    return None


def force_unmount(mountpoint: Path) -> None:
    """Abort a FUSE mount that no daemon serves any more, then detach it.

    Only this mount's connection: other tests (parallel workers) and other programs keep theirs."""
    connections = Path("/sys/fs/fuse/connections")
    if not any(connections.iterdir()) if connections.exists() else True:
        subprocess.run(["mount", "-t", "fusectl", "none", str(connections)], check=False, capture_output=True)
    connection = _fuse_connection(mountpoint)
    if connection is not None:
        with contextlib.suppress(OSError):
            (connections / str(connection) / "abort").write_text("1")
    subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)


def is_mounted(mountpoint: Path) -> bool:
    return str(mountpoint.resolve()) in _fuse_mounts()


@contextlib.contextmanager
def live_mount(cli, source: Path, mountpoint: Path | None = None, *extra: str,
               options: tuple[str, ...] = ()) -> Iterator[Path]:
    """`options` go before `mount`: the global ones, such as `-r` and `--degraded`."""
    require_fuse()
    target = mountpoint or source
    out = cli(*options, "mount", source, *([target] if mountpoint else []), *extra).stdout.decode()
    pid = int(re.search(r"daemon pid (\d+)", out).group(1))  # type: ignore[union-attr]
    try:
        yield target
        if is_mounted(target):
            cli("umount", target)
    finally:
        if is_mounted(target):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            force_unmount(target)


@contextlib.contextmanager
def snapshot_mount(cli, mountpoint: Path, *extra: str) -> Iterator[tuple[Path, int]]:
    require_fuse()
    mountpoint.mkdir(exist_ok=True)
    out = cli("mount-snapshots", mountpoint, *extra).stdout.decode()
    pid = int(re.search(r"daemon pid (\d+)", out).group(1))  # type: ignore[union-attr]
    try:
        yield mountpoint, pid
        if is_mounted(mountpoint):
            cli("umount", mountpoint)
    finally:
        if is_mounted(mountpoint):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            force_unmount(mountpoint)


def sigterm_as_it_mounts(daemon: subprocess.Popen, mountpoint: Path, timeout: float) -> None:
    """SIGTERM to a starting daemon the moment the kernel shows its mount; fail if the mount
    outlives the daemon (a stop signal must unmount, however early it comes)."""
    deadline = time.monotonic() + timeout
    while not is_mounted(mountpoint) and daemon.poll() is None:
        assert time.monotonic() < deadline, "never mounted"
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(timeout=timeout)
    finally:
        if is_mounted(mountpoint):
            daemon.kill()
            force_unmount(mountpoint)
            pytest.fail("SIGTERM while the daemon was starting to serve left its mount behind")
