"""The live tree: ordinary work in a mounted folder, and snapshots that hold exactly that work."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import require_root
from live_mount import force_unmount, is_mounted, live_mount, sigterm_as_it_mounts
from treecompare import assert_listing_agrees_with_stat, differences

from fsmount.mountpoint import is_stale


@pytest.fixture
def source(tmp_path: Path, cli) -> Path:
    cli("init")
    root = tmp_path / "projects"
    (root / "src" / "pkg").mkdir(parents=True)
    for i in range(20):
        (root / "src" / "pkg" / f"mod{i}.py").write_text(f"print({i})\n" * 50)
    (root / "notes.md").write_text("# notes\n")
    return root


# With the writeback cache the kernel keeps the mtime of a written file to itself: the mount shows
# the time of write(2), the source (and so the snapshot) the time the data was written back to the
# daemon, milliseconds later. Everything else is compared exactly.
WRITEBACK_MTIME_SLACK_NS = 2 * 10**9


def same_tree(mounted: Path, restored: Path) -> list[str]:
    return differences(mounted, restored, file_mtime_slack_ns=WRITEBACK_MTIME_SLACK_NS)


def snapshots(cli) -> list[dict]:
    return json.loads(cli("snapshots", "--json").stdout)


def restore_latest(cli, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    cli("restore", "latest", "--target", target)
    return target


def test_work_through_the_mount_lands_in_the_snapshot(cli, source: Path, tmp_path: Path) -> None:
    with live_mount(cli, source) as mnt:
        assert (mnt / "notes.md").read_text() == "# notes\n"  # the folder keeps its path and files
        (mnt / "notes.md").write_text("# notes\nrevised\n")
        with open(mnt / "log.txt", "a") as f:
            f.write("line 1\n")
        (mnt / "docs").mkdir()
        (mnt / "docs" / "a.txt").write_bytes(os.urandom(300_000))
        os.rename(mnt / "src" / "pkg", mnt / "src" / "package")
        os.link(mnt / "docs" / "a.txt", mnt / "docs" / "a-link.txt")
        os.symlink("docs/a.txt", mnt / "shortcut")
        os.unlink(mnt / "src" / "package" / "mod3.py")
        os.chmod(mnt / "notes.md", 0o600)
        os.truncate(mnt / "docs" / "a.txt", 100_000)
        os.setxattr(mnt / "notes.md", b"user.tag", b"important")
        os.mkfifo(mnt / "pipe")
        os.utime(mnt / "docs", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
        cli("snapshot", mnt)
        assert same_tree(mnt, restore_latest(cli, tmp_path, "first")) == []

        os.rename(mnt / "docs", mnt / "documents")
        with open(mnt / "documents" / "a.txt", "r+b") as f:
            f.seek(50_000)
            f.write(b"patched")
        cli("snapshot", mnt, "--name", "second")
        assert same_tree(mnt, restore_latest(cli, tmp_path, "second")) == []
    assert snapshots(cli)[-1]["name"] == "second"  # nothing changed since: no final snapshot


def test_listings_agree_with_stat_as_the_files_change(cli, source: Path) -> None:
    with live_mount(cli, source) as mnt:
        folder = mnt / "many"
        folder.mkdir()
        for i in range(300):
            (folder / f"f{i}").write_bytes(b"x")
        os.link(folder / "f0", folder / "hard")
        os.symlink("f1", folder / "link")
        os.mkfifo(folder / "fifo")
        (folder / "sub").mkdir()
        for _ in range(2):  # the second time, the kernel holds every name: most are listed bare
            assert_listing_agrees_with_stat(folder)

        (folder / "f2").write_bytes(b"y" * 5000)
        os.rename(folder / "f3", folder / "moved")
        os.unlink(folder / "f4")
        os.chmod(folder / "f5", 0o600)
        os.truncate(folder / "hard", 10)
        assert_listing_agrees_with_stat(folder)
        names = set(os.listdir(folder))
        assert "moved" in names and not {"f3", "f4"} & names and len(names) == 300 + 4 - 1
        assert os.stat(folder / "f2").st_size == 5000 and stat.S_IMODE(os.stat(folder / "f5").st_mode) == 0o600
        assert os.stat(folder / "f0").st_size == 10 and os.stat(folder / "f0").st_ino == os.stat(folder / "hard").st_ino


def test_fallocate_reserves_punches_and_zeroes_as_in_a_plain_folder(cli, source: Path, tmp_path: Path) -> None:
    from fsmount.live_tree import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocate

    MiB = 1 << 20
    content = os.urandom(MiB)

    def exercise(folder: Path) -> tuple[bytes, int, bool]:
        path = folder / "space.bin"
        path.write_bytes(content)
        fd = os.open(path, os.O_RDWR)
        try:
            fallocate(fd, 0, MiB, MiB)  # grows the file to 2 MiB of which the second reads zeros
            fallocate(fd, FALLOC_FL_KEEP_SIZE, 2 * MiB, MiB)  # space past the end, the size as it was
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 128 * 1024, 256 * 1024)
            fallocate(fd, FALLOC_FL_ZERO_RANGE, 600 * 1024, 64 * 1024)
        finally:
            os.close(fd)
        st = os.stat(path)
        return path.read_bytes(), st.st_size, st.st_blocks * 512 > st.st_size  # reserved past the end

    plain = tmp_path / "plain"
    plain.mkdir()
    with live_mount(cli, source) as mnt:
        assert exercise(mnt) == exercise(plain)
        cli("snapshot", mnt)
    restored = restore_latest(cli, tmp_path, "restored")
    assert (restored / "space.bin").read_bytes() == (plain / "space.bin").read_bytes()


def test_small_write_into_a_huge_file_adds_about_one_block(cli, source: Path) -> None:
    big = source / "disk.img"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # 1 GiB, sparse: cheap to back up, the point is the tracking
        f.seek(512 << 20)
        f.write(os.urandom(8 << 20))
    with live_mount(cli, source) as mnt:
        cli("snapshot", mnt)  # the mount's first snapshot scans the whole folder
        with open(mnt / "disk.img", "r+b") as f:
            f.seek((512 << 20) + 5_000_000)
            f.write(os.urandom(4096))
        cli("snapshot", mnt)
    change = snapshots(cli)[-1]["stats"]  # no final snapshot at unmount: nothing changed since
    assert change["bytes_read"] == 128 * 1024
    assert 128 * 1024 <= change["bytes_added"] < 140 * 1024


def test_renaming_a_large_directory_adds_only_trees(cli, source: Path) -> None:
    for i in range(200):
        (source / "src" / "pkg" / f"data{i}.bin").write_bytes(os.urandom(20_000))
    with live_mount(cli, source) as mnt:
        cli("snapshot", mnt)
        os.rename(mnt / "src" / "pkg", mnt / "renamed")
        cli("snapshot", mnt)
    change = snapshots(cli)[-1]["stats"]
    assert change["bytes_read"] == 0
    assert change["blobs_added"] == 2 and change["bytes_added"] < 4096  # the root and src trees


def test_no_change_snapshot_costs_nothing(cli, source: Path) -> None:
    with live_mount(cli, source) as mnt:
        cli("snapshot", mnt)
        cli("snapshot", mnt)  # asked for: taken, though nothing changed
    quiet = snapshots(cli)[-1]
    assert quiet["stats"]["bytes_read"] == 0 and quiet["stats"]["bytes_added"] == 0
    assert quiet["stats"]["files"] == 21  # totals still describe the whole folder


def test_edits_while_unmounted_are_found_at_the_next_mount(cli, source: Path, tmp_path: Path) -> None:
    with live_mount(cli, source):
        said = json.loads(cli("umount", source, "--json").stdout)  # (--json printed plain text)
        assert said["kind"] == "live" and said["final_snapshot"] == snapshots(cli)[-1]["id"]
    (source / "notes.md").write_text("edited behind fsmount's back\n")
    (source / "added-offline.txt").write_text("new\n")
    with live_mount(cli, source) as mnt:
        cli("snapshot", mnt)
        assert same_tree(mnt, restore_latest(cli, tmp_path, "after")) == []


def test_a_folder_holding_the_repository_or_the_cache_is_not_mounted(cli, source: Path, tmp_path: Path) -> None:
    inside = source / ".backup"
    cli("-r", inside, "init")
    err = cli("-r", inside, "mount", source, check=2).stderr  # it would back itself up without end
    assert b"holds the repository" in err and not is_mounted(source)
    cli.env["XDG_CACHE_HOME"] = str(source / ".cache")  # as when mounting a home folder
    err = cli("mount", source, check=2).stderr  # its event loop would wait on itself
    assert b"holds fsmount's cache" in err and not is_mounted(source)


def test_mounting_from_inside_the_folder_says_to_cd_again(cli, source: Path) -> None:
    proc = cli("mount", source, cwd=source)  # the shell stays in the folder underneath
    try:
        assert b"run `cd .`" in proc.stderr
    finally:
        cli("umount", source)
    assert b"cd ." not in cli("mount", source, cwd=source.parent).stderr
    cli("umount", source)


def test_mount_at_a_separate_mountpoint(cli, source: Path, tmp_path: Path) -> None:
    mountpoint = tmp_path / "work"
    mountpoint.mkdir()
    (mountpoint / "mine.txt").write_text("not to be hidden")
    assert b"is not empty" in cli("mount", source, mountpoint, check=2).stderr
    assert not is_mounted(mountpoint)
    (mountpoint / "mine.txt").unlink()
    with live_mount(cli, source, mountpoint) as mnt:
        (mnt / "via-mountpoint.txt").write_text("hi")
    assert (source / "via-mountpoint.txt").read_text() == "hi"
    assert not is_mounted(mountpoint)
    listing = [e["path"] for e in json.loads(cli("ls", "latest", "--json").stdout)]
    assert "/via-mountpoint.txt" in listing


def test_snapshots_folder_serves_this_folders_snapshots_and_mkdir_takes_one(cli, source: Path,
                                                                            tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "unrelated.txt").write_text("not this folder")
    cli("backup", other)
    with live_mount(cli, source) as mnt:
        (mnt / "notes.md").write_text("before the refactor\n")
        os.mkdir(mnt / ".snapshots" / "before-refactor")  # takes the snapshot
        (mnt / "notes.md").write_text("after\n")
        (mnt / "new.txt").write_text("new")

        assert ".snapshots" not in os.listdir(mnt)  # hidden, reachable by path
        shown = sorted(os.listdir(mnt / ".snapshots"))
        assert shown == ["before-refactor", "latest"]  # the other folder's snapshot is not here
        frozen = mnt / ".snapshots" / "before-refactor"
        assert (frozen / "notes.md").read_text() == "before the refactor\n"
        assert not (frozen / "new.txt").exists()
        shutil.copy(frozen / "notes.md", mnt / "notes.md")  # restoring is a copy
        assert (mnt / "notes.md").read_text() == "before the refactor\n"

        cli("snapshot", mnt, "--name", "second")
        assert sorted(os.listdir(mnt / ".snapshots")) == ["before-refactor", "latest", "second"]
        assert os.readlink(mnt / ".snapshots" / "latest") == "second"
        with pytest.raises(FileExistsError):
            os.mkdir(mnt / ".snapshots" / "second")
        for attempt in (lambda: (frozen / "x").write_text("x"), lambda: os.rmdir(frozen),
                        lambda: os.rename(mnt / ".snapshots", mnt / "elsewhere")):
            with pytest.raises(OSError) as caught:
                attempt()
            assert caught.value.errno == errno.EROFS
    names = [s["name"] for s in snapshots(cli)]
    assert "before-refactor" in names and "second" in names
    listing = [e["path"] for e in json.loads(cli("ls", "latest", "--json").stdout)]
    assert not any(".snapshots" in path for path in listing)  # never itself backed up


def wait_for(condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_scheduled_and_final_snapshots_are_skipped_while_nothing_changes(cli, source: Path) -> None:
    with live_mount(cli, source, None, "--every", "0.2s") as mnt:
        status = lambda: json.loads(cli("status", mnt, "--json").stdout)
        wait_for(lambda: status()["snapshots_skipped"] >= 3, "scheduled snapshots not skipped")
        assert status()["snapshots_taken"] == 1  # the first: the folder had no snapshot
        plain = cli("status", mnt).stdout.decode()  # only --json said it
        assert re.search(r"\nskipped +\d+ scheduled snapshots \(nothing had changed\)\n", plain), plain
        os.chmod(mnt / "notes.md", 0o600)  # a change of metadata only is a change
        wait_for(lambda: status()["snapshots_taken"] == 2, "no scheduled snapshot after a chmod")
        said = json.loads(cli("umount", mnt, "--json").stdout)
    taken = snapshots(cli)
    assert len(taken) == 2  # nothing changed since the chmod's: no final snapshot either
    assert said["final_snapshot"] == taken[-1]["id"]  # the one that shows the folder as it was left
    assert said["final_unchanged"] is True
    with live_mount(cli, source) as mnt:
        last = taken[-1]["id"][:8]  # status still says which snapshot was last, and when
        assert re.search(rf"last +{last} at \d{{4}}-", cli("status", mnt).stdout.decode())
        cli("snapshot", mnt)  # asked for: taken, though nothing changed
    assert len(snapshots(cli)) == 3


def test_the_first_snapshot_of_a_mount_is_skipped_only_if_its_scan_finds_nothing(cli, source: Path,
                                                                                  tmp_path: Path) -> None:
    cli("backup", source)
    with live_mount(cli, source):
        pass
    assert len(snapshots(cli)) == 1  # the final snapshot's scan found nothing changed since the backup
    os.utime(source / "notes.md", ns=(1, 1))  # while unmounted, metadata only
    with live_mount(cli, source):
        pass
    assert len(snapshots(cli)) == 2 and differences(source, restore_latest(cli, tmp_path, "after")) == []


def test_a_snapshot_s_files_stay_out_of_the_live_folder_with_the_errors_of_a_read_only_file_system(
        cli, source: Path) -> None:
    with live_mount(cli, source) as mnt:
        cli("snapshot", mnt)
        frozen = mnt / ".snapshots" / "latest"
        for attempt, expected in ((lambda: os.link(frozen / "notes.md", mnt / "linked"), errno.EXDEV),
                                  (lambda: os.rename(frozen / "notes.md", mnt / "moved"), errno.EROFS)):
            with pytest.raises(OSError) as caught:
                attempt()
            assert caught.value.errno == expected  # a link as across file systems (it said ENOENT)
        with open(frozen / "notes.md", "rb") as f:
            os.fsync(f.fileno())  # nothing to write back
            for change in (lambda: os.fchmod(f.fileno(), 0o777), lambda: os.fchown(f.fileno(), 1, 1),
                           lambda: os.utime(f.fileno(), ns=(0, 0))):
                with pytest.raises(OSError) as caught:
                    change()
                assert caught.value.errno == errno.EROFS
        assert not (mnt / "linked").exists() and not (mnt / "moved").exists()
        (mnt / "notes.md").write_text("changed\n")
        cli("snapshot", mnt)
        assert not json.loads(cli("status", mnt, "--json").stdout)["last_full_scan"]  # no reason to rescan


def test_status_reports_pending_work(cli, source: Path) -> None:
    with live_mount(cli, source) as mnt:
        cli("snapshot", mnt)
        (mnt / "notes.md").write_text("pending\n")
        time.sleep(1.5)  # the changelog is flushed every second; status flushes too
        status = json.loads(cli("status", mnt, "--json").stdout)
        assert status["pending_files"] == 1 and status["last_snapshot"] == snapshots(cli)[-1]["id"]
        assert status["snapshots_taken"] == 1 and status["bytes_added"] > 0 and status["upload_rate_bytes_per_s"] > 0
        human = cli("status", mnt).stdout.decode()
        assert "pending      1 files" in human
        assert "by 1 snapshot of this mount" in human and "/s while they ran" in human


BUSY_READER = """
import os, sys, time
path, stop = sys.argv[1], time.monotonic() + float(sys.argv[2])
while time.monotonic() < stop:
    try:  # a request the kernel never answers from its caches, and the mount answers at once
        os.getxattr(path, "user.absent")
    except OSError:
        pass
