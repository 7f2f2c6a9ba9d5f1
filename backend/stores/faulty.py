"""A store wrapper that misbehaves on purpose, for tests: errors, stalls, dropped connections, bit rot.

Each call draws its fate from a generator seeded with `(seed, operation, key, how many times this
operation has been made on this key)`, so a run is reproducible whatever the order threads call in.
Faults, in the order they are drawn:

- `down`: every call raises `StoreError` (settable at run time, to take a replica away and back);
- `error_rate`: the call raises `TransientStoreError` before reaching the inner store;
- `drop_rate`: the call reaches the inner store, then raises `TransientStoreError` as if the connection
  dropped before the reply (so a put may have happened; a retry must be harmless);
- `stall_rate`: the call sleeps `stall_s` first;
- `corrupt_rate`: `get` returns the bytes with one byte flipped.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import StoreError, TransientStoreError
from .base import ObjectStore

T = TypeVar("T")


@dataclass(frozen=True)
class FaultStatistics:
    calls: int
    errors: int
    drops: int
    stalls: int
    corruptions: int
    refused: int


class FaultyStore:
    """`inner`, failing a share of calls as configured; see the module docstring."""

    def __init__(self, inner: ObjectStore, *, seed: int, error_rate: float = 0.0, stall_rate: float = 0.0,
                 stall_s: float = 0.05, drop_rate: float = 0.0, corrupt_rate: float = 0.0, down: bool = False,
                 sleep: Callable[[float], None] = time.sleep):
        self.inner = inner
        self.seed = seed
        self.error_rate = error_rate
        self.stall_rate = stall_rate
        self.stall_s = stall_s
        self.drop_rate = drop_rate
        self.corrupt_rate = corrupt_rate
        self.down = down
        self._sleep = sleep
        self._lock = threading.Lock()
        self._seen: Counter[tuple[str, str]] = Counter()
        self._counts: Counter[str] = Counter()

    @property
    def location(self) -> str:
        return self.inner.location

    def statistics(self) -> FaultStatistics:
        with self._lock:
            c = self._counts
            return FaultStatistics(c["calls"], c["errors"], c["drops"], c["stalls"], c["corruptions"], c["refused"])

    def _fate(self, op: str, key: str) -> random.Random:
        with self._lock:
            self._counts["calls"] += 1
            n = self._seen[op, key]
            self._seen[op, key] += 1
        return random.Random(f"{self.seed}:{op}:{key}:{n}")

    def _count(self, what: str) -> None:
        with self._lock:
            self._counts[what] += 1

    def _run(self, op: str, key: str, call: Callable[[], T]) -> tuple[T, random.Random]:
        rng = self._fate(op, key)
        if self.down:
            self._count("refused")
            raise StoreError(f"{op} {key}: {self.location} is down (injected)")
        fate = rng.random()
        if fate < self.error_rate:
            self._count("errors")
            raise TransientStoreError(f"{op} {key}: injected transient error")
        if rng.random() < self.stall_rate:
            self._count("stalls")
            self._sleep(self.stall_s)
        result = call()
        if fate < self.error_rate + self.drop_rate:
            self._count("drops")
            raise TransientStoreError(f"{op} {key}: connection dropped (injected)")
        return result, rng

    def put(self, key: str, data: bytes) -> None:
        self._run("put", key, lambda: self.inner.put(key, data))

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        data, rng = self._run("get", key, lambda: self.inner.get(key, offset, length))
        if data and rng.random() < self.corrupt_rate:
            self._count("corruptions")
            flipped = bytearray(data)
            flipped[rng.randrange(len(flipped))] ^= 0xFF
            return bytes(flipped)
        return data

    def exists(self, key: str) -> bool:
        return self._run("exists", key, lambda: self.inner.exists(key))[0]

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        entries, _ = self._run("list", prefix, lambda: iter(self.inner.list(prefix)))
        yield from entries

    def delete(self, key: str) -> None:
        self._run("delete", key, lambda: self.inner.delete(key))

    def create_if_missing(self) -> object:
        return self.inner.create_if_missing()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # put_if_absent, when the inner store has it, fails like the rest.
        if name == "put_if_absent" and "inner" in self.__dict__ and hasattr(self.inner, name):
            return lambda key, data: self._run(name, key, lambda: self.inner.put_if_absent(key, data))[0]
        raise AttributeError(name)
