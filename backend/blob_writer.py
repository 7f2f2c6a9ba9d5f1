"""Turning blobs into packs in the store, with the index written after them.

`BlobWriter.save()` is called from many worker threads at once. Each call hashes its plaintext, and
only if the blob is new anywhere (index cache, or reserved earlier in this session) compresses and
seals it in the calling thread; the one lock is held just to reserve the id and to append the sealed
bytes. Trees and file content fill packs of their own. A full pack (~16 MiB) is finished and handed
to a small upload pool; at most `uploads_in_flight` finished packs wait or travel at once, so memory
stays bounded and slow stores push back on the savers.

Durability order, which makes a crash at any point leave a valid repository:
  1. packs are put (each complete or absent, by the store's contract);
  2. an index object describing only uploaded packs is put, then added to the local cache;
  3. only then (`flush()` returned) may the caller write a snapshot that references the blobs.
Packs without an index after a crash are harmless: `verify` lists them, and `verify --repair` indexes them
from their own headers. So that a run cut short leaves few of them, and the next run finds the
blobs it had stored instead of storing them again, an index object is also written when
`INDEX_INTERVAL_S` has passed since the first pack it would describe went up, and by `settle()`,
which ends a run that did not reach `flush()` (an error, Ctrl-C).

A failed upload is raised once (by the next `save()` or `flush()`) and forgotten, and its blobs are
no longer counted as stored, so a long-running writer (the live mount's) recovers when the store does.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from .crypto import MasterKey
from .errors import FsmountError, StoreError
from .index import IndexCache, encode_index
from .pack import BlobEntry, PackWriter, pack_key
from .stores import ObjectStore

log = logging.getLogger(__name__)

# Write an index object once this many blobs are described by uploaded packs, or this long after
# the first of them went up (whichever comes first), and at flush().
INDEX_BATCH_BLOBS = 50_000
INDEX_INTERVAL_S = 300.0


@dataclass
class WriteStatistics:
    blobs_added: int = 0
    bytes_added: int = 0  # sealed bytes put into packs, headers excluded
    raw_bytes_added: int = 0
    packs_uploaded: int = 0


class BlobWriter:
    def __init__(self, store: ObjectStore, key: MasterKey, index: IndexCache, pack_size: int,
                 *, upload_workers: int = 2, uploads_in_flight: int = 2):
        self._store = store
        self._key = key
        self._index = index
        self._pack_size = pack_size
        self._lock = threading.Lock()
        # Trees and file content go to packs of their own, as restic's do: the trees of a backup
        # then lie together, so whoever walks them (verify, restore, the snapshot mount) reads a
        # few ranges of one pack instead of one range in every pack.
        self._packers: dict[int, PackWriter] = {}
        self._reserved: set[bytes] = set()  # ids saved this session and not yet in the index cache
        self._uploaded: list[tuple[str, list[BlobEntry]]] = []  # packs awaiting an index object
        self._uploaded_blobs = 0
        self._first_unindexed: float | None = None  # when the oldest pack in _uploaded went up
        self._uploads: set[Future] = set()
        self._upload_slots = threading.BoundedSemaphore(uploads_in_flight)
        self._pool = ThreadPoolExecutor(upload_workers, thread_name_prefix="pack-upload")
        self._failure: BaseException | None = None
        self.statistics = WriteStatistics()

    def contains(self, blob_id: bytes) -> bool:
        with self._lock:
            if blob_id in self._reserved:
                return True
        return self._index.contains(blob_id)

    def save(self, blob_type: int, plaintext: bytes | memoryview, blob_id: bytes | None = None) -> tuple[bytes, bool]:
        """Store a blob unless it is already there; returns (blob id, whether it was added)."""
        self._raise_failure()
        if blob_id is None:
            blob_id = self._key.blob_id(plaintext)
        with self._lock:
            if blob_id in self._reserved:
                return blob_id, False
            self._reserved.add(blob_id)
        try:
            if self._index.contains(blob_id):
                self._unreserve([blob_id])
                return blob_id, False
            sealed = self._key.seal_blob(blob_type, blob_id, plaintext)
        except BaseException:
            self._unreserve([blob_id])
            raise
        full = None
        with self._lock:
            packer = self._packers.get(blob_type)
            if packer is None:
                packer = self._packers[blob_type] = PackWriter(self._key)
            packer.add(blob_type, blob_id, sealed, len(plaintext))
            self.statistics.blobs_added += 1
            self.statistics.bytes_added += len(sealed)
            self.statistics.raw_bytes_added += len(plaintext)
            if packer.size >= self._pack_size:
                full = self._packers.pop(blob_type)
        if full is not None:
            self._upload(full)
        return blob_id, True

    def _upload(self, packer: PackWriter) -> None:
        self._upload_slots.acquire()  # backpressure: wait while enough packs are in flight
        try:
            self._raise_failure()
            future = self._pool.submit(self._finish_and_put, packer)
        except BaseException:
            self._upload_slots.release()
            self._unreserve(packer.blob_ids())
            raise
        with self._lock:
            self._uploads.add(future)
        future.add_done_callback(self._upload_done)

    def _finish_and_put(self, packer: PackWriter) -> None:
        blob_ids = packer.blob_ids()
        try:
            pack_id, data, entries = packer.finish()
            self._store.put(pack_key(pack_id), data)
        except BaseException:
            self._unreserve(blob_ids)
            raise
        now = time.monotonic()
        with self._lock:
            self._uploaded.append((pack_id, entries))
            self._uploaded_blobs += len(entries)
            self.statistics.packs_uploaded += 1
            if self._first_unindexed is None:
                self._first_unindexed = now
            write_index = (self._uploaded_blobs >= INDEX_BATCH_BLOBS
                           or now - self._first_unindexed >= INDEX_INTERVAL_S)
        if write_index:
            self._write_index()

    def _unreserve(self, blob_ids: list[bytes]) -> None:
        """These blobs were not stored (their pack failed or was never sent): a later save of the
        same content must store them again, not take them for saved."""
        with self._lock:
            self._reserved.difference_update(blob_ids)

    def _upload_done(self, future: Future) -> None:
        self._upload_slots.release()
        with self._lock:
            self._uploads.discard(future)
            exc = future.exception()
            if exc is not None and self._failure is None:
                self._failure = exc

    def _write_index(self) -> None:
        with self._lock:
            packs, self._uploaded, self._uploaded_blobs = self._uploaded, [], 0
            first_unindexed, self._first_unindexed = self._first_unindexed, None
        if not packs:
            return
        name, data = encode_index(self._key, packs)
        try:
            self._store.put(f"index/{name}", data)
        except BaseException:
            with self._lock:  # stored but not indexed: the next index object names them
                self._uploaded[:0] = packs
                self._uploaded_blobs += sum(len(entries) for _, entries in packs)
                self._first_unindexed = first_unindexed
            raise
        self._index.add(name, packs)
        with self._lock:
            for _, entries in packs:
                self._reserved.difference_update(e.blob_id for e in entries)

    def _raise_failure(self) -> None:
        """Raise a recorded upload failure, once: the writer stays usable for the next attempt."""
        with self._lock:
            exc, self._failure = self._failure, None
        if exc is not None:
            if isinstance(exc, FsmountError):
                raise type(exc)(str(exc)) from exc
            raise StoreError(f"uploading a pack failed: {exc}") from exc

    def flush(self) -> None:
        """Upload the partial packs, wait for every upload, and write the index for them."""
        with self._lock:
            partial = [packer for packer in self._packers.values() if packer.count]
            self._packers.clear()
        for packer in partial:
            self._upload(packer)
        self._wait_for_uploads()
        self._raise_failure()
        self._write_index()

    def settle(self) -> None:
        """Wait for the uploads in flight, forget how they failed, and index the packs that did go
        up. A run that failed has reported its own error; without this, a pack of it failing a
        moment later would fail the next run too. Blobs whose upload failed are stored again when
        saved again; those of the indexed packs are found by the next run (a backup cut short
        with Ctrl-C had its next run store them all again). Nothing refers to them yet, so an
        index that cannot be written now is only written later, by the next `flush()`."""
        self._wait_for_uploads()
        with self._lock:
            self._failure = None
        try:
            self._write_index()
        except StoreError as exc:
            log.info("the packs uploaded so far are indexed later: %s", exc)

    def _wait_for_uploads(self) -> None:
        while True:
            with self._lock:
                pending = list(self._uploads)
            if not pending:
                return
            for future in pending:
                future.exception()  # wait; failures are recorded by _upload_done

    def close(self) -> None:
        self._pool.shutdown(wait=True)
