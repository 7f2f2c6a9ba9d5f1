"""`fsmount verify`: is every snapshot restorable?"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import click

from backend.errors import FsmountError, IntegrityError, StoreError
from backend.verify import DAMAGED_FILE, DAMAGED_SNAPSHOT, Damage, Problem, VerifyReport, check_copies
from backend.verify import verify as run_verify

from ..context import AppContext
from ..output import (
    BarProgress,
    counted,
    display_name,
    emit_json,
    error_fields,
    human_bytes,
    json_option,
    json_path,
    line_name,
    say,
)

if TYPE_CHECKING:
    from backend.replicas import ReplicaState
    from backend.repository import Repository


@click.command()
@click.option("--read-data", is_flag=True, help="Download every pack and check every blob's hash.")
@click.option("--repair", is_flag=True,
              help="First heal what can be healed: with replicas, rewrite every missing (and with "
                   "--read-data, damaged) object from a replica with a good copy; then rebuild the index: "
                   "packs that are gone everywhere leave it, so that the next backup stores their data "
                   "again, packs no readable index object names join it from their own headers, and "
                   "damaged index objects are deleted, as are packs no index names whose header opens "
                   "on no copy (nothing can read them). A pack damaged on every copy (with "
                   "--read-data, or without it one whose size is wrong) is replaced by a pack of the "
                   "blobs that still open; the others leave the index, and the next backup stores them again.")
@json_option
@click.pass_obj
def verify(app: AppContext, read_data: bool, repair: bool) -> None:
    """Check the repository's structure, and with --read-data all of its data.

    Without --read-data: every snapshot, every tree and every index entry is checked, and every
    pack is confirmed to exist with the size its index entries make. With it, every pack is also downloaded and every blob decrypted and
    hashed. Problems name the damaged object and the snapshots and files that depend on it;
    the exit code is then 14. On replicas, each replica's own missing (and with --read-data,
    damaged) copies count too. With --repair, each replica is first compared with the others
    and healed from a good copy, then the index is rebuilt to name exactly the packs in the store.
    """
    healing, failure = _repair(app, read_data) if repair and len(app.locations()) > 1 else ([], None)
    if failure is not None:  # a replica not reached or refusing writes: what was healed is said first
        if app.json:
            emit_json({"healing": [_json_healing(state) for state in healing]} | error_fields(failure))
        raise failure
    with app.open_repository() as repo:
        if repair:
            _repair_index(app, repo)
        report = run_verify(repo, read_data=read_data, repair=repair,
                            progress=BarProgress("verify", enabled=not app.quiet and not app.json))
        if not repair:
            check_copies(report, repo.store, read_data=read_data,
                         progress=BarProgress("replicas", enabled=not app.quiet and not app.json))
    damage = None if report.ok else IntegrityError(
        f"the repository has {counted(len(report.errors), 'error')}" + _affected(report.damaged))
    if app.json:
        doc = _json_report(report)
        if repair:
            doc["healing"] = [_json_healing(state) for state in healing]
        emit_json(doc | error_fields(damage))  # as every failing command's document has them
    else:
        _print_report(report, read_data=read_data, quiet=app.quiet)
    if damage is not None:
        raise damage


def _affected(damaged: list[Damage]) -> str:
    """" affecting 1 file in 2 snapshots" (a file counted once, in however many snapshots), or ""."""
    if not damaged:
        return ""
    paths = {d.path for d in damaged if d.what != DAMAGED_SNAPSHOT}
    in_snapshots = {d.snapshot for d in damaged if d.what != DAMAGED_SNAPSHOT}
    whole = {d.snapshot for d in damaged if d.what == DAMAGED_SNAPSHOT}
    parts = [f"{counted(len(paths), 'file')} in {counted(len(in_snapshots), 'snapshot')}"] if paths else []
    parts += [counted(len(whole), "whole snapshot")] if whole else []
    return " affecting " + " and ".join(parts)


def _print_report(report: VerifyReport, *, read_data: bool, quiet: bool) -> None:
    for salvaged in report.salvaged_packs:
        lost = len(salvaged["blobs_lost"])
        kept = (f"{counted(salvaged['blobs_kept'], 'blob')} that still open went into pack {salvaged['into']}, "
                if salvaged["into"] else "none could be kept, ")
        say(f"pack {salvaged['pack']} was damaged on every copy: {kept}{lost} lost; the damaged pack is deleted")
    for problem in report.errors:
        say(f"error: {problem.message}")
    for damage in report.damaged:
        say(f"damaged: {_damage_line(damage)}")
    if any(salvaged["blobs_lost"] for salvaged in report.salvaged_packs):
        say("the lost blobs left the index: the files above stay damaged in these snapshots until the "
            "next `fsmount backup` of their folder stores the data again, if the folder still holds it")
    if report.foreign_objects:
        foreign = report.foreign_objects
        say(f"{counted(len(foreign), 'object is', 'objects are')} not the repository's (no pack, index, snapshot "
            "or key), and left alone: "
            + ", ".join(line_name(os.fsencode(key)) for key in foreign[:5]) + (", ..." if len(foreign) > 5 else ""))
    if not quiet or not report.ok:
        say(f"checked {counted(report.snapshots, 'snapshot')}, {counted(report.trees, 'tree')}, "
            f"{counted(report.packs, 'pack')}"
            + (f", read {human_bytes(report.bytes_read)} in {counted(report.packs_read, 'pack')}"
               if read_data else "")
            + (f"; {counted(report.unindexed_packs, 'pack')} not indexed (`fsmount verify --repair` indexes "
               f"{'it' if report.unindexed_packs == 1 else 'them'})" if report.unindexed_packs else "")
            + (f"; {counted(report.packs_in_backlog, 'pack')} still in a live mount's backlog (uploaded later)"
               if report.packs_in_backlog else "")
            + ("; no errors" if report.ok else f"; {counted(len(report.errors), 'error')}"))


def _damage_line(damage: Damage) -> str:
    """As plain output always named it: "snapshot <short id>: <path>" (bytes not UTF-8 as \\xNN)."""
    if damage.what == DAMAGED_SNAPSHOT:
        return f"snapshot {damage.short_id}: / (whole snapshot unreadable)"
    path = display_name(damage.path)
    return f"snapshot {damage.short_id}: {path}/ (contents unreadable)" if damage.what != DAMAGED_FILE else \
        f"snapshot {damage.short_id}: {path}"


def _json_report(report: VerifyReport) -> dict[str, Any]:
    """The report for --json: a path or a key as `json_path` gives it, so that a script can recover
    the bytes of a name that is not UTF-8; each problem with what it concerns."""
    return vars(report) | {
        "errors": [_json_problem(problem) for problem in report.errors],
        "damaged": [{"snapshot": d.snapshot, "what": d.what} | json_path("path", d.path or b"/")
                    for d in report.damaged],
        "foreign_objects": [json_path("object", key) for key in report.foreign_objects],
        "ok": report.ok,
    }


def _json_healing(state: ReplicaState) -> dict[str, Any]:
    """What --repair healed on one replica, and what it could not (no replica has a good copy):
    the first `UNHEALED_SHOWN` of those keys, as the plain line names them."""
    return {"location": state.location, "healed": state.healed, "unhealed": len(state.unhealed),
            "unhealed_objects": state.unhealed[:UNHEALED_SHOWN]}


def _json_problem(problem: Problem) -> dict[str, Any]:
    doc: dict[str, Any] = {"message": problem.message}
    if problem.object is not None:
        doc |= json_path("object", problem.object)
    if problem.blob is not None:
        doc["blob"] = problem.blob.hex()
    if problem.replica is not None:
        doc["replica"] = problem.replica
    return doc


COMMANDS = [verify]


def _repair_index(app: AppContext, repo: Repository) -> None:
    from backend.repair import repair_index

    fixed = repair_index(repo)
    if app.json:
        return
    if fixed.missing_packs:
        say(f"took {counted(fixed.missing_packs, 'missing pack')} ({counted(fixed.blobs_dropped, 'blob')}) out of "
            "the index: "
            "the next `fsmount backup` of the folder stores again what it still holds, and the snapshots "
            "that need only that are whole again; the rest stays damaged (listed below)")
    if fixed.indexed_packs:
        say(f"indexed {counted(fixed.indexed_packs, 'pack')} ({counted(fixed.blobs_indexed, 'blob')}) that no "
            "readable index object named, from their own headers")
    if fixed.deleted_index_objects:
        say(f"deleted {counted(fixed.deleted_index_objects, 'damaged index object')}")
    if fixed.removed_packs:
        removed = sorted(fixed.removed_packs)
        say(f"removed {counted(len(removed), 'pack')} that no index names and whose header opens on no copy "
            f"(nothing can read {'it' if len(removed) == 1 else 'them'}): " + ", ".join(removed[:5])
            + (", ..." if len(removed) > 5 else ""))
    if fixed.unreadable_packs:
        say(f"could not index {counted(len(fixed.unreadable_packs), 'pack')}: their headers cannot be read, and "
            "a live mount's index objects on their way may name them (listed below)")


UNHEALED_SHOWN = 5  # keys of objects that could not be healed named, per replica


def _repair(app: AppContext, read_data: bool) -> tuple[list[ReplicaState], FsmountError | None]:
    """Heal each replica from the others; returns their states, and the failure that must stop
    verify (a replica that cannot be reached, or refuses the copies) if any."""
    from backend.lock import guard_writes
    from backend.replicas import check_replicas
    from backend.stores.replicated import ReplicatedStore

    store = app.open_store()
    try:
        assert isinstance(store, ReplicatedStore)
        states = check_replicas(guard_writes(store.replicas, app.lock), read_data=read_data, read_metadata=True,
                                repair=True,
                                progress=BarProgress("repair", enabled=not app.quiet and not app.json))
    finally:
        store.close()
    for state in states:
        if not state.reachable:
            return states, StoreError(f"replica {state.location} cannot be reached: {state.error}")
        if not app.json and (state.healed or state.unhealed):
            say(f"{state.location}: healed {counted(state.healed, 'object')}"
                + (f", could not heal {len(state.unhealed)} (no replica has a good copy): "
                   f"{', '.join(state.unhealed[:UNHEALED_SHOWN])}" if state.unhealed else ""))
    for state in states:  # the copies exist, but this replica refuses them: nothing below would help
        if state.write_error is not None:
            return states, StoreError(f"could not write to {state.location}: {state.write_error}")
    if not any(state.unhealed for state in states):
        app.degraded_log().clear()
    return states, None
