"""Later backups read only what changed and store only blocks the repository does not have."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import TEST_BLOCK_SIZE
from treecompare import differences

from backend.backup import Backup, backup
from backend.errors import StoreError
from backend.progress import Progress
from backend.restore import restore


def make_source(root: Path, files: int = 20, big_size: int = 4 * 1024 * 1024) -> Path:
    (root / "docs").mkdir(parents=True)
    for i in range(files):
        (root / "docs" / f"note-{i}.txt").write_bytes(os.urandom(3000))
    (root / "big.bin").write_bytes(os.urandom(big_size))
    return root


def test_unchanged_files_are_not_read_again(repo, tmp_path: Path) -> None:
    source = make_source(tmp_path / "src")
    first = backup(repo, source)
    second = backup(repo, source)

    assert first.stats.files_new == 21
    assert second.stats.files_unchanged == 21
    assert second.stats.bytes_read == 0
    assert second.stats.bytes_added == 0
    assert second.snapshot.tree == first.snapshot.tree
    assert second.snapshot.parent == first.snapshot.id


def test_xattr_changes_alone_reach_the_next_snapshot(repo, tmp_path: Path) -> None:
    # Unchanged entries take their xattrs from the parent snapshot (their ctime says nothing
    # changed); setting or removing one changes the ctime, so it is read again.
    source = make_source(tmp_path / "src")
    os.setxattr(source / "docs" / "note-1.txt", b"user.kept", b"as it was")
    os.setxattr(source / "docs" / "note-2.txt", b"user.gone", b"soon")
    backup(repo, source)
    os.setxattr(source / "docs" / "note-0.txt", b"user.added", b"later")
    os.removexattr(source / "docs" / "note-2.txt", b"user.gone")
    os.setxattr(source / "docs", b"user.dir", b"tagged")
    os.symlink("big.bin", source / "link")
    backup(repo, source)
    os.setxattr(source / "link", b"trusted.link", b"on the link", follow_symlinks=False)
    second = backup(repo, source)

    assert second.stats.bytes_read == 0
    target = tmp_path / "restored"
    restore(repo, second.snapshot, target)
    assert differences(source, target) == []
    assert os.getxattr(target / "docs" / "note-1.txt", b"user.kept") == b"as it was"
    assert os.listxattr(target / "docs" / "note-2.txt") == []
    # (restore leaves a symlink's xattrs alone; the snapshot keeps them)
    assert repo.find_node(second.snapshot, b"link").xattrs == {b"trusted.link": b"on the link"}


def test_small_edit_to_a_big_file_adds_about_one_block(repo, tmp_path: Path) -> None:
    source = make_source(tmp_path / "src")
    backup(repo, source)
    with open(source / "big.bin", "r+b") as f:
        f.seek(1_000_000)
        f.write(os.urandom(4096))  # inside one 64 KiB block

    result = backup(repo, source)

    assert result.stats.files_changed == 1
    assert result.stats.files_unchanged == 20
    # the changed block and the one tree on the changed path (big.bin is at the root)
    assert result.stats.blobs_added == 2
    assert TEST_BLOCK_SIZE <= result.stats.bytes_added < TEST_BLOCK_SIZE + 8 * 1024


def test_identical_content_is_stored_once(repo, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    payload = os.urandom(10 * TEST_BLOCK_SIZE)
    for name in ("a", "b", "c"):
        (source / name).write_bytes(payload)

    result = backup(repo, source)

    assert result.stats.bytes_read == 3 * len(payload)
    assert len(payload) <= result.stats.bytes_added < len(payload) * 1.05


def test_two_sources_share_blocks_across_snapshots(repo, tmp_path: Path) -> None:
    payload = os.urandom(8 * TEST_BLOCK_SIZE)
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "same.bin").write_bytes(payload)
    first = backup(repo, tmp_path / "one")
    second = backup(repo, tmp_path / "two", host="another-host")
    assert first.stats.bytes_added >= len(payload)
    assert second.stats.bytes_added < 4096  # only its tree


class _AppendWhileReading(Progress):
    """Changes a file the moment the backup starts reading it: a seam, not a race."""

    def __init__(self, path: Path):
        self.path, self.done = path, False

    def advance(self, nbytes: int = 0, items: int = 0, current: str | bytes | None = None) -> None:
        if nbytes and not self.done:
            self.done = True
            with open(self.path, "ab") as f:
                f.write(b"more")


class _TruncateWhileReading(Progress):
    def __init__(self, path: Path, size: int):
        self.path, self.size, self.done = path, size, False

    def advance(self, nbytes: int = 0, items: int = 0, current: str | bytes | None = None) -> None:
        if nbytes and not self.done:
            self.done = True
            os.truncate(self.path, self.size)


def test_file_changing_while_read_is_stored_as_read_and_reported(repo, tmp_path: Path) -> None:
    """It was left out: a log or database always being written was in no snapshot at all."""
    source = tmp_path / "src"
    source.mkdir()
    content = os.urandom(3 * TEST_BLOCK_SIZE)
    (source / "growing.log").write_bytes(content)

    result = Backup(repo, source, progress=_AppendWhileReading(source / "growing.log")).run()

    assert len(result.warnings) == 1 and "growing.log" in result.warnings[0]
    assert "changed while being read" in result.warnings[0]
    restore(repo, result.snapshot, tmp_path / "out")
    assert (tmp_path / "out" / "growing.log").read_bytes() == content  # as it was when reading began
    again = backup(repo, source)  # its mtime is the one from before: read again, whole now
    assert again.stats.files_changed == 1 and not again.warnings


@pytest.mark.parametrize("cut", [TEST_BLOCK_SIZE + 100, 100])
def test_file_shrinking_while_read_is_stored_as_far_as_it_was_read(repo, tmp_path: Path, cut: int) -> None:
    """Cut inside the second block (read after the cut: a short read), or inside the first, read
    already: then the next SEEK_DATA finds nothing, which was taken for a hole to the old end, and
    the file was stored at its old size with a tail of zeros that never existed."""
    source = tmp_path / "src"
    source.mkdir()
    content = os.urandom(3 * TEST_BLOCK_SIZE)
    (source / "log").write_bytes(content)

    result = Backup(repo, source, progress=_TruncateWhileReading(source / "log", cut)).run()

    assert len(result.warnings) == 1 and "shrank while being read" in result.warnings[0]
    restore(repo, result.snapshot, tmp_path / "out")
    assert (tmp_path / "out" / "log").read_bytes() == content[:max(cut, TEST_BLOCK_SIZE)]


def test_in_place_restore_rewrites_only_differing_blocks(repo, tmp_path: Path) -> None:
    source = make_source(tmp_path / "src", files=3)
    result = backup(repo, source)
    with open(source / "big.bin", "r+b") as f:
        f.seek(3 * TEST_BLOCK_SIZE + 10)
        f.write(b"damage")
    (source / "docs" / "note-0.txt").unlink()
    (source / "stray.tmp").write_bytes(b"not in the snapshot")

    restored = restore(repo, result.snapshot, source)

    assert restored.stats.blocks_written == 2  # the damaged block, and the deleted small file
    assert (source / "stray.tmp").exists()  # no --delete: extra files stay

    restored = restore(repo, result.snapshot, source, delete=True)
    assert restored.stats.blocks_written == 0
    assert restored.stats.deleted == 1
    assert not (source / "stray.tmp").exists()
    restore(repo, result.snapshot, tmp_path / "fresh")
    assert differences(source, tmp_path / "fresh") == []


def test_restore_never_writes_through_a_symlink_outside_the_target(repo, tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "docs").mkdir(parents=True)
    (source / "docs" / "file.txt").write_bytes(b"snapshot content")
    result = backup(repo, source)

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file.txt").write_bytes(b"precious, outside the target")
    target = tmp_path / "target"
    target.mkdir()
    (target / "docs").symlink_to(outside)  # an attacker-planted link where the snapshot has a dir

    restore(repo, result.snapshot, target, delete=True)

    assert (outside / "file.txt").read_bytes() == b"precious, outside the target"
    assert not (target / "docs").is_symlink()
    assert (target / "docs" / "file.txt").read_bytes() == b"snapshot content"


def test_restore_selected_paths_only(repo, tmp_path: Path) -> None:
    source = make_source(tmp_path / "src", files=3, big_size=1000)
    result = backup(repo, source)
    target = tmp_path / "target"

    restore(repo, result.snapshot, target, paths=[b"docs/note-1.txt"])

    assert sorted(p.name for p in target.rglob("*")) == ["docs", "note-1.txt"]
    assert (target / "docs" / "note-1.txt").read_bytes() == (source / "docs" / "note-1.txt").read_bytes()


class _StoreDownAfter(Progress):
    def __init__(self, store, after_bytes: int):
        self.store, self.left = store, after_bytes

    def advance(self, nbytes: int = 0, items: int = 0, current: str | bytes | None = None) -> None:
        self.left -= nbytes
        if self.left <= 0:
            self.store.down = True


class _PacksFailSlowly:
    """A local store whose pack uploads fail, each after `delay_s`, until `healed`: the backup
    gives up on the first while the next is still on its way."""

    def __init__(self, inner, delay_s: float):
        self.inner, self.delay_s, self.healed = inner, delay_s, False

    def put(self, key: str, data: bytes) -> None:
        if key.startswith("data/") and not self.healed:
            time.sleep(self.delay_s)
            raise StoreError(f"put {key}: the store is down (injected)")
        self.inner.put(key, data)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def test_a_failed_backup_settles_its_uploads_before_the_next_one(repo_path: Path, tmp_path: Path) -> None:
    """A pack still in flight when a backup fails must fail that backup, not the next one, and the
    blobs of packs that never reached the store must be stored by the next one."""
    from conftest import PASSPHRASE

    from backend.repository import Repository
    from backend.stores import LocalStore

    Repository.init(LocalStore(repo_path), PASSPHRASE.encode(), block_size=TEST_BLOCK_SIZE).close()
    store = _PacksFailSlowly(LocalStore(repo_path), delay_s=1.0)
    source = make_source(tmp_path / "src", files=5, big_size=40 * 1024 * 1024)  # several packs
    with Repository.open(store, PASSPHRASE.encode()) as repo:
        with pytest.raises(StoreError):
            backup(repo, source)
        time.sleep(1.5)  # whatever was still uploading has failed by now
        store.healed = True
        result = backup(repo, source)
        restore(repo, result.snapshot, tmp_path / "restored")
    assert differences(source, tmp_path / "restored") == []


class _IndexFailsOnce:
    """A local store that refuses the first index object it is given."""

    def __init__(self, inner):
        self.inner, self.refused = inner, False

    def put(self, key: str, data: bytes) -> None:
        if key.startswith("index/") and not self.refused:
            self.refused = True
            raise StoreError(f"put {key}: the store is down (injected)")
        self.inner.put(key, data)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def test_packs_whose_index_failed_are_indexed_by_the_next_backup(repo_path: Path, tmp_path: Path) -> None:
    from conftest import PASSPHRASE

    from backend.repository import Repository
    from backend.stores import LocalStore

    Repository.init(LocalStore(repo_path), PASSPHRASE.encode(), block_size=TEST_BLOCK_SIZE).close()
    store = _IndexFailsOnce(LocalStore(repo_path))
    source = make_source(tmp_path / "src", files=5, big_size=4 * 1024 * 1024)
    with Repository.open(store, PASSPHRASE.encode()) as repo:
        with pytest.raises(StoreError):
            backup(repo, source)
        result = backup(repo, source)
    with Repository.open(LocalStore(repo_path), PASSPHRASE.encode()) as fresh:  # what another host sees
        restore(fresh, fresh.load_snapshot(result.snapshot.id), tmp_path / "restored")
    assert differences(source, tmp_path / "restored") == []


def test_a_failed_backup_leaves_the_repository_usable(repo_path: Path, tmp_path: Path) -> None:
    """The store goes down during one backup: that one fails, the next one (same process) is whole."""
    from conftest import PASSPHRASE

    from backend.repository import Repository
    from backend.stores import LocalStore
    from backend.stores.faulty import FaultyStore

    Repository.init(LocalStore(repo_path), PASSPHRASE.encode(), block_size=TEST_BLOCK_SIZE).close()
    flaky = FaultyStore(LocalStore(repo_path), seed=1)
    source = make_source(tmp_path / "src", files=5, big_size=40 * 1024 * 1024)  # several packs
    with Repository.open(flaky, PASSPHRASE.encode()) as repo:
        with pytest.raises(StoreError):  # the store fails once the first pack is on its way
            Backup(repo, source, progress=_StoreDownAfter(flaky, 20 * 1024 * 1024)).run()
        flaky.down = False
        result = backup(repo, source)
        restore(repo, result.snapshot, tmp_path / "restored")
    assert differences(source, tmp_path / "restored") == []


def test_the_tree_cache_is_bounded_by_what_its_trees_hold(repo) -> None:
    """It counted entries: a tree holding one huge sparse file (8M block ids for 1 TiB) stayed
    cached as one entry, and a live mount's memory grew by 400 MB for good."""
    from backend.repository import TREE_CACHE_BYTES
    from backend.tree import FILE, HOLE, Node

    blocks = TREE_CACHE_BYTES // len(HOLE) + 1
    huge = Node(name=b"sparse", type=FILE, size=blocks * TEST_BLOCK_SIZE, blocks=HOLE * blocks, xxh=bytes(16) * blocks)
    small = Node(name=b"small", type=FILE, size=1)
    huge_tree, small_tree = repo.save_tree([huge]), repo.save_tree([small])
    assert repo.cached_tree(huge_tree) is None and repo.cached_tree(small_tree) is not None
    repo.flush()
    assert repo.load_tree(huge_tree)[0].blocks == huge.blocks  # read again when needed


def test_a_parent_is_trusted_whole_only_until_index_objects_are_removed(repo, tmp_path: Path, repo_path: Path) -> None:
    """A backup checks its parent's blocks against the index only when the index cache cannot vouch
    for the parent: after a repair took lost packs out, it must read those files again."""
    from backend.repair import repair_index

    source = make_source(tmp_path / "src", files=3)
    first = backup(repo, source)
    assert repo.index.is_whole(first.snapshot.id, repo.index.generation())
    for pack in (repo_path / "data").rglob("*"):
        if pack.is_file():
            pack.unlink()
    repair_index(repo)  # the lost packs leave the index: the cache rebuilds, and vouches for nothing
    assert not repo.index.is_whole(first.snapshot.id, repo.index.generation())
    second = backup(repo, source)
    assert second.stats.bytes_read == first.stats.bytes_read  # read again, not reused
    assert repo.index.is_whole(second.snapshot.id, repo.index.generation())
