"""Several stores holding the same objects: writes reach all of them, reads take the first good copy.

- `put` and `delete` run on every replica at once (the first in the calling thread, the others in a
  pool) and return when all have finished. A replica that fails makes the call fail, naming it, unless
  the store is `degraded`: then the others carry on and `missing_objects()` records what the failed
  replica lacks, for the caller to persist and `verify --repair` to heal later.
- `get` asks the replicas in order and falls back to the next on an error, a missing object, or (for
  whole objects, given a `verify(key, data)` callable) content that does not check out; each fallback
  logs a warning naming the replica. Ranged reads cannot be verified here: the caller checks them.
- `exists` is true if any replica has the object; `list` is the union, each key once, of the
  replicas that answer (a warning names one that does not; all failing is an error).
- A replica that fails for a reason other than a missing object is taken as down for
  `DOWN_FOR_S`: reads skip it, and degraded writes record what it lacks without asking it.
  Each request to a store that is down waits out its retries (a minute by default), so asking it
  once per object made a degraded backup take 8 minutes instead of seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import FolderMissing, IntegrityError, LocationMissing, ObjectNotFound, StoreError, StoreUnreachable
from .base import ObjectStore

log = logging.getLogger(__name__)

DOWN_FOR_S = 300.0  # how long a failed replica is left alone before it is asked again
ALL_DOWN_RETRY_S = 5.0  # when every replica failed: how soon they are all asked again (see _left_alone)


@dataclass(frozen=True)
class MissingObject:
    """`key` did not reach the replica at `replica` (a location) during a degraded write."""

    replica: str
    key: str


def _common_failure(failures: list[StoreError | None]) -> type[StoreError] | None:
    """The failure replicas that all failed share, as one store would have failed: every folder
    missing (a disk not mounted), every location missing or without the object, or every replica
    not answering (down, or its folder gone, which a live mount takes alike); else None."""
    failed = [exc for exc in failures if not isinstance(exc, ObjectNotFound)]
    if not failed or None in failed:
        return None
    for kind, counted in ((FolderMissing, FolderMissing), (LocationMissing, LocationMissing),
                          (StoreUnreachable, (StoreUnreachable, FolderMissing))):
        if all(isinstance(exc, counted) for exc in failed):
            return kind
    return None


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
        self._down: dict[int, tuple[float, StoreError]] = {}  # replica index -> when it last failed, how
        self._lock = threading.Lock()

    def _is_down(self, i: int) -> bool:
        return self._down_because(i) is not None

    def _left_alone(self) -> list[StoreError | None]:
        """For each replica, how it failed if a read is to leave it alone: each that failed less
        than DOWN_FOR_S ago. When every one did, there is no other to read from: they are all
        asked again once the last failure is ALL_DOWN_RETRY_S old, which is how a live mount finds
        its store back (a disk mounted again) within seconds, while a command's calls in between
        fail at once instead of each waiting out the replicas' retries."""
        down = [self._down_because(i) for i in range(len(self.replicas))]
        if all(down):
            with self._lock:
                last = max(since for since, _ in self._down.values())
            if time.monotonic() - last >= ALL_DOWN_RETRY_S:
                return [None] * len(down)
        return down

    def _down_because(self, i: int) -> StoreError | None:
        """How replica `i` failed, if it did less than DOWN_FOR_S ago."""
        with self._lock:
            since, exc = self._down.get(i, (-DOWN_FOR_S, None))
        return exc if time.monotonic() - since < DOWN_FOR_S else None

    def _mark_down(self, i: int, exc: StoreError) -> None:
        if isinstance(exc, ObjectNotFound):
            return
        with self._lock:
            since, _ = self._down.get(i, (-DOWN_FOR_S, None))
            self._down[i] = time.monotonic(), exc  # asked again and failed again: from now on
            if time.monotonic() - since < DOWN_FOR_S:
                return
        log.warning("replica %s failed (%s); not asked again for %.0f s", self.replicas[i].location, exc, DOWN_FOR_S)

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

    def create_if_missing(self) -> None:
        """Create each replica's folder or bucket where it is missing (`fsmount init`, `migrate`)."""
        for replica in self.replicas:
            replica.create_if_missing()

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
        left_alone = self._left_alone()
        for i, replica in enumerate(self.replicas):
            down = left_alone[i]
            if down is not None:
                failures.append((replica, "is down", down))
                continue
            try:
                data = replica.get(key, offset, length)
            except StoreError as exc:
                failures.append((replica, "has no copy" if isinstance(exc, ObjectNotFound) else f"failed: {exc}",
                                 exc))
                self._mark_down(i, exc)
                continue
            if self.verify is not None and whole and not self.verify(key, data):
                failures.append((replica, "returned content that does not match", None))
                continue
            for failed, why, _ in failures:
                if why != "is down":
                    log.warning("replica %s %s of %s; read it from %s", failed.location, why, key, replica.location)
            return data
        if all(isinstance(exc, ObjectNotFound) for _, _, exc in failures):
            raise ObjectNotFound(f"object {key} not found in any replica ({self.location})")
        detail = "; ".join(f"{r.location} {why}" for r, why, _ in failures)
        kind = _common_failure([exc for _, _, exc in failures])
        if kind is not None:  # each replica failed so: the one store the replicas stand for did
            raise kind(f"no replica holds {key}: " + "; ".join(str(exc) for _, _, exc in failures))
        if all(exc is None or isinstance(exc, ObjectNotFound) for _, _, exc in failures):
            raise IntegrityError(f"no replica has a good copy of {key}: {detail}")
        raise StoreError(f"reading {key}: no replica could serve it: {detail}")

    def get_from_each(self, key: str) -> Iterator[tuple[str, bytes | None]]:
        """(location, object or None where it has none) from each replica that answers with a copy
        that checks out (a warning names one whose copy does not: it is as good as unreachable)."""
        left_alone = self._left_alone()
        for i, replica in enumerate(self.replicas):
            if left_alone[i] is not None:
                continue
            try:
                data = replica.get(key)
            except ObjectNotFound:
                yield replica.location, None
                continue
            except StoreError as exc:
                self._mark_down(i, exc)
                continue
            if self.verify is not None and not self.verify(key, data):
                log.warning("replica %s returned a damaged copy of %s: `fsmount verify --read-data --repair` "
                            "heals it", replica.location, key)
                continue
            yield replica.location, data

    def exists(self, key: str) -> bool:
        errors: list[tuple[ObjectStore, StoreError]] = []
        left_alone = self._left_alone()
        for i, replica in enumerate(self.replicas):
            down = left_alone[i]
            if down is not None:
                errors.append((replica, down))
                continue
            try:
                if replica.exists(key):
                    return True
            except StoreError as exc:
                errors.append((replica, exc))
                self._mark_down(i, exc)
        if len(errors) == len(self.replicas):
            replica, exc = errors[0]
            kind = _common_failure([exc for _, exc in errors]) or StoreError
            raise kind(f"looking up {key}: replica {replica.location} failed: {exc}") from exc
        return False

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        seen: set[str] = set()
        failed: list[tuple[ObjectStore, StoreError]] = []
        left_alone = self._left_alone()
        for i, replica in enumerate(self.replicas):
            down = left_alone[i]
            if down is not None:
                failed.append((replica, down))
                continue
            try:
                for key, size in replica.list(prefix):
                    if key not in seen:
                        seen.add(key)
                        yield key, size
            except StoreError as exc:
                failed.append((replica, exc))
                self._mark_down(i, exc)
        if len(failed) == len(self.replicas):
            replica, exc = failed[0]
            kind = _common_failure([exc for _, exc in failed]) or StoreError
            raise kind(f"listing {prefix or '/'}: replica {replica.location} failed: {exc}") from exc

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
        errors: dict[int, StoreError] = {}
        if self.degraded:
            errors = {i: StoreError("it is down") for i in indices if self._is_down(i)}
        asked = [i for i in indices if i not in errors]
        futures = {i: self._pool.submit(op, self.replicas[i]) for i in asked[1:]}
        if asked:
            try:
                op(self.replicas[asked[0]])
            except StoreError as exc:
                errors[asked[0]] = exc
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
            if i in asked:
                log.warning("%s: replica %s failed, continuing without it (degraded): %s",
                            doing, self.replicas[i].location, exc)
                self._mark_down(i, exc)
            if key is not None:
                with self._lock:
                    self._missing[i, key] = None
