"""Damaged repositories: found, named down to the files affected, and never fatal to the rest."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from conftest import PASSPHRASE

from backend.pack import pack_key
from backend.repository import Repository
from backend.stores import LocalStore


def backed_up_source(cli, tmp_path: Path) -> tuple[Path, dict]:
    source = tmp_path / "src"
    (source / "docs").mkdir(parents=True)
    (source / "docs" / "victim.bin").write_bytes(os.urandom(200_000))
    (source / "healthy.bin").write_bytes(os.urandom(200_000))
    cli("init", "--block-size", "64K")
    cli("backup", source)
    snapshot = json.loads(cli("snapshots", "--json").stdout)[0]
    return source, snapshot


def locate_block(repo_path: Path, snapshot_id: str, path: bytes, block: int = 0) -> tuple[Path, int, int]:
    """(pack file, offset, length) of one block of a file in a snapshot."""
    with Repository.open(LocalStore(repo_path), PASSPHRASE.encode()) as repo:
        node = repo.find_node(repo.load_snapshot(snapshot_id), path)
        location = repo.index.lookup(node.block_id(block))
        assert location is not None
        return repo_path / pack_key(location.pack_id), location.entry.offset, location.entry.length


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x55]))


def test_flipped_byte_is_found_named_and_contained(cli, tmp_path: Path, repo_path: Path) -> None:
    source, snapshot = backed_up_source(cli, tmp_path)
    pack, offset, length = locate_block(repo_path, snapshot["id"], b"docs/victim.bin")
    flip_byte(pack, offset + length // 2)

    proc = cli("verify", "--read-data", check=14)
    out = proc.stdout.decode()
    assert f"pack {pack.name}" in out
    assert f"damaged: snapshot {snapshot['short_id']}: docs/victim.bin" in out
    assert "healthy.bin" not in out

    proc = cli("restore", "latest", "--target", tmp_path / "restored", check=3)
    assert "docs/victim.bin" in proc.stderr.decode() and "failed authentication" in proc.stderr.decode()
    assert (tmp_path / "restored" / "healthy.bin").read_bytes() == (source / "healthy.bin").read_bytes()
    assert not (tmp_path / "restored" / "docs" / "victim.bin").exists()  # no half-restored copy

    cli("restore", "latest", "--target", tmp_path / "only-healthy", "healthy.bin")


def test_missing_pack_is_found_without_reading_data(cli, tmp_path: Path, repo_path: Path) -> None:
    _, snapshot = backed_up_source(cli, tmp_path)
    pack, _, _ = locate_block(repo_path, snapshot["id"], b"docs/victim.bin")
    pack.unlink()

    out = cli("verify", check=14).stdout.decode()

    assert f"pack {pack.name} is missing" in out
    # the one pack held everything, trees included: the damage report says the snapshot is unreadable
    assert f"snapshot {snapshot['short_id']}" in out


def test_verify_json_of_a_damaged_repository_carries_its_error_as_every_failing_command_does(
        cli, tmp_path: Path, repo_path: Path) -> None:
    """The document had `ok: false` but no `error` nor `exit_code`, which every other failing
    command's JSON has (README: a document printed first takes the two keys)."""
    _, snapshot = backed_up_source(cli, tmp_path)
    assert "error" not in json.loads(cli("verify", "--json").stdout)
    pack, _, _ = locate_block(repo_path, snapshot["id"], b"docs/victim.bin")
    pack.unlink()
    proc = cli("verify", "--json", check=14)
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and doc["exit_code"] == 14, doc
    assert doc["error"] == proc.stderr.decode().strip().removeprefix("fsmount: "), (doc["error"], proc.stderr)


def test_block_that_no_index_knows_is_named(cli, tmp_path: Path, repo_path: Path) -> None:
    _, snapshot = backed_up_source(cli, tmp_path)
    unknown = bytes(range(32))
    with Repository.open(LocalStore(repo_path), PASSPHRASE.encode()) as repo:  # a snapshot naming it
        parent = repo.load_snapshot(snapshot["id"])
        root = repo.load_tree(parent.tree)
        docs = next(n for n in root if n.name == b"docs")
        files = [dataclasses.replace(n, blocks=unknown + n.blocks[32:]) if n.name == b"victim.bin" else n
                 for n in repo.load_tree(docs.subtree)]
        docs = dataclasses.replace(docs, subtree=repo.save_tree(files))
        tree = repo.save_tree([docs if n.name == b"docs" else n for n in root])
        damaged_id = repo.save_snapshot(dataclasses.replace(parent, tree=tree, time_ns=parent.time_ns + 1, id=""))

    out = cli("verify", check=14).stdout.decode()

    assert f"blob {unknown.hex()} is missing (not in any index)" in out
    assert f"damaged: snapshot {damaged_id[:8]}: docs/victim.bin" in out
    assert "healthy.bin" not in out and f"snapshot {snapshot['short_id']}" not in out


