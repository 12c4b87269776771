"""The console's files over plain HTTP: where they are, their content types and cache headers, the
Content-Security-Policy on every /ui and /label response, 404s for stale versions and traversal, config.json,
and that the files ship as package data (importlib.resources) with the vendored library's recorded hashes."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import make_settings

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def _client(data_dir: Path, **overrides: object) -> Iterator[TestClient]:
    from alignd_server.embedded import create_app

    with TestClient(create_app(make_settings(data_dir, **overrides)), follow_redirects=False) as client:
        yield client


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    yield from _client(tmp_path / "alignd")


def _assert_secured(response: Any) -> None:  # httpx or the TestClient's own Response
    assert response.headers["content-security-policy"] == CSP, response.url
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"


def _asset_urls(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="(/ui/assets/[^"]+)"', page)


def test_console_page_and_assets(client: TestClient) -> None:
    redirect = client.get("/ui")
    assert redirect.status_code == 308 and redirect.headers["location"] == "/ui/"
    _assert_secured(redirect)

    page = client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-cache"
    _assert_secured(page)
    # Nothing inline for the CSP to refuse, and nothing from elsewhere.
    assert "<style" not in page.text and "style=" not in page.text and "http" not in page.text
    assert not re.search(r"<script(?![^>]*\bsrc=)", page.text)

    urls = _asset_urls(page.text)
    version = urls[0].split("/")[3]
    assert len(version) == 16 and all(url.startswith(f"/ui/assets/{version}/") for url in urls)
    types = {}
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert asset.headers["cache-control"] == "public, max-age=31536000, immutable"
        _assert_secured(asset)
        types[url.rsplit(".", 1)[-1]] = asset.headers["content-type"]
    assert types == {
        "svg": "image/svg+xml",
        "css": "text/css; charset=utf-8",
        "js": "text/javascript; charset=utf-8",
    }
    # The modules the entry point imports resolve inside the same version.
    uplot = client.get(f"/ui/assets/{version}/vendor/uplot/uPlot.esm.js")
    assert uplot.status_code == 200 and uplot.headers["content-type"] == "text/javascript; charset=utf-8"
    assert client.get(f"/ui/assets/{version}/console/js/views/job.js").status_code == 200


def test_stale_unknown_and_traversal_paths_are_404(client: TestClient) -> None:
    version = _asset_urls(client.get("/ui/").text)[0].split("/")[3]
    good = f"/ui/assets/{version}/console/app.css"
    assert client.get(good).status_code == 200
    for path in (
        "/ui/assets/0123456789abcdef/console/app.css",  # another release's version
        f"/ui/assets/{version}/console/nope.js",
        f"/ui/assets/{version}/console/index.html",  # the page is served at /ui/, not as an asset
        f"/ui/assets/{version}/vendor/VERSIONS.md",
        f"/ui/assets/{version}/vendor/uplot/LICENSE",
        f"/ui/assets/{version}/../console.py",
        f"/ui/assets/{version}/%2e%2e/%2e%2e/console.py",
        f"/ui/assets/{version}/..%2f..%2fconsole.py",
        f"/ui/assets/{version}//etc/passwd",
        "/ui/assets/../../api/console.py",
        "/ui/nothing-here",
    ):
        response = client.get(path)
        assert response.status_code == 404, (path, response.status_code)
        if response.url.path.startswith("/ui/"):  # httpx resolves a literal '..' before sending
            _assert_secured(response)


def test_label_page_is_the_static_file(client: TestClient) -> None:
    page = client.get("/label/fbs_anything")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    _assert_secured(page)
    assert "<style" not in page.text and "style=" not in page.text
    script = next(url for url in _asset_urls(page.text) if url.endswith("label.js"))
    body = client.get(script).text
    assert "/v1/feedback-sets/" in body and "sessionStorage" in body


def test_config_says_whether_a_key_is_needed(client: TestClient, tmp_path: Path) -> None:
    from service import __version__

    config = client.get("/ui/config.json")
    assert config.status_code == 200 and config.headers["cache-control"] == "no-store"
    assert config.json()["auth_required"] is True and config.json()["version"] == __version__
    _assert_secured(config)
    # Embedded single-tenant mode: no ALIGND_API_KEYS and no key in the database, so no key is asked.
    for open_client in _client(tmp_path / "open", api_keys=None):
        assert open_client.get("/ui/config.json").json()["auth_required"] is False
        assert open_client.get("/v1/jobs").status_code == 200


def test_static_files_ship_as_package_data() -> None:
    static = resources.files("service.api") / "static"
    for path in (
        "console/index.html",
        "console/app.css",
        "console/js/main.js",
        "label/index.html",
        "label/label.js",
        "vendor/uplot/LICENSE",
        "vendor/VERSIONS.md",
    ):
        assert (static / path).is_file(), path
    # Every vendored file is the one VERSIONS.md records.
    recorded = dict(
        re.findall(r"^\| (\S+) \| `([0-9a-f]{64})` \|$", (static / "vendor/VERSIONS.md").read_text(), re.M)
    )
    assert set(recorded) == {"uplot/uPlot.esm.js", "uplot/uPlot.min.css", "uplot/LICENSE"}
    for path, sha256 in recorded.items():
        assert hashlib.sha256((static / "vendor" / path).read_bytes()).hexdigest() == sha256, path


def test_every_static_file_matches_the_package_data_rules() -> None:
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[2]
    rules = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = rules["service.api"]
    package = root / "service" / "api"
    files = [p.relative_to(package).as_posix() for p in (package / "static").rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        # setuptools' globs: '*' never crosses a '/', so compare segment counts too.
        assert any(
            fnmatch.fnmatch(path, pattern) and path.count("/") == pattern.count("/") for pattern in patterns
        ), path
