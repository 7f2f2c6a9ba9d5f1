"""Take packs that are gone from the store out of the index, so that backups store their data again.

The index says which pack holds each blob, and a backup that finds a blob in it does not upload
the blob again. When a pack is lost (deleted by hand or by a bucket's lifecycle rule, a disk
error), every later backup would still count on it and make snapshots that cannot be restored.
`drop_missing_packs` rewrites each index object that names a missing pack without it (the new
object first, then the old one is deleted, so a crash in between leaves the index complete), and
the index cache rebuilds itself from the store at the next sync. What the source still holds then
goes into new packs at the next backup, which reads again every file of its parent snapshot whose
blocks the index no longer knows (backup.py); since blobs are named by their content, older
snapshots that need it are whole again too. A live mount's change-driven snapshot reuses the
subtrees nothing was written to without looking inside, so it fills the gap at the first snapshot
after its next mount (which rescans the folder). What is nowhere any more stays damaged, and
`verify` names it. This is restic's `repair index`. A backup running meanwhile is safe: it writes an index object
only after the packs it names are stored, so its objects are never taken for ones naming lost packs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .errors import IntegrityError
from .index import decode_index, encode_index
from .repository import Repository

log = logging.getLogger(__name__)


@dataclass
class IndexRepair:
    missing_packs: int = 0
    rewritten_index_objects: int = 0
    blobs_dropped: int = 0


def drop_missing_packs(repo: Repository) -> IndexRepair:
    """Rewrite the index without the packs the store no longer has (see the module docstring)."""
    report = IndexRepair()
    store = repo.store
    present = {key.rsplit("/", 1)[1] for key, _ in store.list("data/")}
    present |= {key.rsplit("/", 1)[1] for key in repo.staged_keys("data/")}  # a live mount's, on their way
    for key, _ in list(store.list("index/")):
        name = key.removeprefix("index/")
        try:
            packs = decode_index(repo.key, name, store.get(key))
        except IntegrityError as exc:  # verify reports it; its packs may well be there
            log.warning("leaving index %s as it is: %s", name, exc)
            continue
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
        store.delete(key)
        report.rewritten_index_objects += 1
    if report.rewritten_index_objects:
        repo.sync_index()  # sees index objects gone, and rebuilds the cache from the store
    return report
