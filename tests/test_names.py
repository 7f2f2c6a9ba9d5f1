"""Names, hosts and tags: one set of rules for the three ways to name a snapshot, checked before any work."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from live_mount import force_unmount, is_mounted, live_mount, snapshot_mount


@pytest.fixture
def source(tmp_path: Path, cli) -> Path:
    cli("init")
    root = tmp_path / "src"
    root.mkdir()
    (root / "a.txt").write_text("a\n")
    return root


def one_line_usage_error(proc) -> str:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and err.startswith("fsmount: "), err
    return err


@pytest.mark.parametrize("option", ["--name", "--tag", "--host"])
def test_backup_refuses_text_that_is_not_utf8_before_reading_anything(cli, source: Path, option: str) -> None:
    """It read the whole folder, then failed with a traceback as the snapshot was encoded."""
    err = one_line_usage_error(cli("backup", source, option, b"x\xff", check=None))
    assert "must be printable UTF-8 text" in err, err
    assert json.loads(cli("snapshots", "--json").stdout) == []


@pytest.mark.parametrize(("given", "shown"), [
    (b"a\nb", 'not "a\\nb": it holds a control character (\\n)'),
    (b"x\xff", 'not "x\\xff": it holds a byte that is not UTF-8 (\\xff)'),
    ("a\u200bb".encode(), 'not "a\\u200bb": it holds an invisible or format character (U+200B ZERO WIDTH SPACE)')])
def test_refused_text_is_shown_as_a_user_reads_it(cli, source: Path, given: bytes, shown: str) -> None:
    """The message showed a Python bytes literal, `not b'a\\nb'`."""
    err = one_line_usage_error(cli("backup", source, "--tag", given, check=None))
    assert err == f"fsmount: a tag must be printable UTF-8 text, {shown}\n", err


def test_mount_refuses_a_host_that_is_not_utf8(cli, source: Path) -> None:
    """It mounted, then every snapshot failed, and `umount` lost the final one."""
    proc = cli("mount", source, "--host", b"h\xff", check=None)
    if is_mounted(source):  # what it did: leave nothing mounted for the next test
        cli("umount", "--lazy", source, check=None)
        force_unmount(source)
    err = one_line_usage_error(proc)
    assert "a host name must be printable UTF-8 text" in err, err


# name -> the errno of `mkdir MOUNT/.snapshots/NAME` (the kernel itself refuses names over 255 bytes)
REFUSED = {b"latest": errno.EEXIST, b"3c75a79a": errno.EINVAL, b"new\nline": errno.EINVAL,
           b"2026-12-02T16:51:32": errno.EINVAL, b"abc-5bb3c28a": errno.EINVAL,  # folder names made up
           b"x\xff": errno.EINVAL, b"Q" * 241: errno.ENAMETOOLONG, b"Q" * 255: errno.ENAMETOOLONG}


def test_backup_snapshot_and_mkdir_refuse_the_same_names(cli, source: Path) -> None:
    """`snapshot --name latest` made a folder `latest-<id>` and an id-like name hid another
    snapshot from `ls`; `backup --name` took a newline; mkdir took id-like names, and one of
    255 bytes made a folder cut to 240 (`mkdir X && cd X` failed)."""
    with live_mount(cli, source) as mnt:
        for name, expected in REFUSED.items():
            one_line_usage_error(cli("backup", source, "--name", name, check=None))
            one_line_usage_error(cli("snapshot", mnt, "--name", name, check=None))
            with pytest.raises(OSError) as caught:
                os.mkdir(bytes(mnt) + b"/.snapshots/" + name)
            assert caught.value.errno == expected, (name, caught.value)
        longest = "Q" * 240  # a folder under that exact name
        os.mkdir(mnt / ".snapshots" / longest)
        assert os.listdir(mnt / ".snapshots" / longest) == ["a.txt"]
    assert [s["name"] for s in json.loads(cli("snapshots", "--json").stdout) if s["name"]] == [longest]


def test_a_name_another_snapshot_has_is_refused_three_ways_before_any_work(cli, source: Path, tmp_path: Path) -> None:
    """mkdir said EEXIST for a second `mk1`, `snapshot --name mk1` made one anyway, and `backup
    --name` warned after saving (its --json said `"warnings": []`); mkdir saw only the folder's
    own snapshots. Now one rule, for the repository's snapshots, in the daemon too."""
    other = tmp_path / "other"
    other.mkdir()
    daily = json.loads(cli("backup", other, "--name", "daily", "--json").stdout)
    with live_mount(cli, source) as mnt:
        with pytest.raises(OSError) as caught:
            os.mkdir(mnt / ".snapshots" / "daily")  # another folder's snapshot has it
        assert caught.value.errno == errno.EEXIST
        err = one_line_usage_error(cli("snapshot", mnt, "--name", "daily", check=None))
        assert f"snapshot {daily['short_id']} of " in err and 'is named "daily" already' in err, err
        os.mkdir(mnt / ".snapshots" / "mk1")
        one_line_usage_error(cli("snapshot", mnt, "--name", "mk1", check=None))
        refused = cli("backup", source, "--name", "mk1", "--json", check=2)
        assert json.loads(refused.stdout)["exit_code"] == 2 and 'named "mk1" already' in refused.stderr.decode()
        for name in ("mk1", "latest", "a/b", 5):  # the daemon's own check, for a request sent by hand
            reply = json.loads(subprocess.run([sys.executable, "-c", CONTROL_REQUEST, mnt, json.dumps(name)],
                                              env=cli.env, capture_output=True, check=True).stdout)
            assert reply["ok"] is False and reply["exit_code"] == 2, (name, reply)
    assert sorted(s["name"] for s in json.loads(cli("snapshots", "--json").stdout) if s["name"]) == ["daily", "mk1"]


