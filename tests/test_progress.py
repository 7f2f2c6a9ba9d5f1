"""The backup's progress bar, on a terminal as a user sees it: it has a total, not `38.1/? MiB`."""

from __future__ import annotations

import os
import pty
import re
import subprocess
from pathlib import Path

from backend.backup import Backup
from backend.progress import Progress


def bar_totals(cli, *args: str | os.PathLike) -> set[bytes]:
    """Run fsmount with stderr on a pseudo-terminal (the bar shows only there); the totals its
    frames showed (`?` while none was known)."""
    drawn = _drawn(cli, *args)
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


def bar_frames(cli, *args: str | os.PathLike) -> list[tuple[float, float]]:
    """(done, total) in MiB of every frame of the bar that showed a total."""
    return [(float(done), float(total)) for done, total in re.findall(rb"([\d.]+)/([\d.]+) MiB", _drawn(cli, *args))]


def _drawn(cli, *args: str | os.PathLike) -> bytes:
    """What fsmount drew on stderr, a pseudo-terminal (the bar shows only there)."""
    master, slave = pty.openpty()
    cli.env.update(TERM="xterm")
    proc = cli.popen(*args, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    drawn = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        drawn += chunk
    os.close(master)
    assert proc.wait() == 0, drawn.decode(errors="replace")
    return drawn


def test_the_bar_never_passes_its_total_when_files_grew_and_came(cli, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for i in range(2):
        (source / f"f{i}").write_bytes(os.urandom(8 << 20))
    cli("init")
    cli("backup", source)
    with open(source / "f0", "ab") as grown:
        grown.write(os.urandom(8 << 20))
    (source / "new").write_bytes(os.urandom(16 << 20))  # the parent says 16 MiB; the folder holds 40

    frames = bar_frames(cli, "backup", source)
    assert frames and all(done <= total for done, total in frames), frames
    assert frames[-1] == (40.0, 40.0)  # revised to what the folder holds


def test_the_bar_never_passes_its_total_when_the_parent_had_more(cli, tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "gone").mkdir(parents=True)
    (source / "gone" / "big").write_bytes(os.urandom(16 << 20))
    (source / "kept").write_bytes(os.urandom(8 << 20))
    cli("init")
    cli("backup", source)
    (source / "gone" / "big").unlink()
    (source / "gone").rmdir()

    frames = bar_frames(cli, "backup", source)
    assert frames[-1] == (8.0, 8.0)  # not 8 of 24: what was deleted is no longer to do


class _GrowOnceCounted(Progress):
    """Records (done, total) after each call; the moment the folder's count reports its total,
    grows a file the walk has not reached: the count undercounts, deterministically."""

    def __init__(self, path: Path):
        self.path, self.done, self.total, self.seen = path, 0, None, []

    def set_totals(self, total_bytes: int | None = None, total_items: int | None = None) -> None:
        if self.total is None:
            with open(self.path, "ab") as f:
                f.write(os.urandom(1 << 20))
        self.total = total_bytes
        self.seen.append((self.done, self.total))

    def advance(self, nbytes: int = 0, items: int = 0, current: str | bytes | None = None) -> None:
        self.done += nbytes
        self.seen.append((self.done, self.total))


def test_a_count_that_undercounts_is_raised_not_passed(repo, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("a", "b"):
        (source / name).write_bytes(os.urandom(1 << 20))
    watched = _GrowOnceCounted(source / "b")

    Backup(repo, source, progress=watched, count_totals=True).run()

    assert watched.total == 3 << 20
    assert all(total is None or done <= total for done, total in watched.seen), watched.seen
