"""Snapshot objects: the record that makes a tree a restorable point in time.

`snapshots/<id>` (id = BLAKE3 of the object) holds zstd-compressed msgpack, sealed with associated
data `SNAPSHOT_AAD`:

    {"v": 1, "time_ns": int, "host": str, "source": bytes, "tags": [str], "name": str | None,
     "parent": str | None, "tree": bytes (32), "stats": {str: int}, "root": node (optional)}

A snapshot is written only after every pack and index it references is durable, so its presence
is the commit point of a backup. `stats` carries what `fsmount snapshots` shows: files, dirs, size
(sum of file sizes), files_new, files_changed, files_unchanged, bytes_read, bytes_added,
blobs_added, duration_ms. `root` is the source folder's own entry (a tree node, see tree.py,
named b""): its mode, owner, times and xattrs, which a restore gives the target folder and the
snapshot mount gives the snapshot's folder. Snapshots written before it existed have none.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgpack
import zstandard

from .crypto import MasterKey, content_hash
from .errors import IntegrityError, UsageError, shown_name
from .tree import Node

if TYPE_CHECKING:
    from .repository import Repository

SNAPSHOT_AAD = b"fsmount snapshot"
SNAPSHOT_VERSION = 1
LABEL_BYTES = 240  # of the 255 a name may have: room for the "-<short id>" that tells twins apart
LATEST = "latest"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"  # an unnamed snapshot's folder name
# The folder names the snapshot mounts make up: an unnamed snapshot's time, and any label with the
# short id appended (two snapshots of one label). A name of that form could be another's folder.
_MADE_UP_FOLDER = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}|.*-[0-9a-f]{8}", re.DOTALL)


def looks_like_id(ref: str) -> bool:
    """Whether `ls`, `restore` and `--parent` read `ref` as an id prefix (before any name)."""
    return len(ref) >= 4 and all(c in "0123456789abcdef" for c in ref)


class BadName(UsageError):
    """A name, host or tag that `check_name`, `check_text` or `check_name_free` refuses. `reason`
    says which rule, for the FUSE adapter's errno: "text", "reserved" (`latest`), "form", "too
    long" or "taken" (another snapshot has it)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _printable(char: str) -> bool:
    """Printable, or a space of any kind (a no-break space); not a control or format character
    (zero-width, bidi overrides), nor a line or paragraph separator."""
    return char.isprintable() or unicodedata.category(char) == "Zs"


def check_text(what: str, text: object) -> str:
    """`text` if it is printable UTF-8 (no control or format characters, no bytes that are not
    UTF-8, which reach us as lone surrogates and no snapshot object can hold; spaces of any kind
    are fine); else BadName naming `what`."""
    if not isinstance(text, str):  # a request sent to a mount's control socket by hand
        raise BadName(f"{what} must be text, not {text!r}", "text")
    refused = next((char for char in text if not _printable(char)), None)
    if refused is not None:
        raise BadName(f'{what} must be printable UTF-8 text, not "{_shown_text(text)}": it holds '
                      f"{_described(refused)}", "text")
    return text


def _shown_text(text: str) -> str:
    """`text` as a message shows it: `shown_name`, and what is still invisible (a zero-width
    space, a line separator) as \\uXXXX."""
    shown = shown_name(text.encode(errors="surrogateescape"))
    return "".join(char if _printable(char) else f"\\u{ord(char):04x}" for char in shown)


def _described(char: str) -> str:
    """A character `check_text` refuses, as its message names it."""
    if "\udc80" <= char <= "\udcff":  # a byte that is not UTF-8, as surrogateescape carries it
        return f"a byte that is not UTF-8 (\\x{ord(char) - 0xdc00:02x})"
    if unicodedata.category(char) == "Cc":
        return f"a control character ({shown_name(char.encode())})"
    name = unicodedata.name(char, "")
    return f"an invisible or format character (U+{ord(char):04X}{' ' + name if name else ''})"


