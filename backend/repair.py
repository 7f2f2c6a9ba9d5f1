"""Rebuild the index so that it names every pack the store holds, and no pack it lacks.

The index says which pack holds each blob; readers find blobs only through it, and a backup that
finds a blob in it does not upload the blob again. `repair_index` is restic's `repair index`:

- **Lost packs leave the index.** When a pack is lost (deleted by hand or by a bucket's lifecycle
  rule, a disk error), every later backup would still count on it and make snapshots that cannot be
  restored. Each index object that names a missing pack is rewritten without it. What the source
  still holds then goes into new packs at the next backup, which reads again every file of its
  parent snapshot whose blocks the index no longer knows (backup.py); since blobs are named by their
  content, older snapshots that need it are whole again too. A live mount's change-driven snapshot
  reuses the subtrees nothing was written to without looking inside, so it fills the gap at the
  first snapshot after its next mount (which rescans the folder).
- **Unindexed packs join it.** A pack that no readable index object names (its index object is
  damaged or gone, or a backup stopped between its packs and its index object) still holds its
  data, and its own sealed header lists its blobs: the header is read with a ranged GET of the
  pack's tail, and the packs go into new index objects. A pack whose header opens on no copy is
  removed: no index names it and nothing can read it, so no snapshot can use it. (Objects are
  written whole, a local file by rename and an S3 object by one PUT, so a pack a backup is storing
  right now is either not listed yet or complete, with a header that opens.) While a live mount's
  index objects wait in its backlog, the packs this machine's cache knows are kept.
- **Damaged index objects go.** Only after the index objects that replace them are stored, so a
  crash in between leaves a complete index (blobs listed twice are allowed).
- **Packs damaged on every copy are salvaged** (`salvage_packs`, restic's `repair packs`), once
  `verify --read-data` has found that no replica holds a whole copy: every blob that still opens
  and matches its id, in any copy, goes into a new pack; the index objects naming the damaged pack
  are rewritten without it, and only then is the damaged pack deleted. The blobs no copy holds
  whole leave the index, so they count as missing, as a lost pack's do, and the next backup stores
  them again. A pack whose blobs nothing names (no readable index object, its header damaged) is
  left as it is.
- **Objects that are not ours are left alone.** A key under `data/` that is not a pack's name
  (`data/<2 hex>/<64 hex>`), or one under `index/`, `snapshots/` or `keys/` that is not 64 hex
  digits, is a foreign object, which neither verify nor repair takes for one of ours.

Every new object is written before the old one is deleted, and the index cache rebuilds itself from
the store at the next sync (it sees objects gone). What is nowhere any more stays damaged, and
`verify` names it. A backup running meanwhile is safe: it writes an index object only after the
packs it names are stored, so its objects are never taken for ones naming lost packs; its packs not
indexed yet may be indexed here too, which costs a duplicate entry and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from .blob_writer import INDEX_BATCH_BLOBS
from .crypto import content_hash
from .errors import FsmountError, IntegrityError, ObjectNotFound
from .index import IndexObjects, encode_index, read_index_objects, read_pack_headers
from .pack import BlobEntry, PackWriter, pack_key, read_header
from .replicas import METADATA_PREFIXES, is_repository_object
from .repository import Repository

log = logging.getLogger(__name__)


@dataclass
class IndexRepair:
    missing_packs: int = 0
    rewritten_index_objects: int = 0
    blobs_dropped: int = 0
    indexed_packs: int = 0  # packs no readable index object named, indexed from their own header
    blobs_indexed: int = 0
    deleted_index_objects: int = 0  # damaged ones, once their replacement was stored
    removed_packs: dict[str, str] = field(default_factory=dict)  # not indexed, header opens on no copy -> why
    unreadable_packs: dict[str, str] = field(default_factory=dict)  # the same, kept: a live mount's index may name them


def data_objects(repo: Repository) -> tuple[dict[str, int], list[str]]:
    """(pack id -> size of every pack in the store, the keys under `data/` that are no pack's name):
    the second were left there by someone else, and are left alone."""
    packs, foreign = {}, []
    for key, size in repo.store.list("data/"):
        if is_repository_object(key):
            packs[key.rpartition("/")[2]] = size
        else:
            foreign.append(key)
    return packs, sorted(foreign)


def foreign_metadata(repo: Repository) -> list[str]:
    """The keys under `index/`, `snapshots/` and `keys/` that cannot be an object's name (not 64
    hex digits): someone else's files, left alone as those under `data/` are."""
    return sorted(key for prefix in METADATA_PREFIXES for key, _ in repo.store.list(prefix)
                  if not is_repository_object(key))


def unindexed_to_check(repo: Repository, objects: IndexObjects, in_store: dict[str, int]) -> dict[str, int]:
    """The packs of `in_store` that no readable index object names, but for those this machine's
    cache knows while a live mount's index objects wait in its backlog (they may name them)."""
    unindexed = packs_not_indexed(objects, in_store)
    if repo.staged_keys("index/"):
        cached = set(repo.index.pack_ids())
        unindexed = {pack_id: size for pack_id, size in unindexed.items() if pack_id not in cached}
    return unindexed


