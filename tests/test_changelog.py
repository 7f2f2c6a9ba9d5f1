"""Change-driven snapshots: the changelog plus the engine give exactly what a full rescan gives,
while reading only what was written and listing only directories on a changed path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import TEST_BLOCK_SIZE
from treecompare import differences

from backend.backup import Backup, backup
from backend.restore import restore
from fsmount.changelog import Changelog


class Folder:
    """A source folder whose every change is also marked in a changelog, as the live tree does."""

    def __init__(self, root: Path, changelog: Changelog):
        self.root, self.log = root, changelog

    def p(self, rel: str) -> Path:
        return self.root / rel

    def write(self, rel: str, offset: int, data: bytes) -> None:
        existed = self.p(rel).exists()
        with open(self.p(rel), "r+b" if existed else "wb") as f:
            f.seek(offset)
            f.write(data)
        if not existed:
            self.log.mark_created(rel.encode())
        self.log.mark_written(rel.encode(), offset, len(data))

    def mkdir(self, rel: str) -> None:
        self.p(rel).mkdir()
        self.log.mark_created(rel.encode())

    def rename(self, old: str, new: str) -> None:
        os.rename(self.p(old), self.p(new))
        self.log.mark_renamed(old.encode(), new.encode())

    def unlink(self, rel: str) -> None:
        is_dir = self.p(rel).is_dir()
        if is_dir:
            shutil.rmtree(self.p(rel))
        else:
            self.p(rel).unlink()
        self.log.mark_removed(rel.encode(), is_dir=is_dir)

    def chmod(self, rel: str, mode: int) -> None:
        self.p(rel).chmod(mode)
        self.log.mark_metadata(rel.encode())

    def truncate(self, rel: str, size: int) -> None:
        os.truncate(self.p(rel), size)
        self.log.mark_truncated(rel.encode())


@pytest.fixture
def folder(repo, tmp_path: Path):
    root = tmp_path / "src"
    (root / "project" / "src").mkdir(parents=True)
    for i in range(30):
        (root / "project" / "src" / f"m{i}.py").write_bytes(os.urandom(2000))
    (root / "big.img").write_bytes(os.urandom(40 * TEST_BLOCK_SIZE))
    (root / "notes.txt").write_text("notes\n")
    changelog = Changelog(str(tmp_path / "changelog.sqlite"), TEST_BLOCK_SIZE)
    yield Folder(root, changelog)
    changelog.close(clean=True)


class Snapshotter:
    def __init__(self, repo, folder: Folder, tmp_path: Path):
        self.repo, self.folder, self.tmp = repo, folder, tmp_path
        self.parent = backup(repo, folder.root).snapshot
        folder.log.freeze()  # the epoch before the basis snapshot is covered by it
        self.count = 0

    def snapshot(self):
        frozen = self.folder.log.freeze()
        try:
            result = Backup(self.repo, self.folder.root, parent=self.parent, changes=frozen).run()
        finally:
            frozen.close()
        self.folder.log.snapshot_done(frozen, result.snapshot.id)
        self.parent = result.snapshot
        self.count += 1
        target = self.tmp / f"restored-{self.count}"
        restore(self.repo, result.snapshot, target)
        assert differences(self.folder.root, target) == []
        return result


@pytest.fixture
def snapshots(repo, folder: Folder, tmp_path: Path) -> Snapshotter:
    return Snapshotter(repo, folder, tmp_path)


def test_nothing_changed_costs_nothing(snapshots: Snapshotter) -> None:
    parent = snapshots.parent
    result = snapshots.snapshot()
    assert result.snapshot.tree == parent.tree
    assert result.stats.bytes_read == 0 and result.stats.bytes_added == 0
    assert result.stats.files == 0 and result.stats.dirs == 0  # nothing was even listed


def test_small_write_reads_one_block(snapshots: Snapshotter, folder: Folder) -> None:
    folder.write("big.img", 7 * TEST_BLOCK_SIZE + 100, os.urandom(4096))
    result = snapshots.snapshot()
    assert result.stats.bytes_read == TEST_BLOCK_SIZE
    assert result.stats.blobs_added == 2  # the block and the root tree


def test_renaming_a_big_directory_adds_only_trees(snapshots: Snapshotter, folder: Folder) -> None:
    folder.rename("project", "renamed-project")
    result = snapshots.snapshot()
    assert result.stats.bytes_read == 0
    assert result.stats.blobs_added == 1  # the root tree; the moved trees are unchanged


def test_every_kind_of_change_lands_in_the_snapshot(snapshots: Snapshotter, folder: Folder) -> None:
    folder.mkdir("new-dir")
    folder.write("new-dir/fresh.txt", 0, b"fresh")
    folder.rename("new-dir/fresh.txt", "project/src/moved-fresh.txt")  # created, then renamed
    folder.unlink("project/src/m3.py")
    folder.chmod("notes.txt", 0o600)
    folder.truncate("big.img", 5 * TEST_BLOCK_SIZE + 7)
    folder.write("project/src/m4.py", 1000, b"edit")
    folder.rename("project/src/m4.py", "m4-at-root.py")  # written, then moved
    snapshots.snapshot()

    folder.rename("project/src", "project/lib")
    folder.rename("project", "proj")  # a rename under a renamed directory
    folder.write("proj/lib/m5.py", 0, b"x")
    folder.unlink("new-dir")
    snapshots.snapshot()

    folder.write("proj/lib/m6.py", 0, os.urandom(100))
    folder.rename("proj/lib/m6.py", "proj/lib/m7.py")  # rename over an existing file
    folder.write("big.img", 20 * TEST_BLOCK_SIZE, b"grows past the old end")
    snapshots.snapshot()


def test_rename_exchange_swaps_origins(snapshots: Snapshotter, folder: Folder) -> None:
    a, b = folder.p("notes.txt"), folder.p("big.img")
    tmp = folder.p("swap.tmp")
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)
    folder.log.mark_renamed(b"notes.txt", b"big.img", exchange=True)
    result = snapshots.snapshot()
    assert result.stats.bytes_read == 0
