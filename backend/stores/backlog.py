"""The backlog: a store in front of another that writers never wait on while it is down.

A live mount writes through it. While the backlog is empty, a write goes straight to the store.
When one fails (the store unreachable, too slow, out of space), or a read or listing has just
failed (so a write would only wait out the same retry budget before failing too), that object and
every write after it are kept on local disk instead, in the order they were made, and `drain()` (run by the mount in
the background) writes them to the store in that order, removing each once it is stored. A snapshot
is therefore done once it is on local disk, and later snapshots queue behind it, each keeping its
own instant. The order keeps the repository's rule that a snapshot object is written only after
everything it references: objects under `data/` go up several at a time, every other object
(index, snapshot) only once everything staged before it is stored.

Every staged object is checked against its name (a content hash) before it goes to the store: one
damaged on local disk stops the upload there, with an error that names it, so the store never
takes a corrupt object, nor anything staged after it that may need it.

Reads see both: a staged object is read from local disk. The backlog is bounded: a write that would
take it past `limit_bytes` raises `BacklogFull`, a `StoreError`, so the snapshot that needed it
waits (the live tree keeps working) and the status says why.

Once a request to the store fails, the store counts as failing (`store_failing_since`) until one
answers: the drain's next upload, or `probe()`, a cheap question the mount asks in the background.
Meanwhile the live mount answers what it can from what it knows (`.snapshots` lists the snapshots
it knew and those staged here) rather than wait out a retry budget on every request, and a read of
an object not staged here fails at once: the store is not asked until it answers the probe.

A backlog opened for a repository whose store did not answer at all (`unanswered`: the mount opened
from the local copies of config and key) starts as failing, and lets nothing reach the store until
`rejoin(store)` has passed once the store answers: the store must still hold that repository. It
returns the store to use from then on (the same, guarded by the lock the mount takes then).

On disk: one file per object, `<sequence>-<quoted key>`, written as a `LocalStore` writes (temp
file, fsync, rename). A backlog found at start (after a crash or `umount --lazy`) is taken up where
it was left. Other processes opening the repository read the keys staged here (`staged_keys`), so
they do not take a staged index object or pack for one missing from the store.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote, unquote

from ..errors import ObjectNotFound, StoreError
from ..replicas import object_intact
from .base import ObjectStore
from .local import LocalStore

log = logging.getLogger(__name__)

T = TypeVar("T")

DRAIN_PARALLEL = 4  # data objects written to the store at once while draining
_ORDERED_FREELY = "data/"  # packs reference nothing: they may reach the store in any order


class BacklogFull(StoreError):
    """The backlog holds all it may; the store has to take some of it first."""


class DamagedBacklog(StoreError):
    """A staged object no longer matches its name: the local disk damaged it."""


class StoreReplaced(StoreError):
    """The store answers again, but holds another repository (or none) than the backlog's."""


@dataclass(frozen=True)
class _Staged:
    sequence: int
    key: str
    size: int

    @property
    def file_name(self) -> str:
        return f"{self.sequence:012d}-{quote(self.key, safe='')}"


def _parse(file_name: str, size: int) -> _Staged | None:
    sequence, dash, quoted = file_name.partition("-")
    if not dash or not sequence.isdigit():
        return None
    return _Staged(int(sequence), unquote(quoted), size)


def _remove_partial_files(directory: str) -> None:
    """Temp files of writes a crash interrupted: their objects were never staged."""
    for entry in os.scandir(directory):
        if entry.name.startswith(".tmp-"):
            os.unlink(entry.path)