"""


def test_mount_answers_its_commands_while_readers_keep_it_busy(cli, source: Path) -> None:
    # Four readers keep a request queued at every moment: the loop that serves them must still let
    # the control socket, and the snapshot it asks for, have their turn.
    with live_mount(cli, source) as mnt:
        readers = [subprocess.Popen([sys.executable, "-c", BUSY_READER, str(mnt / "notes.md"), "60"]) for _ in range(4)]
        try:
            time.sleep(1)
            started = time.monotonic()
            status = json.loads(cli("status", mnt, "--json").stdout)
            (mnt / "notes.md").write_text("busy\n")
            cli("snapshot", mnt, "--name", "while-busy")
            answered_s = time.monotonic() - started  # idle: under a second
            assert all(reader.poll() is None for reader in readers), "a reader failed while the mount was busy"
        finally:
            for reader in readers:
                reader.kill()
                reader.wait()
        assert "last_snapshot" in status and answered_s < 20
        assert (mnt / ".snapshots" / "while-busy" / "notes.md").read_text() == "busy\n"


def test_second_mount_of_the_same_source_is_refused(cli, source: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with live_mount(cli, source, elsewhere):
        proc = cli("mount", source, check=2)
        assert "already a mountpoint" in proc.stderr.decode() or "already mounted" in proc.stderr.decode()
        other = tmp_path / "other"
        other.mkdir()
        proc = cli("mount", source, other, check=2)
        assert f"{source} is already mounted by another fsmount" in proc.stderr.decode()


def test_a_mount_whose_path_has_a_newline_is_known_as_mounted(cli, tmp_path: Path) -> None:
    """mountinfo writes space, tab, newline and backslash as octal escapes: read back as they
    are, the mount over such a folder was not seen, and a second mount over it was not refused."""
    cli("init")
    source = tmp_path / "odd name\nwith\ttab\\"
    source.mkdir()
    (source / "f").write_text("x")
    with live_mount(cli, source) as mnt:
        proc = cli("mount", source, check=2)
        assert "already" in proc.stderr.decode()
        assert json.loads(cli("status", mnt, "--json").stdout)["pid"] > 0
        assert is_mounted(source)  # what the tests' own cleanup relies on, too
    assert not is_mounted(source) and not os.path.ismount(source)


@pytest.fixture
def public_dir():
    """A directory other users can reach (pytest's own temp root is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="fsmount-public-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_nobody(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", script],
                          capture_output=True, check=False)


