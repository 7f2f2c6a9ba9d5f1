"""Exit codes as scripts see them: listed once in the code and shown by --help, and with --json a
failure is a JSON object on stdout too."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from backend import errors
from fsmount.cli import EXIT_CODES, exit_codes_sentence

pytest_plugins = ["s3_fixtures"]

README = Path(__file__).parent.parent / "README.md"


def test_help_ends_with_every_exit_code(cli) -> None:
    lines = [line.split(None, 1) for line in cli("--help").stdout.decode().partition("Exit codes:\n")[2].splitlines()]
    assert [(int(code), meaning) for code, meaning in lines] == list(EXIT_CODES)


def test_the_readme_lists_the_exit_codes_of_the_code() -> None:
    assert exit_codes_sentence() in " ".join(README.read_text().split())


def test_every_error_class_has_its_exit_code_listed() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.FsmountError)]
    assert {c.exit_code for c in classes} <= {code for code, _ in EXIT_CODES}


def test_a_failure_with_json_is_one_json_object_on_stdout(cli, tmp_path: Path) -> None:
    for args in (("--json", "snapshots"), ("snapshots", "--json")):  # --json before or after the command
        proc = cli(*args, check=10)
        message = proc.stderr.decode().strip().removeprefix("fsmount: ")
        assert "no repository" in message  # stderr keeps the human line
        assert json.loads(proc.stdout) == {"error": message, "exit_code": 10}

    proc = cli("backup", tmp_path / "nowhere", "--json", check=2)  # a bad argument, met before --json
    assert json.loads(proc.stdout)["exit_code"] == 2
    assert json.loads(cli("--json", "bogus", check=2).stdout)["error"].startswith("No such command 'bogus'")
    assert cli("snapshots", check=10).stdout == b""  # without --json, nothing on stdout


def one_line_no_repository(proc, location: str) -> str:
    err = proc.stderr.decode()
    assert err.startswith(f"fsmount: no repository at {location}: ") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.s3
def test_a_bucket_that_does_not_exist_is_no_repository_and_init_makes_it(cli, s3_server) -> None:
    """It exited 15 (storage failed), so a script that runs `init` on exit 10 never did."""
    key_id, secret = s3_server.credentials
    cli.env.update(AWS_ENDPOINT_URL=s3_server.endpoint, AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret)
    bucket = f"t-new-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    client = s3_server.client()
    try:
        err = one_line_no_repository(cli("-r", f"s3:{bucket}/x", "snapshots", check=10), f"s3:{bucket}/x")
        assert f"bucket {bucket} does not exist" in err, err
        assert bucket not in [b["Name"] for b in client.list_buckets()["Buckets"]]
        cli("-r", f"s3:{bucket}/x", "init")
        assert cli("-r", f"s3:{bucket}/x", "snapshots").stdout == b"0 snapshots\n"
    finally:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for entry in page.get("Contents", ()):
                client.delete_object(Bucket=bucket, Key=entry["Key"])
        if bucket in [b["Name"] for b in client.list_buckets()["Buckets"]]:
            client.delete_bucket(Bucket=bucket)


def test_a_location_that_is_a_file_is_no_repository(cli, tmp_path: Path) -> None:
    """It exited 15: "reading config from FILE: Not a directory". And `init` there is refused
    as a usage error, not as a storage failure."""
    somefile = tmp_path / "somefile"
    somefile.write_text("not a repository")
    err = one_line_no_repository(cli("-r", somefile, "snapshots", check=10), str(somefile))
    assert "is a file, not a folder" in err, err
    err = cli("-r", somefile, "init", check=2).stderr.decode()
    assert "it is a file, not a folder" in err and len(err.splitlines()) == 1, err
    assert somefile.read_text() == "not a repository"


def test_replicas_none_of_which_is_there_are_no_repository(cli, tmp_path: Path) -> None:
    """Each replica a file, or one a file and one an empty place: exit 10 as for one location
    (it was 15, "no replica could serve it: ... is down", the reason lost)."""
    for name in ("f1", "f2"):
        (tmp_path / name).write_text("not a repository")
    for replicas in (("f1", "f2"), ("f1", "nothing-here")):
        args = [arg for name in replicas for arg in ("-r", tmp_path / name)]
        err = cli(*args, "snapshots", check=10).stderr.decode()
        assert f"{tmp_path / 'f1'} is a file, not a folder" in err.splitlines()[-1], err
        assert "Traceback" not in err
