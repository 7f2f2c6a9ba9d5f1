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
from dataclasses import dataclass, field

import msgpack
import zstandard

from .crypto import MasterKey, content_hash
from .errors import IntegrityError, UsageError
from .tree import Node

SNAPSHOT_AAD = b"fsmount snapshot"
SNAPSHOT_VERSION = 1
LABEL_BYTES = 240  # of the 255 a name may have: room for the "-<short id>" that tells twins apart
LATEST = "latest"


def looks_like_id(ref: str) -> bool:
    """Whether `ls`, `restore` and `--parent` read `ref` as an id prefix (before any name)."""
    return len(ref) >= 4 and all(c in "0123456789abcdef" for c in ref)


class BadName(UsageError):
    """A name, host or tag that `check_name` or `check_text` refuses. `reason` says which rule,
    for the FUSE adapter's errno: "text", "reserved" (`latest`), "form" or "too long"."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def check_text(what: str, text: str) -> str:
    """`text` if it is printable UTF-8 (no control characters, no bytes that are not UTF-8, which
    reach us as lone surrogates and no snapshot object can hold); else BadName naming `what`."""
    if not text.isprintable():
        raise BadName(f"{what} must be printable UTF-8 text, not {text.encode(errors='surrogateescape')!r}", "text")
    return text


def check_name(name: str) -> str:
    """`name` if a snapshot may take it: `backup --name`, `snapshot --name` and
    `mkdir MOUNT/.snapshots/NAME` all ask here. A name must read back as itself wherever it is
    used: printable UTF-8 text, not empty, not `latest` nor what reads as an id, and a folder
    name of the snapshot mounts as it is (no `/`, not `.` or `..`, at most LABEL_BYTES bytes,
    which leaves room for the `-<short id>` that tells two snapshots of one name apart)."""
    check_text("a snapshot name", name)
    if not name:
        raise BadName("a snapshot name may not be empty", "form")
    if name == LATEST:
        raise BadName("a snapshot may not be named `latest`: it would be read as the newest snapshot", "reserved")
    if looks_like_id(name):
        raise BadName(f"a snapshot may not be named {name!r}: it would be read as an id", "form")
    if "/" in name or name in (".", ".."):
        raise BadName(f"a snapshot name is a folder name: not {name!r}", "form")
    if len(name.encode()) > LABEL_BYTES:
        raise BadName(f"a snapshot name may have at most {LABEL_BYTES} bytes, not {len(name.encode())}",
                      "too long")
    return name


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
        others, which are mapped to a name a folder can have: no `/`, not `.` nor `..` (which a
        listing would hide behind the real ones), short enough to take a suffix."""
        label = (self.name or self.time.strftime("%Y-%m-%dT%H:%M:%S")).replace("/", "_")
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
