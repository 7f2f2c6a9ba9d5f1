"""Repository locks, as restic's: small objects under `locks/` that say who is working on the repository.

A lock is `locks/<random id>`, sealed (FORMAT.md), recording host, pid, command, when it was taken and
last refreshed, and whether it is exclusive. Most work takes a *shared* lock (backup, restore, verify,
a mount): any number may coexist. Work that deletes or rewrites objects others may rely on takes an
*exclusive* one (`migrate --delete-source`, `verify --repair`): it is refused while any other lock
exists, and a shared one is refused while an exclusive one exists (`LockedError`, exit 11).

Taking a lock is one PUT of our lock, one LIST of `locks/` (and a GET of each other lock found), so
it costs a no-change backup little. Listing *after* putting is what makes it safe without a lock
server: of two conflicting takers, the later PUT's LIST sees the earlier lock, so at least one of them
refuses (both may, then each removes its own); neither goes on unseen.

A lock is *stale*, ignored and removed by the next taker, when it was not refreshed for `stale_s`
(restic: 30 minutes), or when it comes from this host and its process is gone (a `kill -9`: cleared
at once). A holder refreshes its lock every `refresh_s` (restic: 5 minutes) on a thread of its own.
When it cannot for so long that others may soon take the lock for stale (`stale_s - refresh_s`), or
finds it removed (`fsmount unlock --remove-all`), the lock is *lost*: every later write through
`LockGuardedStore` raises `LockLost`, so the holder stops writing (restic aborts). A holder made with
`retake=True` (the live mount) instead keeps trying to take a new lock, and writes again once it has
one; meanwhile `LockLost`, a `StoreError`, makes the mount's backlog keep its snapshots on local disk.

With replicas, the lock goes to every replica that answers (at least one must), and takers list every
replica that answers.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Self

import msgpack

from .crypto import MasterKey, random_id
from .errors import IntegrityError, LockedError, ObjectNotFound, StoreError
from .stores.base import ObjectStore
from .stores.local import LocalStore, process_exists

log = logging.getLogger(__name__)

LOCK_PREFIX = "locks/"
LOCK_AD = b"fsmount lock"
STALE_S = 30 * 60.0  # restic's staleTimeout
REFRESH_S = 5 * 60.0  # restic's refreshInterval


def stale_after_s() -> float:
    """How long a lock may go unrefreshed before others take it for stale (FSMOUNT_LOCK_STALE_S)."""
    return float(os.environ.get("FSMOUNT_LOCK_STALE_S") or STALE_S)


def refresh_every_s() -> float:
    """How often a holder refreshes its lock (FSMOUNT_LOCK_REFRESH_S)."""
    return float(os.environ.get("FSMOUNT_LOCK_REFRESH_S") or REFRESH_S)


class LockLost(LockedError, StoreError):
    """This process's lock was not refreshed in time, or was removed: it must not write any more.
    A `StoreError` too, so a live mount's backlog keeps what it writes until it holds a lock again."""


