"""Interruptions, a full repository disk, and concurrent writers leave a valid repository."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PASSPHRASE
from treecompare import differences

from backend import blob_writer
from backend.pack import DATA_BLOB
from backend.repository import Repository
from backend.stores.local import LocalStore


def random_tree(root: Path, files: int, size: int) -> Path:
    root.mkdir(parents=True)
    for i in range(files):
        (root / f"f{i:04d}.bin").write_bytes(os.urandom(size))
    return root


def test_killed_backup_leaves_a_valid_repository(cli, tmp_path: Path, repo_path: Path) -> None:
    # 120 MiB, ~8 packs: killed after the first two, far from the end even on a fast machine
    source = random_tree(tmp_path / "src", files=30, size=4 * 1024 * 1024)
    cli("init")
    proc = cli.popen("backup", source, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list((repo_path / "data").rglob("*")) or len(list((repo_path / "data").rglob("*"))) < 4:
        assert proc.poll() is None, "backup finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert json.loads(cli("snapshots", "--json").stdout) == []
    cli("verify")
    cli("backup", source)
    cli("verify", "--read-data")
    cli("restore", "latest", "--target", tmp_path / "restored")
    assert differences(source, tmp_path / "restored") == []


def packs(repo_path: Path) -> set[str]:
    return {p.name for p in (repo_path / "data").glob("*/*") if re.fullmatch(r"[0-9a-f]{64}", p.name)}


def test_a_backup_cut_short_by_ctrl_c_leaves_its_packs_for_the_next(cli, tmp_path: Path, repo_path: Path) -> None:
    # Interrupted once a few of its ~8 packs are up: those are indexed on the way out, so the next
    # backup stores only what the first did not (it used to store all 120 MiB again).
    source = random_tree(tmp_path / "src", files=30, size=4 * 1024 * 1024)
    cli("init")
    proc = cli.popen("backup", source, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(packs(repo_path)) < 3:
        assert proc.poll() is None, "backup finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert json.loads(cli("snapshots", "--json").stdout) == []
    first = packs(repo_path)

    stats = json.loads(cli("backup", "--json", source).stdout)["stats"]
    assert stats["bytes_added"] <= stats["size"] - (len(first) - 1) * 16 * 1024 * 1024, (len(first), stats)
    cli("verify", "--read-data")
    cli("restore", "latest", "--target", tmp_path / "restored")
    assert differences(source, tmp_path / "restored") == []


@pytest.mark.parametrize("interval_s", [0.0, 300.0])
def test_packs_are_indexed_within_the_interval_while_a_run_goes_on(tmp_path: Path, monkeypatch,
                                                                   interval_s: float) -> None:
    # What a kill -9 finds: packs up longer than INDEX_INTERVAL_S are described by an index object
    # already, before the run's flush (which writes the rest).
    monkeypatch.setattr(blob_writer, "INDEX_INTERVAL_S", interval_s)
    store = LocalStore(tmp_path / "repo")
    with Repository.init(store, PASSPHRASE.encode(), pack_size=1024 * 1024, cache_dir=str(tmp_path / "cache")) as repo:
        for _ in range(4):
            repo.save_blob(DATA_BLOB, os.urandom(600 * 1024))
        deadline = time.monotonic() + 30
        while repo.writer.statistics.packs_uploaded < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)  # the index object is written by the upload thread, after the pack
        indexed = list(store.list("index/"))
        assert bool(indexed) == (interval_s == 0.0), indexed
        repo.flush()
        assert list(store.list("index/"))


def test_two_hosts_back_up_into_one_repository_at_once(cli, tmp_path: Path) -> None:
    cli("init")
    shared = os.urandom(1024 * 1024)
    sources = []
    for host in ("alpha", "beta"):
        src = random_tree(tmp_path / host, files=20, size=512 * 1024)
        (src / "shared.bin").write_bytes(shared)
        sources.append(src)

    procs = [cli.popen("backup", src, "--host", src.name, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for src in sources]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()

    snapshots = json.loads(cli("snapshots", "--json").stdout)
    assert sorted(s["host"] for s in snapshots) == ["alpha", "beta"]
    cli("verify", "--read-data")
    for src in sources:
        cli("restore", "latest", "--target", tmp_path / f"restored-{src.name}", check=0)
    for snap in snapshots:
        target = tmp_path / f"by-id-{snap['host']}"
        cli("restore", snap["id"], "--target", target)
        assert differences(tmp_path / snap["host"], target) == []


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 3 MiB tmpfs standing in for a repository disk that fills up."""
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mountpoint], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", mountpoint], check=False)


def test_full_repository_disk_fails_cleanly_and_recovers(cli, tmp_path: Path, small_disk: Path) -> None:
    cli.env["FSMOUNT_REPOSITORY"] = str(small_disk / "repo")
    source = random_tree(tmp_path / "src", files=4, size=2 * 1024 * 1024)
    cli("init")

    proc = cli("backup", source, check=15)

    assert "no space left" in proc.stderr.decode()
    assert proc.stderr.decode().count("\n") == 1
    assert json.loads(cli("snapshots", "--json").stdout) == []  # nothing recorded that is not there
    cli("verify")

    subprocess.run(["mount", "-o", "remount,size=64m", small_disk], check=True)
    cli("backup", source)
    cli("verify", "--read-data")
    cli("restore", "latest", "--target", tmp_path / "restored")
    assert differences(source, tmp_path / "restored") == []
