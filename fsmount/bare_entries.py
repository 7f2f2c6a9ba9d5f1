"""Directory entries without attributes, for listing names whose entries the kernel already holds.

A READDIRPLUS reply carries, with each name, the entry's attributes and a lookup reference: what
makes `ls -l` and `git status` cheap the first time, at the price of an `lstat` of every entry,
which was half of a listing's time. FUSE lets an entry carry the name alone: node id 0 tells
the kernel to keep whatever dentry it has and to look the name up when asked (fs/fuse/readdir.c,
`fuse_direntplus_link`). So a listing only stats the names the kernel has not been told about
lately, and lists the others bare.

pyfuse3 cannot say "node id 0": its `EntryAttributes.st_ino` sets the node id and the entry's
inode number together, and the inode number must be the real one (readdir(3) skips entries
numbered 0, and `ls -i` shows it). So `BareEntries` sets `st_ino`, then zeroes the node id in the
object's `fuse_entry_param`, whose place in the object is found and checked once at import. Where
it is not where it must be, `BareEntries.available` is False and listings stat every name.
"""

from __future__ import annotations

import ctypes
import sys

import pyfuse3

_INO, _GENERATION = 0x0123456789ABCDEF, 0x0FEDCBA987654321


def _node_id_offset() -> int | None:
    """Where an EntryAttributes holds `fuse_entry_param.ino`: the word set by `st_ino` and followed
    by `generation`, with `attr.st_ino` (after `attr.st_dev`) two words later."""
    if sys.implementation.name != "cpython":  # id() is the object's address only there
        return None
    probe = pyfuse3.EntryAttributes()
    probe.st_ino, probe.generation = _INO, _GENERATION

    def word(offset: int) -> int:
        return ctypes.c_uint64.from_address(id(probe) + offset).value

    size = type(probe).__basicsize__
    for offset in range(0, size - 32, 8):
        if word(offset) == _INO and word(offset + 8) == _GENERATION and word(offset + 24) == _INO:
            return offset
    return None


_OFFSET = _node_id_offset()


class BareEntries:
    """One reusable EntryAttributes, handed out for each bare entry (`readdir_reply` copies it at
    once, so the next entry may overwrite it)."""

    available = _OFFSET is not None

    def __init__(self) -> None:
        self._attr = pyfuse3.EntryAttributes()
        self._node_id = ctypes.c_uint64.from_address(id(self._attr) + _OFFSET) if _OFFSET is not None else None

    def entry(self, number: int, file_type: int) -> pyfuse3.EntryAttributes:
        """The entry for inode `number` of `file_type` (its mode's S_IFMT bits), without attributes."""
        assert self._node_id is not None
        attr = self._attr
        attr.st_ino = number
        attr.st_mode = file_type
        self._node_id.value = 0
        return attr
