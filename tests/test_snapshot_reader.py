"""The snapshot tree's block reader, driven directly: readers and read-ahead of the same blocks."""

from __future__ import annotations

import os
from pathlib import Path

import trio
import trio.testing

from backend.backup import backup
from backend.blob_reader import BlobReader
from fsmount.snapshot_reader import SnapshotReader


def test_readers_meeting_a_read_ahead_of_their_blocks_all_get_them(repo, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    content = os.urandom(8 * repo.block_size)
    (source / "large.bin").write_bytes(content)
    node = repo.find_node(backup(repo, source).snapshot, b"large.bin")
    reader = SnapshotReader(BlobReader(repo, None), repo.block_size)
    results: list[bytes] = []

    async def read_all() -> None:
        results.append(await reader.read(node, 0, node.size))

    async def read_all_once_the_others_wait() -> None:
        await trio.testing.wait_all_tasks_blocked()
        await read_all()

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                # A read-ahead of the file is started; before it runs, a reader asks for the same
                # blocks (nothing awaits in between), and a second reader comes while both are under way.
                reader.prefetch(list(node.block_ids()))
                nursery.start_soon(read_all_once_the_others_wait)
                await read_all()

    trio.run(main)
    assert results == [content, content]
