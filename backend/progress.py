"""How long-running engine work reports progress, without knowing who is watching.

The engine calls a `Progress` object from its main thread; the CLI passes one that draws rich
progress bars, tests and scripts pass `Progress()` (which ignores everything) or record calls.
"""

from __future__ import annotations


class Progress:
    """No-op base; override what you want to show."""

    def start(self, total_bytes: int | None = None, total_items: int | None = None) -> None:
        """Work begins; totals are given when known in advance."""

    def set_totals(self, total_bytes: int | None = None, total_items: int | None = None) -> None:
        """Totals that became known after `start` (a backup counts its folder while it runs)."""

    def advance(self, nbytes: int = 0, items: int = 0, current: str | bytes | None = None) -> None:
        """Some bytes and/or items are done; `current` names what is being worked on (a path may
        come as bytes: decoding it for every file, shown or not, cost 5% of a no-change backup)."""

    def finish(self) -> None:
        """Work is over (successfully or not)."""
