"""What replicas tell a script: a run that left one behind (--degraded), and replicas that are not
copies of one repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
from live_mount import live_mount


@pytest.fixture
def replicas(cli, tmp_path: Path) -> tuple[str, ...]:
    cli.env.pop("FSMOUNT_REPOSITORY")
    return ("-r", str(tmp_path / "a"), "-r", str(tmp_path / "b"))


def break_writes(replica: Path, folder: str) -> None:
    """Every write of an object under `folder/` to this replica fails from now on."""
    shutil.rmtree(replica / folder, ignore_errors=True)
    (replica / folder).write_text("not a directory")


def test_a_degraded_backup_that_left_a_replica_behind_says_so(cli, tmp_path: Path, replicas) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "big.bin").write_bytes(os.urandom(300_000))
    cli(*replicas, "init")
    break_writes(tmp_path / "b", "data")

    proc = cli(*replicas, "--degraded", "--json", "backup", source, check=3)  # it exited 0, as a clean one
    report = json.loads(proc.stdout)
    [missed] = report["missed_by_replicas"]
    assert missed["replica"] == str(tmp_path / "b") and missed["objects"] >= 1
    assert any("replicas sync" in warning and str(tmp_path / "b") in warning for warning in report["warnings"])
    assert f"replica {tmp_path / 'b'} missed" in proc.stderr.decode()

    (tmp_path / "b" / "data").unlink()
    states = json.loads(cli(*replicas, "replicas", "--json", check=14).stdout)  # its document, and the error
    assert states["exit_code"] == 14 and "replicas sync" in states["error"]
    cli(*replicas, "replicas", "sync")
    (source / "new.txt").write_text("new\n")
    report = json.loads(cli(*replicas, "--degraded", "--json", "backup", source).stdout)  # nothing missed: 0
    assert "missed_by_replicas" not in report and report["warnings"] == []


def test_a_degraded_live_mount_shows_in_its_status_what_a_replica_missed(cli, tmp_path: Path, replicas) -> None:
    """The daemon was started without --degraded, so one failing replica sent every snapshot to the
    backlog; and in the foreground, what the replica missed was only in the daemon's log."""
    source = tmp_path / "src"
    source.mkdir()
    cli(*replicas, "init")
    with live_mount(cli, source, options=(*replicas, "--degraded")) as mnt:
        assert json.loads(cli("status", mnt, "--json").stdout)["missed_by_replicas"] == []
        break_writes(tmp_path / "b", "data")
        (mnt / "big.bin").write_bytes(os.urandom(300_000))
        assert not json.loads(cli("snapshot", mnt, "--json").stdout)["in_backlog"]  # replica a took it
        [missed] = json.loads(cli("status", mnt, "--json").stdout)["missed_by_replicas"]
        assert missed["replica"] == str(tmp_path / "b") and missed["objects"] >= 1
        listed = cli("status", mnt).stdout.decode()
        assert f"{tmp_path / 'b'} missed {missed['objects']} objects" in listed and "replicas sync" in listed
        # umount says it too, and exits 3 as the --degraded run that left the replica behind
        unmounted = cli("umount", mnt, "--json", check=3)
        [line] = unmounted.stderr.decode().splitlines()
        assert f"replica {tmp_path / 'b'} missed" in line and "replicas sync" in line, line
        [said] = json.loads(unmounted.stdout)["missed_by_replicas"]
        assert said["replica"] == str(tmp_path / "b") and said["objects"] >= missed["objects"]
    (tmp_path / "b" / "data").unlink()
    states = json.loads(cli(*replicas, "replicas", "--json", check=14).stdout)  # recorded for the sync
    assert "replicas sync" in states["error"]
    cli(*replicas, "replicas", "sync")