def test_ownership_and_permissions_are_native(cli, source: Path, public_dir: Path) -> None:
    shared = public_dir / "shared"
    shutil.copytree(source, shared)
    shared.chmod(0o777)
    with live_mount(cli, shared) as mnt:
        made = as_nobody(f"umask 027 && echo hi > {mnt}/by-nobody && mkdir {mnt}/dir-by-nobody")
        assert made.returncode == 0, made.stderr
        st = os.stat(mnt / "by-nobody")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o640)
        assert stat.S_IMODE(os.stat(mnt / "dir-by-nobody").st_mode) == 0o750
        denied = as_nobody(f"echo no >> {mnt}/notes.md")
        assert denied.returncode != 0 and b"Permission denied" in denied.stderr


def test_sigterm_the_moment_the_mount_appears_unmounts_it(cli, source: Path) -> None:
    daemon = cli.popen("mount", "-f", source, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sigterm_as_it_mounts(daemon, source, timeout=30)
    assert (source / "notes.md").read_text() == "# notes\n"  # the folder itself again


def test_a_second_stop_while_unmounting_lets_the_final_snapshot_finish(cli, source: Path) -> None:
    out = cli("mount", source).stdout.decode()
    pid = int(re.search(r"daemon pid (\d+)", out).group(1))  # type: ignore[union-attr]
    (source / "large.bin").write_bytes(os.urandom(64 * 1024 * 1024))  # a final snapshot that takes a while
    before = len(snapshots(cli))
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while is_mounted(source):
        assert time.monotonic() < deadline, "never unmounted"
    os.kill(pid, signal.SIGTERM)  # impatient: again, while the final snapshot is taken
    umount = cli("umount", source, check=None)  # and from the command line: it waits with the first
    assert (umount.returncode, b"final snapshot" in umount.stdout) == (0, True) or (
        umount.returncode != 0 and b"not mounted" in umount.stderr)  # or the daemon was gone already
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, "the daemon never exited"
        time.sleep(0.05)
    taken = snapshots(cli)
    assert len(taken) == before + 1, "the final snapshot was not saved"
    restored = restore_latest(cli, source.parent, "restored")
    assert (restored / "large.bin").stat().st_size == 64 * 1024 * 1024


def test_mount_again_after_the_daemon_was_killed(cli, source: Path, tmp_path: Path) -> None:
    with live_mount(cli, source) as mnt:
        pid = json.loads(cli("status", mnt, "--json").stdout)["pid"]
        cli("snapshot", mnt)
        (mnt / "written-before-crash.txt").write_bytes(os.urandom(50_000))
        with open(mnt / "notes.md", "a") as f:
            f.write("appended\n")
            f.flush()
            os.fsync(f.fileno())
        os.kill(pid, 9)
        deadline = time.monotonic() + 10
        while True:  # the mount is now stale: every request fails with ENOTCONN
            try:
                os.statvfs(mnt)
            except OSError:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)

        cli("mount", source)  # no manual clean-up needed: the stale mount is detected and cleared
        (mnt / "written-after-restart.txt").write_text("after")
        cli("snapshot", mnt)
        assert same_tree(mnt, restore_latest(cli, tmp_path, "after-crash")) == []
        assert (tmp_path / "after-crash" / "notes.md").read_text().endswith("appended\n")


