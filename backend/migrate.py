"""Cold migration: copy a repository to another store, verified, resumable, then optionally move it.

Every object but `config` is named by its content hash, so copying is simple and safe to repeat:
objects already at the destination with the right size are skipped (an interrupted migration
resumes where it stopped), every object read from the source is checked against its name before
it is written, and `config` goes last, so a destination only looks like a repository once all of
it is there. Then the destination is listed again and opened and verified as a repository; only
after that may the source be deleted.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .errors import IntegrityError, RepositoryExists, RepositoryNotFound, StoreError
from .progress import Progress
from .replicas import object_intact
from .repository import Config, Repository
from .stores.base import ObjectStore
from .verify import verify

log = logging.getLogger(__name__)

# Order of copying: what lets a reader make sense of the rest comes last.
_ORDER = ("keys/", "data/", "index/", "snapshots/")


@dataclass
class MigrateReport:
    objects: int = 0
    copied: int = 0
    skipped: int = 0
    bytes_copied: int = 0
    deleted: int = 0
    errors: list[str] = field(default_factory=list)


def migrate(source: ObjectStore, destination: ObjectStore, passphrase: bytes, *, delete_source: bool = False,
            workers: int = 16, progress: Progress | None = None, cache_dir: str | None = None) -> MigrateReport:
    progress = progress or Progress()
    report = MigrateReport()
    try:
        config = source.get("config")
    except StoreError as exc:
        raise RepositoryNotFound(f"no repository at {source.location} to migrate ({exc})") from None
    _check_destination(destination, Config.decode(config), source)

    objects = dict(source.list(""))
    present = dict(destination.list(""))
    report.objects = len(objects)
    todo = sorted((k for k in objects if k != "config" and present.get(k) != objects[k]),
                  key=lambda k: (next((i for i, p in enumerate(_ORDER) if k.startswith(p)), len(_ORDER)), k))
    report.skipped = len(objects) - len(todo) - 1
    progress.start(total_bytes=sum(objects[k] for k in todo))
    lock = threading.Lock()

    def copy(key: str) -> None:
        try:
            data = source.get(key)
            if not object_intact(key, data):
                raise IntegrityError(f"{key} is damaged in the source")
            destination.put(key, data)
        except (StoreError, IntegrityError) as exc:
            with lock:
                report.errors.append(f"{key}: {exc}")
            return
        with lock:
            report.copied += 1
            report.bytes_copied += len(data)
        progress.advance(nbytes=len(data), items=1, current=f"{report.copied}/{len(todo)} objects")

    with ThreadPoolExecutor(workers, thread_name_prefix="migrate") as pool:
        list(pool.map(copy, todo))
    progress.finish()
    if report.errors:
        raise StoreError(f"{len(report.errors)} objects could not be copied (run migrate again to resume): "
                         f"{report.errors[0]}")

    # Everything is there and the same size: only then does the destination become a repository.
    arrived = dict(destination.list(""))
    short = [k for k, size in objects.items() if k != "config" and arrived.get(k) != size]
    if short:
        raise IntegrityError(f"{len(short)} objects did not arrive intact at {destination.location}, e.g. {short[0]}")
    destination.put("config", config)
    with Repository.open(_Unclosed(destination), passphrase, cache_dir=cache_dir) as copy_repo:
        checked = verify(copy_repo)
    if not checked.ok:
        raise IntegrityError(f"the copy at {destination.location} does not verify: {checked.errors[0]}")

    if delete_source:
        source.delete("config")  # first: the source stops being a repository at once
        for key in objects:
            if key != "config":
                source.delete(key)
                report.deleted += 1
    return report


def _check_destination(destination: ObjectStore, config: Config, source: ObjectStore) -> None:
    """Refuse a destination that holds another repository, or objects that are not ours."""
    try:
        existing = Config.decode(destination.get("config"))
    except StoreError:
        existing = None
    if existing is not None:
        if existing.id != config.id:
            raise RepositoryExists(f"{destination.location} already holds a different repository")
        return
    theirs = {k for k, _ in destination.list("keys/")}
    if theirs and not theirs <= {k for k, _ in source.list("keys/")}:
        raise RepositoryExists(f"{destination.location} holds objects of a different repository")


class _Unclosed:
    """A store seen through a Repository that must not close it (the caller still owns it)."""

    def __init__(self, store: ObjectStore):
        self._store = store

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def close(self) -> None:
        pass
