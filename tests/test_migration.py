"""Migration where it goes wrong: a store that stops answering, a destination in use for something
else, a copy killed mid-write, and reports whose counts add up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import PASSPHRASE
from flaky_proxy import FlakyProxy
from test_locks import held_locks_in, paused_once_locked

from backend.backup import backup
from backend.errors import StoreError, StoreUnreachable, TransientStoreError
from backend.migrate import UNREACHABLE_IN_A_ROW, migrate
from backend.repository import Repository
from backend.stores import LocalStore
from backend.stores.base import ObjectStore
from backend.stores.faulty import FaultyStore
from backend.stores.local import STALE_TMP_S
from backend.stores.retry import RetryingStore, RetryPolicy

pytest_plugins = ["s3_fixtures"]

RETRY_S = 1.0  # each object's retry budget in these tests


def make_repository(path: Path, tmp_path: Path, snapshots: int = 12) -> int:
    """A local repository of many small objects (a pack, an index and a snapshot per backup); how many."""
    source = tmp_path / "src"
    source.mkdir()
    with Repository.init(LocalStore(path), PASSPHRASE.encode()) as repo:
        for i in range(snapshots):
            (source / f"file{i}").write_bytes(os.urandom(20_000))
            backup(repo, source)
    return len(list(LocalStore(path).list("")))


class GoesDown(FlakyProxy):
    """Forwards the first `answered` requests, then answers every one with `503 SlowDown`, as a
    provider that stops answering; `up()` brings it back."""

    def __init__(self, upstream_endpoint: str, answered: int):
        super().__init__(upstream_endpoint, 0.0)
        self.answered = answered

    def fail_now(self) -> bool:
        with self._lock:
            if self.forwarded < self.answered:
                self.forwarded += 1
                return False
            self.failed += 1
            return True

    def up(self) -> None:
        with self._lock:
            self.answered = sys.maxsize


@pytest.mark.s3
def test_a_destination_that_stops_answering_stops_the_migration_at_once(cli, tmp_path: Path, repo_path: Path,
                                                                        s3_bucket) -> None:
    """Each object waited out its own retry budget: 41 objects took 7 minutes to fail."""
    total = make_repository(repo_path, tmp_path)
    key_id, secret = s3_bucket.server.credentials
    cli.env.update(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret, AWS_DEFAULT_REGION="us-east-1",
                   FSMOUNT_STORE_RETRY_S=str(RETRY_S))
    with GoesDown(s3_bucket.server.endpoint, answered=15) as proxy:  # the set-up, then a few objects
        destination = f"s3:{proxy.endpoint}/{s3_bucket.name}/moved"
        started = time.monotonic()
        err = cli("migrate", "--to", destination, "--workers", "1", check=15).stderr.decode()
        took = time.monotonic() - started
        copied = len([key for key, _ in s3_bucket.open_store("moved").list("") if not key.startswith("locks/")])
        assert 0 < copied < total - 10, copied
        *warnings, message = err.strip().splitlines()
        assert f"{destination} is not answering" in message and "run migrate again to resume" in message, err
        assert all("could not remove the repository lock" in line for line in warnings), err  # it goes stale
        assert took < (UNREACHABLE_IN_A_ROW + 4) * RETRY_S + 5, took  # not one budget per object left

        proxy.up()
        report = json.loads(cli("migrate", "--to", destination, "--json").stdout)
    assert report["skipped"] == copied and report["copied"] == total - copied  # and the copy verifies
    assert len(json.loads(cli("-r", s3_bucket.location("moved"), "snapshots", "--json").stdout)) == 12


class StopsAnswering(FaultyStore):
    """Every call fails with a transient error once `calls` calls have been made (the listing first)."""

    def __init__(self, inner: ObjectStore, calls: int):
        super().__init__(inner, seed=1)
        self.calls_left = calls

    def _run(self, op: str, key: str, call):  # type: ignore[no-untyped-def]
        self.calls_left -= 1
        if self.calls_left < 0:
            self.error_rate = 1.0
        return super()._run(op, key, call)


def test_a_source_that_stops_answering_stops_the_migration_naming_it(tmp_path: Path, repo_path: Path) -> None:
    total = make_repository(repo_path, tmp_path)
    source = RetryingStore(StopsAnswering(LocalStore(repo_path), calls=12), RetryPolicy(budget_s=0.3))
    moved = LocalStore(tmp_path / "moved")
    with pytest.raises(StoreUnreachable) as raised:
        migrate(source, moved, PASSPHRASE.encode(), workers=1)
    assert str(raised.value).startswith(f"{repo_path} is not answering")
    assert "run migrate again to resume" in str(raised.value)
    assert source.inner.statistics().errors < total  # far from a budget for each object left


def test_objects_failing_here_and_there_do_not_stop_the_rest(tmp_path: Path, repo_path: Path) -> None:
    make_repository(repo_path, tmp_path)
    packs = sorted(k for k, _ in LocalStore(repo_path).list("data/"))
    unlucky = {packs[1], packs[4], packs[7], packs[10]}  # never UNREACHABLE_IN_A_ROW in a row

    class Flaky(FaultyStore):
        def put(self, key: str, data: bytes) -> None:
            if key in unlucky:
                raise TransientStoreError(f"put {key}: injected transient error")
            super().put(key, data)

    moved = tmp_path / "moved"
    with pytest.raises(StoreError) as raised:
        migrate(LocalStore(repo_path), RetryingStore(Flaky(LocalStore(moved), seed=1), RetryPolicy(budget_s=0.2)),
                PASSPHRASE.encode(), workers=1)
    assert str(raised.value).startswith(f"{len(unlucky)} objects could not be copied (run migrate again")
    there = {k for k, _ in LocalStore(moved).list("")}
    assert there == {k for k, _ in LocalStore(repo_path).list("")} - unlucky - {"config"}

    report = migrate(LocalStore(repo_path), LocalStore(moved), PASSPHRASE.encode())
    assert report.copied == len(unlucky) + 1 and report.skipped == report.objects - len(unlucky) - 1


def test_migration_refuses_a_folder_in_use_for_something_else(cli, tmp_path: Path, repo_path: Path) -> None:
    make_repository(repo_path, tmp_path, snapshots=1)
    junk = tmp_path / "junk"
    (junk / "data").mkdir(parents=True)
    (junk / "photo.jpg").write_bytes(b"\xff\xd8 not a repository object")
    (junk / "data" / "notes.txt").write_text("notes\n")
    before = sorted(p.relative_to(junk) for p in junk.rglob("*"))
    err = cli("migrate", "--to", junk, check=2).stderr.decode()
    assert f"{junk} is not empty" in err and "data/notes.txt" in err and "nothing was copied" in err, err
    assert sorted(p.relative_to(junk) for p in junk.rglob("*")) == before


def test_an_interrupted_migration_says_how_to_finish_and_counts_add_up(cli, tmp_path: Path, repo_path: Path) -> None:
    total = make_repository(repo_path, tmp_path, snapshots=4)
    moved = tmp_path / "moved"
    objects = sorted(k for k, _ in LocalStore(repo_path).list("") if k != "config")
    moved.mkdir()
    for key in objects[: len(objects) // 2]:  # what a migration stopped half-way had copied
        LocalStore(moved).put(key, (repo_path / key).read_bytes())
    err = cli("-r", moved, "snapshots", check=10).stderr.decode()
    assert "holds parts of a repository" in err and "run that migrate again to finish it" in err, err

    report = json.loads(cli("migrate", "--to", moved, "--json").stdout)
    assert (report["objects"], report["copied"], report["skipped"], report["failed"]) == \
        (total, total - len(objects) // 2, len(objects) // 2, 0)
    again = json.loads(cli("migrate", "--to", moved, "--json").stdout)  # nothing left to do
    assert (again["objects"], again["copied"], again["skipped"]) == (total, 0, total)
    out = cli("migrate", "--to", moved, "--delete-source").stdout.decode()
    assert f"migrated {total} objects" in out and f"deleted {total} objects at the source" in out, out
    assert list(repo_path.iterdir()) == []


def write_killed_at_rename(root: Path, key: str, stop: signal.Signals) -> subprocess.Popen:
    """A process putting `key` into the local store at `root` that gets `stop` just before its
    temporary file is renamed into place: killed mid-put (SIGKILL), or stalled there (SIGSTOP)."""
    code = textwrap.dedent(f"""
        import os, signal
        from backend.stores import LocalStore
        rename = os.rename
        def stop_first(src, dst):
            os.kill(os.getpid(), {int(stop)})
            rename(src, dst)
        os.rename = stop_first
        LocalStore({str(root)!r}).put({key!r}, b"x" * 100_000)
    """)
    return subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1])


def temporary_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".tmp-*"))


def wait_stopped(proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while True:
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] == "T":
                return
        assert time.monotonic() < deadline, "the writer never stopped"
        time.sleep(0.02)


def test_a_migration_killed_mid_write_leaves_no_temporary_file_once_resumed(cli, tmp_path: Path,
                                                                             repo_path: Path) -> None:
    make_repository(repo_path, tmp_path, snapshots=2)
    moved = tmp_path / "moved"
    pack = next(k for k, _ in LocalStore(repo_path).list("data/"))
    moved.mkdir()
    writer = write_killed_at_rename(moved, pack, signal.SIGKILL)
    assert writer.wait(timeout=30) == -signal.SIGKILL
    assert len(temporary_files(moved)) == 1
    cli("migrate", "--to", moved)
    assert temporary_files(moved) == []
    cli("-r", moved, "verify", "--read-data")


def test_a_live_writers_temporary_file_is_never_taken_from_it(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = LocalStore(root)
    store.create_if_missing()
    writer = write_killed_at_rename(root, "data/ab/object", signal.SIGSTOP)
    try:
        wait_stopped(writer)
        [live] = temporary_files(root)
        os.utime(live, (0, 0))  # however old: its writer is alive
        assert list(store.list("")) == [] and live.exists()
    finally:
        writer.send_signal(signal.SIGCONT)
    assert writer.wait(timeout=30) == 0
    assert list(store.list("")) == [("data/ab/object", 100_000)]

    # a writer this machine cannot see (another host on a shared folder, an older fsmount): by age
    recent, old = root / "data" / "ab" / ".tmp-0123456789abcdef", root / "data" / ".tmp-feedc0de-1-00"
    recent.write_bytes(b"recent")
    old.write_bytes(b"old")
    os.utime(old, (time.time() - STALE_TMP_S - 60,) * 2)
    assert len(list(store.list(""))) == 1
    assert recent.exists() and not old.exists()


def test_a_copy_in_use_since_its_migration_still_lets_it_delete_the_source(cli, tmp_path: Path,
                                                                           repo_path: Path) -> None:
    """Its new snapshots are no objects of the source, yet they are this repository's."""
    make_repository(repo_path, tmp_path, snapshots=1)
    moved = tmp_path / "moved"
    cli("migrate", "--to", moved)
    (tmp_path / "src" / "later.txt").write_text("backed up to the new place\n")
    cli("-r", moved, "backup", tmp_path / "src")
    cli("migrate", "--to", moved, "--delete-source")
    assert list(repo_path.iterdir()) == []
    assert len(json.loads(cli("-r", moved, "snapshots", "--json").stdout)) == 2


