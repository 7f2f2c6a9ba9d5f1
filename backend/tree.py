"""Trees: one blob per directory, listing its entries with everything needed to restore them exactly.

A tree blob (type `TREE_BLOB`) is msgpack `{"v": 1, "nodes": [node, ...]}`, nodes sorted by name
(bytewise). A node is a map with short keys; absent keys take the defaults below:

| key | meaning |
|---|---|
| `n` | name, bytes (any byte but `/` and NUL) |
| `t` | type: `f` file, `d` directory, `l` symlink, `p` FIFO, `c`/`b` char/block device, `s` socket |
| `m` | permission bits incl. setuid/setgid/sticky (`stat.S_IMODE`) |
| `u`, `g` | numeric owner and group |
| `mt`, `ct` | mtime, ctime in nanoseconds since the epoch |
| `at` | atime in ns; not recorded by backup (reading changes it, so every backup would rewrite every
  tree); absent means "restore it as the mtime" |
| `sz` | size in bytes (files; symlinks: target length) |
| `dev`, `ino`, `nl` | source device, inode and link count: incremental matching and hard-link groups |
| `rdev` | device number (devices) |
| `tg` | symlink target, bytes |
| `x` | extended attributes, map bytes → bytes (absent when none) |
| `b` | file content: 32-byte blob ids of its fixed-size blocks back to back; 32 zero bytes = hole |
| `h` | XXH3-128 of each block, 16 bytes each back to back, same order as `b` |
| `st` | directories: 32-byte id of the subtree's tree blob |
| `nf`, `ns` | directories: number of regular files and sum of their sizes in the whole subtree |
| `bk` | `st_blocks` on the source (512-byte units allocated; 0 is a value, absent = not recorded, as in
  trees written before it); only the snapshot mount uses it, restore leaves allocation to the file system |

Block *i* of a file covers bytes `[i * block_size, (i + 1) * block_size)` (the repository's block
size, from `config`); the last block may be short. Entries of files with `nl > 1` that share
(`dev`, `ino`) within one snapshot are hard links of one another.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgpack

from .errors import IntegrityError

TREE_VERSION = 1
HOLE = bytes(32)
ID_SIZE = 32
XXH_SIZE = 16

FILE, DIR, SYMLINK, FIFO, CHARDEV, BLOCKDEV, SOCKET = "f", "d", "l", "p", "c", "b", "s"

_TYPE_OF_MODE = {
    stat.S_IFREG: FILE,
    stat.S_IFDIR: DIR,
    stat.S_IFLNK: SYMLINK,
    stat.S_IFIFO: FIFO,
    stat.S_IFCHR: CHARDEV,
    stat.S_IFBLK: BLOCKDEV,
    stat.S_IFSOCK: SOCKET,
}
MODE_OF_TYPE = {v: k for k, v in _TYPE_OF_MODE.items()}


def node_type_of_mode(st_mode: int) -> str:
    return _TYPE_OF_MODE[stat.S_IFMT(st_mode)]


@dataclass(slots=True)
class Node:
    """One directory entry of a snapshot."""

    name: bytes
    type: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    atime_ns: int = 0
    ctime_ns: int = 0
    size: int = 0
    dev: int = 0
    ino: int = 0
    nlink: int = 1
    rdev: int = 0
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    blocks: bytes = b""
    xxh: bytes = b""
    subtree: bytes = b""
    files_below: int = 0
    bytes_below: int = 0
    st_blocks: int | None = None  # as the source's stat said; None in trees written before it

    @property
    def block_count(self) -> int:
        return len(self.blocks) // ID_SIZE

    def block_id(self, i: int) -> bytes:
        return self.blocks[i * ID_SIZE : (i + 1) * ID_SIZE]

    def block_xxh(self, i: int) -> bytes:
        return self.xxh[i * XXH_SIZE : (i + 1) * XXH_SIZE]

    def block_ids(self) -> Iterator[bytes]:
        for i in range(self.block_count):
            yield self.blocks[i * ID_SIZE : (i + 1) * ID_SIZE]

    @property
    def is_hardlinked(self) -> bool:
        return self.type != DIR and self.nlink > 1

    @property
    def st_mode(self) -> int:
        return MODE_OF_TYPE[self.type] | self.mode

    def to_doc(self) -> dict:
        doc: dict = {"n": self.name, "t": self.type, "m": self.mode, "u": self.uid, "g": self.gid,
                     "mt": self.mtime_ns, "ct": self.ctime_ns}
        for key, value in (("at", self.atime_ns), ("sz", self.size), ("dev", self.dev), ("ino", self.ino), ("rdev", self.rdev),
                           ("tg", self.target), ("x", self.xattrs), ("b", self.blocks), ("h", self.xxh),
                           ("st", self.subtree), ("nf", self.files_below), ("ns", self.bytes_below)):
            if value:
                doc[key] = value
        if self.nlink != 1:
            doc["nl"] = self.nlink
        if self.st_blocks is not None:
            doc["bk"] = self.st_blocks
        return doc

    @classmethod
    def from_doc(cls, doc: dict) -> Node:
        # Positional, in the order the fields are declared: keywords took twice as long, and every
        # backup decodes the parent's tree of each directory it visits.
        get = doc.get
        return cls(doc["n"], doc["t"], get("m", 0), get("u", 0), get("g", 0), get("mt", 0), get("at", 0),
                   get("ct", 0), get("sz", 0), get("dev", 0), get("ino", 0), get("nl", 1), get("rdev", 0),
                   get("tg", b""), get("x") or {}, get("b", b""), get("h", b""), get("st", b""), get("nf", 0),
                   get("ns", 0), get("bk"))


def encode_tree(nodes: list[Node]) -> bytes:
    """Tree blob plaintext; nodes are sorted by name here, whatever order they came in."""
    nodes = sorted(nodes, key=lambda n: n.name)
    return msgpack.packb({"v": TREE_VERSION, "nodes": [n.to_doc() for n in nodes]})


def decode_tree(data: bytes, what: str = "tree") -> list[Node]:
    try:
        doc = msgpack.unpackb(data)
        if doc["v"] != TREE_VERSION:
            raise IntegrityError(f"{what} has unknown version {doc['v']}")
        return [Node.from_doc(d) for d in doc["nodes"]]
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"{what} is malformed: {exc}") from exc
