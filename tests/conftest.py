"""Fixtures shared by every test: an isolated cache and repository, and the CLI as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from backend.repository import Repository
from backend.stores import LocalStore

PASSPHRASE = "correct horse battery staple"
TEST_BLOCK_SIZE = 64 * 1024
IN_CI = bool(os.environ.get("CI"))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own XDG cache, as if on a machine of its own."""
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


@pytest.fixture
def repo_path(tmp_path: Path) -> Path:
    return tmp_path / "repo"


@pytest.fixture
def repo(repo_path: Path):
    with Repository.init(LocalStore(repo_path), PASSPHRASE.encode(), block_size=TEST_BLOCK_SIZE) as r:
        yield r


@dataclass
class Cli:
    """Runs `fsmount` in a subprocess, as a user would, against one repository."""

    env: dict[str, str]

    def __call__(self, *args: str | os.PathLike, check: int | None = 0, prefix: tuple[str, ...] = (),
                 **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run([*prefix, sys.executable, "-m", "fsmount", *map(os.fspath, args)], env=self.env,
                              capture_output=True, **kwargs)
        assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
        if check is not None:
            assert proc.returncode == check, (
                f"fsmount {' '.join(map(str, args))} exited {proc.returncode}, expected {check}\n"
                f"stdout: {proc.stdout.decode(errors='replace')}\nstderr: {proc.stderr.decode(errors='replace')}")
        return proc

    def popen(self, *args: str | os.PathLike, **kwargs) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "fsmount", *map(os.fspath, args)], env=self.env, **kwargs)


@pytest.fixture
def cli(repo_path: Path, isolated_cache: Path) -> Cli:
    env = dict(os.environ, FSMOUNT_REPOSITORY=str(repo_path), FSMOUNT_PASSWORD=PASSPHRASE,
               XDG_CACHE_HOME=str(isolated_cache), COLUMNS="200")
    env.pop("FSMOUNT_PASSWORD_FILE", None)
    return Cli(env)
