"""The store contract (backend/stores/base.py), checked on every kind of store, then what each adds.

Conformance tests take the `store` fixture: local, S3 (a real SeaweedFS over HTTP), local+S3 replicas
and S3+S3 replicas on two servers. Then: retries through injected faults, S3 failures a user meets
(unreachable endpoint, wrong key, missing bucket), and replicas falling back and degrading.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import botocore.awsrequest
import botocore.exceptions
import pytest

import backend.stores.replicated as replicated_module
from backend.errors import IntegrityError, LocationMissing, ObjectNotFound, StoreError, TransientStoreError
from backend.stores import LocalStore, ObjectStore, open_store
from backend.stores.faulty import FaultyStore
from backend.stores.replicated import MissingObject, ReplicatedStore
from backend.stores.retry import RetryingStore, RetryPolicy
from backend.stores.s3 import S3Store

# Registered as a plugin, not imported, so the session servers stay one per session when other test
# modules (or conftest.py) load these fixtures too.
pytest_plugins = ["s3_fixtures"]

MiB = 1024 * 1024
FAST_RETRIES = RetryPolicy(budget_s=5.0, initial_delay_s=0.001, max_delay_s=0.01)


# -- the contract, on every store


def test_put_then_get_returns_the_same_bytes(store: ObjectStore) -> None:
    every_byte = bytes(range(256)) * 3
    store.put("config", every_byte)
    store.put("keys/empty", b"")
    assert store.get("config") == every_byte
    assert store.get("keys/empty") == b""


def test_ranged_get_returns_exactly_the_range(store: ObjectStore) -> None:
    data = bytes(range(100))
    store.put("data/ab/pack", data)
    assert store.get("data/ab/pack", 10, 5) == data[10:15]
    assert store.get("data/ab/pack", 0, 1) == data[:1]
    assert store.get("data/ab/pack", 40) == data[40:]
    assert store.get("data/ab/pack", 95, 50) == data[95:], "a range running past the end is cut short"
    assert store.get("data/ab/pack", 99, 1) == data[99:]
    assert store.get("data/ab/pack", 100, 10) == b"", "a range starting at the end is empty"
    assert store.get("data/ab/pack", 500) == b""


def test_put_replaces_an_existing_object(store: ObjectStore) -> None:
    store.put("index/one", b"first version, longer")
    store.put("index/one", b"second")
    assert store.get("index/one") == b"second"
    assert list(store.list("index/")) == [("index/one", 6)]


def test_missing_key_raises_object_not_found(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        store.get("snapshots/none")
    with pytest.raises(ObjectNotFound):
        store.get("snapshots/none", 10, 10)


def test_exists_tells_present_from_missing(store: ObjectStore) -> None:
    store.put("locks/a", b"x")
    assert store.exists("locks/a")
    assert not store.exists("locks/b")
    assert not store.exists("locks"), "a key prefix is not an object"


def test_list_by_prefix_finds_nested_keys_with_sizes(store: ObjectStore) -> None:
    objects = {"config": 3, "data/ab/1111": 10, "data/ab/2222": 20, "data/ac/3333": 30, "data/cd/4444": 40,
               "index/5555": 50, "snapshots/6666": 60}
    for key, size in objects.items():
        store.put(key, b"z" * size)
    assert sorted(store.list()) == sorted(objects.items())
    assert sorted(store.list("data/")) == sorted((k, s) for k, s in objects.items() if k.startswith("data/"))
    assert sorted(store.list("data/ab/")) == [("data/ab/1111", 10), ("data/ab/2222", 20)]
    assert sorted(store.list("data/a")) == [("data/ab/1111", 10), ("data/ab/2222", 20), ("data/ac/3333", 30)]
    assert list(store.list("nothing/")) == []


def test_delete_removes_and_is_idempotent(store: ObjectStore) -> None:
    store.put("locks/x", b"1")
    store.put("locks/y", b"2")
    store.delete("locks/x")
    store.delete("locks/x")
    store.delete("locks/never-was")
    assert not store.exists("locks/x")
    assert list(store.list("locks/")) == [("locks/y", 1)]
    with pytest.raises(ObjectNotFound):
        store.get("locks/x")


def test_large_object_round_trips(store: ObjectStore) -> None:
    data = os.urandom(40 * MiB + 12345)  # past the multipart threshold: five parts on S3, the last one short
    store.put("data/ff/big", data)
    assert store.get("data/ff/big") == data
    assert store.get("data/ff/big", 8 * MiB - 3, 10) == data[8 * MiB - 3:8 * MiB + 7], "across a part boundary"
    assert list(store.list("data/ff/")) == [("data/ff/big", len(data))]


def test_invalid_keys_are_refused(store: ObjectStore) -> None:
    for key in ("", "/abs", "data/../config"):
        with pytest.raises(StoreError):
            store.put(key, b"x")


def test_transient_errors_are_retried_until_operations_succeed(store: ObjectStore) -> None:
    faulty = FaultyStore(store, seed=7, error_rate=0.2, drop_rate=0.05)
    retrying = RetryingStore(faulty, FAST_RETRIES)
    for i in range(30):
        retrying.put(f"data/{i:02x}/obj", b"%d" % i)
    assert all(retrying.get(f"data/{i:02x}/obj") == b"%d" % i for i in range(30))
    assert all(retrying.exists(f"data/{i:02x}/obj") for i in range(30))
    assert len(list(retrying.list("data/"))) == 30
    for i in range(30):
        retrying.delete(f"data/{i:02x}/obj")
    assert list(store.list("data/")) == []
    stats = faulty.statistics()
    assert stats.errors > 10 and stats.drops > 0, stats


# -- fault injection and retry, on their own


def test_faulty_store_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    def fates(seed: int) -> list[bool]:
        faulty = FaultyStore(LocalStore(tmp_path), seed=seed, error_rate=0.5)
        outcome = []
        for i in range(40):
            try:
                faulty.put(f"k{i % 5}", b"x")
                outcome.append(True)
            except TransientStoreError:
                outcome.append(False)
        return outcome

    assert fates(1) == fates(1)
    assert fates(1) != fates(2)
    assert 5 < fates(1).count(False) < 35


def test_faulty_store_corrupts_and_goes_down_on_demand(tmp_path: Path) -> None:
    inner = LocalStore(tmp_path)
    inner.put("k", b"\x00" * 64)
    faulty = FaultyStore(inner, seed=1, corrupt_rate=1.0)
    corrupt = faulty.get("k")
    assert len(corrupt) == 64 and sum(b != 0 for b in corrupt) == 1
    faulty.down = True
    with pytest.raises(StoreError) as raised:
        faulty.get("k")
    assert not isinstance(raised.value, TransientStoreError)
    faulty.down = False
    assert faulty.exists("k")


def test_retry_gives_up_within_its_budget_with_a_plain_store_error(tmp_path: Path) -> None:
    always_failing = RetryingStore(FaultyStore(LocalStore(tmp_path), seed=0, error_rate=1.0),
                                   RetryPolicy(budget_s=0.3, initial_delay_s=0.01, max_delay_s=0.05))
    start = time.monotonic()
    with pytest.raises(StoreError, match="gave up after") as raised:
        always_failing.put("k", b"x")
    assert 0.3 <= time.monotonic() - start < 1.0  # the whole budget, not less (it ended early)
    assert not isinstance(raised.value, TransientStoreError), "an outer layer must not retry it again"


# -- S3: what only S3 does, and the failures a user meets


@pytest.mark.s3
def test_listing_pages_through_more_than_1000_keys(s3_store: S3Store) -> None:
    keys = [f"data/{i % 256:02x}/{i:06d}" for i in range(1100)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: s3_store.put(key, b"p"), keys))
    listed = list(s3_store.list("data/"))
    assert sorted(listed) == sorted((key, 1) for key in keys)
    assert len(list(s3_store.list("data/0a/"))) == len([k for k in keys if k.startswith("data/0a/")])


@pytest.mark.s3
def test_put_if_absent_creates_only_once(s3_store: S3Store) -> None:
    assert s3_store.put_if_absent("locks/exclusive", b"first holder")
    assert not s3_store.put_if_absent("locks/exclusive", b"second holder")
    assert s3_store.get("locks/exclusive") == b"first holder"


@pytest.mark.s3
def test_s3_retries_throttling_5xx_and_dropped_connections(s3_store: S3Store) -> None:
    s3_store.policy = FAST_RETRIES
    s3_store.multipart_threshold = 8 * MiB  # the 10 MiB object below goes in parts: their requests retry too
    failures = {"count": 0}

    def first_two_attempts_fail(request: botocore.awsrequest.AWSPreparedRequest, **_: object) -> object:
        attempt = failures["count"] % 3
        failures["count"] += 1
        if attempt == 0:
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            return botocore.awsrequest.AWSResponse(request.url, 503, {}, _RawBody(body))
        if attempt == 1:
            raise botocore.exceptions.ConnectionClosedError(endpoint_url=request.url)
        return None

    s3_store.client.meta.events.register("before-send.s3", first_two_attempts_fail)
    data = os.urandom(10 * MiB)
    s3_store.put("data/aa/multi", data)
    s3_store.put("config", b"cfg")
    assert s3_store.get("config") == b"cfg"
    assert s3_store.get("data/aa/multi", 5, 5) == data[5:10]
    assert sorted(s3_store.list()) == [("config", 3), ("data/aa/multi", len(data))]
    assert failures["count"] >= 3 * 8, "every request should have failed twice first"


@pytest.mark.s3
def test_unreachable_endpoint_fails_quickly_naming_it(s3_server: object) -> None:
    port = _unused_port()
    store = S3Store("bucket", "repo", endpoint_url=f"http://127.0.0.1:{port}", credentials=("id", "secret"),
                    retry_budget_s=1.0, connect_timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(StoreError) as raised:
        store.put("config", b"x")
    assert time.monotonic() - start < 4.0
    assert f"127.0.0.1:{port}" in str(raised.value)
    assert not isinstance(raised.value, TransientStoreError)


def test_a_server_that_never_answers_fails_within_the_retry_budget() -> None:
    """One stalled request waited out its 20 s read timeout, whatever the budget (5 s there)."""
    with socket.socket() as silent:  # connections are accepted by the kernel, nothing is ever read
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        store = S3Store("bucket", "repo", endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
                        credentials=("id", "secret"), retry_budget_s=2.0)
        start = time.monotonic()
        with pytest.raises(StoreError):
            store.put("config", b"x")
        assert time.monotonic() - start < 8.0


@pytest.mark.s3
def test_wrong_credentials_give_a_clear_error_at_once(s3_bucket) -> None:
    key_id, secret = s3_bucket.server.credentials
    for credentials in [(key_id, "not-the-secret"), ("nobody", secret)]:
        store = s3_bucket.open_store(credentials=credentials)
        for op in (partial(store.put, "config", b"x"), partial(store.get, "config"), partial(_list_all, store)):
            start = time.monotonic()
            with pytest.raises(StoreError) as raised:
                op()
            assert time.monotonic() - start < 2.0, "a refused key is not worth retrying"
            message = str(raised.value)
            assert message.startswith(f"access denied to {store.location}, check credentials"), message
            assert credentials[1] not in message and secret not in message


@pytest.mark.s3
def test_missing_bucket_is_reported_and_not_created(s3_server) -> None:
    """As a location that holds no store (LocationMissing: no repository there), not a failed one."""
    store = S3Store("no-such-bucket", "repo", endpoint_url=s3_server.endpoint, credentials=s3_server.credentials,
                    retry_budget_s=5)
    for op in (partial(store.put, "config", b"x"), partial(store.get, "config"), partial(_list_all, store)):
        with pytest.raises(LocationMissing, match="bucket no-such-bucket does not exist"):
            op()
    client = s3_server.client()
    assert "no-such-bucket" not in [b["Name"] for b in client.list_buckets()["Buckets"]], \
        "SeaweedFS creates a bucket on PUT; the store must not let it"


@pytest.mark.s3
def test_create_if_missing_makes_the_bucket_then_uses_it(s3_server) -> None:
    name = f"init-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    store = S3Store(name, "repo", endpoint_url=s3_server.endpoint, credentials=s3_server.credentials)
    try:
        assert store.create_if_missing() is True
        assert store.create_if_missing() is False
        store.put("config", b"c")
        assert store.get("config") == b"c"
    finally:
        store.delete("config")
        s3_server.client().delete_bucket(Bucket=name)


@pytest.mark.s3
def test_open_store_uses_the_environment_and_hides_credentials(s3_bucket, monkeypatch) -> None:
    key_id, secret = s3_bucket.server.credentials
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    store = open_store(f"s3:{s3_bucket.name}/repo")
    store.put("config", b"via env")
    assert store.location == f"s3:{s3_bucket.name}/repo"
    explicit = open_store(f"s3:http://{key_id}:{secret}@{s3_bucket.server.endpoint[7:]}/{s3_bucket.name}/repo")
    assert explicit.get("config") == b"via env"
    assert explicit.location == f"s3:{s3_bucket.server.endpoint}/{s3_bucket.name}/repo"


# -- replicas


@pytest.fixture
def local_and_s3(tmp_path: Path, s3_bucket) -> list[ObjectStore]:
    local = LocalStore(tmp_path / "replica-a")
    local.create_if_missing()
    return [local, s3_bucket.open_store()]


def _sha256_verifier(expected: dict[str, bytes]):
    return lambda key, data: hashlib.sha256(data).digest() == hashlib.sha256(expected[key]).digest()


@pytest.mark.s3
def test_put_reaches_every_replica_before_returning(local_and_s3: list[ObjectStore]) -> None:
    replicated = ReplicatedStore(local_and_s3)
    replicated.put("data/ab/pack", b"payload")
    assert [r.get("data/ab/pack") for r in local_and_s3] == [b"payload", b"payload"]
    replicated.delete("data/ab/pack")
    assert not any(r.exists("data/ab/pack") for r in local_and_s3)


@pytest.mark.s3
def test_get_falls_back_when_a_replica_lacks_the_object(local_and_s3, caplog) -> None:
    first, second = local_and_s3
    second.put("data/ab/pack", b"only here")
    replicated = ReplicatedStore(local_and_s3)
    with caplog.at_level(logging.WARNING, logger="backend.stores.replicated"):
        assert replicated.get("data/ab/pack") == b"only here"
        assert replicated.get("data/ab/pack", 5, 4) == b"here"
    assert first.location in caplog.text and "has no copy" in caplog.text
    assert replicated.exists("data/ab/pack")
    with pytest.raises(ObjectNotFound):
        replicated.get("data/ab/absent")


@pytest.mark.s3
def test_get_falls_back_on_a_corrupt_copy_when_verifying(local_and_s3, caplog) -> None:
    first, second = local_and_s3
    good = {"data/ab/pack": os.urandom(1000)}
    for replica in local_and_s3:
        replica.put("data/ab/pack", good["data/ab/pack"])
    rotten = FaultyStore(first, seed=3, corrupt_rate=1.0)
    unverified = ReplicatedStore([rotten, second])
    assert unverified.get("data/ab/pack") != good["data/ab/pack"], "without verify, the bad copy gets through"
    verified = ReplicatedStore([rotten, second], verify=_sha256_verifier(good))
    with caplog.at_level(logging.WARNING, logger="backend.stores.replicated"):
        assert verified.get("data/ab/pack") == good["data/ab/pack"]
    assert first.location in caplog.text and "does not match" in caplog.text
    all_rotten = ReplicatedStore([rotten, FaultyStore(second, seed=4, corrupt_rate=1.0)],
                                 verify=_sha256_verifier(good))
    with pytest.raises(IntegrityError, match="no replica has a good copy"):
        all_rotten.get("data/ab/pack")


@pytest.mark.s3
def test_put_with_a_replica_down_fails_naming_it(local_and_s3) -> None:
    first, second = local_and_s3
    down = FaultyStore(second, seed=0, down=True)
    replicated = ReplicatedStore([first, down])
    with pytest.raises(StoreError) as raised:
        replicated.put("data/ab/pack", b"x")
    assert f"replica {second.location} failed" in str(raised.value)
    assert first.location not in str(raised.value).replace(second.location, "")
    assert replicated.missing_objects() == []


@pytest.mark.s3
def test_degraded_put_records_what_a_down_replica_misses(local_and_s3, caplog, monkeypatch) -> None:
    first, second = local_and_s3
    down = FaultyStore(second, seed=0, down=True)
    asked = []
    monkeypatch.setattr(down, "put", lambda key, data: (asked.append(key), FaultyStore.put(down, key, data)))
    replicated = ReplicatedStore([first, down], degraded=True)
    with caplog.at_level(logging.WARNING, logger="backend.stores.replicated"):
        replicated.put("data/ab/one", b"1")
        replicated.put("data/cd/two", b"2")
    assert second.location in caplog.text
    assert first.get("data/ab/one") == b"1"
    assert replicated.missing_objects() == [MissingObject(second.location, "data/ab/one"),
                                            MissingObject(second.location, "data/cd/two")]
    assert asked == ["data/ab/one"]  # down: not asked again (each time would wait out its retries)
    monkeypatch.setattr(replicated_module, "DOWN_FOR_S", 0.0)  # ... until DOWN_FOR_S has passed
    down.down = False
    replicated.put("data/ab/one", b"1")
    assert replicated.take_missing_objects() == [MissingObject(second.location, "data/cd/two")]
    assert replicated.missing_objects() == []
    down.down = True
    with pytest.raises(StoreError):
        ReplicatedStore([down], degraded=True).put("data/ef/three", b"3")


@pytest.mark.s3
def test_replicated_list_is_the_union_without_duplicates(local_and_s3) -> None:
    first, second = local_and_s3
    first.put("index/a", b"1")
    first.put("index/both", b"22")
    second.put("index/both", b"22")
    second.put("index/b", b"333")
    assert sorted(ReplicatedStore(local_and_s3).list("index/")) == [("index/a", 1), ("index/b", 3),
                                                                     ("index/both", 2)]


# -- helpers


class _RawBody:
    """The `raw` of a botocore response made up in a test."""

    def __init__(self, body: bytes):
        self._body = body

    def stream(self, **_: object):
        yield self._body


def _list_all(store: ObjectStore) -> list[tuple[str, int]]:
    return list(store.list())


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.s3
def test_reads_and_listings_go_on_without_a_replica_that_is_down(local_and_s3, caplog) -> None:
    """Reading needs one good replica, not all: `snapshots`, `ls` and `restore` failed outright
    while one replica was down, degraded or not."""
    first, second = local_and_s3
    first.put("snapshots/one", b"1")
    down = FaultyStore(second, seed=0, down=True)
    replicated = ReplicatedStore([down, first])
    with caplog.at_level(logging.WARNING, logger="backend.stores.replicated"):
        assert list(replicated.list("snapshots/")) == [("snapshots/one", 1)]
        assert replicated.get("snapshots/one") == b"1"
    assert len(caplog.records) == 1 and second.location in caplog.text  # said once, then left alone
    with pytest.raises(StoreError):
        list(ReplicatedStore([down]).list("snapshots/"))


def test_a_local_repository_folder_that_is_gone_is_an_error_not_an_empty_store(tmp_path: Path) -> None:
    """Listed, a deleted (or unmounted) repository folder looked empty: the snapshot mount showed
    no snapshots at all; written to, it was made anew, without config or keys."""
    store = LocalStore(tmp_path / "repo")
    store.create_if_missing()
    store.put("data/ab/one", b"1")
    assert list(store.list("data/")) == [("data/ab/one", 1)]
    shutil.rmtree(tmp_path / "repo")
    for attempt in (lambda: list(store.list("snapshots/")), lambda: store.put("data/cd/two", b"2")):
        with pytest.raises(StoreError, match="repository folder .* is missing"):
            attempt()
    assert not (tmp_path / "repo").exists()
