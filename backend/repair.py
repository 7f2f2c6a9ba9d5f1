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
  pack's tail, and the packs go into new index objects. A pack whose header does not open stays
  out, and verify names it.
- **Damaged index objects go.** Only after the index objects that replace them are stored, so a
  crash in between leaves a complete index (blobs listed twice are allowed).

Every new object is written before the old one is deleted, and the index cache rebuilds itself from
the store at the next sync (it sees objects gone). What is nowhere any more stays damaged, and
`verify` names it. A backup running meanwhile is safe: it writes an index object only after the
packs it names are stored, so its objects are never taken for ones naming lost packs; its packs not
indexed yet may be indexed here too, which costs a duplicate entry and nothing else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .blob_writer import INDEX_BATCH_BLOBS
from .index import IndexObjects, encode_index, read_index_objects, read_pack_headers
from .pack import BlobEntry
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
    unreadable_packs: dict[str, str] = field(default_factory=dict)  # not indexed, header unreadable -> why


def packs_in_store(repo: Repository) -> dict[str, int]:
    """Pack id -> size of every pack in the store."""
    return {key.rsplit("/", 1)[1]: size for key, size in repo.store.list("data/")}


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
    headers, report.unreadable_packs = read_pack_headers(repo.store, repo.key, unindexed)
    for pack_id, why in report.unreadable_packs.items():
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


def _put_index(repo: Repository, packs: list[tuple[str, list[BlobEntry]]]) -> None:
    name, data = encode_index(repo.key, packs)
    repo.store.put(f"index/{name}", data)
