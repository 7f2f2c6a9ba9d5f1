"""A snapshot shows the folder at the instant it was frozen, whatever the user does while it is read.

The engine-level test freezes a snapshot, copies the folder as it is at that instant, then changes
the folder in every way the live tree can (telling the point-in-time view first, as the live tree
does), and only then lets the backup read: what it stores must equal the copy. The mount-level test
runs a writer that never stops while snapshots are taken, and checks every snapshot is a state that
existed: a prefix of the writer's history. The crash test kills the daemon at random moments of
ordinary work and checks that each restart's first snapshot equals the folder as it is. The
full-disk test fills the disk that holds the folder and the changelog: writes get ENOSPC, and the
mount and its snapshots carry on. (A misbehaving store: test_store_pressure.py.)
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import TEST_BLOCK_SIZE, require_root
from live_mount import force_unmount, is_mounted, live_mount
from treecompare import differences

from backend.backup import Backup, backup
from backend.restore import restore
from backend.source import key_of
from fsmount.changelog import Changelog
from fsmount.frozen_view import FrozenView, SnapshotOverrun
from fsmount.live_tree import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

BS = TEST_BLOCK_SIZE


class ChangingFolder:
    """Changes a folder after a snapshot froze it, telling the view first, as the live tree does."""

    def __init__(self, root: Path, view: FrozenView):
        self.root, self.view = root, view

    def _keep_entries(self, rel_dir: str) -> None:
        path = self.root / rel_dir
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
        try:
            self.view.before_entries(key_of(os.fstat(fd)), fd)
        finally:
            os.close(fd)
        if rel_dir:
            self._keep(rel_dir, self.view.before_metadata)

    def _keep(self, rel: str, hook) -> None:
        path = self.root / rel
        if not os.path.lexists(path):
            return
        fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
        try:
            hook(key_of(os.lstat(path)), fd, os.fsencode(path.name))
        finally:
            os.close(fd)

    def write(self, rel: str, offset: int, data: bytes) -> None:
        if not (self.root / rel).exists():
            self._keep_entries(os.path.dirname(rel))
        fd = os.open(self.root / rel, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self.view.before_write(key_of(os.fstat(fd)), fd, offset, len(data))
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def truncate(self, rel: str, size: int) -> None:
        fd = os.open(self.root / rel, os.O_RDWR)
        try:
            self.view.before_truncate(key_of(os.fstat(fd)), fd, size)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def punch_hole(self, rel: str, offset: int, length: int) -> None:
        fd = os.open(self.root / rel, os.O_RDWR)
        try:
            self.view.before_write(key_of(os.fstat(fd)), fd, offset, length)  # as LiveTree.fallocate does
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        finally:
            os.close(fd)

    def rename(self, old: str, new: str) -> None:
        for rel in (old, new):
            self._keep_entries(os.path.dirname(rel))
            self._keep(rel, self.view.before_move)
        os.rename(self.root / old, self.root / new)

    def remove(self, rel: str) -> None:
        self._keep_entries(os.path.dirname(rel))
        self._keep(rel, self.view.before_move)
        path = self.root / rel
        os.rmdir(path) if path.is_dir() else os.unlink(path)

    def mkdir(self, rel: str) -> None:
        self._keep_entries(os.path.dirname(rel))
        os.mkdir(self.root / rel)

    def chmod(self, rel: str, mode: int) -> None:
        self._keep(rel, self.view.before_metadata)
        os.chmod(self.root / rel, mode)

    def setxattr(self, rel: str, name: bytes, value: bytes) -> None:
        self._keep(rel, self.view.before_metadata)
        os.setxattr(self.root / rel, name, value)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "project" / "src").mkdir(parents=True)
    for i in range(20):
        (root / "project" / "src" / f"m{i}.py").write_bytes(os.urandom(3000))
    (root / "big.img").write_bytes(os.urandom(12 * BS))
    (root / "sparse.img").write_bytes(b"")
    os.truncate(root / "sparse.img", 8 * BS)
    (root / "notes.txt").write_text("notes\n")
    (root / "old").mkdir()
    (root / "old" / "gone.txt").write_text("soon removed\n")
    os.symlink("notes.txt", root / "link")
    return root


def change_everything(folder: ChangingFolder) -> None:
    folder.write("big.img", 3 * BS + 10, b"overwritten after the instant")
    folder.write("big.img", 12 * BS, b"appended after the instant")
    folder.punch_hole("big.img", 6 * BS, 2 * BS)
    folder.truncate("notes.txt", 2)
    folder.write("sparse.img", 5 * BS, b"data where there was a hole")
    folder.rename("project/src", "project/lib")
    folder.write("project/lib/m1.py", 0, b"edited after being moved")
    folder.rename("project/lib/m2.py", "project/lib/m3.py")  # over an existing file
    folder.remove("project/lib/m4.py")
    folder.remove("old/gone.txt")
    folder.remove("old")
    folder.rename("link", "link-moved")
    folder.mkdir("new-dir")
    folder.write("new-dir/new.txt", 0, b"created after the instant")
    folder.chmod("project", 0o700)
    folder.setxattr("big.img", b"user.note", b"after")
    folder.truncate("big.img", BS // 2)


@pytest.mark.parametrize("rescan", [False, True], ids=["change-driven", "full-rescan"])
def test_snapshot_shows_its_instant_whatever_changes_after(repo, folder: Path, tmp_path: Path,
                                                           rescan: bool) -> None:
    parent = backup(repo, folder).snapshot
    changelog = Changelog(str(tmp_path / "changelog.sqlite"), BS)
    try:
        changelog.freeze()  # the epoch before the parent is covered by it
        # Changes of the epoch the snapshot freezes: these must be in it.
        with open(folder / "big.img", "r+b") as f:
            f.seek(3 * BS)
            f.write(b"written before the instant")
        changelog.mark_written(b"big.img", 3 * BS, 100)
        (folder / "project" / "src" / "m1.py").write_bytes(b"before the instant")
        changelog.mark_written(b"project/src/m1.py", 0, 100)
        frozen = changelog.freeze()
        view = FrozenView.at_freeze(os.open(folder, os.O_RDONLY | os.O_DIRECTORY), BS, str(tmp_path), 1 << 30,
                                    None if rescan else frozen.written_paths())
        expected = tmp_path / "at-the-instant"
        shutil.copytree(folder, expected, symlinks=True)

        change_everything(ChangingFolder(folder, view))

        result = Backup(repo, folder, parent=parent, changes=None if rescan else frozen, view=view).run()
        frozen.close()
        view.close()
    finally:
        changelog.close(clean=True)
    assert result.warnings == []
    restored = tmp_path / "restored"
    restore(repo, result.snapshot, restored)
    assert differences(expected, restored) == []


def test_a_view_that_cannot_keep_up_abandons_its_snapshot(repo, folder: Path, tmp_path: Path) -> None:
    parent = backup(repo, folder).snapshot
    view = FrozenView.at_freeze(os.open(folder, os.O_RDONLY | os.O_DIRECTORY), BS, str(tmp_path),
                                limit_bytes=2 * BS, written=None)
    changing = ChangingFolder(folder, view)
    for block in range(4):
        changing.write("big.img", block * BS, b"x" * 10)  # the fourth block does not fit
    with pytest.raises(SnapshotOverrun):
        Backup(repo, folder, parent=parent, view=view).run()
    view.close()
    assert [s.id for s in repo.snapshots()] == [parent.id]  # nothing half-true was recorded


# -- through the mount, with a writer that never stops ----------------------------------------------

RECORD = 4096  # one page: the kernel writes it back whole
FILES = 4
STATE_PAGES = 256  # state.bin, rewritten in place whole at every step: 1 MiB writeback requests


def state_page(seq: int) -> bytes:
    return f"{seq:010d}\n".encode().ljust(RECORD, b"-")


def record(seq: int) -> bytes:
    body = f"{seq:010d} {hashlib.sha256(str(seq).encode()).hexdigest()}\n".encode()
    return body.ljust(RECORD, b".")


class Writer(threading.Thread):
    """Appends numbered records round-robin to FILES logs and rotates them into `archive/`.

    Each log starts with a header page naming how many records follow, and after each record
    `state.bin` is overwritten in place with the record's number on every page. Every write is
    made durable (fsync) before the next begins, so the states that existed are exactly the
    prefixes of the step sequence: a snapshot must show records 1..n, each once, headers that are
    either up to date or one step behind their file, and state pages of step n or n-1 (a
    snapshot may fall within the state's write)."""

    def __init__(self, root: Path):
        super().__init__(daemon=True)
        self.root, self.stop, self.seq = root, threading.Event(), 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            (self.root / "archive").mkdir()
            counts = [0] * FILES
            generation = 0
            state = os.open(self.root / "state.bin", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                while not self.stop.is_set():
                    self.seq += 1
                    i = self.seq % FILES
                    log = self.root / f"log-{i}"
                    with open(log, "r+b" if log.exists() else "w+b") as f:
                        f.seek((counts[i] + 1) * RECORD)
                        f.write(record(self.seq))
                        f.flush()
                        os.fsync(f.fileno())
                        counts[i] += 1
                        f.seek(0)
                        f.write(json.dumps({"count": counts[i]}).encode().ljust(RECORD))
                        f.flush()
                        os.fsync(f.fileno())
                    os.pwrite(state, state_page(self.seq) * STATE_PAGES, 0)
                    os.fsync(state)
                    if counts[i] == 25:
                        generation += 1
                        os.rename(log, self.root / "archive" / f"log-{i}.{generation}")
                        counts[i] = 0
            finally:
                os.close(state)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def check_prefix(tree: Path) -> int:
    """The records a snapshot holds must be 1..n, each once; returns n."""
    seen: list[int] = []
    for path in [*tree.glob("log-*"), *tree.glob("archive/log-*")]:
        data = path.read_bytes()
        header = json.loads(data[:RECORD].rstrip(b"\0 ") or b'{"count": 0}')
        records = [data[o:o + RECORD] for o in range(RECORD, len(data), RECORD)]
        assert header["count"] in (len(records), len(records) - 1), f"{path.name}: header {header}, {len(records)} records"
        for rec in records:
            seq = int(rec[:10])
            assert rec == record(seq), f"{path.name}: record {seq} is torn"
            seen.append(seq)
    seen.sort()
    assert seen == list(range(1, len(seen) + 1)), f"not a prefix: {len(seen)} records, highest {seen[-1:]}"
    state = (tree / "state.bin").read_bytes() if (tree / "state.bin").exists() else b""
    steps = {int(state[o:o + 10]) for o in range(0, len(state), RECORD)}
    assert steps <= {len(seen), len(seen) - 1}, f"state.bin holds steps {sorted(steps)} with {len(seen)} records"
    return len(seen)


def test_snapshots_of_a_busy_folder_are_prefix_consistent(cli, tmp_path: Path) -> None:
    cli("init")
    source = tmp_path / "busy"
    source.mkdir()
    with live_mount(cli, source) as mnt:
        os.mkdir(mnt / ".snapshots" / "start")  # the full scan at mount start, before the writer
        writer = Writer(mnt)
        writer.start()
        names = []
        try:
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline and writer.is_alive():
                time.sleep(0.3)
                names.append(f"busy-{len(names)}")
                os.mkdir(mnt / ".snapshots" / names[-1])
        finally:
            writer.stop.set()
            writer.join()
        assert writer.error is None, writer.error
        assert len(names) >= 5
        held = [check_prefix(mnt / ".snapshots" / name) for name in names]
    assert held == sorted(held) and held[-1] > held[0] > 0  # each later, none empty


# -- kill -9 at a random moment, again and again ----------------------------------------------------

def random_work(root: Path, rng: random.Random, stop: threading.Event) -> None:
    """Ordinary work until the mount goes away under it: writes, appends, renames, removals."""
    try:
        while not stop.is_set():
            name = root / f"f{rng.randrange(12)}"
            action = rng.random()
            if action < 0.5:
                with open(name, "ab") as f:
                    f.write(os.urandom(rng.randrange(1, 200_000)))
                    if rng.random() < 0.3:
                        f.flush()
                        os.fsync(f.fileno())
            elif action < 0.7 and name.exists():
                with open(name, "r+b") as f:
                    f.seek(rng.randrange(max(1, name.stat().st_size)))
                    f.write(b"overwritten")
            elif action < 0.85 and name.exists():
                os.rename(name, root / f"f{rng.randrange(12)}")
            elif name.exists():
                name.unlink()
    except OSError:
        pass  # the daemon was killed: ENOTCONN from here on


def wait_stale(mountpoint: Path) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            os.statvfs(mountpoint)
        except OSError:
            return
        assert time.monotonic() < deadline, "the killed daemon's mount still answers"
        time.sleep(0.05)


CRASH_ROUNDS = 50


def mount_pid(cli, source: Path) -> int:
    said = cli("mount", source).stdout.decode()
    return int(re.search(r"daemon pid (\d+)", said).group(1))


def test_every_restart_after_kill_9_snapshots_the_source_as_it_is(cli, tmp_path: Path) -> None:
    cli("init")
    source = tmp_path / "work"
    source.mkdir()
    rng = random.Random(7)
    pid = mount_pid(cli, source)
    try:
        for round_ in range(CRASH_ROUNDS):
            stop = threading.Event()
            worker = threading.Thread(target=random_work, args=(source, rng, stop))
            worker.start()
            if rng.random() < 0.5:  # a snapshot mid-work: the next one builds on its changelog epoch
                time.sleep(rng.uniform(0.05, 0.3))
                with contextlib.suppress(OSError):
                    os.mkdir(source / ".snapshots" / f"mid-{round_}")
            time.sleep(rng.uniform(0.05, 0.4))
            os.kill(pid, signal.SIGKILL)  # mid-write, mid-rename, mid-flush: wherever it is
            wait_stale(source)
            stop.set()
            worker.join()
            pid = mount_pid(cli, source)  # clears the stale mount; the restart must not need any help
            os.mkdir(source / ".snapshots" / f"after-{round_}")
            taken = source / ".snapshots" / f"after-{round_}"
            assert differences(source, taken, file_mtime_slack_ns=2 * 10**9) == [], f"round {round_}"
        cli("umount", source)
    finally:
        if is_mounted(source):
            force_unmount(source)


# -- the source's disk fills up ----------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path):
    """A 16 MiB file system of its own (tmpfs), for a disk that fills up."""
    require_root("the full-disk test needs root to mount a small tmpfs")
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_gives_enospc_and_the_mount_carries_on(cli, small_disk: Path, tmp_path: Path) -> None:
    cli("init")
    cli.env["XDG_CACHE_HOME"] = str(small_disk / "cache")  # the changelog fills up with the folder
    source, mountpoint = small_disk / "work", tmp_path / "mnt"
    source.mkdir()
    mountpoint.mkdir()
    (source / "notes.txt").write_text("notes\n")
    # At a mountpoint of its own, so the folder itself can be compared: with the kernel's writeback
    # cache, a write the disk cannot hold fails at close or fsync, and until then the mount shows
    # the length the program wrote. The snapshot must hold what the folder holds.
    with live_mount(cli, source, mountpoint) as mnt:
        cli("snapshot", mnt)
        with pytest.raises(OSError) as full, open(mnt / "filler.bin", "wb") as f:
            for _ in range(64):
                f.write(os.urandom(1 << 20))
                f.flush()
                os.fsync(f.fileno())
        assert full.value.errno == errno.ENOSPC
        with pytest.raises(OSError):  # still full: whatever needs space fails as it would natively
            for i in range(100):
                (mnt / f"more-{i}.txt").write_bytes(os.urandom(100_000))
        assert "notes.txt" in os.listdir(mnt)  # the mount carries on
        json.loads(cli("status", mnt, "--json").stdout)
        os.unlink(mnt / "filler.bin")
        os.rename(mnt / "notes.txt", mnt / "renamed.txt")
        cli("snapshot", mnt)
        restored = tmp_path / "restored"
        cli("restore", "latest", "--target", restored)
        assert differences(source, restored) == []
