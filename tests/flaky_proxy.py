"""An HTTP proxy in front of the test S3 server that answers a set share of requests with errors.

The daemon under test talks HTTP to the proxy as to any S3 endpoint; the proxy forwards each request
to SeaweedFS unchanged, except that with probability `error_rate` it answers `503 SlowDown` itself
(after reading the request, so the connection stays usable), as a throttling provider does. It
speaks just enough HTTP/1.1 for S3 clients: keep-alive, bodies framed by Content-Length or chunked.
"""

from __future__ import annotations

import random
import socket
import socketserver
import threading
from typing import BinaryIO, Self
from urllib.parse import urlsplit

_SLOW_DOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
              b"<Message>Please reduce your request rate (injected).</Message></Error>")


def _read_head(stream: BinaryIO) -> tuple[bytes, dict[bytes, bytes]] | None:
    """The start line and headers (lower-cased names) of one message; None at end of stream."""
    first = stream.readline()
    if not first:
        return None
    lines = [first]
    while True:
        line = stream.readline()
        if not line:
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            break
    headers = {}
    for line in lines[1:-1]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return b"".join(lines), headers


def _read_body(stream: BinaryIO, headers: dict[bytes, bytes]) -> bytes:
    """The body exactly as framed on the wire (chunked bodies keep their framing)."""
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        parts = []
        while True:
            size_line = stream.readline()
            parts.append(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    trailer = stream.readline()
                    parts.append(trailer)
                    if trailer in (b"\r\n", b"\n", b""):
                        return b"".join(parts)
            parts.append(stream.read(size + 2))
    return stream.read(int(headers.get(b"content-length", b"0")))


class _Handler(socketserver.StreamRequestHandler):
    server: FlakyProxy

    def handle(self) -> None:
        upstream: socket.socket | None = None
        reply_stream: BinaryIO | None = None
        try:
            while True:
                request = _read_head(self.rfile)
                if request is None:
                    return
                head, headers = request
                if headers.get(b"expect", b"").lower() == b"100-continue":
                    # Answered here, so the upstream never sends a 100 of its own.
                    self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    head = b"".join(line for line in head.splitlines(keepends=True)
                                    if not line.lower().startswith(b"expect:"))
                body = _read_body(self.rfile, headers)
                if self.server.fail_now():
                    self.wfile.write(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                                     b"Content-Length: %d\r\n\r\n%s" % (len(_SLOW_DOWN), _SLOW_DOWN))
                    continue
                if upstream is None or reply_stream is None:
                    upstream = socket.create_connection(self.server.upstream)
                    reply_stream = upstream.makefile("rb")
                upstream.sendall(head + body)
                response = _read_head(reply_stream)
                if response is None:
                    return
                reply_head, reply_headers = response
                status = int(reply_head.split(b" ", 2)[1])
                no_body = head.startswith(b"HEAD ") or status in (204, 304) or 100 <= status < 200
                self.wfile.write(reply_head + (b"" if no_body else _read_body(reply_stream, reply_headers)))
        except (OSError, ValueError):
            return  # a client or server went away: so does this connection
        finally:
            if upstream is not None:
                upstream.close()


class FlakyProxy(socketserver.ThreadingTCPServer):
    """Serves on 127.0.0.1 at `endpoint`; forwards to `upstream_endpoint`, failing `error_rate` of requests."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream_endpoint: str, error_rate: float, *, seed: int = 0):
        parts = urlsplit(upstream_endpoint)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.error_rate = error_rate
        self.failed = self.forwarded = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def fail_now(self) -> bool:
        with self._lock:
            fail = self._rng.random() < self.error_rate
            if fail:
                self.failed += 1
            else:
                self.forwarded += 1
            return fail

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
        self.server_close()
