"""Keys, sealing and blob ids: everything secret the repository does.

A repository has one *master key*: 32 bytes for AES-256-GCM and 32 bytes for the keyed BLAKE3 that
names blobs. It is stored only wrapped, in `keys/<id>` objects, each sealed with a key derived from a
passphrase by scrypt; several passphrases may wrap the same master key.

Sealed format (every object but `config` and `keys/`): `nonce (12) || AES-256-GCM(plaintext) || tag
(16)`, with associated data naming what the object is, so a sealed pack header cannot be passed off
as a snapshot. Blobs put one more byte in front of their plaintext before sealing: 0 = stored as is,
1 = zstd-compressed; their associated data is the blob type byte followed by the 32-byte blob id.

Blob id = BLAKE3 keyed with the id key, over the plaintext: equal blocks dedup, yet the store cannot
test guesses of content against ids. Decrypting a blob checks both the tag and the id.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from dataclasses import dataclass

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .errors import IntegrityError, WrongPassword

NONCE_SIZE = 12
TAG_SIZE = 16
ID_SIZE = 32
SEAL_OVERHEAD = NONCE_SIZE + TAG_SIZE

# scrypt cost: 2**15 * 8 * 128 bytes = 32 MiB and ~0.1 s per open, restic's order of magnitude.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1

_RAW, _ZSTD = 0, 1
ZSTD_LEVEL = 3
# Before compressing a block, compress three samples of it: when they do not shrink by at least
# this much, the block is stored raw. zstd spends nearly as long failing on random data as
# compressing text; the samples cost ~1/10 of that.
_PROBE_BYTES, _PROBE_MIN_SAVING = 4096, 0.03

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    # zstandard contexts must not be shared between threads; one per worker thread.
    c = getattr(_local, "compressor", None)
    if c is None:
        c = _local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def _aead(key: bytes) -> AESGCM:
    # Building an AESGCM expands the key; one per thread and key instead of one per blob.
    cache = getattr(_local, "aead", None)
    if cache is None:
        cache = _local.aead = {}
    aead = cache.get(key)
    if aead is None:
        aead = cache[key] = AESGCM(key)
    return aead


def _may_compress(plaintext: bytes | memoryview) -> bool:
    """Whether samples from the start, middle and end of `plaintext` compress at all."""
    size = len(plaintext)
    if size < 4 * _PROBE_BYTES:
        return True
    view = memoryview(plaintext)
    middle = (size - _PROBE_BYTES) // 2
    sample = b"".join((view[:_PROBE_BYTES], view[middle:middle + _PROBE_BYTES], view[-_PROBE_BYTES:]))
    return len(_compressor().compress(sample)) < len(sample) * (1 - _PROBE_MIN_SAVING)


def content_hash(data: bytes) -> str:
    """Unkeyed BLAKE3 of stored bytes, hex: the name of packs, indexes, snapshots and keys."""
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO if len(data) > 1 << 20 else 1).hexdigest()


def random_id() -> str:
    return os.urandom(ID_SIZE).hex()


def is_object_id(name: str) -> bool:
    """Whether `name` can be an object's id (64 lowercase hex digits, as `content_hash` and
    `random_id` make them): any other name in the store is someone else's file."""
    return len(name) == 2 * ID_SIZE and all(c in "0123456789abcdef" for c in name)


@dataclass(frozen=True)
class MasterKey:
    """The repository's secret: an AEAD key and the key of the blob-id hash."""

    encrypt_key: bytes
    id_key: bytes

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(os.urandom(32), os.urandom(32))

    def __repr__(self) -> str:  # never print key material
        return "MasterKey(<secret>)"

    # -- blob ids -------------------------------------------------------------------------------

    def blob_id(self, plaintext: bytes | memoryview) -> bytes:
        return blake3.blake3(plaintext, key=self.id_key).digest()

    # -- sealing --------------------------------------------------------------------------------

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + _aead(self.encrypt_key).encrypt(nonce, plaintext, aad)

    def unseal(self, sealed: bytes | memoryview, aad: bytes, what: str) -> bytes:
        if len(sealed) < SEAL_OVERHEAD:
            raise IntegrityError(f"{what} is truncated ({len(sealed)} bytes)")
        sealed = memoryview(sealed)  # slices without copying; decrypt takes any buffer
        try:
            return _aead(self.encrypt_key).decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], aad)
        except InvalidTag as exc:
            raise IntegrityError(f"{what} failed authentication (corrupt or tampered)") from exc

    def seal_blob(self, blob_type: int, blob_id: bytes, plaintext: bytes | memoryview) -> bytes:
        """Compress when it helps, then seal; the result goes into a pack as is."""
        compressed = _compressor().compress(plaintext) if _may_compress(plaintext) else None
        if compressed is not None and len(compressed) < len(plaintext):
            body = b"".join((bytes([_ZSTD]), compressed))
        else:
            body = b"".join((bytes([_RAW]), plaintext))
        return self.seal(body, bytes([blob_type]) + blob_id)

    def unseal_blob(self, blob_type: int, blob_id: bytes, sealed: bytes | memoryview) -> bytes:
        """Open, decompress and check the id; any mismatch raises IntegrityError."""
        what = f"blob {blob_id.hex()}"
        body = self.unseal(sealed, bytes([blob_type]) + blob_id, what)
        if body[:1] == bytes([_ZSTD]):
            try:
                plaintext = _decompressor().decompress(body[1:])
            except zstandard.ZstdError as exc:
                raise IntegrityError(f"{what} does not decompress: {exc}") from exc
        elif body[:1] == bytes([_RAW]):
            plaintext = body[1:]
        else:
            raise IntegrityError(f"{what} has an unknown encoding {body[:1]!r}")
        if self.blob_id(plaintext) != blob_id:
            raise IntegrityError(f"{what} does not match its content hash")
        return plaintext

    # -- wrapping under a passphrase ------------------------------------------------------------

    def wrap(self, passphrase: bytes) -> bytes:
        """The content of a `keys/<id>` object: this key sealed under the passphrase."""
        salt = os.urandom(16)
        kek = _derive(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        secret = json.dumps({"encrypt": _b64(self.encrypt_key), "id": _b64(self.id_key)}).encode()
        nonce = os.urandom(NONCE_SIZE)
        sealed = AESGCM(kek).encrypt(nonce, secret, b"fsmount key")
        doc = {
            "kdf": "scrypt",
            "n": SCRYPT_N,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
            "salt": _b64(salt),
            "data": _b64(nonce + sealed),
        }
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def unwrap(cls, key_object: bytes, passphrase: bytes) -> MasterKey:
        """Open a `keys/<id>` object; raises WrongPassword if the passphrase does not fit."""
        try:
            doc = json.loads(key_object)
            if doc["kdf"] != "scrypt":
                raise IntegrityError(f"key uses an unknown KDF {doc['kdf']!r}")
            kek = _derive(passphrase, _unb64(doc["salt"]), doc["n"], doc["r"], doc["p"])
            data = _unb64(doc["data"])
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"key object is malformed: {exc}") from exc
        try:
            secret = AESGCM(kek).decrypt(data[:NONCE_SIZE], data[NONCE_SIZE:], b"fsmount key")
        except InvalidTag:
            raise WrongPassword("wrong passphrase: no key of the repository opens with it") from None
        keys = json.loads(secret)
        return cls(_unb64(keys["encrypt"]), _unb64(keys["id"]))


def _derive(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
