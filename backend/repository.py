"""A repository: open or create one, then put and get blobs, trees and snapshots.

Objects in the store (format details in backend/FORMAT.md):

    config              plain JSON: version, id, block and pack size, algorithms
    keys/<id>           the master key wrapped under a passphrase (crypto.py)
    data/<2 hex>/<id>   packs of sealed blobs (pack.py)
    index/<id>          which blobs are in which packs (index.py)
    snapshots/<id>      point-in-time records, written last (snapshot.py)

Opening reads config and a key from the store, and keeps copies of them in the repository's cache
dir (`copies/`, with the snapshots it reads), and which repository the location held
(`<cache root>/locations/`): a live mount whose store does not answer opens from those instead
(`open_from_copies`), so a laptop without a network mounts as during an outage.

Writing goes through `BlobWriter` (blob_writer.py); a snapshot is saved only after `flush()`, so
every snapshot in the store references durable data. Reading a blob is one ranged GET of its pack,
then unsealing, which checks authenticity and the blob id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Self

from .blob_writer import BlobWriter
from .crypto import MasterKey, content_hash, is_object_id, random_id
from .errors import (
    FolderMissing,
    FsmountError,
    IntegrityError,
    LocationMissing,
    ObjectNotFound,
    RepositoryExists,
    RepositoryNotFound,
    StoreError,
    UnsupportedFormat,
    UsageError,
    WrongPassword,
    shown_name,
)
from .index import IndexCache
from .pack import DATA_BLOB, TREE_BLOB, pack_key
from .replicas import REPOSITORY_PREFIXES
from .snapshot import Snapshot
from .stores import LocalStore, ObjectStore, on_local_disk
from .stores.backlog import BacklogStore, StoreReplaced, staged_keys
from .tree import Node, decode_tree, encode_tree

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_BLOCK_SIZE = 128 * 1024
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 64 * 1024, 4 * 1024 * 1024
DEFAULT_PACK_SIZE = 16 * 1024 * 1024
BACKLOGS_DIR = "backlog"  # in the repository's cache dir: one backlog per live mount
COPIES_DIR = "copies"  # in the repository's cache dir: config, keys/ and snapshots/ as last read
LOCATIONS_DIR = "locations"  # in the cache root: which repository each location held when last opened
DEFAULT_BACKLOG_LIMIT = 4 << 30
# Decoded trees kept in memory, weighed by their entries and their files' block lists: a tree
# holding one 1 TiB sparse file lists 8M blocks (400 MB), and counted as one entry it stayed
# cached, so a live mount's memory grew by that much for good.
TREE_CACHE_BYTES = 40 * 1024 * 1024  # ~100k entries of small files, what it held before
_NODE_BYTES = 300  # what a decoded entry costs beyond its block list


@dataclass(frozen=True)
class Config:
    version: int
    id: str
    block_size: int
    pack_size: int

    def encode(self) -> bytes:
        doc = {"version": self.version, "id": self.id, "block_size": self.block_size,
               "pack_size": self.pack_size, "cipher": "aes-256-gcm", "blob_id": "blake3-keyed",
               "compression": "zstd"}
        return json.dumps(doc, indent=1).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes) -> Config:
        try:
            doc = json.loads(data)
            version = doc["version"]
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"repository config is malformed: {exc}") from exc
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UnsupportedFormat(
                f"repository format version {version} is newer than this fsmount supports "
                f"({FORMAT_VERSION}); upgrade fsmount")
        try:
            return cls(version, doc["id"], int(doc["block_size"]), int(doc["pack_size"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"repository config is malformed: {exc}") from exc


def check_replicas_hold_one_repository(store: ObjectStore) -> None:
    """The replicas that hold a repository (of those that answer) hold the same one. Two
    repositories given as replicas of each other took each other's objects (and keys) through
    backups and `replicas sync`. A single store passes."""
    copies = getattr(store, "get_from_each", None)
    first: tuple[str, str] | None = None
    for location, data in copies("config") if copies is not None else ():
        if data is None:
            log.warning("replica %s holds no repository yet: `fsmount replicas sync` copies it there", location)
            continue
        theirs = Config.decode(data).id
        if first is None:
            first = (location, theirs)
        elif theirs != first[1]:
            raise UsageError(f"replica {location} holds a different repository ({theirs[:8]}) than {first[0]} "
                             f"({first[1][:8]}); replicas must be copies of one repository")


def _weight(nodes: list[Node]) -> int:
    return sum(_NODE_BYTES + len(n.blocks) + len(n.xxh) for n in nodes)


def _parts_held(store: ObjectStore) -> list[str]:
    """The kinds of repository object (`keys/`, `data/`...) a location holds, `config` aside."""
    return [prefix for prefix in REPOSITORY_PREFIXES if next(iter(store.list(prefix)), None) is not None]


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fsmount")


class Repository:
    """An open repository. Use as a context manager, or call `close()`."""

    def __init__(self, store: ObjectStore, config: Config, key: MasterKey, cache_dir: str | None, *,
                 sync_index: bool = True):
        self.store = store
        self.config = config
        self.key = key
        self.cache_dir = os.path.join(cache_dir or default_cache_dir(), config.id)
        self.copies = LocalStore(os.path.join(self.cache_dir, COPIES_DIR))
        self.index = IndexCache(os.path.join(self.cache_dir, "index.sqlite"))
        if sync_index:
            self.sync_index()
        # A remote store answers slower than the savers fill packs: let a few more finished packs
        # queue (each ~pack_size of memory) so that savers keep going while uploads travel.
        uploads = {} if on_local_disk(store) else {"upload_workers": 2, "uploads_in_flight": 4}
        self.writer = BlobWriter(store, key, self.index, config.pack_size, **uploads)
        self._trees: OrderedDict[bytes, list[Node]] = OrderedDict()
        self._trees_lock = threading.Lock()
        self._cached_bytes = 0
        self.damaged_snapshots: list[str] = []  # ids `snapshots()` could not read, last time it ran

    # -- opening ----------------------------------------------------------------------------------

    @classmethod
    def init(cls, store: ObjectStore, passphrase: bytes, *, block_size: int = DEFAULT_BLOCK_SIZE,
             pack_size: int = DEFAULT_PACK_SIZE, cache_dir: str | None = None) -> Repository:
        if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size & (block_size - 1):
            raise UsageError(f"block size must be a power of two from {MIN_BLOCK_SIZE // 1024} KiB "
                             f"to {MAX_BLOCK_SIZE // 1024 // 1024} MiB, not {block_size}")
        store.create_if_missing()
        if store.exists("config"):
            raise RepositoryExists(f"a repository already exists at {store.location}")
        # Without its config a repository cannot be opened, but its keys, packs and snapshots are
        # still there: a new repository over them would mix two repositories' objects for good.
        held = _parts_held(store)
        if held:
            raise RepositoryExists(f"{store.location} holds parts of a repository ({', '.join(held)}) but no "
                                   "config; put its config back (from a replica or a copy) or init elsewhere")
        config = Config(FORMAT_VERSION, random_id(), block_size, pack_size)
        key = MasterKey.generate()
        wrapped = key.wrap(passphrase)
        store.put(f"keys/{content_hash(wrapped)}", wrapped)
        store.put("config", config.encode())  # last: its presence means "a repository is here"
        return cls(store, config, key, cache_dir)

    @classmethod
    def open(cls, store: ObjectStore, passphrase: bytes, *, cache_dir: str | None = None,
             backlog: str | None = None, backlog_limit_bytes: int = DEFAULT_BACKLOG_LIMIT,
             key: OpenedKey | None = None, config_bytes: bytes | None = None) -> Repository:
        """The repository in `store`. With `backlog` (a name), writes the store cannot take now wait in
        a local backlog of that name instead (stores/backlog.py); `repo.backlog` drains it. `key` and
        `config_bytes`: the master key and the config, when the caller has opened and checked them
        already (to take a lock), saving a scrypt and reading every replica's config again."""
        if config_bytes is None:
            config_bytes = read_config(store)
            check_replicas_hold_one_repository(store)
        config = Config.decode(config_bytes)
        if key is None:
            key = open_key(store, passphrase)
        root = cache_dir or default_cache_dir()
        keep_copies(root, store.location, config.id, config_bytes, key)
        if backlog is not None:
            store = BacklogStore(store, os.path.join(root, config.id, BACKLOGS_DIR, backlog), backlog_limit_bytes)
        return cls(store, config, key.master, cache_dir)

    @classmethod
    def open_from_copies(cls, store: ObjectStore, passphrase: bytes, unanswered: StoreError, *,
                         backlog: str, cache_dir: str | None = None,
                         backlog_limit_bytes: int = DEFAULT_BACKLOG_LIMIT,
                         on_rejoin: Callable[[ObjectStore, MasterKey], ObjectStore] | None = None) -> Repository:
        """The repository that `store`, which does not answer (`unanswered`), held when it was last
        opened here, from the copies of its config and keys kept then; for a live mount only. Its
        writes wait in the backlog, which first checks, once the store answers, that the store still
        holds this repository (and brings the index cache up to date) before anything goes there.
        `on_rejoin(store, key)` runs once that check has passed, before anything else is read or
        written there (the live mount takes its lock), and returns the store to use from then on."""
        root = cache_dir or default_cache_dir()
        config = _copied_config(root, store.location, unanswered)
        copies = LocalStore(os.path.join(root, config.id, COPIES_DIR))
        master = open_master_key(copies, passphrase)
        repo_dir = os.path.join(root, config.id)
        staged = BacklogStore(store, os.path.join(repo_dir, BACKLOGS_DIR, backlog), backlog_limit_bytes,
                              unanswered=unanswered)
        repo = cls(staged, config, master, cache_dir, sync_index=False)
        staged.rejoin = partial(repo.rejoin_store, on_rejoin=on_rejoin)
        return repo

    def rejoin_store(self, store: ObjectStore, *,
                     on_rejoin: Callable[[ObjectStore, MasterKey], ObjectStore] | None = None) -> ObjectStore:
        """Check that `store`, answering again after the repository was opened without it, holds
        this repository still (`StoreReplaced` if not), then `on_rejoin` (see `open_from_copies`),
        and take up the index objects other machines stored meanwhile. The store to use from then on."""
        self._check_holds_this_repository(store)
        if on_rejoin is not None:
            store = on_rejoin(store, self.key)
        self.index.sync(store, self.key, staged=[k.removeprefix("index/") for k in self.staged_keys("index/")])
        return store

    def _check_holds_this_repository(self, store: ObjectStore) -> None:
        try:
            found = Config.decode(store.get("config")).id
        except ObjectNotFound:
            found = None
        except StoreError:
            raise  # it does not answer after all (a folder still missing, a timeout): not an answer
        except FsmountError as exc:
            raise StoreError(f"{store.location} answers, but its config does not read: {exc}") from exc
        if found != self.config.id:
            held = f"another repository ({found[:8]})" if found else "no repository"
            raise StoreReplaced(f"{store.location} holds {held} now, not {self.config.id[:8]}, which this mount "
                                "opened from its local copies: nothing is uploaded there")

    @property
    def backlog(self) -> BacklogStore | None:
        """This process's backlog, when it was opened with one."""
        return self.store if isinstance(self.store, BacklogStore) else None

    def staged_keys(self, prefix: str) -> set[str]:
        """Objects that a live mount of this machine holds in its backlog, not in the store yet."""
        return staged_keys(os.path.join(self.cache_dir, BACKLOGS_DIR), prefix)

    def sync_index(self) -> None:
        """Bring the index cache up to date with the store (and with the backlogs' index objects)."""
        self.index.sync(self.store, self.key,
                        staged=[k.removeprefix("index/") for k in self.staged_keys("index/")])

    def add_key(self, passphrase: bytes) -> str:
        wrapped = self.key.wrap(passphrase)
        key_id = content_hash(wrapped)
        self.store.put(f"keys/{key_id}", wrapped)
        return key_id

    def close(self) -> None:
        self.writer.close()
        self.index.close()
        self.store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- blobs ------------------------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def save_blob(self, blob_type: int, plaintext: bytes | memoryview, blob_id: bytes | None = None) -> tuple[bytes, bool]:
        return self.writer.save(blob_type, plaintext, blob_id)

    def load_blob(self, blob_type: int, blob_id: bytes) -> bytes:
        location = self.index.lookup(blob_id)
        if location is None:
            raise IntegrityError(f"blob {blob_id.hex()} is not in the index (missing)")
        entry = location.entry
        if entry.blob_type != blob_type:
            raise IntegrityError(f"blob {blob_id.hex()} has type {entry.blob_type}, expected {blob_type}")
        key = pack_key(location.pack_id)
        try:
            sealed = self.store.get(key, entry.offset, entry.length)
        except ObjectNotFound:
            raise IntegrityError(f"pack {location.pack_id} holding blob {blob_id.hex()} is missing") from None
        if len(sealed) != entry.length:
            raise IntegrityError(f"pack {location.pack_id} is truncated (blob {blob_id.hex()})")
        try:
            return self.key.unseal_blob(blob_type, blob_id, sealed)
        except IntegrityError as exc:
            healthy = self.load_blob_from_replicas(blob_type, blob_id)
            if healthy is not None:
                return healthy
            raise IntegrityError(f"{exc} (in pack {location.pack_id})") from None

    def load_blob_from_replicas(self, blob_type: int, blob_id: bytes) -> bytes | None:
        """A blob from the first replica whose copy checks out, when the usual read got a bad one."""
        location = self.index.lookup(blob_id)
        if location is None:
            return None
        entry = location.entry
        for replica in getattr(self.store, "replicas", ())[1:]:
            try:
                sealed = replica.get(pack_key(location.pack_id), entry.offset, entry.length)
                data = self.key.unseal_blob(blob_type, blob_id, sealed)
            except FsmountError:
                continue
            log.warning("blob %s in pack %s is damaged in the first replica; read it from %s",
                        blob_id.hex(), location.pack_id, replica.location)
            return data
        return None

    def flush(self) -> None:
        """Make every blob saved so far durable and indexed."""
        self.writer.flush()

    # -- trees ------------------------------------------------------------------------------------

    def save_tree(self, nodes: list[Node]) -> bytes:
        blob_id, _ = self.save_blob(TREE_BLOB, encode_tree(nodes))
        # The next backup reads the trees along its changed paths from here, not from the store
        # (which may be down: a live mount's backlog then holds the pack they are in).
        self._cache_tree(blob_id, list(nodes))
        return blob_id

    def load_tree(self, tree_id: bytes) -> list[Node]:
        """The nodes of a tree, sorted by name. Shared with a cache: treat them as read-only."""
        with self._trees_lock:
            nodes = self._trees.get(tree_id)
            if nodes is not None:
                self._trees.move_to_end(tree_id)
                return list(nodes)
        nodes = decode_tree(self.load_blob(TREE_BLOB, tree_id), f"tree {tree_id.hex()}")
        self._cache_tree(tree_id, nodes)
        return list(nodes)

    def _cache_tree(self, tree_id: bytes, nodes: list[Node]) -> None:
        with self._trees_lock:
            if tree_id in self._trees:
                self._trees.move_to_end(tree_id)
                return
            weight = _weight(nodes)
            if weight > TREE_CACHE_BYTES:
                return  # read again when needed rather than held for good
            self._trees[tree_id] = nodes
            self._cached_bytes += weight
            while self._cached_bytes > TREE_CACHE_BYTES:
                _, evicted = self._trees.popitem(last=False)
                self._cached_bytes -= _weight(evicted)

    def cached_tree(self, tree_id: bytes) -> list[Node] | None:
        """The nodes of a tree if the cache holds them (read-only), without loading anything."""
        with self._trees_lock:
            return self._trees.get(tree_id)

    def load_block(self, blob_id: bytes) -> bytes:
        return self.load_blob(DATA_BLOB, blob_id)

    # -- snapshots --------------------------------------------------------------------------------

    def save_snapshot(self, snapshot: Snapshot) -> str:
        self.flush()
        snapshot_id, data = snapshot.encode(self.key)
        self.store.put(f"snapshots/{snapshot_id}", data)
        snapshot.id = snapshot_id
        self._keep_copy(f"snapshots/{snapshot_id}", data)
        return snapshot_id

    def snapshot_ids(self) -> list[str]:
        """The ids of the store's snapshot objects; a file under `snapshots/` with another name is
        someone else's (verify lists it as foreign) and no snapshot."""
        return [name for key, _ in self.store.list("snapshots/")
                if is_object_id(name := key.removeprefix("snapshots/"))]

    def load_snapshot(self, snapshot_id: str) -> Snapshot:
        try:
            data = self.store.get(f"snapshots/{snapshot_id}")
        except ObjectNotFound:
            raise IntegrityError(f"snapshot {snapshot_id} is missing") from None
        snapshot = Snapshot.decode(self.key, snapshot_id, data)
        self._keep_copy(f"snapshots/{snapshot_id}", data)
        return snapshot

    def snapshots(self, ids: list[str] | None = None) -> list[Snapshot]:
        """All snapshots, oldest first; unreadable ones are logged, left out, and named in
        `damaged_snapshots`. `ids`: what `snapshot_ids()` said, when the caller listed them already."""
        found, damaged = [], []
        for snapshot_id in self.snapshot_ids() if ids is None else ids:
            try:
                found.append(self.load_snapshot(snapshot_id))
            except IntegrityError as exc:
                log.warning("%s", exc)
                damaged.append(snapshot_id)
        self.damaged_snapshots = damaged
        if ids is None:
            self._forget_copies({s.id for s in found} | set(damaged))
        found.sort(key=lambda s: (s.time_ns, s.id))
        return found

    def snapshots_known_here(self) -> list[Snapshot]:
        """The snapshots this machine read or wrote, from their copies in the cache dir, and those
        waiting in a backlog here: what there is to go by while the store does not answer."""
        found = {}
        for key, _ in self.copies.list("snapshots/"):
            snapshot_id = key.removeprefix("snapshots/")
            try:
                found[snapshot_id] = Snapshot.decode(self.key, snapshot_id, self.copies.get(key))
            except FsmountError as exc:
                log.warning("the copy of snapshot %s kept here does not read: %s", snapshot_id[:8], exc)
        backlog = self.backlog
        for key in backlog.keys_waiting("snapshots/") if backlog is not None else ():
            snapshot_id = key.removeprefix("snapshots/")
            if snapshot_id not in found:
                try:
                    found[snapshot_id] = self.load_snapshot(snapshot_id)
                except FsmountError as exc:  # uploaded meanwhile, so read from the store, which fails
                    log.debug("snapshot %s not known here: %s", snapshot_id[:8], exc)
        return sorted(found.values(), key=lambda s: (s.time_ns, s.id))

    def _keep_copy(self, key: str, data: bytes) -> None:
        """Keep a copy of a sealed snapshot for a mount without the store; a cache, so a full disk
        or a read-only cache dir only costs that."""
        try:
            if not self.copies.exists(key):
                os.makedirs(self.copies.root, mode=0o700, exist_ok=True)
                self.copies.put(key, data)
        except (OSError, StoreError) as exc:
            log.debug("no local copy of %s: %s", key, exc)

    def _forget_copies(self, listed: set[str]) -> None:
        """Remove the copies of snapshots the store no longer holds (forgotten), but not of those
        a backlog here still waits to upload."""
        waiting = {k.removeprefix("snapshots/") for k in self.staged_keys("snapshots/")}
        try:
            for key, _ in list(self.copies.list("snapshots/")):
                if key.removeprefix("snapshots/") not in listed | waiting:
                    self.copies.delete(key)
        except (OSError, StoreError) as exc:
            log.debug("copies of forgotten snapshots not removed: %s", exc)

    def find_node(self, snapshot: Snapshot, path: bytes) -> Node:
        """The node at `path` (relative, `/`-separated bytes) in a snapshot; b"" is the root."""
        node = Node(name=b"", type="d", subtree=snapshot.tree)
        for part in [p for p in path.split(b"/") if p and p != b"."]:
            if node.type != "d":
                raise UsageError(f"{shown_name(path)}: not a directory in the snapshot")
            for child in self.load_tree(node.subtree):
                if child.name == part:
                    node = child
                    break
            else:
                raise UsageError(f"{shown_name(path)}: no such path in snapshot {snapshot.short_id}")
        return node


