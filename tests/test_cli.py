"""The `fsmount` command as a user and a script see it: output, JSON, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import require_root
from treecompare import describe, differences

pytest_plugins = ["s3_fixtures"]

# root reads everything; dropping these capabilities makes permissions bite, as for any user
WITHOUT_DAC_OVERRIDE = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")


def make_source(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "hello.txt").write_text("hello\n")
    (root / "sub" / b"\xff-not-utf8".decode(errors="surrogateescape")).write_bytes(os.urandom(100_000))
    return root


def test_init_backup_snapshots_ls_restore_verify(cli, tmp_path: Path) -> None:
    source = make_source(tmp_path / "src")
    cli("init", "--block-size", "64K")
    cli("backup", source, "--tag", "daily", "--tag", "test")
    (source / "hello.txt").write_text("hello again\n")
    out = cli("backup", source, "--json").stdout
    second = json.loads(out)
    assert second["stats"]["files_changed"] == 1 and second["stats"]["files_unchanged"] == 1

    snapshots = json.loads(cli("snapshots", "--json").stdout)
    assert len(snapshots) == 2
    assert snapshots[0]["tags"] == ["daily", "test"]
    assert snapshots[1]["parent"] == snapshots[0]["id"]
    for key in ("id", "time", "host", "source", "tags", "stats"):
        assert key in snapshots[0]
    assert {"files", "size", "bytes_added"} <= snapshots[0]["stats"].keys()

    listing = json.loads(cli("ls", "latest", "--json").stdout)
    assert [e["path"] for e in listing] == ["/hello.txt", "/sub", "/sub/\\xff-not-utf8"]
    human = cli("ls", snapshots[0]["short_id"]).stdout.decode()
    assert "/hello.txt" in human and "/sub/\\xff-not-utf8" in human

    cli("restore", "latest", "--target", tmp_path / "restored")
    assert differences(source, tmp_path / "restored") == []
    cli("restore", snapshots[0]["id"][:10], "--target", tmp_path / "old", "hello.txt")
    assert (tmp_path / "old" / "hello.txt").read_text() == "hello\n"
    assert cli("verify", "--read-data").returncode == 0


def test_second_init_refuses(cli) -> None:
    cli("init")
    proc = cli("init", check=1)  # not 10, which says there is no repository
    assert proc.stderr.decode().strip() == f"fsmount: a repository already exists at {cli.env['FSMOUNT_REPOSITORY']}"


def test_wrong_passphrase_is_one_line_exit_12(cli) -> None:
    cli("init")
    cli.env["FSMOUNT_PASSWORD"] = "not the passphrase"
    proc = cli("snapshots", check=12)
    assert proc.stderr.decode().count("\n") == 1 and "wrong passphrase" in proc.stderr.decode()


def test_no_repository_exit_10(cli) -> None:
    proc = cli("snapshots", check=10)
    assert "no repository at" in proc.stderr.decode()


def test_newer_format_exit_13(cli, repo_path: Path) -> None:
    cli("init")
    config = json.loads((repo_path / "config").read_text())
    config["version"] = 99
    (repo_path / "config").write_text(json.dumps(config))
    proc = cli("snapshots", check=13)
    assert "newer than this fsmount supports" in proc.stderr.decode()


def test_password_file_and_missing_password(cli, tmp_path: Path) -> None:
    secret = tmp_path / "pass"
    secret.write_text(cli.env.pop("FSMOUNT_PASSWORD") + "\n")
    cli("--password-file", secret, "init")
    cli.env["FSMOUNT_PASSWORD_FILE"] = str(secret)
    cli("snapshots")
    del cli.env["FSMOUNT_PASSWORD_FILE"]
    proc = cli("snapshots", check=2, stdin=subprocess.DEVNULL)
    assert "no passphrase" in proc.stderr.decode()
    # piped in, as restic reads it
    cli("snapshots", input=secret.read_bytes())
    cli("snapshots", input=b"wrong\n", check=12)


def test_a_cache_folder_that_cannot_be_used_is_one_line(cli, tmp_path: Path) -> None:
    cli("init")
    (tmp_path / "a-file").write_text("")
    for folder in (tmp_path / "a-file", tmp_path / "a-file" / "below"):
        err = cli("--cache-dir", folder, "snapshots", check=2).stderr.decode()
        assert "cannot use the cache folder" in err and len(err.strip().splitlines()) == 1, err
    err = cli("-r", tmp_path / "other", "--cache-dir", tmp_path / "a-file", "init", check=2).stderr.decode()
    assert "cannot use the cache folder" in err, err


def test_quiet_and_verbose_after_the_command_and_sigterm(cli, tmp_path: Path) -> None:
    source = make_source(tmp_path / "src")
    cli("init", "-q")
    assert cli("backup", source, "-q").stdout == b""
    err = cli("backup", source, "-vv").stderr.decode()
    assert "backing up" in err and "parent snapshot" in err, err
    (source / "new.txt").write_text("x")
    assert "new new.txt" in cli("backup", source, "-vv").stderr.decode()
    # SIGTERM ends a command with a message and 128 + 15, as Ctrl-C ends it with 130 (it died
    # by the signal, without a word); here the command waits for its passphrase on stdin
    del cli.env["FSMOUNT_PASSWORD"]
    proc = cli.popen("snapshots", stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1)
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and b"terminated" in err and b"Traceback" not in err, err


def test_usage_errors_exit_2(cli, tmp_path: Path) -> None:
    cli("init")
    assert "no snapshots yet" in cli("ls", "latest", check=2).stderr.decode()
    assert "give exactly one of" in cli("restore", "latest", check=2).stderr.decode()
    assert "not a snapshot id" in cli("restore", "zz", "--target", tmp_path, check=2).stderr.decode()
    cli("init", "--block-size", "3K", check=2)
    cli("backup", make_source(tmp_path / "src"))
    assert "need a folder" in cli("restore", "latest", "--target", "", check=2).stderr.decode()
    for every in ("0", "-5m", "soon"):
        err = cli("mount", tmp_path / "src", "--every", every, check=2).stderr.decode()
        assert "is not a duration" in err and "fsmount mount --help" in err
        assert len(err.splitlines()) == 1, err  # click's usage errors took four lines
    assert cli("bogus", check=2).stderr.decode() == "fsmount: No such command 'bogus' (see `fsmount --help`)\n"


def test_unreadable_file_is_a_warning_exit_3(cli, tmp_path: Path) -> None:
    """Without the capability to override permissions, a mode-000 file really is unreadable."""
    source = make_source(tmp_path / "src")
    (source / "secret").write_text("no")
    (source / "secret").chmod(0)
    cli("init")

    proc = cli("backup", source, check=3, prefix=WITHOUT_DAC_OVERRIDE)

    assert "secret: cannot read: Permission denied" in proc.stderr.decode()
    listing = [e["path"] for e in json.loads(cli("ls", "latest", "--json").stdout)]
    assert "/hello.txt" in listing and "/secret" not in listing


def test_help_teaches_every_command(cli) -> None:
    top = cli("--help").stdout.decode()
    for command in ("init", "backup", "snapshots", "ls", "restore", "verify"):
        assert command in top
        text = cli(command, "--help").stdout.decode()
        assert "Usage: " in text and len(text.splitlines()) > 5


def test_every_command_is_where_the_lazy_group_looks_for_it() -> None:
    # The CLI imports a command's module only when it runs, from a name -> module map: a command
    # added to a module's COMMANDS but not to the map would be missing from `fsmount` altogether.
    import importlib
    import pkgutil

    import fsmount.commands
    from fsmount.commands import COMMAND_MODULES

    defined = {}
    for module_info in pkgutil.iter_modules(fsmount.commands.__path__):
        module = importlib.import_module(f"fsmount.commands.{module_info.name}")
        defined |= {command.name: module_info.name for command in getattr(module, "COMMANDS", [])}
    assert defined == COMMAND_MODULES


def test_a_repository_inside_the_folder_is_neither_backed_up_nor_deleted_by_restore(cli, tmp_path: Path) -> None:
    folder = make_source(tmp_path / "home")
    cli.env.pop("FSMOUNT_REPOSITORY")
    replicas = ("-r", folder / "deep" / "backups" / "a", "-r", folder / "b")  # both replicas inside it
    cli(*replicas, "init")
    cli(*replicas, "backup", folder)
    listed = [e["path"] for e in json.loads(cli(*replicas, "ls", "latest", "--json").stdout)]
    assert "/hello.txt" in listed and not any(p.startswith(("/deep/backups/a", "/b")) for p in listed)

    (folder / "added later.txt").write_text("not in the snapshot\n")
    cli(*replicas, "restore", "latest", "--in-place", folder, "--delete")
    assert not (folder / "added later.txt").exists()  # --delete did its job...
    cli(*replicas, "verify", "--read-data")  # ...and left the repository, and the folders holding it

    for target in (folder / "b", folder / "b" / "restored"):  # among the repository's own objects
        err = cli(*replicas, "restore", "latest", "--in-place", target, "--delete", check=2).stderr
        assert b"(the repository or its cache) or inside it" in err
    cli(*replicas, "verify", "--read-data")


def test_ls_shows_one_entry_per_line_whatever_the_names(cli, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "two\nlines").write_text("x")
    (source / "tab\there").write_text("x")
    cli("init")
    cli("backup", source)
    assert cli("ls", "latest").stdout.decode().splitlines() == ["/tab\\there", "/two\\nlines"]
    assert [e["path"] for e in json.loads(cli("ls", "latest", "--json").stdout)] == ["/tab\\there", "/two\\nlines"]


@pytest.mark.parametrize("location", ["s3:", "s3:ab/x", "s3:Bad_Bucket/x", "s3:probe/../etc",
                                      "s3:http://127.0.0.1:notaport/b/x", "s3:http://host", "s3:ftp://host/b/x"])
def test_a_malformed_s3_location_is_a_usage_error(cli, location: str) -> None:
    """They went to the server (or botocore) and came back as storage failures (exit 15), one as
    a multi-line validation error."""
    err = cli("-r", location, "snapshots", check=2).stderr.decode()
    assert err.startswith(f"fsmount: {location}: ") and len(err.splitlines()) == 1, err


def test_a_name_as_ls_shows_it_restores_the_file(cli, tmp_path: Path) -> None:
    """`ls` escapes what a terminal cannot show; `restore` took only the raw bytes, and a name
    holding a literal backslash printed exactly like an escaped byte."""
    source = tmp_path / "src"
    source.mkdir()
    names = [b"bad\xff\xfe", b"new\nline", b"q\\xfe", b"q\xfe"]
    for i, name in enumerate(names):
        with open(bytes(source) + b"/" + name, "wb") as f:
            f.write(b"%d" % i)
    cli("init")
    cli("backup", source)
    shown = [line.lstrip("/") for line in cli("ls", "latest").stdout.decode().splitlines()]
    assert len(set(shown)) == len(names), shown  # no two names print alike
    cli("restore", "latest", "--target", tmp_path / "r", *[s for s in shown if s])
    for i, name in enumerate(names):
        with open(bytes(tmp_path / "r") + b"/" + name, "rb") as f:
            assert f.read() == b"%d" % i


def test_ls_takes_a_name_as_listed_or_typed_and_json_tells_bytes_from_escapes(cli, tmp_path: Path) -> None:
    """`ls PATH` took only the typed form, and --json printed `x\\xff` for both the byte and the
    four characters."""
    source = tmp_path / "src"
    source.mkdir()
    for name in (b"x\xff", b"x\\xff", b"lit\\x41", b"plain\nnl"):
        (source / os.fsdecode(name)).write_bytes(name)
    cli("init")
    cli("backup", source)
    listing = json.loads(cli("ls", "latest", "--json").stdout)
    exact = {bytes.fromhex(e["path_hex"]) if "path_hex" in e else e["path"].encode() for e in listing}
    assert exact == {b"/x\xff", b"/x\\xff", b"/lit\\x41", b"/plain\nnl"}
    for given, expected in (("lit\\x41", b"/lit\\x41"), ("lit\\\\x41", b"/lit\\x41"), ("plain\\nnl", b"/plain\nnl"),
                            ("plain\nnl", b"/plain\nnl")):
        shown = cli("ls", "latest", given, "--json").stdout
        assert [bytes.fromhex(e["path_hex"]) for e in json.loads(shown)] == [expected], given
    for given, expected in (("x\\xff", b"/x\xff"), ("x\\\\xff", b"/x\\xff")):  # as listed: the byte, the characters
        [entry] = json.loads(cli("ls", "latest", given, "--json").stdout)
        assert (entry["path"], bytes.fromhex(entry["path_hex"])) == ("/" + given, expected), given


def test_tags_split_on_commas_and_a_hard_link_counts_as_new(cli, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "a").write_text("a")
    os.link(source / "a", source / "b")
    cli("init")
    stats = json.loads(cli("backup", source, "--tag", "x,y", "--tag", "z", "--json").stdout)["stats"]
    assert (stats["files_new"], stats["files_unchanged"]) == (2, 0)  # it said "1 unchanged" of a first backup
    assert json.loads(cli("snapshots", "--json").stdout)[0]["tags"] == ["x", "y", "z"]
    assert "may not be empty" in cli("backup", source, "--tag", "", check=2).stderr.decode()


def test_a_snapshot_is_found_by_its_name(cli, tmp_path: Path) -> None:
    """`.snapshots/NAME` and `fsmount snapshots` show names, and `ls` / `restore` refused them."""
    source = make_source(tmp_path / "src")
    cli("init")
    cli("backup", source, "--name", "before-refactor")
    assert b"/hello.txt" in cli("ls", "before-refactor").stdout
    assert "not a snapshot id, name nor folder name" in cli("ls", "no-such", check=2).stderr.decode()


def test_names_ls_would_read_otherwise_or_taken_already_are_refused(cli, tmp_path: Path) -> None:
    source = make_source(tmp_path / "src")
    cli("init")
    for name in ("latest", "beef", "0123abcd"):
        assert "would be read as" in cli("backup", source, "--name", name, check=2).stderr.decode()
    cli("backup", source, "--name", "daily")
    assert 'named "daily" already' in cli("backup", source, "--name", "daily", check=2).stderr.decode()
    assert len(json.loads(cli("snapshots", "--json").stdout)) == 1


def test_a_folder_backed_up_through_a_symlink_is_recorded_by_its_real_path(cli, tmp_path: Path) -> None:
    """`backup link` and `backup real` were two folders: no parent for each other, and
    `restore latest --in-place real` took an older snapshot."""
    source = make_source(tmp_path / "real")
    os.symlink(source, tmp_path / "link")
    cli("init")
    cli("backup", tmp_path / "link")
    again = json.loads(cli("backup", source, "--json").stdout)
    assert again["source"] == str(source) and again["parent"] is not None


def test_small_path_and_flag_forms(cli, tmp_path: Path) -> None:
    """`ls latest ./hello.txt` printed `/./hello.txt`; `-v -q` still printed the info lines;
    `--target` a plain file said "File exists"."""
    source = make_source(tmp_path / "src")
    cli("init")
    cli("backup", source)
    assert cli("ls", "latest", "./sub//").stdout.decode().splitlines()[0] == "/sub/"
    for flags in (("-v", "-q"), ("-q", "-v")):
        assert cli("backup", source, *flags).stderr == b"", flags
    (tmp_path / "a-file").write_text("")
    err = cli("restore", "latest", "--target", tmp_path / "a-file", check=2).stderr.decode()
    assert "not a folder" in err, err


def test_sockets_fifos_and_devices_come_back_as_cp_a_makes_them(cli, tmp_path: Path) -> None:
    require_root("device files and other owners need root")
    meta = tmp_path / "source" / "meta"
    meta.mkdir(parents=True)
    os.mknod(meta / "sock", stat.S_IFSOCK | 0o755)  # what bind() leaves behind
    os.mkfifo(meta / "fifo", 0o640)
    os.mknod(meta / "chardev", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(meta / "blockdev", stat.S_IFBLK | 0o660, os.makedev(7, 250))
    for i, name in enumerate(("sock", "fifo", "chardev", "blockdev")):
        os.chown(meta / name, 1000 + i, 2000 + i)
        os.utime(meta / name, ns=(1_600_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + i))
    cli("init")
    cli("backup", tmp_path / "source")
    copied = tmp_path / "copied"
    subprocess.run(["cp", "-a", tmp_path / "source", copied], check=True)

    cli("restore", "latest", "--target", tmp_path / "one", "meta/sock")  # exit 0: nothing left out
    restored = describe(bytes(tmp_path / "one"))
    assert restored[b"meta/sock"] == describe(bytes(copied))[b"meta/sock"]  # mode, owner, time
    assert restored[b"meta/sock"]["type"] == stat.S_IFSOCK
    cli("restore", "latest", "--target", tmp_path / "all")
    assert sorted(os.listdir(tmp_path / "all" / "meta")) == ["blockdev", "chardev", "fifo", "sock"]
    assert differences(copied, tmp_path / "all") == []


def test_an_error_naming_a_path_is_one_line_with_its_bytes_as_ls_shows_them(cli, tmp_path: Path) -> None:
    """A newline in a path split the error over two lines, and a byte that is not UTF-8 showed as
    `\\udcff` on stderr (Python's escape of a lone surrogate, which no tool reads back)."""
    missing = bytes(tmp_path) + b"/no\nrepo\xff"
    err = cli("-r", missing, "snapshots", check=10).stderr.decode()
    assert err == f"fsmount: no repository at {tmp_path}/no\\nrepo\\xff (run `fsmount init` first)\n", err
    doc = json.loads(cli("-r", missing, "--json", "snapshots", check=10).stdout)
    assert doc == {"error": err.removeprefix("fsmount: ").rstrip("\n"), "exit_code": 10}


@pytest.mark.parametrize("location", ["", "local:", "sftp:host:/srv/repo", "rest:http://host:8000/",
                                      "https://s3.example.net/bucket/repo"])
def test_an_empty_or_foreign_location_is_refused_and_nothing_is_made(cli, tmp_path: Path, location: str) -> None:
    """`-r ""` (an unset variable) made the repository in the working directory, and a restic
    location such as `sftp:host:/srv` a local folder `sftp:host:` there."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    err = cli("-r", location, "init", check=2, cwd=workdir).stderr.decode()
    assert len(err.splitlines()) == 1 and ("is empty" in err or "fsmount has no" in err), err
    assert os.listdir(workdir) == []


def test_a_path_ls_cannot_find_is_named_as_ls_shows_paths(cli, tmp_path: Path) -> None:
    """The error showed a byte that is not UTF-8 as U+FFFD (`no\\ufffdpe` in --json) and a
    backslash as one, so it named neither what was typed nor what `ls` lists."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "file").write_text("x")
    cli("init")
    cli("backup", source)
    err = cli("ls", "latest", b"no\xffpe", check=2).stderr.decode(errors="strict")
    assert err.startswith("fsmount: no\\xffpe: no such path in snapshot "), err
    doc = json.loads(cli("ls", "latest", b"no\xffpe", "--json", check=2).stdout)
    assert doc["error"].startswith("no\\xffpe: no such path"), doc
    err = cli("ls", "latest", b"file/a\\b", check=2).stderr.decode(errors="strict")
    assert err.startswith("fsmount: file/a\\\\b: not a directory in the snapshot"), err


def test_snapshots_of_an_empty_repository_prints_only_the_count(cli) -> None:
    """It printed the table's header, with no row under it, before the count."""
    cli("init")
    assert cli("snapshots").stdout.decode() == "0 snapshots\n"


def _snapshot_listings(stderr: bytes) -> int:
    """How many listings of snapshots/ botocore's request log (-vvv) shows."""
    return sum(1 for line in stderr.splitlines()
               if b"ListObjectsV2" in line and b"Making request" in line and b"snapshots/" in line)


@pytest.mark.s3
def test_an_id_that_matches_no_snapshot_lists_the_snapshots_once(cli, tmp_path: Path, s3_bucket) -> None:
    """An id-like reference that matched no id listed snapshots/ again to look for it as a name:
    a second listing of a remote store, which pages through every snapshot."""
    key_id, secret = s3_bucket.server.credentials
    cli.env.update(FSMOUNT_REPOSITORY=s3_bucket.location(), AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret)
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_text("x")
    cli("init")
    cli("backup", source)
    proc = cli("-vvv", "ls", "0000", check=2)
    assert b"no snapshot with id 0000" in proc.stderr, proc.stderr[-2000:]
    assert _snapshot_listings(proc.stderr) == 1, [line for line in proc.stderr.splitlines() if b"ListObjectsV2" in line]


@pytest.mark.s3
def test_migrate_names_its_destination_without_the_secret_of_its_url(cli, tmp_path: Path, s3_bucket) -> None:
    """The line that said where the repository went repeated the location as typed, with the
    access key and secret of an s3:http://KEY:SECRET@HOST/... URL in it."""
    key_id, secret = s3_bucket.server.credentials
    cli.env.update(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret)
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_text("x")
    cli("init")
    cli("backup", source)
    endpoint = s3_bucket.server.endpoint.removeprefix("http://")
    proc = cli("migrate", "--to", f"s3:http://{key_id}:{secret}@{endpoint}/{s3_bucket.name}/moved")
    assert f" to {s3_bucket.location('moved')}: copied " in proc.stdout.decode(), proc.stdout
    assert secret.encode() not in proc.stdout + proc.stderr


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
@pytest.mark.parametrize("value", ["notaurl", "http://", "ftp://host", "http://[::1"])
def test_a_malformed_endpoint_setting_is_a_usage_error_naming_it(cli, variable: str, value: str) -> None:
    """It was a storage failure (exit 15) of `s3:bucket`, with botocore's "Invalid endpoint"."""
    cli.env.update(AWS_ACCESS_KEY_ID="id", AWS_SECRET_ACCESS_KEY="secret", **{variable: value})
    err = cli("-r", "s3:bucket/x", "snapshots", check=2).stderr.decode()
    assert err == f'fsmount: {variable} is not an endpoint URL: "{value}" (give http(s)://HOST[:PORT])\n', err


@pytest.mark.parametrize(("url", "says"), [
    ("http://KEY:SECRET@host:abc/bucket", "s3:http://host:abc/bucket: the endpoint's port is not a number"),
    ("http://KEY:SECRET@host/B_ad", 's3:http://host/B_ad: "B_ad" is not a bucket name'),
    ("http://KEY:SECRET@host/bucket/../x", "s3:http://host/bucket/../x: a prefix may not hold `..`"),
    ("http://KEY:SECRET@[::1/bucket", "s3:http://[::1/bucket: the endpoint's host is malformed"),
])
def test_a_malformed_s3_url_is_a_usage_error_without_its_secret(cli, url: str, says: str) -> None:
    """An unclosed IPv6 bracket was a ValueError traceback; the other errors repeated KEY:SECRET."""
    err = cli("-r", f"s3:{url}", "snapshots", check=2).stderr.decode()
    assert err.startswith(f"fsmount: {says}"), err
    assert "SECRET" not in err and err.count("\n") == 1, err
