"""`fsmount verify`: is every snapshot restorable?"""

from __future__ import annotations

import click

from backend.errors import IntegrityError
from backend.verify import verify as run_verify

from ..context import AppContext
from ..output import json_option, BarProgress, emit_json, human_bytes, stdout


@click.command()
@click.option("--read-data", is_flag=True, help="Download every pack and check every blob's hash.")
@json_option
@click.pass_obj
def verify(app: AppContext, read_data: bool) -> None:
    """Check the repository's structure, and with --read-data all of its data.

    Without --read-data: every snapshot, every tree and every index entry is checked, and every
    pack is confirmed to exist. With it, every pack is also downloaded and every blob decrypted and
    hashed. Problems name the damaged object and the snapshots and files that depend on it;
    the exit code is then 14.
    """
    with app.open_repository() as repo:
        report = run_verify(repo, read_data=read_data,
                            progress=BarProgress("verify", enabled=not app.quiet and not app.json))
    if app.json:
        emit_json(vars(report) | {"ok": report.ok})
    else:
        for line in report.errors:
            stdout.print(f"error: {line}", markup=False, soft_wrap=True)
        for line in report.damaged:
            stdout.print(f"damaged: {line}", markup=False, soft_wrap=True)
        if not app.quiet or not report.ok:
            stdout.print(f"checked {report.snapshots} snapshots, {report.trees} trees, {report.packs} packs"
                         + (f", read {human_bytes(report.bytes_read)} in {report.packs_read} packs"
                            if read_data else "")
                         + (f"; {report.unreferenced_packs} unreferenced packs (left by interrupted backups)"
                            if report.unreferenced_packs else "")
                         + ("; no errors" if report.ok else f"; {len(report.errors)} errors"))
    if not report.ok:
        raise IntegrityError(f"the repository has {len(report.errors)} errors"
                             + (f" affecting {len(report.damaged)} files" if report.damaged else ""))


COMMANDS = [verify]
