"""The control channel between the `fsmount` command and a running live mount.

One Unix socket per mountpoint, in a directory only its owner can enter, with the socket itself
0600. The protocol is one JSON object per line each way: a request `{"op": ..., ...}` and a reply
`{"ok": true, ...}` or `{"ok": false, "error": "one line"}`. Ops: `status`, `snapshot` (optional
`name`), `unmount`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable

import trio

from backend.errors import FsmountError, UsageError

log = logging.getLogger(__name__)

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
    return hashlib.sha256(os.path.realpath(os.fsencode(mountpoint))).hexdigest()[:16]


def socket_path(mountpoint: str | bytes) -> str:
    return os.path.join(runtime_dir(), mount_id(mountpoint) + ".sock")


Handler = Callable[[dict], Awaitable[dict]]


async def serve(path: str, handler: Handler, *, stop: trio.Event, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Answer requests on `path` until `stop` is set; requests in flight still get their replies."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await listener.bind(path)
    finally:
        os.umask(old_umask)
    listener.listen(8)
    task_status.started()
    try:
        async with trio.open_nursery() as connections:
            with trio.CancelScope() as accepting:
                connections.start_soon(_cancel_when_set, stop, accepting)
                while True:
                    conn, _ = await listener.accept()
                    connections.start_soon(_answer, trio.SocketStream(conn), handler)
    finally:
        listener.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _answer(stream: trio.SocketStream, handler: Handler) -> None:
    async with stream:
        buffer = b""
        while b"\n" not in buffer and len(buffer) < MAX_LINE:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buffer += chunk
        try:
            request = json.loads(buffer.split(b"\n", 1)[0])
            reply = await handler(request)
            reply.setdefault("ok", True)
        except FsmountError as exc:
            reply = {"ok": False, "error": str(exc), "exit_code": exc.exit_code}
        except (ValueError, KeyError, TypeError) as exc:
            reply = {"ok": False, "error": f"bad request: {exc}", "exit_code": 2}
        except Exception as exc:  # a bug must cost one request, never the mount
            log.exception("control request failed")
            reply = {"ok": False, "error": f"internal error: {exc!r} (see the mount's log)", "exit_code": 1}
        try:
            await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def request(mountpoint: str | bytes, doc: dict, *, timeout: float | None = 30.0) -> dict:
    """Send one request to the live mount at `mountpoint` and return its reply (synchronous)."""
    path = socket_path(mountpoint)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise UsageError(f"{os.fsdecode(mountpoint)} is not a running fsmount live mount") from None
        sock.sendall(json.dumps(doc).encode() + b"\n")
        with sock.makefile("rb") as reply:
            line = reply.readline(MAX_LINE)
    except socket.timeout:
        raise FsmountError(f"the mount at {os.fsdecode(mountpoint)} did not answer in {timeout:.0f} s") from None
    finally:
        sock.close()
    if not line:
        raise FsmountError(f"the mount at {os.fsdecode(mountpoint)} closed the control connection")
    return json.loads(line)
