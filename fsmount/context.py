"""What every command needs before it starts: where the repository is and the passphrase.

Resolution follows restic's habits. Repository: `-r/--repo` (repeat it for replicas), else
`FSMOUNT_REPOSITORY`. Passphrase: `--password-file`, else `FSMOUNT_PASSWORD_FILE`, else
`FSMOUNT_PASSWORD`, else a prompt on the terminal. The passphrase is never logged or echoed.
"""

from __future__ import annotations

import getpass
import os
import sys
from dataclasses import dataclass, field

from backend.errors import UsageError
from backend.repository import Repository
from backend.stores import ObjectStore, open_store

from .background import inherited_passphrase


@dataclass
class AppContext:
    repo_locations: list[str] = field(default_factory=list)
    password_file: str | None = None
    cache_dir: str | None = None
    json: bool = False
    quiet: bool = False
    _passphrase: bytes | None = field(default=None, repr=False)

    def locations(self) -> list[str]:
        if self.repo_locations:
            return self.repo_locations
        env = os.environ.get("FSMOUNT_REPOSITORY")
        if env:
            return [env]
        raise UsageError("no repository given: use -r/--repo LOCATION or set FSMOUNT_REPOSITORY")

    def open_store(self) -> ObjectStore:
        locations = self.locations()
        if len(locations) == 1:
            return open_store(locations[0])
        from backend.stores.replicated import ReplicatedStore

        return ReplicatedStore([open_store(loc) for loc in locations])

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
        else:
            raise UsageError("no passphrase: use --password-file, FSMOUNT_PASSWORD_FILE or FSMOUNT_PASSWORD")
        return secret

    def open_repository(self) -> Repository:
        store = self.open_store()
        try:
            return Repository.open(store, self.passphrase(), cache_dir=self.cache_dir)
        except BaseException:
            store.close()
            raise
