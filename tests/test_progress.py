"""The backup's progress bar, on a terminal as a user sees it: it has a total, not `38.1/? MiB`."""

from __future__ import annotations

import os
import pty
import re
import subprocess
from pathlib import Path


def bar_totals(cli, *args: str | os.PathLike) -> set[bytes]:
    """Run fsmount with stderr on a pseudo-terminal (the bar shows only there); the totals its
    frames showed (`?` while none was known)."""
    master, slave = pty.openpty()
    cli.env.update(TERM="xterm")
    proc = cli.popen(*args, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    drawn = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other end is closed
            break
        if not chunk:
            break
        drawn += chunk
    os.close(master)
    assert proc.wait() == 0, drawn.decode(errors="replace")
    return set(re.findall(rb"[\d.]+/([\d.]+ MiB|\?)", drawn))


def test_the_backup_bar_shows_a_total(cli, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for i in range(3):
        (source / f"f{i}").write_bytes(os.urandom(8 << 20))
    cli("init")
    assert b"24.0 MiB" in bar_totals(cli, "backup", source)  # counted alongside: the first backup

    (source / "f0").write_bytes(os.urandom(8 << 20))
    assert bar_totals(cli, "backup", source) == {b"24.0 MiB"}  # the parent's size, from the start
