"""Compare two directory trees the way a user would judge a restore: content and all metadata.

Used by the round-trip tests and the mount tests. Differences come back as readable lines, so a
failing assertion shows what differs and where.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat


def _holes(path: bytes, size: int) -> list[tuple[int, int]]:
    """Data extents of a file as (start, end) pairs, from SEEK_DATA/SEEK_HOLE, each cut to its
    first and last non-zero byte. An extent that holds only zero bytes is left out: backup stores
    an all-zero block as a hole, and restore makes it one (so a file whose last, partial block is
    zeros ends in a hole once restored)."""
    extents = []
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            data = os.pread(fd, end - start, start)
            if data.strip(b"\0"):
                extents.append((start + len(data) - len(data.lstrip(b"\0")), end - len(data) + len(data.rstrip(b"\0"))))
            offset = end
    finally:
        os.close(fd)
    return extents


def _xattrs(path: bytes) -> dict[str, bytes]:
    try:
        return {n: os.getxattr(path, n, follow_symlinks=False) for n in os.listxattr(path, follow_symlinks=False)}
    except OSError:
        return {}


def describe(root: bytes, *, times: bool = True, owners: bool = True, sparse: bool = True,
             xattrs: bool = True) -> dict[bytes, dict]:
    """Everything we promise to preserve, per relative path; a hard link lists its whole group."""
    result: dict[bytes, dict] = {}
    inode_groups: dict[tuple[int, int], list[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            entry: dict = {"type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode)}
            if owners:
                entry["owner"] = (st.st_uid, st.st_gid)
            if times and not stat.S_ISLNK(st.st_mode):
                entry["mtime_ns"] = st.st_mtime_ns
            if xattrs and not stat.S_ISLNK(st.st_mode):
                entry["xattrs"] = _xattrs(path)
            if stat.S_ISREG(st.st_mode):
                entry["size"] = st.st_size
                with open(path, "rb") as f:
                    entry["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
                if st.st_nlink > 1:
                    group = inode_groups.setdefault((st.st_dev, st.st_ino), [])
                    group.append(rel)
                    entry["links"] = group  # filled in as the walk goes; compared once complete
                if sparse:
                    entry["extents"] = _holes(path, st.st_size)
            elif stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry["rdev"] = st.st_rdev
            elif stat.S_ISDIR(st.st_mode) and times:
                entry["mtime_ns"] = st.st_mtime_ns
            result[rel] = entry
    for entry in result.values():
        if "links" in entry:
            entry["links"] = tuple(sorted(entry["links"]))
    return result


def differences(a: bytes | str, b: bytes | str, *, file_mtime_slack_ns: int = 0, **options: bool) -> list[str]:
    """Readable differences between trees `a` and `b` (empty when they are equal).

    `file_mtime_slack_ns` tolerates that much difference in regular files' mtimes (see the live
    tree tests for why a mount with the kernel's writeback cache needs it)."""
    da, db = describe(os.fsencode(a), **options), describe(os.fsencode(b), **options)
    if file_mtime_slack_ns:
        for rel in da.keys() & db.keys():
            ea, eb = da[rel], db[rel]
            if ("sha256" in ea and "mtime_ns" in ea and "mtime_ns" in eb
                    and abs(ea["mtime_ns"] - eb["mtime_ns"]) <= file_mtime_slack_ns):
                eb["mtime_ns"] = ea["mtime_ns"]
    out = []
    for rel in sorted(da.keys() | db.keys()):
        shown = rel.decode(errors="backslashreplace")
        if rel not in db:
            out.append(f"{shown}: only in {os.fsdecode(a)}")
        elif rel not in da:
            out.append(f"{shown}: only in {os.fsdecode(b)}")
        elif da[rel] != db[rel]:
            diff = {k: (da[rel].get(k), db[rel].get(k)) for k in da[rel].keys() | db[rel].keys()
                    if da[rel].get(k) != db[rel].get(k)}
            out.append(f"{shown}: {diff}")
    return out


def manifest(root: bytes) -> dict[str, dict]:
    """A JSON-able description of a tree (hex of each relative path -> mode, size, mtime, content
    hash or link target): what the committed format fixtures record and their tests compare."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            entry = {"mode": st.st_mode, "size": 0 if stat.S_ISDIR(st.st_mode) else st.st_size,
                     "mtime_ns": st.st_mtime_ns}
            if stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path).decode()
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    entry["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
            found[os.path.relpath(path, root).hex()] = entry
    return found


def assert_listing_agrees_with_stat(folder: os.PathLike) -> None:
    """Each entry a listing gives has the inode number and type that lstat gives."""
    with os.scandir(folder) as entries:
        for entry in entries:
            st = os.lstat(entry.path)
            listed = (entry.inode(), entry.is_dir(follow_symlinks=False), entry.is_symlink(),
                      entry.is_file(follow_symlinks=False))
            kind = (stat.S_ISDIR(st.st_mode), stat.S_ISLNK(st.st_mode), stat.S_ISREG(st.st_mode))
            assert listed == (st.st_ino, *kind), entry.path
