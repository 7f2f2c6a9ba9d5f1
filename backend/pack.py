"""Packs: many sealed blobs in one object, so ten thousand small files cost a handful of PUTs.

Layout of `data/<first 2 hex of id>/<id>`, where id = BLAKE3 of the whole pack:

    sealed blob 0 | sealed blob 1 | ... | sealed header | header length (u32 LE)

The header, sealed with associated data `HEADER_AAD`, is a run of `ENTRY` records, one per blob, in
pack order: blob type (u8), blob id (32 bytes), offset (u32 LE), sealed length (u32 LE), plaintext
length (u32 LE). The same records, grouped by pack, make up index objects (`index.py`), so a pack can
be read through the index with one ranged GET per blob, or on its own (verify, repair) through its
header. A pack is checked before it leaves: its header is opened and parsed again.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .crypto import MasterKey, content_hash
from .errors import IntegrityError

DATA_BLOB, TREE_BLOB = 0, 1
BLOB_TYPE_NAMES = {DATA_BLOB: "data", TREE_BLOB: "tree"}

ENTRY = struct.Struct("<B32sIII")
HEADER_LENGTH = struct.Struct("<I")
HEADER_AAD = b"fsmount pack header"


@dataclass(frozen=True, slots=True)
class BlobEntry:
    """Where one blob lives in its pack."""

    blob_type: int
    blob_id: bytes
    offset: int
    length: int
    raw_length: int

    def pack(self) -> bytes:
        return ENTRY.pack(self.blob_type, self.blob_id, self.offset, self.length, self.raw_length)


def pack_key(pack_id: str) -> str:
    return f"data/{pack_id[:2]}/{pack_id}"


def encode_entries(entries: list[BlobEntry]) -> bytes:
    return b"".join(e.pack() for e in entries)


def decode_entries(data: bytes, what: str) -> list[BlobEntry]:
    if len(data) % ENTRY.size:
        raise IntegrityError(f"{what}: entry table has a partial record")
    return [BlobEntry(*fields) for fields in ENTRY.iter_unpack(data)]


class PackWriter:
    """Collects sealed blobs until the pack is big enough, then produces the finished object."""

    def __init__(self, key: MasterKey):
        self._key = key
        self._buffer = bytearray()
        self._entries: list[BlobEntry] = []

    @property
    def size(self) -> int:
        return len(self._buffer)

    @property
    def count(self) -> int:
        return len(self._entries)

    def blob_ids(self) -> list[bytes]:
        return [entry.blob_id for entry in self._entries]

    def add(self, blob_type: int, blob_id: bytes, sealed: bytes, raw_length: int) -> None:
        entry = BlobEntry(blob_type, blob_id, len(self._buffer), len(sealed), raw_length)
        self._entries.append(entry)
        self._buffer += sealed

    def finish(self) -> tuple[str, bytearray, list[BlobEntry]]:
        """(pack id, pack bytes, entries); the writer is empty afterwards."""
        header = self._key.seal(encode_entries(self._entries), HEADER_AAD)
        self._buffer += header
        self._buffer += HEADER_LENGTH.pack(len(header))
        data, entries = self._buffer, self._entries  # handed over, not copied: packs are 16 MiB
        self._buffer, self._entries = bytearray(), []
        pack_id = content_hash(data)
        if read_header(self._key, data, pack_id) != entries:
            raise IntegrityError(f"pack {pack_id} failed its check before upload")
        return pack_id, data, entries


def header_start(tail: bytes | bytearray, size: int, pack_id: str) -> int:
    """Where a pack's sealed header begins, from the pack's last bytes `tail` (at least its
    length field) and the pack's size."""
    what = f"pack {pack_id}"
    if len(tail) < HEADER_LENGTH.size or size < len(tail):
        raise IntegrityError(f"{what} is truncated")
    (header_length,) = HEADER_LENGTH.unpack_from(tail, len(tail) - HEADER_LENGTH.size)
    start = size - HEADER_LENGTH.size - header_length
    if start < 0:
        raise IntegrityError(f"{what} has a header longer than the pack")
    return start


def read_header(key: MasterKey, pack: bytes | bytearray, pack_id: str, size: int | None = None) -> list[BlobEntry]:
    """The entries of a pack, from its own header: `pack` is the whole pack, or, given the pack's
    `size`, its last bytes from `header_start` on (a ranged read of its tail is enough)."""
    what = f"pack {pack_id}"
    size = len(pack) if size is None else size
    start = header_start(pack, size, pack_id)
    given_from = size - len(pack)
    if start < given_from:
        raise ValueError(f"{what}: its header begins before the bytes given")
    plain = key.unseal(memoryview(pack)[start - given_from : len(pack) - HEADER_LENGTH.size], HEADER_AAD,
                       f"{what} header")
    entries = decode_entries(plain, what)
    for e in entries:
        if e.offset + e.length > start:
            raise IntegrityError(f"{what}: blob {e.blob_id.hex()} lies outside the pack body")
    return entries
