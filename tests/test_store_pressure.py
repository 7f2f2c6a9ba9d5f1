"""A live mount over S3 while the store misbehaves: writes never fail, every snapshot lands.

The tests run the real daemon against a real SeaweedFS. In the first, every request goes through
a proxy that answers 20% of them with `503 SlowDown` while a writer keeps appending checksummed
records and snapshots are taken every few hundred milliseconds: each snapshot must be stored, hold
a prefix of the writer's history, and the repository must verify. In the second, the server is
stopped for a minute: snapshots taken meanwhile complete on local disk (the backlog), one that
does not fit in the backlog waits with its instant, status says why, and once the server is back
all of them reach the store, each showing the folder as it was when it was taken. The later ones
time what an outage costs the user: a named snapshot waits out one retry budget, not two, and with
the server frozen (SIGSTOP) `ls .snapshots` answers at once from what the mount knows, then lists the
store again, with another client's snapshot, once it answers.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flaky_proxy import FlakyProxy
from live_mount import live_mount
from test_point_in_time import Writer, check_prefix
from treecompare import differences

pytest_plugins = ["s3_fixtures"]

pytestmark = pytest.mark.s3

OUTAGE_S = 60.0


def use_s3(cli, server, endpoint: str, bucket: str, *, retry_s: float = 2.0) -> None:
    key_id, secret = server.credentials
    cli.env.update(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret, AWS_DEFAULT_REGION="us-east-1",
                   FSMOUNT_REPOSITORY=f"s3:{endpoint}/{bucket}/repo", FSMOUNT_STORE_RETRY_S=str(retry_s))


def folder_and_mountpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A folder to mount, and a folder to mount it at."""
    source, mountpoint = tmp_path / "work", tmp_path / "mnt"
    source.mkdir()
    mountpoint.mkdir()
    return source, mountpoint


