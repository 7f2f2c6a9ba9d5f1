"""The block index: which blob lives in which pack, in the store and cached locally.

In the store, `index/<id>` objects (id = BLAKE3 of the object) each describe some packs; they are
written after the packs they describe, so an index never points at data that is not there. Their
plaintext is zstd-compressed msgpack: `{"v": 1, "packs": [[pack id (32 bytes), entry table], ...]}`,
where the entry table is the packs' header records (`pack.ENTRY`) back to back. Sealed with
associated data `INDEX_AAD`.

Locally, `IndexCache` keeps the union of all index objects in SQLite under the XDG cache dir, so
opening a repository costs one listing of `index/` plus the objects not seen before. If an index
object disappeared (prune rewrote them) or the cache is unreadable, the cache is rebuilt from the
store; a repository opened on a new machine builds it on first use. The cache never reads an object
again once it holds it, so damage done to an object later shows only to a reader that fetches it:
`read_index_objects`, which repair uses on every object of the store, and `index_pack_sizes`,
verify's, on every object this process did not just read and check while syncing.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import msgpack
import zstandard

from .crypto import SEAL_OVERHEAD, MasterKey, content_hash, is_object_id
from .errors import IntegrityError, ObjectNotFound
from .pack import ENTRY, HEADER_LENGTH, BlobEntry, decode_entries, encode_entries, header_start, pack_key, read_header
from .stores import ObjectStore

log = logging.getLogger(__name__)

INDEX_AAD = b"fsmount index"
INDEX_VERSION = 1
LOOKUP_BATCH = 256  # ids per `lookup_many` statement (old SQLite builds allow 999 parameters)
T = TypeVar("T")
READ_WORKERS = 8  # index objects or pack headers fetched at once: small, so a remote store's latency dominates
HEADER_TAIL = 64 * 1024  # the end of a pack read for its header: ~1,400 blobs' records in one ranged read


@dataclass(frozen=True, slots=True)
class BlobLocation:
    pack_id: str
    entry: BlobEntry


def encode_index(key: MasterKey, packs: list[tuple[str, list[BlobEntry]]]) -> tuple[str, bytes]:
    """(name, content) of an index object describing `packs`."""
    doc = {"v": INDEX_VERSION, "packs": [[bytes.fromhex(p), encode_entries(e)] for p, e in packs]}
    data = key.seal(zstandard.ZstdCompressor().compress(msgpack.packb(doc)), INDEX_AAD)
    return content_hash(data), data


def decode_index(key: MasterKey, name: str, data: bytes) -> list[tuple[str, list[BlobEntry]]]:
    what = f"index {name}"
    if content_hash(data) != name:
        raise IntegrityError(f"{what} does not match its name (corrupt)")
    plain = key.unseal(data, INDEX_AAD, what)
    try:
        doc = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(plain))
        if doc["v"] != INDEX_VERSION:
            raise IntegrityError(f"{what} has unknown version {doc['v']}")
        return [(pack_id.hex(), decode_entries(table, what)) for pack_id, table in doc["packs"]]
    except (ValueError, KeyError, TypeError, zstandard.ZstdError) as exc:
        raise IntegrityError(f"{what} is malformed: {exc}") from exc


@dataclass
class IndexObjects:
    """What the store's index objects say, each fetched and authenticated (`read_index_objects`)."""

    readable: dict[str, list[tuple[str, list[BlobEntry]]]] = field(default_factory=dict)
    damaged: dict[str, str] = field(default_factory=dict)  # name -> why it cannot be used, naming it
    sizes: dict[str, int] = field(default_factory=dict)  # pack -> size, from objects not kept in `readable`

    def pack_ids(self) -> set[str]:
        """Every pack some readable index object names."""
        return {pack_id for packs in self.readable.values() for pack_id, _ in packs} | self.sizes.keys()

    def pack_sizes(self) -> dict[str, int]:
        """The size each pack some readable index object names must have (`packed_size`), from the
        entries every object gives it (a pack may be named twice, after a repair)."""
        entries: dict[str, set[BlobEntry]] = {}
        for packs in self.readable.values():
            for pack_id, listed in packs:
                entries.setdefault(pack_id, set()).update(listed)
        sizes = dict(self.sizes)
        for pack_id, listed in entries.items():
            sizes[pack_id] = max(sizes.get(pack_id, 0), packed_size(listed))
        return sizes


