"""The control channel between the `fsmount` command and a running live mount.

One Unix socket per mountpoint, in a directory only its owner can enter, with the socket itself
0600. The protocol is one JSON object per line each way: a request `{"op": ..., ...}` and a reply
`{"ok": true, ...}` or `{"ok": false, "error": "one line"}`. Ops: `status`, `snapshot` (optional
`name`), `unmount`. This module is the client side and the naming of sockets; the daemon's side is
control_server.py (it needs trio, which the client need not pay to import).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket

from backend.errors import FsmountError, UsageError

from .mountpoint import enclosing_mount, is_stale

MAX_LINE = 1 << 20


def runtime_dir() -> str:
    """Where sockets and daemon logs live: $XDG_RUNTIME_DIR/fsmount, else the cache dir; mode 0700."""
    if os.environ.get("XDG_RUNTIME_DIR"):
        path = os.path.join(os.environ["XDG_RUNTIME_DIR"], "fsmount")
    else:
        path = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fsmount", "run")
    if len(path) > 70:  # a Unix socket path must fit in 108 bytes
        path = f"/tmp/fsmount-{os.getuid()}-{hashlib.sha256(path.encode()).hexdigest()[:12]}"
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def mount_id(mountpoint: str | bytes) -> str:
    """A short stable name for a mountpoint, used for its socket and log file."""
    try:
        real = os.path.realpath(os.fsencode(mountpoint))
    except OSError as exc:  # a path in a mount whose daemon is gone (ENOTCONN), on some Pythons
        if exc.errno == errno.ENOTCONN:
            raise dead_mount_error(mountpoint) from None
        raise UsageError(f"{os.fsdecode(mountpoint)}: {exc.strerror}") from None
    return hashlib.sha256(real).hexdigest()[:16]


def dead_mount_error(path: str | bytes) -> FsmountError:
    """The error for a path in a mount whose daemon died (kill -9, a crash): every request there
    fails with ENOTCONN until the mount is cleared. It names the mount, not the path (`.`)."""
    found = enclosing_mount(os.path.abspath(os.fsencode(path)))
    where = os.fsdecode(found[0] if found else path)
    return FsmountError(f"{where} is a dead mount: its fsmount daemon is gone (killed or crashed); clear it "
                        f"with `fsmount umount {where}` (or `fusermount3 -uz {where}`), then mount again")


def socket_path(mountpoint: str | bytes) -> str:
    return os.path.join(runtime_dir(), mount_id(mountpoint) + ".sock")


def request(mountpoint: str | bytes, doc: dict, *, timeout: float | None = 30.0) -> dict:
    """Send one request to the live mount at `mountpoint` and return its reply (synchronous)."""
    path = socket_path(mountpoint)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            if is_stale(os.fsencode(mountpoint)):
                raise dead_mount_error(mountpoint) from None
            raise UsageError(f"{os.fsdecode(mountpoint)} is not a running fsmount live mount") from None
        sock.sendall(json.dumps(doc).encode() + b"\n")
        with sock.makefile("rb") as reply:
            line = reply.readline(MAX_LINE)
    except TimeoutError:
        raise FsmountError(f"the mount at {os.fsdecode(mountpoint)} did not answer in {timeout:.0f} s") from None
    finally:
        sock.close()
    if not line:
        raise FsmountError(f"the mount at {os.fsdecode(mountpoint)} closed the control connection")
    return json.loads(line)
