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