def packed_size(entries: Iterable[BlobEntry]) -> int:
    """The size of the pack holding `entries` (pack.py's layout): its sealed blobs back to back,
    its sealed header of one `ENTRY` each, and the header's length. What the store lists for the
    pack must be that, as restic's check compares: a truncated pack shows without reading it."""
    entries = list(entries)
    return sum(e.length for e in entries) + SEAL_OVERHEAD + len(entries) * ENTRY.size + HEADER_LENGTH.size


def read_index_objects(store: ObjectStore, key: MasterKey, names: Iterable[str] | None = None) -> IndexObjects:
    """Fetch and open the index objects `names` (default: every one in the store), `READ_WORKERS` at
    a time. One that fails its hash or authentication is `damaged`; one gone since it was listed
    (prune, repair) is left out; any other store failure is raised, since it says nothing of the object."""
    if names is None:
        names = index_names(store)
    readable, damaged = _fetch_each("index", names, lambda name: decode_index(key, name, store.get(f"index/{name}")))
    return IndexObjects(readable, damaged)


def index_pack_sizes(store: ObjectStore, key: MasterKey, cache: IndexCache) -> IndexObjects:
    """What every index object of the store says of its packs: `sizes` (each pack named, and the
    size its entries make) and `damaged`, never the entries themselves, so memory grows with the
    packs, not the blobs. Objects the cache read from the store and opened in this process
    (`IndexCache.checked_here`) are not fetched again: their sizes are in the cache, and the
    damaged ones in `cache.unreadable`. Every other object is fetched and opened now: the cache
    holds it from an earlier read, and it may have been damaged since.

    Every writer lists a pack's whole header, so the objects naming one pack (after a repair)
    agree about it; should they not, the pack takes the largest size any of them makes."""
    names = index_names(store)
    checked = cache.checked_here & names
    damaged = {name: why for name, why in cache.unreadable.items() if name in names}
    fetched, failed = _fetch_each("index", names - checked - damaged.keys(),
                                  lambda name: _sizes_of(decode_index(key, name, store.get(f"index/{name}"))))
    sizes: dict[str, int] = {}
    for pack_id, size in [*cache.pack_sizes_of(checked), *(p for of_one in fetched.values() for p in of_one)]:
        sizes[pack_id] = max(sizes.get(pack_id, 0), size)
    return IndexObjects(damaged=damaged | failed, sizes=sizes)


def _sizes_of(packs: list[tuple[str, list[BlobEntry]]]) -> list[tuple[str, int]]:
    return [(pack_id, packed_size(entries)) for pack_id, entries in packs]


def index_names(store: ObjectStore) -> set[str]:
    """The names of the store's index objects. A key under `index/` that cannot be one (not 64 hex
    digits) is someone else's file: it is neither read as a damaged index object nor deleted."""
    return {name for key, _ in store.list("index/") if is_object_id(name := key.removeprefix("index/"))}


def read_pack_header(store: ObjectStore, key: MasterKey, pack_id: str, size: int) -> list[BlobEntry]:
    """A pack's entries from its own header, read with one ranged GET of its tail (two when the header
    is longer than `HEADER_TAIL`): what the index is rebuilt from when no index object names the pack."""
    tail_start = max(0, size - HEADER_TAIL)
    tail = store.get(pack_key(pack_id), tail_start, size - tail_start)
    if len(tail) != size - tail_start:
        raise IntegrityError(f"pack {pack_id} is truncated")
    start = header_start(tail, size, pack_id)
    if start < tail_start:
        tail = store.get(pack_key(pack_id), start, tail_start - start) + tail
    return read_header(key, tail, pack_id, size)


