"""The repository format: sealing, packs, and reading what earlier versions wrote."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from treecompare import manifest

from backend.crypto import MasterKey
from backend.errors import IntegrityError, WrongPassword
from backend.pack import DATA_BLOB, TREE_BLOB, PackWriter, read_header
from backend.repository import Repository
from backend.restore import restore
from backend.snapshot import resolve_snapshot
from backend.stores import LocalStore

DATA = Path(__file__).parent / "data"


def test_blob_seal_round_trip_and_tamper_detection() -> None:
    key = MasterKey.generate()
    for plaintext in (b"", b"a" * 100_000, os.urandom(100_000)):
        blob_id = key.blob_id(plaintext)
        sealed = key.seal_blob(DATA_BLOB, blob_id, plaintext)
        assert key.unseal_blob(DATA_BLOB, blob_id, sealed) == plaintext
        with pytest.raises(IntegrityError):
            key.unseal_blob(TREE_BLOB, blob_id, sealed)  # the type is bound to the ciphertext
        tampered = bytearray(sealed)
        tampered[len(tampered) // 2] ^= 1
        with pytest.raises(IntegrityError):
            key.unseal_blob(DATA_BLOB, blob_id, bytes(tampered))
    assert len(key.seal_blob(DATA_BLOB, key.blob_id(b"a" * 100_000), b"a" * 100_000)) < 1000  # compressed


def test_blocks_are_compressed_when_any_part_of_them_compresses() -> None:
    """Random blocks are stored raw without compressing them whole; a block that is random only
    in places still compresses (the probe samples its start, middle and end)."""
    key = MasterKey.generate()
    random_block = os.urandom(128 * 1024)
    assert len(key.seal_blob(DATA_BLOB, key.blob_id(random_block), random_block)) == len(random_block) + 1 + 28
    for mixed in (os.urandom(60_000) + bytes(71_072), bytes(71_072) + os.urandom(60_000),
                  os.urandom(40_000) + b"log line\n" * 5_000 + os.urandom(40_000)):
        sealed = key.seal_blob(DATA_BLOB, key.blob_id(mixed), mixed)
        assert len(sealed) < len(mixed) * 0.7
        assert key.unseal_blob(DATA_BLOB, key.blob_id(mixed), sealed) == mixed


def test_blob_ids_are_keyed() -> None:
    a, b = MasterKey.generate(), MasterKey.generate()
    assert a.blob_id(b"same content") != b.blob_id(b"same content")
    assert a.blob_id(b"same content") == a.blob_id(b"same content")


def test_wrapped_key_opens_only_with_its_passphrase() -> None:
    key = MasterKey.generate()
    wrapped = key.wrap(b"right")
    assert MasterKey.unwrap(wrapped, b"right") == key
    with pytest.raises(WrongPassword):
        MasterKey.unwrap(wrapped, b"wrong")
    assert b"right" not in wrapped and key.encrypt_key not in wrapped


def test_pack_header_describes_its_blobs() -> None:
    key = MasterKey.generate()
    writer = PackWriter(key)
    blobs = [os.urandom(1000 * i + 1) for i in range(5)]
    for data in blobs:
        blob_id = key.blob_id(data)
        writer.add(DATA_BLOB, blob_id, key.seal_blob(DATA_BLOB, blob_id, data), len(data))
    pack_id, pack, entries = writer.finish()

    assert read_header(key, pack, pack_id) == entries
    for entry, data in zip(entries, blobs):
        assert key.unseal_blob(DATA_BLOB, entry.blob_id, pack[entry.offset:entry.offset + entry.length]) == data
    with pytest.raises(IntegrityError):
        read_header(MasterKey.generate(), pack, pack_id)


def test_format_v1_repository_still_restores(tmp_path: Path) -> None:
    expected = json.loads((DATA / "format-v1.manifest.json").read_text())
    repo_copy = tmp_path / "repo"
    shutil.copytree(DATA / "format-v1", repo_copy)  # never write into the committed copy
    with Repository.open(LocalStore(repo_copy), expected["passphrase"].encode(),
                         cache_dir=str(tmp_path / "cache")) as repo:
        snapshot = resolve_snapshot(repo, "latest")
        assert (snapshot.host, snapshot.tags) == ("format-v1", ["v1"])
        restore(repo, snapshot, tmp_path / "out")

    assert manifest(bytes(tmp_path / "out")) == expected["entries"]
