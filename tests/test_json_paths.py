"""Paths in --json output: the text the plain output shows, and the exact bytes in `*_hex` when they differ."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from live_mount import force_unmount, is_mounted, require_fuse

ODD = b"src\xff"  # a folder whose name is not UTF-8
LONE_SURROGATE = re.compile(rb"\\ud[89a-f][0-9a-f]{2}", re.IGNORECASE)


def strict_json(stdout: bytes):
    """The document, if a strict parser would take it: UTF-8 without lone surrogates (Python's
    own json.loads accepts those; most parsers reject them)."""
    assert not LONE_SURROGATE.search(stdout), stdout
    return json.loads(stdout.decode("utf-8", errors="strict"))


def exact(doc: dict, key: str) -> bytes:
    """The bytes a `key` (and `key_hex`) pair stands for; the text alone when it is exact."""
    return bytes.fromhex(doc[f"{key}_hex"]) if f"{key}_hex" in doc else doc[key].encode()


def test_backup_snapshots_ls_and_restore_name_paths_as_the_listing_does(cli, tmp_path: Path) -> None:
    """`snapshots --json` said `\\udcff` (six characters) for a byte and had no source_hex;
    `ls --json` gave the byte ff and the four characters `\\xff` the same `path`."""
    source = bytes(tmp_path) + b"/" + ODD
    os.mkdir(source)
    names = [b"n\xff\xfe", b"n\\xff\\xfe", b"line\nbreak", b"plain"]
    for i, name in enumerate(names):
        with open(source + b"/" + name, "wb") as f:
            f.write(b"%d" % i)
    cli("init")
    made = strict_json(cli("backup", source, "--json").stdout)
    [listed] = strict_json(cli("snapshots", "--json").stdout)
    for doc in (made, listed):
        assert (doc["source"], exact(doc, "source")) == (os.fsdecode(tmp_path) + "/src\\xff", source)

    entries = strict_json(cli("ls", "latest", "--json").stdout)
    plain = cli("ls", "latest").stdout.decode().splitlines()
    assert [e["path"] for e in entries] == plain  # the listing's own form: no two alike
    assert sorted(exact(e, "path") for e in entries) == sorted(b"/" + name for name in names)
    assert [("path_hex" in e) for e in entries] == [e["path"] != "/plain" for e in entries]

    for entry in [e for e in entries if exact(e, "path").startswith(b"/n")]:  # the byte, the characters
        [again] = strict_json(cli("ls", "latest", entry["path"], "--json").stdout)
        assert exact(again, "path") == exact(entry, "path")
    target = bytes(tmp_path) + b"/r\xff"
    done = strict_json(cli("restore", "latest", "--target", target, *[e["path"] for e in entries], "--json").stdout)
    assert exact(done, "target") == target
    for i, name in enumerate(names):
        with open(target + b"/" + name, "rb") as f:
            assert f.read() == b"%d" % i


def test_mount_status_umount_and_mount_snapshots_name_paths_so_too(cli, tmp_path: Path) -> None:
    """`status --json` printed the mountpoint with a lone surrogate (`\\udcff`); `mount` had no JSON."""
    require_fuse()
    source = bytes(tmp_path) + b"/" + ODD
    os.mkdir(source)
    snaps = bytes(tmp_path) + b"/snaps\xff"
    os.mkdir(snaps)
    cli("init")
    try:
        mounted = strict_json(cli("mount", source, "--json").stdout)
        status = strict_json(cli("status", source, "--json").stdout)
        for doc in (mounted, status):
            assert (exact(doc, "mountpoint"), exact(doc, "source")) == (source, source)
            assert doc["mountpoint"] == os.fsdecode(tmp_path) + "/src\\xff"
        assert exact(strict_json(cli("umount", source, "--json").stdout), "mountpoint") == source
        assert exact(strict_json(cli("mount-snapshots", snaps, "--json").stdout), "mountpoint") == snaps
        assert exact(strict_json(cli("umount", snaps, "--json").stdout), "mountpoint") == snaps
    finally:
        for path in (source, snaps):
            if is_mounted(Path(os.fsdecode(path))):
                cli("umount", path, check=None)
                force_unmount(Path(os.fsdecode(path)))


def test_restore_names_what_it_could_not_restore_by_path_and_counts_only_what_it_did(
        cli, tmp_path: Path, repo_path: Path) -> None:
    """`restore --json` gave each failure as one string (no path, no path_hex), the plain line said
    `w\\udcff/x\\udcfe` (a lone surrogate), and the summary said "1 files" of a file that failed."""
    from test_integrity import locate_block

    source = bytes(tmp_path) + b"/src"
    os.makedirs(source + b"/w\xff")
    with open(source + b"/w\xff/x\xfe", "wb") as f:
        f.write(os.urandom(3000))
    cli("init")
    snapshot = strict_json(cli("backup", source, "--json").stdout)
    pack, offset, _ = locate_block(repo_path, snapshot["id"], b"w\xff/x\xfe")
    os.truncate(pack, offset)

    done = strict_json(cli("restore", "latest", "--target", tmp_path / "r1", "--json", check=3).stdout)
    [error] = done["errors"]
    assert (error["path"], exact(error, "path")) == ("w\\xff/x\\xfe", b"w\xff/x\xfe"), error
    assert "not restored" in error["error"] and "w\\x" not in error["error"], error
    assert (done["stats"]["files"], done["stats"]["failed"]) == (0, 1)

    proc = cli("restore", "latest", "--target", tmp_path / "r2", check=3)
    assert "error: w\\xff/x\\xfe: " in proc.stderr.decode(errors="strict"), proc.stderr
    assert ": 0 files, " in proc.stdout.decode() and "; 1 failed" in proc.stdout.decode(), proc.stdout


def test_init_migrate_and_restore_name_their_folders_as_the_listing_does(cli, tmp_path: Path) -> None:
    """Their plain lines printed a folder's newline and bytes raw (a line broken in two, U+FFFD),
    and `init --json` had the location without `location_hex`."""
    odd = bytes(tmp_path) + b"/re\xffpo\nx"
    shown = f"{tmp_path}/re\\xffpo\\nx"
    line = cli("-r", odd, "init").stdout.decode()
    assert line.startswith("created repository ") and f" at {shown} (block size" in line and line.count("\n") == 1
    doc = strict_json(cli("-r", odd + b"2", "init", "--json").stdout)
    assert (doc["location"], exact(doc, "location")) == (shown + "2", odd + b"2")
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_text("x")
    cli("-r", odd, "backup", source)
    line = cli("-r", odd, "restore", "latest", "--target", odd + b"-restored").stdout.decode()
    assert f" to {shown}-restored: 1 files" in line and line.count("\n") == 1, line
    line = cli("-r", odd, "migrate", "--to", odd + b"-copy").stdout.decode()
    assert f" to {shown}-copy: copied " in line and line.count("\n") == 1, line


def test_migrate_json_names_its_destination(cli, tmp_path: Path) -> None:
    """It gave the counts, but not where the repository went."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_text("x")
    cli("init")
    cli("backup", source)
    destination = bytes(tmp_path) + b"/moved\xff"
    doc = strict_json(cli("migrate", "--to", destination, "--json").stdout)
    assert (doc["destination"], exact(doc, "destination")) == (f"{tmp_path}/moved\\xff", destination), doc
    assert doc["objects"] > 0, doc


def test_restore_refusals_name_folders_as_the_listing_does(cli, tmp_path: Path) -> None:
    """They gave a backslash in a name as it is, so that `not\\x41` read as the escape of `notA`."""
    odd = bytes(tmp_path) + b"/not\\x41"
    shown = f"{tmp_path}/not\\\\x41"
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_text("x")
    cli("-r", odd + b"-repo", "init")
    cli("-r", odd + b"-repo", "backup", source)
    with open(odd + b"-file", "wb"):
        pass
    os.mkdir(odd + b"-folder")

    refusals = {f"cannot use {shown}-file as restore target: it is not a folder": ("--target", odd + b"-file"),
                f"cannot restore into {shown}-repo/data: it is {shown}-repo (": ("--target", odd + b"-repo/data"),
                f"no snapshot of {shown}-folder in the repository": ("--in-place", odd + b"-folder")}
    for message, (option, folder) in refusals.items():
        err = cli("-r", odd + b"-repo", "restore", "latest", option, folder, check=2).stderr.decode()
        assert message in err and len(err.splitlines()) == 1, err
