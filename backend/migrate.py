"""Cold migration: copy a repository to another store, verified, resumable, then optionally move it.

Every object but `config` is named by its content hash, so copying is simple and safe to repeat:
objects already at the destination with the right size are skipped (an interrupted migration
resumes where it stopped), every object read from the source is checked against its name before
it is written, and `config` goes last, so a destination only looks like a repository once all of
it is there. Then the destination is listed again and opened and verified as a repository; only
after that may the source be deleted. A destination that is the source itself, or inside it, is
refused first (see PROBE_PREFIX): with --delete-source it would have been deleted with the source.
So is one without this repository's config that holds anything but its objects: a folder or prefix
in use for something else, or another repository; one that holds some of them is an interrupted
migration, resumed.

Objects fail one by one (each after its own retries) and the migration goes on with the rest; but
once `UNREACHABLE_IN_A_ROW` objects in a row have failed because a store stopped answering, it stops
at once, naming that store: each further object would only wait out a retry budget of its own.

Between two buckets of one S3 server and account, the server copies each object itself
(CopyObject), as `aws s3 sync` and rclone do: the bytes never cross the network twice. Each copy
is checked by its ETag, the MD5 the server reports for the copy, against the source's; where that
cannot tell (an object uploaded in parts has no plain MD5), the copy is read back and checked
against its name. Content the source already held damaged is then copied as it is, so
`check_data` reads every object through this machine instead, as between two providers. So does
a server that will not copy (no CopyObject, or a key denied it): after its first refusal.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from .errors import (
    IntegrityError,
    ObjectNotFound,
    RepositoryNotFound,
    StoreError,
    StoreUnreachable,
    TransientStoreError,
    UsageError,
)
from .lock import LOCK_PREFIX, LockLost
from .progress import Progress
from .replicas import REPOSITORY_PREFIXES, is_repository_object, object_intact
from .repository import Config, Repository, open_master_key
from .stores import local_copies
from .stores.base import ObjectStore, return_large_buffers_to_the_os
from .verify import verify

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024
# Object data held in memory at once by all copying threads together (a pack is ~16 MiB).
MEMORY_BUDGET = 48 * MiB
SERVER_COPY_LIMIT = 5 * 1024 * MiB  # the largest object one CopyObject may copy
# An empty object put into the destination while the source is listed: if it shows up there, the
# destination is the source itself, or inside it, however the two are spelled (a symlink, a
# second URL for one server), and --delete-source would delete the copy with the source.
PROBE_PREFIX = "migrate-probe-"
# Objects in a row (none copied in between) that fail because a store stopped answering, before the
# migration stops: one may be bad luck with a flaky store, a few in a row mean it is down or frozen.
# Going on, 41 objects took 7 minutes to fail against a frozen server (one 10 s budget each).
UNREACHABLE_IN_A_ROW = 3


@dataclass
class MigrateReport:
    """Of the repository's `objects` (config included), `copied` travelled, `skipped` were at the
    destination already and `failed` could not be copied (`errors`: why, one line each); `deleted`
    is how many were deleted at the source."""

    objects: int = 0
    copied: int = 0
    skipped: int = 0
    failed: int = 0
    bytes_copied: int = 0
    copied_by_server: int = 0
    deleted: int = 0
    errors: list[str] = field(default_factory=list)


def migrate(source: ObjectStore, destination: ObjectStore, passphrase: bytes, *, delete_source: bool = False,
            workers: int = 16, progress: Progress | None = None, cache_dir: str | None = None,
            memory_budget: int = MEMORY_BUDGET, check_data: bool = False,
            report: MigrateReport | None = None) -> MigrateReport:
    """Copy `source` to `destination` (see the module docstring); `workers` objects travel at once,
    holding at most `memory_budget` bytes of object data between them (one larger object alone).
    With `check_data`, no object is copied by the server: each is read here and checked. The counts
    go into `report` (a new one if None) as they happen, so a caller still has them if this raises."""
    progress = progress or Progress()
    report = report if report is not None else MigrateReport()
    return_large_buffers_to_the_os()
    try:
        config = source.get("config")
    except ObjectNotFound as exc:
        if delete_source and destination.exists("config"):
            return _finish_deleting_source(source, destination, report)
        raise RepositoryNotFound(f"no repository at {source.location} to migrate ({exc})") from None
    except StoreError as exc:
        raise RepositoryNotFound(f"no repository at {source.location} to migrate ({exc})") from None
    decoded = Config.decode(config)
    destination.create_if_missing()
    config_there = _check_destination_repository(destination, decoded, source)
    # The passphrase is checked (scrypt) while objects travel; the same key then opens the copy.
    opener = ThreadPoolExecutor(1, thread_name_prefix="migrate-key")
    master_key = opener.submit(open_master_key, source, passphrase)
    opener.shutdown(wait=False)

    by_server = not check_data and getattr(destination, "can_copy_from", lambda _: False)(source)
    etags: dict[str, str] = {}
    probe = f"{PROBE_PREFIX}{secrets.token_hex(8)}"
    destination.put(probe, b"")
    try:
        if by_server:
            listing = list(_repository_objects(source.list_with_etags(""), probe, destination))
            objects = {key: size for key, size, _ in listing}
            etags = {key: etag for key, _, etag in listing}
            del listing
        else:
            objects = dict(_repository_objects(source.list(""), probe, destination))
        for replica in getattr(source, "replicas", ()):  # a replicated source lists only one
            for _entry in _repository_objects(replica.list(""), probe, destination):
                pass
    finally:
        destination.delete(probe)
    present = dict(destination.list(""))
    if config_there is None:  # with this repository's config, what else it holds is this repository's
        _refuse_foreign_objects(destination, objects, present)
    report.objects = len(objects)
    todo = sorted((k for k in objects if k != "config" and present.get(k) != objects[k]),
                  key=lambda k: (REPOSITORY_PREFIXES.index(k.partition("/")[0] + "/"), k))  # config goes last
    report.skipped = len(objects) - len(todo) - (config_there != config)
    progress.start(total_bytes=sum(objects[k] for k in todo))
    lock = threading.Lock()
    budget = _ByteBudget(memory_budget)
    pending = iter(todo)

    def copy_through_here(key: str) -> int:
        held = budget.acquire(objects[key])
        try:
            data = _asking(source, lambda: source.get(key))
            if not object_intact(key, data):
                raise IntegrityError(f"{key} is damaged in the source")
            _asking(destination, lambda: destination.put(key, data))
            return len(data)
        finally:
            budget.release(held)

    def copy_by_server(key: str) -> int:
        etag = _asking(destination, lambda: destination.copy_from(source, key))  # type: ignore[attr-defined]
        if etag != etags[key] or "-" in etag:  # no plain MD5 (uploaded in parts): check the bytes
            held = budget.acquire(objects[key])
            try:
                if not object_intact(key, _asking(destination, lambda: destination.get(key))):
                    raise IntegrityError(f"the server's copy of {key} does not match its name")
            finally:
                budget.release(held)
        return objects[key]

    refused = threading.Event()  # the server would not copy: everything goes through here

    def copy_one(key: str) -> tuple[int, bool]:
        """Copy `key`; its size, and whether the server copied it."""
        if by_server and not refused.is_set() and objects[key] <= SERVER_COPY_LIMIT:
            try:
                return copy_by_server(key), True
            except (TransientStoreError, StoreUnreachable, ObjectNotFound):  # no refusal: the same by hand
                raise
            except StoreError as exc:  # AccessDenied, NotImplemented...: this server does not copy
                if not refused.is_set():
                    refused.set()
                    log.warning("%s does not copy objects itself (%s): they go through this machine",
                                destination.location, exc)
        return copy_through_here(key), False

    def copy(key: str) -> None:
        try:
            size, server = copy_one(key)
        except LockLost:  # the destination's lock: no more writes there, so no point in going on
            raise
        except (StoreError, IntegrityError) as exc:
            with lock:
                report.failed += 1
                report.errors.append(f"{key}: {exc}")
                failures.append(exc)
                if isinstance(exc, _Unanswered):
                    unanswered.append(exc)
                else:  # the store answered, if only to refuse
                    unanswered.clear()
            return
        with lock:
            unanswered.clear()
            report.copied += 1
            report.copied_by_server += server
            report.bytes_copied += size
        progress.advance(nbytes=size, items=1, current=f"{report.copied}/{len(todo)} objects")

    failures: list[StoreError | IntegrityError] = []
    unanswered: list[_Unanswered] = []  # the failures since the last object copied, if all were these
    crashed: list[BaseException] = []

    def worker() -> None:
        try:
            while (not crashed and len(unanswered) < UNREACHABLE_IN_A_ROW
                   and (not master_key.done() or master_key.exception() is None)):
                with lock:
                    key = next(pending, None)
                if key is None:
                    return
                copy(key)
        except BaseException as exc:  # noqa: BLE001 - a bug, or the lock lost: stop every thread, raise it below
            crashed.append(exc)

    threads = [threading.Thread(target=worker, name=f"migrate-{i}", daemon=True)
               for i in range(max(1, min(workers, len(todo))))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    progress.finish()
    if crashed:
        raise crashed[0]
    key = master_key.result()  # a wrong passphrase stops here, before anything else is written
    if len(unanswered) >= UNREACHABLE_IN_A_ROW:
        last = unanswered[-1]
        raise StoreUnreachable(f"{last.location} is not answering: {len(unanswered)} objects in a row failed "
                               f"after retrying, so the migration stopped after copying {report.copied} of "
                               f"{len(todo)} objects (run migrate again to resume once it answers): {last}")
    damaged = [message for message, exc in zip(report.errors, failures) if isinstance(exc, IntegrityError)]
    if damaged:
        raise IntegrityError(f"{len(damaged)} objects could not be copied intact: {damaged[0]}")
    if report.errors:
        raise StoreError(f"{report.failed} objects could not be copied (run migrate again to resume): "
                         f"{report.errors[0]}")

    # Everything is there and the same size: only then does the destination become a repository.
    arrived = dict(destination.list(""))
    short = [k for k, size in objects.items() if k != "config" and arrived.get(k) != size]
    if short:
        raise IntegrityError(f"{len(short)} objects did not arrive intact at {destination.location}, e.g. {short[0]}")
    if config_there != config:
        destination.put("config", config)
        report.copied += 1
    with Repository(_Unclosed(destination), decoded, key, cache_dir) as copy_repo:
        checked = verify(copy_repo)
    if not checked.ok:
        raise IntegrityError(f"the copy at {destination.location} does not verify: {checked.errors[0]}")

    if delete_source:
        source.delete("config")  # first: the source stops being a repository at once
        report.deleted += 1
        _delete_source(source, [key for key in objects if key != "config"], report)
    return report


def _delete_source(source: ObjectStore, keys: list[str], report: MigrateReport) -> None:
    """Delete the source's objects `keys`, and the folders a local source leaves empty."""
    for key in keys:
        source.delete(key)
        report.deleted += 1
    for local in local_copies(source):
        local.remove_empty_folders()


