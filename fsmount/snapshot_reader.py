"""File content for the snapshot tree: blocks from memory, the on-disk cache, or the store, read ahead.

A read needs the blocks it overlaps. Each comes from a small in-memory LRU of plaintext blocks,
or is being fetched already (the reader waits for that fetch instead of starting another), or is
fetched now through `BlobReader` on a worker thread, where unsealing and decompression run too.
When a file is read sequentially, the blocks after the one asked for are fetched ahead, in batches
that run in parallel, the window doubling with every sequential read up to `MAX_WINDOW` blocks;
`cp` of a large file therefore keeps several ranged GETs in flight while the kernel copies.

From a repository on local disk, a fetch of little data (the blocks of a few small files) runs on
the event loop instead: the trip to a worker thread, and the two threads taking turns with the GIL,
cost more than the fetch. `cp -a` of 13k small files took 25% less daemon CPU so (2 cores).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

import trio

from backend.blob_reader import BlobReader
from backend.errors import FsmountError, StoreError
from backend.pack import DATA_BLOB
from backend.tree import HOLE, Node

log = logging.getLogger(__name__)

MAX_WINDOW = 32  # blocks fetched ahead of a sequential reader (4 MiB at 128 KiB blocks)
BATCH = 8  # blocks per background fetch; batches run in parallel
FETCH_THREADS = 8  # fetches at once from a remote store, where each waits for a round trip
LOCAL_FETCH_THREADS = max(2, os.cpu_count() or 2)  # from local disk: CPU work, more would fight over the GIL
LOCAL_INLINE_BYTES = 512 * 1024  # from local disk, fetches up to this much stored data run on the event loop


class _Pending:
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: bytes | None = None
        self.error: Exception | None = None


class SnapshotReader:
    def __init__(self, blobs: BlobReader, block_size: int, *, memory_bytes: int = 64 * 1024 * 1024,
                 fetch_threads: int = FETCH_THREADS, inline_bytes: int = 0):
        """`inline_bytes`: fetches of at most this much stored data run on the event loop (for a
        repository on local disk; 0 sends every fetch to a worker thread)."""
        self.blobs = blobs
        self.block_size = block_size
        self.inline_bytes = inline_bytes
        self.memory_limit = memory_bytes
        self._memory: OrderedDict[bytes, bytes] = OrderedDict()
        self._memory_bytes = 0
        self._pending: dict[bytes, _Pending] = {}
        self._limiter = trio.CapacityLimiter(fetch_threads)

    async def read(self, node: Node, offset: int, size: int, *, sequential: int = 0) -> bytes:
        """Up to `size` bytes of a file from `offset`; `sequential` counts the reads in a row."""
        end = min(offset + size, node.size)
        if offset >= end:
            return b""
        first, last = offset // self.block_size, (end - 1) // self.block_size
        if sequential:
            self._read_ahead(node, last + 1, min(MAX_WINDOW, 2 ** min(sequential, 5)))
        wanted = [self._block_id(node, i) for i in range(first, last + 1)]
        blocks = await self._get(wanted)
        parts = []
        for i, blob_id in zip(range(first, last + 1), wanted):
            length = min(self.block_size, node.size - i * self.block_size)
            parts.append(bytes(length) if blob_id == HOLE else blocks[blob_id])
        data = b"".join(parts)
        start = offset - first * self.block_size
        return data[start : start + end - offset]

    @staticmethod
    def _block_id(node: Node, i: int) -> bytes:
        return node.block_id(i) if i < node.block_count else HOLE

    # -- fetching -----------------------------------------------------------------------------------

    async def _get(self, wanted: list[bytes]) -> dict[bytes, bytes]:
        found: dict[bytes, bytes] = {}
        mine: list[bytes] = []
        waits: list[tuple[bytes, _Pending]] = []
        for blob_id in dict.fromkeys(wanted):
            if blob_id == HOLE:
                continue
            data = self._memory.get(blob_id)
            if data is not None:
                self._memory.move_to_end(blob_id)
                found[blob_id] = data
            elif blob_id in self._pending:
                waits.append((blob_id, self._pending[blob_id]))
            else:
                mine.append(blob_id)
        if mine:
            found.update(await self._fetch(self._claim(mine)))
        for blob_id, pending in waits:
            await pending.done.wait()
            if pending.error is not None:
                raise pending.error
            assert pending.value is not None
            found[blob_id] = pending.value
        return found

    def _claim(self, blob_ids: list[bytes]) -> dict[bytes, _Pending]:
        """Mark blocks as being fetched, so later readers wait for this fetch instead of starting
        one. Done before anything awaits: a fetch started in between would fetch them twice, and
        one of the two would remove the other's mark while its readers still wait on it."""
        pending = {blob_id: _Pending() for blob_id in blob_ids}
        self._pending.update(pending)
        return pending

    async def _fetch(self, pending: dict[bytes, _Pending]) -> dict[bytes, bytes]:
        results: dict = {}
        try:
            results = await self._fetch_here_or_on_thread(list(pending))
        finally:
            first_error: Exception | None = None
            for blob_id, waiter in pending.items():
                del self._pending[blob_id]
                result = results.get(blob_id, StoreError("the fetch was interrupted"))
                if isinstance(result, Exception):
                    waiter.error = result
                    first_error = first_error or result
                else:
                    waiter.value = result
                    self._remember(blob_id, result)
                waiter.done.set()
        if first_error is not None:
            raise first_error
        return {blob_id: waiter.value for blob_id, waiter in pending.items()}  # type: ignore[misc]

    async def _fetch_here_or_on_thread(self, blob_ids: list[bytes]) -> dict:
        locations = None
        if self.inline_bytes:
            locations = self.blobs.repo.index.lookup_many(blob_ids)
            if sum(location.entry.length for location in locations.values()) <= self.inline_bytes:
                await trio.lowlevel.checkpoint()  # a fetch is a yield point either way
                return self.blobs.fetch(DATA_BLOB, blob_ids, locations)
        return await trio.to_thread.run_sync(self.blobs.fetch, DATA_BLOB, blob_ids, locations, limiter=self._limiter)

    def _remember(self, blob_id: bytes, data: bytes) -> None:
        if blob_id in self._memory:
            return
        self._memory[blob_id] = data
        self._memory_bytes += len(data)
        while self._memory_bytes > self.memory_limit and self._memory:
            _, evicted = self._memory.popitem(last=False)
            self._memory_bytes -= len(evicted)

    def _read_ahead(self, node: Node, first: int, count: int) -> None:
        self.prefetch([self._block_id(node, i) for i in range(first, first + count)])

    def prefetch(self, blob_ids: list[bytes]) -> None:
        """Start fetching these blocks in the background, in parallel batches."""
        ahead = [blob_id for blob_id in dict.fromkeys(blob_ids)
                 if blob_id != HOLE and blob_id not in self._memory and blob_id not in self._pending]
        for start in range(0, len(ahead), BATCH):
            trio.lowlevel.spawn_system_task(self._fetch_quietly, self._claim(ahead[start : start + BATCH]))

    async def _fetch_quietly(self, pending: dict[bytes, _Pending]) -> None:
        try:
            await self._fetch(pending)
        except FsmountError as exc:  # the read that needs the block fetches it again and reports
            log.debug("read-ahead failed: %s", exc)
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("read-ahead failed unexpectedly")