def test_a_dead_mount_is_named_and_umount_clears_it_saying_no_final_snapshot_was_taken(cli, source: Path) -> None:
    """After kill -9 of the daemon, `snapshot .` and `status .` from a shell inside printed a
    traceback (ENOTCONN from realpath) or "Directory '.' does not exist", and `umount` said only
    "unmounted", exit 0, as if the final snapshot had been taken."""
    out = cli("mount", source).stdout.decode()
    pid = int(re.search(r"daemon pid (\d+)", out).group(1))  # type: ignore[union-attr]
    try:
        (source / "after-the-last-snapshot.txt").write_text("only the next mount's scan finds this")
        with contextlib.chdir(source):  # a shell inside; once the mount is dead, no one can cd in
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while not is_stale(bytes(source)):
                assert time.monotonic() < deadline, "the mount never went stale"
                time.sleep(0.05)
            for command in ("snapshot", "status"):
                err = fsmount_script(cli, command, ".", check=1).stderr.decode()
                assert "is a dead mount" in err and f"fsmount umount {source}" in err, err
                assert len(err.splitlines()) == 1, err
            proc = fsmount_script(cli, "umount", ".", check=3)  # the shell inside would make a plain unmount fail
        assert b"no final snapshot was taken" in proc.stderr and b"warning:" in proc.stderr, proc.stderr
        assert not is_mounted(source)
    finally:
        if is_mounted(source):
            force_unmount(source)
    with live_mount(cli, source) as mnt:
        cli("snapshot", mnt)
    assert "/after-the-last-snapshot.txt" in [e["path"] for e in json.loads(cli("ls", "latest", "--json").stdout)]


def fsmount_script(cli, *args: str, check: int) -> subprocess.CompletedProcess:
    """`fsmount ARGS` through its console script, as a user runs it: `python -m` puts the current
    directory on sys.path, and in a dead mount it then fails before it starts."""
    script = os.path.join(os.path.dirname(sys.executable), "fsmount")
    proc = subprocess.run([script, *args], env=cli.env, capture_output=True, check=False)
    assert b"Traceback" not in proc.stderr and proc.returncode == check, (proc.returncode, proc.stderr)
    return proc


def test_damaged_changelog_never_stops_a_mount(cli, source: Path, isolated_cache: Path) -> None:
    with live_mount(cli, source) as mnt:
        (mnt / "a.txt").write_text("a")
    for changelog in isolated_cache.rglob("changelog.sqlite"):
        changelog.write_bytes(b"this is not a database" * 100)
    with live_mount(cli, source) as mnt:
        (mnt / "b.txt").write_text("b")
        cli("snapshot", mnt)
    listing = [e["path"] for e in json.loads(cli("ls", "latest", "--json").stdout)]
    assert "/a.txt" in listing and "/b.txt" in listing


def test_lazy_unmount_leaves_the_final_snapshot_for_the_next_mount_to_upload(cli, source: Path) -> None:
    cli("mount", source)
    try:
        (source / "pending.txt").write_text("not yet in a snapshot")
        before = snapshots(cli)
        said = cli("umount", "--lazy", source).stdout.decode()
        assert "wait on local disk for the next mount" in said, said
        assert snapshots(cli) == before  # not in the store yet
    finally:
        if is_mounted(source):
            cli("umount", source)
    with live_mount(cli, source) as mnt:
        deadline = time.monotonic() + 30
        while json.loads(cli("status", mnt, "--json").stdout)["backlog"]["objects"]:
            assert time.monotonic() < deadline, "the next mount did not upload the backlog"
            time.sleep(0.2)
        final = [s for s in snapshots(cli) if s not in before]
        assert len(final) == 1  # the lazy unmount's final snapshot, uploaded by this mount
        assert "/pending.txt" in [e["path"] for e in json.loads(cli("ls", final[0]["id"], "--json").stdout)]