def _finish_deleting_source(source: ObjectStore, destination: ObjectStore, report: MigrateReport) -> MigrateReport:
    """The rest of a `--delete-source` that was stopped part-way. Its config went first, so the
    source is no repository any more; what is left of it is deleted only if the destination holds
    every object of it (by name, which is the content's hash, and size)."""
    left = {key: size for key, size in source.list("") if is_repository_object(key)}
    if not left:
        raise RepositoryNotFound(f"no repository at {source.location} to migrate (nothing is left of one)")
    there = dict(destination.list(""))
    kept = [key for key, size in left.items() if there.get(key) != size]
    if kept:
        raise RepositoryNotFound(f"no repository at {source.location} to migrate: it has no config, and "
                                 f"{len(kept)} of its {len(left)} objects are not in {destination.location} "
                                 f"(e.g. {kept[0]}), so nothing was deleted")
    log.info("finishing an interrupted --delete-source: %d objects left in %s", len(left), source.location)
    _delete_source(source, list(left), report)
    report.objects = report.skipped = len(left)
    return report


def _repository_objects(entries: Iterable[tuple], probe: str, destination: ObjectStore) -> Iterator[tuple]:
    """A listing's (key, ...) entries that are objects of the repository (not a file someone put in
    its folder, nor another migration's probe, left by a process killed in its moment); meeting
    this migration's own probe, refuse it."""
    for entry in entries:
        key = entry[0]
        if key.rpartition("/")[2] == probe:
            raise UsageError(f"{destination.location} is the repository being migrated, or inside it "
                             "(the same folder or bucket and prefix, however spelled): nothing was copied")
        if is_repository_object(key):
            yield entry
        else:
            log.info("%s is no object of the repository: not copied", key)


