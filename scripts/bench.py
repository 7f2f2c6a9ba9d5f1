#!/usr/bin/env python3
"""fsmount's benchmarks: figures as ratios against a baseline measured in the same run.

These machines are shared and noisy, so absolute times mean little; every figure is put next to a
baseline taken minutes apart on the same disk: restic and borg for the engine, the native folder
for the live mount. Page caches are dropped before each timed read phase when we may (root).

Restored and copied trees are deleted only with the work directory, when the run ends. ext4
does not hand out again an inode freed in the last minute (five, while its inode table block is
dirty), and each new file scans past every such inode of its block group (`recently_deleted` in
perf): right after deleting a 13k-file restore, creating the next one cost 1.3 ms per file instead
of 0.3 ms, so whichever tool went second was timed at half speed. A run started within minutes of
deleting many files (a test suite, an earlier run) is slowed the same way.

Groups (`--only GROUP`, repeatable; default all):

  engine   A seeded dataset (a home-folder mix: a few large files, thousands of small ones, mostly
           incompressible) and a seeded 0.1% mutation (scattered 4 KiB overwrites, appends, small
           rewrites, new and deleted files). For fsmount, restic and borg: full backup, backup after
           the mutation, no-change backup, restore, and verify reading all data. Wall time,
           throughput, peak RSS of the tool's process, repository growth.
  browse   The snapshot mount: `cp -a` of a whole snapshot out of it against `fsmount restore` and
           `restic restore`; `find` and `ls -lR` of it, cold and warm; the mount's peak RSS.
  s3       The repository on a local SeaweedFS S3 server against local disk: backup and restore;
           `fsmount migrate` local -> S3 and S3 -> S3 against `aws s3 sync` of the same objects
           (awscli, if installed).
  pressure A writer's 4 KiB write latency while a snapshot of 1,000 dirty files is taken, against
           the same without a snapshot; remount time after kill -9 with 10,000 dirty files.
  scale    No-change snapshots (`mkdir .snapshots/NAME`) of a live mount holding 28k and 280k files.
  live     The live mount against the native folder: sequential write and read of a large file,
           4 KiB random writes with fsync, create/stat/unlink of small files, a `git status`-like
           stat walk, untar of a source tree; then the change tracker: the same 0.1% mutation made
           through the mount, snapshot time and repository growth, against `restic backup`.

  .venv/bin/python scripts/bench.py --size-gib 1 [--only engine] [--json results.json] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parent.parent
FSMOUNT = [sys.executable, "-m", "fsmount"]
PASSWORD = "bench passphrase"
MiB = 1 << 20


@dataclass
class Row:
    group: str
    tool: str
    phase: str
    seconds: float
    bytes: int = 0
    peak_rss_mib: float = 0.0
    growth_bytes: int | None = None
    note: str = ""

    @property
    def mb_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds and self.bytes else 0.0


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    checks: list[tuple[str, bool | None, str]] = field(default_factory=list)  # None: a figure, no target

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(f"  {row.group:6} {row.tool:8} {row.phase:24} {row.seconds:8.2f} s"
              + (f" {row.mb_s:8.1f} MB/s" if row.bytes else "")
              + (f"  rss {row.peak_rss_mib:6.0f} MiB" if row.peak_rss_mib else "")
              + (f"  +{row.growth_bytes / MiB:8.2f} MiB" if row.growth_bytes is not None else "")
              + (f"  {row.note}" if row.note else ""), flush=True)
        return row

    def get(self, group: str, tool: str, phase: str) -> Row | None:
        return next((r for r in self.rows if (r.group, r.tool, r.phase) == (group, tool, phase)), None)

    def check(self, name: str, ok: bool | None, detail: str) -> None:
        self.checks.append((name, ok, detail))


# -- measuring ----------------------------------------------------------------------------------

def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run(cmd: list[str], env: dict, cwd: Path | None = None) -> tuple[float, float]:
    """Run a command to completion: (wall seconds, peak RSS MiB of the process)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.monotonic() - started
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {code}: {stderr.strip()[-500:]}")
    return elapsed, usage.ru_maxrss / 1024


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            digest.update(os.fsencode(path.relative_to(root)))
            with open(path, "rb") as f:  # streamed: this process's RSS is inherited by every child
                digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


