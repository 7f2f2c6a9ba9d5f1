"""Check a repository: its structure always, and with `read_data` every byte of every pack.

Structure: every snapshot loads; every tree reachable from a snapshot loads; every block those trees
name is in the index; every pack the index names is in the store, with the size its index entries
make (as restic's check compares: a truncated pack shows without reading it). Data (`read_data=True`): every
pack is downloaded, its name checked against its content hash, its header checked against the
index, and every blob in it opened, which checks authenticity and the blob id.

Index: every index object in the store is fetched and opened, whatever the local cache holds (it
read each object once, and damage since then shows only to a reader that fetches it: the next
machine); once, not twice: those the cache fetched and opened as this process synced it are taken
from it (`index_pack_sizes`). Packs in the store that no readable index object names (their index object damaged or
gone, or left by an interrupted backup) are counted, and their headers read: `verify --repair`
indexes them from those; a pack whose header does not open is an error (`verify --repair` has
removed it by then: nothing can read it).

With `repair`, a pack that `read_data` finds damaged on every copy is salvaged then and there
(`repair.salvage_packs`): what still opens goes into a new pack, the rest leaves the index and is
reported lost. So is a pack whose size is wrong, read for that even without `read_data`. Keys
that are none of our objects' names (under `data/`, `index/`, `snapshots/`, `keys/`) are foreign
objects: listed, left alone.
On replicas, `check_copies` adds what each replica lacks or holds damaged (reads go on to a good
copy, so the checks above see the repository as the replicas serve it together).

When anything is missing or corrupt, a second walk names the damage as a user sees it: which
snapshots and which files (or directory listings) depend on the bad objects. Problems and damage
are records (`Problem`, `Damage`) holding the ids and raw path bytes, for the CLI to print as text
or JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .blob_reader import BlobReader
from .crypto import content_hash
from .errors import FsmountError, IntegrityError
from .index import index_pack_sizes, read_pack_headers
from .pack import TREE_BLOB, pack_key, read_header
from .progress import Progress
from .repair import data_objects, foreign_metadata, salvage_packs, unindexed_to_check
from .replicas import check_replicas
from .repository import Repository
from .snapshot import Snapshot
from .stores.base import ObjectStore
from .tree import DIR, FILE, HOLE, Node, decode_tree

log = logging.getLogger(__name__)

READ_WORKERS = 4
TREE_WORKERS, TREE_BATCH = 8, 256
WHOLE, DAMAGED, UNREADABLE = "whole", "damaged", "unreadable"  # a pack read; DAMAGED: no copy of it is whole
SALVAGE_ADVICE = ("(`fsmount verify {}--repair` keeps what still opens in a new pack, and takes the "
                  "rest out of the index for the next backup to store again)")
REBUILD_ADVICE = "(`fsmount verify --repair` rebuilds the index from the packs' headers)"
REMOVE_ADVICE = "nothing can read it, so no snapshot can use it (`fsmount verify --repair` removes it)"
DAMAGED_FILE, DAMAGED_DIRECTORY, DAMAGED_SNAPSHOT = "file", "directory", "snapshot"  # what a `Damage` names


@dataclass(frozen=True)
class Problem:
    """One error verify found: its message, and what it concerns when that is one thing: a store
    `object` (its key), a `blob` (id), a `replica` (location)."""

    message: str
    object: str | None = None
    blob: bytes | None = None
    replica: str | None = None

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Damage:
    """What a user would lose: a file, or a directory's listing, of a snapshot (`path`, its bytes
    from the snapshot's root), or the whole snapshot (`path` b"")."""

    snapshot: str  # the full id
    path: bytes
    what: str  # DAMAGED_FILE, DAMAGED_DIRECTORY or DAMAGED_SNAPSHOT

    @property
    def short_id(self) -> str:
        return self.snapshot[:8]