@dataclass
class LockInfo:
    """What a lock object says."""

    host: str
    pid: int
    command: str
    exclusive: bool
    time_ns: int  # when it was taken
    refreshed_ns: int

    def encode(self, key: MasterKey) -> bytes:
        doc = {"v": 1, "host": self.host, "pid": self.pid, "command": self.command,
               "exclusive": self.exclusive, "time_ns": self.time_ns, "refreshed_ns": self.refreshed_ns}
        return key.seal(msgpack.packb(doc), LOCK_AD)

    @classmethod
    def decode(cls, key: MasterKey, data: bytes, what: str) -> LockInfo:
        doc = msgpack.unpackb(key.unseal(data, LOCK_AD, what))
        try:
            return cls(str(doc["host"]), int(doc["pid"]), str(doc["command"]), bool(doc["exclusive"]),
                       int(doc["time_ns"]), int(doc["refreshed_ns"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"{what} is malformed: {exc}") from exc

    def stale_because(self, stale_s: float) -> str | None:
        """Why the lock is stale (its process is gone, or it was not refreshed for `stale_s`), or None."""
        if self.host == socket.gethostname() and not process_exists(self.pid):
            return f"its process {self.pid} on this host is gone"
        age_s = (time.time_ns() - self.refreshed_ns) / 1e9
        if age_s > stale_s:
            return f"not refreshed for {_duration(age_s)}"
        return None

    def describe(self) -> str:
        """One line naming the holder: `exclusive lock of host pid 123 (fsmount backup DIR), taken 3 min ago`."""
        now = time.time_ns()
        refreshed = (f", refreshed {_duration((now - self.refreshed_ns) / 1e9)} ago"
                     if self.refreshed_ns - self.time_ns > 1e9 else "")
        return (f"{'an exclusive' if self.exclusive else 'a shared'} lock of {self.host} pid {self.pid} "
                f"({self.command}), taken {_duration((now - self.time_ns) / 1e9)} ago{refreshed}")


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def replica_stores(store: ObjectStore) -> list[ObjectStore]:
    """The replicas of `store` (itself if it has none): where locks are written and listed."""
    return list(getattr(store, "replicas", None) or [store])


def _each_copy(copies: Sequence[ObjectStore], doing: str, op) -> None:  # type: ignore[no-untyped-def]
    """`op(copy)` on every replica; failures on some are logged, on all raised."""
    errors: list[StoreError] = []
    for copy in copies:
        try:
            op(copy)
        except StoreError as exc:
            log.debug("%s in %s failed: %s", doing, copy.location, exc)
            errors.append(exc)
    if len(errors) == len(copies):
        raise StoreError(f"{doing}: {errors[0]}") from errors[0]


def list_locks(copies: Sequence[ObjectStore], key: MasterKey) -> Iterator[tuple[str, LockInfo | None]]:
    """Every lock in any replica that answers: (object key, what it says, or None if it does not open)."""
    seen: set[str] = set()
    answered = 0
    failure: StoreError | None = None
    for copy in copies:
        try:
            names = [name for name, _ in copy.list(LOCK_PREFIX)]
        except StoreError as exc:
            failure = exc
            continue
        answered += 1
        for name in names:
            if name in seen:
                continue
            try:
                data = copy.get(name)
            except ObjectNotFound:  # released meanwhile
                continue
            except StoreError as exc:
                failure = exc
                continue
            seen.add(name)
            try:
                yield name, LockInfo.decode(key, data, name)
            except (IntegrityError, ValueError, msgpack.UnpackException) as exc:
                log.warning("lock %s cannot be read (%s): ignored (`fsmount unlock` removes it)", name, exc)
                yield name, None
    if not answered and failure is not None:
        raise StoreError(f"listing the locks: {failure}") from failure


def remove_lock(copies: Sequence[ObjectStore], name: str) -> None:
    """Delete one lock object from every replica."""
    _each_copy(copies, f"removing {name}", lambda copy: copy.delete(name))


class RepositoryLock:
    """A lock this process holds; `release()` it (a context manager does). See the module docstring."""

    def __init__(self, copies: Sequence[ObjectStore], key: MasterKey, *, exclusive: bool, command: str,
                 retake: bool = False, stale_s: float | None = None, refresh_s: float | None = None):
        self.copies = list(copies)  # the replicas (replica_stores), opened for the lock alone
        self.key = key
        self.exclusive = exclusive
        self.retake = retake
        self.stale_s = stale_after_s() if stale_s is None else stale_s
        self.refresh_s = refresh_every_s() if refresh_s is None else refresh_s
        now = time.time_ns()
        self.info = LockInfo(socket.gethostname(), os.getpid(), command, exclusive, now, now)
        self.name = ""
        self.lost_because: str | None = None
        self._refreshed = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, copies: Sequence[ObjectStore], key: MasterKey, *, exclusive: bool, command: str,
                retake: bool = False) -> RepositoryLock:
        """Take a lock in `copies` (every replica), or raise `LockedError` naming the holder of a
        conflicting one. The stores must stay open until `release()`."""
        lock = cls(copies, key, exclusive=exclusive, command=command, retake=retake)
        lock._take()
        lock._thread = threading.Thread(target=lock._keep_fresh, name="lock-refresh", daemon=True)
        lock._thread.start()
        return lock

    def _take(self) -> None:
        name = f"{LOCK_PREFIX}{random_id()}"
        now = time.time_ns()
        self.info.time_ns = self.info.refreshed_ns = now
        data = self.info.encode(self.key)
        _each_copy(self.copies, f"writing the lock {name}", lambda copy: copy.put(name, data))
        try:
            holder = self._conflicting(name)
        except BaseException:
            remove_lock(self.copies, name)
            raise
        if holder is not None:
            remove_lock(self.copies, name)
            raise LockedError(f"the repository is locked: {holder.describe()}; wait for it to finish, or if "
                              "that process is gone, `fsmount unlock` removes locks not refreshed for "
                              f"{_duration(self.stale_s)} or whose process on this host is gone "
                              "(`--remove-all`: every lock)")
        self.name = name
        self._refreshed = time.monotonic()
        self.lost_because = None

    def _conflicting(self, ours: str) -> LockInfo | None:
        """A live lock that ours may not coexist with; stale ones found are removed."""
        for name, info in list_locks(self.copies, self.key):
            if name == ours or info is None:
                continue
            why = info.stale_because(self.stale_s)
            if why is not None:
                log.info("removing the stale lock %s (%s): %s", name, why, info.describe())
                try:
                    remove_lock(self.copies, name)
                except StoreError as exc:
                    log.warning("could not remove the stale lock %s: %s", name, exc)
                continue
            if self.exclusive or info.exclusive:
                return info
        return None

    def check(self) -> None:
        """Raise `LockLost` if this process may no longer write under its lock."""
        if self.lost_because is None and time.monotonic() - self._refreshed > self.stale_s - self.refresh_s:
            self.lost_because = f"it could not be refreshed for {_duration(time.monotonic() - self._refreshed)}"
        if self.lost_because is not None:
            raise LockLost(f"this process lost its repository lock ({self.lost_because}), so it stopped writing"
                           + ("; it takes a new one as soon as it can" if self.retake else ""))

    def refresh(self) -> None:
        """Write the lock again with the time now; a lock found removed is lost."""
        if self.lost_because is not None:
            if self.retake:
                if self.name:  # ours no longer counts: a new one says when it was taken
                    remove_lock(self.copies, self.name)
                    self.name = ""
                self._take()
                log.warning("took a new repository lock %s; writing again", self.name)
            return
        name = self.name
        if not any(_exists(copy, name) for copy in self.copies):
            self.lost_because = "it was removed, by `fsmount unlock --remove-all` or as stale"
            log.error("the repository lock %s was removed: this process stops writing", name)
            return
        self.info.refreshed_ns = time.time_ns()
        data = self.info.encode(self.key)
        _each_copy(self.copies, f"refreshing the lock {name}", lambda copy: copy.put(name, data))
        self._refreshed = time.monotonic()

    def _keep_fresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except (StoreError, LockedError) as exc:
                log.warning("could not refresh the repository lock: %s", exc)
            try:
                self.check()
            except LockLost as exc:
                log.error("%s", exc)

    def release(self) -> None:
        """Stop refreshing and remove the lock (a failure to remove is logged: it goes stale)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.name:
            try:
                remove_lock(self.copies, self.name)
            except StoreError as exc:
                log.warning("could not remove the repository lock %s (it goes stale): %s", self.name, exc)
            self.name = ""
        for copy in self.copies:  # a repository migrated away (--delete-source) leaves no locks/ folder
            if isinstance(copy, LocalStore) and not copy.exists("config"):
                copy.remove_empty_folders()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _exists(copy: ObjectStore, name: str) -> bool:
    try:
        return copy.exists(name)
    except StoreError:
        return True  # not known gone: the refresh that follows says whether the store answers


class LockGuardedStore:
    """`inner`, refusing every write once `lock` is lost (`LockLost`); reads go through as they are."""

    def __init__(self, inner: ObjectStore, lock: RepositoryLock):
        self.inner = inner
        self.lock = lock

    def put(self, key: str, data: bytes) -> None:
        self.lock.check()
        self.inner.put(key, data)

    def delete(self, key: str) -> None:
        self.lock.check()
        self.inner.delete(key)

    def copy_from(self, source: ObjectStore, key: str) -> str:
        self.lock.check()
        return self.inner.copy_from(source, key)  # type: ignore[attr-defined]

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)


def guard_writes(stores: Sequence[ObjectStore], lock: RepositoryLock | None) -> list[ObjectStore]:
    """Each of `stores` refusing writes once `lock` is lost (`LockGuardedStore`); as they are without
    a lock (`--no-lock`)."""
    return [store if lock is None else LockGuardedStore(store, lock) for store in stores]  # type: ignore[misc]
