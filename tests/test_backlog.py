"""The backlog: while the store is down, snapshots complete on local disk and reach the store later.

These run the engine through a real repository whose store is a local directory behind a fault
injector that can go down: backups taken while it is down must finish at once, be readable (their
data comes from the backlog), survive a restart, stay within the backlog's limit, and reach the
store in an order that never lets the store hold a snapshot whose data it lacks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import PASSPHRASE, TEST_BLOCK_SIZE
from treecompare import differences

from backend.backup import backup
from backend.errors import StoreError
from backend.repository import Repository
from backend.restore import restore
from backend.snapshot import Snapshot
from backend.stores import LocalStore
from backend.stores.backlog import BacklogFull, DamagedBacklog
from backend.stores.faulty import FaultyStore
from backend.verify import verify


class CheckingStore(LocalStore):
    """A local store that checks, each time a snapshot object arrives, that the repository it holds
    at that moment is whole: every snapshot's blobs indexed, every indexed pack present."""

    def __init__(self, root: Path, cache: Path):
        super().__init__(root)
        self.cache = cache
        self.arrived: list[str] = []
        self.incomplete: list[str] = []

    def put(self, key: str, data: bytes) -> None:
        super().put(key, data)
        self.arrived.append(key)
        if key.startswith("snapshots/"):
            with Repository.open(LocalStore(self.root), PASSPHRASE.encode(),
                                 cache_dir=str(self.cache / str(len(self.arrived)))) as seen:
                report = verify(seen)
                if not report.ok:
                    self.incomplete.append(f"{key}: {report}")


@pytest.fixture
def store(repo_path: Path, tmp_path: Path) -> FaultyStore:
    Repository.init(LocalStore(repo_path), PASSPHRASE.encode(), block_size=TEST_BLOCK_SIZE).close()
    return FaultyStore(CheckingStore(repo_path, tmp_path / "checks"), seed=1)


def open_with_backlog(store: FaultyStore, limit: int = 1 << 30) -> Repository:
    return Repository.open(store, PASSPHRASE.encode(), backlog="mount-1", backlog_limit_bytes=limit)


def fill(folder: Path, round_: int, files: int = 6, size: int = 300_000) -> None:
    folder.mkdir(exist_ok=True)
    for i in range(files):
        (folder / f"r{round_}-{i}.bin").write_bytes(os.urandom(size))


