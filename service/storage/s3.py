"""S3 (and S3-compatible: MinIO, Ceph RGW, R2, ...) as artifact store (production mode).

Semantics follow ``LocalStore``: puts are atomic (S3 publishes an object only when its PUT or
CompleteMultipartUpload succeeds, so readers never see a partial object), reads of an absent key raise
``KeyError``, deleting an absent key is fine. Every object carries its sha256 as user metadata
(``x-amz-meta-sha256``) and reads verify it. Anything that means "the store cannot be used right now"
(endpoint unreachable, timeouts, 5xx/throttling, missing bucket, bad credentials) becomes
``StorageUnavailable`` so the API answers 503 instead of 500.

Credentials come from the standard AWS chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles,
web identity / IRSA, instance metadata), never from code or settings.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from service.storage.base import CHUNK, StorageUnavailable

MiB = 1 << 20
SHA256_META = "sha256"  # sent as x-amz-meta-sha256; boto3 returns user metadata keys lower-cased
DELETE_BATCH = 1000  # DeleteObjects accepts at most 1000 keys per request
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4 presigned URLs cannot live longer than 7 days

# Error codes that mean "try again later" even when the HTTP status is not 5xx.
_RETRYABLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed"}
)
# Error codes that mean our credentials or permissions are wrong: the store is unusable until an
# operator fixes the configuration, which is a 503 (with a clear log line), not a 500.
_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "403",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


class ChecksumMismatch(RuntimeError):
    """An object's bytes do not match the sha256 stored with it (corruption or a tampered object)."""


def _client_config(endpoint_url: str | None) -> Any:
    extra: dict[str, Any] = {}
    if endpoint_url:
        # MinIO and most S3-compatible stores (and moto) only serve path-style URLs
        # (http://host/bucket/key); virtual-hosted style needs wildcard DNS they rarely have.
        extra["s3"] = {"addressing_style": "path"}
    return Config(
        # boto3 >= 1.36 sends CRC checksums (and aws-chunked bodies) on every PUT/UploadPart by default,
        # which many S3-compatible stores reject; only send them when the operation requires one.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
        # Presigned URLs must be SigV4: MinIO and every newer AWS region refuse SigV2.
        signature_version="s3v4",
        # Room for the transfer threads (TransferConfig.max_concurrency) plus concurrent API requests.
        max_pool_connections=32,
        **extra,
    )