def packs_in_store(repo: Repository) -> dict[str, int]:
    """Pack id -> size of every pack in the store."""
    return data_objects(repo)[0]


def packs_not_indexed(objects: IndexObjects, in_store: dict[str, int]) -> dict[str, int]:
    """Those of `in_store` that no readable index object names."""
    named = objects.pack_ids()
    return {pack_id: size for pack_id, size in in_store.items() if pack_id not in named}


def repair_index(repo: Repository) -> IndexRepair:
    """Make the index name exactly the packs in the store (see the module docstring)."""
    report = IndexRepair()
    in_store = packs_in_store(repo)
    objects = read_index_objects(repo.store, repo.key)
    for why in objects.damaged.values():
        log.warning("%s: rebuilding the index from the packs' headers", why)
    _drop_missing_packs(repo, objects, in_store, report)
    _index_unindexed_packs(repo, objects, in_store, report)
    for name in sorted(objects.damaged):
        repo.store.delete(f"index/{name}")
        report.deleted_index_objects += 1
    if report.rewritten_index_objects or report.indexed_packs or report.deleted_index_objects:
        repo.sync_index()  # sees index objects gone, and rebuilds the cache from the store
    return report


def _drop_missing_packs(repo: Repository, objects: IndexObjects, in_store: dict[str, int],
                        report: IndexRepair) -> None:
    """Rewrite each readable index object that names a pack the store lacks, without it."""
    store = repo.store
    present = in_store.keys() | {key.rsplit("/", 1)[1] for key in repo.staged_keys("data/")}  # a live mount's
    for name, packs in objects.readable.items():
        kept = [(pack_id, entries) for pack_id, entries in packs if pack_id in present]
        if len(kept) == len(packs):
            continue
        for pack_id, entries in packs:
            if pack_id not in present:
                report.missing_packs += 1
                report.blobs_dropped += len(entries)
                log.warning("pack %s is missing: taking its %d blobs out of the index", pack_id, len(entries))
        if kept:
            new_name, data = encode_index(repo.key, kept)
            store.put(f"index/{new_name}", data)
        store.delete(f"index/{name}")
        report.rewritten_index_objects += 1


def _index_unindexed_packs(repo: Repository, objects: IndexObjects, in_store: dict[str, int],
                           report: IndexRepair) -> None:
    """Index the packs no readable index object names, from their own headers."""
    unindexed = packs_not_indexed(objects, in_store)
    if not unindexed:
        return
    headers, unreadable = read_pack_headers(repo.store, repo.key, unindexed)
    removable = unindexed_to_check(repo, objects, in_store)
    for pack_id, why in sorted(unreadable.items()):
        entries = _header_of_any_copy(repo, pack_id)
        if entries is not None:  # the copy read first is damaged; `verify --read-data --repair` heals it
            headers[pack_id] = entries
        elif pack_id in removable:
            repo.store.delete(pack_key(pack_id))
            report.removed_packs[pack_id] = why
            log.info("pack %s is in no index, and its header opens on no copy: removed it (%s)", pack_id, why)
        else:
            report.unreadable_packs[pack_id] = why
            log.warning("pack %s is in no index, and its header cannot be read: %s", pack_id, why)
    batch: list[tuple[str, list[BlobEntry]]] = []
    batch_blobs = 0
    for pack_id, entries in sorted(headers.items()):
        batch.append((pack_id, entries))
        batch_blobs += len(entries)
        report.indexed_packs += 1
        report.blobs_indexed += len(entries)
        if batch_blobs >= INDEX_BATCH_BLOBS:  # index objects as large as a backup writes, no larger
            _put_index(repo, batch)
            batch, batch_blobs = [], 0
    if batch:
        _put_index(repo, batch)


def _header_of_any_copy(repo: Repository, pack_id: str) -> list[BlobEntry] | None:
    """The entries of the first copy of the pack whose header opens (None if none does): the
    ranged read of its tail came from one copy only."""
    for copy in _every_copy(repo, pack_key(pack_id)):
        try:
            return read_header(repo.key, copy, pack_id)
        except (IntegrityError, ValueError):
            continue
    return None


def _put_index(repo: Repository, packs: list[tuple[str, list[BlobEntry]]]) -> None:
    name, data = encode_index(repo.key, packs)
    repo.store.put(f"index/{name}", data)


# -- packs damaged on every copy ----------------------------------------------------------------


@dataclass
class PackSalvage:
    """What became of one damaged pack: `into` holds the blobs that still opened (None if none did)."""

    pack: str
    into: str | None = None
    kept: int = 0
    lost: list[bytes] = field(default_factory=list)  # ids of the blobs no copy holds whole