def wait_for_status(cli, mnt: Path, condition, timeout_s: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status = json.loads(cli("status", mnt, "--json").stdout)
        if condition(status):
            return status
        assert time.monotonic() < deadline, f"status never got there: {status}"
        time.sleep(0.3)


def test_snapshots_land_and_verify_while_a_fifth_of_requests_fail(cli, s3_server, tmp_path: Path) -> None:
    with FlakyProxy(s3_server.endpoint, 0.2, seed=5) as proxy:
        use_s3(cli, s3_server, proxy.endpoint, "flaky")
        cli("init")
        source = tmp_path / "busy"
        source.mkdir()
        with live_mount(cli, source) as mnt:
            writer = Writer(mnt)
            writer.start()
            taken = []
            try:
                while len(taken) < 6 and writer.is_alive():
                    time.sleep(0.3)
                    taken.append(json.loads(cli("snapshot", mnt, "--json").stdout)["id"])
            finally:
                writer.stop.set()
                writer.join()
            assert writer.error is None, writer.error  # no write failed
            assert wait_for_status(cli, mnt, lambda s: not s["backlog"]["objects"])["last_error"] is None
        assert proxy.failed > 0.1 * (proxy.failed + proxy.forwarded)
    use_s3(cli, s3_server, s3_server.endpoint, "flaky")  # checked without the proxy: what the store holds
    stored = {s["id"] for s in json.loads(cli("snapshots", "--json").stdout)}
    assert set(taken) <= stored
    held = []
    for snapshot_id in taken:
        restored = tmp_path / f"restored-{snapshot_id[:8]}"
        cli("restore", snapshot_id, "--target", restored)
        held.append(check_prefix(restored))
    assert held == sorted(held) and held[-1] > held[0] > 0
    cli("verify", "--read-data")


def test_a_minute_without_the_store_loses_no_snapshot(cli, own_s3_server, tmp_path: Path) -> None:
    server = own_s3_server
    use_s3(cli, server, server.endpoint, "outage")
    cli("init")
    source = tmp_path / "work"
    source.mkdir()
    (source / "kept.txt").write_text("there all along\n")
    states: dict[str, Path] = {}  # snapshot id -> a copy of the folder at its instant

    def snapshot_and_copy(mnt: Path) -> dict:
        reply = json.loads(cli("snapshot", mnt, "--json").stdout)
        states[reply["id"]] = tmp_path / f"state-{len(states)}"
        shutil.copytree(mnt, states[reply["id"]], symlinks=True)
        return reply

    with live_mount(cli, source, None, "--backlog-limit", "2M") as mnt:
        assert not snapshot_and_copy(mnt)["in_backlog"]
        server.pause()
        down_at = time.monotonic()

        # While the store is down, snapshots complete on local disk.
        (mnt / "notes.txt").write_text("written during the outage\n")
        assert snapshot_and_copy(mnt)["in_backlog"]
        os.unlink(mnt / "kept.txt")
        (mnt / "small.bin").write_bytes(os.urandom(200_000))
        assert snapshot_and_copy(mnt)["in_backlog"]
        status = wait_for_status(cli, mnt, lambda s: s["backlog"]["snapshots"] == 2)
        assert status["backlog"]["last_error"]

        # One that does not fit in the 2 MiB backlog waits for the store, keeping its instant.
        (mnt / "large.bin").write_bytes(os.urandom(3_000_000))
        before = tmp_path / "state-waiting"
        shutil.copytree(mnt, before, symlinks=True)
        waiting = cli.popen("snapshot", mnt, "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        status = wait_for_status(cli, mnt, lambda s: s["pending_since"] is not None)
        assert "backlog is full" in status["last_error"]
        listed = cli("status", mnt).stdout.decode()
        assert "behind" in listed and "backlog is full" in listed and "2 snapshots" in listed
        started = time.monotonic()  # the folder works at local speed all the while
        (mnt / "large.bin").write_bytes(b"overwritten after the instant\n")
        (mnt / "notes.txt").write_text("written after the waiting snapshot\n")
        assert time.monotonic() - started < 2
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
        assert waiting.poll() is None
        server.resume()

        out, err = waiting.communicate(timeout=120)
        assert waiting.returncode == 0, err.decode(errors="replace")
        states[json.loads(out)["id"]] = before
        status = wait_for_status(cli, mnt, lambda s: not s["backlog"]["objects"] and s["pending_since"] is None)
        assert status["last_error"] is None
    stored = {s["id"] for s in json.loads(cli("snapshots", "--json").stdout)}
    assert set(states) <= stored
    for snapshot_id, state in states.items():
        restored = tmp_path / f"restored-{snapshot_id[:8]}"
        cli("restore", snapshot_id, "--target", restored)
        assert differences(state, restored, file_mtime_slack_ns=2 * 10**9) == [], snapshot_id[:8]
    cli("verify", "--read-data")


def test_the_first_named_snapshot_of_an_outage_waits_out_one_retry_budget_not_two(
        cli, own_s3_server, tmp_path: Path) -> None:
    """With the backlog empty, its name was checked on the store's listing (one retry budget),
    then its first write waited out another before the snapshot went to local disk."""
    server = own_s3_server
    budget_s = 4.0
    use_s3(cli, server, server.endpoint, "first-named", retry_s=budget_s)
    cli("init")
    source = tmp_path / "work"
    source.mkdir()
    (source / "kept.txt").write_text("there all along\n")
    with live_mount(cli, source) as mnt:
        assert not json.loads(cli("snapshot", mnt, "--json").stdout)["in_backlog"]
        server.pause()
        try:
            (mnt / "notes.txt").write_text("written during the outage\n")
            started = time.monotonic()
            reply = json.loads(cli("snapshot", mnt, "--name", "during", "--json").stdout)
            took_s = time.monotonic() - started
        finally:
            server.resume()
        assert reply["in_backlog"] and reply["label"] == "during"
        assert took_s < 1.5 * budget_s, f"{took_s:.1f} s for a retry budget of {budget_s:.0f} s"
        wait_for_status(cli, mnt, lambda s: not s["backlog"]["objects"])
    assert "during" in {s["name"] for s in json.loads(cli("snapshots", "--json").stdout)}


@contextlib.contextmanager
def frozen(server) -> Iterator[None]:
    """The server stopped (SIGSTOP), as a hung host: requests reach it and wait for an answer."""
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def timed_listing(folder: Path) -> tuple[set[str], float]:
    started = time.monotonic()
    names = set(os.listdir(folder))
    return names, time.monotonic() - started


def test_ls_snapshots_answers_at_once_while_the_store_is_down_and_asks_it_again_once_back(
        cli, own_s3_server, tmp_path: Path) -> None:
    """Every `ls .snapshots` more than refresh_s after the last one listed the store again, and
    waited out a whole retry budget before it answered from what it knew."""
    server = own_s3_server
    budget_s = 8.0
    use_s3(cli, server, server.endpoint, "listing", retry_s=budget_s)
    cli("init")
    source, mountpoint = folder_and_mountpoint(tmp_path)
    with live_mount(cli, source, mountpoint) as mnt:
        cli("snapshot", mnt, "--name", "before")
        snapshots = mnt / ".snapshots"
        with frozen(server):
            (mnt / "notes.txt").write_text("written during the outage\n")
            assert json.loads(cli("snapshot", mnt, "--name", "during", "--json").stdout)["in_backlog"]
            listing_s = []
            for _ in range(3):
                time.sleep(2.5)  # past refresh_s: the root is due to be listed again
                names, took_s = timed_listing(snapshots)
                assert {"before", "during"} <= names
                listing_s.append(took_s)
            assert (snapshots / "during" / "notes.txt").read_text() == "written during the outage\n"
            shown = cli("status", mnt).stdout.decode()
        assert max(listing_s) < budget_s / 10, f"ls .snapshots took {listing_s} s, retry budget {budget_s:.0f} s"
        assert "not answering since" in shown and "1 snapshot," in shown, shown

        cli("backup", source, "--name", "elsewhere")  # another client, once the store is back
        deadline = time.monotonic() + 3 * budget_s
        while "elsewhere" not in (names := timed_listing(snapshots)[0]):
            assert time.monotonic() < deadline, f"the other client's snapshot never showed: {names}"
            time.sleep(0.5)
        status = wait_for_status(cli, mnt, lambda s: not s["backlog"]["objects"])
        assert status["backlog"]["store_failing_since"] is None


def test_a_folder_mounts_and_snapshots_with_the_store_unreachable_and_uploads_once_it_is_back(
        cli, own_s3_server, tmp_path: Path) -> None:
    """Opening the repository read config and keys/ from the store and listed its snapshots: on a
    plane, `fsmount mount` failed."""
    server = own_s3_server
    use_s3(cli, server, server.endpoint, "plane")
    cli("init")
    source, mountpoint = folder_and_mountpoint(tmp_path)
    (source / "kept.txt").write_text("there all along\n")
    with live_mount(cli, source, mountpoint) as mnt:
        cli("snapshot", mnt, "--name", "before")
    with frozen(server):
        err = cli("snapshots", check=15).stderr.decode()  # every other command still fails
        assert "error" in err.lower() or "s3:" in err, err
        with live_mount(cli, source, mountpoint) as mnt:
            (mnt / "notes.txt").write_text("written on the plane\n")
            assert json.loads(cli("snapshot", mnt, "--name", "plane", "--json").stdout)["in_backlog"]
            assert {"before", "plane"} <= set(os.listdir(mnt / ".snapshots"))
            assert (mnt / ".snapshots" / "plane" / "notes.txt").read_text() == "written on the plane\n"
            shown = cli("status", mnt).stdout.decode()
            assert "not answering since" in shown, shown
            os.kill(server.process.pid, signal.SIGCONT)  # the store is back (frozen() sends it again)
            (source / "elsewhere.txt").write_text("backed up by another client\n")
            cli("backup", source, "--name", "elsewhere")
            deadline = time.monotonic() + 30
            while "elsewhere" not in (names := set(os.listdir(mnt / ".snapshots"))):
                assert time.monotonic() < deadline, f"the other client's snapshot never showed: {names}"
                time.sleep(0.5)
            assert (mnt / ".snapshots" / "elsewhere" / "elsewhere.txt").read_text() == "backed up by another client\n"
            status = wait_for_status(cli, mnt, lambda s: not s["backlog"]["objects"])
            assert status["backlog"]["store_failing_since"] is None
    assert {"before", "plane", "elsewhere"} <= {s["name"] for s in json.loads(cli("snapshots", "--json").stdout)}
    restored = tmp_path / "restored"
    cli("restore", "plane", "--target", restored)
    assert (restored / "notes.txt").read_text() == "written on the plane\n"


def test_a_mount_without_the_store_refuses_a_wrong_passphrase(cli, own_s3_server, tmp_path: Path) -> None:
    server = own_s3_server
    use_s3(cli, server, server.endpoint, "plane-pass")
    cli("init")
    source = tmp_path / "work"
    source.mkdir()
    with live_mount(cli, source):
        pass
    cli.env["FSMOUNT_PASSWORD"] = "not the passphrase"
    with frozen(server):
        err = cli("mount", source, check=12).stderr.decode()
    assert "wrong passphrase" in err, err


def test_reading_a_snapshot_s_data_only_in_the_store_fails_at_once_while_it_is_down(
        cli, own_s3_server, tmp_path: Path) -> None:
    """Every such read waited out a whole retry budget before it failed with EIO."""
    server = own_s3_server
    budget_s = 8.0
    use_s3(cli, server, server.endpoint, "eio", retry_s=budget_s)
    cli("init")
    source, mountpoint = folder_and_mountpoint(tmp_path)
    (source / "stored.bin").write_bytes(os.urandom(300_000))
    with live_mount(cli, source, mountpoint) as mnt:
        cli("snapshot", mnt, "--name", "before")
        with frozen(server):
            (mnt / "notes.txt").write_text("written during the outage\n")
            assert json.loads(cli("snapshot", mnt, "--name", "during", "--json").stdout)["in_backlog"]
            took_s = []
            for _ in range(2):
                started = time.monotonic()
                with pytest.raises(OSError) as failed:
                    (mnt / ".snapshots" / "before" / "stored.bin").read_bytes()
                took_s.append(time.monotonic() - started)
                assert failed.value.errno == errno.EIO
            assert (mnt / ".snapshots" / "during" / "notes.txt").read_text() == "written during the outage\n"
        assert max(took_s) < budget_s / 4, f"reads took {took_s} s, retry budget {budget_s:.0f} s"
        wait_for_status(cli, mnt, lambda s: s["backlog"]["store_failing_since"] is None)
        assert (mnt / ".snapshots" / "before" / "stored.bin").read_bytes() == (source / "stored.bin").read_bytes()


def test_a_mount_with_wrong_credentials_fails_at_start_instead_of_mounting_without_the_store(
        cli, own_s3_server, tmp_path: Path) -> None:
    """An access denied was taken for a store that does not answer: the mount started from the
    local copies and never uploaded anything."""
    server = own_s3_server
    use_s3(cli, server, server.endpoint, "denied")
    cli("init")
    source = tmp_path / "work"
    source.mkdir()
    with live_mount(cli, source):
        pass  # the copies a mount without the store would open from are kept now
    cli.env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    err = cli("mount", source, check=15).stderr.decode()
    assert "access denied" in err and len(err.strip().splitlines()) == 1, err
    assert "not-the-secret" not in err