@dataclass(frozen=True)
class OpenedKey:
    """A master key, with the `keys/` object it was opened from."""
    master: MasterKey
    name: str  # keys/<id>
    wrapped: bytes


def open_master_key(store: ObjectStore, passphrase: bytes) -> MasterKey:
    """The master key from the first `keys/` object the passphrase opens."""
    return open_key(store, passphrase).master


def open_key(store: ObjectStore, passphrase: bytes) -> OpenedKey:
    """The first `keys/` object the passphrase opens, and the master key in it."""
    key_names = [k for k, _ in store.list("keys/")]
    if not key_names:
        raise IntegrityError(f"repository at {store.location} has no keys")
    damaged: list[str] = []
    for name in key_names:
        try:
            wrapped = store.get(name)
            return OpenedKey(MasterKey.unwrap(wrapped, passphrase), name, wrapped)
        except WrongPassword:
            continue
        except IntegrityError as exc:  # another key may still open
            damaged.append(f"{name} ({exc})")
    if damaged:
        raise IntegrityError(f"no key of the repository opens with this passphrase, and {len(damaged)} key "
                             f"objects are damaged: {damaged[0]}")
    raise WrongPassword("wrong passphrase: no key of the repository opens with it")


def read_config(store: ObjectStore) -> bytes:
    """The bytes of the store's `config`; RepositoryNotFound when there is none (StoreError when
    the store does not answer)."""
    try:
        return store.get("config")
    except ObjectNotFound:
        try:
            held = _parts_held(store)
        except StoreError:  # no folder or bucket at all
            held = []
        if held:
            raise RepositoryNotFound(f"{store.location} holds parts of a repository ({', '.join(held)}) but "
                                     "no config: put its config back, from a replica or a copy; or, if an "
                                     "interrupted `fsmount migrate` was copying to it, run that migrate "
                                     "again to finish it") from None
        raise RepositoryNotFound(f"no repository at {store.location} (run `fsmount init` first)") from None
    except FolderMissing:  # as an empty folder says it (a live mount takes it for a store that is down)
        raise RepositoryNotFound(f"no repository at {store.location} (run `fsmount init` first)") from None
    except LocationMissing as exc:  # exit 10, as for an empty folder: a script then runs `init`
        raise RepositoryNotFound(f"no repository at {store.location}: {exc}") from None


