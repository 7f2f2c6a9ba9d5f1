"""A store in an S3 bucket (AWS, SeaweedFS, MinIO, Ceph RGW...), over boto3.

Locations: `s3:bucket/prefix` (endpoint from `AWS_ENDPOINT_URL`, the AWS config, or AWS itself) and
`s3:http(s)://host:port/bucket/prefix` (explicit endpoint). Credentials come from the standard boto3
chain unless given; they never appear in `location`, in messages or in logs. Non-AWS endpoints use
path-style addressing.

Every request runs under a semaphore of `max_connections` (the size of the HTTP connection pool too),
and is retried by `retry.call_with_retry` within `retry_budget_s`; `translate_error` is the one place
that decides what an S3 failure means and whether it is transient. Objects from `multipart_threshold`
bytes up (larger than a pack) are uploaded in parts of `part_size`, several at once (within the same
bound). The bucket's existence is checked once, before the first request, so a typo fails clearly
(SeaweedFS would otherwise create the bucket on PUT).
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit

import boto3
import botocore.config
import botocore.exceptions as bex
import urllib3.exceptions

from ..errors import LocationMissing, ObjectNotFound, StoreError, TransientStoreError, UsageError
from .base import return_large_buffers_to_the_os
from .retry import RetryPolicy, call_with_retry

log = logging.getLogger(__name__)

T = TypeVar("T")
MiB = 1024 * 1024
# A pack (~16 MiB) goes in one PUT: in parts it took 4 requests instead of 1, and on SeaweedFS a
# migration of 1 GiB took 14.6-17.4 s instead of 12.1-13.5 s, a backup 20.2-22.3 s instead of
# 18.5-19.6 s (less CPU on both sides). Packs already travel several at once.
MULTIPART_THRESHOLD = 32 * MiB

_NOT_FOUND = {"NoSuchKey", "NotFound", "404"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
           "TokenRefreshRequired", "AllAccessDisabled", "InvalidClientTokenId", "403"}
_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "RequestLimitExceeded",
              "TooManyRequests", "RequestTimeout", "RequestTimeoutException", "InternalError",
              "ServiceUnavailable", "ConditionalRequestConflict", "OperationAborted"}


_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's rule for new buckets


class S3Store:
    """Objects under `prefix/` in one bucket; see the module docstring for the behaviour."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 credentials: tuple[str, str] | None = None, region: str | None = None,
                 max_connections: int = 16, retry_budget_s: float = 60.0, connect_timeout_s: float = 5.0,
                 read_timeout_s: float = 20.0, multipart_threshold: int = MULTIPART_THRESHOLD, part_size: int = 8 * MiB):
        if not bucket:
            raise StoreError("an S3 location needs a bucket: s3:bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._key_prefix = f"{self.prefix}/" if self.prefix else ""
        self._explicit_endpoint = endpoint_url.rstrip("/") if endpoint_url else None
        self.policy = RetryPolicy(budget_s=retry_budget_s)
        self.multipart_threshold = multipart_threshold
        self.part_size = max(part_size, 5 * MiB)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._bucket_checked = False
        self._bucket_lock = threading.Lock()
        self._parts_pool = ThreadPoolExecutor(max_connections, thread_name_prefix="s3-parts")
        return_large_buffers_to_the_os()  # whole objects travel as bytes (stores/base.py)
        # A request that hangs must not outlast the budget all retries share: with a budget of
        # 5 s, one stalled request took the 20 s of its read timeout.
        connect_timeout_s = min(connect_timeout_s, max(retry_budget_s, 1.0))
        read_timeout_s = min(read_timeout_s, max(retry_budget_s, 1.0))
        try:
            self._session = (boto3.session.Session() if credentials is None else
                             boto3.session.Session(aws_access_key_id=credentials[0], aws_secret_access_key=credentials[1]))
            self.client = _make_client(self._session, self._explicit_endpoint, region, max_connections,
                                       connect_timeout_s, read_timeout_s)
        except bex.ProfileNotFound as exc:
            raise StoreError(f"opening s3:{bucket}: {exc} (AWS_PROFILE or ~/.aws/config)") from None
        except (bex.BotoCoreError, ValueError) as exc:  # a malformed endpoint URL, ~/.aws/config
            raise StoreError(f"opening s3:{bucket}: {exc}") from None
        self.endpoint: str = self.client.meta.endpoint_url

    @classmethod
    def from_location(cls, location: str, **options: Any) -> S3Store:
        """The store `s3:bucket/prefix` or `s3:http(s)://host[:port]/bucket/prefix` names."""
        rest = location.removeprefix("s3:")
        endpoint = None
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", rest):
            endpoint, rest = _split_endpoint(rest)
            location = f"s3:{endpoint}{rest}"  # as messages show it: never with a user:secret@
        bucket, _, prefix = rest.lstrip("/").partition("/")
        if not _BUCKET_NAME.fullmatch(bucket):
            raise UsageError(f'{location}: "{bucket}" is not a bucket name (3-63 lowercase letters, digits, dots '
                             "and hyphens); write s3:BUCKET/PREFIX or s3:https://HOST/BUCKET/PREFIX")
        if ".." in prefix.split("/"):
            raise UsageError(f"{location}: a prefix may not hold `..`")
        return cls(bucket, prefix, endpoint_url=endpoint, **options)

    @property
    def location(self) -> str:
        where = f"{self._explicit_endpoint}/{self.bucket}" if self._explicit_endpoint else self.bucket
        return f"s3:{where}/{self.prefix}" if self.prefix else f"s3:{where}"

    # -- the ObjectStore operations

    def put(self, key: str, data: bytes) -> None:
        full = self._key(key)
        if len(data) >= self.multipart_threshold:
            self._put_multipart(key, full, data)
            return
        self._call(f"writing {key} to", lambda c: c.put_object(Bucket=self.bucket, Key=full,
                                                               Body=_BufferReader(data)))

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        full = self._key(key)
        if length == 0:
            if not self.exists(key):
                raise ObjectNotFound(f"object {key} not found in {self.location}")
            return b""
        ranged = {} if offset == 0 and length is None else {
            "Range": f"bytes={offset}-{'' if length is None else offset + length - 1}"}

        def read(c: Any) -> bytes:
            try:
                response = c.get_object(Bucket=self.bucket, Key=full, **ranged)
            except bex.ClientError as exc:
                if _code(exc) == "InvalidRange":  # the range starts at or past the end of the object
                    return b""
                raise
            with response["Body"] as body:
                return body.read()

        return self._call(f"reading {key} from", read, key=key)

    def exists(self, key: str) -> bool:
        full = self._key(key)
        try:
            self._call(f"looking up {key} in", lambda c: c.head_object(Bucket=self.bucket, Key=full), key=key)
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        for key, size, _ in self.list_with_etags(prefix):
            yield key, size

    def delete(self, key: str) -> None:
        full = self._key(key)
        try:
            self._call(f"deleting {key} from", lambda c: c.delete_object(Bucket=self.bucket, Key=full), key=key)
        except ObjectNotFound:
            pass

    def close(self) -> None:
        self._parts_pool.shutdown()
        self.client.close()

    # -- beyond the protocol

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` only if no object has that name (a conditional PUT); False if one already did.

        Meant for lock objects: give each writer distinct content, since after a retried request an
        existing object with exactly `data` in it is taken to be this call's own write.
        """
        full = self._key(key)
        body = bytes(data)
        attempts = 0

        def attempt(c: Any) -> bool:
            nonlocal attempts
            attempts += 1
            try:
                c.put_object(Bucket=self.bucket, Key=full, Body=body, IfNoneMatch="*")
            except bex.ClientError as exc:
                if _code(exc) in ("PreconditionFailed", "412"):
                    return False
                raise
            return True

        created = self._call(f"creating {key} in", attempt)
        if not created and attempts > 1:
            try:
                return self.get(key) == body
            except ObjectNotFound:
                return False
        return created

    def list_with_etags(self, prefix: str = "") -> Iterator[tuple[str, int, str]]:
        """`list`, with each object's ETag: the MD5 of its bytes, unless it was uploaded in parts."""
        full_prefix = self._key_prefix + prefix
        token: dict[str, str] = {}
        while True:
            page = self._call(f"listing {prefix or '/'} in", lambda c, token=token: c.list_objects_v2(
                Bucket=self.bucket, Prefix=full_prefix, MaxKeys=1000, **token))
            for entry in page.get("Contents", ()):
                yield entry["Key"][len(self._key_prefix):], entry["Size"], entry.get("ETag", "").strip('"')
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def can_copy_from(self, other: object) -> bool:
        """Whether this store's server can copy `other`'s objects itself (`copy_from`): the same
        endpoint, reached with the same access key."""
        if not isinstance(other, S3Store) or other.endpoint != self.endpoint:
            return False
        mine, theirs = self._session.get_credentials(), other._session.get_credentials()
        return mine is not None and theirs is not None and mine.access_key == theirs.access_key

    def copy_from(self, source: S3Store, key: str) -> str:
        """Copy `key` from `source` (see `can_copy_from`) without the bytes passing through this
        machine (CopyObject; objects up to 5 GiB); returns the copy's ETag."""
        full, origin = self._key(key), {"Bucket": source.bucket, "Key": source._key(key)}
        response = self._call(f"copying {key} from {source.location} to", lambda c: c.copy_object(
            Bucket=self.bucket, Key=full, CopySource=origin), key=key)
        return str(response["CopyObjectResult"]["ETag"]).strip('"')

    def create_if_missing(self) -> bool:
        """Create the bucket unless it exists (`fsmount init`, `migrate`); True if it was created."""
        if self._bucket_exists():
            self._bucket_checked = True
            return False
        region = self.client.meta.region_name
        where = {"CreateBucketConfiguration": {"LocationConstraint": region}} if (
            region and region != "us-east-1" and _is_aws(self.endpoint)) else {}

        def create(c: Any) -> bool:
            try:
                c.create_bucket(Bucket=self.bucket, **where)
            except bex.ClientError as exc:
                if _code(exc) == "BucketAlreadyOwnedByYou":
                    return False
                if _code(exc) == "BucketAlreadyExists":
                    raise StoreError(f"bucket name {self.bucket} is taken by another account") from exc
                raise
            return True

        created = self._call("creating the bucket for", create, check_bucket=False)
        self._bucket_checked = True
        return created

    def delete_many(self, keys: list[str]) -> None:
        """Delete several objects, up to 1000 per request; missing keys are not an error."""
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[start:start + 1000]]
            result = self._call(f"deleting {len(batch)} objects from", lambda c, batch=batch: c.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}))
            if result.get("Errors"):
                first = result["Errors"][0]
                raise StoreError(f"deleting {first.get('Key')} from {self.location}: "
                                 f"{first.get('Code')} ({first.get('Message')})")

    # -- the machinery

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"invalid object key {key!r}")
        return self._key_prefix + key

    def _call(self, doing: str, request: Callable[[Any], T], *, key: str | None = None,
              check_bucket: bool = True) -> T:
        """`request(client)` under a connection slot, with errors translated and transient ones retried."""
        if check_bucket and not self._bucket_checked:
            self._check_bucket()
        doing = f"{doing} {self.location}"

        def attempt() -> T:
            try:
                with self._slots:
                    return request(self.client)
            except (bex.ClientError, bex.BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
                raise translate_error(exc, doing=doing, store=self, key=key) from exc

        return call_with_retry(attempt, policy=self.policy, doing=doing)

    def _bucket_exists(self) -> bool | None:
        """Whether the bucket exists; None if this key may not ask (HeadBucket denied)."""
        def head(c: Any) -> bool | None:
            try:
                c.head_bucket(Bucket=self.bucket)
            except bex.ClientError as exc:
                if _code(exc) in ("NoSuchBucket", "NotFound", "404"):
                    return False
                if _code(exc) in ("AccessDenied", "403"):
                    return None
                raise
            return True

        return self._call("opening", head, check_bucket=False)

    def _check_bucket(self) -> None:
        with self._bucket_lock:
            if self._bucket_checked:
                return
            if self._bucket_exists() is False:
                raise LocationMissing(f"bucket {self.bucket} does not exist at {self.endpoint} "
                                      "(`fsmount init` creates it)")
            self._bucket_checked = True

    def _put_multipart(self, key: str, full: str, data: bytes) -> None:
        view = memoryview(data)
        upload = self._call(f"starting upload of {key} to", lambda c: c.create_multipart_upload(
            Bucket=self.bucket, Key=full))["UploadId"]

        def put_part(number: int) -> dict[str, Any]:
            chunk = view[(number - 1) * self.part_size:number * self.part_size]
            response = self._call(f"writing part {number} of {key} to", lambda c: c.upload_part(
                Bucket=self.bucket, Key=full, UploadId=upload, PartNumber=number, Body=_BufferReader(chunk)))
            return {"PartNumber": number, "ETag": response["ETag"]}

        try:
            count = -(-len(data) // self.part_size)
            parts = list(self._parts_pool.map(put_part, range(1, count + 1)))
            self._call(f"finishing upload of {key} to", lambda c: c.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload, MultipartUpload={"Parts": parts}))
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload)
            except Exception as exc:  # noqa: BLE001 - best effort: an unfinished upload stays invisible
                log.info("could not abort the upload of %s to %s: %s", key, self.location, exc)
            raise


class _BufferReader(io.RawIOBase):
    """An upload's body: a file over `data` whose reads are slices of it, not copies.

    botocore reads the body twice (its CRC32, then the send, in 16 KiB reads), and from bytes or
    a `BytesIO` each read is a copy; the pack, a bytearray, was copied whole first. For a 32 MiB
    PUT to SeaweedFS that was 78-91 ms of CPU, and 30-38 ms with this. A file object, not bytes,
    also keeps botocore from joining the body to the request's headers (one more copy). Make a
    fresh one per attempt: it is read from the start."""

    def __init__(self, data: bytes | bytearray | memoryview):
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        self._position = max(0, base + offset)
        return self._position

    def read(self, size: int | None = -1) -> memoryview:  # type: ignore[override]
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._position + size)
        chunk = self._view[self._position:end]
        self._position = max(self._position, end)
        return chunk

    def readinto(self, buffer: Any) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def translate_error(exc: BaseException, *, doing: str, store: S3Store, key: str | None = None) -> StoreError:
    """The `StoreError` an S3 failure stands for; `TransientStoreError` for those worth retrying.

    The one place that decides what is transient: throttling, 5xx, timeouts and dropped connections.
    """
    if isinstance(exc, bex.ClientError):
        code = _code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        message = exc.response.get("Error", {}).get("Message") or code
        if code == "NoSuchBucket":
            return LocationMissing(f"bucket {store.bucket} does not exist at {store.endpoint}")
        if code in _NOT_FOUND or (status == 404 and key is not None):
            return ObjectNotFound(f"object {key} not found in {store.location}")
        if code in _DENIED or status == 403:
            return StoreError(f"access denied to {store.location}, check credentials ({code})")
        if code in _TRANSIENT or status in (429, 500, 502, 503, 504):
            return TransientStoreError(f"{code} ({message})")
        return StoreError(f"{doing}: {code} ({message})")
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError, bex.CredentialRetrievalError)):
        return StoreError(f"no usable credentials for {store.location}: set AWS_ACCESS_KEY_ID and "
                          f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if isinstance(exc, bex.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return StoreError(f"{doing}: the TLS certificate of {store.endpoint} is not trusted")
    if isinstance(exc, (bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError,
                        urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
        return TransientStoreError(f"cannot reach {store.endpoint}: {exc}")
    return StoreError(f"{doing}: {exc}")


def _split_endpoint(url: str) -> tuple[str, str]:
    """`http(s)://[user:secret@]host[:port]/bucket/prefix` as its endpoint, without the user:secret@,
    and the path after it; UsageError if it is no such URL."""
    netloc = url.partition("://")[2].partition("/")[0]
    shown = url.replace(netloc, netloc.rpartition("@")[2], 1)
    try:
        parts = urlsplit(url)  # raises on an unclosed IPv6 bracket
    except ValueError:
        raise UsageError(f"s3:{shown}: the endpoint's host is malformed") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"s3:{shown}: the endpoint must be an http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        raise UsageError(f"s3:{shown}: the endpoint's port is not a number") from None
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}", parts.path


def _code(exc: bex.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_aws(endpoint: str) -> bool:
    host = urlsplit(endpoint).hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # botocore's order


def _endpoint_from_environment() -> str | None:
    """The endpoint the environment sets, if any; UsageError naming the variable if it is no
    http(s) URL with a host (botocore said only "Invalid endpoint", and it was taken for a
    failure of the bucket's store)."""
    for variable in _ENDPOINT_VARIABLES:
        value = os.environ.get(variable)
        if value:
            if not _is_endpoint_url(value):
                shown = value.rpartition("@")[2]  # never a user:secret@ of the URL
                raise UsageError(f'{variable} is not an endpoint URL: "{shown}" (give http(s)://HOST[:PORT])')
            return value
    return None


def _is_endpoint_url(value: str) -> bool:
    try:
        parts = urlsplit(value)  # raises on an unclosed IPv6 bracket
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _make_client(session: boto3.session.Session, endpoint_url: str | None, region: str | None,
                 max_connections: int, connect_timeout_s: float, read_timeout_s: float) -> Any:
    """A boto3 client with our pool size and timeouts, its own retries off, path-style unless on AWS."""
    endpoint_url = endpoint_url or _endpoint_from_environment()
    region = region or session.region_name or "us-east-1"

    def build(addressing: str) -> Any:
        # Payloads are not SHA-256 signed (botocore signs them on plain http unless told not to: a
        # second pass over every byte); a CRC32 of each upload still goes along, and every object is
        # checked against its content hash or AEAD tag when read. Responses are not checksummed again.
        config = botocore.config.Config(
            max_pool_connections=max_connections, connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s, retries={"total_max_attempts": 1, "mode": "standard"},
            request_checksum_calculation="when_supported", response_checksum_validation="when_required",
            s3={"addressing_style": addressing, "payload_signing_enabled": False})
        return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)

    if endpoint_url and not _is_aws(endpoint_url):
        return build("path")
    client = build("auto")
    if not _is_aws(client.meta.endpoint_url):  # the endpoint may also come from ~/.aws/config
        client.close()
        client = build("path")
    return client
