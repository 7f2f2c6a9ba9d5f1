"""The engine on every kind of store: local, S3, and replicas (local + S3, two S3 providers)."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import PASSPHRASE, TEST_BLOCK_SIZE
from treecompare import differences

from backend.backup import backup
from backend.repository import Repository
from backend.restore import restore
from backend.stores import ObjectStore
from backend.verify import verify

pytest_plugins = ["s3_fixtures"]


def test_backup_incremental_restore_and_verify(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "dir").mkdir(parents=True)
    (source / "dir" / "big.bin").write_bytes(os.urandom(5 * TEST_BLOCK_SIZE + 17))
    (source / "small.txt").write_text("small\n")
    with Repository.init(store, PASSPHRASE.encode(), block_size=TEST_BLOCK_SIZE) as repo:
        backup(repo, source)
        with open(source / "dir" / "big.bin", "r+b") as f:
            f.seek(2 * TEST_BLOCK_SIZE)
            f.write(b"changed")
        second = backup(repo, source)
        assert second.stats.blobs_added <= 3  # one block and the trees above it
        restore(repo, second.snapshot, tmp_path / "restored")
        assert verify(repo, read_data=True).ok
    assert differences(source, tmp_path / "restored") == []
