"""``/v1/artifacts``: metadata, and a download that streams to disk, checks sha256 and extracts safely."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import tempfile
import time
from pathlib import Path

import httpx

from alignd._archive import (
    CHUNK,
    Sha256Writer,
    check_destination,
    download_cap,
    safe_extract,
    verify_sha256,
)
from alignd._base import Body, Headers, Query, RequestExtras, RequestOptions, path_id
from alignd._errors import APIConnectionError
from alignd._retry import backoff_delay
from alignd.resources._resource import AsyncResource, SyncResource
from alignd.types import Artifact

DOWNLOAD_TIMEOUT = httpx.Timeout(connect=10.0, read=120.0, write=60.0, pool=30.0)


def _content_options(artifact_id: str, extras: RequestExtras) -> RequestOptions:
    # follow_redirects: a 307 to a presigned storage URL is followed without our Authorization header.
    return RequestOptions(
        "GET",
        f"/v1/artifacts/{path_id(artifact_id)}/content",
        headers={"Accept": "application/gzip, application/x-tar, application/octet-stream, */*"},
        timeout=DOWNLOAD_TIMEOUT,
        follow_redirects=True,
        extras=extras,
    )


def _prepare(artifact_id: str, dest: str | os.PathLike[str] | None) -> tuple[Path, str]:
    dest_path = Path(dest) if dest is not None else Path.cwd() / artifact_id
    check_destination(dest_path)  # refused before a byte is downloaded
    parent = dest_path.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{artifact_id}.", suffix=".tar.gz.part", dir=parent)
    os.close(fd)
    return dest_path, tmp


def _finish(
    artifact: Artifact,
    tmp: str,
    writer: Sha256Writer,
    dest: Path,
    max_member_bytes: int | None,
    max_total_bytes: int | None,
) -> Path:
    verify_sha256(writer.hexdigest(), artifact.sha256, what=f"artifact {artifact.id}")
    return safe_extract(tmp, dest, max_member_bytes=max_member_bytes, max_total_bytes=max_total_bytes)


class Artifacts(SyncResource):
    def get(
        self,
        artifact_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Artifact:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = self._client._get(f"/v1/artifacts/{path_id(artifact_id)}", extras=extras)
        return self._client._parse(response, Artifact)

    retrieve = get

    def list(
        self,
        job_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> builtins.list[Artifact]:
        """The artifacts of one job."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        return self._client.jobs.artifacts(job_id, **extras.as_kwargs())

    def download(
        self,
        artifact_id: str,
        dest: str | os.PathLike[str] | None = None,
        *,
        max_member_bytes: int | None = None,
        max_total_bytes: int | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Path:
        """Download an artifact's ``.tar.gz``, verify its sha256, extract it into ``dest``; return ``dest``.

        The archive is streamed to a temporary file next to ``dest`` (never held in memory), checked against
        the artifact's ``sha256`` (IntegrityError on mismatch) and extracted all-or-nothing into a temporary
        folder renamed to ``dest`` (UnsafeArchiveError for links, absolute paths, ``..``, devices, corrupt
        data or sizes over the caps). ``max_total_bytes`` defaults to max(64 MiB, 20 x the archive's size),
        at most 64 GiB; ``max_member_bytes`` to the total cap. ``dest`` defaults to ``./<artifact id>`` and
        must be absent or an empty folder (DestinationExistsError). A connection lost mid-download restarts
        it (``max_retries``).
        ``timeout`` replaces the download's own (120 s between reads); the extras go on both requests.
        """
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        artifact = self.get(artifact_id, **extras.as_kwargs())
        dest_path, tmp = _prepare(artifact_id, dest)
        try:
            attempt = 0
            while True:
                try:
                    opts = _content_options(artifact_id, extras)
                    with open(tmp, "wb") as out, self._client.stream(opts) as response:
                        writer = Sha256Writer(out, max_bytes=download_cap(max_total_bytes))
                        for chunk in response.iter_bytes(CHUNK):
                            writer.write(chunk)
                    break
                except httpx.TransportError as exc:
                    if attempt >= self._client.max_retries:
                        raise APIConnectionError(f"Download of {artifact_id} broke off: {exc}") from exc
                    time.sleep(backoff_delay(attempt))
                    attempt += 1
            return _finish(artifact, tmp, writer, dest_path, max_member_bytes, max_total_bytes)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


class AsyncArtifacts(AsyncResource):
    async def get(
        self,
        artifact_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Artifact:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = await self._client._get(f"/v1/artifacts/{path_id(artifact_id)}", extras=extras)
        return self._client._parse(response, Artifact)

    retrieve = get

    async def list(
        self,
        job_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> builtins.list[Artifact]:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        return await self._client.jobs.artifacts(job_id, **extras.as_kwargs())

    async def download(
        self,
        artifact_id: str,
        dest: str | os.PathLike[str] | None = None,
        *,
        max_member_bytes: int | None = None,
        max_total_bytes: int | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Path:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        artifact = await self.get(artifact_id, **extras.as_kwargs())
        dest_path, tmp = _prepare(artifact_id, dest)
        try:
            attempt = 0
            while True:
                try:
                    with open(tmp, "wb") as out:
                        async with self._client.stream(_content_options(artifact_id, extras)) as response:
                            writer = Sha256Writer(out, max_bytes=download_cap(max_total_bytes))
                            async for chunk in response.aiter_bytes(CHUNK):
                                writer.write(chunk)
                    break
                except httpx.TransportError as exc:
                    if attempt >= self._client.max_retries:
                        raise APIConnectionError(f"Download of {artifact_id} broke off: {exc}") from exc
                    await asyncio.sleep(backoff_delay(attempt))
                    attempt += 1
            return await asyncio.to_thread(
                _finish, artifact, tmp, writer, dest_path, max_member_bytes, max_total_bytes
            )
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
