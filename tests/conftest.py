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


def require_root(why: str) -> None:
    """Skip a test that needs root (to mount a tmpfs, to act as another user) outside CI; in CI,
    which runs as root, fail it rather than count a skip as a pass."""
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail(f"{why}: CI runs as root")
        pytest.skip(why)

# The suite starts `python -m fsmount` about a thousand times. Where PYTHONDONTWRITEBYTECODE is set,
# each start would compile fsmount and backend from source again (a tenth of the suite's CPU time):
# their bytecode goes to a cache in the venv instead, and the source tree stays free of __pycache__.
if (os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX")
        and sys.prefix != sys.base_prefix):
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(sys.prefix, "pycache")

# scripts/test.sh runs the tests in parallel (pytest-xdist, `-n auto --dist worksteal`); they spend
# much of their time waiting on FUSE daemons, subprocesses and the S3 server, so one worker more than
# there are cores. The longest tests start first, each on a worker of its own, so that none of them
# starts late and runs on alone after the other workers have finished.
LONGEST_FIRST = (
    "test_live_posix.py::",  # minutes: a live mount against a plain directory, hundreds of steps
    "test_point_in_time.py::test_every_restart_after_kill_9",
    "test_store_pressure.py::test_a_minute_without_the_store",
    "test_store_pressure.py::test_snapshots_land_and_verify",
    "test_point_in_time.py::test_snapshots_of_a_busy_folder",
    "test_robustness.py::test_killed_backup",
    "test_replicas.py::test_migration_to_s3",
)


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, within a container's CPU quota if any."""
    cores = len(os.sched_getaffinity(0))
    for path in ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):
        try:
            with open(path) as f:
                quota, _, period = f.read().partition(" ")
            if path.endswith("quota_us"):
                with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
                    period = f.read()
            if quota.strip() not in ("max", "-1"):
                cores = min(cores, max(1, -(-int(quota) // int(period))))
        except (OSError, ValueError):
            pass
    return cores


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown under `-p no:xdist`
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    return usable_cores() + 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest tests first, dealt out to the workers in turn.

    `--dist worksteal` hands each of W workers a contiguous share of the collection, and a worker
    with nothing left takes tests from the end of the longest queue; so the k-th longest test goes
    to the head of share k mod W. In one process (W = 1) that is simply the longest first. Every
    other test keeps pytest's order."""
    def rank(item: pytest.Item) -> int:
        nodeid = item.nodeid.rpartition("/")[2]
        return next((i for i, prefix in enumerate(LONGEST_FIRST) if nodeid.startswith(prefix)), len(LONGEST_FIRST))
    longest = sorted((item for item in items if rank(item) < len(LONGEST_FIRST)), key=rank)
    others = [item for item in items if rank(item) == len(LONGEST_FIRST)]
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    shares: list[list[pytest.Item]] = [longest[w::workers] for w in range(workers)]
    left = len(items)
    for w, share in enumerate(shares):  # the shares as worksteal cuts them: left // workers remaining
        size = left // (workers - w)
        left -= size
        take = max(0, size - len(share))
        share += others[:take]
        del others[:take]
    items[:] = [item for share in shares for item in share] + others


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
                              capture_output=True, check=False, **kwargs)
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