# -- data ---------------------------------------------------------------------------------------

def make_dataset(root: Path, size: int, seed: int = 42) -> None:
    """~60% in 4 large files, the rest in small files (1-64 KiB) in nested dirs, ~10% text."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    large = int(size * 0.6) // 4
    for i in range(4):
        with open(root / f"media-{i}.bin", "wb") as f:
            f.writelines(rng.randbytes(MiB) for _ in range(large // MiB))
    left, n = size - 4 * large, 0
    while left > 0:
        d = root / "projects" / f"p{n // 500:03d}" / f"d{n // 50 % 10}"
        d.mkdir(parents=True, exist_ok=True)
        length = min(left, rng.randint(1024, 64 * 1024))
        if n % 10 == 0:
            words = [rng.choice(["alpha", "beta", "gamma", "def", "return", "import", "class"]) for _ in range(length // 6)]
            data = " ".join(words).encode()[:length]
        else:
            data = rng.randbytes(length)
        (d / f"file{n}.dat").write_bytes(data)
        left -= length
        n += 1


def mutate(root: Path, seed: int = 7) -> int:
    """The 0.1% mutation; returns the bytes it changed."""
    rng = random.Random(seed)
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    budget, changed = total // 1000, 0
    large = sorted(root.glob("media-*.bin"))
    small = sorted(root.rglob("*.dat"))
    while changed < budget * 0.6:  # scattered 4 KiB overwrites in large files
        path = rng.choice(large)
        with open(path, "r+b") as f:
            f.seek(rng.randrange(0, path.stat().st_size - 4096) & ~4095)
            f.write(rng.randbytes(4096))
        changed += 4096
    with open(large[0], "ab") as f:  # an append
        f.write(rng.randbytes(64 * 1024))
        changed += 64 * 1024
    for path in rng.sample(small, 20):  # small rewrites
        path.write_bytes(rng.randbytes(path.stat().st_size))
        changed += path.stat().st_size
    for path in rng.sample(small, 10):
        path.unlink()
    for i in range(10):
        (root / "projects" / f"new-{i}.dat").write_bytes(rng.randbytes(8192))
        changed += 8192
    return changed


# -- the engine group ---------------------------------------------------------------------------

class Tool:
    name = ""
    argv_backup: ClassVar[list[str]] = []

    def __init__(self, work: Path):
        self.repo = work / f"repo-{self.name}"
        self.env = dict(os.environ, XDG_CACHE_HOME=str(work / f"cache-{self.name}"))

    def available(self) -> bool:
        return True


class Fsmount(Tool):
    name = "fsmount"

    def __init__(self, work: Path):
        super().__init__(work)
        self.env.update(FSMOUNT_REPOSITORY=str(self.repo), FSMOUNT_PASSWORD=PASSWORD, PYTHONPATH=str(ROOT))

    def init(self) -> list[str]: return [*FSMOUNT, "-q", "init"]
    def backup(self, src: Path) -> list[str]: return [*FSMOUNT, "-q", "backup", str(src)]
    def restore(self, dst: Path) -> list[str]: return [*FSMOUNT, "-q", "restore", "latest", "--target", str(dst)]
    def verify(self) -> list[str]: return [*FSMOUNT, "-q", "verify", "--read-data"]


class Restic(Tool):
    name = "restic"

    def __init__(self, work: Path):
        super().__init__(work)
        self.env.update(RESTIC_REPOSITORY=str(self.repo), RESTIC_PASSWORD=PASSWORD)

    def available(self) -> bool: return shutil.which("restic") is not None
    def init(self) -> list[str]: return ["restic", "-q", "init"]
    def backup(self, src: Path) -> list[str]: return ["restic", "-q", "backup", str(src)]
    def restore(self, dst: Path) -> list[str]: return ["restic", "-q", "restore", "latest", "--target", str(dst)]
    def verify(self) -> list[str]: return ["restic", "-q", "check", "--read-data"]


class Borg(Tool):
    name = "borg"

    def __init__(self, work: Path):
        super().__init__(work)
        self.env.update(BORG_PASSPHRASE=PASSWORD, BORG_REPO=str(self.repo), BORG_BASE_DIR=str(work / "borg-base"),
                        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes")
        self.count = 0

    def available(self) -> bool: return shutil.which("borg") is not None
    def init(self) -> list[str]: return ["borg", "init", "-e", "repokey-blake2"]

    def backup(self, src: Path) -> list[str]:
        self.count += 1
        return ["borg", "create", "--compression", "zstd,3", f"::b{self.count}", str(src)]

    def restore(self, dst: Path) -> list[str]:
        dst.mkdir(parents=True, exist_ok=True)
        return ["sh", "-c", f'cd "{dst}" && borg extract ::b{self.count}']

    def verify(self) -> list[str]: return ["borg", "check", "--verify-data"]


def bench_engine(work: Path, size: int, results: Results) -> None:
    source = work / "dataset"
    print(f"engine: generating {size / MiB:.0f} MiB dataset", flush=True)
    make_dataset(source, size)
    tools = [t for t in (Fsmount(work), Restic(work), Borg(work)) if t.available() or print(f"  {t.name}: not installed, skipped")]
    for tool in tools:
        run(tool.init(), tool.env)
    cached = drop_caches()
    if not cached:
        print("  (page cache not dropped: not root; read phases may be warm)")
    for phase in ("full backup", "after 0.1% mutation", "no-change backup"):
        if phase == "after 0.1% mutation":
            changed = mutate(source)
            print(f"  mutation: {changed / MiB:.2f} MiB changed", flush=True)
        for tool in tools:
            before = du(tool.repo)
            drop_caches()
            seconds, rss = run(tool.backup(source), tool.env)
            results.add(Row("engine", tool.name, phase, seconds, size if phase == "full backup" else 0,
                            rss, du(tool.repo) - before))
    expected = tree_digest(source)
    for tool in tools:
        target = work / f"restored-{tool.name}"
        drop_caches()
        seconds, rss = run(tool.restore(target), tool.env)
        restored = target / source.relative_to("/") if tool.name != "fsmount" else target
        ok = tree_digest(restored) == expected
        results.add(Row("engine", tool.name, "restore", seconds, size, rss, note="" if ok else "RESTORE DIFFERS"))
        if tool.name == "fsmount" and not ok:
            raise SystemExit("fsmount restored something other than the source: the benchmark stops here")
        drop_caches()
        seconds, rss = run(tool.verify(), tool.env)
        results.add(Row("engine", tool.name, "verify (read all data)", seconds, du(tool.repo), rss))
    if any(t.name == "restic" for t in tools):
        full_f, full_r = results.get("engine", "fsmount", "full backup"), results.get("engine", "restic", "full backup")
        mut_f, mut_r = (results.get("engine", t, "after 0.1% mutation") for t in ("fsmount", "restic"))
        nc_f, nc_r = (results.get("engine", t, "no-change backup") for t in ("fsmount", "restic"))
        speed = full_r.seconds / full_f.seconds
        growth = mut_f.growth_bytes / max(1, mut_r.growth_bytes)
        results.check("full backup throughput >= 1.2x restic", speed >= 1.2, f"{speed:.2f}x")
        results.check("growth after mutation <= 1/6 of restic's", growth <= 1 / 6, f"{growth:.3f}x")
        results.check("no-change backup no slower than restic", nc_f.seconds <= nc_r.seconds,
                      f"{nc_f.seconds:.2f} s vs {nc_r.seconds:.2f} s")
    peak = max(r.peak_rss_mib for r in results.rows if r.tool == "fsmount" and r.group == "engine")
    results.check("fsmount peak RSS <= 300 MiB", peak <= 300, f"{peak:.0f} MiB")


# -- the s3 group -------------------------------------------------------------------------------

def _cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_s3(work: Path, size: int, results: Results) -> None:
    """The repository on SeaweedFS (S3 over HTTP on 127.0.0.1) against local disk; migration
    against `aws s3 sync` of the same objects."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from s3_server import SeaweedServer

    source = work / "dataset"
    print(f"s3: generating {size / MiB:.0f} MiB dataset", flush=True)
    make_dataset(source, size, seed=13)
    server = SeaweedServer(work / "weed")
    server.start()
    try:
        key_id, secret = server.credentials
        s3_env = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1"}
        local, remote = Fsmount(work), Fsmount(work)
        local.env.update(s3_env)  # the destination of its migration
        remote.env.update(s3_env, FSMOUNT_REPOSITORY=f"s3:{server.endpoint}/bench/repo",
                          XDG_CACHE_HOME=str(work / "cache-s3"))
        for name, tool in (("local disk", local), ("S3", remote)):
            run(tool.init(), tool.env)
            drop_caches()
            server_cpu = _cpu_seconds(server.process.pid)
            seconds, rss = run(tool.backup(source), tool.env)
            # The server shares these cores: what it spends is time the backup cannot have.
            server_cpu = _cpu_seconds(server.process.pid) - server_cpu
            results.add(Row("s3", "fsmount", f"backup to {name}", seconds, size, rss,
                            note=f"SeaweedFS used {server_cpu:.1f} s of CPU meanwhile"))
        for name, tool in (("local disk", local), ("S3", remote)):
            target = work / f"restored from {name}"
            drop_caches()
            seconds, rss = run(tool.restore(target), tool.env)
            results.add(Row("s3", "fsmount", f"restore from {name}", seconds, size, rss))
        repo_bytes = du(local.repo)
        aws = shutil.which("aws")
        migrations = (("local -> S3", local.env, str(local.repo), "moved-a"),
                      ("S3 -> S3", remote.env, "s3://bench/repo", "moved-b"))
        for name, env, origin, bucket in migrations:
            seconds, rss = run([*FSMOUNT, "-q", "migrate", "--to", f"s3:{server.endpoint}/{bucket}/repo"], env)
            results.add(Row("s3", "fsmount", f"migrate {name}", seconds, repo_bytes, rss, note="incl. verify"))
            if aws:
                aws_env = dict(os.environ, **s3_env)
                run([aws, "--endpoint-url", server.endpoint, "s3", "mb", f"s3://{bucket}-aws"], aws_env)
                try:
                    seconds, rss = run([aws, "--endpoint-url", server.endpoint, "s3", "sync", "--only-show-errors",
                                        origin, f"s3://{bucket}-aws/repo"], aws_env)
                except RuntimeError as exc:  # SeaweedFS answers some UploadPartCopy with InternalError
                    print(f"  aws s3 sync {name} failed, no baseline this run: {str(exc)[-200:]}")
                    continue
                results.add(Row("s3", "aws", f"s3 sync {name}", seconds, repo_bytes, rss))
    finally:
        server.stop()
    local_backup, s3_backup = (results.get("s3", "fsmount", f"backup to {n}") for n in ("local disk", "S3"))
    ratio = local_backup.seconds / s3_backup.seconds
    results.check("backup to S3 >= 0.8x backup to local disk", ratio >= 0.8, f"{ratio:.2f}x")
    ratio = results.get("s3", "fsmount", "restore from local disk").seconds / results.get(
        "s3", "fsmount", "restore from S3").seconds
    results.check("restore from S3 vs from local disk", None, f"{ratio:.2f}x")
    if not shutil.which("aws"):
        print("  aws (awscli) not installed: migration baseline skipped (pip install awscli)")
        return
    for name in ("local -> S3", "S3 -> S3"):
        baseline = results.get("s3", "aws", f"s3 sync {name}")
        if baseline is None:
            results.check(f"migrate {name} >= 1.0x aws s3 sync", None, "no baseline (aws s3 sync failed)")
            continue
        ratio = baseline.seconds / results.get("s3", "fsmount", f"migrate {name}").seconds
        results.check(f"migrate {name} >= 1.0x aws s3 sync", ratio >= 1.0, f"{ratio:.2f}x")


