"""Repository locks (backend/lock.py) through the real CLI: who may work on a repository at once."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PASSPHRASE
from live_mount import force_unmount, is_mounted, live_mount, snapshot_mount

from backend.lock import LockInfo, list_locks
from backend.repository import Repository, open_master_key
from backend.stores import LocalStore


def locks_in(repo_path: Path) -> list[LockInfo | None]:
    store = LocalStore(repo_path)
    return [info for _, info in list_locks([store], open_master_key(store, PASSPHRASE.encode()))]


def plant_lock(repo_path: Path, *, host: str, pid: int, exclusive: bool, age_s: float = 0.0,
               command: str = "fsmount verify --repair") -> str:
    """A lock as another process (or host) would have left it."""
    store = LocalStore(repo_path)
    key = open_master_key(store, PASSPHRASE.encode())
    when = time.time_ns() - int(age_s * 1e9)
    name = f"locks/{os.urandom(32).hex()}"
    store.put(name, LockInfo(host, pid, command, exclusive, when, when).encode(key))
    return name


def small_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "f1").write_text("one\n")
    return folder


def test_migrate_delete_source_is_refused_while_the_folder_is_mounted(cli, tmp_path: Path, repo_path: Path) -> None:
    """The tester's sequence: the mount went on writing snapshots to the deleted source."""
    cli("init")
    folder = small_folder(tmp_path)
    moved = tmp_path / "moved"
    with live_mount(cli, folder, None, "--every", "2s"):
        err = cli("migrate", "--to", moved, "--delete-source", check=11).stderr.decode()
        assert "the repository is locked" in err and "a shared lock of" in err and " mount " in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert (repo_path / "config").exists() and not (moved / "config").exists()
        (folder / "aftermig").write_text("after\n")
        cli("snapshot", folder)
    assert locks_in(repo_path) == []  # the daemon removed its lock as it stopped
    cli("migrate", "--to", moved, "--delete-source")
    assert not (repo_path / "config").exists()
    listed = json.loads(cli("-r", moved, "ls", "latest", "--json").stdout)
    assert "aftermig" in json.dumps(listed)


def test_an_exclusive_command_waits_for_no_one_killed(cli, tmp_path: Path, repo_path: Path) -> None:
    """Shared locks coexist; an exclusive one is refused while they exist; kill -9 leaves a lock
    that the pid check clears at once."""
    cli("init")
    folder = small_folder(tmp_path)
    with snapshot_mount(cli, tmp_path / "snaps") as (mountpoint, pid):
        cli("backup", folder)  # shared beside shared
        err = cli("verify", "--repair", check=11).stderr.decode()
        assert f"pid {pid} (fsmount " in err and "mount-snapshots" in err, err
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        force_unmount(mountpoint)
        assert len(locks_in(repo_path)) == 1  # left behind
        cli("verify", "--repair")  # at once: its process is gone
        assert locks_in(repo_path) == []


def test_an_exclusive_lock_refuses_every_other_command_until_unlocked(cli, tmp_path: Path, repo_path: Path) -> None:
    cli("init")
    folder = small_folder(tmp_path)
    plant_lock(repo_path, host="other-host", pid=4242, exclusive=True)
    for command in (("snapshots",), ("backup", folder), ("ls", "latest"), ("verify",)):
        err = cli(*command, check=11).stderr.decode()
        assert re.search(r"an exclusive lock of other-host pid 4242 \(fsmount verify --repair\), taken \d+ s ago", err), err
    assert json.loads(cli("snapshots", "--json", check=11).stdout)["exit_code"] == 11
    out = cli("unlock").stdout.decode()  # not stale: kept
    assert "kept locks/" in out and "removed 0 locks, 1 still held" in out, out
    cli("--no-lock", "snapshots")  # read-only work may go without a lock
    assert b"--no-lock is for commands that only read" in cli("--no-lock", "verify", "--repair", check=2).stderr
    report = json.loads(cli("unlock", "--remove-all", "--json").stdout)
    assert len(report["removed"]) == 1 and report["kept"] == []
    cli("backup", folder)
    assert locks_in(repo_path) == []


def test_stale_locks_are_ignored_and_removed_by_the_next_taker(cli, tmp_path: Path, repo_path: Path) -> None:
    cli("init")
    folder = small_folder(tmp_path)
    plant_lock(repo_path, host="other-host", pid=4242, exclusive=True, age_s=31 * 60)  # not refreshed
    dead = subprocess.Popen(["true"])
    dead.wait()
    plant_lock(repo_path, host=os.uname().nodename, pid=dead.pid, exclusive=True)  # its process is gone
    cli("backup", folder)
    assert locks_in(repo_path) == []
    plant_lock(repo_path, host="other-host", pid=4242, exclusive=False, age_s=31 * 60)
    out = cli("unlock").stdout.decode()
    assert "stale: not refreshed for 31 min" in out and "removed 1 lock" in out, out


def test_locks_go_with_their_command_however_it_ends(cli, tmp_path: Path, repo_path: Path) -> None:
    cli("init")
    cli("snapshots")
    cli("restore", "no-such-name", "--target", tmp_path / "out", check=2)
    assert locks_in(repo_path) == []
    (tmp_path / "snaps").mkdir()
    daemon = cli.popen("mount-snapshots", "-f", tmp_path / "snaps", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not (is_mounted(tmp_path / "snaps") and locks_in(repo_path)):
            assert time.monotonic() < deadline and daemon.poll() is None, daemon.communicate()
            time.sleep(0.05)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=20)
    finally:
        if is_mounted(tmp_path / "snaps"):
            daemon.kill()
            force_unmount(tmp_path / "snaps")
    assert locks_in(repo_path) == []


