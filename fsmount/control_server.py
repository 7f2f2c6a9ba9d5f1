"""The daemon's side of the control channel (control.py): answer one JSON request per connection."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable

import trio

from backend.errors import FsmountError

from .control import MAX_LINE

log = logging.getLogger(__name__)


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