def staged_keys(backlogs_root: str, prefix: str) -> set[str]:
    """Keys starting with `prefix` that wait in any backlog under `backlogs_root`."""
    keys = set()
    try:
        backlogs = [entry.path for entry in os.scandir(backlogs_root) if entry.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return keys
    for directory in backlogs:
        for file_name, size in LocalStore(directory).list():
            staged = _parse(file_name, size)
            if staged is not None and staged.key.startswith(prefix):
                keys.add(staged.key)
    return keys


@dataclass
class BacklogStatus:
    objects: int
    bytes: int
    snapshots: int  # snapshot objects among them: snapshots taken but not yet in the store
    limit_bytes: int
    last_error: str | None  # why the store did not take them, or did not answer
    store_failing_since: float | None  # wall-clock time of the first failure the store has not answered since


class BacklogStore:
    """`inner`, with every write that it cannot take now kept in `directory` until `drain()`."""

    def __init__(self, inner: ObjectStore, directory: str, limit_bytes: int, *,
                 unanswered: StoreError | None = None):
        self.inner = inner
        self.limit_bytes = limit_bytes
        self._files = LocalStore(directory)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        _remove_partial_files(directory)
        self._lock = threading.Lock()
        self._staged: dict[str, _Staged] = {}
        self._staging = 0  # writes to local disk in progress
        self._bytes = 0
        self._hold = False
        self._failing_since: float | None = None  # when a request to the store failed, none answering since
        self._draining = threading.Lock()  # one drain at a time: each object is stored once
        self._pool = ThreadPoolExecutor(DRAIN_PARALLEL, thread_name_prefix="backlog")
        self.last_error: str | None = None
        # Called (on the writing thread) each time an object has reached the store, before the write
        # returns: the live mount records then what a --degraded replica missed.
        self.on_stored: Callable[[], None] | None = None
        # With `unanswered`: what must pass, once the store answers, before anything goes there.
        self.rejoin: Callable[[ObjectStore], ObjectStore] | None = None
        self._rejoin_pending = unanswered is not None
        self._rejoining = threading.Lock()
        if unanswered is not None:
            self._failing_since = time.time()
            self.last_error = str(unanswered)
        found = [s for s in (_parse(n, size) for n, size in self._files.list()) if s is not None]
        for staged in sorted(found, key=lambda s: s.sequence):
            self._staged[staged.key] = staged
            self._bytes += staged.size
        self._next_sequence = max((s.sequence for s in found), default=-1) + 1
        if found:
            log.info("backlog of %d objects (%d bytes) left by the last mount; uploading it", len(found), self._bytes)

    @property
    def location(self) -> str:
        return self.inner.location

    def hold(self) -> None:
        """Keep every later write on local disk, and stop draining (`umount --lazy`: the next mount
        uploads it all)."""
        with self._lock:
            self._hold = True

    def status(self) -> BacklogStatus:
        with self._lock:
            failing = self._staged or self._failing_since is not None
            return BacklogStatus(len(self._staged), self._bytes,
                                 sum(key.startswith("snapshots/") for key in self._staged),
                                 self.limit_bytes, self.last_error if failing else None, self._failing_since)

    def store_failing_since(self) -> float | None:
        """When a request to the store failed (wall-clock seconds), if none has answered since."""
        with self._lock:
            return self._failing_since

    def probe(self) -> bool:
        """Ask the store a cheap question: whether it answers (it then counts as failing no more)."""
        try:
            self._ask_store(lambda: self.inner.exists("config"))
        except StoreError:
            return False
        return True

    def __contains__(self, key: str) -> bool:
        """Whether `key` waits here for the store."""
        with self._lock:
            return key in self._staged

    def keys_waiting(self, prefix: str = "") -> list[str]:
        """The keys starting with `prefix` that wait here for the store, oldest first."""
        with self._lock:
            staged = sorted(self._staged.values(), key=lambda s: s.sequence)
        return [s.key for s in staged if s.key.startswith(prefix)]

    def is_empty(self) -> bool:
        with self._lock:
            return not self._staged and not self._staging

    def writes_go_to_store(self) -> bool:
        """Whether a write now goes straight to the store: nothing waits here, nothing holds the
        backlog, and the store answered its last request."""
        with self._lock:
            return self._writes_go_to_store()

    def _writes_go_to_store(self) -> bool:
        return not self._staged and not self._staging and not self._hold and self._failing_since is None

    def _store_failed(self, exc: StoreError) -> bool:
        """A request failed: keep the next writes here rather than wait on the store again. Whether
        the store was answering until now."""
        if isinstance(exc, ObjectNotFound):
            return False  # an answer, not a failure
        self.last_error = str(exc)
        with self._lock:
            answering = self._failing_since is None
            if answering:
                self._failing_since = time.time()
        return answering

    def _read_failed(self, exc: StoreError) -> None:
        if self._store_failed(exc):
            log.warning("%s; writes wait on local disk until the store answers", exc)

    def _rejoined(self) -> bool:
        """Whether the store may be used: always, unless the backlog was opened without it; then
        once `rejoin` has passed (it runs here, once the store answers)."""
        if not self._rejoin_pending:
            return True
        with self._rejoining:
            if not self._rejoin_pending:
                return True
            try:
                if self.rejoin is None:
                    raise StoreError("the store answers, but nothing checked that it holds this repository")
                self.inner = self.rejoin(self.inner)
            except StoreError as exc:
                if str(exc) != self.last_error:
                    log.error("%s", exc)
                self.last_error = str(exc)
                return False
            self._rejoin_pending = False
        log.info("the store answers and holds this repository: the backlog goes there now")
        return True

    def _store_answered(self) -> None:
        if not self._rejoined():
            return  # still counts as failing: nothing may go there
        with self._lock:
            failing_since, self._failing_since = self._failing_since, None
        if failing_since is not None:
            log.info("the store answers again (it failed for %.0f s)", time.time() - failing_since)

    # -- the ObjectStore operations -------------------------------------------------------------------

    def create_if_missing(self) -> object:
        return self.inner.create_if_missing()

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            if key in self._staged:
                return  # keys name their content: the staged copy is this object
            direct = self._writes_go_to_store()
        if direct:
            try:
                self.inner.put(key, data)
                self._stored()
                return
            except StoreError as exc:
                self._store_failed(exc)
                log.warning("%s; keeping it, and what follows, on local disk until the store takes them", exc)
        self._stage(key, data)

    def _stage(self, key: str, data: bytes) -> None:
        with self._lock:
            if self._staged and self._bytes + len(data) > self.limit_bytes:
                raise BacklogFull(f"the backlog is full: {self._bytes / 2**20:.0f} MiB wait for "
                                  f"{self.inner.location} (limit {self.limit_bytes / 2**20:.0f} MiB); "
                                  f"the store's last error: {self.last_error}")
            staged = _Staged(self._next_sequence, key, len(data))
            self._next_sequence += 1
            self._staging += 1
            self._bytes += staged.size
        try:
            self._files.put(staged.file_name, data)
        except BaseException as exc:
            with self._lock:
                self._staging -= 1
                self._bytes -= staged.size
            if isinstance(exc, StoreError):
                raise StoreError(f"the store cannot take {key} now ({self.last_error}), and neither can the "
                                 f"backlog on local disk: {exc}") from exc
            raise
        with self._lock:
            self._staging -= 1
            self._staged[key] = staged

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        with self._lock:
            staged = self._staged.get(key)
        if staged is not None:
            try:
                return self._files.get(staged.file_name, offset, length)
            except ObjectNotFound:
                pass  # stored and removed from the backlog meanwhile
        failing_since = self.store_failing_since()
        if failing_since is not None:  # asking would wait out the retry budget, and fail the same
            since = time.strftime("%H:%M:%S", time.localtime(failing_since))
            raise StoreError(f"{self.inner.location} has not answered since {since}, so {key} is not "
                             f"asked for until it does ({self.last_error})")
        return self._ask_store(lambda: self.inner.get(key, offset, length))

    def exists(self, key: str) -> bool:
        with self._lock:
            if key in self._staged:
                return True
        return self._ask_store(lambda: self.inner.exists(key))

    def _ask_store(self, read: Callable[[], T]) -> T:
        try:
            answer = read()
        except StoreError as exc:
            self._read_failed(exc)
            raise
        self._store_answered()
        return answer

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        with self._lock:
            staged = [(s.key, s.size) for s in self._staged.values() if s.key.startswith(prefix)]
        yield from staged
        seen = {key for key, _ in staged}
        try:
            for key, size in self.inner.list(prefix):
                if key not in seen:
                    yield key, size
        except StoreError as exc:
            self._read_failed(exc)
            raise
        self._store_answered()

    def delete(self, key: str) -> None:
        with self._lock:
            staged = self._staged.pop(key, None)
            if staged is not None:
                self._bytes -= staged.size
        if staged is not None:
            self._files.delete(staged.file_name)
        self.inner.delete(key)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.inner.close()

    # -- draining -------------------------------------------------------------------------------------

    def drain(self) -> int:
        """Write everything staged to the store, in order; how many bytes that was.

        Raises `StoreError` when the store fails; what is not stored yet stays staged."""
        drained = 0
        with self._draining:
            if not self._rejoined():
                raise StoreError(self.last_error or "the store was not checked to hold this repository")
            while True:
                batch = self._next_batch()
                if not batch:
                    return drained
                for staged in self._pool.map(self._push, batch):
                    drained += staged.size

    def _next_batch(self) -> list[_Staged]:
        """The oldest staged object, with the data objects right behind it when it is one; nothing
        once the backlog is held."""
        with self._lock:
            if self._hold:
                return []
            queue = sorted(self._staged.values(), key=lambda s: s.sequence)
        batch: list[_Staged] = []
        for staged in queue:
            if not staged.key.startswith(_ORDERED_FREELY):
                return batch or [staged]
            batch.append(staged)
            if len(batch) == 2 * DRAIN_PARALLEL:
                break
        return batch

    def _push(self, staged: _Staged) -> _Staged:
        data = self._files.get(staged.file_name)
        if not object_intact(staged.key, data):
            self.last_error = (f"{staged.key} is damaged in the backlog on local disk "
                               f"({os.path.join(self._files.root, staged.file_name)}); nothing staged after it "
                               f"is uploaded, so the store never holds a snapshot that needs it")
            log.error("%s", self.last_error)
            raise DamagedBacklog(self.last_error)
        try:
            self.inner.put(staged.key, data)
        except StoreError as exc:
            self._store_failed(exc)
            raise
        self._store_answered()
        with self._lock:
            if self._staged.pop(staged.key, None) is not None:
                self._bytes -= staged.size
        self._files.delete(staged.file_name)  # a crash before this only writes it to the store again
        self._stored()
        return staged

    def _stored(self) -> None:
        if self.on_stored is not None:
            self.on_stored()