CONTROL_REQUEST = """
import json, sys
from fsmount import control
print(json.dumps(control.request(sys.argv[1], {"op": "snapshot", "name": json.loads(sys.argv[2])})))
"""


@pytest.mark.parametrize("command", ["backup", "mount"])
def test_an_empty_host_is_refused(cli, source: Path, command: str) -> None:
    """`backup --host ""` recorded this machine's name, exit 0 (`--tag ""` was refused)."""
    proc = cli(command, source, "--host", "", check=None)
    if is_mounted(source):
        cli("umount", "--lazy", source, check=None)
        force_unmount(source)
    assert "a host name may not be empty" in one_line_usage_error(proc)


def test_names_may_hold_any_kind_of_space_but_no_invisible_character(cli, source: Path) -> None:
    """A no-break space was refused as not printable."""
    for name in ("no\u00a0break", "thin\u2009space", " padded "):
        cli("backup", source, "--name", name)
    for name in ("zero\u200bwidth", "bidi\u202eoverride", "line\u2028separator", "para\u2029graph"):
        assert "printable" in one_line_usage_error(cli("backup", source, "--name", name, check=None))
    assert [s["name"] for s in json.loads(cli("snapshots", "--json").stdout)] == \
        ["no\u00a0break", "thin\u2009space", " padded "]


def test_every_folder_of_the_snapshot_mounts_names_its_own_snapshot_in_ls_and_restore(
        cli, source: Path, tmp_path: Path, repo_path: Path) -> None:
    """`ls T` listed a snapshot named T where mount-snapshots had T as an unnamed one's folder, and
    `ls mk1-<id>` (the folder of a second mk1) was "not a snapshot id nor name". Older versions
    let these names in: the snapshots are made as they made them."""
    import dataclasses

    from conftest import PASSPHRASE

    from backend.repository import Repository
    from backend.stores.local import LocalStore

    for content in ("unnamed", "named as its time", "first mk1", "second mk1"):
        (source / "a.txt").write_text(content)
        cli("backup", source)
    with Repository.open(LocalStore(repo_path), PASSPHRASE.encode(), cache_dir=str(tmp_path / "c")) as repo:
        unnamed, *others = repo.snapshots()
        for snapshot, name in zip(others, (unnamed.label(), "mk1", "mk1"), strict=True):
            repo.store.delete(f"snapshots/{snapshot.id}")
            time_ns = unnamed.time_ns + 1 if name == unnamed.label() else snapshot.time_ns
            repo.save_snapshot(dataclasses.replace(snapshot, name=name, time_ns=time_ns))
    with snapshot_mount(cli, tmp_path / "snaps") as (mnt, _):
        folders = sorted(os.listdir(mnt))
        assert len(folders) == 5 and folders.count(unnamed.label()) == 1 and folders.count("mk1") == 1, folders
        shown = {folder: (mnt / folder / "a.txt").read_text() for folder in folders if folder != "latest"}
    assert sorted(shown.values()) == ["first mk1", "named as its time", "second mk1", "unnamed"]
    for folder, content in shown.items():
        assert cli("ls", folder).stdout == b"/a.txt\n"
        cli("restore", folder, "--target", tmp_path / folder, "-q")
        assert (tmp_path / folder / "a.txt").read_text() == content, folder


def test_the_snapshots_table_gives_names_a_column_of_their_own_cut_short(cli, source: Path) -> None:
    """A name showed as `[name]` among the tags, as a tag `[x]` did, and one of 240 bytes made the
    table 240 columns wide, piped or not."""
    longest = "é" * 120
    cli("backup", source, "--tag", "[x]")
    cli("backup", source, "--name", "x")
    cli("backup", source, "--name", longest)
    header, tagged, named, cut, _count = cli("snapshots").stdout.decode().splitlines()
    columns = header.split()
    assert columns[4:6] == ["tags", "name"], header
    at = header.index(" name") + 1
    assert tagged[at:at + 4].strip() == "" and "[x]" in tagged, tagged
    assert named[at:].split()[0] == "x" and "[" not in named, named
    assert "é" * 20 in cut and "…" in cut and len(cut) <= len(named) + 32, cut  # the name column is 32 wide
    assert "name" in cli("snapshots", "--help").stdout.decode()
    assert [s["name"] for s in json.loads(cli("snapshots", "--json").stdout)][2] == longest
