"""Work a command used to do twice: loading every snapshot, reading every index object."""

from __future__ import annotations

from pathlib import Path

DAMAGED_ID = "ab" * 32


def test_backup_with_a_name_loads_the_snapshots_once(cli, repo_path: Path, tmp_path: Path) -> None:
    """Once for the name's check and the parent snapshot alike: each load reads every snapshot
    object (a damaged one says so each time), 600 reads of a repository of 300 snapshots."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_bytes(b"x")
    cli("init")
    cli("backup", source)
    (repo_path / "snapshots" / DAMAGED_ID).write_bytes(b"not a snapshot")

    result = cli("backup", "--name", "second", source)

    assert result.stderr.count(DAMAGED_ID.encode()) == 1, result.stderr
