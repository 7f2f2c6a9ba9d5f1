"""Retrying a store call: exponential backoff with full jitter, bounded in total time.

A store decides what is transient by raising `TransientStoreError` (for S3 that decision is
`s3.translate_error`); this module only decides how long to keep trying. `call_with_retry` is used
inside `S3Store` for every request, and `RetryingStore` wraps any other store the same way (tests wrap a
`FaultyStore` in it). When the budget runs out the last error is re-raised as `StoreUnreachable`, a
`StoreError` but no `TransientStoreError`, so an outer layer does not retry the same failure again,
while a caller making many calls can tell "the store stopped answering" from a refusal.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from ..errors import StoreUnreachable, TransientStoreError
from .base import ObjectStore

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying: `budget_s` in total, sleeping up to `initial_delay_s * 2**n` between
    attempts (never more than `max_delay_s`)."""

    budget_s: float = 60.0
    initial_delay_s: float = 0.1
    max_delay_s: float = 5.0

    def delay_s(self, failures: int, rng: random.Random | None = None) -> float:
        """Full jitter: uniform in [0, min(max, initial * 2**(failures-1))]."""
        ceiling = min(self.max_delay_s, self.initial_delay_s * 2 ** min(failures - 1, 30))
        return (rng or random).uniform(0, ceiling)


def call_with_retry(fn: Callable[[], T], *, policy: RetryPolicy, doing: str,
                    sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> T:
    """`fn()`, called again after each `TransientStoreError` until it succeeds or the budget is spent.

    `doing` says what the call was for ("reading data/ab/... from s3:bucket"); it starts the message of
    the `StoreUnreachable` raised when giving up. Any other exception propagates at once.
    """
    start = clock()
    failures = 0
    while True:
        try:
            return fn()
        except TransientStoreError as exc:
            failures += 1
            elapsed = clock() - start
            if elapsed >= policy.budget_s:
                raise StoreUnreachable(f"{doing}: gave up after {failures} attempt{'s' if failures > 1 else ''} "
                                       f"in {elapsed:.1f} s: {exc}") from exc
            # the last wait is cut to the budget, and one more attempt made at its end: a budget
            # of 3 s used to end after 0.7 s, when the next wait would have gone past it
            delay = min(policy.delay_s(failures), policy.budget_s - elapsed)
            log.info("%s: %s; retrying in %.2f s", doing, exc, delay)
            sleep(delay)


class RetryingStore:
    """Any store, with every call retried on `TransientStoreError` under one `RetryPolicy`.

    `list` is retried only until it yields its first entry; a failure later in the stream propagates,
    since a restarted listing cannot tell which entries the caller has already seen.
    """

    def __init__(self, inner: ObjectStore, policy: RetryPolicy = RetryPolicy()):
        self.inner = inner
        self.policy = policy

    @property
    def location(self) -> str:
        return self.inner.location

    def _retry(self, doing: str, fn: Callable[[], T]) -> T:
        return call_with_retry(fn, policy=self.policy, doing=f"{doing} {self.inner.location}")

    def create_if_missing(self) -> object:
        return self._retry("creating", self.inner.create_if_missing)

    def put(self, key: str, data: bytes) -> None:
        self._retry(f"writing {key} to", lambda: self.inner.put(key, data))

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._retry(f"reading {key} from", lambda: self.inner.get(key, offset, length))

    def exists(self, key: str) -> bool:
        return self._retry(f"looking up {key} in", lambda: self.inner.exists(key))

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        def start() -> tuple[Iterator[tuple[str, int]], tuple[str, int] | None]:
            entries = iter(self.inner.list(prefix))
            return entries, next(entries, None)

        entries, first = self._retry(f"listing {prefix or '/'} in", start)
        if first is not None:
            yield first
            yield from entries

    def delete(self, key: str) -> None:
        self._retry(f"deleting {key} from", lambda: self.inner.delete(key))

    def close(self) -> None:
        self.inner.close()