@dataclass
class PackRepair:
    salvaged: list[PackSalvage] = field(default_factory=list)  # deleted, once what opened was stored
    untouched: dict[str, str] = field(default_factory=dict)  # pack -> why it was left as it is
    rewritten_index_objects: int = 0


def salvage_packs(repo: Repository, pack_ids: list[str]) -> PackRepair:
    """Replace each of `pack_ids`, which no replica holds a whole copy of, by a pack of the blobs
    that still open in some copy, and take the others out of the index (see the module docstring).
    A pack is left as it is when a whole copy turns up after all, when no copy can be read, or when
    nothing names its blobs; a store failure is raised before anything is deleted."""
    report = PackRepair()
    objects = read_index_objects(repo.store, repo.key)
    indexed: dict[str, list[BlobEntry]] = {}
    for packs in objects.readable.values():
        for pack_id, entries in packs:
            indexed.setdefault(pack_id, []).extend(entries)
    new_packs: list[tuple[str, list[BlobEntry]]] = []
    for pack_id in sorted(set(pack_ids)):
        outcome = _salvage_one(repo, pack_id, indexed.get(pack_id, []))
        if isinstance(outcome, str):
            report.untouched[pack_id] = outcome
            log.warning("pack %s is damaged and left as it is: %s", pack_id, outcome)
            continue
        salvage, writer = outcome
        if writer.count:
            salvage.into, data, entries = writer.finish()
            repo.store.put(pack_key(salvage.into), data)
            new_packs.append((salvage.into, entries))
        report.salvaged.append(salvage)
        log.info("pack %s is damaged on every copy: %d blobs saved into pack %s, %d lost", pack_id,
                    salvage.kept, salvage.into, len(salvage.lost))
    if not report.salvaged:
        return report
    if new_packs:
        _put_index(repo, new_packs)
    gone = {salvage.pack for salvage in report.salvaged}
    for name, packs in objects.readable.items():
        kept = [(pack_id, entries) for pack_id, entries in packs if pack_id not in gone]
        if len(kept) == len(packs):
            continue
        if kept:
            _put_index(repo, kept)
        repo.store.delete(f"index/{name}")
        report.rewritten_index_objects += 1
    for pack_id in sorted(gone):  # last: every blob that opened is stored and indexed elsewhere
        repo.store.delete(pack_key(pack_id))
    repo.sync_index()  # sees index objects gone, and rebuilds the cache from the store
    for salvage in report.salvaged:  # a blob some other pack holds too is not lost
        known = repo.index.known(salvage.lost)
        salvage.lost = [blob_id for blob_id in salvage.lost if blob_id not in known]
    return report


def _salvage_one(repo: Repository, pack_id: str, indexed: list[BlobEntry]) -> tuple[PackSalvage, PackWriter] | str:
    """(what was saved, a writer holding it) for one pack, or why it is left as it is."""
    copies = list(_every_copy(repo, pack_key(pack_id)))
    if not copies:
        return "no copy of it can be read"
    if any(content_hash(copy) == pack_id for copy in copies):
        return "a whole copy of it was found after all (`fsmount verify --read-data --repair` heals the others)"
    candidates: dict[bytes, list[BlobEntry]] = {}  # blob id -> where the index and each header put it
    for entry in indexed:
        candidates.setdefault(entry.blob_id, []).append(entry)
    for copy in copies:
        try:
            header = read_header(repo.key, copy, pack_id)
        except (IntegrityError, ValueError):
            continue
        for entry in header:
            if entry not in candidates.setdefault(entry.blob_id, []):
                candidates[entry.blob_id].append(entry)
    if not candidates:
        return "no readable index object names its blobs, and its header does not open on any copy"
    salvage, writer = PackSalvage(pack_id), PackWriter(repo.key)
    for blob_id, entries in candidates.items():
        found = next(_whole_blobs(repo, entries, copies), None)
        if found is None:
            salvage.lost.append(blob_id)
            continue
        entry, sealed = found
        writer.add(entry.blob_type, blob_id, sealed, entry.raw_length)
        salvage.kept += 1
    return salvage, writer


def _whole_blobs(repo: Repository, entries: list[BlobEntry], copies: list[bytes]) -> Iterator[tuple[BlobEntry, bytes]]:
    """(entry, sealed bytes) of each place in `copies` where the blob opens and matches its id."""
    for entry in entries:
        for copy in copies:
            sealed = copy[entry.offset: entry.offset + entry.length]
            try:
                repo.key.unseal_blob(entry.blob_type, entry.blob_id, sealed)
            except FsmountError:
                continue
            yield entry, sealed


def _every_copy(repo: Repository, key: str) -> Iterator[bytes]:
    """Each replica's copy of `key` (the store's, without replicas). A replica without one is passed
    over; one that fails otherwise raises, since its copy may be the whole one."""
    for replica in getattr(repo.store, "replicas", None) or (repo.store,):
        try:
            yield replica.get(key)
        except ObjectNotFound:
            continue