def check_name(name: str) -> str:
    """`name` if a snapshot may take it: `backup --name`, `snapshot --name` and
    `mkdir MOUNT/.snapshots/NAME` all ask here. A name must read back as itself wherever it is
    used: printable UTF-8 text, not empty, not `latest` nor what reads as an id, and a folder
    name of the snapshot mounts as it is (no `/`, not `.` or `..`, at most LABEL_BYTES bytes,
    which leaves room for the `-<short id>` that tells two snapshots of one label apart), and not
    of the form of the folder names the mounts make up (a time, `NAME-<8 hex digits>`), which
    would be another snapshot's folder. `check_name_free` says whether it is still free."""
    check_text("a snapshot name", name)
    if not name:
        raise BadName("a snapshot name may not be empty", "form")
    if name == LATEST:
        raise BadName("a snapshot may not be named `latest`: it would be read as the newest snapshot", "reserved")
    if looks_like_id(name):
        raise BadName(f'a snapshot may not be named "{name}": it would be read as an id', "form")
    if "/" in name or name in (".", ".."):
        raise BadName(f'a snapshot name is a folder name: not "{name}"', "form")
    if _MADE_UP_FOLDER.fullmatch(name):
        raise BadName(f'a snapshot may not be named "{name}": the snapshot mounts give folder names of that '
                      "form (a time, NAME-<8 hex digits>) to other snapshots", "form")
    if len(name.encode()) > LABEL_BYTES:
        raise BadName(f"a snapshot name may have at most {LABEL_BYTES} bytes, not {len(name.encode())}",
                      "too long")
    return name


def check_name_free(name: str, snapshots: Iterable[Snapshot]) -> str:
    """`name` if no snapshot among `snapshots` (all of a repository's) has it as its name or its
    folder name; else BadName ("taken") saying which one has it. `backup --name`, `snapshot
    --name` and `mkdir MOUNT/.snapshots/NAME` all ask here, before any work."""
    snapshots = list(snapshots)
    for folder, snapshot in folder_names(snapshots).items():
        if snapshot.name == name or folder == name:
            raise BadName(f"snapshot {snapshot.short_id} of {snapshot.time.strftime('%Y-%m-%d %H:%M:%S')} "
                          f'({shown_name(snapshot.source)}) is named "{_shown_text(name)}" already'
                          + (f" (folder {folder})" if folder != name else ""), "taken")
    return name


def folder_names(snapshots: Iterable[Snapshot]) -> dict[str, Snapshot]:
    """The folder each snapshot of a repository gets in the snapshot mounts (mount-snapshots and
    `MOUNT/.snapshots` alike), oldest first: its label, or, when an older snapshot has that label
    already (or it is `latest`), the label with `-<short id>` appended. `ls` and `restore` take
    these names too, so a folder name means one snapshot wherever it is shown."""
    names: dict[str, Snapshot] = {}
    for snapshot in sorted(snapshots, key=lambda s: (s.time_ns, s.id)):
        label = snapshot.label()
        if label in names or label == LATEST:
            label += "-" + snapshot.short_id
        names[label] = snapshot
    return names


