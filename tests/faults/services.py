"""The production stack the fault suite breaks: API (arq mode) in this process, `alignd-server worker`
processes, PostgreSQL, a private redis-server, and moto's S3 server behind a TCP proxy that can be cut.

Everything is real and runs here. The shared PostgreSQL on :5432 cannot be restarted by a test, so the
outage tests start a private one (:class:`PrivatePostgres`, Debian's ``initdb``/``postgres``) on a free
port and crash it with an immediate shutdown.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import (
    API_KEYS,
    RedisServer,
    TcpProxy,
    UvicornThread,
    WorkerProcess,
    free_port,
    make_bucket,
    production_env,
    require_or_skip,
)

# Shorter than the production tests' 8 s so that a SIGKILLed worker's job is back in the queue soon; the
# lease keeper heartbeats from its own thread every 0.5 s, which holds even on a loaded 2-core machine.
FAULT_TIMINGS = {
    "ALIGND_LEASE_SECONDS": "5",
    "ALIGND_HEARTBEAT_SECONDS": "0.5",
    "ALIGND_RECONCILE_INTERVAL_SECONDS": "0.5",
    # Many kills can land on one job: the suite is about never losing it, not about giving up on it.
    "ALIGND_JOB_MAX_TRIES": "1000",
}


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    return Path(found[-1]).parent if found else None


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on a free port that a test may crash and start again.

    Run as the ``postgres`` user when this process is root (PostgreSQL refuses to run as root). ``crash``
    is an immediate shutdown (SIGQUIT): clients see their connections cut and refused, and the next start
    runs crash recovery, as after a real crash.
    """

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="alignd-faults-pg-"))
        self.process: subprocess.Popen[bytes] | None = None
        self._user = "postgres" if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> PrivatePostgres:
        if self.bin is None:
            require_or_skip("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
        assert self.bin is not None
        if self._user is not None:
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, user=self._user)
        subprocess.run(
            [
                *(str(self.bin / "initdb"), "-D", str(self.root / "data")),
                *("-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"),
            ],
            check=True,
            capture_output=True,
            user=self._user,
        )
        return self

    def start(self) -> None:
        assert self.bin is not None and self.process is None
        log = open(self.root / "postgres.log", "ab")  # noqa: SIM115 (held by the child)
        self.process = subprocess.Popen(
            [
                *(str(self.bin / "postgres"), "-D", str(self.root / "data"), "-p", str(self.port)),
                *("-k", str(self.root), "-c", "listen_addresses=127.0.0.1"),
                *("-c", "fsync=off", "-c", "max_connections=200"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            user=self._user,
        )
        log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(self.url.replace("+psycopg", ""), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline or (self.process and self.process.poll() is not None):
                    raise RuntimeError("private PostgreSQL did not start") from None
                time.sleep(0.2)

    def crash(self) -> None:
        """Immediate shutdown: every backend is killed at once, nothing is checkpointed."""
        if self.process is not None:
            self.process.send_signal(signal.SIGQUIT)
            self.process.wait(timeout=30)
            self.process = None

    def close(self) -> None:
        self.crash()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres().init()
    server.start()
    try:
        yield server
    finally:
        server.close()


@dataclass
class TrainingChild:
    pid: int
    ppid: int
    job_id: str
    attempt: int
    spec: Path


_SPEC = re.compile(r"/jobs/(?P<job>[^/]+)/attempt-(?P<attempt>\d+)/spec\.json$")


def training_children() -> list[TrainingChild]:
    """Every live `python -m workers.training .../jobs/<job>/attempt-<n>/spec.json` on this machine."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            if b"workers.training" not in argv:
                continue
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        state = re.search(r"^State:\s+(\S)", status, re.M)
        ppid = re.search(r"^PPid:\s+(\d+)", status, re.M)
        matched = _SPEC.search(argv[-2].decode(errors="replace") if len(argv) > 1 else "")
        if matched and ppid and state and state.group(1) not in "ZX":
            found.append(
                TrainingChild(
                    pid=int(entry.name),
                    ppid=int(ppid.group(1)),
                    job_id=matched["job"],
                    attempt=int(matched["attempt"]),
                    spec=Path(argv[-2].decode()),
                )
            )
    return found


@dataclass
class WorkerSlot:
    """One worker "machine": a data directory that outlives the processes run on it (a pod's volume)."""

    index: int
    env: dict[str, str]
    data_dir: Path
    log_path: Path
    process: WorkerProcess | None = None
    starts: int = 0

    def start(self) -> None:
        self.process = WorkerProcess({**self.env, "ALIGND_DATA_DIR": str(self.data_dir)}, self.log_path)
        self.process.start()
        self.starts += 1

    @property
    def pid(self) -> int | None:
        popen = self.process.process if self.process else None
        return popen.pid if popen is not None and popen.poll() is None else None

    def sigkill(self) -> None:
        """SIGKILL the worker's process group. Its training children live in their own sessions and are
        not signalled: they must die with their supervisor on their own (workers/training/lifeline.py)."""
        assert self.process is not None and self.process.process is not None
        self.process.kill(signal.SIGKILL)
        self.process.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class FaultStack:
    base_url: str
    database_url: str
    redis: RedisServer
    moto_endpoint: str
    s3_proxy: TcpProxy
    bucket: str
    workers: list[WorkerSlot] = field(default_factory=list)

    def client(self, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {API_KEYS['tenant-a']}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60, **kwargs)

    def s3(self) -> Any:
        """boto3 straight to moto (not through the proxy): the test can look while the "endpoint" is down."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.moto_endpoint, config=Config(s3={"addressing_style": "path"})
        )

    def worker_logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- worker {w.index}\n{w.log()[-tail:]}" for w in self.workers)


@contextlib.contextmanager
def fault_stack(
    tmp_path: Path,
    *,
    database_url: str,
    redis: RedisServer,
    moto_endpoint: str,
    aws_env: dict[str, str],
    workers: int = 2,
    extra_env: dict[str, str] | None = None,
) -> Iterator[FaultStack]:
    """API in this process + ``workers`` worker processes, every S3 call through a cuttable proxy."""
    from service.api.app import create_app
    from service.settings import Settings

    bucket = make_bucket(moto_endpoint)
    proxy = TcpProxy(int(moto_endpoint.rsplit(":", 1)[1])).start()
    env = production_env(
        data_dir=tmp_path / "api",
        database_url=database_url,
        redis_url=redis.url,
        s3_endpoint=f"http://127.0.0.1:{proxy.port}",
        bucket=bucket,
    )
    env.update(FAULT_TIMINGS)
    env.update(extra_env or {})
    settings = Settings.model_validate(
        {key.removeprefix("ALIGND_").lower(): value for key, value in env.items()}
    )
    stack: FaultStack | None = None
    try:
        with UvicornThread(create_app(settings)) as server:
            stack = FaultStack(server.base_url, database_url, redis, moto_endpoint, proxy, bucket)
            worker_env = {**env, **aws_env, "ALIGND_WORKER_METRICS_PORT": "0", "ALIGND_LOG_JSON": "false"}
            for index in range(workers):
                slot = WorkerSlot(
                    index, worker_env, tmp_path / f"worker-{index}", tmp_path / f"worker-{index}.log"
                )
                slot.start()
                stack.workers.append(slot)
            yield stack
    finally:
        if stack is not None:
            for slot in stack.workers:
                slot.stop()
        proxy.stop()


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False
