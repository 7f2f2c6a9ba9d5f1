"""`init`, `snapshots` and `ls`: creating a repository and looking at what it holds."""

from __future__ import annotations

import datetime as dt
import stat as statmod
from collections.abc import Iterator

import click

from backend.errors import IntegrityError
from backend.repository import DEFAULT_BLOCK_SIZE, Repository
from backend.snapshot import Snapshot, resolve_snapshot
from backend.tree import DIR, Node

from ..context import AppContext
from ..output import (
    console,
    counted,
    emit_json,
    human_bytes,
    json_option,
    json_path,
    line_name,
    parse_size,
    path_line,
    say,
)
from .snapshot_paths import snapshot_path


@click.command()
@click.option("--block-size", default=f"{DEFAULT_BLOCK_SIZE // 1024}K", show_default=True, metavar="SIZE",
              help="Fixed block size for file content, a power of two from 64K to 4M. Smaller blocks make "
                   "small edits to big files cheaper; larger ones make full backups faster.")
@json_option
@click.pass_obj
def init(app: AppContext, block_size: str) -> None:
    """Create a new encrypted repository.

    The repository goes where -r/--repo (or $FSMOUNT_REPOSITORY) says: a local directory is created
    if needed. Remember the passphrase: without it the backups cannot be read by anyone.
    """
    try:
        size = parse_size(block_size)
    except ValueError:
        raise click.BadParameter(f"{block_size!r} is not a size like 128K or 1M", param_hint="--block-size")
    store = app.open_store()
    with app.cache_folder_errors():
        repo = Repository.init(store, app.passphrase(confirm=True), block_size=size, cache_dir=app.cache_dir)
    with repo:
        if app.json:
            emit_json({"id": repo.config.id, **json_path("location", store.location), "block_size": repo.block_size})
        elif not app.quiet:
            say(f"created repository {repo.config.id[:8]} at {path_line(store.location)} "
                f"(block size {human_bytes(repo.block_size)})")


def snapshot_doc(snap: Snapshot) -> dict:
    return {"id": snap.id, "short_id": snap.short_id, "time": snap.time.isoformat(), "host": snap.host,
            **json_path("source", snap.source), "tags": snap.tags, "name": snap.name, "parent": snap.parent,
            "tree": snap.tree.hex(), "stats": snap.stats}


_MIN_WIDTHS = {"id": 8, "time": 19, "size": 9, "added": 9}  # the `snapshots` columns that never shrink
NAME_WIDTH = 32  # of the `snapshots` table: a longer name ends in "…" there (names may have 240 bytes)


@click.command()
@click.option("--host", help="Only snapshots of this host.")
@click.option("--tag", "tags", multiple=True, help="Only snapshots with this tag (repeatable: all must match).")
@json_option
@click.pass_obj
def snapshots(app: AppContext, host: str | None, tags: tuple[str, ...]) -> None:
    """List the snapshots in the repository, oldest first.

    Columns: id, time, host, source, tags, name, files, size (sum of file sizes) and the bytes
    that snapshot added to the repository; a long name is cut short with "…" (--json has it whole).
    Use an id prefix, a name, a folder name of the snapshot mounts, or `latest` wherever a SNAPSHOT
    is asked for.
    """
    with app.open_repository() as repo:
        found = [s for s in repo.snapshots()
                 if (host is None or s.host == host) and all(t in s.tags for t in tags)]
        damaged = repo.damaged_snapshots
    if app.json:
        emit_json([snapshot_doc(s) for s in found])
    else:
        if found:  # an empty table would be a header alone
            _print_snapshots(found)
        say(counted(len(found), "snapshot"))
    if damaged:
        raise IntegrityError(f"{len(damaged)} snapshot objects are damaged and not listed, e.g. "
                             f"snapshots/{damaged[0]} (`fsmount verify` says more)")


def _print_snapshots(found: list[Snapshot]) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold")
    for column in ("id", "time", "host", "source", "tags", "name", "files", "size", "added"):
        # The source and tags fold; the name is cut short (one of 240 bytes made the table as
        # wide); the rest keeps its width.
        wraps = column in ("source", "tags")
        table.add_column(column, justify="right" if column in ("files", "size", "added") else "left",
                         no_wrap=not wraps, overflow="fold" if wraps else "ellipsis",
                         min_width=None if wraps else _MIN_WIDTHS.get(column, len(column)),
                         max_width=NAME_WIDTH if column == "name" else None)
    for s in found:  # Text, not markup: names and paths may hold brackets
        table.add_row(*map(Text, (
            s.short_id, s.time.strftime("%Y-%m-%d %H:%M:%S"), s.host, line_name(s.source),
            line_name(",".join(s.tags).encode()), line_name(s.name.encode()) if s.name else "",
            str(s.stats.get("files", "")),
            human_bytes(s.stats.get("size", 0)), human_bytes(s.stats.get("bytes_added", 0)))))
    console().print(table)


def _listing(repo: Repository, node: Node, path: bytes) -> Iterator[tuple[bytes, Node]]:
    """(path, node) for `node` and everything under it, depth first in name order; trees load lazily."""
    yield path, node
    if node.type != DIR:
        return
    stack = [iter([(path, c) for c in repo.load_tree(node.subtree)])]
    while stack:
        try:
            prefix, child = next(stack[-1])
        except StopIteration:
            stack.pop()
            continue
        child_path = prefix + b"/" + child.name if prefix else child.name
        yield child_path, child
        if child.type == DIR:
            stack.append(iter([(child_path, c) for c in repo.load_tree(child.subtree)]))


@click.command(name="ls")
@click.argument("snapshot_ref", metavar="SNAPSHOT")
@click.argument("path", required=False, default="")
@click.option("-l", "--long", "long_format", is_flag=True, help="Show mode, owner, size and time.")
@json_option
@click.pass_obj
def ls(app: AppContext, snapshot_ref: str, path: str, long_format: bool) -> None:
    """List the files of SNAPSHOT (an id prefix, a name, its folder in the snapshot mounts, or
    `latest`), from PATH down.

    Paths are relative to the backed-up folder, as a listing shows them or typed as they are.
    A byte that is not UTF-8 shows as \\xNN, a newline as \\n, a backslash doubled; --json gives
    each path in that form too, and also as `path_hex`, its bytes, when the two differ.
    """
    with app.open_repository() as repo:
        snap = resolve_snapshot(repo, snapshot_ref)
        rel = snapshot_path(repo, snap, path) if path.strip("/") else b""
        start = repo.find_node(snap, rel)
        entries = _listing(repo, start, rel)
        if app.json:
            emit_json([{**json_path("path", b"/" + p), "type": n.type,
                        "mode": n.mode, "uid": n.uid, "gid": n.gid, "size": n.size, "mtime_ns": n.mtime_ns,
                        **(json_path("target", n.target) if n.target else {})}
                       for p, n in entries if p])
            return
        for p, n in entries:
            if not p:
                continue
            shown = "/" + line_name(p) + ("/" if n.type == DIR else "")
            if n.target:
                shown += " -> " + line_name(n.target)
            if long_format:
                when = dt.datetime.fromtimestamp(n.mtime_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")
                say(f"{statmod.filemode(n.st_mode)} {n.uid:>5} {n.gid:>5} {n.size:>12} {when} {shown}")
            else:
                say(shown)


COMMANDS = [init, snapshots, ls]
