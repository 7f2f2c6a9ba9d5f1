"""Named storage profiles: each replica with its own endpoint and credentials.

Two providers never share credentials, so `AWS_*` variables cannot serve a repository replicated
across them. A profile names a location and the credentials for it, in
`$XDG_CONFIG_HOME/fsmount/profiles.toml` (readable by its owner only, like ~/.aws/credentials):

    [wasabi]
    location = "s3:https://s3.eu-central-1.wasabisys.com/backups/repo"
    access_key_id = "..."
    secret_access_key = "..."
    region = "eu-central-1"        # optional

and is used as the location `profile:wasabi` (or `--profile wasabi`), once per replica.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass, field

from backend.errors import UsageError


@dataclass(frozen=True)
class Profile:
    name: str
    location: str
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    region: str | None = None

    def store_options(self) -> dict:
        options: dict = {}
        if self.access_key_id and self.secret_access_key:
            options["credentials"] = (self.access_key_id, self.secret_access_key)
        if self.region:
            options["region"] = self.region
        return options


def profiles_path() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "fsmount", "profiles.toml")


def load_profile(name: str) -> Profile:
    path = profiles_path()
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"profile {name!r}: there is no profile file {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read profile file {path}: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"{path} holds credentials and must be private: run `chmod 600 {path}`")
    entry = doc.get(name)
    if not isinstance(entry, dict):
        known = ", ".join(sorted(k for k, v in doc.items() if isinstance(v, dict))) or "none"
        raise UsageError(f"no profile {name!r} in {path} (profiles there: {known})")
    if not isinstance(entry.get("location"), str) or entry["location"].startswith("profile:"):
        raise UsageError(f"profile {name!r} in {path} needs a location = \"s3:...\" or a directory")
    unknown = set(entry) - {"location", "access_key_id", "secret_access_key", "region"}
    if unknown:
        raise UsageError(f"profile {name!r} in {path} has unknown keys: {', '.join(sorted(unknown))}")
    given = [k for k in ("access_key_id", "secret_access_key") if entry.get(k)]
    if len(given) == 1:  # with one alone, the other provider's key from the environment was sent instead
        missing = ({"access_key_id", "secret_access_key"} - set(given)).pop()
        raise UsageError(f"profile {name!r} in {path} has {given[0]} but no {missing}: give both, or neither "
                         "(to use the environment's credentials)")
    return Profile(name, entry["location"], entry.get("access_key_id"), entry.get("secret_access_key"),
                   entry.get("region"))
