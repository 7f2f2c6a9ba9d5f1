"""Writes tests/data/format-v1/: a small repository of format version 1 that every later fsmount
must keep reading, and manifest.json describing what restoring its latest snapshot must give.
Run once per released format (python tests/data/make_format_v1.py); commit the result."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from treecompare import manifest

from backend.backup import backup
from backend.repository import Repository
from backend.stores import LocalStore

HERE = os.path.dirname(os.path.abspath(__file__))
PASSPHRASE = b"format-v1 test passphrase"


def main() -> None:
    out = os.path.join(HERE, "format-v1")
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src").encode()
        os.makedirs(os.path.join(src, b"dir"))
        with open(os.path.join(src, b"dir", b"\xff\xfe latin"), "wb") as f:
            f.write(b"bytes that are not utf-8 in the name\n")
        with open(os.path.join(src, b"big"), "wb") as f:
            f.write(bytes(range(256)) * 1024)  # 256 KiB, compressible, 4 blocks
        with open(os.path.join(src, b"sparse"), "wb") as f:
            f.truncate(300_000)
        os.link(os.path.join(src, b"big"), os.path.join(src, b"big-link"))
        os.symlink(b"dir", os.path.join(src, b"link"))
        os.chmod(os.path.join(src, b"big"), 0o640)
        for path in (b"dir/\xff\xfe latin", b"big", b"sparse"):
            os.utime(os.path.join(src, path), ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
        with Repository.init(LocalStore(out), PASSPHRASE, block_size=64 * 1024,
                             cache_dir=os.path.join(tmp, "cache")) as repo:
            backup(repo, src, host="format-v1", tags=["v1"])
        entries = manifest(src)
    with open(os.path.join(HERE, "format-v1.manifest.json"), "w") as f:
        json.dump({"passphrase": PASSPHRASE.decode(), "entries": entries}, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
