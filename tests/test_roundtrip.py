"""Backup then restore gives back exactly the tree that was backed up, whatever is in it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from treecompare import differences
from treegen import build, trees

from backend.backup import backup
from backend.restore import restore


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=trees)
def test_restore_gives_back_what_was_backed_up(repo, tmp_path: Path, spec: dict) -> None:
    source, target = bytes(tmp_path / "source"), bytes(tmp_path / "target")
    shutil.rmtree(source, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    build(source, spec)

    result = backup(repo, source)
    restore(repo, result.snapshot, target)

    assert result.warnings == []
    assert differences(source, target) == []


def test_deep_tree_beyond_path_max(repo, tmp_path: Path) -> None:
    """A path longer than PATH_MAX (4096) backs up and restores: everything works through dir fds."""
    source = tmp_path / "source"
    source.mkdir()
    fd = os.open(source, os.O_RDONLY)
    name = b"d" * 100
    depth = 60  # 60 * 101 bytes > PATH_MAX
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        new_fd = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = new_fd
    leaf = os.open(b"leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(leaf, b"at the bottom")
    os.close(leaf)
    os.close(fd)

    result = backup(repo, source)
    restore(repo, result.snapshot, tmp_path / "target")

    fd = os.open(tmp_path / "target", os.O_RDONLY)
    for _ in range(depth):
        new_fd = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = new_fd
    leaf = os.open(b"leaf", os.O_RDONLY, dir_fd=fd)
    assert os.read(leaf, 100) == b"at the bottom"
    os.close(leaf)
    os.close(fd)


def test_a_symlink_s_own_xattrs_come_back(repo, tmp_path: Path) -> None:
    """They were backed up and never restored (SELinux labels live there)."""
    source = tmp_path / "source"
    source.mkdir()
    os.symlink("nowhere", source / "link")
    os.setxattr(source / "link", "trusted.label", b"t", follow_symlinks=False)  # user.* is refused on links
    restore(repo, backup(repo, source).snapshot, tmp_path / "target")
    assert os.getxattr(tmp_path / "target" / "link", "trusted.label", follow_symlinks=False) == b"t"
    assert differences(source, tmp_path / "target") == []
