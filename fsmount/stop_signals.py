"""The signals that stop a daemon (SIGTERM, SIGINT, SIGHUP), caught from before it mounts.

trio hears signals only once `trio.open_signal_receiver` is open, inside the serving loop. Until
then a signal's default action kills the daemon with its file system still mounted, stale: a test
that sent SIGTERM as soon as a mount was ready hit that window on a loaded machine. So `hold()`,
called before mounting, records any that arrive; the loop checks `received` once `watch()` has
started, and does not start serving if one came; `watch()` hands on every later one.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import trio

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopSignals:
    def __init__(self) -> None:
        self.received: list[int] = []

    def hold(self) -> None:
        """Record stop signals from now on instead of dying of them (on the main thread)."""
        for signum in SIGNALS:
            signal.signal(signum, lambda signum, _frame: self.received.append(signum))

    async def watch(self, on_signal: Callable[[int], None], *,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Call `on_signal` for each stop signal from when this task has started."""
        with trio.open_signal_receiver(*SIGNALS) as signals:
            task_status.started()
            async for signum in signals:
                self.received.append(signum)
                on_signal(signum)
