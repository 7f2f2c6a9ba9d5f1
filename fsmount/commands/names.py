"""The options that name a snapshot or its host, checked as they are parsed: before any work.

The rules are `backend.snapshot.check_name` and `check_text`, the ones `mkdir
MOUNT/.snapshots/NAME` and the engine apply too; a name they refuse is a usage error (exit 2).
"""

from __future__ import annotations

import click

from backend.snapshot import BadName, check_name, check_text


def snapshot_name_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """`--name`: None, or a name `check_name` accepts."""
    return check_name(value) if value is not None else None


def host_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """`--host`: None, or printable UTF-8 text (a snapshot object cannot hold other bytes), not
    empty (it would stand for this machine's name)."""
    if value == "":
        raise BadName("a host name may not be empty", "form")
    return check_text("a host name", value) if value is not None else None
