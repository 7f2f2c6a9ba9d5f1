"""A damaged or lost index: found by verify whatever the local cache holds, rebuilt by verify --repair
from the packs' own headers."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from conftest import PASSPHRASE
from test_integrity import flip_byte
from treecompare import differences

from backend.repository import Repository
from backend.stores import LocalStore
from backend.verify import verify

pytest_plugins = ["s3_fixtures"]


def two_backups(cli, tmp_path: Path) -> Path:
    """A source backed up twice, so that the repository holds more than one index object."""
    source = tmp_path / "src"
    (source / "docs").mkdir(parents=True)
    (source / "big.bin").write_bytes(os.urandom(700_000))
    (source / "docs" / "notes.txt").write_text("notes\n")
    cli("init", "--block-size", "64K")
    cli("backup", source)
    (source / "docs" / "more.bin").write_bytes(os.urandom(300_000))
    cli("backup", source)
    return source


def index_objects(repo_path: Path) -> list[Path]:
    return sorted(p for p in (repo_path / "index").iterdir() if not p.name.startswith(".tmp-"))


def cold_cache(cli, tmp_path: Path, name: str) -> None:
    cli.env["XDG_CACHE_HOME"] = str(tmp_path / name)


class CountingStore(LocalStore):
    """The repository's local store, counting the index objects it hands out."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.index_gets: Counter[str] = Counter()

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if key.startswith("index/"):
            self.index_gets[key] += 1
        return super().get(key, offset, length)


def verify_counting_index_gets(repo_path: Path, cache_dir: Path) -> Counter[str]:
    store = CountingStore(repo_path)
    with Repository.open(store, PASSPHRASE.encode(), cache_dir=str(cache_dir)) as repo:
        assert verify(repo).ok
    return store.index_gets


def test_a_cold_verify_reads_each_index_object_once(cli, tmp_path: Path, repo_path: Path) -> None:
    """Opening the repository read every index object into the new cache, then verify read each again."""
    two_backups(cli, tmp_path)
    once_each = Counter({f"index/{path.name}": 1 for path in index_objects(repo_path)})

    assert verify_counting_index_gets(repo_path, tmp_path / "new-machine") == once_each


def test_a_warm_verify_still_reads_each_index_object(cli, tmp_path: Path, repo_path: Path) -> None:
    """The cache read them in an earlier run: damage since then shows only to a fetch."""
    two_backups(cli, tmp_path)
    once_each = Counter({f"index/{path.name}": 1 for path in index_objects(repo_path)})
    verify_counting_index_gets(repo_path, tmp_path / "cache")

    assert verify_counting_index_gets(repo_path, tmp_path / "cache") == once_each


def test_a_damaged_index_object_is_an_error_even_with_a_warm_cache(cli, tmp_path: Path, repo_path: Path) -> None:
    """The cache held the object's content from before the damage, so verify looked only at it and
    said "no errors"; a new machine then found every snapshot unreadable."""
    two_backups(cli, tmp_path)
    cli("verify")  # the cache now knows every index object
    damaged = index_objects(repo_path)[0]
    flip_byte(damaged, 200 % damaged.stat().st_size)

    for args in (("verify",), ("verify", "--read-data")):
        out = cli(*args, check=14).stdout.decode()
        assert f"error: index {damaged.name}" in out and "fsmount verify --repair" in out, out


def test_repair_rebuilds_every_damaged_index_object_from_the_packs(cli, tmp_path: Path, repo_path: Path) -> None:
    source = two_backups(cli, tmp_path)
    damaged = index_objects(repo_path)
    assert len(damaged) >= 2
    for path in damaged:
        flip_byte(path, 40)
    cold_cache(cli, tmp_path, "new-machine")

    out = cli("verify", check=14).stdout.decode()
    assert "whole snapshot unreadable" in out
    assert "unreferenced" not in out and "not indexed" in out and "verify --repair" in out, out

    out = cli("verify", "--repair").stdout.decode()
    assert "indexed" in out and "no errors" in out, out
    assert not any(path.exists() for path in damaged)  # the damaged objects are gone, a new one names it all
    cold_cache(cli, tmp_path, "third-machine")
    cli("verify", "--read-data")
    cli("restore", "latest", "--target", tmp_path / "restored")
    assert differences(source, tmp_path / "restored") == []
    first = json.loads(cli("snapshots", "--json").stdout)[0]["id"]
    cli("restore", first, "--target", tmp_path / "first")


def test_repair_indexes_packs_whose_index_object_is_gone(cli, tmp_path: Path, repo_path: Path) -> None:
    """As after a backup interrupted between its packs and its index object."""
    source = two_backups(cli, tmp_path)
    index_objects(repo_path)[-1].unlink()
    cold_cache(cli, tmp_path, "new-machine")
    out = cli("verify", check=14).stdout.decode()
    assert "packs not indexed" in out, out

    cli("verify", "--repair")
    out = cli("verify", "--read-data").stdout.decode()
    assert "not indexed" not in out, out
    cli("restore", "latest", "--target", tmp_path / "restored")
    assert differences(source, tmp_path / "restored") == []


def test_a_pack_in_no_index_whose_header_is_damaged_is_removed_and_its_files_named(cli, tmp_path: Path,
                                                                                   repo_path: Path) -> None:
    """Nothing can read such a pack (no index says where its blobs lie): it was reported by every
    verify, --repair included, which exited 14 for ever."""
    two_backups(cli, tmp_path)
    for path in index_objects(repo_path):
        flip_byte(path, 40)
    packs = sorted((p for p in (repo_path / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    bad = packs[-1]  # the largest: data of big.bin, its header at the end
    flip_byte(bad, bad.stat().st_size - 10)
    cold_cache(cli, tmp_path, "new-machine")

    out = cli("verify", check=14).stdout.decode()
    assert f"pack {bad.name} is in no index, and its header cannot be read" in out and "--repair` removes it" in out
    out = cli("verify", "--repair", check=14).stdout.decode()
    assert f"removed 1 pack that no index names and whose header opens on no copy (nothing can read it): {bad.name}" \
        in out, out
    assert not bad.exists()
    out = cli("verify", check=14).stdout.decode()
    assert bad.name not in out, out
    assert "not indexed" not in out, out  # it went on advising the --repair that cannot index it
    # every other pack is indexed again: the trees load, and only big.bin's blocks are missing
    assert "whole snapshot unreadable" not in out and "damaged: snapshot" in out and "big.bin" in out, out


@pytest.mark.s3
def test_damaged_index_over_s3_is_found_and_rebuilt(cli, tmp_path: Path, s3_bucket) -> None:
    key_id, secret = s3_bucket.server.credentials
    cli.env.update(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret,
                   FSMOUNT_REPOSITORY=s3_bucket.location("repo"))
    source = two_backups(cli, tmp_path)
    cli("verify")
    store = s3_bucket.open_store("repo")
    damaged = sorted(key for key, _ in store.list("index/"))
    for key in damaged:
        data = bytearray(store.get(key))
        data[40] ^= 0x55
        store.put(key, bytes(data))

    out = cli("verify", check=14).stdout.decode()  # the warm cache does not hide it
    assert all(f"index {key.removeprefix('index/')}" in out for key in damaged), out
    cold_cache(cli, tmp_path, "new-machine")
    cli("verify", "--repair")
    assert not any(store.exists(key) for key in damaged)
    cli("verify", "--read-data")
    cli("restore", "latest", "--target", tmp_path / "restored")
    assert differences(source, tmp_path / "restored") == []
