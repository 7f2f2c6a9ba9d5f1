"""`replicas` and `replicas sync`: how the copies of a replicated repository compare, and healing them."""

from __future__ import annotations

import click

from backend.errors import FsmountError, IntegrityError, StoreError, UsageError
from backend.replicas import ReplicaState, check_replicas, different_repositories
from backend.stores.replicated import ReplicatedStore

from ..context import AppContext
from ..output import BarProgress, counted, emit_json, error_fields, human_bytes, json_option, say


def _replicated(app: AppContext) -> ReplicatedStore:
    if len(app.locations()) < 2:
        raise UsageError("this repository has one location, no replicas: give -r once per replica")
    store = app.open_store()
    assert isinstance(store, ReplicatedStore)
    return store


def _print_states(app: AppContext, states: list[ReplicaState], *, recorded: int = 0,
                  failure: FsmountError | None = None) -> None:
    """The states, one line each (or JSON, with the `failure` the command then raises, if any)."""
    if app.json:
        emit_json({"replicas": [s.summary() for s in states], "recorded_degraded_writes": recorded}
                  | error_fields(failure))
        return
    for state in states:
        if not state.reachable:
            say(f"{state.location}: UNREACHABLE ({state.error})")
            continue
        line = (f"{state.location}: {counted(state.objects, 'object')}, {human_bytes(state.bytes)}, "
                f"{len(state.missing)} missing")
        if state.damaged:
            line += f", {len(state.damaged)} damaged"
        failed = state.failed_to_heal()
        if state.healed or failed:
            line += f"; healed {state.healed}" + (f", could not heal {len(failed)}" if failed else "")
        say(line)
        if state.write_error is not None:
            say(f"  could not write to {state.location}: {state.write_error}"
                + (f" ({counted(len(state.unwritten), 'object')} not written)" if len(state.unwritten) > 1 else ""))
        for key in state.unhealed:
            say(f"  not healed (no replica has a good copy): {key}")
    if recorded:
        say(f"{counted(recorded, 'object was', 'objects were')} recorded as missed by degraded writes")


@click.group(invoke_without_command=True)
@json_option
@click.pass_context
def replicas(ctx: click.Context) -> None:
    """Compare the replicas of a repository: reachable?, objects, bytes, missing objects.

    \b
      fsmount -r s3:bucket-a/repo -r s3:https://other.example.org/bucket-b/repo replicas
      fsmount -r ... replicas sync          copy what a replica lacks from the others

    Exit code 14 when a replica lacks objects the others have, 15 when one cannot be reached, 2
    when the replicas hold different repositories (as `replicas sync` refuses them).
    """
    if ctx.invoked_subcommand is not None:
        return
    app: AppContext = ctx.obj
    store = _replicated(app)
    try:
        states = check_replicas(store.replicas)
    finally:
        store.close()
    mixed = different_repositories(states)
    if mixed is not None:  # every object differs: counts of missing ones would only mislead
        failure: FsmountError = UsageError(mixed)
        if app.json:
            emit_json({"replicas": [{key: s.summary()[key] for key in ("location", "reachable", "error", "repository")}
                                    for s in states]} | error_fields(failure))
        raise failure
    failure = None
    if any(not s.reachable for s in states):
        failure = StoreError("a replica cannot be reached")
    elif any(s.missing for s in states):
        failure = IntegrityError("replicas differ: run `fsmount replicas sync`")
    _print_states(app, states, recorded=len(app.degraded_log().entries()), failure=failure)
    if failure is not None:
        raise failure


@replicas.command()
@click.option("--read-data", is_flag=True, help="Also read every copy and rewrite the damaged ones.")
@json_option
@click.pass_obj
def sync(app: AppContext, read_data: bool) -> None:
    """Copy to each replica what it lacks (after a --degraded backup), from a replica with a good copy.

    It stops writing (exit 11) if its lock is lost, as a backup does (`fsmount unlock --help`)."""
    from backend.lock import guard_writes
    from backend.repository import check_replicas_hold_one_repository

    store = _replicated(app)
    try:
        check_replicas_hold_one_repository(store)
        store.create_if_missing()  # a replica added in a new folder or bucket
        states = check_replicas(guard_writes(store.replicas, app.lock), read_data=read_data, repair=True,
                                progress=BarProgress("sync", enabled=not app.quiet and not app.json))
    finally:
        store.close()
    failure: FsmountError | None = None
    unwritable = [s for s in states if s.write_error is not None]
    if any(not s.reachable for s in states):
        failure = StoreError("a replica cannot be reached; it was not synced")
    elif unwritable:
        failure = StoreError(f"could not write to {unwritable[0].location}: {unwritable[0].write_error}")
    elif any(s.unhealed for s in states):
        failure = IntegrityError("some objects could not be healed")
    if failure is None:
        app.degraded_log().clear()  # what degraded writes missed is on every replica now
    _print_states(app, states, recorded=len(app.degraded_log().entries()), failure=failure)
    if failure is not None:
        raise failure


COMMANDS = [replicas]