def _clean_parts(value: str, *, what: str) -> tuple[str, ...]:
    """Split a key or prefix into safe path segments (the same rules as LocalStore._path)."""
    if value.startswith("/") or "\\" in value:
        raise ValueError(f"invalid storage {what} {value!r}")
    parts = PurePosixPath(value).parts
    if any(p in ("..", ".") for p in parts):
        raise ValueError(f"invalid storage {what} {value!r}")
    return parts


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class S3Store:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        *,
        client: Any | None = None,
        region_name: str | None = None,
        multipart_threshold: int = 8 * MiB,
        multipart_chunksize: int = 8 * MiB,
        max_concurrency: int = 8,
        presign_expiry: int = 3600,
        delete_batch_size: int = DELETE_BATCH,
        spool_dir: Path | None = None,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        if not 1 <= delete_batch_size <= DELETE_BATCH:
            raise ValueError(f"delete_batch_size must be in 1..{DELETE_BATCH}")
        self.bucket = bucket
        # "s3://bucket/a/b/" -> "a/b"; an empty prefix means the bucket root.
        self.prefix = "/".join(_clean_parts(prefix.strip("/"), what="prefix")) if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.presign_expiry = presign_expiry
        self.delete_batch_size = delete_batch_size
        self.spool_dir = spool_dir
        if client is None:
            # A private Session per store: boto3's default session is module-global state and creating
            # clients from it is not thread-safe. The client itself is thread-safe and shared.
            session = boto3.session.Session(region_name=region_name)
            client = session.client("s3", endpoint_url=endpoint_url, config=_client_config(endpoint_url))
        self.client = client
        # upload_file/upload_fileobj switch to a multipart upload above the threshold and read the source
        # part by part (never the whole object in memory); parts go up on max_concurrency threads.
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=True,
        )

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3Store(s3://{self.bucket}/{self.prefix}{where})"

    # -- keys and errors ---------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        parts = _clean_parts(key, what="key")
        if not parts:
            raise ValueError(f"invalid storage key {key!r}")
        rel = "/".join(parts)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    @property
    def _where(self) -> str:
        return self.endpoint_url or "AWS S3"

    def _map_error(self, exc: BaseException, action: str, key: str | None) -> BaseException | None:
        """The exception callers should see for a botocore error, or None to let it propagate as is."""
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code == "NoSuchBucket":
                # Not a missing key: the deployment is wrong. Must not turn into a 404 for the object.
                return StorageUnavailable(f"S3 bucket {self.bucket!r} does not exist at {self._where}")
            if code in _NOT_FOUND_CODES and key is not None:
                return KeyError(key)
            if status >= 500 or code in _RETRYABLE_CODES:
                return StorageUnavailable(
                    f"S3 {action} failed at {self._where}: {code or 'error'} (HTTP {status})"
                )
            if status == 403 or code in _AUTH_CODES:
                return StorageUnavailable(
                    f"S3 refused {action} on bucket {self.bucket!r} at {self._where}: {code} "
                    "(check the AWS credentials and the bucket policy)"
                )
            return None
        if isinstance(exc, BotoConnectionError | HTTPClientError):
            # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError, ...
            return StorageUnavailable(f"S3 endpoint {self._where} unreachable during {action}: {exc}")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
            return StorageUnavailable(
                f"no usable S3 credentials for {action}: {exc} (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, a profile, or a workload identity)"
            )
        return None

    @contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except S3UploadFailedError as exc:
            # boto3's transfer manager re-raises a failed upload's ClientError as a message-only
            # exception (inside its except block, so the original is __context__, not __cause__).
            cause = exc.__cause__ or exc.__context__
            mapped = self._map_error(cause, action, key) if cause is not None else None
            if mapped is None:
                raise
            raise mapped from exc
        except (ClientError, BotoCoreError) as exc:
            mapped = self._map_error(exc, action, key)
            if mapped is None:
                raise
            raise mapped from exc

    def _stored_sha256(self, response: dict[str, Any]) -> str | None:
        value = response.get("Metadata", {}).get(SHA256_META)
        return str(value).lower() if value else None

    # -- writes ------------------------------------------------------------------------------------

    def put_file(self, key: str, path: Path) -> int:
        # The sha256 must be known before the upload starts: S3 user metadata is fixed at PutObject /
        # CreateMultipartUpload time. So the file is read twice, once here to hash it and once by the
        # transfer manager to upload it. The extra pass is sequential local I/O plus sha256 (~0.6-2 GB/s
        # depending on the CPU), small next to uploading over a network, and it keeps the upload itself
        # parallel and resumable part by part. Callers must not modify the file while it is stored.
        full = self._key(key)
        digest, size = _sha256_file(path)
        with self._errors("upload", key):
            self.client.upload_file(
                str(path),
                self.bucket,
                full,
                ExtraArgs={"Metadata": {SHA256_META: digest}},
                Config=self.transfer_config,
            )
        return size

    def put_stream(self, key: str, stream: BinaryIO) -> int:
        # A stream can be read only once, and the checksum metadata has to be sent with
        # CreateMultipartUpload, before the first part. Options were: (a) spool to a temporary file while
        # hashing, then upload with the metadata; (b) upload first and store the checksum in a sidecar
        # object or with a server-side copy afterwards. (b) leaves a window where the object exists
        # without (or with a stale) checksum, and the copy is limited to 5 GB per CopyObject. (a) is the
        # simplest correct option: it costs local scratch space equal to the object (in memory below
        # the multipart threshold, on disk in spool_dir above it) and one local write+read.
        full = self._key(key)
        digest = hashlib.sha256()
        size = 0
        with tempfile.SpooledTemporaryFile(
            max_size=self.transfer_config.multipart_threshold,
            dir=None if self.spool_dir is None else str(self.spool_dir),
        ) as spool:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
                spool.write(chunk)
                size += len(chunk)
            spool.seek(0)
            with self._errors("upload", key):
                self.client.upload_fileobj(
                    spool,
                    self.bucket,
                    full,
                    ExtraArgs={"Metadata": {SHA256_META: digest.hexdigest()}},
                    Config=self.transfer_config,
                )
        return size

    # -- reads -------------------------------------------------------------------------------------

    def _get(self, key: str) -> dict[str, Any]:
        with self._errors("download", key):
            response: dict[str, Any] = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        return response

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        # The GET is issued now, so an absent key raises KeyError at call time (as LocalStore does) and
        # the API can still answer 404 before it starts a streaming response.
        response = self._get(key)
        body = response["Body"]
        expected = self._stored_sha256(response)

        def generate() -> Iterator[bytes]:
            digest = hashlib.sha256()
            # The last chunk is held back until the checksum is verified: on a mismatch the consumer
            # (an HTTP response with a Content-Length) ends short and the client sees a failed transfer
            # instead of complete-looking corrupt bytes.
            pending: bytes | None = None
            try:
                with self._errors("download", key):
                    for chunk in body.iter_chunks(chunk_size):
                        digest.update(chunk)
                        if pending is not None:
                            yield pending
                        pending = chunk
            finally:
                body.close()
            if expected is not None and digest.hexdigest() != expected:
                raise ChecksumMismatch(
                    f"s3://{self.bucket}/{self._key(key)}: sha256 {digest.hexdigest()} != stored {expected}"
                )
            if pending is not None:
                yield pending

        return generate()

    def get_to_path(self, key: str, dest: Path) -> None:
        # One streaming GET, hashed while it is written to dest.part: the metadata and the bytes come
        # from the same response (no HEAD-then-GET race with a concurrent overwrite), and the file is
        # read once. The checksum is verified *before* the rename, so dest never holds corrupt bytes
        # and a mismatch leaves no file behind. (A single stream trades the parallel ranged GETs of
        # download_file for that consistency; artifacts here are adapters and datasets, not terabytes.)
        response = self._get(key)
        body = response["Body"]
        expected = self._stored_sha256(response)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as handle, self._errors("download", key):
                for chunk in body.iter_chunks(CHUNK):
                    digest.update(chunk)
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            if expected is not None and digest.hexdigest() != expected:
                raise ChecksumMismatch(
                    f"s3://{self.bucket}/{self._key(key)}: downloaded bytes have sha256 "
                    f"{digest.hexdigest()} but the object's stored sha256 is {expected}"
                )
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            body.close()

    def _head(self, key: str) -> dict[str, Any]:
        with self._errors("head", key):
            response: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        return response

    def exists(self, key: str) -> bool:
        # Note: HEAD responses have no body, so a missing bucket also reads as 404 here; ping() is
        # what tells a missing bucket apart (and /readyz calls it).
        try:
            self._head(key)
        except KeyError:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def sha256(self, key: str) -> str | None:
        """The sha256 stored with the object (None for objects written by other tools)."""
        return self._stored_sha256(self._head(key))

    # -- deletes -----------------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            # DeleteObject on an absent key succeeds (204), which is the semantics we want.
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list_keys(self, prefix: str) -> list[str]:
        stem = self._key(prefix.rstrip("/")) + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        with self._errors("list", prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=stem):
                keys.extend(item["Key"][strip:] for item in page.get("Contents", []))
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> None:
        # Like LocalStore: "models/x/" removes everything below models/x/ and a plain object models/x,
        # never siblings such as models/xy. An empty prefix is refused rather than wiping the store.
        stem = self._key(prefix.rstrip("/"))
        batch: list[dict[str, str]] = []
        with self._errors("delete-prefix"):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=stem + "/"):
                for item in page.get("Contents", []):
                    batch.append({"Key": item["Key"]})
                    if len(batch) >= self.delete_batch_size:
                        self._delete_batch(batch)
                        batch = []
            batch.append({"Key": stem})  # the plain object, if any (absent keys are not errors)
            self._delete_batch(batch)

    def _delete_batch(self, objects: list[dict[str, str]]) -> None:
        # Deleting while paginating is safe: ListObjectsV2 continues after the last key it returned.
        response = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
        errors = response.get("Errors") or []
        if errors:
            first = errors[0]
            raise StorageUnavailable(
                f"S3 could not delete {len(errors)} object(s) in {self.bucket!r}, e.g. "
                f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
            )

    # -- URLs, local paths, health -----------------------------------------------------------------

    def presigned_url(self, key: str, *, expires_in: int | None = None) -> str | None:
        # Signed locally (no request is made): the URL points at endpoint_url, which clients must be
        # able to reach. Whether the object exists is checked by S3 when the client follows it.
        seconds = self.presign_expiry if expires_in is None else expires_in
        if not 1 <= seconds <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"expires_in must be between 1 and {MAX_PRESIGN_SECONDS} seconds")
        with self._errors("presign", key):
            url: str = self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=seconds
            )
        return url

    def local_path(self, key: str) -> Path | None:
        return None

    def ping(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageUnavailable(
                    f"S3 bucket {self.bucket!r} does not exist at {self._where}"
                ) from exc
            mapped = self._map_error(exc, "ping", None)
            raise (mapped or StorageUnavailable(f"S3 ping failed at {self._where}: {exc}")) from exc
        except BotoCoreError as exc:
            mapped = self._map_error(exc, "ping", None)
            raise (mapped or StorageUnavailable(f"S3 ping failed at {self._where}: {exc}")) from exc
