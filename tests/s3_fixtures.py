"""Fixtures for store-facing tests: real SeaweedFS servers, a fresh bucket per test, and `store`.

`store` is parametrized over every kind of store a repository can live in, so one test body checks
them all. S3 servers start once per session, or once per worker under pytest-xdist (the second only
for tests that ask for two providers); a server that cannot start fails the test under CI and skips
it elsewhere, with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import random
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from conftest import IN_CI

from backend.stores import LocalStore, ObjectStore
from backend.stores.replicated import ReplicatedStore
from backend.stores.s3 import S3Store

__all__ = [
    "STORE_KINDS",
    "TEST_RETRY_BUDGET_S",
    "S3Bucket",
    "s3_bucket",
    "s3_bucket_b",
    "s3_server",
    "s3_server_b",
    "s3_store",
    "store",
]

STORE_KINDS = ["local", "s3", "replicated-local-s3", "replicated-s3-s3"]
TEST_RETRY_BUDGET_S = 10.0  # a broken server fails a test in seconds, not the default minute


def _load_s3_server() -> Any:
    """scripts/s3_server.py as a module (scripts/ is not a package, nor always on sys.path), its
    servers taking their ports where `_free_ports` says."""
    if "s3_server" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "scripts" / "s3_server.py"
        spec = importlib.util.spec_from_file_location("s3_server", path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules["s3_server"] = module
        spec.loader.exec_module(module)
        module.free_ports = partial(_free_ports, module)
    return sys.modules["s3_server"]


def _port_range(grpc_offset: int) -> range:
    """Where this test process's servers take their ports (N, and N + grpc_offset for gRPC).

    Below the kernel's ephemeral range: a paused server (`own_s3_server`) keeps its ports for a minute
    or more, and no outgoing connection can take one of them meanwhile. And a share of that range for
    each pytest-xdist worker, so that workers starting servers at once never pick the same ports."""
    low, high = 20000, 30000
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 0
    if ephemeral_low - grpc_offset - low >= 1000:
        high = min(high, ephemeral_low - grpc_offset)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0) % workers
    share = (high - low) // workers
    return range(low + worker * share, low + (worker + 1) * share)


def _free_ports(s3_server: Any, count: int) -> list[int]:
    """`count` distinct ports N from `_port_range` with N and its gRPC port both free right now."""
    offset = s3_server._GRPC_OFFSET
    candidates = list(_port_range(offset))
    random.shuffle(candidates)
    ports: list[int] = []
    for port in candidates:
        if s3_server._is_free(port) and s3_server._is_free(port + offset):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise s3_server.S3ServerError(f"fewer than {count} free ports in {min(candidates)}..{max(candidates)}")


def _serve() -> Iterator[Any]:
    s3_server = _load_s3_server()
    server = s3_server.SeaweedServer()
    try:
        server.start()
    except s3_server.S3ServerError as exc:
        server.stop()
        if IN_CI:
            pytest.fail(f"the SeaweedFS test server did not start (never skipped in CI): {exc}")
        pytest.skip(f"the SeaweedFS test server did not start: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Any]:
    """A SeaweedFS server for the whole session (`s3_server.SeaweedServer`)."""
    yield from _serve()


@pytest.fixture
def own_s3_server() -> Iterator[Any]:
    """A server of the test's own, which it may stop and start again (`pause()`, `resume()`)."""
    yield from _serve()


@pytest.fixture(scope="session")
def s3_server_b() -> Iterator[Any]:
    """A second, independent server: another provider. Started only by tests that use it."""
    yield from _serve()


@dataclass
class S3Bucket:
    """A bucket that exists for one test."""

    server: Any
    name: str

    def location(self, prefix: str = "repo") -> str:
        return f"s3:{self.server.endpoint}/{self.name}/{prefix}"

    def open_store(self, prefix: str = "repo", **options: Any) -> S3Store:
        options = {"retry_budget_s": TEST_RETRY_BUDGET_S, "credentials": self.server.credentials, **options}
        return S3Store(self.name, prefix, endpoint_url=self.server.endpoint, **options)


def _bucket(server: Any) -> Iterator[S3Bucket]:
    name = f"t-{secrets.token_hex(6)}"
    client = server.client()
    client.create_bucket(Bucket=name)
    try:
        yield S3Bucket(server, name)
    finally:
        # Deleting the bucket also frees its SeaweedFS volume (a server holds a limited number).
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": entry["Key"]} for entry in page.get("Contents", ())]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=name)
        client.close()


@pytest.fixture
def s3_bucket(s3_server: Any) -> Iterator[S3Bucket]:
    """A fresh, empty bucket on `s3_server`, deleted after the test."""
    yield from _bucket(s3_server)


@pytest.fixture
def s3_bucket_b(s3_server_b: Any) -> Iterator[S3Bucket]:
    """A fresh, empty bucket on the second server."""
    yield from _bucket(s3_server_b)


@pytest.fixture
def s3_store(s3_bucket: S3Bucket) -> Iterator[S3Store]:
    """An `S3Store` on a fresh bucket, under the prefix `repo`."""
    store = s3_bucket.open_store()
    yield store
    store.close()


@pytest.fixture(params=[pytest.param(kind, marks=[pytest.mark.s3] if "s3" in kind else [])
                        for kind in STORE_KINDS])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    """Each kind of store in turn, empty: local, S3, local+S3 replicas, S3+S3 on two providers."""
    kind: str = request.param
    if kind == "local":
        made: ObjectStore = LocalStore(tmp_path / "store")
        made.create_if_missing()
    elif kind == "s3":
        made = request.getfixturevalue("s3_bucket").open_store()
    elif kind == "replicated-local-s3":
        made = ReplicatedStore([LocalStore(tmp_path / "store"), request.getfixturevalue("s3_bucket").open_store()])
        made.create_if_missing()
    else:
        made = ReplicatedStore([request.getfixturevalue("s3_bucket").open_store(),
                                request.getfixturevalue("s3_bucket_b").open_store()])
    yield made
    made.close()