def test_a_file_unlinked_while_open_works_until_closed(cli, source: Path) -> None:
    """tempfile.TemporaryFile without O_TMPFILE: create, unlink, then use and close the fd. The
    kernel writes the cached times back at close; with no name left they go through the fd."""
    with live_mount(cli, source) as mnt:
        with tempfile.TemporaryFile(dir=mnt) as f:
            f.write(b"scratch" * 10_000)
            f.flush()
            os.fchmod(f.fileno(), 0o600)
            os.utime(f.fileno(), ns=(1_000_000_000, 2_000_000_000))
            st = os.fstat(f.fileno())
            assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o600, 2_000_000_000)
            f.seek(0)
            assert f.read() == b"scratch" * 10_000
        fd = os.open(mnt / "gone.txt", os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, b"x")
        os.unlink(mnt / "gone.txt")
        os.close(fd)  # raised EIO: the time update looked the file up by a name it no longer had
        assert sorted(os.listdir(mnt)) == ["notes.md", "src"]


def test_umount_keeps_a_busy_mount_and_lazy_or_sigterm_keep_what_was_written(cli, source: Path) -> None:
    """A file still open for writing: `umount` refuses (detached, the write was lost and close
    gave ENOTCONN); `umount --lazy` and SIGTERM first have the kernel write back what it caches."""
    def open_and_write(name: str) -> int:
        fd = os.open(source / name, os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, b"written before the unmount\n")
        return fd

    with live_mount(cli, source) as mnt:
        fd = open_and_write("busy.txt")
        err = cli("umount", mnt, check=1).stderr
        assert b"busy" in err and b"--lazy" in err, err
        assert is_mounted(mnt)
        os.write(fd, b"and after\n")  # still served
        os.close(fd)
    assert (source / "busy.txt").read_bytes() == b"written before the unmount\nand after\n"
    restored = [e for e in json.loads(cli("ls", "latest", "--json").stdout) if e["path"] == "/busy.txt"]
    assert restored and restored[0]["size"] == 37

    for stop in ("lazy", "sigterm"):
        out = cli("mount", source).stdout.decode()
        pid = int(re.search(r"daemon pid (\d+)", out).group(1))  # type: ignore[union-attr]
        fd = open_and_write(f"{stop}.txt")
        try:
            if stop == "lazy":
                cli("umount", "--lazy", source)
            else:
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while is_mounted(source) or os.path.exists(f"/proc/{pid}"):
                assert time.monotonic() < deadline, "not unmounted"
                time.sleep(0.1)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        assert (source / f"{stop}.txt").read_bytes() == b"written before the unmount\n", stop


def test_snapshots_do_not_leak_file_descriptors(cli, source: Path) -> None:
    """Every snapshot's worker threads opened index connections that stayed open: four descriptors
    a snapshot, until the daemon hit its limit and the mount went away."""
    with live_mount(cli, source) as mnt:
        pid = json.loads(cli("status", mnt, "--json").stdout)["pid"]
        counts = []
        for i in range(8):
            (mnt / "counter.txt").write_text(str(i))
            cli("snapshot", mnt)
            counts.append(len(os.listdir(f"/proc/{pid}/fd")))
        assert counts[-1] <= counts[1], counts


def test_a_repository_deleted_while_mounted_is_reported_not_made_again(cli, source: Path) -> None:
    """The daemon wrote the next snapshot into a new, empty folder (no config, no keys) and said
    it was uploaded; the store now refuses to create the repository's own folder outside `init`,
    so the snapshot waits in the backlog and the mount says why."""
    repo = Path(cli.env["FSMOUNT_REPOSITORY"])
    with live_mount(cli, source) as mnt:
        shutil.rmtree(repo)
        (mnt / "after.txt").write_text("written after the repository went away")
        assert b"waits on local disk" in cli("snapshot", mnt).stdout
        deadline = time.monotonic() + 30
        while "missing" not in (json.loads(cli("status", mnt, "--json").stdout)["backlog"]["last_error"] or ""):
            assert time.monotonic() < deadline, "status never named the missing repository"
            time.sleep(0.2)
        err = cli("umount", mnt, check=15).stderr.decode()
        assert "repository folder" in err and "missing" in err, err
    assert not repo.exists()


def test_a_folder_that_is_a_file_system_of_its_own_can_be_mounted_over(cli, tmp_path: Path) -> None:
    """A partition, a USB disk or a tmpfs mounted at the folder: it was refused as "already a
    mountpoint (unmount it first)", advice that would have hidden the user's files."""
    require_root("mounting a tmpfs needs root")
    cli("init")
    folder = tmp_path / "usb"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", folder], check=True)
    try:
        (folder / "on-the-disk.txt").write_text("kept")
        with live_mount(cli, folder) as mnt:
            assert (mnt / "on-the-disk.txt").read_text() == "kept"
            (mnt / "new.txt").write_text("new")
        listing = [e["path"] for e in json.loads(cli("ls", "latest", "--json").stdout)]
        assert {"/on-the-disk.txt", "/new.txt"} <= set(listing)
        assert (folder / "new.txt").read_text() == "new"  # on the tmpfs itself
    finally:
        subprocess.run(["umount", "-l", folder], check=False)


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=16m,mode=0777,{options}", "tmpfs", folder], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", folder], check=False)


