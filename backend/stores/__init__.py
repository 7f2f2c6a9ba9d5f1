"""Object stores: where a repository's objects live, and how a location string picks one.

Locations, as the user writes them (`-r/--repo`, `FSMOUNT_REPOSITORY`):

- `/path/to/repo`, `local:/path/to/repo` — a local directory (`local.LocalStore`);
- `s3:bucket/prefix`, `s3:https://endpoint/bucket/prefix` — S3-compatible storage (`s3.S3Store`).

Several locations together form one replicated repository (`replicated.ReplicatedStore`).
"""

from __future__ import annotations

from .base import ObjectStore
from .local import LocalStore

__all__ = ["LocalStore", "ObjectStore", "local_folders", "on_local_disk", "open_store"]


def open_store(location: str, **s3_options: object) -> ObjectStore:
    """The store a single location string names (`s3_options`: credentials, region, ...)."""
    if location.startswith("s3:"):
        from .s3 import S3Store

        return S3Store.from_location(location, **s3_options)
    location = location.removeprefix("local:")
    return LocalStore(location)


def on_local_disk(store: ObjectStore) -> bool:
    """Whether every copy of the store is a local directory (reads cost no round trip)."""
    replicas = getattr(store, "replicas", None)
    if replicas:
        return all(map(on_local_disk, replicas))
    inner = getattr(store, "inner", None)  # wrappers: retries, fault injection
    return on_local_disk(inner) if inner is not None else isinstance(store, LocalStore)


def local_folders(store: ObjectStore) -> list[str]:
    """The local folders the store keeps objects in, through the layers around it (replicas,
    retries, a backlog): what a backup must not read, nor a restore delete."""
    folders = [store.root] if isinstance(store, LocalStore) else []
    for inner in (getattr(store, "inner", None), *getattr(store, "replicas", ())):
        if inner is not None:
            folders += local_folders(inner)
    return folders
