"""`fsmount verify`: is every snapshot restorable?"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from backend.errors import IntegrityError, StoreError
from backend.verify import check_copies
from backend.verify import verify as run_verify

from ..context import AppContext
from ..output import BarProgress, emit_json, human_bytes, json_option, say

if TYPE_CHECKING:
    from backend.repository import Repository


@click.command()
@click.option("--read-data", is_flag=True, help="Download every pack and check every blob's hash.")
@click.option("--repair", is_flag=True,
              help="First heal what can be healed: with replicas, rewrite every missing (and with "
                   "--read-data, damaged) object from a replica with a good copy; then rebuild the index: "
                   "packs that are gone everywhere leave it, so that the next backup stores their data "
                   "again, packs no readable index object names join it from their own headers, and "
                   "damaged index objects are deleted. With --read-data, a pack damaged on every copy "
                   "is replaced by a pack of the blobs that still open; the others leave the index, and "
                   "the next backup stores them again.")
@json_option
@click.pass_obj
def verify(app: AppContext, read_data: bool, repair: bool) -> None:
    """Check the repository's structure, and with --read-data all of its data.

    Without --read-data: every snapshot, every tree and every index entry is checked, and every
    pack is confirmed to exist. With it, every pack is also downloaded and every blob decrypted and
    hashed. Problems name the damaged object and the snapshots and files that depend on it;
    the exit code is then 14. On replicas, each replica's own missing (and with --read-data,
    damaged) copies count too. With --repair, each replica is first compared with the others
    and healed from a good copy, then the index is rebuilt to name exactly the packs in the store.
    """
    if repair and len(app.locations()) > 1:
        _repair(app, read_data)
    with app.open_repository() as repo:
        if repair:
            _repair_index(app, repo)
        report = run_verify(repo, read_data=read_data, repair=repair,
                            progress=BarProgress("verify", enabled=not app.quiet and not app.json))
        if not repair:
            check_copies(report, repo.store, read_data=read_data,
                         progress=BarProgress("replicas", enabled=not app.quiet and not app.json))
    if app.json:
        emit_json(vars(report) | {"ok": report.ok})
    else:
        for salvaged in report.salvaged_packs:
            say(f"pack {salvaged['pack']} was damaged on every copy: {salvaged['blobs_kept']} blobs that still open "
                + (f"went into pack {salvaged['into']}, " if salvaged["into"] else "")
                + f"{len(salvaged['blobs_lost'])} lost; the damaged pack is deleted")
        for line in report.errors:
            say(f"error: {line}")
        for line in report.damaged:
            say(f"damaged: {line}")
        if any(salvaged["blobs_lost"] for salvaged in report.salvaged_packs):
            say("the lost blobs left the index: the files above stay damaged in these snapshots until the "
                "next `fsmount backup` of their folder stores the data again, if the folder still holds it")
        if report.foreign_objects:
            say(f"{len(report.foreign_objects)} objects under data/ are not packs, and are left alone: "
                + ", ".join(report.foreign_objects[:5]))
        if not app.quiet or not report.ok:
            say(f"checked {report.snapshots} snapshots, {report.trees} trees, {report.packs} packs"
                + (f", read {human_bytes(report.bytes_read)} in {report.packs_read} packs"
                   if read_data else "")
                + (f"; {report.unindexed_packs} packs not indexed (`fsmount verify --repair` indexes them)"
                   if report.unindexed_packs else "")
                + (f"; {report.packs_in_backlog} packs still in a live mount's backlog (uploaded later)"
                   if report.packs_in_backlog else "")
                + ("; no errors" if report.ok else f"; {len(report.errors)} errors"))
    if not report.ok:
        raise IntegrityError(f"the repository has {len(report.errors)} errors"
                             + (f" affecting {len(report.damaged)} files" if report.damaged else ""))


COMMANDS = [verify]


def _repair_index(app: AppContext, repo: Repository) -> None:
    from backend.repair import repair_index

    fixed = repair_index(repo)
    if app.json:
        return
    if fixed.missing_packs:
        say(f"took {fixed.missing_packs} missing packs ({fixed.blobs_dropped} blobs) out of the index: "
            "the next `fsmount backup` of the folder stores again what it still holds, and the snapshots "
            "that need only that are whole again; the rest stays damaged (listed below)")
    if fixed.indexed_packs:
        say(f"indexed {fixed.indexed_packs} packs ({fixed.blobs_indexed} blobs) that no readable index "
            "object named, from their own headers")
    if fixed.deleted_index_objects:
        say(f"deleted {fixed.deleted_index_objects} damaged index objects")
    if fixed.unreadable_packs:
        say(f"could not index {len(fixed.unreadable_packs)} packs: their headers cannot be read (listed below)")


def _repair(app: AppContext, read_data: bool) -> None:
    from backend.replicas import check_replicas
    from backend.stores.replicated import ReplicatedStore

    store = app.open_store()
    try:
        assert isinstance(store, ReplicatedStore)
        states = check_replicas(store.replicas, read_data=read_data, read_metadata=True, repair=True,
                                progress=BarProgress("repair", enabled=not app.quiet and not app.json))
    finally:
        store.close()
    for state in states:
        if not state.reachable:
            raise StoreError(f"replica {state.location} cannot be reached: {state.error}")
        if not app.json and (state.healed or state.unhealed):
            say(f"{state.location}: healed {state.healed} objects"
                + (f", could not heal {len(state.unhealed)}: {', '.join(state.unhealed[:5])}"
                   if state.unhealed else ""))
    if not any(state.unhealed for state in states):
        app.degraded_log().clear()