def test_what_a_degraded_live_mount_left_out_of_a_replica_survives_kill_9_of_its_daemon(
        cli, tmp_path: Path, replicas) -> None:
    """It was recorded only when the daemon exited, so after a kill -9 no command knew that the
    replica lacked anything."""
    source = tmp_path / "src"
    source.mkdir()
    cli(*replicas, "init")
    with live_mount(cli, source, options=(*replicas, "--degraded")) as mnt:
        break_writes(tmp_path / "b", "data")
        (mnt / "big.bin").write_bytes(os.urandom(300_000))
        cli("snapshot", mnt)
        [missed] = json.loads(cli("status", mnt, "--json").stdout)["missed_by_replicas"]
        os.kill(json.loads(cli("status", mnt, "--json").stdout)["pid"], signal.SIGKILL)
        cli("umount", mnt, check=3)  # the dead mount cleared
    (tmp_path / "b" / "data").unlink()
    states = json.loads(cli(*replicas, "replicas", "--json", check=14).stdout)
    assert states["recorded_degraded_writes"] == missed["objects"]
    warned = cli(*replicas, "snapshots").stderr.decode()
    assert f"{missed['objects']} objects" in warned and "replicas sync" in warned, warned
    cli(*replicas, "replicas", "sync")


def test_every_command_that_left_a_replica_behind_exits_3(cli, tmp_path: Path, replicas) -> None:
    """--degraded is a global option: the exit and the JSON field come from the CLI's edge, here for init."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keys").write_text("not a directory")
    report = json.loads(cli(*replicas, "--degraded", "init", "--json", check=3).stdout)
    # its key, and config after it: the replica is taken as down once a write failed
    assert report["missed_by_replicas"] == [{"replica": str(tmp_path / "b"), "objects": 2}]
    assert report["id"]


def test_replicas_of_different_repositories_are_named_not_counted(cli, tmp_path: Path, replicas) -> None:
    cli("-r", tmp_path / "a", "init")
    cli("-r", tmp_path / "b", "init")
    sync = cli(*replicas, "replicas", "sync", check=2)  # the exit `replicas` must give too
    proc = cli(*replicas, "replicas", check=sync.returncode)  # it said "N missing" and exit 14
    [line] = proc.stderr.decode().splitlines()
    assert "different repositories" in line and "missing" not in proc.stdout.decode()
    report = json.loads(cli(*replicas, "replicas", "--json", check=2).stdout)
    held = [replica["repository"] for replica in report["replicas"]]
    assert len(set(held)) == 2 and all(f"holds {repository[:8]}" in line for repository in held)
    assert report["exit_code"] == 2 and report["error"] == line.removeprefix("fsmount: ")


def fsynced_paths(trace: Path) -> set[str]:
    """The files fsync'd, from `strace -f -y -e trace=fsync` output (-y names each fd's file)."""
    return set(re.findall(r"fsync\(\d+<([^>]*)>\)", trace.read_text()))


def test_what_a_degraded_run_left_out_of_a_replica_is_fsynced_before_it_exits(cli, tmp_path: Path,
                                                                            replicas) -> None:
    """Only appended: a crash after `--degraded init` or `backup` could lose the record, and with it
    every later command's word that a replica needs `replicas sync`."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keys").write_text("not a directory")
    trace = tmp_path / "strace.log"
    cli(*replicas, "--degraded", "init", check=3,
        prefix=("strace", "-f", "-qq", "-y", "-o", str(trace), "-e", "trace=fsync"))
    recorded = [path for path in fsynced_paths(trace) if "/degraded/" in path and path.endswith(".jsonl")]
    assert recorded, "the record of degraded writes was not fsync'd"


def test_an_object_recorded_twice_is_kept_once(tmp_path: Path) -> None:
    from backend.replicas import DegradedLog

    record = DegradedLog(str(tmp_path / "degraded.jsonl"))
    missed = [("s3:b/repo", "data/ab/" + "ab" * 32), ("s3:b/repo", "config")]
    record.record(missed)
    size = os.path.getsize(record.path)
    for _ in range(3):
        record.record(missed)
        DegradedLog(record.path).record(missed[::-1])  # another command, recording the same
    assert os.path.getsize(record.path) == size and record.entries() == missed


def test_a_record_torn_by_a_crash_is_read_and_appended_to(tmp_path: Path) -> None:
    from backend.replicas import DegradedLog

    path = tmp_path / "degraded.jsonl"
    path.write_text('{"replica": "a", "key": "config"}\n{"replica": "a", "ke')
    record = DegradedLog(str(path))
    assert record.entries() == [("a", "config")]  # with a warning: it is no longer one
    record.record([("a", "keys/" + "cd" * 32)])
    assert record.entries() == [("a", "config"), ("a", "keys/" + "cd" * 32)]
