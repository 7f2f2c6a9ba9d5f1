"""Restore never costs the user data they did not ask to lose: the right folder's snapshot, whole
files or untouched ones, and nothing deleted without --delete. Each test is a defect a user found."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_root
from test_integrity import flip_byte, locate_block
from treecompare import differences

from backend.stores.local import pid_space

BLOCK = 64 * 1024
OLD_MTIME_NS = 1_000_000_000 * 1_000_000_000  # 2001: what "left as it was" must still show


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def snapshot_ids(cli) -> dict[str, str]:
    """Source path -> id of its newest snapshot."""
    return {s["source"]: s["id"] for s in json.loads(cli("snapshots", "--json").stdout)}


@pytest.fixture
def two_folders(cli, tmp_path: Path) -> tuple[Path, Path]:
    """`projects` backed up, then `docs`: the repository's `latest` is the docs snapshot."""
    projects = write_tree(tmp_path / "projects", {"main.py": b"print('projects')\n", "lib/util.py": b"x = 1\n"})
    docs = write_tree(tmp_path / "docs", {"report.txt": b"a report\n"})
    cli("init", "--block-size", "64K")
    cli("backup", projects)
    cli("backup", docs)
    return projects, docs


def test_in_place_latest_is_the_newest_snapshot_of_that_folder(cli, two_folders) -> None:
    """It was the newest of any folder: docs went into projects, and --delete removed its files."""
    projects, _ = two_folders
    (projects / "main.py").write_bytes(b"edited since\n")

    cli("restore", "latest", "--in-place", projects, "--delete")

    assert (projects / "main.py").read_bytes() == b"print('projects')\n"
    assert (projects / "lib" / "util.py").read_bytes() == b"x = 1\n"
    assert not (projects / "report.txt").exists()


def test_in_place_latest_of_a_folder_never_backed_up_is_refused(cli, two_folders, tmp_path: Path) -> None:
    other = write_tree(tmp_path / "other", {"keep.txt": b"never backed up\n"})

    err = cli("restore", "latest", "--in-place", other, "--delete", check=2).stderr.decode()

    assert f"no snapshot of {other}" in err and len(err.splitlines()) == 1, err
    assert os.listdir(other) == ["keep.txt"] and (other / "keep.txt").read_bytes() == b"never backed up\n"


def test_in_place_snapshot_of_another_folder_needs_from_other_folder(cli, two_folders) -> None:
    projects, docs = two_folders
    docs_id = snapshot_ids(cli)[str(docs)]

    err = cli("restore", docs_id[:8], "--in-place", projects, "--delete", check=2).stderr.decode()

    assert str(docs) in err and str(projects) in err and "--from-other-folder" in err, err
    assert len(err.splitlines()) == 1
    assert (projects / "main.py").exists() and not (projects / "report.txt").exists()
    assert "--from-other-folder" in cli("restore", "--help").stdout.decode()

    cli("restore", docs_id[:8], "--in-place", projects, "--delete", "--from-other-folder")
    assert differences(docs, projects) == []


def test_in_place_through_a_symlink_finds_the_folder(cli, two_folders, tmp_path: Path) -> None:
    """DIR is matched by its real path too: a folder named through a symlink finds its snapshots."""
    projects, _ = two_folders
    (tmp_path / "link").symlink_to(projects)
    (projects / "main.py").write_bytes(b"edited since\n")

    cli("restore", "latest", "--in-place", tmp_path / "link")

    assert (projects / "main.py").read_bytes() == b"print('projects')\n"
    assert not (projects / "report.txt").exists()


def test_target_restores_still_take_the_repository_latest(cli, two_folders, tmp_path: Path) -> None:
    _, docs = two_folders
    cli("restore", "latest", "--target", tmp_path / "new")
    assert differences(docs, tmp_path / "new") == []


def test_a_target_among_the_repository_objects_is_named_before_any_snapshot(cli, two_folders,
                                                                            repo_path: Path) -> None:
    """With `latest` now the newest snapshot of DIR, a target inside the repository must still be
    refused as such, not as a folder without snapshots."""
    err = cli("restore", "latest", "--in-place", repo_path / "data", check=2).stderr.decode()
    assert "(the repository or its cache) or inside it" in err, err


# -- a damaged block: in place, the file is restored whole or left as it was ------------------------