@dataclass
class VerifyReport:
    snapshots: int = 0
    trees: int = 0
    packs: int = 0
    packs_read: int = 0
    bytes_read: int = 0
    blobs_read: int = 0
    unindexed_packs: int = 0  # in the store, named by no readable index object, header readable
    packs_in_backlog: int = 0  # indexed, but still in a live mount's backlog on this machine
    foreign_objects: list[str] = field(default_factory=list)  # keys that are none of our objects' names
    errors: list[Problem] = field(default_factory=list)
    damaged: list[Damage] = field(default_factory=list)
    # {"replica": location, "object": key (None: the whole replica), "what": missing|damaged|unreachable}
    bad_copies: list[dict] = field(default_factory=list)
    # {"pack": id, "into": new pack id or None, "blobs_kept": n, "blobs_lost": [blob id hex]}, by repair
    salvaged_packs: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


class Verifier:
    def __init__(self, repo: Repository, *, read_data: bool = False, repair: bool = False,
                 progress: Progress | None = None):
        self.repo = repo
        self.read_data = read_data
        self.repair = repair
        self.progress = progress or Progress()
        self.report = VerifyReport()
        self.bad_blobs: set[bytes] = set()
        self.bad_trees: set[bytes] = set()
        self.bad_packs: set[str] = set()
        self.wrong_size: dict[str, tuple[int, int]] = {}  # pack -> (size in the store, size its entries make)

    def _error(self, message: str, **about: str | bytes | None) -> None:
        self.report.errors.append(Problem(message, **about))

    def run(self) -> VerifyReport:
        repo, report = self.repo, self.report
        repo.sync_index()
        in_store, foreign = data_objects(repo)
        report.foreign_objects = sorted(foreign + foreign_metadata(repo))
        # Packs a live mount still holds in its backlog are on their way, not missing.
        waiting = {key.rsplit("/", 1)[1] for key in repo.staged_keys("data/")} - in_store.keys()
        indexed = set(repo.index.pack_ids())
        report.packs = len(in_store)
        report.packs_in_backlog = len(waiting & indexed)
        for pack_id in sorted(indexed - in_store.keys() - waiting):
            self._error(f"pack {pack_id} is missing from the store", object=pack_key(pack_id))
            self._mark_pack_bad(pack_id)
        self._check_index_objects(in_store)
        snapshots = self._load_snapshots()
        self._check_trees(snapshots)
        if self.read_data:
            self._read_packs(sorted(indexed & in_store.keys()), in_store)
        elif self.repair and self.wrong_size:  # read to be salvaged, as --read-data would find them
            self._read_packs(sorted(self.wrong_size.keys() & indexed), in_store)
        else:
            for pack_id, (size, expected) in sorted(self.wrong_size.items()):
                self._error(f"pack {pack_id} is {_size_note(size, expected)} {SALVAGE_ADVICE.format('')}",
                            object=pack_key(pack_id))
                self._mark_pack_bad(pack_id)
        if self.bad_blobs or self.bad_trees:
            self._name_damage(snapshots)
        return report

    # -- structure --------------------------------------------------------------------------------

    def _check_index_objects(self, in_store: dict[str, int]) -> None:
        """Every index object of the store opens (the cache, which read each object once, may hold one
        damaged since), every pack is in one and has the size its entries make; the header of each
        pack in none is read, as `verify --repair` would read it to index the pack."""
        repo, report = self.repo, self.report
        objects = index_pack_sizes(repo.store, repo.key, repo.index)
        for name, why in sorted(objects.damaged.items()):
            self._error(f"{why} {REBUILD_ADVICE}", object=f"index/{name}")
        for pack_id, expected in objects.pack_sizes().items():
            if pack_id in in_store and in_store[pack_id] != expected:
                self.wrong_size[pack_id] = (in_store[pack_id], expected)
        # Not those a live mount's index objects on their way name:
        unindexed = unindexed_to_check(repo, objects, in_store)
        _, unreadable = read_pack_headers(repo.store, repo.key, unindexed)
        report.unindexed_packs = len(unindexed) - len(unreadable)  # those --repair can index
        for pack_id, why in sorted(unreadable.items()):
            self._error(f"pack {pack_id} is in no index, and its header cannot be read: {why}; {REMOVE_ADVICE}",
                        object=pack_key(pack_id))

    def _mark_pack_bad(self, pack_id: str) -> None:
        self.bad_packs.add(pack_id)
        self.bad_blobs.update(e.blob_id for e in self.repo.index.pack_entries(pack_id))

    def _load_snapshots(self) -> list[Snapshot]:
        snapshots = []
        foreign = set(self.report.foreign_objects)
        for snapshot_id in sorted(self.repo.snapshot_ids()):
            if f"snapshots/{snapshot_id}" in foreign:
                continue
            try:
                snapshots.append(self.repo.load_snapshot(snapshot_id))
            except FsmountError as exc:
                self._error(str(exc), object=f"snapshots/{snapshot_id}")
        self.report.snapshots = len(snapshots)
        return snapshots

    def _check_trees(self, snapshots: list[Snapshot]) -> None:
        """Every tree reachable from a snapshot, level by level, a batch at a time: the batch in
        pack order, cut into `TREE_WORKERS` runs fetched at once, adjacent trees of one pack in one
        ranged read (`BlobReader`); their blocks then looked up in the index a batch at a time.
        `verify` of a 1 GiB repository on SeaweedFS: 4.1 s when each tree was a round trip of its
        own, one at a time; 0.4 s now that trees also fill packs of their own (blob_writer.py)."""
        seen: set[bytes] = set()
        frontier = [snapshot.tree for snapshot in snapshots]
        reader = BlobReader(self.repo)
        with ThreadPoolExecutor(TREE_WORKERS, thread_name_prefix="verify-trees") as pool:
            while frontier:
                level = [tree_id for tree_id in dict.fromkeys(frontier) if tree_id not in seen]
                seen.update(level)
                frontier = []
                for start in range(0, len(level), TREE_BATCH):  # bounded: a level may be very wide
                    # The whole batch first, then its blocks: SQLite gives up the GIL at every row,
                    # and with the loading threads busy in botocore each row waited to get it back.
                    loaded = self._load_trees(level[start:start + TREE_BATCH], reader, pool)
                    self.report.trees += len(loaded)
                    frontier.extend(node.subtree for nodes in loaded for node in nodes if node.type == DIR)
                    self._check_blocks([node for nodes in loaded for node in nodes if node.type == FILE])

    def _load_trees(self, tree_ids: list[bytes], reader: BlobReader, pool: ThreadPoolExecutor) -> list[list[Node]]:
        """The nodes of each tree that loads; the others are recorded as errors."""
        locations = self.repo.index.lookup_many(tree_ids)
        in_pack_order = sorted(tree_ids, key=lambda t: (locations[t].pack_id, locations[t].entry.offset)
                               if t in locations else ("~", 0))
        share = max(1, -(-len(in_pack_order) // TREE_WORKERS))
        fetched: dict[bytes, bytes | FsmountError] = {}
        for part in pool.map(lambda ids: reader.fetch(TREE_BLOB, ids, locations),
                             [in_pack_order[i:i + share] for i in range(0, len(in_pack_order), share)]):
            fetched.update(part)
        loaded = []
        for tree_id in tree_ids:
            what = f"tree {tree_id.hex()}"
            try:
                result = fetched[tree_id]
                if isinstance(result, FsmountError):
                    raise result
                loaded.append(decode_tree(result, what))
            except FsmountError as exc:
                self._error(f"{what}: {exc}", blob=tree_id)
                self.bad_trees.add(tree_id)
        return loaded

    def _check_blocks(self, files: list[Node]) -> None:
        """Every block of these files is in the index (one query per batch, not per block)."""
        wanted = [blob_id for node in files for blob_id in node.block_ids()
                  if blob_id != HOLE and blob_id not in self.bad_blobs]
        known = self.repo.index.known(list(dict.fromkeys(wanted)))
        for blob_id in wanted:
            if blob_id not in known and blob_id not in self.bad_blobs:
                self._error(f"blob {blob_id.hex()} is missing (not in any index)", blob=blob_id)
                self.bad_blobs.add(blob_id)

    # -- data -------------------------------------------------------------------------------------

    def _read_packs(self, pack_ids: list[str], sizes: dict[str, int]) -> None:
        damaged: dict[str, list[tuple[bytes | None, str]]] = {}  # read, and no copy was whole
        self.progress.start(total_bytes=sum(sizes[p] for p in pack_ids), total_items=len(pack_ids))
        try:
            with ThreadPoolExecutor(READ_WORKERS, thread_name_prefix="verify") as pool:
                for pack_id, size, state, problems in pool.map(self._read_pack, pack_ids):
                    self.report.packs_read += 1
                    self.report.bytes_read += size
                    if state == UNREADABLE:
                        self._mark_pack_bad(pack_id)
                    if state == DAMAGED:
                        damaged[pack_id] = problems
                    else:  # whole, the index may still disagree with it: the index is wrong then
                        self._record(pack_id, problems)
                    self.progress.advance(nbytes=size, items=1, current=pack_id[:12])
        finally:
            self.progress.finish()
        if self.repair and damaged:
            self._salvage(damaged)
        for pack_id, problems in damaged.items():
            self._record(pack_id, problems)

    def _record(self, pack_id: str, problems: list[tuple[bytes | None, str]]) -> None:
        for blob_id, message in problems:
            self._error(message, object=pack_key(pack_id), blob=blob_id)
            if blob_id is not None:
                self.bad_blobs.add(blob_id)

    def _salvage(self, damaged: dict[str, list[tuple[bytes | None, str]]]) -> None:
        """Replace the damaged packs by what still opens in them (`salvage_packs`); what it could
        not save is lost, and what it left as it was keeps its problems in `damaged`."""
        outcome = salvage_packs(self.repo, sorted(damaged))
        for salvage in outcome.salvaged:
            del damaged[salvage.pack]
            self.report.salvaged_packs.append({"pack": salvage.pack, "into": salvage.into, "blobs_kept": salvage.kept,
                                               "blobs_lost": [blob_id.hex() for blob_id in salvage.lost]})
            for blob_id in salvage.lost:
                self._error(f"blob {blob_id.hex()} of pack {salvage.pack} is lost: no copy of it opens, and it "
                            "left the index", object=pack_key(salvage.pack), blob=blob_id)
                self.bad_blobs.add(blob_id)
        for pack_id, why in outcome.untouched.items():
            damaged[pack_id].append((None, f"pack {pack_id} is left as it is: {why}"))

    def _read_pack(self, pack_id: str) -> tuple[str, int, str, list[tuple[bytes | None, str]]]:
        """Check one pack: (id, size, WHOLE or DAMAGED or UNREADABLE, [(bad blob id or None, message)])."""
        repo = self.repo
        try:
            data = repo.store.get(pack_key(pack_id))
        except IntegrityError as exc:  # no replica has a whole copy: look at a damaged one blob by blob
            data = _any_copy(repo.store, pack_key(pack_id))
            if data is None:
                return pack_id, 0, UNREADABLE, [(None, f"pack {pack_id}: {exc}")]
        except FsmountError as exc:
            return pack_id, 0, UNREADABLE, [(None, f"pack {pack_id}: {exc}")]
        problems: list[tuple[bytes | None, str]] = []
        whole = content_hash(data) == pack_id
        if not whole:
            size_note = f"; {_size_note(*self.wrong_size[pack_id])}" if pack_id in self.wrong_size else ""
            problems.append((None, f"pack {pack_id} does not match its content hash (corrupt{size_note})"
                                   + ("" if self.repair else f" {SALVAGE_ADVICE.format('--read-data ')}")))
        indexed = repo.index.pack_entries(pack_id)
        try:
            header = {e.blob_id: e for e in read_header(repo.key, data, pack_id)}
        except FsmountError as exc:
            header = {}
            problems.append((None, f"pack {pack_id}: {exc}"))
        for entry in indexed:
            if header and header.get(entry.blob_id) != entry:
                problems.append((entry.blob_id, (f"pack {pack_id}: header disagrees with the index "
                                                 f"about blob {entry.blob_id.hex()}")))
                continue
            sealed = data[entry.offset: entry.offset + entry.length]
            try:
                repo.key.unseal_blob(entry.blob_type, entry.blob_id, sealed)
            except FsmountError as exc:
                problems.append((entry.blob_id, f"pack {pack_id}: {exc}"))
        self.report.blobs_read += len(indexed)
        return pack_id, len(data), WHOLE if whole else DAMAGED, problems

    # -- naming the damage ------------------------------------------------------------------------

    def _name_damage(self, snapshots: list[Snapshot]) -> None:
        damaged = self.report.damaged
        for snapshot in snapshots:
            for path, node in self._walk(snapshot.tree):
                if node.type == DIR and (node.subtree in self.bad_trees or node.subtree in self.bad_blobs):
                    damaged.append(Damage(snapshot.id, path, DAMAGED_DIRECTORY))
                elif node.type == FILE and any(b in self.bad_blobs for b in node.block_ids()):
                    damaged.append(Damage(snapshot.id, path, DAMAGED_FILE))
            if snapshot.tree in self.bad_trees or snapshot.tree in self.bad_blobs:
                damaged.append(Damage(snapshot.id, b"", DAMAGED_SNAPSHOT))

    def _walk(self, tree_id: bytes, prefix: bytes = b"") -> Iterator[tuple[bytes, Node]]:
        pending = [(tree_id, prefix)]
        while pending:
            tree_id, prefix = pending.pop()
            if tree_id in self.bad_trees:
                continue
            try:
                nodes = self.repo.load_tree(tree_id)
            except FsmountError:
                continue
            for node in nodes:
                path = prefix + b"/" + node.name if prefix else node.name
                yield path, node
                if node.type == DIR:
                    pending.append((node.subtree, path))


def verify(repo: Repository, *, read_data: bool = False, repair: bool = False,
           progress: Progress | None = None) -> VerifyReport:
    """Check `repo` (see the module docstring); with `repair` and `read_data`, salvage the packs
    damaged on every copy."""
    return Verifier(repo, read_data=read_data, repair=repair, progress=progress).run()


def check_copies(report: VerifyReport, store: ObjectStore, *, read_data: bool,
                 progress: Progress | None = None) -> None:
    """Add to `report` what each replica of `store` lacks (and with `read_data`, holds damaged), as
    `bad_copies` and one error per replica and kind. `verify` reads through the replicas, so a good
    copy anywhere passes it: a replica's own damage showed only as a warning."""
    replicas = getattr(store, "replicas", None)
    if not replicas:
        return
    for state in check_replicas(replicas, read_data=read_data, read_metadata=True, progress=progress):
        if not state.reachable:
            report.errors.append(Problem(f"replica {state.location} cannot be reached: {state.error}",
                                         replica=state.location))
            report.bad_copies.append({"replica": state.location, "object": None, "what": "unreachable"})
        for what, says, keys in (("missing", "lacks", state.missing),
                                 ("damaged", "holds damaged copies of", state.damaged)):
            report.bad_copies.extend({"replica": state.location, "object": key, "what": what} for key in keys)
            if keys:
                objects = f"{len(keys)} objects, e.g. {keys[0]}" if len(keys) > 1 else f"1 object, {keys[0]}"
                report.errors.append(Problem(f"replica {state.location} {says} {objects} (`fsmount verify --repair` "
                                             "heals them from a good copy)", replica=state.location,
                                             object=keys[0] if len(keys) == 1 else None))


def _size_note(size: int, expected: int) -> str:
    """How a pack's size in the store differs from what its index entries make."""
    return (f"{'truncated' if size < expected else 'too long'}: {size} bytes in the store, "
            f"{expected} by its index entries")


def _any_copy(store: ObjectStore, key: str) -> bytes | None:
    """Some replica's copy of `key`, damaged or not: a pack with one bad blob still holds good
    ones, and verify names only the files that need the bad one (it named every file of the pack)."""
    for replica in getattr(store, "replicas", ()):
        try:
            return replica.get(key)
        except FsmountError:
            continue
    return None