def test_corrupt_index_object_is_reported_not_fatal(cli, tmp_path: Path, repo_path: Path) -> None:
    backed_up_source(cli, tmp_path)
    index_file = next((repo_path / "index").iterdir())
    flip_byte(index_file, 40)
    cli.env["XDG_CACHE_HOME"] = str(tmp_path / "fresh-cache")  # a new machine: the index must load

    out = cli("verify", check=14).stdout.decode()

    assert f"index {index_file.name}" in out


def test_truncated_snapshot_object_is_reported(cli, tmp_path: Path, repo_path: Path) -> None:
    _, snapshot = backed_up_source(cli, tmp_path)
    path = repo_path / "snapshots" / snapshot["id"]
    path.write_bytes(path.read_bytes()[:10])

    out = cli("verify", check=14).stdout.decode()

    assert f"snapshot {snapshot['id']}" in out


def test_new_machine_rebuilds_the_index_cache(cli, tmp_path: Path) -> None:
    source, _ = backed_up_source(cli, tmp_path)
    cli.env["XDG_CACHE_HOME"] = str(tmp_path / "another-machine")
    cli("restore", "latest", "--target", tmp_path / "restored")
    assert (tmp_path / "restored" / "healthy.bin").read_bytes() == (source / "healthy.bin").read_bytes()


def test_a_damaged_snapshot_object_is_an_error_not_an_empty_list(cli, tmp_path: Path, repo_path: Path) -> None:
    """`snapshots` said "0 snapshots" (exit 0) and `restore latest` "no snapshots yet"."""
    _, snapshot = backed_up_source(cli, tmp_path)
    (repo_path / "snapshots" / snapshot["id"]).write_bytes(os.urandom(100))
    err = cli("snapshots", check=14).stderr.decode()
    assert f"snapshots/{snapshot['id']}" in err and "damaged" in err
    assert "damaged" in cli("restore", "latest", "--target", tmp_path / "r", check=14).stderr.decode()


def test_a_damaged_key_object_is_named_and_another_key_still_opens(cli, tmp_path: Path, repo_path: Path) -> None:
    backed_up_source(cli, tmp_path)
    (key,) = (repo_path / "keys").iterdir()
    original = key.read_bytes()
    key.write_text('{"bad": 1}')
    err = cli("snapshots", check=14).stderr.decode()
    assert f"keys/{key.name}" in err and "damaged" in err, err
    (repo_path / "keys" / ("0" * 64)).write_bytes(original)  # a second, good copy of the key
    cli("snapshots")


@pytest.mark.parametrize("kept", ["keys", "data", "index", "snapshots"])
def test_init_refuses_a_location_holding_parts_of_a_repository(cli, tmp_path: Path, repo_path: Path,
                                                              kept: str) -> None:
    """With its config gone, `fsmount init` made a new repository on top of the old one's objects."""
    backed_up_source(cli, tmp_path)
    (repo_path / "config").unlink()
    for prefix in {"keys", "data", "index", "snapshots"} - {kept}:
        for path in sorted((repo_path / prefix).rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()

    err = cli("init", check=1).stderr.decode()

    assert "parts of a repository" in err and err.count("\n") == 1, err
    assert not (repo_path / "config").exists()
    # and every other command says the same, where it told the user to run `fsmount init`
    err = cli("snapshots", check=10).stderr.decode()
    assert "parts of a repository" in err and "fsmount init" not in err, err


def test_init_takes_a_folder_with_other_files(cli, tmp_path: Path, repo_path: Path) -> None:
    repo_path.mkdir()
    (repo_path / "README").write_text("backups go here\n")
    cli("init")
    with Repository.open(LocalStore(repo_path), PASSPHRASE.encode()) as repo:
        assert repo.snapshot_ids() == []