def test_snapshots_taken_while_the_store_is_down_land_in_order_once_it_is_back(
        store: FaultyStore, repo_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    fill(folder, 0)
    repo = open_with_backlog(store)
    first = backup(repo, os.fsencode(folder)).snapshot  # the store is up: straight through
    assert repo.backlog is not None and repo.backlog.is_empty()

    store.down = True
    taken = []
    for round_ in (1, 2):
        fill(folder, round_)
        result = backup(repo, os.fsencode(folder), parent=taken[-1] if taken else first)
        taken.append(result.snapshot)
        # What it added is readable now, from local disk, while the store is still down.
        restored = tmp_path / f"while-down-{round_}"
        new = [f"r{round_}-{i}.bin" for i in range(6)]
        restore(repo, result.snapshot, os.fsencode(restored), paths=[name.encode() for name in new])
        assert sorted(os.listdir(restored)) == new
        assert all((restored / name).read_bytes() == (folder / name).read_bytes() for name in new)
    status = repo.backlog.status()
    assert status.snapshots == 2 and status.bytes > 12 * 300_000 and status.last_error
    with pytest.raises(StoreError):
        repo.backlog.drain()  # still down: nothing lost, all still staged
    assert repo.backlog.status().objects == status.objects

    store.down = False
    assert repo.backlog.drain() == status.bytes
    assert repo.backlog.is_empty()
    repo.close()

    arrived = store.inner.arrived
    assert [key for key in arrived if key.startswith("snapshots/")][-2:] == [f"snapshots/{s.id}" for s in taken]
    assert store.inner.incomplete == []  # no snapshot arrived before what it references

    # A machine that never saw the backlog finds every snapshot complete in the store itself.
    with Repository.open(LocalStore(repo_path), PASSPHRASE.encode(), cache_dir=str(tmp_path / "elsewhere")) as fresh:
        assert {s.id for s in fresh.snapshots()} == {first.id, *(s.id for s in taken)}
        report = verify(fresh, read_data=True)
        assert report.ok, report
        restored = tmp_path / "from-store"
        restore(fresh, fresh.load_snapshot(taken[-1].id), os.fsencode(restored))
        assert differences(folder, restored, owners=False) == []


def stored_then_staged(store: FaultyStore, folder: Path) -> tuple[Repository, Snapshot, Snapshot]:
    """A repository with a backlog, a snapshot in the store, and one taken after it while the store
    was down (it waits in the backlog; the store stays down)."""
    fill(folder, 0)
    repo = open_with_backlog(store)
    first = backup(repo, os.fsencode(folder)).snapshot
    store.down = True
    fill(folder, 1)
    return repo, first, backup(repo, os.fsencode(folder), parent=first).snapshot


def test_a_damaged_staged_object_stops_the_upload_before_anything_that_needs_it(
        store: FaultyStore, repo_path: Path, tmp_path: Path) -> None:
    repo, first, _ = stored_then_staged(store, tmp_path / "folder")
    stored_before = len(store.inner.arrived)  # nothing arrived while the store was down
    backlog_dir = Path(repo.cache_dir) / "backlog" / "mount-1"
    pack = next(p for p in sorted(backlog_dir.iterdir()) if "data%2F" in p.name)  # the oldest staged pack
    with open(pack, "r+b") as f:  # the local disk flips a byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0x55]))

    store.down = False
    with pytest.raises(DamagedBacklog, match="damaged in the backlog on local disk"):
        repo.backlog.drain()
    assert "damaged" in (repo.backlog.status().last_error or "")
    late = store.inner.arrived[stored_before:]  # at most packs, which reference nothing
    assert not [key for key in late if not key.startswith("data/")]
    assert pack.exists()  # kept, as evidence, not uploaded and not deleted
    repo.close()
    with Repository.open(LocalStore(repo_path), PASSPHRASE.encode(), cache_dir=str(tmp_path / "elsewhere")) as fresh:
        assert [s.id for s in fresh.snapshots()] == [first.id]
        assert verify(fresh).ok


def test_a_backlog_survives_a_restart_and_other_processes_keep_its_index(
        store: FaultyStore, repo_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    repo, first, taken = stored_then_staged(store, folder)

    # Another process opens the repository without the backlog (say `fsmount snapshots`): the
    # index objects it cannot find in the store are staged, not removed, so the index cache the
    # mount shares with it stays as it is.
    store.down = False
    with Repository.open(LocalStore(repo_path), PASSPHRASE.encode()) as other:
        assert [s.id for s in other.snapshots()] == [first.id]
        report = verify(other)  # the staged packs are on their way, not missing
        assert report.ok and report.packs_in_backlog > 0, report
    store.down = True
    restored = tmp_path / "restored"
    restore(repo, taken, os.fsencode(restored), paths=[f"r1-{i}.bin".encode() for i in range(6)])
    assert sorted(os.listdir(restored)) == [f"r1-{i}.bin" for i in range(6)]
    repo.close()  # as a crash would leave it: the backlog is on disk, the store lacks the snapshot

    store.down = False
    repo = open_with_backlog(store)
    assert [s.id for s in repo.snapshots()] == [first.id, taken.id]
    restored = tmp_path / "restored-after-restart"
    restore(repo, repo.load_snapshot(taken.id), os.fsencode(restored))
    assert differences(folder, restored, owners=False) == []
    repo.backlog.drain()
    repo.close()
    with Repository.open(LocalStore(repo_path), PASSPHRASE.encode(), cache_dir=str(tmp_path / "new")) as fresh:
        assert [s.id for s in fresh.snapshots()] == [first.id, taken.id]
        assert verify(fresh, read_data=True).ok


def test_a_full_backlog_refuses_more_and_takes_it_after_draining(store: FaultyStore, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    fill(folder, 0, files=2)
    repo = open_with_backlog(store, limit=1 << 20)
    first = backup(repo, os.fsencode(folder)).snapshot
    store.down = True
    fill(folder, 1, files=2)
    second = backup(repo, os.fsencode(folder), parent=first).snapshot  # ~600 kB: fits
    fill(folder, 2, files=4)
    with pytest.raises(BacklogFull, match="backlog is full"):
        backup(repo, os.fsencode(folder), parent=second)
    assert repo.backlog.status().bytes <= 1 << 20
    store.down = False
    repo.backlog.drain()
    third = backup(repo, os.fsencode(folder), parent=second).snapshot
    assert repo.backlog.is_empty()
    restored = tmp_path / "restored"
    restore(repo, third, os.fsencode(restored))
    assert differences(folder, restored, owners=False) == []
    repo.close()


def test_a_held_backlog_keeps_everything_for_the_next_mount(store: FaultyStore, repo_path: Path,
                                                            tmp_path: Path) -> None:
    """`umount --lazy`: the final snapshot goes to local disk though the store is up, and stays."""
    folder = tmp_path / "folder"
    fill(folder, 0, files=2)
    repo = open_with_backlog(store)
    repo.backlog.hold()
    kept = backup(repo, os.fsencode(folder)).snapshot
    assert repo.backlog.drain() == 0 and repo.backlog.status().snapshots == 1
    assert not (repo_path / "snapshots" / kept.id).exists()
    repo.close()
    repo = open_with_backlog(store)  # the next mount
    repo.backlog.drain()
    repo.close()
    assert (repo_path / "snapshots" / kept.id).exists()
