"""Packs damaged on every copy: `verify --read-data --repair` keeps what still opens in a new pack,
takes the rest out of the index, and the next plain backup stores it again. Foreign files under
data/ are named and left alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_integrity import flip_byte
from test_replicas import run, two_replicas  # noqa: F401 (a fixture)
from treecompare import differences

pytest_plugins = ["s3_fixtures"]

BLOCK = 64 * 1024


def make_source(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    (source / "docs").mkdir(parents=True)
    (source / "big.bin").write_bytes(os.urandom(40 * BLOCK))
    (source / "docs" / "notes.bin").write_bytes(os.urandom(3 * BLOCK))
    return source


def packs(repo_path: Path) -> list[Path]:
    return sorted(p for p in (repo_path / "data").rglob("*") if p.is_file() and len(p.name) == 64)


def largest_pack(repo_path: Path) -> Path:
    """The pack of file content (the other holds the trees)."""
    return max(packs(repo_path), key=lambda p: p.stat().st_size)


def flip_bytes(path: Path, offset: int, count: int = 4) -> None:
    for i in range(count):
        flip_byte(path, offset + i)


def snapshots(cli, *replicas) -> list[dict]:
    return json.loads(cli(*replicas, "snapshots", "--json").stdout)


def test_a_pack_damaged_on_its_only_copy_is_salvaged_and_stored_again_by_a_plain_backup(
        cli, tmp_path: Path, repo_path: Path) -> None:
    """--repair reported the damage and changed nothing: every later backup deduplicated against the
    corrupt blob ("added 0 B"), and the new snapshots were as damaged as the first."""
    source = make_source(tmp_path)
    cli("init", "--block-size", "64K")
    cli("backup", source)
    first = snapshots(cli)[0]
    bad = largest_pack(repo_path)
    flip_bytes(bad, bad.stat().st_size // 2)

    out = cli("verify", "--read-data", "--repair", check=14).stdout.decode()
    assert f"pack {bad.name} was damaged on every copy" in out and "1 lost" in out, out
    assert f"damaged: snapshot {first['short_id']}: big.bin" in out and "notes.bin" not in out, out
    assert "next `fsmount backup`" in out, out
    assert not bad.exists()  # replaced by a pack of the blobs that still open
    out = cli("verify", check=14).stdout.decode()  # the lost block is missing; the pack is not named
    assert bad.name not in out and "big.bin" in out, out

    cli("backup", source)  # plain: the parent's file whose block is gone is read again
    latest = snapshots(cli)[-1]
    assert BLOCK < latest["stats"]["bytes_added"] < 2 * BLOCK, latest  # the lost block only: the others were kept
    cli("verify", "--read-data")  # the first snapshot is whole again too
    for snapshot in (first, latest):
        target = tmp_path / f"restored-{snapshot['short_id']}"
        cli("restore", snapshot["id"], "--target", target)
        assert differences(source, target) == []


def test_a_pack_damaged_in_its_header_only_loses_nothing(cli, tmp_path: Path, repo_path: Path) -> None:
    source = make_source(tmp_path)
    cli("init", "--block-size", "64K")
    cli("backup", source)
    bad = largest_pack(repo_path)
    flip_bytes(bad, bad.stat().st_size - 40)

    out = cli("verify", "--read-data", check=14).stdout.decode()
    assert "verify --read-data --repair` keeps what still opens" in out, out
    out = cli("verify", "--read-data", "--repair").stdout.decode()
    assert f"pack {bad.name} was damaged on every copy" in out and "0 lost" in out and "no errors" in out, out
    assert not bad.exists()
    cli("verify")
    cli("verify", "--read-data")
    cli("restore", "latest", "--target", tmp_path / "restored")
    assert differences(source, tmp_path / "restored") == []


def test_a_pack_damaged_in_one_replica_and_missing_in_the_other_is_salvaged_on_both(
        cli, tmp_path: Path, two_replicas) -> None:  # noqa: F811
    """--repair said "could not heal 1" for both replicas, every later backup stored 0 B, and in the
    end every snapshot was damaged though the source was intact all along."""
    a, b = two_replicas
    source = make_source(tmp_path)
    run(cli, "init", "--block-size", "64K")
    run(cli, "backup", source)
    bad = largest_pack(a)
    flip_bytes(bad, bad.stat().st_size // 2)
    (b / bad.relative_to(a)).unlink()

    out = run(cli, "verify", "--read-data", "--repair", check=14).stdout.decode()
    assert f"pack {bad.name} was damaged on every copy" in out and "1 lost" in out and "big.bin" in out, out
    assert not bad.exists() and not (b / bad.relative_to(a)).exists()
    assert [p.name for p in packs(a)] == [p.name for p in packs(b)]  # the new pack is on both
    out = run(cli, "verify", check=14).stdout.decode()
    assert bad.name not in out, out

    run(cli, "backup", source)
    assert snapshots(cli, *cli.replicas)[-1]["stats"]["bytes_added"] > BLOCK
    for replica in (a, b):
        cli("-r", replica, "verify", "--read-data")  # each replica stands on its own
    run(cli, "verify", "--read-data")


def test_blobs_damaged_in_different_replicas_are_put_together_whole(cli, tmp_path: Path,
                                                                    two_replicas) -> None:  # noqa: F811
    """No replica holds a whole copy of the pack, but every blob opens in one of them: nothing is lost."""
    a, b = two_replicas
    source = make_source(tmp_path)
    run(cli, "init", "--block-size", "64K")
    run(cli, "backup", source)
    bad = largest_pack(a)
    flip_bytes(bad, 1000)  # the first blob in a
    flip_bytes(b / bad.relative_to(a), bad.stat().st_size // 2)  # another one in b

    out = run(cli, "verify", "--read-data", "--repair").stdout.decode()
    assert "0 lost" in out and "no errors" in out, out
    run(cli, "verify", "--read-data")
    run(cli, "restore", "latest", "--target", tmp_path / "restored")
    assert differences(source, tmp_path / "restored") == []


def test_a_copy_good_in_one_replica_heals_the_other_and_nothing_is_salvaged(cli, tmp_path: Path,
                                                                           two_replicas) -> None:  # noqa: F811
    a, _ = two_replicas
    source = make_source(tmp_path)
    run(cli, "init", "--block-size", "64K")
    run(cli, "backup", source)
    bad = largest_pack(a)
    whole = bad.read_bytes()
    flip_bytes(bad, bad.stat().st_size // 2)

    out = run(cli, "verify", "--read-data", "--repair").stdout.decode()
    assert f"{a}: healed 1 object\n" in out and "damaged on every copy" not in out, out
    assert bad.read_bytes() == whole


def test_json_names_each_damaged_copy_of_a_replica(cli, tmp_path: Path, two_replicas) -> None:  # noqa: F811
    """It was only text in "errors", with "damaged": []."""
    a, b = two_replicas
    run(cli, "init", "--block-size", "64K")
    run(cli, "backup", make_source(tmp_path))
    bad = largest_pack(a)
    flip_byte(bad, 1000)
    (b / "index" / next(p.name for p in (b / "index").iterdir())).unlink()
    gone = next(f"index/{p.name}" for p in (a / "index").iterdir() if not (b / "index" / p.name).exists())

    doc = json.loads(run(cli, "verify", "--read-data", "--json", check=14).stdout)
    assert {"replica": str(a), "object": bad.relative_to(a).as_posix(), "what": "damaged"} in doc["bad_copies"]
    assert {"replica": str(b), "object": gone, "what": "missing"} in doc["bad_copies"]
    assert len(doc["bad_copies"]) == 2 and not doc["ok"], doc


@pytest.mark.parametrize("foreign", ["data/notes.txt", "data/ab/not-a-pack", "index/README", "index/foreign.json",
                                     "snapshots/notes", "keys/old.json"])
def test_a_foreign_file_is_named_and_left_alone(cli, tmp_path: Path, repo_path: Path, foreign: str) -> None:
    """A file under data/ that is no pack was counted as a pack not indexed, and --repair, which
    could do nothing with it, was advised again and again."""
    cli("init", "--block-size", "64K")
    cli("backup", make_source(tmp_path))
    path = repo_path / foreign
    path.parent.mkdir(exist_ok=True)
    path.write_text("someone else's\n")

    for args in (("verify",), ("verify", "--repair"), ("verify", "--read-data", "--repair")):
        out = cli(*args).stdout.decode()
        assert "not indexed" not in out and "--repair" not in out, out
        assert f"1 object is not the repository's (no pack, index, snapshot or key), and left alone: {foreign}" \
            in out, out
    assert path.read_text() == "someone else's\n"
    doc = json.loads(cli("verify", "--json").stdout)
    assert doc["foreign_objects"] == [{"object": foreign}], doc
    listed = cli("snapshots")  # a foreign file under snapshots/ is no damaged snapshot either
    assert listed.stderr.decode() == "" and len(json.loads(cli("snapshots", "--json").stdout)) == 1


@pytest.mark.s3
def test_a_damaged_pack_over_s3_is_salvaged_and_stored_again(cli, tmp_path: Path, s3_bucket) -> None:
    key_id, secret = s3_bucket.server.credentials
    cli.env.update(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret,
                   FSMOUNT_REPOSITORY=s3_bucket.location("repo"))
    source = make_source(tmp_path)
    cli("init", "--block-size", "64K")
    cli("backup", source)
    store = s3_bucket.open_store("repo")
    key = max(store.list("data/"), key=lambda item: item[1])[0]
    data = bytearray(store.get(key))
    data[len(data) // 2] ^= 0x55
    store.put(key, bytes(data))

    out = cli("verify", "--read-data", "--repair", check=14).stdout.decode()
    assert "1 lost" in out and "big.bin" in out, out
    assert not store.exists(key)
    cli("backup", source)
    cli("verify", "--read-data")
    cli("restore", "latest", "--target", tmp_path / "restored")
    assert differences(source, tmp_path / "restored") == []


def test_a_truncated_pack_is_found_by_plain_verify_and_salvaged_by_repair(cli, tmp_path: Path,
                                                                          repo_path: Path) -> None:
    """Plain verify said "no errors" over a pack cut short; only --read-data found it."""
    source = make_source(tmp_path)
    cli("init", "--block-size", "64K")
    cli("backup", source)
    bad = largest_pack(repo_path)
    size = bad.stat().st_size
    os.truncate(bad, size // 2)

    out = cli("verify", check=14).stdout.decode()
    assert f"pack {bad.name} is truncated: {size // 2} bytes in the store, {size} by its index entries" in out, out
    assert "`fsmount verify --repair` keeps what still opens" in out and "damaged: snapshot" in out, out
    out = cli("verify", "--repair", check=14).stdout.decode()  # the lost blocks are missing until a backup
    assert f"pack {bad.name} was damaged on every copy: " in out and "went into pack" in out, out
    assert not bad.exists() and "big.bin" in out, out
    cli("backup", source)
    cli("verify", "--read-data")
    cli("restore", "latest", "--target", tmp_path / "restored")
    assert differences(source, tmp_path / "restored") == []


def test_a_pack_of_which_nothing_opens_says_none_could_be_kept(cli, tmp_path: Path, repo_path: Path) -> None:
    """It said "0 blobs that still open 43 lost"."""
    cli("init", "--block-size", "64K")
    cli("backup", make_source(tmp_path))
    bad = largest_pack(repo_path)
    os.truncate(bad, 16)

    out = cli("verify", "--read-data", "--repair", check=14).stdout.decode()
    assert f"pack {bad.name} was damaged on every copy: none could be kept, 43 lost; the damaged pack is deleted" \
        in out, out


def test_a_garbage_file_with_a_packs_name_is_removed_by_repair(cli, tmp_path: Path, repo_path: Path) -> None:
    """In no index and with no header to read, nothing could ever clean it: every verify, --repair
    included, exited 14."""
    cli("init", "--block-size", "64K")
    cli("backup", make_source(tmp_path))
    garbage = repo_path / "data" / "a6" / ("a6" + "0" * 62)
    garbage.parent.mkdir(exist_ok=True)
    garbage.write_text("w\n")

    out = cli("verify", check=14).stdout.decode()
    assert f"pack {garbage.name} is in no index, and its header cannot be read" in out, out
    assert "`fsmount verify --repair` removes it" in out, out
    out = cli("verify", "--read-data", "--repair").stdout.decode()
    assert f"removed 1 pack that no index names and whose header opens on no copy (nothing can read it): " \
           f"{garbage.name}" in out and "no errors" in out, out
    assert not garbage.exists()
    cli("verify")


def test_foreign_names_that_are_not_utf8_print_as_escapes_and_json_gives_their_bytes(
        cli, tmp_path: Path, repo_path: Path) -> None:
    """Plain verify printed the raw bytes (`data/\\ufffd\\ufffd`); a name under index/ went unmentioned."""
    cli("init", "--block-size", "64K")
    cli("backup", make_source(tmp_path))
    for name in (b"data/\xff\xfe", b"index/\xff"):
        with open(os.fsencode(repo_path) + b"/" + name, "w") as f:
            f.write("someone else's\n")

    out = cli("verify").stdout.decode()
    assert "2 objects are not the repository's (no pack, index, snapshot or key), and left alone: " \
           "data/\\xff\\xfe, index/\\xff" in out, out
    doc = json.loads(cli("verify", "--json").stdout)
    assert doc["foreign_objects"] == [{"object": "data/\\xff\\xfe", "object_hex": b"data/\xff\xfe".hex()},
                                      {"object": "index/\\xff", "object_hex": b"index/\xff".hex()}], doc


def test_json_damage_and_errors_are_records_that_give_back_the_bytes_of_a_name(
        cli, tmp_path: Path, repo_path: Path) -> None:
    """"damaged" was free text ("snapshot 72a30b9c: w\\\\xff/x\\\\xfe"), and the one-line error counted
    a file in two snapshots as two files."""
    source = tmp_path / "src"
    (source / os.fsdecode(b"w\xff")).mkdir(parents=True)
    (source / os.fsdecode(b"w\xff/x\xfe")).write_bytes(os.urandom(3 * BLOCK))
    cli("init", "--block-size", "64K")
    cli("backup", source)
    cli("backup", source)
    bad = largest_pack(repo_path)
    flip_bytes(bad, 100)  # the first blob: a block of x\xfe

    proc = cli("verify", "--read-data", check=14)
    assert "damaged: snapshot " in proc.stdout.decode() and ": w\\xff/x\\xfe\n" in proc.stdout.decode()
    assert "the repository has 2 errors affecting 1 file in 2 snapshots" in proc.stderr.decode(), proc.stderr
    doc = json.loads(cli("verify", "--read-data", "--json", check=14).stdout)
    ids = sorted(s["id"] for s in snapshots(cli))
    assert sorted(d["snapshot"] for d in doc["damaged"]) == ids
    assert all(d == {"snapshot": d["snapshot"], "what": "file", "path": "w\\xff/x\\xfe",
                     "path_hex": b"w\xff/x\xfe".hex()} for d in doc["damaged"]), doc["damaged"]
    assert all(e["object"] == bad.relative_to(repo_path).as_posix() and e["message"] for e in doc["errors"]), doc
    assert [e.get("blob") is not None for e in doc["errors"]] == [False, True], doc["errors"]