# -- the copies a live mount opens from without its store ------------------------------------------
#
# A location's repository is found by the location's name, as the store reports it (an S3 endpoint,
# bucket and prefix; a folder's absolute path; replicas' names in order): `locations/<hash>` in the
# cache root holds the id of the repository last opened there, and that id names the cache dir
# (as it always has: the index, the backlogs and the changelogs are there) holding the copies.


def _location_file(location: str) -> str:
    return hashlib.sha256(location.encode(errors="surrogateescape")).hexdigest()[:32]  # a path may hold any byte


def keep_copies(cache_root: str, location: str, repo_id: str, config_bytes: bytes, key: OpenedKey) -> None:
    """Keep what opening the repository without the store takes: which repository `location`
    holds, its config and the key object the passphrase opened (sealed under the passphrase)."""
    copies = LocalStore(os.path.join(cache_root, repo_id, COPIES_DIR))
    locations = LocalStore(os.path.join(cache_root, LOCATIONS_DIR))
    pointer = json.dumps({"location": location, "id": repo_id}).encode()
    for store, name, data in ((copies, "config", config_bytes), (copies, key.name, key.wrapped),
                              (locations, _location_file(location), pointer)):
        os.makedirs(store.root, mode=0o700, exist_ok=True)
        try:
            same = store.get(name) == data
        except ObjectNotFound:
            same = False
        if not same:
            store.put(name, data)  # a StoreError here is the cache dir's: it fails the open, as the index would


def _copied_config(cache_root: str, location: str, unanswered: StoreError) -> Config:
    """The config kept for the repository `location` held when last opened here; the store's
    error, said so, when none was."""
    try:
        pointer = json.loads(LocalStore(os.path.join(cache_root, LOCATIONS_DIR)).get(_location_file(location)))
        repo_id = pointer["id"]
        config = Config.decode(LocalStore(os.path.join(cache_root, repo_id, COPIES_DIR)).get("config"))
    except (ObjectNotFound, FolderMissing):  # no record, or none of the cache folders made yet
        if isinstance(unanswered, LocationMissing):  # a folder never seen here: as for any command
            raise RepositoryNotFound(f"no repository at {location}: {unanswered}") from unanswered
        raise StoreError(f"{unanswered} (and the repository was never opened here, so no copy of its "
                         "config lets the mount start without the store)") from unanswered
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"the record of the repository at {location} kept here is malformed: {exc}") from exc
    if config.id != repo_id or pointer["location"] != location:
        raise IntegrityError(f"the copy of the config kept in {os.path.join(cache_root, repo_id)} is of another "
                             f"repository ({config.id[:8]}); it cannot stand in for {location}'s")
    return config
