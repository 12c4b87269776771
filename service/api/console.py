"""The web console (``/ui/``) and the files behind it and the labeling page: ``service/api/static/``.

The static folder ships as package data of the server distribution (pyproject.toml). Its files are read once,
when the app is built, into memory (about 300 KB), and a content hash of all of them names the asset version:
``/ui/assets/<version>/<path>``. An asset URL therefore never changes meaning, so it is served as immutable
for a year; the HTML pages that name the version (``/ui/``, ``/label/{id}``) are ``no-cache`` and a new
release's pages name new URLs. A path is looked up in that in-memory table only, never on disk, so no path can
reach outside the folder.

Every ``/ui`` and ``/label`` response (404s included) carries a Content-Security-Policy that allows nothing
from another origin, nor inline script or style (:class:`ConsoleHeaders`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import PurePosixPath

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.api.deps import get_context_of
from service.core.errors import NotFoundError

ASSET_PREFIX = "/ui/assets"
# Replaced in the HTML pages by /ui/assets/<version>, so that they name this release's files.
ASSET_ROOT_MARKER = "{{ASSET_ROOT}}"
CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
}
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)
IMMUTABLE = "public, max-age=31536000, immutable"


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str


class ConsoleFiles:
    """The static folder, read once: the assets by relative path, the HTML pages, and their version hash."""

    def __init__(self, root: Traversable | None = None) -> None:
        root = root if root is not None else resources.files("service.api") / "static"
        files = dict(sorted(_walk(root, "")))
        digest = hashlib.sha256()
        for path, body in files.items():
            digest.update(path.encode() + b"\0" + hashlib.sha256(body).digest())
        self.version = digest.hexdigest()[:16]
        self.asset_root = f"{ASSET_PREFIX}/{self.version}"
        # Only files of a known type are assets: the HTML pages are served at their own URLs, and the
        # licence texts and VERSIONS.md stay in the package, not on the wire.
        self.assets = {
            path: Asset(body, CONTENT_TYPES[PurePosixPath(path).suffix])
            for path, body in files.items()
            if PurePosixPath(path).suffix in CONTENT_TYPES
        }
        self.console_page = self._page(files, "console/index.html")
        self.label_page = self._page(files, "label/index.html")

    def _page(self, files: dict[str, bytes], path: str) -> bytes:
        return files[path].replace(ASSET_ROOT_MARKER.encode(), self.asset_root.encode())

    def asset(self, version: str, path: str) -> Asset:
        found = self.assets.get(path) if version == self.version else None
        if found is None:
            # A stale version too: its bytes are gone, and serving today's under its name would break the
            # promise that an immutable URL never changes.
            raise NotFoundError(f"No console asset '{path}' in version '{version}'.", code="asset_not_found")
        return found


def _walk(folder: Traversable, prefix: str) -> list[tuple[str, bytes]]:
    found: list[tuple[str, bytes]] = []
    for entry in folder.iterdir():
        if entry.name.startswith(".") or entry.name == "__pycache__":
            continue
        path = f"{prefix}{entry.name}"
        if entry.is_dir():
            found.extend(_walk(entry, path + "/"))
        else:
            found.append((path, entry.read_bytes()))
    return found


def html(body: bytes) -> Response:
    # no-cache (revalidate each time), not no-store: the page is small, and it must name the current assets.
    return Response(body, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})


def console_router(static: ConsoleFiles) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/ui")
    def console_root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=308)

    @router.get("/ui/")
    def console_page() -> Response:
        return html(static.console_page)

    @router.get("/ui/config.json")
    async def console_config(request: Request) -> Response:
        # Public, like the page itself: whether the console must ask for a key. Keys come from ALIGND_API_KEYS
        # or the database (alignd-server keys); with neither, every caller is the single default tenant.
        ctx = get_context_of(request)
        auth = bool(ctx.tenant_keys) or (ctx.api_keys is not None and await ctx.api_keys.any())
        body = {"auth_required": auth, "version": __version__, "asset_version": static.version}
        return Response(
            json.dumps(body), media_type="application/json", headers={"Cache-Control": "no-store"}
        )

    @router.get(ASSET_PREFIX + "/{version}/{path:path}")
    def console_asset(version: str, path: str) -> Response:
        asset = static.asset(version, path)
        return Response(asset.body, media_type=asset.content_type, headers={"Cache-Control": IMMUTABLE})

    @router.get("/ui/{rest:path}")
    def console_not_found(rest: str) -> Response:
        # Everything else under /ui/ is a 404 here, not a redirect: the console routes in the URL's #fragment.
        raise NotFoundError(f"Nothing at /ui/{rest[:200]}; the console is at /ui/.", code="not_found")

    return router


class ConsoleHeaders:
    """Pure ASGI middleware: the security headers on every ``/ui`` and ``/label/`` response, errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == "/ui" or path.startswith(("/ui/", "/label/"))):
            await self.app(scope, receive, send)
            return

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in SECURITY_HEADERS}
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message["headers"] = [*kept, *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_secured)
