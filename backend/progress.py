"""How long-running engine work reports progress, without knowing who is watching.

The engine calls a `Progress` object from its main thread; the CLI passes one that draws rich
progress bars, tests and scripts pass `Progress()` (which ignores everything) or record calls.
`HonestTotal` wraps one whose byte total is an estimate, so that it never shows more done than
the total.
"""

from __future__ import annotations


class Progress:
    """No-op base; override what you want to show."""

    def start(self, total_bytes: int | None = None, total_items: int | None = None) -> None:
        """Work begins; totals are given when known in advance."""

    def set_totals(self, total_bytes: int | None = None, total_items: int | None = None) -> None:
        """Totals that became known after `start` (a backup counts its folder while it runs), or
        revised ones (a backup learns how its folder differs from its parent snapshot)."""

    def advance(self, nbytes: int = 0, items: int = 0, current: str | bytes | None = None) -> None:
        """Some bytes and/or items are done; `current` names what is being worked on (a path may
        come as bytes: decoding it for every file, shown or not, cost 5% of a no-change backup)."""

    def finish(self) -> None:
        """Work is over (successfully or not)."""


class HonestTotal(Progress):
    """Passes every call on to `shown`, with a byte total never below the bytes done: an estimate
    the work has passed is known to be wrong, and is raised to what is done before `shown` sees
    the excess (restic's bar does not pass 100% either). Items are passed on as they come."""

    def __init__(self, shown: Progress):
        self.shown = shown
        self.done_bytes = 0
        self.total_bytes: int | None = None

    def start(self, total_bytes: int | None = None, total_items: int | None = None) -> None:
        self.total_bytes = total_bytes
        self.shown.start(total_bytes, total_items)

    def set_totals(self, total_bytes: int | None = None, total_items: int | None = None) -> None:
        if total_bytes is not None:
            total_bytes = self.total_bytes = max(total_bytes, self.done_bytes)
        self.shown.set_totals(total_bytes, total_items)

    def advance(self, nbytes: int = 0, items: int = 0, current: str | bytes | None = None) -> None:
        self.done_bytes += nbytes
        if self.total_bytes is not None and self.done_bytes > self.total_bytes:
            self.total_bytes = self.done_bytes
            self.shown.set_totals(total_bytes=self.total_bytes)
        self.shown.advance(nbytes, items, current)

    def finish(self) -> None:
        self.shown.finish()
