"""What the sync and the async client share: configuration, request building, response parsing."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import pydantic

from alignd._errors import APIResponseValidationError, make_status_error
from alignd._retry import new_idempotency_key
from alignd._version import __version__

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
DEFAULT_MAX_RETRIES = 2
MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

T = TypeVar("T", bound=pydantic.BaseModel)

# One multipart part, as httpx takes it: (field name, (file name, open binary file, content type)).
FilePart = tuple[str, tuple[str, IO[bytes], str]]
# Opens the files of an upload afresh: called once per attempt so a retry re-sends every byte.
FilesFactory = Callable[[], list[FilePart]]
# The types of a resource method's per-call ``extra_headers``, ``extra_query`` and ``extra_body``.
Headers = Mapping[str, str]
Query = Mapping[str, Any]
Body = Mapping[str, Any]


@dataclass(frozen=True)
class RequestExtras:
    """One call's ``extra_headers``/``extra_query``/``extra_body``/``timeout``, applied to each request it makes.

    Headers are merged over everything the client sets, the query over the method's params, the body over
    its JSON body (or, for a multipart upload, its form fields); ``timeout`` replaces the method's or the
    client's for this call. Applied in one place, :meth:`BaseClient._build_request`.
    """

    headers: Headers | None = None
    query: Query | None = None
    body: Body | None = None
    timeout: float | httpx.Timeout | None = None

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments that hand these to another resource method (``wait`` calls ``get``)."""
        return {
            "extra_headers": self.headers,
            "extra_query": self.query,
            "extra_body": self.body,
            "timeout": self.timeout,
        }


NO_EXTRAS = RequestExtras()


@dataclass
class RequestOptions:
    method: str
    path: str
    params: Mapping[str, Any] | None = None
    json: Any = None
    data: Mapping[str, Any] | None = None
    files: FilesFactory | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float | httpx.Timeout | None = None
    max_retries: int | None = None
    idempotency_key: str | None = None
    follow_redirects: bool = False
    extras: RequestExtras = NO_EXTRAS