def scrambled(root: Path, names: list[str]) -> dict[str, bytes]:
    """Overwrite every byte of the files (the same sizes) and date them back; returns the contents."""
    local = {}
    for name in names:
        path = root / name
        local[name] = os.urandom(path.stat().st_size)
        path.write_bytes(local[name])
        os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    return local


@pytest.mark.parametrize("name, blocks, damaged", [("big.bin", 20, 13), ("small.bin", 3, 2)])
def test_in_place_file_with_a_damaged_block_is_left_as_it_was(cli, tmp_path: Path, repo_path: Path,
                                                              name: str, blocks: int, damaged: int) -> None:
    """Its good blocks were written, the damaged one kept the local data, the mtime said now: the
    next backup stored the mix. Large files (tasks of 8 blocks) and small ones (batches) alike."""
    source = write_tree(tmp_path / "src", {name: os.urandom(blocks * BLOCK - 100), "healthy.bin": os.urandom(BLOCK)})
    cli("init", "--block-size", "64K")
    cli("backup", source)
    snapshot_id = snapshot_ids(cli)[str(source)]
    pack, offset, length = locate_block(repo_path, snapshot_id, name.encode(), damaged)
    flip_byte(pack, offset + length // 2)
    local = scrambled(source, [name, "healthy.bin"])

    err = cli("restore", "latest", "--in-place", source, check=3).stderr.decode()

    assert (source / name).read_bytes() == local[name]
    assert (source / name).stat().st_mtime_ns == OLD_MTIME_NS
    assert name in err and "failed authentication" in err and "left as it was" in err, err
    assert (source / "healthy.bin").read_bytes() != local["healthy.bin"]  # the rest is restored


def test_a_hard_linked_local_file_with_a_damaged_block_keeps_its_name(cli, tmp_path: Path, repo_path: Path) -> None:
    """A file with other hard links is replaced, not written through: the new copy must take the
    name only once complete, or a failure leaves the name gone."""
    source = write_tree(tmp_path / "src", {"big.bin": os.urandom(20 * BLOCK)})
    cli("init", "--block-size", "64K")
    cli("backup", source)
    pack, offset, length = locate_block(repo_path, snapshot_ids(cli)[str(source)], b"big.bin", 5)
    local = scrambled(source, ["big.bin"])
    os.link(source / "big.bin", tmp_path / "other-name")
    flip_byte(pack, offset + length // 2)

    cli("restore", "latest", "--in-place", source, check=3)

    assert (source / "big.bin").read_bytes() == local["big.bin"]
    assert os.stat(source / "big.bin").st_ino == os.stat(tmp_path / "other-name").st_ino
    assert [n for n in os.listdir(source) if n != "big.bin"] == []  # no temporary file left


def test_a_hard_linked_local_file_is_replaced_not_written_through(cli, tmp_path: Path) -> None:
    source = write_tree(tmp_path / "src", {"big.bin": os.urandom(20 * BLOCK), "small.txt": b"small\n"})
    snapshot = {name: (source / name).read_bytes() for name in ("big.bin", "small.txt")}
    cli("init", "--block-size", "64K")
    cli("backup", source)
    local = scrambled(source, ["big.bin", "small.txt"])
    for name in local:
        os.link(source / name, tmp_path / f"outside-{name}")

    cli("restore", "latest", "--in-place", source)

    for name in local:
        assert (source / name).read_bytes() == snapshot[name]
        assert (tmp_path / f"outside-{name}").read_bytes() == local[name]
    assert sorted(os.listdir(source)) == ["big.bin", "small.txt"]


def test_in_place_restore_of_a_large_file_that_differs_everywhere(cli, tmp_path: Path) -> None:
    """The staged path end to end: every block differs, holes included, and the file was longer."""
    data = bytearray(os.urandom(40 * BLOCK + 123))
    data[5 * BLOCK:9 * BLOCK] = bytes(4 * BLOCK)  # holes in the snapshot, data locally
    source = write_tree(tmp_path / "src", {"big.bin": bytes(data)})
    cli("init", "--block-size", "64K")
    cli("backup", source)
    (source / "big.bin").write_bytes(os.urandom(45 * BLOCK))

    out = json.loads(cli("--json", "restore", "latest", "--in-place", source).stdout)

    assert (source / "big.bin").read_bytes() == bytes(data)
    assert out["stats"]["blocks_written"] == 37  # 41 blocks, 4 of them holes
    assert out["stats"]["bytes_written"] == 36 * BLOCK + 123


# -- another type in the way: without --delete, skipped, never deleted -------------------------------

def in_the_way(local: Path, kind: str) -> None:
    if kind == "directory":
        write_tree(local, {"precious.txt": b"the user's work\n"})
    else:
        local.write_bytes(b"the user's work\n")


@pytest.mark.parametrize("snapshot_has, local_has", [("file", "directory"), ("symlink", "directory"),
                                                     ("directory", "file"), ("symlink", "file")])
def test_an_entry_of_another_type_is_kept_without_delete(cli, tmp_path: Path, snapshot_has: str,
                                                         local_has: str) -> None:
    """A directory where the snapshot had a file was deleted, contents and all, without --delete."""
    source = write_tree(tmp_path / "src", {"other.txt": b"restored\n"})
    entry = source / "entry"
    if snapshot_has == "file":
        entry.write_bytes(b"snapshot file\n")
    elif snapshot_has == "symlink":
        entry.symlink_to("other.txt")
    else:
        write_tree(entry, {"inside.txt": b"snapshot file\n"})
    cli("init", "--block-size", "64K")
    cli("backup", source)
    cli("restore", "latest", "--target", tmp_path / "as-backed-up")
    (source / "other.txt").write_bytes(b"changed\n")
    if snapshot_has == "directory":
        (entry / "inside.txt").unlink()
        entry.rmdir()
    else:
        entry.unlink()
    if local_has == "directory":
        write_tree(entry, {"precious.txt": b"the user's work\n"})
    else:
        entry.write_bytes(b"the user's work\n")

    proc = cli("--json", "restore", "latest", "--in-place", source, check=3)

    err = proc.stderr.decode()
    assert "entry" in err and f"a {local_has} is where the snapshot has a {snapshot_has}" in err, err
    assert json.loads(proc.stdout)["skipped"] and not json.loads(proc.stdout)["errors"]
    assert (source / "other.txt").read_bytes() == b"restored\n"  # everything else is restored
    kept = entry / "precious.txt" if local_has == "directory" else entry
    assert kept.read_bytes() == b"the user's work\n"

    cli("restore", "latest", "--in-place", source, "--delete")
    assert differences(tmp_path / "as-backed-up", source) == []


# -- the source folder's own metadata --------------------------------------------------------------

def test_the_target_folder_takes_the_source_folders_metadata(cli, tmp_path: Path) -> None:
    """A folder backed up as 0700 came back with whatever mode the target had (0755 when made)."""
    source = write_tree(tmp_path / "src", {"secret.txt": b"mine\n"})
    os.setxattr(source, "user.origin", b"the folder itself")
    source.chmod(0o700)
    os.utime(source, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    cli("init", "--block-size", "64K")
    cli("backup", source)

    cli("restore", "latest", "--target", tmp_path / "new")
    source.chmod(0o755)
    os.removexattr(source, "user.origin")
    os.setxattr(source, "user.added", b"since the backup")
    cli("restore", "latest", "--in-place", source)

    for folder in (tmp_path / "new", source):
        st = folder.stat()
        assert (oct(st.st_mode & 0o7777), st.st_mtime_ns) == (oct(0o700), OLD_MTIME_NS), folder
        assert os.listxattr(folder) == ["user.origin"] and os.getxattr(folder, "user.origin") == b"the folder itself"


@contextlib.contextmanager
def small_disk(folder: Path, size: str, inodes: int | None = None) -> Iterator[Path]:
    require_root("mounting a small tmpfs needs root")
    folder.mkdir()
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", folder], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", folder], check=False)


def assert_each_file_whole_or_as_it_was(folder: Path, restored: dict[str, bytes], before: dict[str, bytes]) -> None:
    for name in os.listdir(folder):
        assert name in restored, f"{name}: not the snapshot's (a temporary file left behind?)"
        data = (folder / name).read_bytes()
        assert data == restored[name] or data == before.get(name), f"{name}: partly restored ({len(data)} bytes)"


def test_a_full_target_disk_stops_the_restore_in_one_line(cli, tmp_path: Path) -> None:
    """It went on file by file, each failing on a line of its own (capped at 20, then counted), and
    ended "with warnings" (exit 3), as if a full disk were a problem of some files."""
    files = {f"f{i:03}": os.urandom(3 * BLOCK + 1000) for i in range(100)}
    source = write_tree(tmp_path / "src", files)
    cli("init", "--block-size", "64K")
    cli("backup", source)
    with small_disk(tmp_path / "small", "5m") as small:
        proc = cli("restore", "latest", "--target", small / "r", "--json", check=15)
        assert_each_file_whole_or_as_it_was(small / "r", files, {})
        restored = len(os.listdir(small / "r"))
    err = proc.stderr.decode()
    assert len(err.splitlines()) == 1 and f"the disk of {small / 'r'} is full" in err, err
    doc = json.loads(proc.stdout)
    assert doc["stats"]["failed"] == 0 and 0 < doc["stats"]["files"] == restored < 100, doc["stats"]
    assert f"after {restored} files" in err and doc["error"] in err, err


def test_a_full_disk_leaves_what_an_in_place_restore_had_not_finished_as_it_was(cli, tmp_path: Path) -> None:
    """Files that grow back to their snapshot's size need space: they must not be left half-grown."""
    with small_disk(tmp_path / "small", "8m") as small:
        files = {f"f{i:03}": os.urandom(3 * BLOCK + 1000) for i in range(25)} | {"z-big.bin": os.urandom(20 * BLOCK)}
        source = write_tree(small / "src", files)
        cli("init", "--block-size", "64K")
        cli("backup", source)
        before = {name: data[: BLOCK // 2] + b"edited" for name, data in files.items()}
        write_tree(source, before)
        free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
        (small / "filler").write_bytes(bytes(free - 2 * 1024 * 1024))  # room for half of what grows back

        err = cli("restore", "latest", "--in-place", source, check=15).stderr.decode()

        assert_each_file_whole_or_as_it_was(source, files, before)
        assert any((source / name).read_bytes() == data for name, data in files.items()), "nothing restored"
    assert len(err.splitlines()) == 1 and "is full" in err, err


def use_every_inode(folder: Path) -> None:
    for i in itertools.count():
        try:
            (folder / f"inode-{i}").touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            return


def make_special(path: Path, kind: str) -> None:
    if kind == "symlink":
        path.symlink_to("the snapshot's link")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        os.mknod(path, stat.S_IFSOCK | 0o644)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "socket"])
def test_a_special_file_that_cannot_be_made_leaves_the_entry_it_replaces(cli, tmp_path: Path, kind: str) -> None:
    """The entry there was removed before the new one was made: on a disk out of inodes, the
    restore stopped and the user's symlink was gone."""
    source = tmp_path / "src"
    source.mkdir()
    make_special(source / "entry", kind)
    cli("init")
    cli("backup", source)
    with small_disk(tmp_path / "small", "1m", inodes=64) as small:
        target = small / "target"
        target.mkdir()
        (target / "entry").symlink_to("the user's link")
        # Held open, the old entry's inode stays in use once unlinked, as a file open elsewhere would.
        held = os.open(target / "entry", os.O_PATH | os.O_NOFOLLOW)
        try:
            use_every_inode(small)
            err = cli("restore", "latest", "--target", target, check=15).stderr.decode()
            assert os.readlink(target / "entry") == "the user's link"
            assert os.listdir(target) == ["entry"]  # no temporary entry left either
        finally:
            os.close(held)
    assert len(err.splitlines()) == 1 and "is full" in err, err


def test_in_place_latest_is_this_machine_s_when_it_has_one(cli, tmp_path: Path) -> None:
    """It was the newest of any host: another machine's snapshot of the same path replaced the folder."""
    folder = write_tree(tmp_path / "hd", {"f": b"mine\n"})
    cli("init")
    cli("backup", folder)
    (folder / "f").write_bytes(b"theirs\n")
    cli("backup", folder, "--host", "laptop")
    (folder / "f").write_bytes(b"now\n")
    cli("restore", "latest", "--in-place", folder)
    assert (folder / "f").read_bytes() == b"mine\n"


# -- leftovers of a killed restore, and hard-link groups in place -------------------------------------

LEFTOVER = ".fsmount-restore-0123456789abcdef"  # what an older restore killed before its rename left


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_killed_restore_s_temporary_files_are_removed_by_the_next(cli, tmp_path: Path) -> None:
    """They stayed for good: a 600 MB restore killed half-way left 500 MB under a hidden name."""
    source = write_tree(tmp_path / "src", {"a.txt": b"a\n", "sub/b.txt": b"b\n"})
    cli("init", "--block-size", "64K")
    cli("backup", source)
    users = write_tree(source, {".fsmount-restore-notes": b"mine\n", ".fsmount-restore-0123456789ABCDEF": b"mine\n",
                                ".fsmount-restore-fedcba9876543210/inside": b"mine\n"})
    with_writer = f".fsmount-restore-{pid_space() or 'x'}-{dead_pid()}-0123456789abcdef"
    for leftover in (source / LEFTOVER, source / "sub" / LEFTOVER, source / with_writer):
        leftover.write_bytes(os.urandom(3 * BLOCK))
    link_left = source / "sub" / f".fsmount-restore-{pid_space() or 'x'}-{dead_pid()}-fedcba9876543210"
    link_left.symlink_to("a symlink made to replace another entry")

    cli("restore", "latest", "--in-place", source)

    assert not (source / LEFTOVER).exists() and not (source / "sub" / LEFTOVER).exists()
    assert not (source / with_writer).exists() and not os.path.lexists(link_left)
    assert (users / ".fsmount-restore-notes").read_bytes() == b"mine\n"
    assert (users / ".fsmount-restore-0123456789ABCDEF").read_bytes() == b"mine\n"
    assert (users / ".fsmount-restore-fedcba9876543210" / "inside").read_bytes() == b"mine\n"


def wait_for_temporary_file(folder: Path, restore: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not any(name.startswith(".fsmount-restore-") for name in os.listdir(folder)):
        assert restore.poll() is None and time.monotonic() < deadline, "the restore made no temporary file"
        time.sleep(0.001)


def test_a_restore_leaves_the_temporary_file_of_another_one_running_alone(cli, tmp_path: Path) -> None:
    """Two restores into one folder: the second removed the first's file in progress as a leftover,
    and the first failed at its rename (No such file or directory)."""
    source = write_tree(tmp_path / "src", {"big.bin": os.urandom(64 * 1024 * 1024)})
    cli("init", "--block-size", "64K")
    cli("backup", source)
    target = tmp_path / "target"
    target.mkdir()
    (target / "big.bin").symlink_to("nowhere")  # so big.bin is made under a temporary name
    first = cli.popen("restore", "latest", "--target", target, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_temporary_file(target, first)
        first.send_signal(signal.SIGSTOP)
        cli("restore", "latest", "--target", target)
    finally:
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err.decode()
    assert differences(source, target) == []


def test_delete_leaves_the_restore_s_own_temporary_files_alone(cli, tmp_path: Path) -> None:
    """A large file replacing a symlink is made under a temporary name; --delete removed that name
    as an extra file before the rename, and the file failed (No such file or directory)."""
    source = write_tree(tmp_path / "src", {"big.bin": os.urandom(40 * BLOCK)})
    cli("init", "--block-size", "64K")
    cli("backup", source)
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "big.bin").symlink_to("nowhere")

    cli("restore", "latest", "--target", tmp_path / "target", "--delete")

    assert differences(source, tmp_path / "target") == []


def hard_linked_source(cli, tmp_path: Path) -> Path:
    """`a.bin` and `sub/b.bin` one file (20 blocks), `c.txt` another, all backed up."""
    source = write_tree(tmp_path / "src", {"a.bin": os.urandom(20 * BLOCK), "c.txt": b"c\n"})
    (source / "sub").mkdir()
    os.link(source / "a.bin", source / "sub" / "b.bin")
    cli("init", "--block-size", "64K")
    cli("backup", source)
    cli("restore", "latest", "--target", tmp_path / "as-backed-up")
    return source


def restore_in_place(cli, source: Path) -> dict:
    return json.loads(cli("--json", "restore", "latest", "--in-place", source).stdout)["stats"]


def assert_linked_as_backed_up(tmp_path: Path, source: Path) -> None:
    a, b = os.stat(source / "a.bin"), os.stat(source / "sub" / "b.bin")
    assert (a.st_ino, a.st_nlink) == (b.st_ino, 2)
    assert differences(tmp_path / "as-backed-up", source) == []


def test_in_place_hard_links_that_already_match_are_not_rewritten(cli, tmp_path: Path) -> None:
    """Every in-place restore wrote every hard-linked file again, in full."""
    source = hard_linked_source(cli, tmp_path)
    inode = os.stat(source / "a.bin").st_ino

    stats = restore_in_place(cli, source)

    assert stats["blocks_written"] == 0 and stats["blocks_unchanged"] == 21, stats
    assert os.stat(source / "a.bin").st_ino == inode
    assert_linked_as_backed_up(tmp_path, source)


def test_in_place_hard_links_made_separate_files_are_linked_again(cli, tmp_path: Path) -> None:
    source = hard_linked_source(cli, tmp_path)
    (source / "sub" / "b.bin").unlink()
    shutil.copy2(source / "a.bin", source / "sub" / "b.bin")

    stats = restore_in_place(cli, source)

    assert stats["blocks_written"] == 0, stats
    assert_linked_as_backed_up(tmp_path, source)


def test_in_place_hard_links_linked_wrongly_are_put_right(cli, tmp_path: Path) -> None:
    """`a.bin` linked to `c.txt` (another file of the snapshot), `b.bin` a file of its own."""
    source = hard_linked_source(cli, tmp_path)
    (source / "sub" / "b.bin").unlink()
    (source / "sub" / "b.bin").write_bytes(b"another content\n")
    (source / "c.txt").unlink()
    os.link(source / "a.bin", source / "c.txt")

    restore_in_place(cli, source)

    assert_linked_as_backed_up(tmp_path, source)
    assert os.stat(source / "c.txt").st_nlink == 1


@pytest.mark.parametrize("change", ["content", "mode"])
def test_in_place_hard_links_shared_outside_are_not_written_through(cli, tmp_path: Path, change: str) -> None:
    """A local file with a name outside the target that differs is copied, never changed through."""
    source = hard_linked_source(cli, tmp_path)
    if change == "content":
        scrambled(source, ["a.bin"])
    else:
        (source / "a.bin").chmod(0o600)
    os.link(source / "a.bin", tmp_path / "outside")
    outside = (tmp_path / "outside").read_bytes(), os.stat(tmp_path / "outside").st_mode

    stats = restore_in_place(cli, source)

    assert ((tmp_path / "outside").read_bytes(), os.stat(tmp_path / "outside").st_mode) == outside
    assert os.stat(tmp_path / "outside").st_nlink == 1
    assert stats["blocks_written"] == (20 if change == "content" else 0), stats
    assert_linked_as_backed_up(tmp_path, source)


def test_a_read_only_target_is_refused_in_one_line(cli, tmp_path: Path) -> None:
    """Every entry failed on a line of its own, and the target folder itself on one more."""
    require_root("mounting a read-only tmpfs needs root")
    source = write_tree(tmp_path / "src", {f"f{i}": b"x\n" for i in range(5)})
    cli("init")
    cli("backup", source)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", read_only], check=True)
    try:
        (read_only / "keep").write_bytes(b"mine\n")
        subprocess.run(["mount", "-o", "remount,ro", read_only], check=True)
        err = cli("restore", "latest", "--target", read_only, check=2).stderr.decode()
        assert os.listdir(read_only) == ["keep"] and (read_only / "keep").read_bytes() == b"mine\n"
    finally:
        subprocess.run(["umount", "-l", read_only], check=False)
    assert "read-only file system" in err and len(err.splitlines()) == 1, err


def test_two_restores_into_one_new_folder_at_once_both_succeed(cli, tmp_path: Path) -> None:
    """A file the other restore created between the look at its name and the create failed with
    "File exists" (1 to 4 of 40 files, exit 3); now the second looks again and compares it."""
    source = write_tree(tmp_path / "src", {f"f{i}.bin": os.urandom(16 * BLOCK) for i in range(40)})
    cli("init", "--block-size", "64K")  # 16 blocks: each file opened on its own, not in a batch
    cli("backup", source)
    for round_ in range(3):  # the race is between two system calls: give it a few chances
        target = tmp_path / f"target{round_}"
        restores = [cli.popen("restore", "latest", "--target", target, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(2)]
        for restore in restores:
            _, err = restore.communicate(timeout=120)
            assert restore.returncode == 0, err.decode()
        assert differences(source, target) == []
