"""Exit codes as scripts see them: listed once in the code and shown by --help, and with --json a
failure is a JSON object on stdout too."""

from __future__ import annotations

import json
from pathlib import Path

from backend import errors
from fsmount.cli import EXIT_CODES, exit_codes_sentence

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
