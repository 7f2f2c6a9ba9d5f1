"""Several stores holding the same objects: writes reach all of them, reads take the first good copy.

- `put` and `delete` run on every replica at once (the first in the calling thread, the others in a
  pool) and return when all have finished. A replica that fails makes the call fail, naming it, unless
  the store is `degraded`: then the others carry on and `missing_objects()` records what the failed
  replica lacks, for the caller to persist and `verify --repair` to heal later.
- `get` asks the replicas in order and falls back to the next on an error, a missing object, or (for
  whole objects, given a `verify(key, data)` callable) content that does not check out; each fallback
  logs a warning naming the replica. Ranged reads cannot be verified here: the caller checks them.
- `exists` is true if any replica has the object; `list` is the union, each key once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import IntegrityError, ObjectNotFound, StoreError
from .base import ObjectStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MissingObject:
    """`key` did not reach the replica at `replica` (a location) during a degraded write."""

    replica: str
    key: str


class ReplicatedStore:
    """`stores` as one store; see the module docstring for the behaviour."""

    def __init__(self, stores: Sequence[ObjectStore], *, verify: Callable[[str, bytes], bool] | None = None,
                 degraded: bool = False, max_workers: int = 16):
        if not stores:
            raise StoreError("a replicated store needs at least one replica")
        self.replicas: tuple[ObjectStore, ...] = tuple(stores)
        self.verify = verify
        self.degraded = degraded
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="replica")
        self._missing: dict[tuple[int, str], None] = {}  # (replica index, key), in the order they failed
        self._lock = threading.Lock()

    @property
    def location(self) -> str:
        return ", ".join(r.location for r in self.replicas)

    def missing_objects(self) -> list[MissingObject]:
        """What degraded writes left out, oldest first (a later successful put of the key removes it)."""
        with self._lock:
            return [MissingObject(self.replicas[i].location, key) for i, key in self._missing]

    def take_missing_objects(self) -> list[MissingObject]:
        """`missing_objects()`, forgetting them: for a caller that has just persisted the list."""
        with self._lock:
            taken = [MissingObject(self.replicas[i].location, key) for i, key in self._missing]
            self._missing.clear()
        return taken

    def put(self, key: str, data: bytes) -> None:
        self._write(f"writing {key}", key, range(len(self.replicas)), lambda r: r.put(key, data))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` on the first replica only if it is absent there (a lock), then copy it to the rest."""
        primary = self.replicas[0]
        if not hasattr(primary, "put_if_absent"):
            raise StoreError(f"{primary.location} cannot create objects conditionally")
        if not primary.put_if_absent(key, data):
            return False
        self._write(f"writing {key}", key, range(1, len(self.replicas)), lambda r: r.put(key, data))
        return True

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        whole = offset == 0 and length is None
        failures: list[tuple[ObjectStore, str, StoreError | None]] = []
        for replica in self.replicas:
            try:
                data = replica.get(key, offset, length)
            except StoreError as exc:
                failures.append((replica, "has no copy" if isinstance(exc, ObjectNotFound) else f"failed: {exc}",
                                 exc))
                continue
            if self.verify is not None and whole and not self.verify(key, data):
                failures.append((replica, "returned content that does not match", None))
                continue
            for failed, why, _ in failures:
                log.warning("replica %s %s of %s; read it from %s", failed.location, why, key, replica.location)
            return data
        if all(isinstance(exc, ObjectNotFound) for _, _, exc in failures):
            raise ObjectNotFound(f"object {key} not found in any replica ({self.location})")
        detail = "; ".join(f"{r.location} {why}" for r, why, _ in failures)
        if all(exc is None or isinstance(exc, ObjectNotFound) for _, _, exc in failures):
            raise IntegrityError(f"no replica has a good copy of {key}: {detail}")
        raise StoreError(f"reading {key}: no replica could serve it: {detail}")

    def exists(self, key: str) -> bool:
        errors: list[tuple[ObjectStore, StoreError]] = []
        for replica in self.replicas:
            try:
                if replica.exists(key):
                    return True
            except StoreError as exc:
                errors.append((replica, exc))
        if len(errors) == len(self.replicas):
            replica, exc = errors[0]
            raise StoreError(f"looking up {key}: replica {replica.location} failed: {exc}") from exc
        return False

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        seen: set[str] = set()
        for replica in self.replicas:
            try:
                for key, size in replica.list(prefix):
                    if key not in seen:
                        seen.add(key)
                        yield key, size
            except StoreError as exc:
                if not self.degraded:
                    raise StoreError(f"listing {prefix or '/'}: replica {replica.location} failed: {exc}") from exc
                log.warning("listing %s: skipping replica %s: %s", prefix or "/", replica.location, exc)

    def delete(self, key: str) -> None:
        self._write(f"deleting {key}", None, range(len(self.replicas)), lambda r: r.delete(key))

    def close(self) -> None:
        self._pool.shutdown()
        for replica in self.replicas:
            replica.close()

    def _write(self, doing: str, key: str | None, indices: range, op: Callable[[ObjectStore], None]) -> None:
        """`op` on the replicas at `indices` at once; then fail, or (degraded) record what is missing."""
        if not indices:
            return
        futures = {i: self._pool.submit(op, self.replicas[i]) for i in indices[1:]}
        errors: dict[int, StoreError] = {}
        try:
            op(self.replicas[indices[0]])
        except StoreError as exc:
            errors[indices[0]] = exc
        for i, future in futures.items():
            exc = future.exception()
            if isinstance(exc, StoreError):
                errors[i] = exc
            elif exc is not None:
                raise exc
        if key is not None:
            with self._lock:
                for i in indices:
                    if i not in errors:
                        self._missing.pop((i, key), None)
        if not errors:
            return
        detail = "; ".join(f"replica {self.replicas[i].location} failed: {exc}" for i, exc in errors.items())
        if not self.degraded or len(errors) == len(self.replicas):
            raise StoreError(f"{doing}: {detail}") from next(iter(errors.values()))
        for i, exc in errors.items():
            log.warning("%s: replica %s failed, continuing without it (degraded): %s",
                        doing, self.replicas[i].location, exc)
            if key is not None:
                with self._lock:
                    self._missing[i, key] = None
