"""The snapshot mount: every snapshot as a read-only folder that equals what was backed up."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pyfuse3
import pytest
from conftest import TEST_BLOCK_SIZE, require_root
from hypothesis import HealthCheck, given, settings
from live_mount import is_mounted, live_mount, require_fuse, sigterm_as_it_mounts, snapshot_mount
from test_integrity import flip_byte, locate_block
from treecompare import differences
from treegen import build, trees

from backend.backup import backup
from fsmount import control

pytest_plugins = ["s3_fixtures"]


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture
def mounted(cli, repo, tmp_path: Path):
    with snapshot_mount(cli, tmp_path / "snaps") as (mnt, _):
        yield mnt


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=trees)
def test_each_snapshot_reads_back_as_its_source(repo, mounted: Path, tmp_path: Path, spec: dict) -> None:
    """Random trees with hostile names, hard links, sparse files and xattrs, through the mount."""
    (tmp_path / "sources").mkdir(exist_ok=True)
    count = len(os.listdir(tmp_path / "sources"))
    source = tmp_path / "sources" / f"s{count}"
    build(bytes(source), spec)
    backup(repo, source, name=f"example-{count}")

    folder = mounted / f"example-{count}"  # appears without remounting
    wait_for(folder.exists)

    # SEEK_HOLE is not served through FUSE; st_blocks stands for holes (tested below)
    assert differences(source, folder, sparse=False) == []


def test_metadata_tools_agree_with_the_source(cli, repo, mounted: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_text("hello\n")
    os.link(source / "a.txt", source / "sub" / "same.txt")
    os.symlink("a.txt", source / "link")
    with open(source / "sparse", "wb") as f:
        f.truncate(10 * TEST_BLOCK_SIZE)
        f.seek(4 * TEST_BLOCK_SIZE)
        f.write(os.urandom(TEST_BLOCK_SIZE))
    (source / "big.bin").write_bytes(os.urandom(3 * TEST_BLOCK_SIZE + 123))
    os.setxattr(source / "a.txt", "user.colour", b"blue")
    os.chmod(source / "sub", 0o1750)
    os.utime(source / "big.bin", ns=(1, 1_600_000_000_123_456_789))
    backup(repo, source, name="tools")
    snap = mounted / "tools"
    wait_for(snap.exists)

    # hard links are one inode with the link count of the source
    a, same = os.stat(snap / "a.txt"), os.stat(snap / "sub" / "same.txt")
    assert a.st_ino == same.st_ino and a.st_nlink == 2
    # holes are not counted as allocated; data blocks are
    sparse = os.stat(snap / "sparse")
    assert sparse.st_size == 10 * TEST_BLOCK_SIZE and sparse.st_blocks * 512 == TEST_BLOCK_SIZE
    assert os.stat(snap / "big.bin").st_mtime_ns == 1_600_000_000_123_456_789
    assert os.getxattr(snap / "a.txt", "user.colour") == b"blue"
    assert os.readlink(snap / "link") == "a.txt"
    assert stat.S_IMODE(os.stat(snap / "sub").st_mode) == 0o1750
    assert os.readlink(mounted / "latest") == "tools"

    # the everyday tools: diff, du, find and cp -a
    subprocess.run(["diff", "-r", source, snap], check=True)
    def du(path: Path) -> int:
        out = subprocess.run(["du", "-s", "--block-size=1", path], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[0])
    assert du(snap) == du(source)  # the source's allocation: data counted once, holes not at all

    def find(root: Path) -> list[list[bytes]]:
        listing = ["find", root, "-mindepth", "1", "-printf", "%P\t%y\t%m\t%s\t%n\t%T@\n"]
        lines = subprocess.run(listing, capture_output=True, check=True).stdout.splitlines()
        # a directory's size and link count are the file system's own business, not the snapshot's
        return sorted(line.split(b"\t")[:3] if line.split(b"\t")[1] == b"d" else line.split(b"\t")
                      for line in lines)
    assert find(snap) == find(source)
    subprocess.run(["cp", "-a", snap, tmp_path / "copy"], check=True)
    assert differences(source, tmp_path / "copy", sparse=False) == []
    copy = tmp_path / "copy"
    assert os.stat(copy / "a.txt").st_ino == os.stat(copy / "sub" / "same.txt").st_ino  # cp -a kept the link


def test_allocation_is_the_source_s_so_du_agrees(cli, repo, mounted: Path, tmp_path: Path) -> None:
    """st_blocks counted whole blocks of the repository: a 30 MiB sparse file with two 4 KiB
    pages of data showed 264 blocks against 16 in the source, 5 bytes in a 5 MiB file 256 against 8."""
    source = tmp_path / "src"
    (source / "dir").mkdir(parents=True)
    with open(source / "sparse", "wb") as f:
        f.truncate(30 << 20)
        for offset in (0, 17 << 20):
            f.seek(offset)
            f.write(os.urandom(4096))
    with open(source / "dir" / "five", "wb") as f:
        f.write(b"12345")
        f.truncate(5 << 20)
    backup(repo, source, name="alloc")
    snap = mounted / "alloc"
    wait_for(snap.exists)
    for rel in ("sparse", "dir/five", "dir", "."):
        assert os.lstat(snap / rel).st_blocks == os.lstat(source / rel).st_blocks, rel
    def du(path: Path) -> list[str]:
        out = subprocess.run(["du", "-a", "--block-size=1", path], capture_output=True, text=True, check=True).stdout
        return sorted(line.split("\t")[0] + " " + os.path.relpath(line.split("\t")[1], path) for line in out.splitlines())
    assert du(snap) == du(source)


def test_every_folder_lists_dot_and_dot_dot(cli, repo, tmp_path: Path) -> None:
    """The root, each snapshot's folder and MOUNT/.snapshots listed neither (`ls -a`), where any
    other folder does."""
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "f").write_text("f")
    def listed(path: Path) -> list[str]:
        return subprocess.run(["ls", "-a", path], capture_output=True, text=True, check=True).stdout.split()
    with snapshot_mount(cli, tmp_path / "snaps") as (mnt, _):
        backup(repo, source, name="dots")
        wait_for((mnt / "dots").exists)
        assert listed(mnt) == [".", "..", "dots", "latest"]
        assert listed(mnt / "dots") == [".", "..", "sub"] and listed(mnt / "dots" / "sub") == [".", "..", "f"]
        assert os.listdir(mnt / "dots") == ["sub"]  # readdir(3) users see no difference
        assert subprocess.run(["find", mnt / "dots"], capture_output=True, text=True, check=True).stdout.split() == [
            str(mnt / "dots"), str(mnt / "dots" / "sub"), str(mnt / "dots" / "sub" / "f")]
    with live_mount(cli, source) as live:
        cli("snapshot", live, "--name", "one")
        assert listed(live / ".snapshots") == [".", "..", "dots", "latest", "one"]
        root = subprocess.run(["ls", "-ai", live / ".snapshots"], capture_output=True, text=True, check=True).stdout
        assert re.search(r"^ *1 \.\.$", root, re.MULTILINE), root  # its parent: the mount's root


def test_a_snapshot_folder_has_the_source_folder_s_own_metadata(cli, repo, tmp_path: Path) -> None:
    """It showed 0555 and the snapshot's time: `cp -a` of it made a read-only folder, and a
    private (0700) folder came out readable by all."""
    source = tmp_path / "private"
    source.mkdir()
    (source / "s.txt").write_text("secret\n")
    os.setxattr(source, "user.tag", b"mine")
    os.chmod(source, 0o710)
    os.utime(source, ns=(1, 1_700_000_000_987_654_321))
    backup(repo, source, name="private")
    with snapshot_mount(cli, tmp_path / "snaps") as (mnt, _):
        snap = mnt / "private"
        wait_for(snap.exists)
        st = os.stat(snap)
        assert stat.S_IMODE(st.st_mode) == 0o710 and st.st_mtime_ns == 1_700_000_000_987_654_321
        assert os.getxattr(snap, "user.tag") == b"mine"
        subprocess.run(["cp", "-a", snap, tmp_path / "copy"], check=True)
    assert differences(source, tmp_path / "copy") == []


def test_other_users_cannot_read_the_mount_unless_allowed(cli, repo, tmp_path: Path) -> None:
    """Mounted by root, every snapshot was readable by every user (allow_other), although the
    folders above the backed-up folder had kept them out."""
    require_root("reading as another user needs root")
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_text("x\n")
    backup(repo, source, name="s")
    source.chmod(0o755)
    reachable = Path(tempfile.mkdtemp(prefix="fsmount-other-"))  # pytest's tmp folders are 0700
    reachable.chmod(0o755)
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat"]
    try:
        for extra, readable in (((), False), (("--allow-other",), True)):
            with snapshot_mount(cli, reachable / "snaps", *extra) as (mnt, _):
                wait_for((mnt / "s").exists)
                read = subprocess.run([*as_nobody, mnt / "s" / "f"], capture_output=True, check=False)
                assert (read.returncode == 0) == readable, (extra, read.stderr)
    finally:
        shutil.rmtree(reachable)


def test_every_change_is_refused_as_read_only(repo, mounted: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "d").mkdir(parents=True)
    (source / "f").write_text("content")
    backup(repo, source, name="ro")
    snap = mounted / "ro"
    wait_for(snap.exists)

    attempts = {
        "open for writing": lambda: os.close(os.open(snap / "f", os.O_RDWR)),
        "truncate": lambda: os.truncate(snap / "f", 0),
        "create": lambda: (snap / "new").write_text("x"),
        "mkdir": lambda: (snap / "d" / "sub").mkdir(),
        "rmdir": lambda: (snap / "d").rmdir(),
        "unlink": lambda: (snap / "f").unlink(),
        "rename": lambda: os.rename(snap / "f", snap / "g"),
        "link": lambda: os.link(snap / "f", snap / "h"),
        "symlink": lambda: os.symlink("f", snap / "s"),
        "chmod": lambda: os.chmod(snap / "f", 0o777),
        "chown": lambda: os.chown(snap / "f", 1, 1),
        "utime": lambda: os.utime(snap / "f", (1, 1)),
        "setxattr": lambda: os.setxattr(snap / "f", "user.x", b"1"),
        "mkdir in the root": lambda: (mounted / "new-snapshot").mkdir(),
    }
    for what, attempt in attempts.items():
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno == errno.EROFS, what
    assert (snap / "f").read_text() == "content"


def test_corrupt_block_fails_only_its_file(cli, tmp_path: Path, repo_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "victim.bin").write_bytes(os.urandom(300_000))
    (source / "healthy.bin").write_bytes(os.urandom(300_000))
    cli("init", "--block-size", "64K")
    cli("backup", source)
    snapshot_id = json.loads(cli("snapshots", "--json").stdout)[0]["id"]
    pack, offset, length = locate_block(repo_path, snapshot_id, b"victim.bin", block=2)
    flip_byte(pack, offset + length // 2)

    with snapshot_mount(cli, tmp_path / "snaps", "--cache-size", "0") as (mnt, _):
        with open(mnt / "latest" / "victim.bin", "rb") as f:
            assert f.read(65536) == (source / "victim.bin").read_bytes()[:65536]  # block 0 is fine
            with pytest.raises(OSError) as caught:
                f.seek(2 * 65536)
                f.read(65536)
            assert caught.value.errno == errno.EIO
        assert (mnt / "latest" / "healthy.bin").read_bytes() == (source / "healthy.bin").read_bytes()
        assert sorted(os.listdir(mnt / "latest")) == ["healthy.bin", "victim.bin"]
    log = Path(control.runtime_dir(), control.mount_id(tmp_path / "snaps") + ".log").read_text()
    assert "victim.bin" in log and f"pack {pack.name}" in log  # the log names the damaged object


def test_concurrent_readers_of_one_large_file(cli, repo, mounted: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    content = os.urandom(12 * 1024 * 1024 + 777)
    (source / "large.bin").write_bytes(content)
    backup(repo, source, name="large")
    path = mounted / "large" / "large.bin"
    wait_for(path.exists)
    failures: list[str] = []

    def reader(seed: int) -> None:
        import random
        rng = random.Random(seed)
        with open(path, "rb", buffering=0) as f:
            if seed % 2:  # streaming readers and random readers at once
                got = b"".join(iter(lambda: f.read(1 << 20), b""))
                if got != content:
                    failures.append(f"reader {seed}: sequential read differs")
                return
            for _ in range(200):
                offset, size = rng.randrange(len(content)), rng.randrange(1, 300_000)
                f.seek(offset)
                if f.read(size) != content[offset : offset + size]:
                    failures.append(f"reader {seed}: {size} bytes at {offset} differ")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_mount_and_umount_speak_json(cli, repo, tmp_path: Path) -> None:
    """`--json` printed plain text on stdout for both."""
    (tmp_path / "snaps").mkdir()
    mounted = json.loads(cli("--json", "mount-snapshots", tmp_path / "snaps").stdout)
    try:
        assert mounted["mountpoint"] == str(tmp_path / "snaps") and mounted["pid"] > 0
        assert json.loads(cli("umount", tmp_path / "snaps", "--json").stdout)["kind"] == "snapshots"
    finally:
        if is_mounted(tmp_path / "snaps"):
            subprocess.run(["fusermount3", "-uz", tmp_path / "snaps"], check=False)


def test_mountpoint_errors_are_clear(cli, repo, tmp_path: Path) -> None:
    proc = cli("mount-snapshots", tmp_path / "missing", check=2)
    assert b"does not exist" in proc.stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "file").write_text("x")
    assert b"is not empty" in cli("mount-snapshots", full, check=2).stderr
    with snapshot_mount(cli, tmp_path / "snaps") as (mnt, _):
        assert b"already a mountpoint" in cli("mount-snapshots", mnt, check=2).stderr


def test_sigterm_unmounts_cleanly(cli, repo, tmp_path: Path) -> None:
    with snapshot_mount(cli, tmp_path / "snaps") as (mnt, pid):
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not is_mounted(mnt))
        assert os.listdir(mnt) == []  # an ordinary empty folder again, not a stale mount


def test_a_busy_mount_is_kept_unless_lazy(cli, repo, tmp_path: Path) -> None:
    with snapshot_mount(cli, tmp_path / "snaps") as (mnt, pid):
        user = subprocess.Popen(["sleep", "60"], cwd=mnt)  # as a shell left in the folder
        try:
            err = cli("umount", mnt, check=1).stderr
            assert b"busy" in err and b"--lazy" in err
            assert is_mounted(mnt) and os.stat(mnt).st_ino == pyfuse3.ROOT_INODE  # still served
            cli("umount", "--lazy", mnt)
            assert not is_mounted(mnt)
        finally:
            user.kill()
            user.wait()
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"))  # the daemon ends once it is let go


@pytest.mark.fuse
def test_sigterm_the_moment_the_mount_appears_leaves_no_mount(cli, repo, tmp_path: Path) -> None:
    require_fuse()
    mnt = tmp_path / "snaps"
    mnt.mkdir()
    for _ in range(3):
        daemon = cli.popen("mount-snapshots", "-f", mnt, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sigterm_as_it_mounts(daemon, mnt, timeout=20)
        assert os.listdir(mnt) == []


@pytest.mark.s3
def test_snapshot_of_an_s3_repository_reads_back(s3_bucket, tmp_path: Path, cli) -> None:
    source = tmp_path / "src"
    (source / "dir").mkdir(parents=True)
    (source / "dir" / "large.bin").write_bytes(os.urandom(5 * 1024 * 1024))
    (source / "small.txt").write_text("small\n")
    key_id, secret = s3_bucket.server.credentials
    cli.env.update(FSMOUNT_REPOSITORY=s3_bucket.location(), AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret)
    cli("init")
    cli("backup", source)
    with snapshot_mount(cli, tmp_path / "snaps") as (mnt, _):
        assert differences(source, mnt / "latest", sparse=False) == []


def test_every_snapshot_name_makes_a_folder_name() -> None:
    from backend.snapshot import Snapshot

    for name in (".", "..", "a/b", "é" * 200, "nl\nname", "\udcff-raw", "a\0b"):
        label = Snapshot(0, "host", b"/src", b"", name=name).label()
        assert label not in (".", "..", "") and "/" not in label and "\0" not in label, name
        assert len(os.fsencode(label)) <= 240 and (len(name) > 100 or len(label) == len(name)), name


@pytest.fixture
def s3_cli(cli, s3_bucket):
    """`cli` on a fresh repository in an S3 bucket: the store a block cache is for."""
    key_id, secret = s3_bucket.server.credentials
    cli.env.update(FSMOUNT_REPOSITORY=s3_bucket.location(), AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret)
    cli("init")
    return cli


def block_cache_dir(isolated_cache: Path) -> Path:
    (repo_cache,) = (path for path in (isolated_cache / "fsmount").iterdir() if (path / "index.sqlite").exists())
    return repo_cache / "blocks"


def mount_log(mountpoint: Path) -> str:
    return Path(control.runtime_dir(), control.mount_id(mountpoint) + ".log").read_text()


@pytest.mark.s3
def test_a_cache_entry_that_cannot_be_read_is_fetched_from_the_store(s3_cli, isolated_cache, tmp_path: Path) -> None:
    """A cache file that open() refuses (here a folder in its place) was no miss: the error
    escaped the read handler, with a traceback, and the daemon died with the mount."""
    source = tmp_path / "src"
    source.mkdir()
    content = os.urandom(1024 * 1024)
    (source / "large.bin").write_bytes(content)
    s3_cli("backup", source)
    with snapshot_mount(s3_cli, tmp_path / "snaps", "--cache-size", "16M") as (mnt, _):
        assert (mnt / "latest" / "large.bin").read_bytes() == content
    victim = next(block_cache_dir(isolated_cache).iterdir())
    victim.unlink()
    victim.mkdir()

    with snapshot_mount(s3_cli, tmp_path / "snaps", "--cache-size", "16M") as (mnt, _):
        assert (mnt / "latest" / "large.bin").read_bytes() == content
        assert is_mounted(mnt)
    log = mount_log(tmp_path / "snaps")
    assert "Traceback" not in log and f"cannot read {victim.name}" in log


@pytest.mark.s3
def test_a_cache_folder_that_cannot_be_made_leaves_the_cache_off(s3_cli, isolated_cache, tmp_path: Path) -> None:
    """It was a traceback and no mount (FileExistsError from makedirs)."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "f.txt").write_text("content\n")
    s3_cli("backup", source)
    block_cache_dir(isolated_cache).write_text("a file where the cache folder goes")

    with snapshot_mount(s3_cli, tmp_path / "snaps") as (mnt, _):
        assert (mnt / "latest" / "f.txt").read_text() == "content\n"
    log = mount_log(tmp_path / "snaps")
    assert "Traceback" not in log and "block cache off" in log


@pytest.mark.s3
def test_two_mounts_sharing_the_cache_keep_its_bound(s3_cli, isolated_cache, tmp_path: Path) -> None:
    """Each process bounded only what it had put itself: two mounts with 2 MiB filled 4 MiB."""
    source = tmp_path / "src"
    source.mkdir()
    contents = {name: os.urandom(3 * 1024 * 1024) for name in ("a.bin", "b.bin")}
    for name, content in contents.items():
        (source / name).write_bytes(content)
    s3_cli("backup", source)
    limit = 2 * 1024 * 1024
    with (snapshot_mount(s3_cli, tmp_path / "one", "--cache-size", "2M") as (one, _),
          snapshot_mount(s3_cli, tmp_path / "two", "--cache-size", "2M") as (two, _)):
        assert (one / "latest" / "a.bin").read_bytes() == contents["a.bin"]
        assert (two / "latest" / "b.bin").read_bytes() == contents["b.bin"]
        cached = sum(entry.stat().st_size for entry in block_cache_dir(isolated_cache).iterdir())
    assert cached <= limit + limit // 4  # a process scans the folder again after each eighth of it
