"""Replicated repositories and migration, through the CLI: what users of two providers rely on."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import PASSPHRASE
from test_integrity import flip_byte
from treecompare import differences

from backend.backup import backup
from backend.errors import StoreError
from backend.repository import Repository
from backend.stores import LocalStore
from backend.stores.faulty import FaultyStore
from backend.stores.retry import RetryingStore, RetryPolicy
from backend.verify import verify

pytest_plugins = ["s3_fixtures"]


def make_source(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    (source / "docs").mkdir(parents=True)
    (source / "big.bin").write_bytes(os.urandom(1_500_000))
    (source / "docs" / "notes.txt").write_text("notes\n")
    return source


@pytest.fixture
def two_replicas(cli, tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "replica-a", tmp_path / "replica-b"
    cli.env.pop("FSMOUNT_REPOSITORY")
    cli.replicas = ("-r", a, "-r", b)  # type: ignore[attr-defined]
    return a, b


def run(cli, *args, **kwargs):
    return cli(*cli.replicas, *args, **kwargs)


def refuse_pack_writes(replica: Path) -> None:
    """Make every pack write to a local replica fail: a file where its data/ folder should be."""
    if (replica / "data").exists():
        shutil.rmtree(replica / "data")
    (replica / "data").write_text("not a directory: every pack write to this replica fails")


def test_missing_objects_are_reported_then_synced(cli, tmp_path: Path, two_replicas) -> None:
    a, b = two_replicas
    source = make_source(tmp_path)
    run(cli, "init")
    run(cli, "backup", source)
    (a / "notes.txt").write_text("a file someone left in the folder: no object of the repository\n")
    states = json.loads(run(cli, "replicas", "--json").stdout)["replicas"]
    assert [s["missing"] for s in states] == [0, 0] and states[0]["objects"] == states[1]["objects"]

    shutil.rmtree(b / "data")
    states = json.loads(run(cli, "replicas", "--json", check=14).stdout)["replicas"]
    assert states[0]["missing"] == 0 and states[1]["missing"] >= 1

    run(cli, "replicas", "sync")
    run(cli, "replicas")  # exit 0: the same objects everywhere
    cli("-r", b, "verify", "--read-data")  # the healed replica stands on its own
    assert not (b / "notes.txt").exists()
    assert b"could not heal" not in run(cli, "verify", "--read-data", "--repair").stdout


def test_a_replica_that_fails_stops_the_backup_unless_degraded(cli, tmp_path: Path, two_replicas) -> None:
    _, b = two_replicas
    source = make_source(tmp_path)
    run(cli, "init")
    refuse_pack_writes(b)

    proc = run(cli, "backup", source, check=15)
    assert str(b) in proc.stderr.decode()  # the message names the replica
    assert json.loads(run(cli, "snapshots", "--json").stdout) == []

    run(cli, "--degraded", "backup", source, check=3)  # done, with a warning: a replica missed it
    report = json.loads(run(cli, "replicas", "--json", check=14).stdout)
    assert report["recorded_degraded_writes"] >= 1 and report["replicas"][1]["missing"] >= 1
    # the next ordinary command says what is still missing (it went on in silence)
    assert "still missing there" in run(cli, "snapshots").stderr.decode()

    (b / "data").unlink()
    run(cli, "replicas", "sync")
    assert json.loads(run(cli, "replicas", "--json").stdout)["recorded_degraded_writes"] == 0
    cli("-r", b, "restore", "latest", "--target", tmp_path / "from-b")
    assert differences(source, tmp_path / "from-b") == []


def test_flipped_bytes_in_one_replica_are_read_around_and_repaired(cli, tmp_path: Path, two_replicas) -> None:
    a, b = two_replicas
    source = make_source(tmp_path)
    run(cli, "init")
    run(cli, "backup", source)
    pack = next(p for p in (a / "data").rglob("*") if p.is_file())
    flip_byte(pack, pack.stat().st_size // 2)

    # reads fall back to the good copy, and say so
    proc = run(cli, "restore", "latest", "--target", tmp_path / "restored")
    assert "damaged in the first replica" in proc.stderr.decode()
    assert differences(source, tmp_path / "restored") == []
    cli("-r", a, "verify", "--read-data", check=14)  # replica a alone is damaged
    out = run(cli, "verify", "--read-data", check=14).stdout.decode()  # and so are the two, as one
    assert f"replica {a} holds damaged copies of 1 object," in out, out  # it said "no errors"
    (b / "index" / next(p.name for p in (b / "index").iterdir())).unlink()
    assert f"replica {b} lacks 1 object," in run(cli, "verify", check=14).stdout.decode()

    out = run(cli, "verify", "--read-data", "--repair").stdout.decode()
    assert f"{a}: healed 1 object\n" in out and f"{b}: healed 1 object\n" in out
    cli("-r", a, "verify", "--read-data")
    run(cli, "verify", "--read-data")


def test_a_damaged_config_in_one_replica_is_read_around_and_repaired(cli, tmp_path: Path, two_replicas) -> None:
    """Every command failed on the damaged copy (`repository config is malformed`, exit 14), even
    `verify --repair`, which was to heal it from the good one."""
    _, b = two_replicas
    source = make_source(tmp_path)
    run(cli, "init")
    run(cli, "backup", source)
    (b / "config").write_bytes(b"\xce" + (b / "config").read_bytes()[1:])

    warned = run(cli, "snapshots").stderr.decode()
    assert f"replica {b} returned a damaged copy of config" in warned, warned
    out = run(cli, "verify", "--read-data", "--repair").stdout.decode()
    assert f"{b}: healed 1 object\n" in out, out
    cli("-r", b, "verify", "--read-data")


def test_a_blob_damaged_in_every_replica_names_only_the_files_that_need_it(cli, tmp_path: Path,
                                                                         two_replicas) -> None:
    """With no whole copy of the pack anywhere, verify took the pack as unreadable and named every
    file in it; restore got all but one of them back."""
    a, b = two_replicas
    source = tmp_path / "src"
    source.mkdir()
    for i in range(5):
        (source / f"f{i}").write_bytes(os.urandom(200_000))
    run(cli, "init")
    run(cli, "backup", source)
    pack = max((p for p in (a / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    for replica in (a, b):
        flip_byte(replica / pack.relative_to(a), 1000)  # the same byte of the first blob in both
    out = run(cli, "verify", "--read-data", check=14).stdout.decode()
    damaged = [line for line in out.splitlines() if line.startswith("damaged:")]
    assert len(damaged) == 1, out


def test_a_lost_pack_is_taken_out_of_the_index_and_backed_up_again(cli, tmp_path: Path, repo_path: Path) -> None:
    """Without replicas, --repair was refused, and every later backup still counted on a pack that
    was gone: each new snapshot was as damaged as the first (the index said the data was there)."""
    source = make_source(tmp_path)
    cli("init")
    cli("backup", source)
    for pack in (repo_path / "data").rglob("*"):
        if pack.is_file():
            pack.unlink()
    cli("backup", "--force", source)
    cli("verify", check=14)  # the new snapshot counted on the lost packs too
    out = cli("verify", "--repair", check=14).stdout.decode()  # the data is still lost
    assert "missing packs" in out and "fsmount backup" in out, out
    cli("backup", source)  # a plain backup: the parent's files whose blocks are gone are read again
    cli("verify", "--read-data")  # every snapshot, the first too, is whole again
    first = json.loads(cli("snapshots", "--json").stdout)[0]["id"]
    cli("restore", first, "--target", tmp_path / "first")
    assert differences(source, tmp_path / "first") == []


def test_backup_through_twenty_percent_transient_faults_completes_and_verifies(tmp_path: Path) -> None:
    faulty = FaultyStore(LocalStore(tmp_path / "repo"), seed=4, error_rate=0.1, drop_rate=0.1)
    store = RetryingStore(faulty, RetryPolicy(budget_s=30, initial_delay_s=0.001, max_delay_s=0.01))
    source = make_source(tmp_path)
    with Repository.init(store, PASSPHRASE.encode()) as repo:
        result = backup(repo, source)
    assert faulty.statistics().errors + faulty.statistics().drops > 0
    with Repository.open(LocalStore(tmp_path / "repo"), PASSPHRASE.encode()) as repo:
        assert verify(repo, read_data=True).ok
        assert repo.load_snapshot(result.snapshot.id).stats["files"] == 2


# -- migration


@pytest.mark.s3
def test_migration_to_s3_resumes_verifies_and_moves(cli, tmp_path: Path, repo_path: Path, s3_bucket) -> None:
    source = make_source(tmp_path)
    cli("init")
    cli("backup", source)
    (source / "docs" / "more.txt").write_text("more\n")
    cli("backup", source)
    key_id, secret = s3_bucket.server.credentials
    cli.env.update(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret)
    destination = s3_bucket.location("moved")

    # an earlier run that stopped half-way left some objects behind, one of them cut short
    partial = s3_bucket.open_store("moved")
    objects = sorted(k for k, _ in LocalStore(repo_path).list("") if k != "config")
    for key in objects[: len(objects) // 2]:
        partial.put(key, (repo_path / key).read_bytes())
    partial.put(objects[-1], b"cut short")
    assert not partial.exists("config")  # not a repository until everything is there

    report = json.loads(cli("migrate", "--to", destination, "--json").stdout)
    assert report["skipped"] == len(objects) // 2 and report["copied"] == len(objects) - len(objects) // 2 + 1  # config
    assert report["objects"] == report["copied"] + report["skipped"] and report["failed"] == 0

    cli("-r", destination, "verify", "--read-data")
    cli("-r", destination, "restore", "latest", "--target", tmp_path / "from-s3")
    assert differences(source, tmp_path / "from-s3") == []

    cli("migrate", "--to", destination, "--delete-source")
    assert not (repo_path / "config").exists()
    assert b"no repository" in cli("snapshots", check=10).stderr
    assert len(json.loads(cli("-r", destination, "snapshots", "--json").stdout)) == 2


@pytest.mark.s3
def test_migration_within_one_server_is_copied_by_it_and_checked(cli, tmp_path: Path, s3_bucket) -> None:
    key_id, secret = s3_bucket.server.credentials
    cli.env.update(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret)
    origin = s3_bucket.location("origin")
    source = make_source(tmp_path)
    (source / "large.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    cli("-r", origin, "init")
    cli("-r", origin, "backup", source)
    # the largest pack uploaded again in parts: its ETag is no MD5, so its copy is read back and checked
    store = s3_bucket.open_store("origin", multipart_threshold=5 * 1024 * 1024, part_size=5 * 1024 * 1024)
    largest, _ = max(store.list("data/"), key=lambda entry: entry[1])
    intact = store.get(largest)
    store.put(largest, intact)
    assert next(etag for key, _, etag in store.list_with_etags("data/") if key == largest).endswith("-2")

    moved = s3_bucket.location("moved")
    report = json.loads(cli("-r", origin, "migrate", "--to", moved, "--json").stdout)
    assert report["copied_by_server"] == report["copied"] - 1 == report["objects"] - 1  # all but config
    cli("-r", moved, "verify", "--read-data")
    cli("-r", moved, "restore", "latest", "--target", tmp_path / "restored")
    assert differences(source, tmp_path / "restored") == []

    def damage(key: str) -> bytes:
        data = bytearray(store.get(key))
        data[100] ^= 0x55
        store.put(key, bytes(data))
        return bytes(data)

    # the read-back finds a damaged object uploaded in parts...
    damage(largest)
    err = cli("-r", origin, "migrate", "--to", s3_bucket.location("again"), check=14).stderr
    assert f"copy of {largest} does not match its name".encode() in err
    store.put(largest, intact)
    # ...while the server copies one with a plain MD5 as it is: --check-data reads it here
    other = next(key for key, _ in store.list("data/") if key != largest)
    damage(other)
    err = cli("-r", origin, "migrate", "--to", s3_bucket.location("checked"), "--check-data", check=14).stderr
    assert f"{other} is damaged in the source".encode() in err
    assert not s3_bucket.open_store("checked").exists("config")


@pytest.mark.s3
def test_migration_goes_through_this_machine_where_the_server_will_not_copy(tmp_path: Path, s3_bucket) -> None:
    from backend.migrate import migrate
    from backend.stores.s3 import S3Store

    class RefusesToCopy(S3Store):
        """A server without CopyObject (or a key it denies), as some S3-compatible stores are."""

        def copy_from(self, source: S3Store, key: str) -> str:
            raise StoreError(f"copying {key}: NotImplemented (A header you provided implies functionality "
                             "that is not implemented)")

    origin = s3_bucket.open_store("origin")
    with Repository.init(origin, PASSPHRASE.encode()) as repo:
        backup(repo, make_source(tmp_path))
    destination = RefusesToCopy(s3_bucket.name, "moved", endpoint_url=s3_bucket.server.endpoint,
                                credentials=s3_bucket.server.credentials)
    assert destination.can_copy_from(origin)
    report = migrate(origin, destination, PASSPHRASE.encode())
    assert report.copied_by_server == 0 and report.copied == report.objects and not report.errors
    with Repository.open(s3_bucket.open_store("moved"), PASSPHRASE.encode()) as repo:
        assert verify(repo, read_data=True).ok


def test_migration_refuses_the_repository_itself_however_spelled(cli, tmp_path: Path, repo_path: Path,
                                                                 two_replicas) -> None:
    source = make_source(tmp_path)
    cli("-r", repo_path, "init")
    cli("-r", repo_path, "backup", source)
    (tmp_path / "alias").symlink_to(repo_path)
    for destination in (repo_path, tmp_path / "alias", f"{tmp_path / 'alias'}/", repo_path / "inner"):
        err = cli("-r", repo_path, "migrate", "--to", destination, "--delete-source", check=2).stderr
        assert b"is the repository being migrated, or inside it" in err
    cli("-r", repo_path, "verify", "--read-data")  # --delete-source deleted nothing

    # a replicated repository lists one replica: the other is checked too
    a, b = two_replicas
    cli(*cli.replicas, "init")
    cli(*cli.replicas, "backup", source)
    err = cli("-r", b, "-r", a, "migrate", "--to", a, "--delete-source", check=2).stderr
    assert b"is the repository being migrated" in err
    cli("-r", a, "verify", "--read-data")
    cli("-r", b, "verify", "--read-data")

    # a probe left by a migration killed in its moment is no object of the repository
    (repo_path / "migrate-probe-0123456789abcdef").write_bytes(b"")
    report = json.loads(cli("-r", repo_path, "migrate", "--to", tmp_path / "moved", "--json").stdout)
    assert not report["errors"] and not (tmp_path / "moved" / "migrate-probe-0123456789abcdef").exists()


@pytest.mark.s3
def test_migration_refuses_its_own_bucket_and_prefix(cli, tmp_path: Path, s3_bucket) -> None:
    key_id, secret = s3_bucket.server.credentials
    cli.env.update(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret)
    origin = s3_bucket.location("origin")
    cli("-r", origin, "init")
    cli("-r", origin, "backup", make_source(tmp_path))
    for destination in (origin, s3_bucket.location("origin/inner")):
        err = cli("-r", origin, "migrate", "--to", destination, "--delete-source", check=2).stderr
        assert b"is the repository being migrated, or inside it" in err
    cli("-r", origin, "verify", "--read-data")


def test_migration_refuses_a_destination_with_another_repository(cli, tmp_path: Path) -> None:
    cli("init")
    other = tmp_path / "other"
    cli("-r", other, "init")
    before = sorted(p.name for p in other.rglob("*"))
    assert b"different repository" in cli("migrate", "--to", other, check=2).stderr  # bad usage, as a folder in use
    assert sorted(p.name for p in other.rglob("*")) == before


def test_two_repositories_are_not_taken_for_replicas_of_one(cli, tmp_path: Path) -> None:
    """Given as replicas, two separate repositories took each other's objects and keys, through
    a backup and through `replicas sync`."""
    first, second = tmp_path / "first", tmp_path / "second"
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_text("a")
    for repo in (first, second):
        cli("-r", repo, "init")
    before = {repo: sorted(p.name for p in repo.rglob("*")) for repo in (first, second)}
    for command in (("backup", source), ("replicas", "sync"), ("snapshots",)):
        err = cli("-r", first, "-r", second, *command, check=2).stderr.decode()
        assert "holds a different repository" in err, err
    assert {repo: sorted(p.name for p in repo.rglob("*")) for repo in (first, second)} == before
    new = tmp_path / "new-replica"  # a replica in a folder not made yet: sync makes and fills it
    cli("-r", first, "-r", new, "replicas", "sync")
    assert json.loads(cli("-r", new, "snapshots", "--json").stdout) == []


@pytest.mark.s3
def test_replicas_on_two_providers_each_with_its_own_profile(cli, tmp_path: Path, s3_bucket, s3_bucket_b) -> None:
    config = tmp_path / "config"
    (config / "fsmount").mkdir(parents=True)
    profiles = config / "fsmount" / "profiles.toml"
    lines = []
    for name, bucket in (("first", s3_bucket), ("second", s3_bucket_b)):
        key_id, secret = bucket.server.credentials
        lines += [f"[{name}]", f'location = "{bucket.location()}"', f'access_key_id = "{key_id}"',
                  f'secret_access_key = "{secret}"', ""]
    profiles.write_text("\n".join(lines))
    profiles.chmod(0o600)
    cli.env.update(XDG_CONFIG_HOME=str(config))
    cli.env.pop("FSMOUNT_REPOSITORY")
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        cli.env.pop(variable, None)
    both = ("--profile", "first", "-r", "profile:second")
    source = make_source(tmp_path)

    cli(*both, "init")
    cli(*both, "backup", source)
    states = json.loads(cli(*both, "replicas", "--json").stdout)["replicas"]
    assert [s["missing"] for s in states] == [0, 0] and states[0]["objects"] == states[1]["objects"] > 0
    cli("--profile", "second", "restore", "latest", "--target", tmp_path / "from-second")
    assert differences(source, tmp_path / "from-second") == []

    assert b"no profile 'third'" in cli("--profile", "third", "snapshots", check=2).stderr
    with profiles.open("a") as f:  # half the credentials: the environment's other half was used
        f.write(f'[half]\nlocation = "{s3_bucket_b.location()}"\naccess_key_id = "x"\n')
    assert b"no secret_access_key" in cli("--profile", "half", "snapshots", check=2).stderr
    profiles.chmod(0o644)
    proc = cli("--profile", "first", "snapshots", check=2)
    assert b"must be private" in proc.stderr
    assert s3_bucket.server.credentials[1].encode() not in proc.stderr + proc.stdout


def test_migration_interrupted_by_a_store_failure_resumes_and_verifies(cli, tmp_path: Path, repo_path: Path) -> None:
    from backend.migrate import PROBE_PREFIX, migrate
    from backend.stores.base import ObjectStore

    source = make_source(tmp_path)
    cli("init")
    for i in range(6):  # several snapshots, so there are objects enough to stop half-way through
        (source / f"file{i}").write_bytes(os.urandom(50_000))
        cli("backup", source)

    class FailsAfter(FaultyStore):
        """The destination goes down after a number of writes of the repository's objects, as if
        the network dropped for good."""

        def __init__(self, inner: ObjectStore, writes: int):
            super().__init__(inner, seed=1)
            self.writes_left = writes

        def put(self, key: str, data: bytes) -> None:
            self.writes_left -= not key.startswith(PROBE_PREFIX)  # the migration's own check
            if self.writes_left < 0:
                self.down = True
            super().put(key, data)

    total = len([k for k, _ in LocalStore(repo_path).list("")])
    with pytest.raises(StoreError):
        migrate(LocalStore(repo_path), FailsAfter(LocalStore(tmp_path / "moved"), total // 2),
                PASSPHRASE.encode(), workers=1)
    assert not (tmp_path / "moved" / "config").exists()

    report = migrate(LocalStore(repo_path), LocalStore(tmp_path / "moved"), PASSPHRASE.encode())
    assert report.skipped == total // 2 and report.copied == total - total // 2  # config among them
    cli("-r", tmp_path / "moved", "verify", "--read-data")
    assert len(json.loads(cli("-r", tmp_path / "moved", "snapshots", "--json").stdout)) == 6


def test_a_delete_source_stopped_part_way_is_finished_by_running_it_again(cli, tmp_path: Path, repo_path: Path) -> None:
    """The source's config goes first, so a second run found "no repository" and the rest of the
    source stayed forever. It now deletes the rest, once the destination is seen to hold all of it."""
    from backend.migrate import migrate
    from backend.stores.base import ObjectStore

    source = make_source(tmp_path)
    cli("init")
    cli("backup", source)

    class DeletesFail(FaultyStore):
        def __init__(self, inner: ObjectStore, deletes: int):
            super().__init__(inner, seed=1)
            self.deletes_left = deletes

        def delete(self, key: str) -> None:
            self.deletes_left -= 1
            if self.deletes_left < 0:
                raise StoreError("the connection dropped")
            super().delete(key)

    moved = LocalStore(tmp_path / "moved")
    with pytest.raises(StoreError):
        migrate(DeletesFail(LocalStore(repo_path), 3), moved, PASSPHRASE.encode(), delete_source=True)
    left = [k for k, _ in LocalStore(repo_path).list("")]
    assert left and "config" not in left
    cli("migrate", "--to", tmp_path / "moved", "--delete-source")
    assert [k for k, _ in LocalStore(repo_path).list("")] == []
    assert list(repo_path.iterdir()) == []  # no empty data/, index/... left behind
    cli("-r", tmp_path / "moved", "verify", "--read-data")
    cli("migrate", "--to", tmp_path / "moved", "--delete-source", check=10)  # nothing left: no repository


def test_a_damaged_index_copy_in_one_replica_is_found_and_healed_without_read_data(cli, tmp_path: Path,
                                                                                  two_replicas) -> None:
    """Reads go on to the good copy, so plain `verify` said "no errors" and `--repair` healed
    nothing; only --read-data saw it. Index, snapshot and key objects are small: always checked."""
    a, b = two_replicas
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_bytes(os.urandom(50_000))
    run(cli, "init")
    run(cli, "backup", source)
    damaged = next(p for p in (a / "index").rglob("*") if p.is_file())
    flip_byte(damaged, 30)
    out = run(cli, "verify", check=14).stdout.decode()
    assert f"replica {a}" in out and "damaged" in out, out
    run(cli, "verify", "--repair")
    run(cli, "verify")
    assert damaged.read_bytes() == (b / damaged.relative_to(a)).read_bytes()


def test_a_replica_that_refuses_writes_is_named_as_a_storage_error(cli, tmp_path: Path, two_replicas) -> None:
    """sync said "not healed (no replica has a good copy)" for every object though the other replica
    held good copies, exited 14, and its --json counted 0 degraded writes where `replicas` said 4."""
    a, b = two_replicas
    source = make_source(tmp_path)
    run(cli, "init")
    refuse_pack_writes(b)
    run(cli, "--degraded", "backup", source, check=3)
    (b / "data").unlink()
    for pack in (p for p in (a / "data").rglob("*") if p.is_file()):
        (b / pack.relative_to(a)).mkdir(parents=True)  # a folder in the way: writing the copy there fails

    proc = run(cli, "replicas", "sync", check=15)
    out = proc.stdout.decode()
    assert f"could not write to {b}: " in out and "Is a directory" in out and "no replica has a good copy" not in out
    assert f"could not write to {b}: " in proc.stderr.decode(), proc.stderr
    recorded = json.loads(run(cli, "replicas", "--json", check=14).stdout)["recorded_degraded_writes"]
    doc = json.loads(run(cli, "replicas", "sync", "--json", check=15).stdout)
    assert doc["recorded_degraded_writes"] == recorded >= 1 and doc["exit_code"] == 15, doc


def test_a_foreign_file_under_index_is_left_alone_on_every_replica(cli, tmp_path: Path, two_replicas) -> None:
    """Any file under index/ counted as an object: one on a single replica was "missing" on the
    other (exit 14), and one on both was "damaged" everywhere, which `verify --repair` could not heal."""
    a, b = two_replicas
    run(cli, "init")
    run(cli, "backup", make_source(tmp_path))
    (a / "index" / "notes.txt").write_text("a user's file, not an index object\n")
    states = json.loads(run(cli, "replicas", "--json").stdout)["replicas"]
    assert [s["missing"] for s in states] == [0, 0] and states[0]["objects"] == states[1]["objects"], states
    run(cli, "replicas", "sync", "--read-data")
    assert not (b / "index" / "notes.txt").exists()

    (b / "index" / "notes.txt").write_text("the same on the other replica\n")
    out = run(cli, "verify", "--repair").stdout.decode()
    assert "could not heal" not in out and "index/notes.txt" in out and "left alone" in out, out
    assert (a / "index" / "notes.txt").exists() and (b / "index" / "notes.txt").exists()


def test_verify_repair_json_says_per_replica_what_it_healed_and_what_it_could_not(cli, tmp_path: Path,
                                                                                 two_replicas) -> None:
    """The "healed 1 object, could not heal 7: ..." lines were printed only without --json, and the
    JSON document did not say what --repair had done to each replica."""
    a, b = two_replicas
    source = tmp_path / "src"
    source.mkdir()
    run(cli, "init")
    for i in range(7):  # an index object each
        (source / "f").write_bytes(os.urandom(1000 + i))
        run(cli, "backup", source)
    index_keys = {f"index/{p.name}" for p in (a / "index").iterdir()}
    for key in index_keys:  # damaged on both replicas, differently: no good copy anywhere
        flip_byte(a / key, 10)
        flip_byte(b / key, 20)
    next((b / "snapshots").iterdir()).unlink()

    proc = run(cli, "verify", "--read-data", "--repair", "--json", check=None)

    healing = json.loads(proc.stdout)["healing"]
    assert [(h["location"], h["healed"], h["unhealed"]) for h in healing] == [(str(a), 0, 7), (str(b), 1, 7)], healing
    for replica in healing:
        assert len(replica["unhealed_objects"]) == 5 and set(replica["unhealed_objects"]) <= index_keys, replica


def test_verify_repair_json_without_anything_to_heal_says_so(cli, tmp_path: Path, two_replicas) -> None:
    run(cli, "init")
    run(cli, "backup", make_source(tmp_path))
    healing = json.loads(run(cli, "verify", "--repair", "--json").stdout)["healing"]
    assert [(h["location"], h["healed"], h["unhealed"], h["unhealed_objects"]) for h in healing] == [
        (str(replica), 0, 0, []) for replica in two_replicas]


def test_verify_repair_json_says_what_it_healed_when_a_replica_refuses_writes(cli, tmp_path: Path,
                                                                            two_replicas) -> None:
    """verify stopped at the replica that refused the copies before printing its document: stdout
    held only {"error", "exit_code"}, and a script could not tell that the other replica was healed."""
    a, b = two_replicas
    run(cli, "init")
    run(cli, "backup", make_source(tmp_path))
    snapshot = next((a / "snapshots").iterdir())
    snapshot.unlink()  # a heals it from b
    refuse_pack_writes(b)  # b lacks every pack, and cannot take them back

    doc = json.loads(run(cli, "verify", "--read-data", "--repair", "--json", check=15).stdout)

    assert [(h["location"], h["healed"], h["unhealed"]) for h in doc["healing"]] == [(str(a), 1, 0), (str(b), 0, 0)]
    assert doc["exit_code"] == 15 and doc["error"].startswith(f"could not write to {b}: "), doc
    assert snapshot.exists()


def test_verify_repair_json_says_what_it_healed_when_a_replica_cannot_be_reached(cli, tmp_path: Path,
                                                                               two_replicas) -> None:
    a, b = two_replicas
    c = tmp_path / "replica-c"
    cli.replicas = (*cli.replicas, "-r", c)
    run(cli, "init")
    run(cli, "backup", make_source(tmp_path))
    snapshot = next((a / "snapshots").iterdir())
    snapshot.unlink()  # a heals it from b
    c.rename(tmp_path / "elsewhere")  # as on a disk not mounted

    proc = run(cli, "verify", "--repair", "--json", check=15)

    doc = json.loads(proc.stdout)
    assert [(h["location"], h["healed"]) for h in doc["healing"]] == [(str(a), 1), (str(b), 0), (str(c), 0)], doc
    assert doc["exit_code"] == 15 and doc["error"].startswith(f"replica {c} cannot be reached: "), doc
    assert snapshot.exists()
    plain = run(cli, "verify", "--repair", check=15)
    assert plain.stdout == b"" and f"replica {c} cannot be reached" in plain.stderr.decode(), plain


def test_a_replica_without_the_repository_is_read_and_said_once(cli, tmp_path: Path, two_replicas) -> None:
    """Taking the lock read every replica's config, and opening the repository read them all again:
    the warning about the empty replica came twice."""
    a, b = two_replicas
    cli("-r", a, "init")
    b.mkdir()
    err = run(cli, "snapshots").stderr.decode()
    assert err.count(f"replica {b} holds no repository yet") == 1, err
