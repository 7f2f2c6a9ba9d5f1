"""`fsmount migrate`: move a repository to another store, verified before anything is deleted."""

from __future__ import annotations

import click

from backend.migrate import MigrateReport
from backend.migrate import migrate as run_migrate

from ..context import AppContext, open_location
from ..output import BarProgress, add_to_json, emit_json, human_bytes, json_option, say


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
    Nothing else may write to the repository meanwhile (this is a cold migration). With
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
    try:
        run_migrate(source, destination, app.passphrase(), delete_source=delete_source, report=report,
                             workers=workers, cache_dir=app.cache_dir, check_data=check_data,
                             progress=BarProgress("migrate", enabled=not app.quiet and not app.json))
    finally:
        source.close()
        destination.close()
    if app.json:
        emit_json({})  # the counts come from add_to_json
    elif not app.quiet:
        say(f"migrated {report.objects} objects to {', '.join(destinations)}: copied {report.copied} "
            f"({human_bytes(report.bytes_copied)}"
            + (f", {report.copied_by_server} by the server" if report.copied_by_server else "")
            + f"), {report.skipped} already there; the copy verifies"
            + (f"; deleted {report.deleted} objects at the source" if delete_source else ""))


COMMANDS = [migrate]
