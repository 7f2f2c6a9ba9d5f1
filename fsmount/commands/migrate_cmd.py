"""`fsmount migrate`: move a repository to another store, verified before anything is deleted."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import click

from backend.errors import LockedError, StoreError
from backend.migrate import MigrateReport
from backend.migrate import migrate as run_migrate

from ..context import AppContext, command_line, open_location

if TYPE_CHECKING:
    from backend.crypto import MasterKey
    from backend.stores import ObjectStore
from ..output import BarProgress, add_to_json, emit_json, human_bytes, json_option, json_path, path_line, say


@click.command()
@click.option("--to", "destinations", multiple=True, required=True, metavar="LOCATION",
              help="Where the repository goes (repeat for replicas there).")
@click.option("--delete-source", is_flag=True,
              help="After the copy has verified, delete the repository at the source.")
@click.option("--check-data", is_flag=True,
              help="Read every object through this machine and check it against its name, even where "
                   "the S3 server could copy it itself.")
@click.option("--workers", default=16, show_default=True, help="Objects copied at once.")
@json_option
@click.pass_obj
def migrate(app: AppContext, destinations: tuple[str, ...], delete_source: bool, check_data: bool,
            workers: int) -> None:
    """Copy the repository to another store, check every object, and verify the copy.

    \b
      fsmount -r ~/backups/repo migrate --to s3:newbucket/repo
      fsmount -r s3:old/repo migrate --to s3:https://other.example.org/bucket/repo --delete-source

    Objects already at the destination are skipped, so an interrupted migration resumes where it
    stopped when run again. The destination becomes a repository only once every object is there
    and intact; the source is deleted (with --delete-source) only after the copy has verified.
    Nothing else may write to the repository meanwhile (this is a cold migration). The destination
    is locked exclusively for the whole migration: a second migration, a backup or any other command
    there is refused (exit 11) until it ends. With
    --delete-source the migration takes an exclusive lock on the repository before it copies
    anything: it is refused (exit 11) while a mount, a backup or any other command holds a lock
    there, since what they write after the copy would be deleted with the source.

    Between two buckets of one S3 server and access key, the server copies each object itself, and
    each copy is checked by the MD5 the server reports for it. That trusts the server to have kept
    the source intact; --check-data, or `fsmount verify --read-data` beforehand, does not.
    """
    report = MigrateReport()
    if app.json:  # a failure's JSON carries the counts so far too
        add_to_json(lambda: vars(report))
    source = app.open_store()  # with --delete-source, refused here while another lock exists
    if len(destinations) == 1:
        destination = open_location(destinations[0])
    else:
        from backend.replicas import object_intact
        from backend.stores.replicated import ReplicatedStore

        destination = ReplicatedStore([open_location(loc) for loc in destinations], verify=object_intact)
    # Named as the store names itself: a location as typed may hold an access key and secret.
    where = destination.location
    if app.json:
        add_to_json(lambda: json_path("destination", where))
    try:
        with _locked_destination(app, source, destination) as guarded:
            run_migrate(source, guarded, app.passphrase(), delete_source=delete_source, report=report,
                        workers=workers, cache_dir=app.cache_dir, check_data=check_data,
                        progress=BarProgress("migrate", enabled=not app.quiet and not app.json))
    finally:
        source.close()
        destination.close()
    if app.json:
        emit_json({})  # the destination and the counts come from add_to_json
    elif not app.quiet:
        say(f"migrated {report.objects} objects to {path_line(where)}: copied {report.copied} "
            f"({human_bytes(report.bytes_copied)}"
            + (f", {report.copied_by_server} by the server" if report.copied_by_server else "")
            + f"), {report.skipped} already there; the copy verifies"
            + (f"; deleted {report.deleted} objects at the source" if delete_source else ""))



@contextlib.contextmanager
def _locked_destination(app: AppContext, source: ObjectStore, destination: ObjectStore) -> Iterator[ObjectStore]:
    """`destination` under an exclusive lock of this migration, refusing writes once it is lost.

    Exclusive, because until the migration ends the destination is a half-copied repository: nobody
    should back up to it, restore or repair from it, or migrate into it at the same time (a second
    migration's verify or --delete-source would trust a copy still being made). The lock is sealed
    with the source's key, which the copy gets, so it opens there once the destination is a
    repository, and it is the first object an empty destination receives."""
    from backend.lock import LockGuardedStore, RepositoryLock, replica_stores
    from backend.migrate import check_destination

    key = _source_key(app, source)
    if key is None:
        yield destination
        return
    copies = replica_stores(destination)
    destination.create_if_missing()
    check_destination(source, destination)  # no lock of ours in another repository
    try:
        lock = RepositoryLock.acquire(copies, key, exclusive=True, command=command_line())
    except LockedError as exc:
        if not _this_process_locks(copies, key):
            raise LockedError(f"the destination {destination.location} is locked: {exc}") from exc
        yield destination  # our own lock on the source: it is the destination, which migrate refuses
        return
    try:
        yield LockGuardedStore(destination, lock)  # type: ignore[misc]
    finally:
        lock.release()


def _source_key(app: AppContext, source: ObjectStore) -> MasterKey | None:
    """The repository's key, to seal the destination's lock with; None when the source holds no
    repository (the rest of an interrupted --delete-source writes nothing to the destination, and
    with nothing to migrate there is nothing to lock: migrate says so)."""
    from backend.repository import open_master_key

    if app.lock is not None:
        return app.lock.key
    try:
        source.get("config")
    except StoreError:
        return None
    return open_master_key(source, app.passphrase())


def _this_process_locks(copies: list[ObjectStore], key: MasterKey) -> bool:
    """Whether a lock of this very process is among `copies`' locks."""
    from backend.lock import list_locks

    return any(info is not None and info.host == socket.gethostname() and info.pid == os.getpid()
               for _, info in list_locks(copies, key))


COMMANDS = [migrate]