# -- the live group -----------------------------------------------------------------------------

def _timed(fn) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def _fio(root: Path, rw: str, size: int) -> float:
    """Seconds fio takes to `rw` ("write" with a final fsync, or "read") `size` bytes of big.bin in 1 MiB I/Os;
    plain Python I/O when fio is not installed."""
    path = root / "big.bin"
    if shutil.which("fio"):
        cmd = ["fio", "--name=seq", f"--filename={path}", f"--rw={rw}", "--bs=1M", f"--size={size}",
               "--ioengine=psync", "--end_fsync=1" if rw == "write" else "--invalidate=1", "--output-format=json"]
        job = json.loads(subprocess.run(cmd, capture_output=True, check=True, text=True).stdout)["jobs"][0]
        return job[rw]["runtime"] / 1000 if rw == "read" else job["job_runtime"] / 1000
    block = os.urandom(MiB)
    started = time.monotonic()
    if rw == "write":
        with open(path, "wb") as f:
            f.writelines(block for _ in range(size // MiB))
            f.flush()
            os.fsync(f.fileno())
    else:
        with open(path, "rb", buffering=0) as f:
            while f.read(MiB):
                pass
    return time.monotonic() - started


def _io_suite(root: Path, big: int) -> dict[str, tuple[float, int]]:
    """Each workload on one folder: name -> (seconds, bytes or operations)."""
    out: dict[str, tuple[float, int]] = {}
    block = os.urandom(MiB)

    out["sequential write"] = (_fio(root, "write", big), big)
    drop_caches()
    out["sequential read (cold)"] = (_fio(root, "read", big), big)
    rng = random.Random(3)

    def random_writes() -> None:
        fd = os.open(root / "big.bin", os.O_WRONLY)
        try:
            for _ in range(500):
                os.pwrite(fd, block[:4096], rng.randrange(0, big // 4096) * 4096)
                os.fsync(fd)
        finally:
            os.close(fd)
    out["4 KiB random write+fsync"] = (_timed(random_writes), 500)
    files = 10_000
    small = root / "small"
    small.mkdir()
    out["create small files"] = (_timed(lambda: [(small / f"f{i}").write_bytes(b"x" * 100) for i in range(files)]), files)
    out["stat small files"] = (_timed(lambda: [os.stat(small / f"f{i}") for i in range(files)]), files)
    out["stat walk (git status)"] = (_timed(lambda: [os.lstat(os.path.join(d, n)) for d, _, ns in os.walk(root) for n in ns]), files)
    out["unlink small files"] = (_timed(lambda: [os.unlink(small / f"f{i}") for i in range(files)]), files)
    tarball = root.parent / "tree.tar"
    if not tarball.exists():
        with tarfile.open(tarball, "w") as tar:
            tar.add(ROOT / "backend", arcname="backend")
            tar.add(ROOT / "fsmount", arcname="fsmount")
            tar.add(ROOT / "tests", arcname="tests")
    def untar() -> None:
        with tarfile.open(tarball) as tar:
            tar.extractall(root / "untarred", filter="tar")

    out["untar a source tree"] = (_timed(untar), 1)
    return out


def bench_live(work: Path, size: int, results: Results) -> None:
    fs = Fsmount(work)
    fs.env["FSMOUNT_REPOSITORY"] = str(work / "repo-live")
    run(fs.init(), fs.env)
    native, live = work / "native", work / "live"
    native.mkdir()
    live.mkdir()
    big = max(256 * MiB, size // 4)
    run([*FSMOUNT, "mount", str(live)], fs.env)
    try:
        measured = {"native": _io_suite(native, big), "fsmount": _io_suite(live, big)}
    finally:
        run([*FSMOUNT, "umount", "--lazy", str(live)], fs.env)
    for name in measured["native"]:
        for tool in ("native", "fsmount"):
            seconds, amount = measured[tool][name]
            is_bytes = "sequential" in name
            ops = "" if is_bytes or amount == 1 else f"{amount / seconds:,.0f} ops/s"
            results.add(Row("live", tool, name, seconds, amount if is_bytes else 0, note=ops))
        ratio = measured["native"][name][0] / measured["fsmount"][name][0]
        results.check(f"live {name}: fsmount / native", None, f"{ratio:.2f}x")
    for name, target in (("sequential write", 0.8), ("sequential read (cold)", 0.8), ("4 KiB random write+fsync", 0.3),
                         ("create small files", 0.12), ("stat walk (git status)", 0.5)):
        ratio = measured["native"][name][0] / measured["fsmount"][name][0]
        results.check(f"live {name} >= {target}x native", ratio >= target, f"{ratio:.2f}x")

    # The change tracker: the same 0.1% mutation, through the mount, against restic's rescan.
    source = work / "tracked"
    make_dataset(source, size, seed=5)
    restic = Restic(work)
    restic.env["RESTIC_REPOSITORY"] = str(work / "repo-restic-live")
    fs.env["FSMOUNT_REPOSITORY"] = str(work / "repo-tracked")
    run(fs.init(), fs.env)
    run(fs.backup(source), fs.env)
    if restic.available():
        run(["restic", "-q", "init"], restic.env)
        run(restic.backup(source), restic.env)
    run([*FSMOUNT, "mount", str(source)], fs.env)
    try:
        mutate(source)
        before = du(work / "repo-tracked")
        seconds, _ = run([*FSMOUNT, "snapshot", str(source)], fs.env)  # the mount's first: a full scan
        results.add(Row("live", "fsmount", "first snapshot (scan)", seconds, growth_bytes=du(work / "repo-tracked") - before))
        mutate(source, seed=8)
        before = du(work / "repo-tracked")
        seconds, _ = run([*FSMOUNT, "snapshot", str(source)], fs.env)
        tracked = results.add(Row("live", "fsmount", "snapshot of 0.1% change", seconds,
                                  growth_bytes=du(work / "repo-tracked") - before))
    finally:
        run([*FSMOUNT, "umount", str(source)], fs.env)
    if restic.available():
        before = du(work / "repo-restic-live")
        seconds, rss = run(restic.backup(source), restic.env)
        rescan = results.add(Row("live", "restic", "backup of the same change", seconds, peak_rss_mib=rss,
                                 growth_bytes=du(work / "repo-restic-live") - before))
        faster = rescan.seconds / tracked.seconds
        results.check("change snapshot >= 10x faster than restic backup", faster >= 10, f"{faster:.2f}x")
        growth = tracked.growth_bytes / max(1, rescan.growth_bytes)
        results.check("change snapshot growth <= 1/6 of restic's", growth <= 1 / 6, f"{growth:.3f}x")


# -- the pressure group -------------------------------------------------------------------------

def _write_latencies(path: Path, stop: threading.Event, latencies: list[float]) -> None:
    """4 KiB writes as fast as they go, each one timed (the writer a user would feel stall)."""
    block = os.urandom(4096)
    with open(path, "wb") as f:
        offset = 0
        while not stop.is_set():
            started = time.perf_counter()
            os.pwrite(f.fileno(), block, offset)
            latencies.append(time.perf_counter() - started)
            offset = (offset + 4096) % (64 * MiB)


def _percentiles(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000
    return f"p50 {pick(0.5):.2f} ms, p99 {pick(0.99):.2f} ms, max {ordered[-1] * 1000:.1f} ms"


def bench_pressure(work: Path, size: int, results: Results) -> None:
    """Writer stall while a snapshot of 1,000 dirty files is taken; remount after kill -9 with
    10,000 dirty files."""
    fs = Fsmount(work)
    fs.env["FSMOUNT_REPOSITORY"] = str(work / "repo")
    run(fs.init(), fs.env)
    source = work / "folder"
    (source / "many").mkdir(parents=True)
    run([*FSMOUNT, "mount", str(source)], fs.env)
    try:
        run([*FSMOUNT, "snapshot", str(source)], fs.env)
        for quiet, label in ((True, "without a snapshot"), (False, "during a snapshot")):
            for i in range(1000):
                (source / "many" / f"f{i}").write_bytes(os.urandom(8192))
            stop, latencies = threading.Event(), []
            writer = threading.Thread(target=_write_latencies, args=(source / "writer.bin", stop, latencies))
            writer.start()
            time.sleep(0.5)
            started = time.monotonic()
            if not quiet:
                subprocess.run([*FSMOUNT, "snapshot", str(source)], env=fs.env, check=True, capture_output=True)
            else:
                time.sleep(1.0)
            seconds = time.monotonic() - started
            stop.set()
            writer.join()
            results.add(Row("pressure", "fsmount", f"4 KiB writes {label}", seconds, note=_percentiles(latencies)))
            if not quiet:
                stall_ms = max(latencies) * 1000
                results.check("max write stall during a snapshot of 1,000 dirty files < 50 ms", stall_ms < 50,
                              f"{stall_ms:.1f} ms")
        pid = json.loads(subprocess.run([*FSMOUNT, "status", "--json", str(source)], env=fs.env, check=True,
                                        capture_output=True).stdout)["pid"]
        for i in range(10_000):
            (source / "many" / f"g{i}").write_bytes(b"dirty")
        os.kill(pid, 9)
        time.sleep(1)
        seconds, _ = run([*FSMOUNT, "mount", str(source)], fs.env)
        results.add(Row("pressure", "fsmount", "remount after kill -9 (10k dirty files)", seconds))
        results.check("remount after kill -9 with 10,000 dirty files < 5 s", seconds < 5, f"{seconds:.2f} s")
        seconds, _ = run([*FSMOUNT, "snapshot", str(source)], fs.env)
        results.add(Row("pressure", "fsmount", "first snapshot after the crash (rescan)", seconds))
    finally:
        subprocess.run([*FSMOUNT, "umount", str(source)], env=fs.env, capture_output=True, check=False)


def bench_scale(work: Path, size: int, results: Results) -> None:
    """No-change snapshots of a live mount holding 28k files and 280k: the changelog decides what
    a snapshot reads, so the size of the tree must not matter."""
    fs = Fsmount(work)
    fs.env["FSMOUNT_REPOSITORY"] = str(work / "repo")
    run(fs.init(), fs.env)
    idle_s = {}
    for files in (28_000, 280_000):
        source = work / f"folder-{files // 1000}k"
        for i in range(files):
            directory = source / f"d{i // 1000:03d}"
            if i % 1000 == 0:
                directory.mkdir(parents=True)
            (directory / f"f{i % 1000:03d}").write_bytes(b"x" * 100)
        run([*FSMOUNT, "mount", str(source)], fs.env)
        try:
            seconds = _timed(lambda source=source: os.mkdir(source / ".snapshots" / "first"))
            results.add(Row("scale", "fsmount", f"first snapshot, {files // 1000}k files (scan)", seconds))
            times = sorted(_timed(lambda n=n, source=source: os.mkdir(source / ".snapshots" / f"idle-{n}")) for n in range(5))
            idle_s[files] = times[len(times) // 2]
            results.add(Row("scale", "fsmount", f"no-change snapshot, {files // 1000}k files", idle_s[files],
                            note=f"median of 5; min {times[0]:.3f} s, max {times[-1]:.3f} s"))
        finally:
            subprocess.run([*FSMOUNT, "umount", str(source)], env=fs.env, capture_output=True, check=False)
    results.check("no-change snapshot at 28k files <= 0.2 s", idle_s[28_000] <= 0.2, f"{idle_s[28_000]:.3f} s")
    results.check("no-change snapshot at 280k files no slower (<= 0.2 s)", idle_s[280_000] <= 0.2,
                  f"{idle_s[280_000]:.3f} s ({idle_s[280_000] / idle_s[28_000]:.2f}x the 28k figure)")


# -- the browse group ---------------------------------------------------------------------------

def _daemon_peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bench_browse(work: Path, size: int, results: Results) -> None:
    """Restore by copy out of the snapshot mount against `fsmount restore` and `restic restore`."""
    source = work / "dataset"
    print(f"browse: generating {size / MiB:.0f} MiB dataset", flush=True)
    make_dataset(source, size, seed=11)
    files = sum(1 for p in source.rglob("*") if p.is_file())
    fs, restic = Fsmount(work), Restic(work)
    tools = [fs] + ([restic] if restic.available() else [])
    for tool in tools:
        run(tool.init(), tool.env)
        run(tool.backup(source), tool.env)
    expected = tree_digest(source)
    for tool in tools:
        target = work / f"restored-{tool.name}"
        drop_caches()
        seconds, rss = run(tool.restore(target), tool.env)
        results.add(Row("browse", tool.name, "restore", seconds, size, rss))
    mnt = work / "snaps"
    mnt.mkdir()
    run([*FSMOUNT, "mount-snapshots", str(mnt)], fs.env)
    try:
        pid = int(subprocess.run(["pgrep", "-f", f"mount-snapshots -f .*{mnt}"], capture_output=True,
                                 text=True, check=False).stdout.split()[0])
        snapshot = mnt / os.readlink(mnt / "latest")  # the folder itself: find and cp -a do not follow links
        for phase in ("cold", "warm"):
            seconds, _ = run(["find", str(snapshot)], fs.env)
            results.add(Row("browse", "fsmount", f"find, {phase} ({files} files)", seconds,
                            note=f"{files / seconds:,.0f} entries/s"))
        for phase in ("cold", "warm"):
            seconds, _ = run(["ls", "-lR", str(snapshot)], fs.env)
            results.add(Row("browse", "fsmount", f"ls -lR, {phase}", seconds))
        drop_caches()
        copy = work / "copied out of the mount"
        seconds, _ = run(["cp", "-a", str(snapshot), str(copy)], fs.env)
        ok = tree_digest(copy) == expected
        results.add(Row("browse", "fsmount", "cp -a out of the mount", seconds, size,
                        _daemon_peak_rss_mib(pid), note="" if ok else "COPY DIFFERS"))
    finally:
        run([*FSMOUNT, "umount", str(mnt)], fs.env)
    drop_caches()
    seconds, _ = run(["cp", "-a", str(source), str(work / "copied natively")], fs.env)
    results.add(Row("browse", "native", "cp -a of the source folder", seconds, size))
    cp = results.get("browse", "fsmount", "cp -a out of the mount")
    warm = results.get("browse", "fsmount", f"find, warm ({files} files)")
    if restic.available():
        ratio = results.get("browse", "restic", "restore").seconds / cp.seconds
        results.check("cp -a from the mount >= 1.0x restic restore", ratio >= 1.0, f"{ratio:.2f}x")
    ratio = results.get("browse", "native", "cp -a of the source folder").seconds / cp.seconds
    results.check("cp -a from the mount vs cp -a of the source itself (the disk's own limit)", None, f"{ratio:.2f}x")
    ratio = results.get("browse", "fsmount", "restore").seconds / cp.seconds
    results.check("cp -a from the mount vs fsmount restore", None, f"{ratio:.2f}x")
    results.check(f"find of {files} files, warm, < 2 s (target at 28k files)", warm.seconds < 2 * files / 28_000,
                  f"{warm.seconds:.2f} s")
    results.check("snapshot mount peak RSS <= 300 MiB", cp.peak_rss_mib <= 300, f"{cp.peak_rss_mib:.0f} MiB")


# -- main ---------------------------------------------------------------------------------------

def main() -> None:
    sys.path.insert(0, str(ROOT))
    try:
        import fsmount.cli  # noqa: F401  (the tools are run with this interpreter)
    except ImportError as exc:
        raise SystemExit(f"bench.py: {exc}; run it with the project's venv: .venv/bin/python scripts/bench.py "
                         "(scripts/test.sh or scripts/demo.sh creates it)")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=1.0, help="dataset size (default 1)")
    parser.add_argument("--only", action="append", choices=["engine", "browse", "s3", "live", "pressure", "scale"], help="run only these groups")
    parser.add_argument("--workdir", type=Path, help="where to work (default: a new dir under /tmp)")
    parser.add_argument("--json", type=Path, help="write all figures here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fsmount-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gib * (1 << 30))
    results = Results()
    try:
        for group, fn in (("engine", bench_engine), ("browse", bench_browse), ("s3", bench_s3), ("live", bench_live),
                          ("pressure", bench_pressure), ("scale", bench_scale)):
            if not args.only or group in args.only:
                print(f"== {group}", flush=True)
                fn(work / group, size, results)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n== ratios and targets")
    for name, ok, detail in results.checks:
        print(f"  {'    ' if ok is None else 'PASS' if ok else 'FAIL'}  {name}: {detail}")
    if args.json:
        args.json.write_text(json.dumps({"rows": [asdict(r) | {"mb_s": r.mb_s} for r in results.rows],
                                         "checks": results.checks}, indent=1))


if __name__ == "__main__":
    main()