def test_a_destination_holding_another_repository_is_bad_usage_too(cli, tmp_path: Path, repo_path: Path) -> None:
    """It exited 1 where a destination in use for anything else exits 2."""
    make_repository(repo_path, tmp_path, snapshots=1)
    other = tmp_path / "other"
    cli("-r", other, "init")
    failure = json.loads(cli("migrate", "--to", other, "--json", check=2).stdout)
    assert "already holds a different repository" in failure["error"] and failure["exit_code"] == 2


def test_a_failed_migration_still_reports_its_counts_in_json(cli, tmp_path: Path, repo_path: Path) -> None:
    total = make_repository(repo_path, tmp_path, snapshots=3)
    damaged = next((repo_path / "snapshots").iterdir())
    damaged.write_bytes(b"not what its name says")
    failure = json.loads(cli("migrate", "--to", tmp_path / "moved", "--json", check=14).stdout)
    assert failure["exit_code"] == 14 and "could not be copied intact" in failure["error"], failure
    assert failure["objects"] == total and failure["failed"] == 1, failure
    assert failure["copied"] == total - 2 and failure["skipped"] == 0, failure  # all but it and config


def test_the_destination_is_locked_exclusively_for_the_whole_migration(cli, tmp_path: Path, repo_path: Path) -> None:
    """Nothing kept a second migration out of a destination being filled, nor a backup out of a
    copy being brought up to date (a migration run again) and verified."""
    make_repository(repo_path, tmp_path)
    moved = tmp_path / "moved"  # not there yet: the lock is the first thing in it
    first = cli.popen("migrate", "--to", moved, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with paused_once_locked(first, moved):
        err = cli("migrate", "--to", moved, check=11).stderr.decode()
    assert first.wait(timeout=60) == 0, first.communicate()
    assert len(err.strip().splitlines()) == 1, err
    assert f"the destination {moved} is locked: " in err, err
    assert (f"an exclusive lock of {socket.gethostname()} pid {first.pid} (fsmount migrate --to {moved})"
            in err), err

    (tmp_path / "src" / "later.txt").write_text("to copy too\n")
    cli("backup", tmp_path / "src")
    again = cli.popen("migrate", "--to", moved, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with paused_once_locked(again, moved):
        err = cli("-r", moved, "backup", tmp_path / "src", check=11).stderr.decode()
        assert f"pid {again.pid} (fsmount migrate --to {moved})" in err, err
    assert again.wait(timeout=60) == 0, again.communicate()
    assert held_locks_in(moved) == []
    cli("-r", moved, "backup", tmp_path / "src")  # once the migration is over
