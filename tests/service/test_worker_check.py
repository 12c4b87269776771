"""`alignd-server worker --check`, the worker readiness probe of the Helm chart, run as a real process.

What it checks (alignd_server/cli.py, workers/tasks.check_health): Redis answers, and arq's health-check key
`alignd:queue:<method>:health-check` exists for every served method. arq refreshes that key every 30 s with
a 31 s expiry, and every worker serving a method writes the same key, so the check reports on the pool of
workers behind those queues, not on the process that runs it; the tests below show both sides of that.

The shared Redis at 127.0.0.1:6379 is only read (EXISTS); a worker is only ever started against a private
redis-server (tests/conftest.py), never against the shared one, where it could take other tests' jobs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import RedisServer, free_port, require_or_skip

REPO = Path(__file__).resolve().parents[2]
SHARED_REDIS = ("127.0.0.1", 6379)
HEALTHY = "healthy"
UNHEALTHY = "no recent health check from a worker on every served queue"


def _env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    env.update(
        ALIGND_QUEUE="arq",
        ALIGND_DATA_DIR=str(tmp_path / "data"),
        ALIGND_WORKER_METRICS_PORT="0",
        HF_HUB_OFFLINE="1",
    )
    env.update(overrides)
    return env


def check(tmp_path: Path, timeout: float = 30, **overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alignd_server.cli", "worker", "--check"],
        cwd=REPO,
        env=_env(tmp_path, **overrides),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------- shared Redis


def test_check_against_the_shared_redis_answers_healthy_or_unhealthy(tmp_path: Path) -> None:
    if not _reachable(*SHARED_REDIS):
        require_or_skip("no Redis at 127.0.0.1:6379")
    started = time.monotonic()
    proc = check(tmp_path, ALIGND_REDIS_URL="redis://127.0.0.1:6379/0")
    elapsed = time.monotonic() - started
    # Redis answered: either some worker (another session's) polls every queue, or not; never a crash.
    assert proc.stdout.strip() in (HEALTHY, UNHEALTHY), proc.stdout + proc.stderr
    assert proc.returncode == (0 if proc.stdout.strip() == HEALTHY else 1)
    assert "Traceback" not in proc.stderr
    assert elapsed < 15, f"the probe took {elapsed:.1f} s (the chart gives it 15)"


def test_check_of_a_method_nobody_serves_fails_on_the_shared_redis(tmp_path: Path) -> None:
    """Read-only too: a database index nobody uses (EXISTS on an absent key) -> 1 with the clear message."""
    if not _reachable(*SHARED_REDIS):
        require_or_skip("no Redis at 127.0.0.1:6379")
    proc = check(tmp_path, ALIGND_REDIS_URL="redis://127.0.0.1:6379/15", ALIGND_WORKER_METHODS="generate")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.strip() == UNHEALTHY


# ------------------------------------------------------------------------------------------- closed port


def _closed_port() -> int:
    port = free_port()
    assert not _reachable("127.0.0.1", port)
    return port


def test_check_against_a_closed_port_fails_fast_naming_the_address(tmp_path: Path) -> None:
    port = _closed_port()
    started = time.monotonic()
    proc = check(tmp_path, ALIGND_REDIS_URL=f"redis://:s3cret-pw@127.0.0.1:{port}/0")
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert proc.stdout.strip() != HEALTHY
    last = proc.stderr.strip().splitlines()[-1]
    assert f"127.0.0.1:{port}" in last and "connect" in last.lower(), proc.stderr
    assert "s3cret-pw" not in proc.stdout + proc.stderr  # the URL's password never shows
    assert elapsed < 15


def test_check_against_a_closed_port_prints_one_line_not_a_traceback(tmp_path: Path) -> None:
    port = _closed_port()
    proc = check(tmp_path, ALIGND_REDIS_URL=f"redis://:secret@127.0.0.1:{port}/0")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert f"redis unreachable at 127.0.0.1:{port}" in proc.stderr
    assert "secret" not in proc.stderr


def test_check_refuses_misconfiguration_with_exit_2(tmp_path: Path) -> None:
    port = _closed_port()  # never contacted: both are refused before Redis is touched
    inline = check(tmp_path, ALIGND_QUEUE="inline", ALIGND_REDIS_URL=f"redis://127.0.0.1:{port}/0")
    assert inline.returncode == 2 and "ALIGND_QUEUE=arq" in inline.stderr
    unknown = check(
        tmp_path, ALIGND_REDIS_URL=f"redis://127.0.0.1:{port}/0", ALIGND_WORKER_METHODS="sft,bogus"
    )
    assert unknown.returncode == 2 and "bogus" in unknown.stderr


# ------------------------------------------------------------------------------------------- a real worker


@pytest.fixture
def start_worker(tmp_path: Path, redis_server: RedisServer) -> Iterator[Callable[[], subprocess.Popen[str]]]:
    """Starts `alignd-server worker` serving `generate` against the private redis-server (killed afterwards)."""
    started: list[subprocess.Popen[str]] = []
    log = (tmp_path / "worker.log").open("w")

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "alignd_server.cli", "worker"],
            cwd=REPO,
            env=_env(tmp_path, ALIGND_REDIS_URL=redis_server.url, ALIGND_WORKER_METHODS="generate"),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def test_check_follows_the_pool_of_a_real_worker(
    tmp_path: Path, redis_server: RedisServer, start_worker: Callable[[], subprocess.Popen[str]]
) -> None:
    url = redis_server.url
    before = check(tmp_path, ALIGND_REDIS_URL=url, ALIGND_WORKER_METHODS="generate")
    assert before.returncode == 1 and before.stdout.strip() == UNHEALTHY  # Redis up, no worker yet
    worker = start_worker()
    deadline = time.monotonic() + 60
    while True:
        proc = check(tmp_path, ALIGND_REDIS_URL=url, ALIGND_WORKER_METHODS="generate")
        if proc.returncode == 0:
            break
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
        assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
        time.sleep(0.5)
    assert proc.stdout.strip() == HEALTHY
    # The key is per queue, written by whichever worker serves it: this separate process is "healthy"
    # because of the worker's writes (pool-level), and a method nobody serves keeps the check failing.
    assert redis_server.client().exists("alignd:queue:generate:health-check") == 1
    both = check(tmp_path, ALIGND_REDIS_URL=url, ALIGND_WORKER_METHODS="generate,sft")
    assert both.returncode == 1 and both.stdout.strip() == UNHEALTHY
    # A clean stop deletes the worker's health-check keys: the check fails at once, not after 31 s.
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    after = check(tmp_path, ALIGND_REDIS_URL=url, ALIGND_WORKER_METHODS="generate")
    assert after.returncode == 1 and after.stdout.strip() == UNHEALTHY
