"""Object stores: where a repository's objects live, and how a location string picks one.

Locations, as the user writes them (`-r/--repo`, `FSMOUNT_REPOSITORY`):

- `/path/to/repo`, `local:/path/to/repo` — a local directory (`local.LocalStore`);
- `s3:bucket/prefix`, `s3:https://endpoint/bucket/prefix` — S3-compatible storage (`s3.S3Store`).

Several locations together form one replicated repository (`replicated.ReplicatedStore`).
"""

from __future__ import annotations

from collections.abc import Iterator

from .base import ObjectStore
from .local import LocalStore

__all__ = ["LocalStore", "ObjectStore", "local_copies", "local_folders", "on_local_disk", "open_store"]


def open_store(location: str, **s3_options: object) -> ObjectStore:
    """The store a single location string names (`s3_options`: credentials, region, ...)."""
    if location.startswith("s3:"):
        from .s3 import S3Store

        return S3Store.from_location(location, **s3_options)
    location = location.removeprefix("local:")
    return LocalStore(location)


def _copies(store: ObjectStore) -> Iterator[ObjectStore]:
    """The stores that hold the objects, through the layers around them: each replica, and what
    a wrapper (retries, fault injection, a backlog) wraps."""
    replicas = getattr(store, "replicas", None)
    inner = getattr(store, "inner", None)
    if replicas:
        for replica in replicas:
            yield from _copies(replica)
    elif inner is not None:
        yield from _copies(inner)
    else:
        yield store


def on_local_disk(store: ObjectStore) -> bool:
    """Whether every copy of the store is a local directory (reads cost no round trip)."""
    return all(isinstance(copy, LocalStore) for copy in _copies(store))


def local_copies(store: ObjectStore) -> list[LocalStore]:
    """The local directories among the store's copies."""
    return [copy for copy in _copies(store) if isinstance(copy, LocalStore)]


def local_folders(store: ObjectStore) -> list[str]:
    """The local folders the store keeps objects in: what a backup must not read, nor a restore
    delete."""
    return [copy.root for copy in local_copies(store)]
