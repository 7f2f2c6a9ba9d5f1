"""What changed since the parent snapshot, as a backup needs to know it to avoid rescanning.

A scan-based backup lists every directory and stats every file. When something watched every change
(the live tree's changelog), a backup can do far less: list only directories on a changed path,
read only the blocks that were written, and reuse the parent snapshot's trees everywhere else.
`ChangeSet` is that knowledge, with paths relative to the backed-up folder (`b"dir/file"`).

The contract, which the changelog guarantees for everything that went through the mount:

- `subtree_dirty(path)` is False only if neither the entries of directory `path` nor anything
  below it changed; such a directory is reused from the parent snapshot without being listed
  (its own metadata comes from a fresh `lstat` by its parent's listing).
- `content(path)` says what happened to a file's bytes: `CLEAN` (reuse the parent's blocks),
  `ALL` (read it all), or a sorted list of block numbers that were written (read those, and
  anything past the parent's length).
- `origin(path)` is where the entry was in the parent snapshot if it was renamed since, else None.
- `is_new(path)`: the entry was created since the parent snapshot; never match it by name.
"""

from __future__ import annotations

from typing import Literal, Protocol

CLEAN: Literal["clean"] = "clean"
ALL: Literal["all"] = "all"

Content = Literal["clean", "all"] | list[int]


class ChangeSet(Protocol):
    def subtree_dirty(self, path: bytes) -> bool: ...

    def content(self, path: bytes) -> Content: ...

    def origin(self, path: bytes) -> bytes | None: ...

    def is_new(self, path: bytes) -> bool: ...