def resolve_timeout(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(float(timeout), connect=min(10.0, float(timeout)))


class BaseClient:
    """Configuration and pure helpers; no I/O here."""

    base_url: str
    api_key: str | None
    timeout: httpx.Timeout
    max_retries: int

    def __init__(
        self,
        *,
        base_url: str | None,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int,
        default_headers: Mapping[str, str] | None,
    ) -> None:
        if base_url is None:
            base_url = os.environ.get("ALIGND_BASE_URL") or DEFAULT_BASE_URL
        if api_key is None:
            api_key = os.environ.get("ALIGND_API_KEY") or None
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = resolve_timeout(timeout)
        self.max_retries = max_retries
        self._default_headers = dict(default_headers or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    # -- request building -------------------------------------------------------------------------

    def _headers(self, opts: RequestOptions, idempotency_key: str | None) -> dict[str, str]:
        headers = {
            "User-Agent": f"alignd-python/{__version__} python/{platform.python_version()}",
            "Accept": "application/json",
            **self._default_headers,
        }
        # Authorization goes on each API request, never into the httpx client's defaults, so a redirect
        # to another host (a presigned storage URL) can never carry the key.
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        headers.update(opts.headers)
        headers.update(opts.extras.headers or {})
        return headers

    def _idempotency_key(self, opts: RequestOptions) -> str | None:
        """One key per logical call, reused by each of its retries. Every POST carries one."""
        if opts.idempotency_key is not None:
            return opts.idempotency_key
        if opts.method.upper() == "POST":
            return new_idempotency_key()
        return None

    def _build_request(
        self, http: httpx.Client | httpx.AsyncClient, opts: RequestOptions, idempotency_key: str | None
    ) -> tuple[httpx.Request, list[IO[bytes]]]:
        """Build one attempt's request; returns the files it opened so the caller closes them."""
        opened: list[IO[bytes]] = []
        files: list[FilePart] | None = None
        if opts.files is not None:
            files = opts.files()
            opened = [part[1][1] for part in files]
        extras = opts.extras
        timeout = extras.timeout if extras.timeout is not None else opts.timeout
        json, data = _request_body(opts)
        try:
            request = http.build_request(
                opts.method,
                self.base_url + opts.path,
                params=_clean_params({**(opts.params or {}), **(extras.query or {})}),
                json=json,
                data=data,
                files=files,
                headers=self._headers(opts, idempotency_key),
                timeout=resolve_timeout(timeout) if timeout is not None else self.timeout,
            )
        except BaseException:
            close_all(opened)
            raise
        return request, opened

    def _redirect_request(self, response: httpx.Response) -> httpx.Request | None:
        """The request to follow a redirect with, or None when it is not one we follow.

        Same origin: the original headers. Any other origin (a presigned URL): no Authorization and no
        Idempotency-Key; the URL carries its own credentials.
        """
        if response.status_code not in REDIRECT_STATUSES or "location" not in response.headers:
            return None
        original = response.request
        target = original.url.join(response.headers["location"])
        same_origin = (target.scheme, target.host, target.port) == (
            original.url.scheme,
            original.url.host,
            original.url.port,
        )
        headers = httpx.Headers(original.headers)
        headers.pop("host", None)
        if not same_origin:
            for name in ("authorization", "idempotency-key", "cookie"):
                headers.pop(name, None)
        method = original.method if response.status_code in (307, 308) else "GET"
        return httpx.Request(
            method, target, headers=headers, extensions={"timeout": original.extensions.get("timeout")}
        )

    # -- response parsing -------------------------------------------------------------------------

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise APIResponseValidationError(
                f"Expected JSON from {response.request.method} {response.request.url.path}, got "
                f"{response.headers.get('content-type', 'no content type')}",
                response=response,
            ) from exc

    @classmethod
    def _parse(cls, response: httpx.Response, model: type[T]) -> T:
        body = cls._json(response)
        try:
            return model.model_validate(body)
        except pydantic.ValidationError as exc:
            raise APIResponseValidationError(
                f"Unexpected {model.__name__} from {response.request.url.path}: {exc}", response=response
            ) from exc

    @classmethod
    def _parse_list(cls, response: httpx.Response, model: type[T]) -> tuple[list[T], bool]:
        body = cls._json(response)
        raw = body.get("data") if isinstance(body, dict) else body
        if not isinstance(raw, list):
            raise APIResponseValidationError(
                f"Expected a list envelope from {response.request.url.path}", response=response
            )
        try:
            items = [model.model_validate(item) for item in raw]
        except pydantic.ValidationError as exc:
            raise APIResponseValidationError(
                f"Unexpected {model.__name__} in list from {response.request.url.path}: {exc}",
                response=response,
            ) from exc
        has_more = bool(body.get("has_more", False)) if isinstance(body, dict) else False
        return items, has_more

    @staticmethod
    def _raise_for_status(response: httpx.Response) -> None:
        if response.status_code >= 400:
            raise make_status_error(response)


def _clean_params(params: Mapping[str, Any]) -> dict[str, Any] | None:
    cleaned = {k: v for k, v in params.items() if v is not None}
    return cleaned or None


def _request_body(opts: RequestOptions) -> tuple[Any, dict[str, Any] | None]:
    """The (JSON body, form fields) to send, with the call's ``extra_body`` merged into whichever it has."""
    extra = opts.extras.body
    data = dict(opts.data) if opts.data is not None else None
    if extra is None:
        return opts.json, data
    if opts.files is not None or data is not None:
        return opts.json, {**(data or {}), **extra}
    if opts.json is None:
        return dict(extra), None
    if not isinstance(opts.json, Mapping):
        raise TypeError(f"extra_body needs a JSON object body; {opts.method} {opts.path} sends a list")
    return {**opts.json, **extra}, None


def close_all(files: Sequence[IO[bytes]]) -> None:
    for handle in files:
        with contextlib.suppress(Exception):
            handle.close()


def path_id(value: str) -> str:
    """Refuse ids that would change the URL path (``/``, ``..``, empty)."""
    if not value or "/" in value or value in (".", "..") or "?" in value or "#" in value:
        raise ValueError(f"invalid id: {value!r}")
    return value


def model_folder_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The files to upload for a Hugging Face model folder: its top-level regular files, sorted.

    Hidden files (``.gitattributes``...) and sub-folders are left out; the server decides what it accepts
    (it refuses pickled weights with 422 ``unsafe_weights``).
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"not a model folder: {root}")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no files in model folder {root}")
    return files


def model_files_factory(paths: Sequence[Path]) -> FilesFactory:
    def open_parts() -> list[FilePart]:
        parts: list[FilePart] = []
        try:
            for p in paths:
                parts.append(("files", (p.name, p.open("rb"), "application/octet-stream")))
        except BaseException:
            close_all([part[1][1] for part in parts])
            raise
        return parts

    return open_parts


def dataset_file_factory(path: Path) -> FilesFactory:
    if not path.is_file():
        raise FileNotFoundError(f"no such dataset file: {path}")

    def open_parts() -> list[FilePart]:
        return [("file", (path.name, path.open("rb"), "application/x-ndjson"))]

    return open_parts


def job_body(
    *,
    method: str,
    base_model: str,
    datasets: Mapping[str, str] | None,
    init_adapter: str | None,
    reward_model: str | None,
    init_reward_model: str | None,
    round: int | None,
    lora: Mapping[str, Any] | None,
    hyperparameters: Mapping[str, Any] | None,
    seed: int | None,
    name: str | None,
    evaluation: Mapping[str, Any] | None = None,
    resources: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``POST /v1/jobs`` body (the server's JobCreate): the fields given, none sent as null."""
    body: dict[str, Any] = {"method": method, "base_model": base_model, "datasets": dict(datasets or {})}
    optional = {
        "init_adapter": init_adapter,
        "reward_model": reward_model,
        "init_reward_model": init_reward_model,
        "round": round,
        "lora": dict(lora) if lora is not None else None,
        "hyperparameters": dict(hyperparameters) if hyperparameters is not None else None,
        "seed": seed,
        "name": name,
        "evaluation": dict(evaluation) if evaluation is not None else None,
        "resources": dict(resources) if resources is not None else None,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    return body
