"""Under CI=true a missing PostgreSQL, Redis, helm, hadolint or Chromium fails the run instead of skipping.

tests/conftest.require_or_skip is the one place those skips go through; the Makefile's chromium target does
the same for the browser install."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_or_skip

REPO = Path(__file__).resolve().parents[2]
# What the README says `make test` runs against; a skip for one of these must go through require_or_skip.
CLAIMED = re.compile(r"postgres|redis|helm|hadolint|chromium|playwright", re.IGNORECASE)


def test_require_or_skip_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in (None, "false", ""):
        if value is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.skip.Exception, match="redis-server is not installed"):
            require_or_skip("redis-server is not installed")


def test_require_or_skip_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true and redis-server is not installed"):
        require_or_skip("redis-server is not installed")


def _pytest_without_redis(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    """A test that needs the redis_server fixture, run with a PATH where no redis-server can be found."""
    (tmp_path / "test_needs_redis.py").write_text(
        "from tests.conftest import redis_server  # noqa: F401  (the fixture under test)\n\n\n"
        "def test_needs_redis(redis_server):\n"
        "    assert redis_server.client().ping()\n"
    )
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env.update(PATH=str(empty_bin), PYTHONPATH=str(REPO))
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_missing_redis_server_skips_locally(tmp_path: Path) -> None:
    proc = _pytest_without_redis(tmp_path, ci=None)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 skipped" in proc.stdout


def test_a_missing_redis_server_fails_under_ci(tmp_path: Path) -> None:
    proc = _pytest_without_redis(tmp_path, ci="true")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 error" in proc.stdout or "1 failed" in proc.stdout, proc.stdout
    assert "CI=true and redis-server is not installed" in proc.stdout


def _make_chromium(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    """`make chromium` where neither chromium nor apt-get can be found."""
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is not installed: `make test` itself needs it")
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [make, "-s", "-C", str(REPO), "chromium"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_make_chromium_only_warns_outside_ci(tmp_path: Path) -> None:
    proc = _make_chromium(tmp_path, ci=None)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the browser tests (labeling page, console) will skip" in proc.stdout


def test_make_chromium_fails_under_ci(tmp_path: Path) -> None:
    proc = _make_chromium(tmp_path, ci="true")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "chromium unavailable and CI=true" in proc.stderr


def test_no_test_skips_a_claimed_dependency_by_itself() -> None:
    """A direct skip naming one of these would bypass the CI rule; such skips go through the helper."""
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"pytest\.skip\(|skipif\(", line) and CLAIMED.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []
