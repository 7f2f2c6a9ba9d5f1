"""Starting a mount daemon in the background and knowing whether it came up.

`start()` runs `fsmount ... -f` detached (its own session, output to a log file) and waits on a
pipe until the daemon says `ready` or reports its error, so `fsmount mount` returns only once the
mount is live or fails with the daemon's one-line message and exit code. Warnings the daemon has
for the user before it is ready (`report_warning`: it mounted without its store) come the same way,
so that they reach the terminal and not only the daemon's log. A passphrase the parent
already has (perhaps typed at a prompt) travels through a second pipe, never through the
environment or the command line.
"""

from __future__ import annotations

import os
import subprocess
import sys

from backend.errors import FsmountError

READY_FD_ENV = "FSMOUNT_READY_FD"
PASSWORD_FD_ENV = "FSMOUNT_PASSWORD_FD"


class DaemonFailed(FsmountError):
    """The background daemon reported an error before it was ready."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def start(argv: list[str], log_path: str, passphrase: bytes, *, timeout_s: float = 120.0) -> tuple[int, list[str]]:
    """Start `fsmount ARGV` (which must include -f) detached; returns its pid once it is ready, and
    the warnings it reported before."""
    ready_r, ready_w = os.pipe()
    pass_r, pass_w = os.pipe()
    os.write(pass_w, passphrase)
    os.close(pass_w)
    env = dict(os.environ, **{READY_FD_ENV: str(ready_w), PASSWORD_FD_ENV: str(pass_r)})
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fsmount", *argv], env=env, pass_fds=(ready_w, pass_r),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    os.close(ready_w)
    os.close(pass_r)
    warnings: list[str] = []
    with os.fdopen(ready_r, "rb") as pipe:
        reply = pipe.readline().decode(errors="replace").strip()
        while reply.startswith("warning "):
            warnings.append(reply.removeprefix("warning "))
            reply = pipe.readline().decode(errors="replace").strip()
    if reply == "ready":
        return proc.pid, warnings
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
    if reply.startswith("error "):
        code, _, message = reply[len("error "):].partition(" ")
        raise DaemonFailed(message, int(code))
    raise FsmountError(f"the mount daemon exited before it was ready; see {log_path}")


def is_daemon() -> bool:
    """True in a daemon that `start()` started, until it has reported how its start went."""
    return READY_FD_ENV in os.environ


def report_ready() -> None:
    """In a daemon started by `start()`: tell the parent the mount is live."""
    _report("ready")


def report_warning(message: str) -> None:
    """In a daemon started by `start()`, before it is ready: a warning for the parent to print."""
    fd = os.environ.get(READY_FD_ENV)
    if fd is not None:
        try:
            os.write(int(fd), b"warning " + message.replace("\n", " ").encode(errors="backslashreplace") + b"\n")
        except OSError:
            pass


def report_failure(message: str, exit_code: int) -> None:
    """In a daemon started by `start()`: hand the parent the error that stopped us."""
    _report(f"error {exit_code} {message}")


def _report(line: str) -> None:
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return
    try:
        os.write(int(fd), line.replace("\n", " ").encode() + b"\n")
        os.close(int(fd))
    except OSError:
        pass


def inherited_passphrase() -> bytes | None:
    """The passphrase handed over by `start()`, if this process is such a daemon."""
    fd = os.environ.pop(PASSWORD_FD_ENV, None)
    if fd is None:
        return None
    with os.fdopen(int(fd), "rb") as pipe:
        return pipe.read()
