"""What every command needs before it starts: where the repository is and the passphrase.

Resolution follows restic's habits. Repository: `-r/--repo` (repeat it for replicas; a location
may be `profile:NAME`, see profiles.py), else `FSMOUNT_REPOSITORY`. Passphrase: `--password-file`, else `FSMOUNT_PASSWORD_FILE`, else
`FSMOUNT_PASSWORD`, else a prompt on the terminal. The passphrase is never logged or echoed.
Several repositories are replicas of one; with `--degraded`, a replica that fails is left behind
and what it missed is recorded for `fsmount replicas sync`.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import click

from backend.errors import UsageError

from .background import inherited_passphrase, report_warning

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # imported where used: commands that only talk to a mount's socket need none
    from backend.crypto import MasterKey
    from backend.errors import StoreError
    from backend.lock import RepositoryLock
    from backend.replicas import DegradedLog
    from backend.repository import OpenedKey, Repository
    from backend.stores import ObjectStore

    from .lock_policy import LockMode


def open_location(location: str) -> ObjectStore:
    """A store from a location as the user wrote it, `profile:NAME` included (profiles.py).

    FSMOUNT_STORE_RETRY_S sets how long one S3 request keeps retrying before the operation that
    needed it fails (default 60 s); a live mount then tries the snapshot again later."""
    from backend.stores import open_store

    from .profiles import load_profile

    check_location(location)
    options: dict = {}
    if os.environ.get("FSMOUNT_STORE_RETRY_S"):
        try:
            options["retry_budget_s"] = float(os.environ["FSMOUNT_STORE_RETRY_S"])
        except ValueError:
            raise UsageError(f"FSMOUNT_STORE_RETRY_S must be a number of seconds, not {os.environ['FSMOUNT_STORE_RETRY_S']!r}") from None
    if location.startswith("profile:"):
        profile = load_profile(location.removeprefix("profile:"))
        return open_store(profile.location, **{**profile.store_options(), **options})
    return open_store(location, **options)


# restic's other back-ends, and URLs: a restic user's `-r sftp:host:/srv` would otherwise be a
# local folder `sftp:host:` made in the working directory by `init`, and backed up to there.
_FOREIGN_LOCATION = re.compile(r"(sftp|rest|b2|azure|gs|swift|rclone|[a-z][a-z0-9+.-]*(?=://)):", re.IGNORECASE)


def check_location(location: str) -> None:
    """UsageError for a location no store of ours serves: empty (an unset variable in `-r "$REPO"`
    would make it the working directory), or of another tool's back-end."""
    if not location.removeprefix("local:").strip():
        raise UsageError("the repository location is empty: give a directory, local:DIR, s3:BUCKET/PREFIX, "
                         "s3:https://HOST/BUCKET/PREFIX or profile:NAME")
    foreign = _FOREIGN_LOCATION.match(location)
    if foreign:
        raise UsageError(f"{location}: fsmount has no {foreign.group(1)}: store; a location is a directory, "
                         "local:DIR, s3:BUCKET/PREFIX, s3:https://HOST/BUCKET/PREFIX or profile:NAME "
                         f"(a local folder of that name: ./{location})")