class _ByteBudget:
    """How many bytes of object data the copying threads may hold at once: a bounded queue in bytes."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self._used = 0
        self._changed = threading.Condition()

    def acquire(self, size: int) -> int:
        """Wait until `size` bytes fit (an object above the limit waits for all of it); returns the
        amount to give back to `release`."""
        size = min(max(size, 1), self.limit)
        with self._changed:
            while self._used + size > self.limit:
                self._changed.wait()
            self._used += size
        return size

    def release(self, size: int) -> None:
        with self._changed:
            self._used -= size
            self._changed.notify_all()


def check_destination(source: ObjectStore, destination: ObjectStore) -> None:
    """Refuse a destination that holds another repository, or its keys (UsageError), before anything
    is written there: a caller's lock, say. `migrate` checks it too."""
    _check_destination_repository(destination, Config.decode(source.get("config")), source)


def _check_destination_repository(destination: ObjectStore, config: Config, source: ObjectStore) -> bytes | None:
    """Refuse a destination that holds another repository, or its keys; the destination's config
    if it is already this repository's (a migration run again after it finished)."""
    try:
        there = destination.get("config")
        existing = Config.decode(there)
    except StoreError:
        there = existing = None
    if existing is not None:
        if existing.id != config.id:
            raise UsageError(f"{destination.location} already holds a different repository ({existing.id[:8]}): "
                             "migrate into an empty location: nothing was copied")
        return there
    theirs = {k for k, _ in destination.list("keys/")}
    if theirs and not theirs <= {k for k, _ in source.list("keys/")}:
        raise UsageError(f"{destination.location} holds keys of a different repository: migrate into an "
                         "empty location: nothing was copied")
    return None