def resolve_snapshot(repo: Repository, ref: str, *, host: str | None = None,
                     source: bytes | None = None) -> Snapshot:
    """The snapshot `ref` names: `latest` (optionally the latest of one host and source), an id
    prefix, a folder name of the snapshot mounts (`folder_names`), or a name."""
    if ref == LATEST:
        candidates = [s for s in repo.snapshots()
                      if (host is None or s.host == host) and (source is None or s.source == source)]
        if not candidates and repo.damaged_snapshots:
            raise IntegrityError(f"no readable snapshot: {len(repo.damaged_snapshots)} are damaged "
                                 "(`fsmount verify` says more)")
        if not candidates:
            raise UsageError("the repository has no snapshots yet" if host is None and source is None
                             else "no snapshot matches that host and source")
        return candidates[-1]
    is_id = looks_like_id(ref)
    ids = repo.snapshot_ids() if is_id else None
    matches = [i for i in ids if i.startswith(ref)] if ids is not None else []
    if len(matches) > 1:
        raise UsageError(f"snapshot id {ref} is ambiguous ({len(matches)} snapshots match)")
    if matches:
        return repo.load_snapshot(matches[0])
    every = repo.snapshots(ids)  # an id that matched none may still be a name: listed once, not again
    by_folder = folder_names(every).get(ref)
    if by_folder is not None:
        return by_folder
    named = [s for s in every if s.name == ref]
    if len(named) > 1:
        raise UsageError(f'{len(named)} snapshots are named "{_shown_text(ref)}": give one\'s id '
                         f"({', '.join(s.short_id for s in named)})")
    if named:
        return named[0]
    if is_id:
        raise UsageError(f"no snapshot with id {ref} (nor one named so)")
    raise UsageError(f'"{_shown_text(ref)}" is not a snapshot id, name nor folder name (give at least 4 hex digits of an '
                     "id, a snapshot's name or its folder in the snapshot mounts, or `latest`; `fsmount "
                     "snapshots` lists them)")


@dataclass
class Snapshot:
    time_ns: int
    host: str
    source: bytes
    tree: bytes
    tags: list[str] = field(default_factory=list)
    name: str | None = None
    parent: str | None = None
    stats: dict[str, int] = field(default_factory=dict)
    root: Node | None = None  # the source folder's own metadata; None in older snapshots
    id: str = ""  # set once stored or loaded; not part of the object

    @property
    def time(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.time_ns / 1e9, tz=dt.UTC).astimezone()

    @property
    def short_id(self) -> str:
        return self.id[:8]

    def label(self) -> str:
        """The folder name a snapshot gets in a mounted snapshot tree: its name, or else its time.
        `check_name` lets only names through that are their own label; older snapshots may have
        others, which are mapped to a name a folder can have: no `/` nor NUL (the kernel cuts a
        name there), not `.` nor `..` (which a listing would hide behind the real ones), short
        enough to take a suffix."""
        label = (self.name or self.time.strftime(TIME_FORMAT)).replace("/", "_").replace("\0", "_")
        if label in (".", ".."):
            label = label.replace(".", "_")
        raw = label.encode(errors="surrogateescape")
        if len(raw) > LABEL_BYTES:
            label = raw[:LABEL_BYTES].decode(errors="ignore")  # cut where a character ends
        return label

    def encode(self, key: MasterKey) -> tuple[str, bytes]:
        doc = {"v": SNAPSHOT_VERSION, "time_ns": self.time_ns, "host": self.host, "source": self.source,
               "tags": self.tags, "name": self.name, "parent": self.parent, "tree": self.tree,
               "stats": self.stats}
        if self.root is not None:
            doc["root"] = self.root.to_doc()
        data = key.seal(zstandard.ZstdCompressor().compress(msgpack.packb(doc)), SNAPSHOT_AAD)
        return content_hash(data), data

    @classmethod
    def decode(cls, key: MasterKey, snapshot_id: str, data: bytes) -> Snapshot:
        what = f"snapshot {snapshot_id}"
        if content_hash(data) != snapshot_id:
            raise IntegrityError(f"{what} does not match its name (corrupt)")
        plain = key.unseal(data, SNAPSHOT_AAD, what)
        try:
            doc = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(plain))
            if doc["v"] != SNAPSHOT_VERSION:
                raise IntegrityError(f"{what} has unknown version {doc['v']}")
            return cls(time_ns=doc["time_ns"], host=doc["host"], source=doc["source"], tree=doc["tree"],
                       tags=list(doc["tags"]), name=doc["name"], parent=doc["parent"],
                       stats=dict(doc["stats"]), root=Node.from_doc(doc["root"]) if doc.get("root") else None,
                       id=snapshot_id)
        except (ValueError, KeyError, TypeError, zstandard.ZstdError) as exc:
            raise IntegrityError(f"{what} is malformed: {exc}") from exc