@dataclass
class AppContext:
    repo_locations: list[str] = field(default_factory=list)
    password_file: str | None = None
    cache_dir: str | None = None
    json: bool = False
    quiet: bool = False
    degraded: bool = False
    no_lock: bool = False
    _lock: RepositoryLock | None = field(default=None, repr=False)  # held until the command ends
    _opened_key: OpenedKey | None = field(default=None, repr=False)  # opened to take the lock
    _config_bytes: bytes | None = field(default=None, repr=False)  # read and checked to take the lock
    _degraded_log: DegradedLog | None = field(default=None, repr=False)
    _unanswered: StoreError | None = field(default=None, repr=False)  # the store did not answer for the lock
    _passphrase: bytes | None = field(default=None, repr=False)
    _replicated: list = field(default_factory=list, repr=False)
    _warned: bool = field(default=False, repr=False)  # of degraded writes (see open_store)
    _recorded: Counter = field(default_factory=Counter, repr=False)  # replica -> objects this run left out

    def locations(self) -> list[str]:
        if self.repo_locations:
            return self.repo_locations
        env = os.environ.get("FSMOUNT_REPOSITORY")
        if env:
            return [env]
        raise UsageError("no repository given: use -r/--repo LOCATION or set FSMOUNT_REPOSITORY")

    def open_store(self) -> ObjectStore:
        """The repository's store; the first time, the command's lock is taken in it (lock_policy.py)."""
        store = self._open_store()
        try:
            self._take_lock(store)
        except BaseException:
            store.close()
            raise
        return store

    def _take_lock(self, store: ObjectStore) -> None:
        """Take the lock the current command needs (lock_policy.py), once, after reading the config
        and opening the key: without a repository there, the command says so itself."""
        from .lock_policy import lock_mode

        mode = lock_mode(click.get_current_context(silent=True))
        if mode is None or self._lock is not None:
            return
        if self.no_lock:
            if mode.exclusive:
                raise UsageError("--no-lock is for commands that only read: this one deletes or rewrites "
                                 "objects, which needs the repository to itself")
            return
        from backend.errors import StoreError
        from backend.repository import Config, check_replicas_hold_one_repository, open_key

        try:
            config_bytes = store.get("config")
            Config.decode(config_bytes)
        except StoreError as exc:  # no repository (or no store) there: the command reports it
            if store_did_not_answer(exc):
                self._unanswered = exc
            return
        check_replicas_hold_one_repository(store)  # two repositories given as replicas: write nothing
        if self._opened_key is None:
            self._opened_key = open_key(store, self.passphrase())
        self._lock = self._acquire_lock(self._opened_key.master, mode)
        self._config_bytes = config_bytes  # Repository.open reads and checks it no second time

    def _acquire_lock(self, key: MasterKey, mode: LockMode) -> RepositoryLock:
        from backend.lock import RepositoryLock

        copies = [open_location(location) for location in self.locations()]  # stay open until released
        try:
            return RepositoryLock.acquire(copies, key, exclusive=mode.exclusive, command=command_line(),
                                          retake=mode.retake)
        except BaseException:
            for copy in copies:
                copy.close()
            raise

    def _lock_on_rejoin(self) -> Callable[[ObjectStore, MasterKey], ObjectStore] | None:
        """For a mount opened without its store: once the store is found to hold the repository,
        take the lock the mount would have taken at start, so that exclusive work elsewhere
        (`migrate --delete-source`, `verify --repair`) sees it; None where the command takes none."""
        from .lock_policy import lock_mode

        mode = lock_mode(click.get_current_context(silent=True))  # read here: the hook runs on another thread
        if mode is None or self.no_lock:
            return None

        def take_lock(store: ObjectStore, key: MasterKey) -> ObjectStore:
            from backend.errors import LockedError, StoreError
            from backend.lock import LockGuardedStore

            if self._lock is None:  # else taken by an earlier attempt whose index sync then failed
                try:
                    self._lock = self._acquire_lock(key, mode)
                except LockedError as exc:  # the backlog waits, as it does for a store that fails
                    raise StoreError(f"{exc}; the backlog waits until the mount can take its lock") from exc
                log.info("the store holds this repository: took the repository lock %s", self._lock.name)
            return LockGuardedStore(store, self._lock)  # type: ignore[return-value]

        return take_lock

    @property
    def lock(self) -> RepositoryLock | None:
        """The lock this command holds, if any."""
        return self._lock

    def release_lock(self) -> None:
        """Remove the command's lock, if it took one (cli.py, at every exit)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()
            for copy in lock.copies:
                copy.close()

    def _open_store(self) -> ObjectStore:
        locations = self.locations()
        if len(locations) == 1:
            return open_location(locations[0])
        from backend.replicas import object_intact
        from backend.stores.replicated import ReplicatedStore

        store = ReplicatedStore([open_location(loc) for loc in locations], verify=object_intact,
                                degraded=self.degraded)
        self._replicated.append(store)
        if self.degraded and len(self._replicated) == 1:
            from .output import add_to_json

            add_to_json(lambda: {"missed_by_replicas": missed} if (missed := self.missed_by_replicas()) else {})
        self._warn_of_degraded_writes()
        return store

    def _warn_of_degraded_writes(self) -> None:
        """After a --degraded run, a replica lacks objects until `replicas sync`: say so, once per
        command, unless the command is the one that heals it."""
        command = click.get_current_context(silent=True)
        if self._warned or command is None or command.command_path.split()[1:2] in (["replicas"], ["verify"]):
            return
        self._warned = True
        missing = self.degraded_log().entries()
        if missing:
            log.warning("%d objects that a --degraded run could not write to a replica are still missing "
                        "there (e.g. %s in %s): run `fsmount replicas sync`", len(missing), missing[0][1], missing[0][0])

    def degraded_log(self) -> DegradedLog:
        """Where degraded writes to these replicas are recorded until `replicas sync` heals them
        (one object for the command, which remembers what it recorded)."""
        from backend.replicas import DegradedLog
        from backend.repository import default_cache_dir

        if self._degraded_log is None:
            name = hashlib.sha256("\n".join(sorted(self.locations())).encode()).hexdigest()[:16]
            directory = os.path.join(self.cache_dir or default_cache_dir(), "degraded")
            os.makedirs(directory, exist_ok=True)
            self._degraded_log = DegradedLog(os.path.join(directory, f"{name}.jsonl"))
        return self._degraded_log

    def record_degraded_writes(self) -> int:
        """Persist what degraded writes left out of a replica; how many objects that was."""
        missing = [(m.replica, m.key) for store in self._replicated for m in store.take_missing_objects()]
        if missing:
            self.degraded_log().record(missing)
            self._recorded.update(replica for replica, _ in missing)
        return len(missing)

    def missed_by_replicas(self) -> list[dict]:
        """What degraded writes of this run left out, per replica: `{"replica": location, "objects": n}`
        for each replica that missed any (recorded for `fsmount replicas sync` or about to be)."""
        counts = Counter(self._recorded)
        for store in self._replicated:
            counts.update(m.replica for m in store.missing_objects())
        return [{"replica": replica, "objects": n} for replica, n in counts.items()]

    def passphrase(self, *, confirm: bool = False) -> bytes:
        if self._passphrase is not None:
            return self._passphrase
        secret = inherited_passphrase() or self._read_passphrase(confirm)
        if not secret:
            raise UsageError("the passphrase is empty")
        self._passphrase = secret
        return secret

    def _read_passphrase(self, confirm: bool) -> bytes:
        path = self.password_file or os.environ.get("FSMOUNT_PASSWORD_FILE")
        if path:
            try:
                with open(os.path.expanduser(path), "rb") as f:
                    secret = f.read().rstrip(b"\r\n")
            except OSError as exc:
                raise UsageError(f"cannot read password file {path}: {exc.strerror}") from exc
        elif "FSMOUNT_PASSWORD" in os.environ:
            secret = os.environ["FSMOUNT_PASSWORD"].encode()
        elif sys.stdin.isatty():
            secret = getpass.getpass("repository passphrase: ").encode()
            if confirm and getpass.getpass("repeat passphrase: ").encode() != secret:
                raise UsageError("the passphrases do not match")
        else:  # piped in, as restic reads it: `pass show backup | fsmount snapshots`
            secret = sys.stdin.buffer.readline().rstrip(b"\r\n")
            if not secret:
                raise UsageError("no passphrase: use --password-file, FSMOUNT_PASSWORD_FILE, FSMOUNT_PASSWORD, "
                                 "a terminal or a line on stdin")
        return secret

    def open_repository(self, *, backlog: str | None = None, **options: object) -> Repository:
        """The repository; `options` go to `Repository.open`. With `backlog` (a live mount's), a
        store that does not answer does not stop it: the repository is opened from the copies of
        its config and key kept in the cache dir, and its writes wait in the backlog."""
        store = self.open_store()
        if self._lock is not None:  # once the lock is lost, the repository takes no more writes
            from backend.lock import LockGuardedStore

            store = LockGuardedStore(store, self._lock)  # type: ignore[assignment]
        try:
            with self.cache_folder_errors():
                repo = self._open_repository(store, backlog, options)
            log.info("repository %s at %s (cache %s)", repo.config.id[:8], store.location, repo.cache_dir)
            return repo
        except BaseException:
            store.close()
            raise

    def _open_repository(self, store: ObjectStore, backlog: str | None, options: dict) -> Repository:
        from backend.errors import StoreError
        from backend.repository import Repository

        unanswered = self._unanswered if backlog is not None else None  # asked already: not asked again
        if unanswered is None:
            try:
                return Repository.open(store, self.passphrase(), cache_dir=self.cache_dir, key=self._opened_key,
                                       config_bytes=self._config_bytes, backlog=backlog,
                                       **options)  # type: ignore[arg-type]
            except StoreError as exc:
                if backlog is None or not store_did_not_answer(exc):
                    raise
                unanswered = exc
        repo = Repository.open_from_copies(store, self.passphrase(), unanswered, backlog=backlog,
                                           cache_dir=self.cache_dir, on_rejoin=self._lock_on_rejoin(),
                                           **options)  # type: ignore[arg-type]
        warning = (f"the store does not answer ({unanswered}); mounting from the copies of the repository's "
                   "config and key kept here: snapshots wait on local disk until the store is back")
        log.warning("%s", warning)
        report_warning(warning)  # a daemon's log is not where the user looks
        return repo

    @contextlib.contextmanager
    def cache_folder_errors(self) -> Iterator[None]:
        """Opening a repository makes its cache; an OSError then is the cache folder's (the stores
        turn their own into StoreError): one line, not a traceback."""
        try:
            yield
        except OSError as exc:
            where = os.fsdecode(exc.filename) if exc.filename else self.cache_dir or "(default)"
            raise UsageError(f"cannot use the cache folder {where}: {exc.strerror or exc} "
                             "(choose another with --cache-dir)") from exc


def store_did_not_answer(exc: StoreError) -> bool:
    """Whether a failure says the store is down or cut off (it gave no answer for a whole retry
    budget, or its folder is on a disk that is not mounted), rather than that it refused: access
    denied, bad credentials or any other permanent error must fail the mount, not start one that
    never uploads."""
    from backend.errors import FolderMissing, StoreUnreachable

    return isinstance(exc, (StoreUnreachable, FolderMissing))


def command_line() -> str:
    """The command as run, for a lock to name its holder: `fsmount backup ~/projects`."""
    args = (os.fsencode(arg).decode(errors="backslashreplace") for arg in sys.argv[1:])  # names may be bytes
    return " ".join(["fsmount", *args])[:300]