def read_pack_headers(store: ObjectStore, key: MasterKey, sizes: dict[str, int]
                      ) -> tuple[dict[str, list[BlobEntry]], dict[str, str]]:
    """(entries, why unreadable) of the packs in `sizes` (id -> size), from their own headers,
    `READ_WORKERS` at a time. A pack gone since it was listed is in neither."""
    return _fetch_each("pack", sizes, lambda pack_id: read_pack_header(store, key, pack_id, sizes[pack_id]))


def _fetch_each(kind: str, names: Iterable[str], load: Callable[[str], T]) -> tuple[dict[str, T], dict[str, str]]:
    """(what `load` gave, why it failed) for each of `names` (see `_fetch_streamed`)."""
    found: dict[str, T] = {}
    failed: dict[str, str] = {}
    for name, value, why in _fetch_streamed(kind, names, load):
        if value is not None:
            found[name] = value
        elif why is not None:
            failed[name] = why
    return found, failed


def _fetch_streamed(kind: str, names: Iterable[str], load: Callable[[str], T]) -> Iterator[tuple[str, T | None, str | None]]:
    """(name, what `load` gave, why it failed) for each of `names` in order, `READ_WORKERS` at a
    time and no more ahead of the consumer, so that what is held does not grow with the number of
    objects. An object that fails its checks (IntegrityError) comes with why, one gone since it
    was listed with neither; any other failure is raised."""
    def attempt(name: str) -> tuple[str, T | None, str | None]:
        try:
            return name, load(name), None
        except ObjectNotFound:
            return name, None, None
        except IntegrityError as exc:  # our messages name the object; a replicated store's name its key
            return name, None, str(exc) if name in str(exc) else f"{kind} {name}: {exc}"

    ordered = sorted(names)
    if len(ordered) <= 1:
        yield from map(attempt, ordered)
        return
    with ThreadPoolExecutor(READ_WORKERS, thread_name_prefix=f"{kind}-read") as pool:
        ahead: deque[Future] = deque()
        try:
            for name in ordered:
                ahead.append(pool.submit(attempt, name))
                if len(ahead) >= READ_WORKERS:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            for future in ahead:
                future.cancel()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS packs (num INTEGER PRIMARY KEY, pack_id TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (
    blob_id BLOB PRIMARY KEY, blob_type INTEGER NOT NULL, pack INTEGER NOT NULL,
    offset INTEGER NOT NULL, length INTEGER NOT NULL, raw_length INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS index_objects (name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS index_packs (
    name TEXT NOT NULL, pack INTEGER NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (name, pack)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS whole_snapshots (snapshot_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS generation (only INTEGER PRIMARY KEY CHECK (only = 0), value INTEGER NOT NULL);
INSERT OR IGNORE INTO generation VALUES (0, 0);
"""


class _ThreadReader:
    """One thread's read connection, held only by that thread (see `IndexCache._reader`)."""

    __slots__ = ("__weakref__", "db")

    def __init__(self, db: sqlite3.Connection):
        self.db = db


class IndexCache:
    """SQLite copy of the repository's index objects; safe to share between threads."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._lock = threading.Lock()
        self._db = self._connect()
        # Lookups are most of the traffic (one per block saved or read) and come from many threads:
        # each thread reads through a connection of its own, so they never wait for one another
        # (WAL lets readers run beside the writer). Measured: one shared connection behind a lock
        # cost backup workers as much time as hashing.
        self._readers = threading.local()
        self._reader_closers: list[weakref.finalize] = []
        self.unreadable: dict[str, str] = {}  # index objects that failed to load -> why
        # Index objects this process fetched and opened while syncing (since the cache was last
        # rebuilt): what verify need not fetch again (`index_pack_sizes`).
        self.checked_here: set[str] = set()

    def _connect(self) -> sqlite3.Connection:
        try:
            return self._open_db()
        except sqlite3.DatabaseError as exc:
            log.warning("index cache %s is unreadable (%s); rebuilding it", self.path, exc)
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.unlink(self.path + suffix)
                except FileNotFoundError:
                    pass
            return self._open_db()

    def _open_db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=60)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        db.execute("SELECT count(*) FROM index_objects").fetchone()
        return db

    def _reader(self) -> sqlite3.Connection:
        reader = getattr(self._readers, "reader", None)
        if reader is None:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=60)
            reader = self._readers.reader = _ThreadReader(db)
            # Closed when its thread ends: worker threads come and go with every backup and
            # snapshot, and a live mount leaked four descriptors per snapshot until it hit the limit.
            with self._lock:
                self._reader_closers = [closer for closer in self._reader_closers if closer.alive]
                self._reader_closers.append(weakref.finalize(reader, db.close))
        return reader.db

    def close(self) -> None:
        with self._lock:
            for closer in self._reader_closers:
                closer()
            self._reader_closers.clear()
            self._db.close()

    def sync(self, store: ObjectStore, key: MasterKey, *, staged: Iterable[str] = ()) -> None:
        """Bring the cache up to date with the store's `index/` objects. `staged` names index objects
        that a live mount's backlog still holds: not in the store yet, but not removed either."""
        in_store = index_names(store)
        with self._lock:
            known = {name for (name,) in self._db.execute("SELECT name FROM index_objects")}
        if known - in_store - set(staged):
            log.info("index objects were removed from the repository; rebuilding the index cache")
            with self._lock:
                self._db.executescript("BEGIN IMMEDIATE; DELETE FROM blobs; DELETE FROM packs; DELETE FROM index_objects;"
                                       " DELETE FROM index_packs; DELETE FROM whole_snapshots;"
                                       " UPDATE generation SET value = value + 1; COMMIT;")
                self.checked_here = set()
            known = set()
        # Each object goes into the cache as it arrives: a new machine's first open of a large
        # repository held every entry of every index object in memory before adding the first.
        unreadable: dict[str, str] = {}
        opened = _fetch_streamed("index", in_store - known,
                                 lambda name: decode_index(key, name, store.get(f"index/{name}")))
        for name, packs, why in opened:
            if packs is not None:
                self.add(name, packs)
                self.checked_here.add(name)
            elif why is not None:
                # Not fatal: the blobs it lists look missing, which verify reports with their files.
                log.warning("%s; skipping it", why)
                unreadable[name] = why
        self.unreadable = unreadable

    def add(self, name: str, packs: Iterable[tuple[str, list[BlobEntry]]]) -> None:
        """Record the content of index object `name` (idempotent)."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                for pack_id, entries in packs:
                    db.execute("INSERT OR IGNORE INTO packs(pack_id) VALUES (?)", (pack_id,))
                    (num,) = db.execute("SELECT num FROM packs WHERE pack_id=?", (pack_id,)).fetchone()
                    db.executemany(
                        "INSERT OR IGNORE INTO blobs VALUES (?,?,?,?,?,?)",
                        ((e.blob_id, e.blob_type, num, e.offset, e.length, e.raw_length) for e in entries),
                    )
                    db.execute("INSERT OR IGNORE INTO index_packs VALUES (?,?,?)", (name, num, packed_size(entries)))
                db.execute("INSERT OR IGNORE INTO index_objects VALUES (?)", (name,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def lookup(self, blob_id: bytes) -> BlobLocation | None:
        row = self._reader().execute(
            "SELECT p.pack_id, b.blob_type, b.offset, b.length, b.raw_length"
            " FROM blobs b JOIN packs p ON p.num = b.pack WHERE b.blob_id=?",
            (blob_id,),
        ).fetchone()
        if row is None:
            return None
        pack_id, blob_type, offset, length, raw_length = row
        return BlobLocation(pack_id, BlobEntry(blob_type, blob_id, offset, length, raw_length))

    def lookup_many(self, blob_ids: list[bytes]) -> dict[bytes, BlobLocation]:
        """The locations of those of `blob_ids` the index knows, one query per `LOOKUP_BATCH` ids
        (readers fetch blocks in batches; a statement per block was a sixth of restore workers' time)."""
        rows = self._select_in("SELECT b.blob_id, p.pack_id, b.blob_type, b.offset, b.length, b.raw_length"
                               " FROM blobs b JOIN packs p ON p.num = b.pack WHERE b.blob_id", blob_ids)
        return {blob_id: BlobLocation(pack_id, BlobEntry(blob_type, blob_id, offset, length, raw_length))
                for blob_id, pack_id, blob_type, offset, length, raw_length in rows}

    def contains(self, blob_id: bytes) -> bool:
        return self._reader().execute("SELECT 1 FROM blobs WHERE blob_id=?", (blob_id,)).fetchone() is not None

    # -- snapshots known whole: what lets a backup trust its parent without asking for every block

    def generation(self) -> int:
        """How many times the cache saw index objects removed (blobs it knew may be gone since)."""
        return self._reader().execute("SELECT value FROM generation").fetchone()[0]

    def is_whole(self, snapshot_id: str, generation: int) -> bool:
        """Whether every blob of the snapshot was known to the index when it was recorded, and
        nothing was removed since (`generation` is still the current one)."""
        row = self._reader().execute(
            "SELECT 1 FROM whole_snapshots, generation WHERE snapshot_id=? AND value=?", (snapshot_id, generation))
        return row.fetchone() is not None

    def record_whole(self, snapshot_id: str, generation: int) -> None:
        """Record a snapshot all of whose blobs the index knew during `generation`, if that is
        still the current one."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO whole_snapshots SELECT ? FROM generation WHERE value=?",
                             (snapshot_id, generation))

    def known(self, blob_ids: list[bytes]) -> set[bytes]:
        """Those of `blob_ids` the index knows, one query per `LOOKUP_BATCH` ids."""
        return {blob_id for (blob_id,) in self._select_in("SELECT blob_id FROM blobs WHERE blob_id", blob_ids)}

    def _select_in(self, query: str, blob_ids: list[bytes]) -> Iterator[tuple]:
        """The rows of `query` + ` IN (...)` over `blob_ids`, one statement per `LOOKUP_BATCH` ids."""
        db = self._reader()
        for start in range(0, len(blob_ids), LOOKUP_BATCH):
            chunk = blob_ids[start : start + LOOKUP_BATCH]
            yield from db.execute(f"{query} IN ({','.join('?' * len(chunk))})", chunk).fetchall()

    def pack_ids(self) -> Iterator[str]:
        with self._lock:
            rows = self._db.execute("SELECT pack_id FROM packs ORDER BY pack_id").fetchall()
        for (pack_id,) in rows:
            yield pack_id

    def pack_sizes_of(self, names: set[str]) -> Iterator[tuple[str, int]]:
        """(pack id, size its entries make) for each pack the index objects `names` list, as they
        were added (`add`); one row at a time."""
        rows = self._reader().execute("SELECT i.name, p.pack_id, i.size FROM index_packs i"
                                      " JOIN packs p ON p.num = i.pack")
        for name, pack_id, size in rows:
            if name in names:
                yield pack_id, size

    def pack_entries(self, pack_id: str) -> list[BlobEntry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT b.blob_type, b.blob_id, b.offset, b.length, b.raw_length FROM blobs b"
                " JOIN packs p ON p.num = b.pack WHERE p.pack_id=? ORDER BY b.offset",
                (pack_id,),
            ).fetchall()
        return [BlobEntry(*row) for row in rows]

    def statistics(self) -> tuple[int, int]:
        """(packs, blobs) known to the cache."""
        with self._lock:
            (packs,) = self._db.execute("SELECT count(*) FROM packs").fetchone()
            (blobs,) = self._db.execute("SELECT count(*) FROM blobs").fetchone()
        return packs, blobs