def test_devices_and_setuid_work_as_the_source_s_file_system_has_them_and_snapshots_grant_neither(
        cli, public_dir: Path) -> None:
    require_root("mounting a tmpfs and acting as another user need root")
    cli("init")
    with tmpfs(public_dir / "disk", "dev,suid") as folder:
        os.mknod(folder / "null", stat.S_IFCHR, os.makedev(1, 3))
        os.chmod(folder / "null", 0o666)
        shutil.copy("/usr/bin/id", folder / "id")
        os.chmod(folder / "id", 0o4755)  # root's: whoever runs it is root
        with live_mount(cli, folder) as mnt:
            assert not os.statvfs(mnt).f_flag & (os.ST_NODEV | os.ST_NOSUID | os.ST_NOEXEC)
            ran = as_nobody(f"echo gone > {mnt}/null && cat {mnt}/null && {mnt}/id -u")
            assert (ran.returncode, ran.stdout) == (0, b"0\n"), ran.stderr  # (Permission denied, 65534)
            (mnt / "shared").write_text("x")
            os.chmod(mnt / "shared", 0o6777)
            ran = as_nobody(f"echo more >> {mnt}/shared")
            assert ran.returncode == 0, ran.stderr
            assert stat.S_IMODE(os.stat(mnt / "shared").st_mode) == 0o777  # a write by another user clears both
            assert stat.S_IMODE(os.stat(folder / "shared").st_mode) == 0o777  # in the source too
            ran = as_nobody(f"perl -MFcntl -e 'umask 0; sysopen(F, $ARGV[0], O_CREAT | O_WRONLY, 06755) or die $!' "
                            f"{mnt}/made-setuid")  # (the chown that gave it to nobody cleared both)
            st = os.stat(mnt / "made-setuid")
            assert ran.returncode == 0 and (stat.S_IMODE(st.st_mode), st.st_uid) == (0o6755, 65534), ran.stderr

            cli("snapshot", mnt)
            frozen = mnt / ".snapshots" / "latest"
            assert stat.S_IMODE(os.stat(frozen / "id").st_mode) == 0o755
            assert stat.S_IMODE(os.lstat(frozen / "null").st_mode) == 0
            ran = as_nobody(f"{frozen}/id -u; cat {frozen}/null")
            assert ran.stdout == b"65534\n" and b"Permission denied" in ran.stderr
    with tmpfs(public_dir / "stick", "nodev,nosuid,noexec") as folder, live_mount(cli, folder) as mnt:
        flags = os.statvfs(mnt).f_flag
        assert flags & os.ST_NODEV and flags & os.ST_NOSUID and flags & os.ST_NOEXEC


def test_a_snapshot_is_not_live_mounted_and_a_snapshots_folder_of_ones_own_is_named(cli, source: Path) -> None:
    (source / ".snapshots").mkdir()
    (source / ".snapshots" / "mine.txt").write_text("the user's own")
    err = cli("mount", source).stderr.decode()
    assert ".snapshots is hidden while mounted" in err and len(err.splitlines()) == 1, err
    try:
        err = cli("mount", source, check=2).stderr.decode()  # said the folder was hidden, then that it was mounted
        assert "already" in err and len(err.splitlines()) == 1, err
        cli("snapshot", source, "--name", "s1")
        err = cli("snapshot", source, "--name", b"bad\xff", check=2).stderr.decode()
        assert "printable UTF-8" in err, err  # was "bad request: 'utf-8' codec can't encode ..."
        err = cli("mount", source / ".snapshots" / "s1", check=2).stderr.decode()
        assert "read-only" in err, err  # every write in it would fail with EROFS
    finally:
        cli("umount", source)
    assert (source / ".snapshots" / "mine.txt").read_text() == "the user's own"


def test_a_tree_deeper_than_pythons_recursion_limit_works_as_natively(cli, source: Path) -> None:
    """`mkdir -p` 1000 levels deep killed the daemon (a RecursionError in working out the paths)
    at ~980 levels, and the mount with it. Also reached again after the directory fds of every
    level were evicted, and snapshotted and read back."""
    from fsmount.live_inodes import MAX_DIR_FDS

    levels = 1500  # a plain directory takes this too (the path stays under PATH_MAX)
    try:
        with live_mount(cli, source) as mnt:
            deep = mnt / "deep" / Path(*["d"] * levels)
            subprocess.run(["mkdir", "-p", deep], check=True)  # os.makedirs would recurse per level itself
            (deep / "bottom.txt").write_text("at the bottom\n")
            wide = mnt / "wide"
            wide.mkdir()
            for i in range(MAX_DIR_FDS + 100):  # a lookup in each opens its fd, evicting the deep chain's
                (wide / f"w{i}").mkdir()
                assert not (wide / f"w{i}" / "absent").exists()
            with open(deep / "bottom.txt", "a") as f:  # reached again from the root, level by level
                f.write("appended\n")
            cli("snapshot", mnt, "--name", "deep")
            frozen = mnt / ".snapshots" / "deep" / "deep" / Path(*["d"] * levels) / "bottom.txt"
            assert frozen.read_text() == "at the bottom\nappended\n"
            assert is_mounted(mnt)
    finally:  # pytest's own clean-up of old temporary folders (shutil.rmtree) recurses per level
        subprocess.run(["rm", "-rf", source / "deep"], check=False)


def test_o_direct_reads_and_writes_work_as_natively(cli, source: Path, tmp_path: Path) -> None:
    """`dd oflag=direct` (a create) and `dd iflag=direct` (an open) failed with EINVAL: the source
    file was opened O_DIRECT and the daemon's buffers are not aligned."""
    data = os.urandom(2 << 20)
    (tmp_path / "data.bin").write_bytes(data)
    with live_mount(cli, source) as mnt:
        subprocess.run(["dd", f"if={tmp_path / 'data.bin'}", f"of={mnt / 'direct.bin'}", "bs=1M", "oflag=direct"],
                       check=True, capture_output=True)
        read = subprocess.run(["dd", f"if={mnt / 'direct.bin'}", "bs=64k", "iflag=direct"],
                              check=True, capture_output=True).stdout
        assert read == data
        cli("snapshot", mnt, "--name", "direct")
        assert (mnt / ".snapshots" / "direct" / "direct.bin").read_bytes() == data
    assert (source / "direct.bin").read_bytes() == data


def test_an_acl_that_changes_the_mode_is_seen_and_enforced_at_once(cli, source: Path, public_dir: Path) -> None:
    """After `setfacl -m o::---` the mount showed the old mode (644 over a 640 file), and let
    others read the file, for the kernel's attribute timeout (300 s)."""
    shared = public_dir / "shared"
    shutil.copytree(source, shared)
    with live_mount(cli, shared) as mnt:
        secret = mnt / "secret.txt"
        secret.write_text("for the owner and the group")
        secret.chmod(0o644)
        assert stat.S_IMODE(secret.stat().st_mode) == 0o644  # the kernel holds the attributes now
        assert as_nobody(f"cat {secret}").returncode == 0
        subprocess.run(["setfacl", "-m", "o::---", secret], check=True)
        assert stat.S_IMODE(secret.stat().st_mode) == 0o640
        denied = as_nobody(f"cat {secret}")
        assert denied.returncode != 0 and b"Permission denied" in denied.stderr
        subprocess.run(["setfacl", "-m", "u:65534:r,m::r", secret], check=True)  # an extended ACL
        assert stat.S_IMODE(secret.stat().st_mode) == 0o640  # the group bits show the mask
        os.removexattr(secret, "system.posix_acl_access")
        shown = stat.S_IMODE(secret.stat().st_mode)
    assert shown == stat.S_IMODE(os.stat(shared / "secret.txt").st_mode) == 0o640  # as the folder has it


