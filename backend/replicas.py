"""Replicas compared and healed, object by object.

Every object of a repository but `config` is named by the BLAKE3 hash of its content (keys, packs,
indexes, snapshots), so any copy can be checked on its own: `object_intact(key, data)`. That is
what lets a replicated store fall back to another replica when one returns bad bytes, and what
`check_replicas` uses to find, per replica, the objects it lacks (by listing) and, with
`read_data`, the ones it holds damaged (by reading every copy; without it, the copies of an object
whose sizes differ between replicas, one of which must be damaged). With `repair`, each of those is
rewritten from a replica whose copy checks out; what no replica has a good copy of is reported, and
apart from it what could not be written (a replica that refuses writes: the copies exist). Healing
stops at the first write refused because the command lost its repository lock (`LockLost`, given
replicas wrapped by `guard_writes`): others may be deleting what it would bring back.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

from .crypto import content_hash, is_object_id
from .errors import FsmountError, ObjectNotFound, StoreError
from .lock import LockLost
from .progress import Progress
from .stores.base import ObjectStore
from .stores.local import fsync_dir

log = logging.getLogger(__name__)

WORKERS = 8


# With `config`, all a repository holds; in the order a migration copies them (what lets a reader
# make sense of the rest comes last).
REPOSITORY_PREFIXES = ("keys/", "data/", "index/", "snapshots/")
METADATA_PREFIXES = ("index/", "snapshots/", "keys/")


def is_repository_object(key: str) -> bool:
    """Whether `key` is one of the repository's objects (FORMAT.md: `config`, `data/<2 hex>/<id>`,
    `keys/`, `index/` or `snapshots/` then `<id>`), not a file someone left in its folder."""
    if key == "config":
        return True
    prefix, _, name = key.partition("/")
    if prefix == "data":
        fan_out, _, name = name.partition("/")
        return is_object_id(name) and fan_out == name[:2]
    return f"{prefix}/" in METADATA_PREFIXES and is_object_id(name)


def object_intact(key: str, data: bytes) -> bool:
    """Whether `data` is what the object `key` must hold (config: that it parses as JSON)."""
    if key == "config":
        try:
            return isinstance(json.loads(data), dict)
        except ValueError:
            return False
    return content_hash(data) == key.rpartition("/")[2]


@dataclass
class ReplicaState:
    location: str
    reachable: bool = True
    error: str | None = None
    repository: str | None = None  # the id its config names; None if it holds none (or unreadable)
    objects: int = 0
    bytes: int = 0
    missing: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    healed: int = 0
    unhealed: list[str] = field(default_factory=list)  # no replica has a good copy
    unwritten: list[str] = field(default_factory=list)  # a good copy was found, but writing it here failed
    write_error: str | None = None  # why the first of `unwritten` failed

    def summary(self) -> dict:
        doc = asdict(self)
        doc["missing"], doc["damaged"] = len(self.missing), len(self.damaged)
        return doc

    def failed_to_heal(self) -> list[str]:
        """What is still missing or damaged here after `repair`, whatever the reason."""
        return self.unhealed + self.unwritten


def check_replicas(replicas: Sequence[ObjectStore], *, read_data: bool = False, read_metadata: bool = False,
                   repair: bool = False, progress: Progress | None = None) -> list[ReplicaState]:
    """Each replica's state against the union of all; healed in place when `repair` is set.
    Every copy is read and checked with `read_data`; with `read_metadata`, those of the index,
    the snapshots and the keys (small: verify reads them anyway, and reading through the
    replicas hides a damaged copy, since reads go on to a good one)."""
    progress = progress or Progress()
    states = [ReplicaState(r.location) for r in replicas]
    listings: list[dict[str, int]] = []
    for replica, state in zip(replicas, states):
        try:
            listing = {key: size for key, size in replica.list("") if is_repository_object(key)}
        except StoreError as exc:
            state.reachable, state.error = False, str(exc)
            listing = {}
        listings.append(listing)
        state.objects, state.bytes = len(listing), sum(listing.values())
        if "config" in listing:
            state.repository = _repository_id(replica)
    every: dict[str, int] = {}
    for listing in listings:
        for key, size in listing.items():
            every.setdefault(key, size)
    for state, listing in zip(states, listings):
        if state.reachable:
            state.missing = sorted(every.keys() - listing.keys())
    _find_damage(replicas, states, listings, progress, everything=read_data, metadata=read_metadata)
    if repair:
        _heal(replicas, states, listings, progress)
    return states


def _repository_id(replica: ObjectStore) -> str | None:
    """The id of the repository whose config `replica` holds (None if it cannot be read)."""
    try:
        doc = json.loads(replica.get("config"))
    except (ObjectNotFound, ValueError):
        return None
    except StoreError as exc:
        log.warning("replica %s: reading its config failed: %s", replica.location, exc)
        return None
    return doc.get("id") if isinstance(doc, dict) and isinstance(doc.get("id"), str) else None


def different_repositories(states: Sequence[ReplicaState]) -> str | None:
    """If the replicas' configs name more than one repository, a line saying which holds which;
    their objects then differ all through, and no count of missing objects means anything."""
    ids = {state.repository for state in states if state.repository is not None}
    if len(ids) < 2:
        return None
    held = ", ".join(f"{state.location} holds {state.repository[:8]}" for state in states if state.repository)
    return f"the replicas hold different repositories ({held}); replicas must be copies of one repository"


def _find_damage(replicas: Sequence[ObjectStore], states: list[ReplicaState], listings: list[dict[str, int]],
                 progress: Progress, *, everything: bool, metadata: bool) -> None:
    """Read and check the copies: all (`everything`), those of the metadata (`metadata`), and in any
    case those of an object whose sizes differ between replicas (a truncated copy)."""
    sizes: dict[str, set[int]] = {}
    for listing in listings:
        for key, size in listing.items():
            sizes.setdefault(key, set()).add(size)
    jobs = [(i, key) for i, listing in enumerate(listings) for key in sorted(listing)
            if everything or (metadata and key.startswith(METADATA_PREFIXES)) or len(sizes[key]) > 1]
    if not jobs:
        return
    progress.start(total_bytes=sum(listings[i][key] for i, key in jobs))

    def check(job: tuple[int, str]) -> tuple[int, str, bool]:
        i, key = job
        try:
            data = replicas[i].get(key)
        except StoreError as exc:
            log.warning("replica %s: reading %s failed: %s", replicas[i].location, key, exc)
            return i, key, False
        finally:
            progress.advance(nbytes=listings[i][key])
        return i, key, object_intact(key, data)

    with ThreadPoolExecutor(WORKERS, thread_name_prefix="check") as pool:
        for i, key, intact in pool.map(check, jobs):
            if not intact:
                states[i].damaged.append(key)
    progress.finish()


def _heal(replicas: Sequence[ObjectStore], states: list[ReplicaState], listings: list[dict[str, int]],
          progress: Progress) -> None:
    jobs = [(i, key) for i, state in enumerate(states) if state.reachable
            for key in state.missing + state.damaged]
    progress.start(total_bytes=None)

    def heal(job: tuple[int, str]) -> tuple[int, str, bool, StoreError | None]:
        """(replica, key, healed, the write's failure if a good copy was found but not written)."""
        i, key = job
        bad = {j for j, state in enumerate(states) if key in state.damaged}
        for j, source in enumerate(replicas):
            if j == i or j in bad or key not in listings[j]:
                continue
            try:
                data = source.get(key)
            except StoreError:
                continue
            if not object_intact(key, data):
                continue
            try:
                replicas[i].put(key, data)
            except LockLost:
                raise
            except StoreError as exc:
                log.debug("replica %s: writing %s failed: %s", replicas[i].location, key, exc)
                return i, key, False, exc
            progress.advance(nbytes=len(data))
            return i, key, True, None
        return i, key, False, None

    with ThreadPoolExecutor(WORKERS, thread_name_prefix="heal") as pool:
        try:
            for i, key, healed, write_failure in pool.map(heal, jobs):
                if healed:
                    states[i].healed += 1
                elif write_failure is not None:
                    states[i].unwritten.append(key)
                    states[i].write_error = states[i].write_error or str(write_failure)
                else:
                    states[i].unhealed.append(key)
        except LockLost:  # every write from now on is refused: do not start the rest
            pool.shutdown(cancel_futures=True)
            raise
    progress.finish()


class DegradedLog:
    """Objects that degraded writes could not put on a replica, kept in a JSON-lines file.

    `record` is durable when it returns (the file, and on creation its folder, fsync'd): a crash
    right after a --degraded run must not forget what a replica lacks, since only this record
    makes later commands say `replicas sync`. Each (replica, key) is kept once, however often it is
    recorded. A last line torn by a crash mid-write is ignored: its `record` never returned."""

    def __init__(self, path: str):
        self.path = path
        # The file's identity after this object last recorded into it, and the entries it then held.
        self._remembered: tuple[tuple[int, int, int, int], set[tuple[str, str]]] | None = None

    def record(self, entries: list[tuple[str, str]]) -> None:
        if not entries:
            return
        known = self._known()
        new = [entry for entry in dict.fromkeys(entries) if entry not in known]
        if not new:
            return
        created = not os.path.exists(self.path)
        lines = "".join(json.dumps({"replica": replica, "key": key}) + "\n" for replica, key in new)
        with open(self.path, "a+b") as f:
            _drop_torn_last_line(f)
            f.write(lines.encode())
            f.flush()
            os.fsync(f.fileno())
            self._remembered = (_identity(os.fstat(f.fileno())), known | set(new))
        if created:
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def entries(self) -> list[tuple[str, str]]:
        """Each recorded (replica, key) once, oldest first."""
        return list(dict.fromkeys(self._read()))

    def clear(self) -> None:
        self._remembered = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _known(self) -> set[tuple[str, str]]:
        """What the file holds: remembered from this object's last `record` while the file is as it
        left it (a live mount records after every object stored; reading it all each time grew with
        the square of the objects a replica missed)."""
        try:
            identity = _identity(os.stat(self.path))
        except FileNotFoundError:
            return set()
        if self._remembered is not None and self._remembered[0] == identity:
            return self._remembered[1]
        return set(self._read())

    def _read(self) -> list[tuple[str, str]]:
        try:
            with open(self.path, "rb") as f:
                text = f.read().decode()
        except FileNotFoundError:
            return []
        except UnicodeDecodeError as exc:
            raise FsmountError(f"the record of degraded writes {self.path} is damaged: {exc}") from exc
        *lines, last = text.split("\n")  # last is "" when the file ends with a newline, as a complete record does
        entries = [_parse_entry(self.path, line) for line in lines if line.strip()]
        try:
            entries += [_parse_entry(self.path, last)] if last.strip() else []
        except FsmountError:
            log.warning("%s: ignoring its last line, torn by a crash while it was written", self.path)
        return entries


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _parse_entry(path: str, line: str) -> tuple[str, str]:
    try:
        doc = json.loads(line)
        return doc["replica"], doc["key"]
    except (ValueError, KeyError, TypeError) as exc:
        raise FsmountError(f"the record of degraded writes {path} is damaged: {exc}") from exc


def _drop_torn_last_line(f: BinaryIO) -> None:
    """Cut what follows the last newline of `f` (open for appending): a line a crash tore."""
    if f.seek(0, os.SEEK_END) == 0:
        return
    f.seek(-1, os.SEEK_END)
    if f.read(1) != b"\n":
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)
