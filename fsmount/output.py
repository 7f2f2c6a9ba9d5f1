"""Everything the CLI prints: plain lines, sizes for humans, JSON for scripts, tables and
progress bars for terminals.

Plain lines go out through click, as they are: rich would read `[...]` and `:name:` in a path as
markup and emoji codes, and loading it is 45 ms of the 0.25 s a `fsmount snapshot` takes. rich
draws the tables and progress bars, and is loaded only by the commands that show one.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from backend.errors import CONTROL_ESCAPES, FsmountError, shown_name
from backend.progress import Progress

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress as RichBar
    from rich.progress import TaskID


def say(text: str, *, err: bool = False) -> None:
    """One line of plain text on stdout (stderr with `err`)."""
    click.echo(text, err=err)


def say_styled(label: str, text: str, **style: Any) -> None:
    """`label` (styled on a terminal, e.g. bold=True) and `text` as it is, on stderr."""
    click.echo(f"{click.style(label, **style)} {text}", err=True)


@functools.cache
def console(*, err: bool = False) -> Console:
    """The rich Console for tables (stdout) and progress bars (`err`: stderr), made on first use."""
    from rich.console import Console

    if err:
        return Console(stderr=True, highlight=False, soft_wrap=True)
    # Piped output is not cut to 80 columns: tables keep whole paths for whoever reads the file.
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 240)


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.obj.json = True


json_option = click.option("--json", "json_output", is_flag=True, expose_value=False, callback=_set_json,
                           help="Print machine-readable JSON on stdout.")
"""`--json` accepted after the subcommand too (`fsmount snapshots --json`), as scripts expect."""


_UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str) -> int:
    """Bytes in a size like 128K, 1M, 4MiB or 65536."""
    number = text.strip().lower().removesuffix("ib").removesuffix("b")
    if number and number[-1] in _UNITS:
        size = int(number[:-1]) * _UNITS[number[-1]]
    else:
        size = int(number)
    if size < 0:
        raise ValueError(f"negative size {text!r}")
    return size


def counted(n: int, singular: str, plural: str | None = None) -> str:
    """`n` and the noun it counts, singular for one: "1 pack", "2 packs"."""
    return f"{n} {singular if n == 1 else plural or singular + 's'}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_json_additions: list[Callable[[], dict[str, Any]]] = []
_json_emitted = False


def add_to_json(fields: Callable[[], dict[str, Any]]) -> None:
    """Have every JSON object this run prints from now on carry `fields()` too (what degraded
    writes left out of a replica, whatever the command)."""
    _json_additions.append(fields)


def emit_json(doc: Any) -> None:
    """`doc` as JSON on stdout, with the fields of `add_to_json` if it is an object. Paths go in
    through `json_path`; any other text holding bytes that are not UTF-8 (a message naming such a
    file) gets them as \\xNN, never as a lone surrogate, which strict JSON parsers reject."""
    global _json_emitted
    if isinstance(doc, dict):
        for fields in _json_additions:
            doc = doc | fields()
    _json_emitted = True
    json.dump(_valid_text(doc), sys.stdout, indent=2, default=_json_default)
    sys.stdout.write("\n")


def error_fields(failure: FsmountError | None) -> dict[str, Any]:
    """What the CLI's edge would print for `failure` under --json, for a command that prints its
    document and then raises it: `{"error": message, "exit_code": code}`, or {} without one."""
    return {} if failure is None else {"error": one_line(str(failure)), "exit_code": failure.exit_code}


def json_emitted() -> bool:
    """Whether this run has printed a JSON document (the CLI's edge then prints no second one)."""
    return _json_emitted


def _valid_text(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return display_name(value.encode(errors="surrogateescape"))
        return value
    if isinstance(value, dict):
        return {key: _valid_text(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_valid_text(item) for item in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return display_name(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def json_path(key: str, path: bytes | str) -> dict[str, str]:
    """A path for JSON output: `{key: text}`, the text as plain output shows it (`line_name`: a
    byte that is not UTF-8 as \\xNN, a control character escaped, a backslash doubled), which
    `ls` and `restore` take back; and, when that text is not the path's own bytes, `{key_hex: the
    bytes in hex}` too. Every --json output that names a path says it so."""
    raw = os.fsencode(path)
    text = line_name(raw)
    return {key: text} if text.encode() == raw else {key: text, f"{key}_hex": raw.hex()}


def display_name(name: bytes) -> str:
    """A name as a terminal can show it; bytes that are not UTF-8 appear as \\xNN escapes."""
    return name.decode("utf-8", errors="backslashreplace")


def line_name(name: bytes) -> str:
    """`display_name`, with control characters escaped too (a newline in a name as \\n) and a
    backslash doubled (so that no name reads as another's escape), for output that shows one
    entry per line. `name_from_line` reads it back. The engine's messages name paths so too."""
    return shown_name(name)


def path_line(path: str | bytes) -> str:
    """A path or location as a plain line names it: `line_name` of its bytes (a folder given on
    the command line may hold any byte, a newline too)."""
    return line_name(os.fsencode(path))


def one_line(message: str) -> str:
    """A message, an error's above all, as one line of valid text: a path in it that holds bytes
    that are not UTF-8 shows them as \\xNN, and a newline or other control character is escaped."""
    return display_name(message.encode(errors="surrogateescape")).translate(CONTROL_ESCAPES)


_ESCAPE = re.compile(rb"\\(\\|n|t|x[0-9a-fA-F]{2})")
_UNESCAPED = {b"\\": b"\\", b"n": b"\n", b"t": b"\t"}


def name_from_line(text: str) -> bytes:
    """The name that `line_name` shows as `text` (what a user copies from `fsmount ls`)."""
    def one(match: re.Match) -> bytes:
        code = match.group(1)
        return _UNESCAPED.get(code) or bytes([int(code[1:], 16)])
    return _ESCAPE.sub(one, os.fsencode(text))


class BarProgress(Progress):
    """A rich progress bar on stderr; nothing at all when stderr is not a terminal."""

    def __init__(self, description: str, *, enabled: bool = True):
        self.description = description
        self.enabled = enabled and sys.stderr.isatty()
        self._bar: RichBar | None = None
        self._task: TaskID | None = None

    def start(self, total_bytes: int | None = None, total_items: int | None = None) -> None:
        if not self.enabled:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichBar

        self._bar = RichBar(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                            TransferSpeedColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[current]}", style="dim"),
                            console=console(err=True), transient=True)
        self._bar.start()
        self._task = self._bar.add_task(self.description, total=total_bytes, current="")

    def set_totals(self, total_bytes: int | None = None, total_items: int | None = None) -> None:
        if self._bar is not None and self._task is not None and total_bytes is not None:
            self._bar.update(self._task, total=total_bytes)

    def advance(self, nbytes: int = 0, items: int = 0, current: str | bytes | None = None) -> None:
        if self._bar is not None and self._task is not None:
            if current is not None:
                shown = display_name(current[-40:]) if isinstance(current, bytes) else current[-40:]
                self._bar.update(self._task, advance=nbytes, current=shown)
            else:
                self._bar.update(self._task, advance=nbytes)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
