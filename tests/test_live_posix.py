"""The live tree behaves like a plain directory: random operations on both, compared at every step.

Times are left out (the two trees are written at different instants) and so is the placement of
holes (the kernel's page cache decides it for a FUSE mount); contents, sizes, types, modes, owners,
links, xattrs and every operation's result or errno must agree."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from live_mount import live_mount
from treecompare import assert_listing_agrees_with_stat, differences

from fsmount.live_tree import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocate

NAMES = ["a", "b", "c", "d\nnl", "\udcff-raw"]  # the last one is the non-UTF-8 byte 0xff
PATHS = st.sampled_from([*NAMES, *(f"dir/{n}" for n in NAMES)])
FALLOCATE_MODES = [0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE]


def _result(fn, *args) -> object:
    """What an operation returned, or which errno it failed with: both sides must agree."""
    try:
        return fn(*args)
    except OSError as exc:
        return errno.errorcode.get(exc.errno, exc.errno)


class LiveTreeVersusPlainDirectory(RuleBasedStateMachine):
    cli = None  # set by the test before running

    @initialize()
    def start(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="fsmount-posix-"))
        self.plain = self.work / "plain"
        self.source = self.work / "source"
        for root in (self.plain, self.source):
            (root / "dir").mkdir(parents=True)
        self.mount = live_mount(self.cli, self.source)
        self.live = self.mount.__enter__()

    def both(self, fn, *paths: str) -> None:
        results = [_result(fn, *(root / p for p in paths)) for root in (self.plain, self.live)]
        assert results[0] == results[1], f"{fn.__name__}{paths}: plain gave {results[0]!r}, live {results[1]!r}"

    @rule(path=PATHS, data=st.binary(max_size=3000), offset=st.integers(0, 200_000))
    def write(self, path: str, data: bytes, offset: int) -> None:
        def write_at(p: Path) -> int:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                return os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        self.both(write_at, path)

    @rule(path=PATHS, data=st.binary(max_size=100))
    def append(self, path: str, data: bytes) -> None:
        def append_to(p: Path) -> int:
            fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)
        self.both(append_to, path)

    @rule(path=PATHS)
    def create_exclusive(self, path: str) -> None:
        self.both(lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)), path)

    @rule(path=PATHS, size=st.integers(0, 300_000))
    def truncate(self, path: str, size: int) -> None:
        self.both(lambda p: os.truncate(p, size), path)

    @rule(path=PATHS, mode=st.sampled_from(FALLOCATE_MODES), offset=st.integers(0, 200_000),
          length=st.integers(1, 100_000))
    def fallocate(self, path: str, mode: int, offset: int, length: int) -> None:
        def allocate(p: Path) -> None:
            fd = os.open(p, os.O_RDWR)
            try:
                fallocate(fd, mode, offset, length)
            finally:
                os.close(fd)
        self.both(allocate, path)

    @rule(old=PATHS, new=PATHS)
    def rename(self, old: str, new: str) -> None:
        self.both(os.rename, old, new)

    @rule(old=PATHS, new=PATHS)
    def link(self, old: str, new: str) -> None:
        self.both(os.link, old, new)

    @rule(path=PATHS)
    def unlink(self, path: str) -> None:
        self.both(os.unlink, path)

    @rule(path=PATHS, mode=st.sampled_from([0o600, 0o644, 0o755, 0o4755, 0o1777]))
    def chmod(self, path: str, mode: int) -> None:
        self.both(lambda p: os.chmod(p, mode), path)

    @rule(path=st.sampled_from(["dir2", "dir/sub", "a"]))
    def mkdir(self, path: str) -> None:
        self.both(os.mkdir, path)

    @rule(path=st.sampled_from(["dir2", "dir/sub", "dir"]))
    def rmdir(self, path: str) -> None:
        self.both(os.rmdir, path)

    @rule(path=PATHS, link_target=st.sampled_from(["a", "../elsewhere", "dir/b"]))
    def symlink(self, path: str, link_target: str) -> None:
        self.both(lambda p: os.symlink(link_target, p), path)

    @rule(path=PATHS)
    def read(self, path: str) -> None:
        self.both(lambda p: p.read_bytes(), path)

    @invariant()
    def same_tree(self) -> None:
        if hasattr(self, "live"):
            assert differences(self.plain, self.live, times=False, sparse=False) == []

    @invariant()
    def listings_agree_with_stat(self) -> None:
        # Listed twice: the second lists the names the first showed the kernel without their
        # attributes (fsmount/bare_entries.py), and its inode numbers and types must still be right.
        if hasattr(self, "live"):
            for _ in range(2):
                for folder in (self.live, self.live / "dir"):
                    if folder.is_dir():
                        assert_listing_agrees_with_stat(folder)

    @precondition(lambda self: hasattr(self, "live"))
    @rule()
    def snapshot_matches(self) -> None:
        self.cli("snapshot", self.live)
        restored = self.work / "restored"
        shutil.rmtree(restored, ignore_errors=True)
        self.cli("restore", "latest", "--target", restored)
        assert differences(self.plain, restored, times=False, sparse=False) == []

    def teardown(self) -> None:
        if hasattr(self, "mount"):
            self.mount.__exit__(None, None, None)
            shutil.rmtree(self.work, ignore_errors=True)


@pytest.mark.fuse
def test_live_tree_behaves_like_a_plain_directory(cli) -> None:
    cli("init")
    LiveTreeVersusPlainDirectory.cli = cli
    state_machine = LiveTreeVersusPlainDirectory.TestCase
    state_machine.settings = settings(max_examples=8, stateful_step_count=40, deadline=None,
                                      suppress_health_check=list(HealthCheck))
    state_machine().runTest()