def _refuse_foreign_objects(destination: ObjectStore, objects: dict[str, int], present: dict[str, int]) -> None:
    """Refuse a destination that holds anything but objects of this repository (`objects`, as the
    source lists them): a migration only ever writes those (and its probe, which a migration killed
    in its moment may leave, and its lock), so anything else means the folder or prefix is used for
    something else."""
    foreign = sorted(k for k in present if k not in objects and not k.startswith((PROBE_PREFIX, LOCK_PREFIX)))
    if foreign:
        raise UsageError(f"{destination.location} is not empty: it holds {len(foreign)} object"
                         f"{'s' if len(foreign) > 1 else ''} that {'are' if len(foreign) > 1 else 'is'} no part "
                         f"of this repository (e.g. {foreign[0]}); migrate into an empty location, or into one "
                         "an interrupted migration of this repository left: nothing was copied")


class _Unanswered(StoreUnreachable):
    """`StoreUnreachable` from a call to the store at `location`: which store stopped answering."""

    def __init__(self, location: str, exc: StoreError):
        super().__init__(str(exc))
        self.location = location


def _asking(store: ObjectStore, call: Callable[[], T]) -> T:
    """`call()`, a call to `store`; if the store did not answer (even through replicas, which wrap
    the error in their own), raise `_Unanswered` naming it."""
    try:
        return call()
    except StoreError as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, StoreUnreachable):
            cause = cause.__cause__
        if cause is None:
            raise
        raise _Unanswered(store.location, exc) from exc


class _Unclosed:
    """A store seen through a Repository that must not close it (the caller still owns it)."""

    def __init__(self, store: ObjectStore):
        self._store = store

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def close(self) -> None:
        pass
