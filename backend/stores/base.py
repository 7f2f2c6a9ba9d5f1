"""The `ObjectStore` contract: the five operations every storage provider implements.

A store is a flat namespace of immutable objects named by `/`-separated text keys
(`config`, `keys/<id>`, `data/<2 hex>/<id>`, `index/<id>`, `snapshots/<id>`, `locks/<id>`).
Stores stay small: retries, replication, fault injection and throttling wrap them.

Contract, for every implementation:

- `put(key, data)` makes the whole object durable before returning; a reader never sees a partial
  object. Putting an existing key replaces it (the engine only does so for identical content).
- `get(key, offset=0, length=None)` returns the object's bytes, or the byte range
  `[offset, offset+length)` of it (shorter only at the end of the object). A missing key raises
  `ObjectNotFound`.
- `exists(key)` is cheap and never raises for a missing key.
- `list(prefix)` yields `(key, size)` for every object whose key starts with `prefix`, in no
  guaranteed order, streaming (never the whole listing in memory at once for large prefixes).
- `delete(key)` removes the object; deleting a missing key is not an error.

Failures raise `StoreError`; those worth retrying raise `TransientStoreError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable


@runtime_checkable
class ObjectStore(Protocol):
    """A place objects live: a local directory, an S3 bucket prefix, several replicas."""

    def create_if_missing(self) -> object:
        """Create the folder or bucket the objects go into (`fsmount init`, `migrate`); every other
        write expects it, so a repository deleted while in use is reported, not made again."""

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]: ...

    def delete(self, key: str) -> None: ...

    def close(self) -> None: ...

    @property
    def location(self) -> str:
        """Where the store is, as a user would name it (for messages; never holds credentials)."""
        ...


_M_MMAP_THRESHOLD = -3
_LARGE_BUFFER = 1024 * 1024
_malloc_tuned = False


def return_large_buffers_to_the_os() -> None:
    """Have glibc give every buffer of 1 MiB or more back to the system when it is freed.

    Objects travel as whole `bytes` (packs are ~16 MiB). glibc serves an allocation that large
    with mmap only until the first one is freed; then it raises its threshold and keeps later
    ones in per-thread arenas, which never shrink: a migration's RSS grew by a pack per thread that
    ever held one (~300 MiB for 16 threads, whatever bounded the data in flight). A fixed threshold
    keeps RSS at what is actually in use. Process-wide and idempotent; a no-op without glibc.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _LARGE_BUFFER)
