"""Fetch many blobs at once, for readers that stream: one ranged GET per run of adjacent blobs.

`BlobReader.fetch(ids)` groups the wanted blobs by pack, merges blobs that lie next to each other
(gaps up to `MAX_GAP`) into one ranged read of at most `MAX_RUN` bytes, and unseals each blob. A
backup writes a file's blocks into a pack in order, so a sequential read of a file turns into a few
large GETs instead of one request per 128 KiB block.

`BlobCache` keeps the sealed bytes of fetched blobs in a bounded directory (least recently used
goes first), so a second read of the same data does not touch the store. It holds ciphertext only:
the cache directory reveals no more than the store does.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

from .errors import FsmountError, IntegrityError, ObjectNotFound
from .index import BlobLocation
from .pack import pack_key
from .repository import Repository

log = logging.getLogger(__name__)

MAX_GAP = 64 * 1024
MAX_RUN = 8 * 1024 * 1024
RESCAN_PARTS = 8  # a cache is scanned again after each eighth of its bound put
STALE_TEMP_NS = 60 * 10**9  # a temporary file this old is no write under way but a crash's leftover
TEMP_SUFFIX = ".tmp"


class BlobCache:
    """A bounded on-disk cache of sealed blobs, shared by the threads of one process and by every
    process that uses the same directory (two mounts of one repository).

    The bound is the directory's, not one process's share of it: after putting `limit / RESCAN_PARTS`
    bytes, a process scans the directory again and evicts what is over, least recently used first.
    A file's mtime is its last use (a hit touches it), so every process sees the others' uses too.
    An entry that cannot be read is a miss; a directory that cannot be made or scanned raises
    OSError (the caller goes on without a cache)."""

    def __init__(self, directory: str, limit_bytes: int):
        self.directory = directory
        self.limit = limit_bytes
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # name -> size, oldest use first
        self._total = 0
        self._put_since_scan = 0
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._rescan()

    def get(self, blob_id: bytes) -> bytes | None:
        name = blob_id.hex()
        path = os.path.join(self.directory, name)
        try:
            with open(path, "rb") as f:
                data = f.read()
                _touch(f.fileno())
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("block cache: cannot read %s: %s; fetching it from the store", name, exc)
            self.discard(blob_id)
            return None
        with self._lock:
            if name in self._sizes:
                self._sizes.move_to_end(name)
        return data

    def put(self, blob_id: bytes, sealed: bytes | memoryview) -> None:
        if len(sealed) > self.limit:
            return
        name = blob_id.hex()
        path = os.path.join(self.directory, name)
        temp = f"{path}.{os.getpid()}.{threading.get_ident()}{TEMP_SUFFIX}"  # unique across processes
        try:
            with open(temp, "wb") as f:
                f.write(sealed)
            os.rename(temp, path)
        except OSError as exc:  # a full cache disk must not fail the read that filled it
            log.debug("block cache: cannot store %s: %s", name, exc)
            _remove(temp)
            return
        with self._lock:
            self._total += len(sealed) - self._sizes.pop(name, 0)
            self._sizes[name] = len(sealed)
            self._put_since_scan += len(sealed)
            rescan = self._put_since_scan * RESCAN_PARTS >= self.limit
            self._evict()
        if rescan:
            self._rescan_quietly()

    def discard(self, blob_id: bytes) -> None:
        """Drop an entry found damaged or unreadable, so that the next fetch stores it anew."""
        name = blob_id.hex()
        with self._lock:
            self._total -= self._sizes.pop(name, 0)
        _remove(os.path.join(self.directory, name))

    def _rescan(self) -> None:
        """Take the directory's content as the cache's (what other processes put in it counts
        too), removing temporary files a crash left behind, then evict what is over the bound."""
        found, stale_before = [], time.time_ns() - STALE_TEMP_NS
        with os.scandir(self.directory) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # evicted by another process meanwhile
                if entry.name.endswith(TEMP_SUFFIX):
                    if st.st_mtime_ns < stale_before:
                        _remove(entry.path)
                elif stat.S_ISREG(st.st_mode):
                    found.append((st.st_mtime_ns, entry.name, st.st_size))
        with self._lock:
            scanned = OrderedDict((name, size) for _, name, size in sorted(found))
            for name, size in self._sizes.items():  # put by another thread since the scan began?
                if name not in scanned and os.path.exists(os.path.join(self.directory, name)):
                    scanned[name] = size
            self._sizes = scanned
            self._total = sum(scanned.values())
            self._put_since_scan = 0
            self._evict()

    def _rescan_quietly(self) -> None:
        try:
            self._rescan()
        except OSError as exc:
            log.debug("block cache: cannot scan %s: %s", self.directory, exc)

    def _evict(self) -> None:
        while self._total > self.limit and self._sizes:
            name, size = self._sizes.popitem(last=False)
            self._total -= size
            _remove(os.path.join(self.directory, name))

    @property
    def size(self) -> int:
        return self._total


def _touch(fd: int) -> None:
    """Mark a cache entry as just used (its mtime), for the LRU order of every process."""
    try:
        os.utime(fd)
    except OSError:
        pass  # a read-only cache still serves hits


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # gone already, or a read-only cache: the next scan tries again


class BlobReader:
    """Blocking, thread-safe batch reads of one blob type from a repository."""

    def __init__(self, repo: Repository, cache: BlobCache | None = None):
        self.repo = repo
        self.cache = cache

    def fetch(self, blob_type: int, blob_ids: Iterable[bytes],
              locations: dict[bytes, BlobLocation] | None = None) -> dict[bytes, bytes | FsmountError]:
        """Each wanted blob's plaintext, or the error that stops it (corrupt, missing, store down).
        `locations`: the index's answer for these ids, when the caller has looked them up already."""
        results: dict[bytes, bytes | FsmountError] = {}
        wanted: dict[str, list] = {}  # pack id -> [(offset, length, blob id), ...]
        unique = list(dict.fromkeys(blob_ids))
        if self.cache:
            for blob_id in unique:
                sealed = self.cache.get(blob_id)
                if sealed is not None:
                    try:
                        results[blob_id] = self.repo.key.unseal_blob(blob_type, blob_id, sealed)
                    except IntegrityError:
                        log.warning("block cache: %s is damaged; fetching it again", blob_id.hex())
                        self.cache.discard(blob_id)
            unique = [blob_id for blob_id in unique if blob_id not in results]
        if locations is None:
            locations = self.repo.index.lookup_many(unique)
        for blob_id in unique:
            location = locations.get(blob_id)
            if location is None:
                results[blob_id] = IntegrityError(f"blob {blob_id.hex()} is not in the index (missing)")
            elif location.entry.blob_type != blob_type:
                results[blob_id] = IntegrityError(f"blob {blob_id.hex()} has the wrong type")
            else:
                entry = location.entry
                wanted.setdefault(location.pack_id, []).append((entry.offset, entry.length, blob_id))
        for pack_id, blobs in wanted.items():
            blobs.sort()
            for run in _runs(blobs):
                self._fetch_run(blob_type, pack_id, run, results)
        return results

    def _fetch_run(self, blob_type: int, pack_id: str, run: list, results: dict) -> None:
        start = run[0][0]
        end = max(offset + length for offset, length, _ in run)
        try:
            data = memoryview(self.repo.store.get(pack_key(pack_id), start, end - start))
        except ObjectNotFound:
            error = IntegrityError(f"pack {pack_id} is missing")
            for _, _, blob_id in run:
                results[blob_id] = IntegrityError(f"{error} (it holds blob {blob_id.hex()})")
            return
        except FsmountError as exc:
            for _, _, blob_id in run:
                results[blob_id] = exc
            return
        for offset, length, blob_id in run:
            sealed = data[offset - start : offset - start + length]
            if len(sealed) != length:
                results[blob_id] = IntegrityError(f"pack {pack_id} is truncated (blob {blob_id.hex()})")
                continue
            try:
                results[blob_id] = self.repo.key.unseal_blob(blob_type, blob_id, sealed)
            except IntegrityError as exc:
                healthy = self.repo.load_blob_from_replicas(blob_type, blob_id)
                results[blob_id] = healthy if healthy is not None else IntegrityError(f"{exc} (in pack {pack_id})")
                continue
            if self.cache:
                self.cache.put(blob_id, sealed)


def _runs(blobs: list) -> list[list]:
    """Split offset-sorted blobs into runs read with one request each."""
    runs: list[list] = []
    for blob in blobs:
        offset, length, _ = blob
        if runs:
            run = runs[-1]
            run_end = max(o + n for o, n, _ in run[-1:])
            if offset - run_end <= MAX_GAP and offset + length - run[0][0] <= MAX_RUN:
                run.append(blob)
                continue
        runs.append([blob])
    return runs
