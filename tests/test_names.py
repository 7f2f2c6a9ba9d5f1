"""Names, hosts and tags: one set of rules for the three ways to name a snapshot, checked before any work."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from live_mount import force_unmount, is_mounted, live_mount


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