HOLDER = """
import os, sys, time
f = open(sys.argv[1], "a")  # opened before the mount: it keeps writing to the folder underneath
os.write(int(sys.argv[2]), b"open\\n")
time.sleep(60)
"""


def test_mount_names_the_programs_whose_writes_would_bypass_it(cli, source: Path) -> None:
    """A shell whose cwd was inside the folder, or a file opened before the mount, writes to the
    folder underneath: those edits reach only the next mount's full scan, and nothing said so."""
    ready_r, ready_w = os.pipe()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, source / "notes.md", str(ready_w)], pass_fds=(ready_w,))
    sitter = subprocess.Popen(["sleep", "60"], cwd=source / "src")
    os.close(ready_w)
    try:
        assert os.read(ready_r, 10) == b"open\n"
        err = cli("mount", source).stderr.decode()
        try:
            lines = err.splitlines()
            assert len(lines) == 2, err
            cwd_line = next(line for line in lines if "current directory" in line)
            fd_line = next(line for line in lines if "files open" in line)
            assert f"sleep (pid {sitter.pid})" in cwd_line and "cd ." in cwd_line, err
            assert f"(pid {holder.pid})" in fd_line and "reopen" in fd_line and "bypasses the mount" in fd_line, err
        finally:
            cli("umount", source)
    finally:
        for process in (holder, sitter):
            process.kill()
            process.wait()
        os.close(ready_r)
    assert "bypasses" not in cli("mount", source).stderr.decode()  # nobody holds anything there now
    cli("umount", source)