def test_the_live_mount_refreshes_its_lock_and_takes_a_new_one_if_it_is_removed(cli, tmp_path: Path,
                                                                                repo_path: Path) -> None:
    cli("init")
    folder = small_folder(tmp_path)
    cli.env["FSMOUNT_LOCK_REFRESH_S"] = "0.2"
    with live_mount(cli, folder):
        [first] = locks_in(repo_path)
        assert first is not None and not first.exclusive
        time.sleep(0.6)
        [again] = locks_in(repo_path)
        assert again is not None and again.refreshed_ns > first.refreshed_ns and again.time_ns == first.time_ns
        cli("unlock", "--remove-all")
        deadline = time.monotonic() + 10
        while not locks_in(repo_path):  # lost, then taken again
            assert time.monotonic() < deadline, "the mount took no new lock"
            time.sleep(0.1)
        (folder / "later").write_text("later\n")
        cli("snapshot", folder)  # writes again
    assert "later" in json.dumps(json.loads(cli("ls", "latest", "--json").stdout))


def held_locks_in(folder: Path) -> list[str]:
    """The lock objects in a local repository folder (not a lock still being written)."""
    try:
        return [name for name in os.listdir(folder / "locks") if not name.startswith(".tmp-")]
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def paused_once_locked(proc: subprocess.Popen, *replicas: Path) -> Iterator[None]:
    """`proc` stopped (SIGSTOP) from the moment its lock is in every one of `replicas` until the
    block ends (a lock removed from some replicas only is still held)."""
    deadline = time.monotonic() + 30
    while not all(held_locks_in(replica) for replica in replicas):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def replicas_to_heal(cli, tmp_path: Path) -> tuple[Path, Path]:
    """Replica a holding a repository of many small packs (so healing takes many writes), replica b
    its config and keys only, as if its disk had lost the rest."""
    a, b = tmp_path / "replica-a", tmp_path / "replica-b"
    Repository.init(LocalStore(a), PASSPHRASE.encode(), pack_size=256 * 1024).close()
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "big.bin").write_bytes(os.urandom(32 * 1024 * 1024))
    cli("-r", a, "backup", folder)
    b.mkdir()
    shutil.copy(a / "config", b / "config")
    shutil.copytree(a / "keys", b / "keys")
    cli.env.pop("FSMOUNT_REPOSITORY")
    cli.env["FSMOUNT_LOCK_REFRESH_S"] = "0.05"
    return a, b


@pytest.mark.parametrize("command", [("replicas", "sync"), ("verify", "--repair")])
def test_healing_replicas_stops_writing_once_its_lock_is_removed(cli, tmp_path: Path, command) -> None:
    """`replicas sync` and the replica phase of `verify --repair` went on copying after
    `fsmount unlock --remove-all`: the lock no longer kept out a migration deleting what they brought back."""
    a, b = replicas_to_heal(cli, tmp_path)
    both = ("-r", a, "-r", b)
    proc = cli.popen(*both, *command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with paused_once_locked(proc, a, b):
        cli(*both, "unlock", "--remove-all")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 11, (out, err)
    lines = err.decode().strip().splitlines()
    assert lines[-1].startswith("fsmount: this process lost its repository lock (it was removed"), err
    assert "so it stopped writing" in lines[-1], err
    packs = [p for p in (a / "data").rglob("*") if p.is_file()]
    healed = [p for p in packs if (b / p.relative_to(a)).exists()]
    assert len(healed) < len(packs), (len(healed), len(packs))
    assert held_locks_in(a) == held_locks_in(b) == []


def test_a_mount_opened_without_its_store_takes_its_lock_once_the_store_is_back(
        cli, tmp_path: Path, repo_path: Path) -> None:
    """It held none for as long as it ran: `migrate --delete-source` moved the repository away
    under a mount that went on uploading to it."""
    cli("init")
    folder = small_folder(tmp_path)
    away = tmp_path / "disk-not-mounted"
    cli("backup", folder)  # the copies a mount without the store opens from are kept now
    repo_path.rename(away)
    try:
        with live_mount(cli, folder):
            (folder / "during").write_text("written with the disk away\n")
            assert json.loads(cli("snapshot", folder, "--json").stdout)["in_backlog"]
            away.rename(repo_path)
            deadline = time.monotonic() + 30
            while json.loads(cli("status", folder, "--json").stdout)["backlog"]["objects"]:
                assert time.monotonic() < deadline, "the backlog was never uploaded"
                time.sleep(0.2)
            held = locks_in(repo_path)
            assert len(held) == 1 and held[0] is not None and not held[0].exclusive, held
            assert " mount " in held[0].command, held[0]
            err = cli("migrate", "--to", tmp_path / "moved", "--delete-source", check=11).stderr.decode()
            assert "the repository is locked" in err and " mount " in err, err
    finally:
        if away.exists():
            away.rename(repo_path)
    assert locks_in(repo_path) == []  # released as the mount stopped