def wait_for_empty_backlog(cli, mnt: Path, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (status := json.loads(cli("status", mnt, "--json").stdout))["backlog"]["objects"]:
        assert time.monotonic() < deadline, f"the backlog was never uploaded: {status['backlog']}"
        time.sleep(0.2)
    return status


def test_mkdir_in_snapshots_while_the_store_is_down_takes_the_snapshot_and_shows_it(
        cli, source: Path, tmp_path: Path) -> None:
    """The snapshot went to the backlog, but mkdir said EIO: the listing after it failed on the
    store and did not find the new snapshot."""
    repo = Path(cli.env["FSMOUNT_REPOSITORY"])
    away = tmp_path / "repository-unreachable"
    with live_mount(cli, source) as mnt:
        cli("snapshot", mnt, "--name", "before")
        repo.rename(away)
        try:
            (mnt / "during.txt").write_text("written while the store was down\n")
            os.mkdir(mnt / ".snapshots" / "during")
            assert (mnt / ".snapshots" / "during" / "during.txt").read_text() == "written while the store was down\n"
            assert {"before", "during"} <= set(os.listdir(mnt / ".snapshots"))
            assert json.loads(cli("status", mnt, "--json").stdout)["backlog"]["snapshots"] == 1
        finally:
            away.rename(repo)
        wait_for_empty_backlog(cli, mnt)
    assert sorted(s["name"] for s in snapshots(cli) if s["name"]) == ["before", "during"]


def test_snapshots_shows_what_the_mount_found_at_start_when_the_store_is_down_before_its_first_use(
        cli, source: Path, tmp_path: Path) -> None:
    """Its first listing failed with nothing known yet: `ls .snapshots` and every mkdir there said EIO."""
    cli("backup", source, "--name", "earlier")
    repo = Path(cli.env["FSMOUNT_REPOSITORY"])
    away = tmp_path / "repository-unreachable"
    with live_mount(cli, source) as mnt:
        repo.rename(away)
        try:
            os.mkdir(mnt / ".snapshots" / "during")
            assert {"earlier", "during"} <= set(os.listdir(mnt / ".snapshots"))
        finally:
            away.rename(repo)
        wait_for_empty_backlog(cli, mnt)


def test_status_and_umount_say_the_store_is_down_and_the_backlog_waits_for_the_next_mount(
        cli, source: Path, tmp_path: Path) -> None:
    """status said nothing of a store that failed while the backlog was empty, and umount counted
    what it left on local disk only in bytes."""
    repo = Path(cli.env["FSMOUNT_REPOSITORY"])
    away = tmp_path / "repository-unreachable"
    with live_mount(cli, source) as mnt:
        cli("snapshot", mnt)
        repo.rename(away)
        try:
            time.sleep(2.5)  # past refresh_s: this listing asks the store, which fails
            os.listdir(mnt / ".snapshots")
            shown = cli("status", mnt).stdout.decode()
            (mnt / "during.txt").write_text("written while the store was down\n")
            cli("snapshot", mnt)
            waiting = cli("status", mnt).stdout.decode()
            err = cli("umount", mnt, check=15).stderr.decode()
        finally:
            away.rename(repo)
    assert "not answering since" in shown, shown
    # what waits on local disk is not said to be uploaded
    assert "uploaded " not in waiting and "saved " in waiting and "backlog      1 snapshot" in waiting, waiting
    assert "1 snapshot (" in err and "the next mount of this folder uploads them" in err, err
    with live_mount(cli, source) as mnt:
        wait_for_empty_backlog(cli, mnt)
    assert "/during.txt" in [e["path"] for e in json.loads(cli("ls", "latest", "--json").stdout)]


def test_a_named_snapshot_while_the_store_is_down_waits_on_local_disk_as_an_unnamed_one(
        cli, source: Path, tmp_path: Path) -> None:
    """Its name was checked against the store's listing first, so with the store down it failed
    (on S3 after the whole retry budget) where an unnamed one waited in the backlog."""
    repo = Path(cli.env["FSMOUNT_REPOSITORY"])
    away = tmp_path / "repository-unreachable"
    with live_mount(cli, source) as mnt:
        cli("snapshot", mnt, "--name", "before")
        repo.rename(away)
        try:
            (mnt / "during.txt").write_text("written while the store was down\n")
            out = cli("snapshot", mnt, "--name", "during").stdout.decode()
            assert "waits on local disk" in out and "uploaded when the store is back" in out, out
            assert "during" in out
            # The names known here are still refused: one in the store, one in the backlog.
            for taken in ("before", "during"):
                err = cli("snapshot", mnt, "--name", taken, check=2).stderr.decode()
                assert f'named "{taken}" already' in err, err
        finally:
            away.rename(repo)
        wait_for_empty_backlog(cli, mnt)
    assert sorted(s["name"] for s in snapshots(cli) if s["name"]) == ["before", "during"]
    restored = tmp_path / "restored"
    cli("restore", "during", "--target", restored)
    assert (restored / "during.txt").read_text() == "written while the store was down\n"


def wait_for_backlog_error(cli, mnt: Path, part: str, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while part not in ((backlog := json.loads(cli("status", mnt, "--json").stdout)["backlog"])["last_error"] or ""):
        assert time.monotonic() < deadline, f"status never said {part!r}: {backlog}"
        time.sleep(0.2)
    return backlog


def test_a_folder_mounts_while_the_repository_s_disk_is_not_mounted_and_uploads_once_it_is_back(
        cli, source: Path, tmp_path: Path) -> None:
    """A missing repository folder read as an empty one: the mount failed, 'no repository' (exit 10),
    where a bucket that did not answer mounted from the local copies."""
    cli("backup", source, "--name", "before")
    repo = Path(cli.env["FSMOUNT_REPOSITORY"])
    away = tmp_path / "disk-not-mounted"
    repo.rename(away)
    try:
        with live_mount(cli, source) as mnt:
            (mnt / "during.txt").write_text("written with the disk away\n")
            assert json.loads(cli("snapshot", mnt, "--name", "during", "--json").stdout)["in_backlog"]
            assert {"before", "during"} <= set(os.listdir(mnt / ".snapshots"))
            assert "repository folder" in (json.loads(cli("status", mnt, "--json").stdout)["backlog"]["last_error"]
                                           or "")
            away.rename(repo)
            wait_for_empty_backlog(cli, mnt)
    finally:
        if away.exists():
            away.rename(repo)
    assert {"before", "during"} <= {s["name"] for s in snapshots(cli)}
    restored = tmp_path / "restored"
    cli("restore", "during", "--target", restored)
    assert (restored / "during.txt").read_text() == "written with the disk away\n"


def test_two_mounts_of_one_repository_without_its_store_refuse_a_name_the_other_took(
        cli, source: Path, tmp_path: Path) -> None:
    """Each checked a name against what it knew itself: both took "one", and the repository then
    held two snapshots of that name."""
    other = tmp_path / "other-folder"
    other.mkdir()
    (other / "b.txt").write_text("b\n")
    cli("backup", source)
    repo = Path(cli.env["FSMOUNT_REPOSITORY"])
    away = tmp_path / "disk-not-mounted"
    repo.rename(away)
    try:
        with live_mount(cli, source) as first, live_mount(cli, other) as second:
            assert json.loads(cli("snapshot", first, "--name", "one", "--json").stdout)["in_backlog"]
            refused = cli("snapshot", second, "--name", "one", check=2).stderr.decode()
            assert 'named "one" already' in refused, refused
            away.rename(repo)
            wait_for_empty_backlog(cli, first)
            wait_for_empty_backlog(cli, second)
    finally:
        if away.exists():
            away.rename(repo)
    assert [s["name"] for s in snapshots(cli)].count("one") == 1


def test_mounting_without_the_store_says_so_on_the_terminal(cli, source: Path, tmp_path: Path) -> None:
    """The warning went only to the daemon's log: `fsmount mount` said `mounted ...` and nothing else."""
    cli("backup", source)
    repo = Path(cli.env["FSMOUNT_REPOSITORY"])
    away = tmp_path / "disk-not-mounted"
    repo.rename(away)
    try:
        mounted = cli("mount", source)
        try:
            err = mounted.stderr.decode()
            assert "warning: the store does not answer" in err and "snapshots wait on local disk" in err, err
        finally:
            away.rename(repo)
            wait_for_empty_backlog(cli, source)
            cli("umount", source)
    finally:
        if away.exists():
            away.rename(repo)


def test_replicas_whose_disks_are_all_unmounted_let_the_folder_mount_as_one_would(cli, tmp_path: Path) -> None:
    """Each replica's folder missing was one error of no particular kind to the replicated store,
    so the mount failed where one such folder let it start from the local copies."""
    replicas = [tmp_path / "disk-a" / "repo", tmp_path / "disk-b" / "repo"]
    options = tuple(arg for replica in replicas for arg in ("-r", replica))
    source = tmp_path / "projects"
    source.mkdir()
    (source / "notes.md").write_text("# notes\n")
    cli(*options, "init")
    cli(*options, "backup", source, "--name", "before")
    for replica in replicas:
        replica.rename(replica.with_name("away"))
    try:
        with live_mount(cli, source, options=options) as mnt:
            (mnt / "during.txt").write_text("written with both disks away\n")
            assert json.loads(cli("snapshot", mnt, "--name", "during", "--json").stdout)["in_backlog"]
            for replica in replicas:
                replica.with_name("away").rename(replica)
            wait_for_empty_backlog(cli, mnt)
    finally:
        for replica in replicas:
            if replica.with_name("away").exists():
                replica.with_name("away").rename(replica)
    names = {s["name"] for s in json.loads(cli(*options, "snapshots", "--json").stdout)}
    assert {"before", "during"} <= names, names


def test_a_mount_opened_without_its_store_uploads_nothing_into_another_repository_found_there(
        cli, source: Path, tmp_path: Path) -> None:
    """The store came back holding a repository initialised in the old one's place: the backlog's
    snapshot must stay on local disk, and status and umount say why."""
    repo = Path(cli.env["FSMOUNT_REPOSITORY"])
    away = tmp_path / "disk-not-mounted"
    with live_mount(cli, source):
        pass  # the copies a mount without the store opens from are kept now
    repo.rename(away)
    with live_mount(cli, source) as mnt:
        (mnt / "during.txt").write_text("written with the disk away\n")
        assert json.loads(cli("snapshot", mnt, "--json").stdout)["in_backlog"]
        cli("init")  # another repository where the old one was
        backlog = wait_for_backlog_error(cli, mnt, "holds another repository")
        assert backlog["snapshots"] == 1 and backlog["objects"], backlog
        assert not any((repo / "locks").rglob("*")), "the mount took a lock in the other repository"
        (mnt / "later.txt").write_text("written once the other repository answers\n")
        assert json.loads(cli("snapshot", mnt, "--json").stdout)["in_backlog"]
        err = cli("umount", mnt, check=15).stderr.decode()
        assert "another repository" in err, err
    assert snapshots(cli) == []
    written = [p.relative_to(repo) for part in ("data", "index", "snapshots") for p in (repo / part).rglob("*")
               if p.is_file()]
    assert written == [], written
